//! Memory sizes as users type them: `1G`, `256M`, `64MiB`, `4096`.
//!
//! Every suffix is binary (`1G` = `1GiB` = 2^30 bytes), as memory sizes of
//! VMMs usually are.

/// Why a size could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("empty size")]
    Empty,
    #[error("size {0:?}: expected a number of bytes, optionally followed by K, M, G or T (KiB, MiB, ...)")]
    Malformed(String),
    #[error("size {0:?} does not fit in 64 bits")]
    Overflow(String),
}

/// Parses `1G`, `256M`, `64MiB`, `2048k`, `1GB` or a plain number of bytes.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(SizeError::Empty);
    }
    let digits_end = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (number, suffix) = trimmed.split_at(digits_end);
    if number.is_empty() {
        return Err(SizeError::Malformed(text.to_owned()));
    }
    let value: u64 = number.parse().map_err(|_| SizeError::Overflow(text.to_owned()))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(SizeError::Malformed(text.to_owned())),
    };
    value.checked_mul(1u64 << shift).ok_or_else(|| SizeError::Overflow(text.to_owned()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert_eq!(parse_size(" 1 gb "), Ok(1 << 30));
        assert_eq!(parse_size("3T"), Ok(3 << 40));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert!(matches!(parse_size("G"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse_size("12X"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse_size("-1"), Err(SizeError::Malformed(_))));
        assert!(matches!(parse_size("99999999999T"), Err(SizeError::Overflow(_))));
    }
}
