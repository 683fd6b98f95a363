//! QMP over mutual TLS (`--source-qmp tls:HOST:PORT`), against two real
//! QEMUs (`-machine none`) whose QMP chardevs use `tls-creds-x509` with
//! `verify-peer=on`, as the Kubernetes manifests start them: with the
//! orchestrator's certificate from the same CA, `pageserver-migrate` gets
//! through its first step (both QMPs answer: the source runs, the target
//! waits for an incoming migration) and stops at the next (no agents here),
//! leaving the VM untouched; with a certificate from another CA, QEMU
//! refuses the handshake and the first step fails, saying so.
//!
//! Needs qemu-system-x86_64 (`scripts/setup --qemu`, which the test command
//! runs); skipped, saying why, without it.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use pageserver_tls::TlsFiles;
use pageserver_tls::generate::{Authority, Validity};

const QEMU: &str = "qemu-system-x86_64";

/// A QEMU whose QMP listens on 127.0.0.1 with mutual TLS; killed on drop.
struct TlsQemu {
    child: Child,
    port: u16,
}

impl TlsQemu {
    /// Starts one with the server credentials in `creds` (QEMU's file
    /// names: ca-cert.pem, server-cert.pem, server-key.pem); `incoming`
    /// makes it wait for a migration (`-incoming defer`).
    fn start(creds: &Path, incoming: bool) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port();
        let mut command = Command::new(QEMU);
        command
            .args(["-machine", "none", "-nodefaults", "-display", "none", "-object"])
            .arg(format!("tls-creds-x509,id=qmp-tls,dir={},endpoint=server,verify-peer=on", creds.display()))
            .arg("-chardev")
            .arg(format!("socket,id=qmp,host=127.0.0.1,port={port},server=on,wait=off,tls-creds=qmp-tls"))
            .args(["-mon", "chardev=qmp,mode=control"])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if incoming {
            command.args(["-incoming", "defer"]);
        }
        Self { child: command.spawn().expect("starting QEMU"), port }
    }

    fn address(&self) -> String {
        format!("tls:127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsQemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu_installed() -> bool {
    Command::new(QEMU).arg("--version").output().is_ok_and(|out| out.status.success())
}

/// QEMU's server credentials in `dir`, from `ca`, valid for 127.0.0.1.
fn qemu_creds(ca: &Authority, dir: &Path) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let issued = ca.issue(&["127.0.0.1"], Validity::Current).expect("issue");
    std::fs::write(dir.join("ca-cert.pem"), ca.pem()).expect("ca-cert.pem");
    std::fs::write(dir.join("server-cert.pem"), &issued.cert_pem).expect("server-cert.pem");
    std::fs::write(dir.join("server-key.pem"), &issued.key_pem).expect("server-key.pem");
}

/// `pageserver-migrate` between the two QEMUs' QMPs as `client`, with
/// agents that do not exist.
fn migrate(source: &TlsQemu, target: &TlsQemu, client: &TlsFiles) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pageserver-migrate"))
        .arg("--source-agent=https://127.0.0.1:1")
        .arg("--target-agent=https://127.0.0.1:2")
        .arg(format!("--source-qmp={}", source.address()))
        .arg(format!("--target-qmp={}", target.address()))
        .arg("--migration-uri=tcp:127.0.0.1:4445")
        .arg(format!("--tls-cert={}", client.cert.display()))
        .arg(format!("--tls-key={}", client.key.display()))
        .arg(format!("--tls-ca={}", client.ca.display()))
        .arg("--timeout=8s")
        .output()
        .expect("pageserver-migrate runs")
}

#[test]
fn qmp_over_mutual_tls_admits_the_orchestrator_of_the_ca_only() {
    if !qemu_installed() {
        eprintln!("skipped: {QEMU} is not installed (scripts/setup --qemu)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Authority::new("pageserver test CA").expect("CA");
    qemu_creds(&ca, &dir.path().join("qemu"));
    let source = TlsQemu::start(&dir.path().join("qemu"), false);
    let target = TlsQemu::start(&dir.path().join("qemu"), true);

    let orchestrator = ca.issue(&["orchestrator.test"], Validity::Current).expect("issue");
    std::fs::create_dir_all(dir.path().join("client")).expect("mkdir");
    let client = ca.write(&dir.path().join("client"), "orchestrator", &orchestrator).expect("write");
    let out = migrate(&source, &target, &client);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("source QEMU running, target QEMU inmigrate"), "{stdout}\n{stderr}");
    assert!(stderr.contains("step check-agents failed"), "{stdout}\n{stderr}");
    assert!(stderr.contains("VM: the VM runs on the source, untouched"), "{stderr}");

    let other = Authority::new("another CA").expect("CA");
    let stranger = other.issue(&["orchestrator.test"], Validity::Current).expect("issue");
    std::fs::create_dir_all(dir.path().join("stranger")).expect("mkdir");
    let stranger = other.write(&dir.path().join("stranger"), "orchestrator", &stranger).expect("write");
    let out = migrate(&source, &target, &stranger);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("step check-vmms failed"), "{stderr}");
    assert!(stderr.contains("TLS handshake with QMP at tls:127.0.0.1:"), "{stderr}");
    assert!(stderr.contains("VM: the VM runs on the source, untouched"), "{stderr}");
}
