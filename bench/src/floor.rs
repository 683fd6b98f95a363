//! The physical floor: two plain processes moving bytes over TCP on
//! 127.0.0.1, the path the agents use on one machine, with nothing else in
//! the way (no gRPC, no async runtime, no userfaultfd). Whatever the agents
//! do over this path costs at least this much.
//!
//! The peer is this binary again ([`PEER_ARG`]): it binds 127.0.0.1:0,
//! prints its port on one line of stdout, accepts one connection and serves
//! it with blocking sockets (`TCP_NODELAY`) until it is closed. With two
//! hosts (`--two-hosts`) the peer runs in the source host's network
//! namespace and binds its end of the veth link, and the bench connects
//! from inside the target host's: the path the agents take there. The protocol
//! is as small as it gets: a request is a length `L` (8 bytes, little
//! endian), the reply is `L` bytes from a buffer filled beforehand.
#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use guest_memory::MemoryMap;
use guest_memory::memfile::{ftruncate, memfd_create};
use pageserver_demo::netns::{Side, TwoHosts, connect_blocking_in};

use crate::plot::Distribution;
use crate::{BenchOptions, BenchReport, stats};

/// The hidden first argument that makes the bench binary the floor's peer.
pub const PEER_ARG: &str = "--floor-peer";

/// The small request/response: one 4 KiB page.
const SMALL_REPLY: u64 = 4096;
/// The large request/response: one 2 MiB (huge) page.
const LARGE_REPLY: u64 = 2 << 20;
/// What the measuring side reads at once (and copies into a memfd at once).
const READ_CHUNK: usize = 1 << 20;
/// The most the peer writes at once: the size of its pre-filled buffer.
const WRITE_CHUNK: usize = 4 << 20;
/// How long the peer may take to exit once its connection is closed.
const PEER_EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// How much the floor measures.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Untimed 4 KiB round trips first (connection, caches, CPU frequency).
    small_warmup: usize,
    /// Timed 4 KiB round trips per repetition.
    small_rounds: usize,
    large_warmup: usize,
    large_rounds: usize,
    /// The bulk transfer: the guest's size.
    bulk_bytes: u64,
    /// Repetitions of each measurement; the median is reported.
    repetitions: usize,
    /// Repetitions of each way into a fresh memfd: at 4 GiB one takes
    /// seconds (every page allocated), too long to repeat.
    precopy_repetitions: usize,
}

impl Plan {
    fn new(opts: &BenchOptions) -> Self {
        let (small_rounds, large_rounds) = if opts.quick { (2_000, 50) } else { (20_000, 500) };
        Self {
            small_warmup: small_rounds / 10,
            small_rounds,
            large_warmup: large_rounds / 10,
            large_rounds,
            bulk_bytes: opts.large_guest_bytes(),
            repetitions: opts.repetitions(),
            precopy_repetitions: 1,
        }
    }
}

/// The peer process's main: serves one connection, then exits. It dies with
/// the bench (`PR_SET_PDEATHSIG`, see `pageserver-parent-death`), so a
/// killed bench leaves no peer behind.
pub fn peer_main() -> anyhow::Result<()> {
    pageserver_parent_death::die_with_parent().context("floor peer: dying with the bench")?;
    let ip = match std::env::args().nth(2) {
        Some(ip) => ip.parse().with_context(|| format!("floor peer: {ip:?} is not an IPv4 address"))?,
        None => Ipv4Addr::LOCALHOST,
    };
    let listener = TcpListener::bind((ip, 0)).with_context(|| format!("floor peer: binding {ip}:0"))?;
    let port = listener.local_addr().context("floor peer: reading the bound address")?.port();
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{port}").and_then(|()| stdout.flush()).context("floor peer: printing the port")?;
    drop(stdout);
    let (conn, _) = listener.accept().context("floor peer: accepting the bench's connection")?;
    drop(listener);
    serve(conn)
}

/// Answers requests on `conn` until the other side closes it: each request
/// is a length, each reply that many bytes, written from one pre-filled
/// buffer in writes of at most [`WRITE_CHUNK`].
fn serve(mut conn: TcpStream) -> anyhow::Result<()> {
    conn.set_nodelay(true).context("floor peer: setting TCP_NODELAY")?;
    // Filled (not zeroed lazily): every page of it is there before the first reply.
    let payload = vec![0x5a_u8; WRITE_CHUNK];
    let mut request = [0u8; 8];
    loop {
        match conn.read_exact(&mut request) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e).context("floor peer: reading a request"),
        }
        let mut left = u64::from_le_bytes(request);
        while left > 0 {
            let n = left.min(WRITE_CHUNK as u64) as usize;
            conn.write_all(&payload[..n]).context("floor peer: writing a reply")?;
            left -= n as u64;
        }
    }
}

/// Measures the floor rows against a peer process: round trips of 4 KiB
/// (`floor_rtt_p50_us`, `floor_rtt_p99_us`) and 2 MiB (`floor_2m_us`), a
/// bulk transfer of the guest's size (`floor_bulk_gib_s`) and the same
/// received into a fresh memfd (`floor_precopy_gib_s`). The peer is stopped
/// at the end, also on error.
pub fn measure(opts: &BenchOptions, report: &mut BenchReport) -> anyhow::Result<()> {
    // Kept until the peer is done: dropping it removes the namespaces.
    let hosts = match opts.link {
        Some(link) => {
            report.note(format!("floor: {}", link.describe()));
            Some(TwoHosts::create(link.rate_bits()).context("setting up the two hosts")?)
        }
        None => None,
    };
    let (peer, port) = PeerProcess::spawn(hosts.as_ref().map(|h| &h.source))?;
    let conn = match &hosts {
        Some(hosts) => {
            let addr = SocketAddr::from((hosts.source.addr, port));
            connect_blocking_in(&hosts.target, addr).context("connecting to the floor peer across the link")?
        }
        None => TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .with_context(|| format!("connecting to the floor peer on 127.0.0.1:{port}"))?,
    };
    let mut client = Client::new(conn)?;
    measure_with(&mut client, &Plan::new(opts), report)?;
    drop(client);
    peer.finish()
}

/// Every floor row over `client`'s connection, as `plan` says.
fn measure_with(client: &mut Client, plan: &Plan, report: &mut BenchReport) -> anyhow::Result<()> {
    let reps = plan.repetitions.max(1);
    let (mut p50s, mut p99s, mut small_samples) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let samples =
            client.round_trips(SMALL_REPLY, plan.small_warmup, plan.small_rounds).context("4 KiB round trips")?;
        p50s.extend(stats::quantile(&samples, 0.5));
        p99s.extend(stats::quantile(&samples, 0.99));
        small_samples = samples;
    }
    report.distributions.push(Distribution::of_samples("floor: raw TCP 4 KiB round trip", &small_samples));
    report.set("floor_rtt_p50_us", median(&p50s)?);
    report.set("floor_rtt_p99_us", median(&p99s)?);

    let (mut large, mut large_samples) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let samples =
            client.round_trips(LARGE_REPLY, plan.large_warmup, plan.large_rounds).context("2 MiB round trips")?;
        large.extend(stats::median(&samples));
        large_samples = samples;
    }
    report.distributions.push(Distribution::of_samples("floor: raw TCP 2 MiB round trip", &large_samples));
    report.set("floor_2m_us", median(&large)?);

    let mut bulk = Vec::new();
    for _ in 0..reps {
        let seconds = client.transfer(plan.bulk_bytes, |_, _| Ok(())).context("bulk transfer")?;
        bulk.push(gib_per_s(plan.bulk_bytes, seconds));
    }
    report.set("floor_bulk_gib_s", median(&bulk)?);

    let (mut pwrite, mut mapped) = (Vec::new(), Vec::new());
    for _ in 0..plan.precopy_repetitions.max(1) {
        pwrite.push(into_fresh_memfd(client, plan.bulk_bytes, Sink::Pwrite).context("bulk into a memfd (pwrite)")?);
        mapped.push(into_fresh_memfd(client, plan.bulk_bytes, Sink::Mapping).context("bulk into a memfd (mapping)")?);
    }
    let (pwrite, mapped) = (median(&pwrite)?, median(&mapped)?);
    let winner = if mapped > pwrite { "copying into a MAP_SHARED mapping" } else { "pwrite" };
    report.set("floor_precopy_gib_s", pwrite.max(mapped));
    let runs = match plan.precopy_repetitions {
        0 | 1 => "one transfer each".to_owned(),
        n => format!("median of {n} transfers each"),
    };
    report.note(format!(
        "floor_precopy_gib_s: {winner} is faster ({pwrite:.3} GiB/s with pwrite, \
         {mapped:.3} GiB/s copying into a MAP_SHARED mapping of the memfd; {runs})"
    ));
    Ok(())
}

/// How bulk bytes land in the fresh memfd.
#[derive(Debug, Clone, Copy)]
enum Sink {
    /// `pwrite(2)` of each chunk at increasing offsets.
    Pwrite,
    /// A copy of each chunk into a `MAP_SHARED` mapping of the whole file.
    Mapping,
}

/// Receives `bytes` into a fresh shmem memfd of that size, as a target must
/// (its guest memory starts empty: every page is allocated on the way);
/// returns GiB/s. The memfd is created before the clock starts and freed
/// after it stops.
fn into_fresh_memfd(client: &mut Client, bytes: u64, sink: Sink) -> anyhow::Result<f64> {
    let memfd = memfd_create("pageserver-bench-precopy", false).context("memfd_create")?;
    ftruncate(memfd.as_fd(), bytes).with_context(|| format!("sizing the memfd to {bytes} bytes"))?;
    let seconds = match sink {
        Sink::Pwrite => {
            let file = File::from(memfd);
            client.transfer(bytes, |offset, chunk| {
                file.write_all_at(chunk, offset).with_context(|| format!("pwrite at {offset:#x}"))
            })?
        }
        Sink::Mapping => {
            let len = usize::try_from(bytes).context("the guest does not fit the address space")?;
            let map = MemoryMap::map(memfd.as_fd(), 0, len, true).context("mapping the memfd")?;
            client.transfer(bytes, |offset, chunk| {
                map.copy_in(offset as usize, chunk);
                Ok(())
            })?
        }
    };
    Ok(gib_per_s(bytes, seconds))
}

/// The measuring side of one connection.
#[derive(Debug)]
struct Client {
    conn: TcpStream,
    /// Reused for every read: [`READ_CHUNK`] bytes.
    buf: Vec<u8>,
}

impl Client {
    fn new(conn: TcpStream) -> anyhow::Result<Self> {
        conn.set_nodelay(true).context("setting TCP_NODELAY")?;
        Ok(Self { conn, buf: vec![0; READ_CHUNK] })
    }

    /// Asks for `len` bytes and receives them, [`READ_CHUNK`] at a time,
    /// handing each chunk and its offset to `sink`; returns the seconds from
    /// the request to the last byte sunk.
    fn transfer(&mut self, len: u64, mut sink: impl FnMut(u64, &[u8]) -> anyhow::Result<()>) -> anyhow::Result<f64> {
        let start = Instant::now();
        self.conn.write_all(&len.to_le_bytes()).context("sending a request")?;
        let mut received = 0u64;
        while received < len {
            let n = (len - received).min(self.buf.len() as u64) as usize;
            self.conn
                .read_exact(&mut self.buf[..n])
                .map_err(|e| match e.kind() {
                    io::ErrorKind::UnexpectedEof => io::Error::new(e.kind(), "the peer closed the connection"),
                    _ => e,
                })
                .with_context(|| format!("receiving bytes {received}..{} of {len}", received + n as u64))?;
            sink(received, &self.buf[..n])?;
            received += n as u64;
        }
        Ok(start.elapsed().as_secs_f64())
    }

    /// `warmup` untimed then `rounds` timed round trips of `len` bytes;
    /// returns each timed one in µs.
    fn round_trips(&mut self, len: u64, warmup: usize, rounds: usize) -> anyhow::Result<Vec<f64>> {
        for _ in 0..warmup {
            self.transfer(len, |_, _| Ok(()))?;
        }
        (0..rounds).map(|_| Ok(self.transfer(len, |_, _| Ok(()))? * 1e6)).collect()
    }
}

/// The peer process, killed and reaped when dropped unless
/// [`PeerProcess::finish`] saw it exit.
#[derive(Debug)]
struct PeerProcess {
    child: Child,
}

impl PeerProcess {
    /// Starts this binary as the peer (inside `host`'s namespace, on its
    /// end of the link, if given) and reads the port it listens on.
    fn spawn(host: Option<&Side>) -> anyhow::Result<(Self, u16)> {
        let exe = std::env::current_exe().context("finding the bench binary to run the floor peer")?;
        let mut command = match host {
            Some(host) => {
                let mut ip = Command::new("ip");
                ip.args(host.exec_args(&exe, &[PEER_ARG.to_owned(), host.addr.to_string()]));
                ip
            }
            None => {
                let mut direct = Command::new(&exe);
                direct.arg(PEER_ARG);
                direct
            }
        };
        let child = command
            .env(pageserver_parent_death::ENV, std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting the floor peer {}", exe.display()))?;
        let mut peer = Self { child };
        let stdout = peer.child.stdout.take().context("the floor peer's stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).context("reading the floor peer's port")?;
        let port = line
            .trim()
            .parse()
            .with_context(|| format!("the floor peer printed {line:?}, not its port (did it fail to start?)"))?;
        Ok((peer, port))
    }

    /// Waits for the peer to exit (its connection closed) and checks that
    /// it succeeded; kills it if it does not exit in time.
    fn finish(mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + PEER_EXIT_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for the floor peer")? {
                if !status.success() {
                    bail!("the floor peer failed: {status}");
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the floor peer did not exit within {PEER_EXIT_TIMEOUT:?} of its connection closing");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn gib_per_s(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / seconds / f64::from(1u32 << 30)
}

fn median(samples: &[f64]) -> anyhow::Result<f64> {
    stats::median(samples).context("no samples")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole floor, small, against a peer thread (the test binary is
    /// not the bench binary, so it cannot be re-executed as the peer).
    #[test]
    fn a_small_floor_yields_positive_figures() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = listener.local_addr().expect("address").port();
        let peer = std::thread::spawn(move || serve(listener.accept().expect("accept").0));
        let conn = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect");
        let mut client = Client::new(conn).expect("client");
        let plan = Plan {
            small_warmup: 10,
            small_rounds: 100,
            large_warmup: 1,
            large_rounds: 5,
            bulk_bytes: (16 << 20) + 4096,
            repetitions: 2,
            precopy_repetitions: 2,
        };
        let mut report = BenchReport::new(true);
        measure_with(&mut client, &plan, &mut report).expect("measures");
        drop(client);
        peer.join().expect("peer thread").expect("peer serves");
        assert!(report.missing(crate::report::Section::Floor).is_empty(), "{report}");
        assert!(report.figures.values().all(|&v| v > 0.0), "{report}");
        assert!(report.figures["floor_rtt_p50_us"] <= report.figures["floor_rtt_p99_us"]);
        assert_eq!(report.notes.len(), 1);
    }

    #[test]
    fn a_transfer_hands_over_every_byte_in_order() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = listener.local_addr().expect("address").port();
        let peer = std::thread::spawn(move || serve(listener.accept().expect("accept").0));
        let mut client =
            Client::new(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect")).expect("client");
        let len = 3 * READ_CHUNK as u64 + 17;
        let mut next = 0;
        client
            .transfer(len, |offset, chunk| {
                assert_eq!(offset, next);
                assert!(chunk.iter().all(|&b| b == 0x5a));
                next += chunk.len() as u64;
                Ok(())
            })
            .expect("transfer");
        assert_eq!(next, len);
        drop(client);
        peer.join().expect("peer thread").expect("peer serves");
    }
}
