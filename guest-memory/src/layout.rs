//! The guest's memory regions and the page numbering both agents share.
//!
//! Pages are addressed on the wire as (region, index in region). Inside the
//! agents a page has one *global* number: regions laid end to end in order.
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

/// One region as the VMM maps it (the shape of Firecracker's
/// `GuestRegionUffdMapping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    /// Where the VMM mapped the region (its own address space).
    pub base_host_virt_addr: u64,
    pub size: u64,
    /// Offset of the region in the guest-memory file.
    pub offset: u64,
    pub page_size: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("layout has no regions")]
    Empty,
    #[error("region {region}: page size {page_size} is not 4096 or 2097152")]
    BadPageSize { region: usize, page_size: u64 },
    #[error("region {region}: page size {page_size} differs from region 0's {first}")]
    MixedPageSizes { region: usize, page_size: u64, first: u64 },
    #[error("region {region}: {what} {value:#x} is not a multiple of the page size {page_size:#x}")]
    Unaligned { region: usize, what: &'static str, value: u64, page_size: u64 },
    #[error("region {region}: size is 0")]
    EmptyRegion { region: usize },
    #[error("regions {a} and {b} overlap ({what})")]
    Overlap { a: usize, b: usize, what: &'static str },
    #[error("region {region}: address range overflows")]
    Overflow { region: usize },
    #[error("unknown region {region} (the layout has {count})")]
    UnknownRegion { region: u32, count: usize },
    #[error("page {index} out of range for region {region} ({pages} pages)")]
    OutOfRange { region: u32, index: u64, pages: u64 },
}

/// The validated layout of a guest's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestLayout {
    regions: Vec<RegionLayout>,
    /// Global number of each region's first page.
    first_page: Vec<u64>,
    page_size: u64,
    total_pages: u64,
}

impl GuestLayout {
    pub fn new(regions: Vec<RegionLayout>) -> Result<Self, LayoutError> {
        let first = regions.first().ok_or(LayoutError::Empty)?.page_size;
        let mut first_page = Vec::with_capacity(regions.len());
        let mut total = 0u64;
        for (i, r) in regions.iter().enumerate() {
            if r.page_size != 4096 && r.page_size != 2 << 20 {
                return Err(LayoutError::BadPageSize { region: i, page_size: r.page_size });
            }
            if r.page_size != first {
                return Err(LayoutError::MixedPageSizes { region: i, page_size: r.page_size, first });
            }
            if r.size == 0 {
                return Err(LayoutError::EmptyRegion { region: i });
            }
            for (what, value) in
                [("size", r.size), ("offset", r.offset), ("base_host_virt_addr", r.base_host_virt_addr)]
            {
                if value % r.page_size != 0 {
                    return Err(LayoutError::Unaligned { region: i, what, value, page_size: r.page_size });
                }
            }
            if r.base_host_virt_addr.checked_add(r.size).is_none() || r.offset.checked_add(r.size).is_none() {
                return Err(LayoutError::Overflow { region: i });
            }
            for (j, o) in regions[..i].iter().enumerate() {
                let overlaps = |a: u64, b: u64| a < b + o.size && b < a + r.size;
                if overlaps(r.base_host_virt_addr, o.base_host_virt_addr) {
                    return Err(LayoutError::Overlap { a: j, b: i, what: "host addresses" });
                }
                if overlaps(r.offset, o.offset) {
                    return Err(LayoutError::Overlap { a: j, b: i, what: "file offsets" });
                }
            }
            first_page.push(total);
            total += r.size / r.page_size;
        }
        Ok(Self { regions, first_page, page_size: first, total_pages: total })
    }

    pub fn regions(&self) -> &[RegionLayout] {
        &self.regions
    }
    pub fn page_size(&self) -> u64 {
        self.page_size
    }
    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }
    pub fn total_bytes(&self) -> u64 {
        self.total_pages * self.page_size
    }
    /// Pages in `region`.
    pub fn region_pages(&self, region: u32) -> Result<u64, LayoutError> {
        self.region(region).map(|r| r.size / self.page_size)
    }
    pub fn region(&self, region: u32) -> Result<&RegionLayout, LayoutError> {
        self.regions.get(region as usize).ok_or(LayoutError::UnknownRegion { region, count: self.regions.len() })
    }
    /// Global number of the first page of `region`.
    pub fn region_first_page(&self, region: u32) -> Result<u64, LayoutError> {
        self.region(region)?;
        Ok(self.first_page[region as usize])
    }

    /// Global page number of (region, index), or why it does not exist.
    pub fn global_page(&self, region: u32, index: u64) -> Result<u64, LayoutError> {
        let pages = self.region_pages(region)?;
        if index >= pages {
            return Err(LayoutError::OutOfRange { region, index, pages });
        }
        Ok(self.first_page[region as usize] + index)
    }

    /// (region, index in region) of a global page number (< total_pages).
    pub fn locate(&self, page: u64) -> (u32, u64) {
        let region = self.first_page.partition_point(|&first| first <= page) - 1;
        (region as u32, page - self.first_page[region])
    }

    /// Offset of a global page in the guest-memory file.
    pub fn file_offset(&self, page: u64) -> u64 {
        let (region, index) = self.locate(page);
        self.regions[region as usize].offset + index * self.page_size
    }

    /// Address of a global page in the VMM's address space.
    pub fn host_addr(&self, page: u64) -> u64 {
        let (region, index) = self.locate(page);
        self.regions[region as usize].base_host_virt_addr + index * self.page_size
    }

    /// Global page holding VMM address `addr`, if any region covers it.
    pub fn page_at_host_addr(&self, addr: u64) -> Option<u64> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            let off = addr.checked_sub(r.base_host_virt_addr)?;
            (off < r.size).then(|| self.first_page[i] + off / self.page_size)
        })
    }

    /// Smallest file length that holds every region.
    pub fn file_len(&self) -> u64 {
        self.regions.iter().map(|r| r.offset + r.size).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(base: u64, size: u64, offset: u64) -> RegionLayout {
        RegionLayout { base_host_virt_addr: base, size, offset, page_size: 4096 }
    }

    #[test]
    fn numbering_spans_regions() {
        let l =
            GuestLayout::new(vec![region(0x10000, 0x4000, 0), region(0x80000, 0x2000, 0x4000)]).expect("valid layout");
        assert_eq!(l.total_pages(), 6);
        assert_eq!(l.global_page(1, 1), Ok(5));
        assert_eq!(l.locate(5), (1, 1));
        assert_eq!(l.locate(3), (0, 3));
        assert_eq!(l.file_offset(5), 0x5000);
        assert_eq!(l.host_addr(4), 0x80000);
        assert_eq!(l.page_at_host_addr(0x81fff), Some(5));
        assert_eq!(l.page_at_host_addr(0x82000), None);
        assert_eq!(l.global_page(1, 2), Err(LayoutError::OutOfRange { region: 1, index: 2, pages: 2 }));
        assert_eq!(l.global_page(2, 0), Err(LayoutError::UnknownRegion { region: 2, count: 2 }));
    }

    #[test]
    fn rejects_bad_layouts() {
        assert_eq!(GuestLayout::new(vec![]), Err(LayoutError::Empty));
        assert!(matches!(GuestLayout::new(vec![region(0x10000, 0x1001, 0)]), Err(LayoutError::Unaligned { .. })));
        assert!(matches!(
            GuestLayout::new(vec![region(0x10000, 0x4000, 0), region(0x12000, 0x1000, 0x4000)]),
            Err(LayoutError::Overlap { what: "host addresses", .. })
        ));
        assert!(matches!(
            GuestLayout::new(vec![RegionLayout { page_size: 8192, ..region(0, 0x4000, 0) }]),
            Err(LayoutError::BadPageSize { .. })
        ));
    }
}
