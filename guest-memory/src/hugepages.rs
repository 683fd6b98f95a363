//! Reserving 2 MiB huge pages for hugetlbfs guests, and giving them back.
//!
//! A hugetlbfs guest needs free huge pages for its memory on the source and
//! on the target. When too few are free and we are root, the pool
//! (`/proc/sys/vm/nr_hugepages`) is grown by what is missing and shrunk by
//! the same amount when the reservation is dropped; concurrent
//! reservations in one process are counted together.
#![forbid(unsafe_code)]

use std::sync::Mutex;

const POOL: &str = "/proc/sys/vm/nr_hugepages";

#[derive(Debug, thiserror::Error)]
pub enum HugePageError {
    #[error("reading {what}: {source}")]
    Read {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {what}: {source}")]
    Write {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{need} free 2 MiB huge pages are needed, {free} are free{hint}; as root: echo {want} > /proc/sys/vm/nr_hugepages"
    )]
    TooFew { need: u64, free: u64, want: u64, hint: &'static str },
}

/// Pages this process added to the pool and has not given back yet.
static ADDED: Mutex<u64> = Mutex::new(0);

/// Huge pages added for one migration; given back on drop.
#[derive(Debug)]
pub struct HugePageReservation {
    added: u64,
}

fn meminfo(field: &str) -> Result<u64, HugePageError> {
    let text = std::fs::read_to_string("/proc/meminfo")
        .map_err(|source| HugePageError::Read { what: "/proc/meminfo", source })?;
    Ok(text.lines().find_map(|l| l.strip_prefix(field)?.split_whitespace().next()?.parse().ok()).unwrap_or(0))
}

/// Free huge pages that no mapping has reserved yet (a shared hugetlbfs
/// mapping reserves its pages at mmap time and counts them as free until
/// they are touched).
fn available() -> Result<u64, HugePageError> {
    Ok(meminfo("HugePages_Free:")?.saturating_sub(meminfo("HugePages_Rsvd:")?))
}

fn pool_size() -> Result<u64, HugePageError> {
    let text = std::fs::read_to_string(POOL).map_err(|source| HugePageError::Read { what: POOL, source })?;
    Ok(text.trim().parse().unwrap_or(0))
}

/// Makes sure `need` huge pages are free, growing the pool if we may.
pub fn reserve(need: u64) -> Result<HugePageReservation, HugePageError> {
    let mut added_total = ADDED.lock().unwrap_or_else(|e| e.into_inner());
    let free = available()?;
    if free >= need {
        return Ok(HugePageReservation { added: 0 });
    }
    let missing = need - free;
    let want = pool_size()? + missing;
    if std::fs::write(POOL, want.to_string()).is_err() {
        return Err(HugePageError::TooFew { need, free, want, hint: " and the pool cannot be grown (not root?)" });
    }
    let now_free = available()?;
    let added = pool_size()?.saturating_sub(want - missing);
    *added_total += added;
    // Given back on every path out; not while `ADDED` is held here (its drop
    // takes the lock too).
    drop(added_total);
    let reservation = HugePageReservation { added };
    if now_free < need {
        drop(reservation);
        return Err(HugePageError::TooFew {
            need,
            free: now_free,
            want,
            hint: " even after growing the pool (memory too fragmented or too small?)",
        });
    }
    Ok(reservation)
}

impl HugePageReservation {
    /// Pages this reservation added to the pool (0 when enough were free),
    /// which dropping it takes away again.
    pub fn added(&self) -> u64 {
        self.added
    }
}

/// The pool's size now (`/proc/sys/vm/nr_hugepages`).
pub fn pool_pages() -> Result<u64, HugePageError> {
    pool_size()
}

/// Shrinks the pool by `pages` (saturating), as dropping a reservation that
/// added them does: for pages a process added and could not give back (it
/// was killed).
pub fn give_back(pages: u64) -> Result<(), HugePageError> {
    let _serialized = ADDED.lock().unwrap_or_else(|e| e.into_inner());
    let size = pool_size()?;
    std::fs::write(POOL, size.saturating_sub(pages).to_string())
        .map_err(|source| HugePageError::Write { what: POOL, source })
}

impl Drop for HugePageReservation {
    fn drop(&mut self) {
        if self.added == 0 {
            return;
        }
        let mut added_total = ADDED.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(size) = pool_size() {
            let _ = std::fs::write(POOL, size.saturating_sub(self.added).to_string());
        }
        *added_total = added_total.saturating_sub(self.added);
    }
}
