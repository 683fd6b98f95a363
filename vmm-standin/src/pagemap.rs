//! Which pages of our own guest-memory mapping are mapped, from
//! `/proc/self/pagemap`, without touching them: on the target an unmapped
//! page faults through the agent, and blocks for ever if the agent is gone.
//!
//! The file holds one little-endian `u64` per 4 KiB of virtual address, at
//! offset `address / 4096 * 8`; bit 63 says the page is present in our page
//! tables. A 2 MiB page has 512 entries, all alike: its first one says.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Bit 63 of a pagemap entry: present in RAM, mapped by our page tables.
const PRESENT: u64 = 1 << 63;
/// Virtual bytes one entry describes, whatever the page size.
const ENTRY_SPAN: u64 = 4096;
/// Bytes of one entry.
const ENTRY_BYTES: usize = 8;

/// This process's `/proc/self/pagemap`.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    pub fn open_own() -> io::Result<Self> {
        Ok(Self { file: File::open("/proc/self/pagemap")? })
    }

    /// For each of `count` pages of `page_size` bytes from `addr`, whether
    /// it is mapped.
    pub fn mapped(&self, addr: u64, count: usize, page_size: u64) -> io::Result<Vec<bool>> {
        let entries_per_page = page_size / ENTRY_SPAN;
        let first_entry = addr / ENTRY_SPAN;
        if entries_per_page == 1 {
            // Adjacent entries: one read.
            let mut raw = vec![0u8; count * ENTRY_BYTES];
            self.file.read_exact_at(&mut raw, first_entry * ENTRY_BYTES as u64)?;
            return Ok(raw.chunks_exact(ENTRY_BYTES).map(is_present).collect());
        }
        (0..count as u64)
            .map(|page| {
                let mut raw = [0u8; ENTRY_BYTES];
                let entry = first_entry + page * entries_per_page;
                self.file.read_exact_at(&mut raw, entry * ENTRY_BYTES as u64)?;
                Ok(is_present(&raw))
            })
            .collect()
    }
}

fn is_present(entry: &[u8]) -> bool {
    let mut raw = [0u8; ENTRY_BYTES];
    raw.copy_from_slice(entry);
    u64::from_le_bytes(raw) & PRESENT != 0
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::fd::AsFd;

    use guest_memory::MemoryMap;
    use guest_memory::memfile::{ftruncate, memfd_create};

    use super::*;

    #[test]
    fn only_touched_pages_are_mapped() {
        let memfd = memfd_create("pagemap-test", false).unwrap();
        ftruncate(memfd.as_fd(), 8 * 4096).unwrap();
        let map = MemoryMap::map(memfd.as_fd(), 0, 8 * 4096, true).unwrap();
        map.write_u64(2 * 4096, 1);
        map.read_u64(5 * 4096 + 8);
        let mapped = Pagemap::open_own().unwrap().mapped(map.addr(), 8, 4096).unwrap();
        assert_eq!(mapped, [false, false, true, false, false, true, false, false]);
        let mapped = Pagemap::open_own().unwrap().mapped(map.addr() + 4 * 4096, 2, 4096).unwrap();
        assert_eq!(mapped, [false, true]);
    }
}
