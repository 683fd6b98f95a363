//! `libpageserver_vmm_shim.so`: hands an unmodified QEMU's guest memory to a
//! page-server agent, loaded with `LD_PRELOAD`.
//!
//! An agent cannot register userfaultfd on another process's memory, so the
//! VMM must do it and pass the descriptors over the agent's Unix socket (see
//! `guest_memory::handoff`). QEMU knows nothing of that; this library does it
//! from inside QEMU, the same way the demo's VMM stand-in does.
//!
//! # Interposition
//!
//! QEMU 7.2, given
//! `-object memory-backend-file,id=mem0,size=SIZE,mem-path=PATH,share=on
//! -machine pc,memory-backend=mem0`, opens PATH (`__open64_2(PATH, O_RDWR)`,
//! or `open64(PATH, O_RDWR|O_CREAT|O_EXCL, 0644)` when it creates it),
//! reserves an address range with an anonymous `PROT_NONE` `mmap64`, then
//! maps the file over it with `mmap64(addr, SIZE, PROT_READ|PROT_WRITE,
//! MAP_SHARED|MAP_FIXED, fd, 0)`.
//!
//! The library exports `mmap64` and `mmap`, which forward to libc's (found
//! with `dlsym(RTLD_NEXT)`). When a forwarded call has mapped the watched
//! file `MAP_SHARED`, the shim, before returning to QEMU:
//! - source role: registers the range with a new userfaultfd in WP mode
//!   (WP_ASYNC: dirty tracking), opens `/proc/self/pagemap`, and hands the
//!   memory file, the uffd and the pagemap to the source agent;
//! - target role: registers the range MINOR + MISSING and hands the memory
//!   file and the uffd to the target agent;
//! - waits for the agent's "ok", logs one line, and keeps the connection and
//!   its own copies of the descriptors open for the life of the process (EOF
//!   on the connection tells the agent that the VMM is gone).
//!
//! The page size is the file's block size (`st_blksize`: 4 KiB on tmpfs,
//! 2 MiB on hugetlbfs). The file is recognised by device and inode, so
//! QEMU's `open*` calls need no interposition (see [`watch`]).
//!
//! Anything that goes wrong (no agent, refusal, a userfaultfd error, a
//! second or private mapping of the file) prints a line starting with
//! `pageserver-vmm-shim:` and ends QEMU with `_exit(1)`: a VM whose memory
//! is not tracked must not run. So do QEMU options that fault every page in
//! at start-up (`prealloc=on`, `-mem-prealloc`, `-overcommit mem-lock=on`),
//! checked when the library is loaded (see [`cmdline`]).
//!
//! # Environment
//!
//! | variable | meaning |
//! |---|---|
//! | `PAGESERVER_SHIM_ROLE` | `source` or `target`; unset or empty: the shim does nothing at all |
//! | `PAGESERVER_SHIM_MEM_PATH` | the memory-backend-file `mem-path` (a file, not a directory) |
//! | `PAGESERVER_SHIM_SOCKET` | the agent's hand-off socket |
//! | `PAGESERVER_SHIM_VM` | the VM's name in the hand-off (default `vm`) |
//! | `PAGESERVER_SHIM_CONNECT_TIMEOUT` | seconds to retry connecting while the agent is not listening (default 10) |
//!
//! ```text
//! PAGESERVER_SHIM_ROLE=target PAGESERVER_SHIM_MEM_PATH=/dev/shm/vm1.ram \
//! PAGESERVER_SHIM_SOCKET=/run/pageserver/target.sock PAGESERVER_SHIM_VM=vm1 \
//! LD_PRELOAD=/usr/lib/libpageserver_vmm_shim.so qemu-system-x86_64 ... \
//!   -object memory-backend-file,id=mem0,size=4G,mem-path=/dev/shm/vm1.ram,share=on \
//!   -machine pc,memory-backend=mem0 -incoming defer
//! ```
//!
//! All `unsafe` code is in [`sys`]; the other modules forbid it.
#![deny(unsafe_code)]
// The unit-test binary has no interposers (see `sys`), so most of the shim
// is unreachable there.
#![cfg_attr(test, allow(dead_code))]

mod cmdline;
mod config;
mod handoff;
mod sys;
mod watch;
