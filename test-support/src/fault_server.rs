//! The target agent's fault handling, reduced to what a test of the VMM side
//! needs: every fault on a handed-off target userfaultfd is resolved at once,
//! and counted.

use std::any::Any;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use guest_memory::uffd::{EventBuffer, FaultKind};
use guest_memory::{RegionLayout, UffdError, UffdEvent, Userfaultfd};

/// Sleep when no fault is pending: the descriptor is read non-blocking so
/// that the thread can stop, and a fault waits at most this long.
const IDLE_SLEEP: Duration = Duration::from_millis(1);
/// Messages read with one `read(2)`.
const EVENTS_PER_READ: usize = 16;

/// A thread serving the faults of one region:
/// - MINOR (the page is in the memory file, only the VMM's page-table entry
///   is missing): `UFFDIO_CONTINUE`;
/// - MISSING (a hole in the file): `UFFDIO_COPY` of the content `fill` writes
///   for the page;
/// - EEXIST (another thread's fault on the page won the race): `UFFDIO_WAKE`.
///
/// Anything else (another event, a fault outside the region, a failed ioctl)
/// panics the thread; the panic is raised again in the test by [`stop`], by
/// the counters, or when the server is dropped.
///
/// [`stop`]: FaultServer::stop
#[derive(Debug)]
pub struct FaultServer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    minor: AtomicU64,
    missing: AtomicU64,
    resolved_pages: Mutex<BTreeSet<u64>>,
}

impl FaultServer {
    /// Serves the faults of `uffd` (registered over `region` of the VMM).
    /// `fill(page, buf)` writes the content of a missing page, by its index in
    /// the region.
    pub fn start(uffd: Userfaultfd, region: RegionLayout, fill: impl Fn(u64, &mut [u8]) + Send + 'static) -> Self {
        uffd.set_nonblocking().expect("non-blocking userfaultfd");
        let shared = Arc::new(Shared::default());
        let thread = std::thread::Builder::new()
            .name("fault-server".to_owned())
            .spawn({
                let shared = shared.clone();
                move || serve(&uffd, &region, &fill, &shared)
            })
            .expect("starting the fault-server thread");
        Self { shared, thread: Some(thread) }
    }

    /// MINOR faults seen so far.
    pub fn minor_faults(&self) -> u64 {
        self.assert_alive();
        self.shared.minor.load(Ordering::SeqCst)
    }

    /// MISSING faults seen so far.
    pub fn missing_faults(&self) -> u64 {
        self.assert_alive();
        self.shared.missing.load(Ordering::SeqCst)
    }

    /// Every page a fault was resolved on (region indexes). A page is
    /// recorded before its fault is resolved, so it is here by the time the
    /// faulting thread goes on.
    pub fn resolved_pages(&self) -> BTreeSet<u64> {
        self.assert_alive();
        lock(&self.shared.resolved_pages).clone()
    }

    /// Stops serving (faults raised from now on stay unresolved) and joins
    /// the thread; its panic, if any, fails the test here.
    pub fn stop(mut self) {
        if let Err(panic) = self.stop_and_join() {
            std::panic::resume_unwind(panic);
        }
    }

    fn stop_and_join(&mut self) -> Result<(), Box<dyn Any + Send>> {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.thread.take().map_or(Ok(()), JoinHandle::join)
    }

    fn assert_alive(&self) {
        if self.thread.as_ref().is_some_and(JoinHandle::is_finished) {
            panic!("the fault server died (its panic is above)");
        }
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        if let Err(panic) = self.stop_and_join() {
            if std::thread::panicking() {
                eprintln!("the fault server had died too: {}", panic_message(&*panic));
            } else {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

fn serve(uffd: &Userfaultfd, region: &RegionLayout, fill: &dyn Fn(u64, &mut [u8]), shared: &Shared) {
    let (base, page_size) = (region.base_host_virt_addr, region.page_size);
    let mut buf = EventBuffer::new(EVENTS_PER_READ);
    let mut events = Vec::new();
    let mut content = vec![0u8; page_size as usize];
    while !shared.stop.load(Ordering::SeqCst) {
        events.clear();
        uffd.read_events(&mut buf, &mut events).expect("reading the userfaultfd");
        if events.is_empty() {
            std::thread::sleep(IDLE_SLEEP);
        }
        for event in &events {
            let fault = match event {
                UffdEvent::PageFault(fault) => fault,
                // A target VMM's uffd reports what it drops or unmaps (at
                // its exit, too): nothing to resolve.
                UffdEvent::Remove { .. } | UffdEvent::Unmap { .. } => continue,
                other => panic!("the fault server got an unexpected {other:?}"),
            };
            assert!(
                (base..base + region.size).contains(&fault.address),
                "fault at {:#x}, outside the region {region:?}",
                fault.address
            );
            let page = (fault.address - base) / page_size;
            let addr = base + page * page_size;
            lock(&shared.resolved_pages).insert(page);
            let result = match fault.kind {
                FaultKind::Minor => {
                    shared.minor.fetch_add(1, Ordering::SeqCst);
                    uffd.continue_range(addr, page_size, true)
                }
                FaultKind::Missing => {
                    shared.missing.fetch_add(1, Ordering::SeqCst);
                    fill(page, &mut content);
                    uffd.copy(addr, &content, true)
                }
                FaultKind::WriteProtect => panic!("a write-protect fault on page {page}: the target registers none"),
            };
            match result {
                Ok(_) => {}
                Err(UffdError::Exists { .. }) => uffd.wake(addr, page_size).expect("UFFDIO_WAKE"),
                Err(e) => panic!("resolving a fault on page {page}: {e}"),
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic.downcast_ref::<String>().map(String::as_str).or_else(|| panic.downcast_ref::<&str>().copied()).unwrap_or("?")
}
