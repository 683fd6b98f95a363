//! `pageserver-bench`: the agents measured against the physical floor of
//! the same machine, in the same run. Every figure is a key of one JSON
//! report ([`BenchReport`]); `BENCHMARKS.md` explains each row and holds
//! the latest run.
//!
//! What is measured, and against what:
//!
//! - the **floor** ([`floor`]): two plain processes moving bytes over the
//!   same path as the agents (TCP on loopback): a 4 KiB and a 2 MiB
//!   request/response, bulk, and bulk received into a fresh memfd of the
//!   guest's size (what any target must do: allocate its memory);
//! - the **kernel** ([`kernel`]): a minimal in-process fault handler (read
//!   the event, `UFFDIO_CONTINUE`), the rate of a dirty scan
//!   (`PAGEMAP_SCAN`) and the size of an encoded dirty bitmap;
//! - the **agents** ([`migrations`]): whole migrations through the demo
//!   (both agents and both VMM stand-ins as separate processes), read from
//!   its report: fault latencies by kind, pre-copy rate, resume time, pages
//!   fetched per stale page, the agents' private memory;
//! - **QEMU** ([`qemu`]): one QEMU guest migrated by QEMU's own post-copy
//!   and through the agents, in the same run.
//!
//! Nothing here asserts a speed: the figures are reported, and compared with
//! the targets in `BENCHMARKS.md` by a reader.
//!
//! # Layout
//!
//! - [`report`]: the catalogue of rows ([`report::ROWS`]), the report, its
//!   table and its JSON;
//! - [`floor`], [`kernel`], [`migrations`], [`qemu`]: one section each
//!   ([`sparse`]: the sparse 1 TiB guest, run by the migrations section);
//! - [`stats`]: percentiles and medians;
//! - [`plot`]: the fault-latency distributions as an SVG (`--plot`).
#![forbid(unsafe_code)]

pub mod floor;
pub mod kernel;
pub mod migrations;
pub mod plot;
mod pull_order;
pub mod qemu;
pub mod report;
pub mod sparse;
pub mod stats;

pub use report::BenchReport;

/// How much a run measures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BenchOptions {
    /// A short run (about a minute): smaller guests, fewer repetitions; its
    /// figures show that everything works, not how fast.
    pub quick: bool,
    /// Two hosts on one machine: the network rows run across a veth link
    /// between two network namespaces (the demo's `--two-hosts`), not
    /// loopback. `None`: loopback.
    pub link: Option<Link>,
}

/// The link between the two hosts of a `--two-hosts` run.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Link {
    /// Its rate limit in Gbit/s each way (`tc tbf`), if any.
    pub rate_gbit: Option<f64>,
}

impl Link {
    /// The rate limit in bits per second, as `TwoHosts::create` takes it.
    pub fn rate_bits(&self) -> Option<u64> {
        self.rate_gbit.map(|gbit| (gbit * 1e9) as u64)
    }

    /// How the report's notes name the path.
    pub fn describe(&self) -> String {
        match self.rate_gbit {
            Some(gbit) => format!("two hosts: a veth link between two network namespaces, limited to {gbit} Gbit/s"),
            None => "two hosts: a veth link between two network namespaces, no rate limit".to_owned(),
        }
    }
}

impl BenchOptions {
    /// Repetitions of each whole migration (the median is reported).
    pub fn repetitions(&self) -> usize {
        if self.quick { 1 } else { 3 }
    }

    /// Repetitions of the whole migrations (about a minute each in a full
    /// run; the median is reported).
    pub fn migration_repetitions(&self) -> usize {
        if self.quick { 1 } else { 2 }
    }

    /// The guest size of the rows measured "at 4 GiB".
    pub fn large_guest_bytes(&self) -> u64 {
        if self.quick { 512 << 20 } else { 4 << 30 }
    }

    /// The guest size of the rows measured "at 1 GiB".
    pub fn guest_bytes(&self) -> u64 {
        if self.quick { 256 << 20 } else { 1 << 30 }
    }
}
