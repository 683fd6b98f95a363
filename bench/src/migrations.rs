//! Whole migrations through the demo, read from its report. (To be filled in.)
#![forbid(unsafe_code)]

use crate::{BenchOptions, BenchReport};

/// Measures the migration rows.
pub async fn measure(_opts: &BenchOptions, _report: &mut BenchReport) -> anyhow::Result<()> {
    Ok(())
}
