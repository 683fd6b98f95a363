//! The target's RAM file compared with the source's (frozen since the
//! pause), once the target agent has installed every page.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use super::error::QemuError;

/// Comparison granule: 4 KiB, whatever the guest's page size.
const GRANULE: usize = 4096;
/// How many differing granules are listed.
const MISMATCHES_REPORTED: usize = 16;
/// Read-ahead of each file.
const READ_BUFFER: usize = 1 << 20;

/// What [`compare_ram_files`] found, in 4 KiB granules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamComparison {
    pub compared: u64,
    pub differing: u64,
    /// The first differing granules, at most [`MISMATCHES_REPORTED`].
    pub first_differing: Vec<u64>,
}

/// Compares two RAM files granule by granule.
pub fn compare_ram_files(source: &Path, target: &Path) -> Result<RamComparison, QemuError> {
    let error = |path: &Path| {
        let path = path.to_owned();
        move |source| QemuError::RamFile { path, source }
    };
    let open = |path: &Path| File::open(path).map(|f| BufReader::with_capacity(READ_BUFFER, f)).map_err(error(path));
    let (mut a, mut b) = (open(source)?, open(target)?);
    let (mut page_a, mut page_b) = (vec![0u8; GRANULE], vec![0u8; GRANULE]);
    let mut found = RamComparison { compared: 0, differing: 0, first_differing: Vec::new() };
    loop {
        let n = a.read(&mut page_a).map_err(error(source))?;
        if n == 0 {
            return Ok(found);
        }
        a.read_exact(&mut page_a[n..]).map_err(error(source))?;
        b.read_exact(&mut page_b).map_err(error(target))?;
        if page_a != page_b {
            found.differing += 1;
            if found.first_differing.len() < MISMATCHES_REPORTED {
                found.first_differing.push(found.compared);
            }
        }
        found.compared += 1;
    }
}
