//! Sizes on the command line: `16MiB`, `512KiB`, `1GiB` or a bare number of
//! bytes, for clap's `value_parser`.
#![forbid(unsafe_code)]

/// Parses `4096`, `512KiB`, `16MiB` or `1GiB` (powers of 1024).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = [("KiB", 1u64 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30)]
        .into_iter()
        .find_map(|(suffix, unit)| text.strip_suffix(suffix).map(|n| (n, unit)))
        .unwrap_or((text, 1));
    let value: u64 = number.trim().parse().map_err(|_| format!("{text:?} is not a size (e.g. 4096, 512KiB, 16MiB)"))?;
    value.checked_mul(unit).ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_errors() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("512KiB"), Ok(512 << 10));
        assert_eq!(parse_bytes("16MiB"), Ok(16 << 20));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        for bad in ["", "MiB", "1.5MiB", "-1", "16MB", "99999999999GiB"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?} accepted");
        }
    }
}
