//! Mutual TLS on a real `source-agent` process, with certificates made at
//! test time (rcgen): who gets in (a client certificate from the agent's
//! CA, valid now, and a server certificate valid for the name dialled),
//! who may steer the migration (the orchestrator's certificate name only),
//! grpcurl with and without the files, certificates rotated under a live
//! connection (SIGHUP and a file change), and the start-up refusals.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pageserver_proto::v1::migration_source_client::MigrationSourceClient;
use pageserver_proto::v1::page_server_client::PageServerClient;
use pageserver_proto::v1::{GetLayoutRequest, SetPausedRequest};
use pageserver_test_support::TempDir;
use pageserver_test_support::child::TestChild;
use pageserver_test_support::grpcurl::{RPC_ERROR_BASE, find_grpcurl};
use pageserver_test_support::refusal::{assert_refused, run_to_end};
use pageserver_tls::generate::{Authority, Issued, Validity};
use pageserver_tls::{ClientTls, TlsFiles};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const BINARY: &str = env!("CARGO_BIN_EXE_source-agent");
const ORCHESTRATOR: &str = "orchestrator.test";
/// Long enough for the agent's poll of its files (5 s) to see a change.
const RELOAD_PATIENCE: Duration = Duration::from_secs(30);

/// A CA, the agent's certificate, and clients' certificates in a directory.
struct Pki {
    dir: TempDir,
    ca: Authority,
}

impl Pki {
    fn new() -> Self {
        Self { dir: TempDir::new("mtls"), ca: Authority::new("test CA").expect("CA") }
    }

    /// `stem`'s files, issued by this CA for `names`.
    fn files(&self, stem: &str, names: &[&str], validity: Validity) -> TlsFiles {
        self.write(stem, &self.ca.issue(names, validity).expect("issue"))
    }

    fn write(&self, stem: &str, issued: &Issued) -> TlsFiles {
        let dir = self.dir.join(stem);
        std::fs::create_dir_all(&dir).expect("mkdir");
        self.ca.write(&dir, stem, issued).expect("write certificate files")
    }

    /// The agent's own files: valid for 127.0.0.1 and `localhost`.
    fn agent(&self) -> TlsFiles {
        self.files("agent", &["localhost", "127.0.0.1"], Validity::Current)
    }
}

/// A source agent serving an 8-page file over mutual TLS with `files`.
fn start_agent(files: &TlsFiles, dir: &Path) -> (TestChild, String) {
    start_agent_with(files, dir, &[])
}

/// [`start_agent`] with `extra` flags.
fn start_agent_with(files: &TlsFiles, dir: &Path, extra: &[&str]) -> (TestChild, String) {
    let memory = dir.join("guest.mem");
    std::fs::write(&memory, vec![7u8; 8 * 4096]).expect("write");
    let mut command = Command::new(BINARY);
    command.args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]).args([
        "--memory-file".as_ref(),
        memory.as_os_str(),
        "--tls-cert".as_ref(),
        files.cert.as_os_str(),
        "--tls-key".as_ref(),
        files.key.as_os_str(),
        "--tls-ca".as_ref(),
        files.ca.as_os_str(),
        "--control-allow-name".as_ref(),
        ORCHESTRATOR.as_ref(),
    ]);
    command.args(extra);
    let mut agent = TestChild::spawn("source-agent", command);
    let line = agent.line().unwrap_or_else(|| panic!("no listening line; stderr:\n{}", agent.stderr()));
    let event: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    let address = event["grpc"].as_str().expect("grpc address").to_owned();
    (agent, address)
}

/// A channel to `address` over TLS as `client`, checking that the server
/// is `name` (dialled at `address` whatever the name).
async fn channel(address: &str, name: &str, client: &TlsFiles) -> Result<Channel, String> {
    let tls = ClientTls::load(client.clone()).map_err(|e| e.to_string())?;
    let dial = pageserver_tls::client::dial_address(address);
    let port = address.rsplit(':').next().expect("port");
    let endpoint = pageserver_tls::endpoint(&format!("https://{name}:{port}")).expect("endpoint");
    endpoint.connect_with_connector(pageserver_tls::connector(Some(tls), dial)).await.map_err(|e| describe(&e))
}

/// A channel over TLS that presents no client certificate at all.
async fn channel_without_certificate(address: &str, ca: &Path) -> Result<Channel, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::pem::PemObject::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("CA certificate")).expect("anchor");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let target = address.to_owned();
    let connect = tower::service_fn(move |_: http::Uri| {
        let (connector, target) = (connector.clone(), target.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(target).await?;
            let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name").to_owned();
            connector.connect(name, tcp).await.map(hyper_util::rt::TokioIo::new)
        }
    });
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}")).expect("endpoint");
    endpoint.connect_with_connector(connect).await.map_err(|e| describe(&e))
}

fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    pageserver_agent_shell::exit::describe(error)
}

/// GetLayout over `channel` (a refused handshake may only show here: in
/// TLS 1.3 the server checks the client's certificate after the client
/// considers the handshake done).
async fn get_layout(channel: Result<Channel, String>) -> Result<u64, String> {
    let mut client = PageServerClient::new(channel?);
    client.get_layout(GetLayoutRequest {}).await.map(|r| r.into_inner().total_pages).map_err(|s| describe(&s))
}

#[tokio::test]
async fn only_clients_with_a_current_certificate_from_the_ca_get_in() {
    let pki = Pki::new();
    let (mut agent, address) = start_agent(&pki.agent(), pki.dir.path());

    let target = pki.files("target", &["target.test"], Validity::Current);
    assert_eq!(get_layout(channel(&address, "127.0.0.1", &target).await).await, Ok(8));
    assert_eq!(get_layout(channel(&address, "localhost", &target).await).await, Ok(8));

    let refused = get_layout(channel_without_certificate(&address, &target.ca).await).await;
    assert!(refused.is_err(), "a client without a certificate got in");

    let other = Pki::new();
    let stranger = other.files("stranger", &["target.test"], Validity::Current);
    let stranger = TlsFiles { ca: target.ca.clone(), ..stranger };
    let refused = get_layout(channel(&address, "127.0.0.1", &stranger).await).await;
    assert!(refused.is_err(), "a client with another CA's certificate got in");

    let expired = pki.files("expired", &["target.test"], Validity::Expired);
    let refused = get_layout(channel(&address, "127.0.0.1", &expired).await).await;
    assert!(refused.is_err(), "a client with an expired certificate got in");

    // The client checks the server's name too.
    let wrong_name = get_layout(channel(&address, "source.elsewhere.test", &target).await).await;
    let why = wrong_name.expect_err("a server certificate not valid for the name dialled was accepted");
    assert!(why.contains("certificate"), "{why}");

    agent.assert_running("after the refused clients");
    let log = agent.stderr();
    assert!(log.contains("TLS handshake failed"), "no refusal logged:\n{log}");
    assert!(log.contains("mutual TLS"), "{log}");
}

#[tokio::test]
async fn only_the_orchestrator_may_set_paused() {
    let pki = Pki::new();
    let (mut agent, address) = start_agent(&pki.agent(), pki.dir.path());
    let target = pki.files("target", &["target.test"], Validity::Current);
    let orchestrator = pki.files("orchestrator", &[ORCHESTRATOR], Validity::Current);

    let mut control = MigrationSourceClient::new(channel(&address, "127.0.0.1", &target).await.expect("channel"));
    let denied = control.set_paused(SetPausedRequest { paused: true }).await.expect_err("a target steered");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains(ORCHESTRATOR), "{}", denied.message());
    // The same client still reads pages: only control is refused.
    assert_eq!(get_layout(channel(&address, "127.0.0.1", &target).await).await, Ok(8));

    let mut control = MigrationSourceClient::new(channel(&address, "127.0.0.1", &orchestrator).await.expect("channel"));
    let reply = control.set_paused(SetPausedRequest { paused: true }).await.expect("the orchestrator steers");
    assert!(reply.into_inner().paused);
    agent.assert_running("after the control calls");
    assert!(agent.stderr().contains("control call refused"), "{}", agent.stderr());
}

/// Runs grpcurl with `args`; its exit code and output.
fn grpcurl(args: &[&str]) -> (i32, String) {
    let output = Command::new(find_grpcurl()).args(args).output().expect("running grpcurl");
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn grpcurl_needs_the_files() {
    let pki = Pki::new();
    let (_agent, address) = start_agent(&pki.agent(), pki.dir.path());
    let orchestrator = pki.files("orchestrator", &[ORCHESTRATOR], Validity::Current);
    let target = pki.files("target", &["target.test"], Validity::Current);
    let (ca, cert, key) = (orchestrator.ca.display(), orchestrator.cert.display(), orchestrator.key.display());
    let (ca, cert, key) = (ca.to_string(), cert.to_string(), key.to_string());
    let with_files = ["-cacert", &ca, "-cert", &cert, "-key", &key];

    let (code, out) = grpcurl(&[&with_files[..], &[&address, "list"]].concat());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("pageserver.v1.PageServer"), "{out}");
    let (code, out) = grpcurl(
        &[&with_files[..], &["-d", r#"{"paused":true}"#, &address, "pageserver.v1.MigrationSource/SetPaused"]].concat(),
    );
    assert_eq!(code, 0, "{out}");

    let (code, out) = grpcurl(&["-cacert", &ca, &address, "list"]);
    assert_ne!(code, 0, "grpcurl without a client certificate got in: {out}");
    let (code, out) = grpcurl(&["-plaintext", &address, "list"]);
    assert_ne!(code, 0, "grpcurl in plaintext got in: {out}");

    let (ca, cert, key) =
        (target.ca.display().to_string(), target.cert.display().to_string(), target.key.display().to_string());
    let (code, out) = grpcurl(&[
        "-cacert",
        &ca,
        "-cert",
        &cert,
        "-key",
        &key,
        "-d",
        r#"{"paused":true}"#,
        &address,
        "pageserver.v1.MigrationSource/SetPaused",
    ]);
    assert_eq!(code, RPC_ERROR_BASE + tonic::Code::PermissionDenied as i32, "{out}");
    assert!(out.contains("PermissionDenied"), "{out}");
}

#[tokio::test]
async fn the_health_port_serves_health_only_in_the_clear() {
    let pki = Pki::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port();
    let health = format!("127.0.0.1:{port}");
    let (_agent, address) = start_agent_with(&pki.agent(), pki.dir.path(), &["--health-listen", &health]);
    // The port is bound as the gRPC server starts, just after the agent's
    // listening line: wait for it (a hang guard only).
    let endpoint = Channel::from_shared(format!("http://{health}")).expect("uri");
    let deadline = Instant::now() + Duration::from_secs(30);
    let channel = loop {
        match endpoint.connect().await {
            Ok(channel) => break channel,
            Err(error) if Instant::now() < deadline => drop(error),
            Err(error) => panic!("the health port {health} never answered: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut client = HealthClient::new(channel.clone());
    for service in ["", "liveness", "pageserver.v1.PageServer"] {
        let reply = client.check(HealthCheckRequest { service: service.to_owned() }).await;
        let status = reply.unwrap_or_else(|status| panic!("{service:?}: {status}")).into_inner().status();
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }
    // Nothing else: no pages, no control, no reflection.
    let refused = PageServerClient::new(channel.clone()).get_layout(GetLayoutRequest {}).await;
    assert_eq!(refused.map(drop).map_err(|status| status.code()), Err(tonic::Code::Unimplemented));
    let refused = MigrationSourceClient::new(channel).set_paused(SetPausedRequest { paused: true }).await;
    assert_eq!(refused.map(drop).map_err(|status| status.code()), Err(tonic::Code::Unimplemented));
    let (code, out) = grpcurl(&["-plaintext", &health, "list"]);
    assert_ne!(code, 0, "reflection answered on the health port: {out}");
    // The main port still wants a certificate.
    let (code, out) = grpcurl(&["-plaintext", &address, "list"]);
    assert_ne!(code, 0, "grpcurl in plaintext got into the main port: {out}");
}

/// Replaces `live`'s three files with `new`'s, each by a rename (as a
/// rotation does).
fn rotate(live: &TlsFiles, new: &TlsFiles) {
    for (from, to) in [(&new.cert, &live.cert), (&new.key, &live.key), (&new.ca, &live.ca)] {
        let partial = to.with_extension("partial");
        std::fs::copy(from, &partial).expect("copy");
        std::fs::rename(&partial, to).expect("rename");
    }
}

/// Waits until the agent's log says `needle` `count` times.
fn wait_for_log(agent: &TestChild, needle: &str, count: usize) {
    let deadline = Instant::now() + RELOAD_PATIENCE;
    while agent.stderr().matches(needle).count() < count {
        assert!(Instant::now() < deadline, "{needle:?} not logged {count} times:\n{}", agent.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn rotated_certificates_apply_to_new_connections_and_spare_the_old_ones() {
    let first = Pki::new();
    let live = first.agent();
    let (mut agent, address) = start_agent(&live, first.dir.path());
    let first_client = first.files("target", &["target.test"], Validity::Current);
    let mut connected = PageServerClient::new(channel(&address, "127.0.0.1", &first_client).await.expect("channel"));
    connected.get_layout(GetLayoutRequest {}).await.expect("before the rotation");

    // A new CA, by SIGHUP.
    let second = Pki::new();
    rotate(&live, &second.agent());
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(agent.id() as i32).expect("pid"),
        rustix::process::Signal::HUP,
    )
    .expect("SIGHUP");
    wait_for_log(&agent, "TLS certificates reloaded", 1);
    connected.get_layout(GetLayoutRequest {}).await.expect("the connection made before the rotation goes on");
    let refused = get_layout(channel(&address, "127.0.0.1", &first_client).await).await;
    assert!(refused.is_err(), "a client of the old CA still gets in");
    let second_client = second.files("target", &["target.test"], Validity::Current);
    assert_eq!(get_layout(channel(&address, "127.0.0.1", &second_client).await).await, Ok(8));

    // A third CA, by the files changing alone.
    let third = Pki::new();
    rotate(&live, &third.agent());
    wait_for_log(&agent, "TLS certificates reloaded", 2);
    let third_client = third.files("target", &["target.test"], Validity::Current);
    assert_eq!(get_layout(channel(&address, "127.0.0.1", &third_client).await).await, Ok(8));

    // A broken file is reported, and the certificates in use stay.
    std::fs::write(&live.cert, "not a certificate").expect("write");
    wait_for_log(&agent, "reloading the TLS certificates failed", 1);
    assert_eq!(get_layout(channel(&address, "127.0.0.1", &third_client).await).await, Ok(8));
    connected.get_layout(GetLayoutRequest {}).await.expect("the first connection still goes on");
    agent.assert_running("after the rotations");
}

#[test]
fn an_agent_reachable_from_other_hosts_refuses_to_start_without_tls() {
    let dir = TempDir::new("mtls-refusal");
    let memory = dir.join("guest.mem");
    std::fs::write(&memory, vec![0u8; 4096]).expect("write");
    let memory = memory.display().to_string();
    // Refused before anything is bound: nothing listens on 0.0.0.0.
    let output = run_to_end(BINARY, &["--listen", "0.0.0.0:0", "--memory-file", &memory]);
    assert_refused(&output, 1, "give --tls-cert, --tls-key and --tls-ca (mutual TLS), or --plaintext");
    let output = run_to_end(BINARY, &["--tls-cert", "/nonexistent.crt", "--memory-file", &memory]);
    assert_eq!(output.status.code(), Some(2), "clap refuses a lone --tls-cert");
    let output = run_to_end(
        BINARY,
        &[
            "--tls-cert",
            "/nonexistent.crt",
            "--tls-key",
            "/nonexistent.key",
            "--tls-ca",
            "/nonexistent-ca.crt",
            "--memory-file",
            &memory,
        ],
    );
    assert_refused(&output, 1, "/nonexistent.crt");
}

#[test]
fn plaintext_when_asked_is_logged_as_a_warning() {
    let dir = TempDir::new("mtls-plaintext");
    let memory = dir.join("guest.mem");
    std::fs::write(&memory, vec![0u8; 4096]).expect("write");
    let mut command = Command::new(BINARY);
    command
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--plaintext", "--memory-file"])
        .arg(&memory);
    let mut agent = TestChild::spawn("source-agent", command);
    agent.line().expect("listening");
    let log = agent.stderr();
    assert!(log.contains("WARN") && log.contains("WITHOUT TLS (--plaintext)"), "{log}");
}
