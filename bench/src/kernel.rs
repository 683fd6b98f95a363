//! What the kernel allows in-process: a minimal fault handler, a dirty scan,
//! an encoded bitmap. (To be filled in.)
#![forbid(unsafe_code)]

use crate::{BenchOptions, BenchReport};

/// Measures the kernel rows.
pub fn measure(_opts: &BenchOptions, _report: &mut BenchReport) -> anyhow::Result<()> {
    Ok(())
}
