//! The target agent over mutual TLS, with certificates made at test time:
//! only the orchestrator's certificate may call Switchover, and the agent
//! refuses a source whose certificate does not chain to its CA (the
//! migration fails with the reason; nothing is installed), while a source
//! with the right certificate is reached.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pageserver_agent_shell::{ControlAccess, GrpcSecurity};
use pageserver_proto::v1::migration_target_client::MigrationTargetClient;
use pageserver_proto::v1::{GetStatusRequest, MigrationPhase, MigrationStatus, SwitchoverRequest};
use pageserver_tls::generate::{Authority, Validity};
use pageserver_tls::{ClientTls, ServerNames, ServerTls, TlsFiles};
use target_agent::agent::{TargetAgent, TargetConfig};
use tonic::transport::Channel;

mod support;
use support::{Agent, PATIENCE, Scratch, TargetVmm, memory_file, source_agent_binary};

const ORCHESTRATOR: &str = "orchestrator.test";
const PAGES: u64 = 16;

fn issue(ca: &Authority, dir: &Path, stem: &str, names: &[&str]) -> TlsFiles {
    let dir = dir.join(stem);
    std::fs::create_dir_all(&dir).expect("mkdir");
    ca.write(&dir, stem, &ca.issue(names, Validity::Current).expect("issue")).expect("write")
}

/// A target agent in this process, its MigrationTarget served over mutual
/// TLS on 127.0.0.1 with `files`, dialling `source_url` with them.
async fn start_target(files: &TlsFiles, source_url: &str, socket: &Path) -> (Arc<TargetAgent>, String) {
    let mut config = TargetConfig::new(source_url, socket, "tls-vm");
    config.source_tls = Some(ClientTls::load(files.clone()).expect("client TLS"));
    config.source_unreachable_timeout = Duration::from_secs(1);
    let agent = TargetAgent::new(config);
    agent.handoff.bind().expect("bind the hand-off socket");
    tokio::spawn(agent.clone().run());
    let security = GrpcSecurity {
        tls: Some(ServerTls::load(files.clone()).expect("server TLS")),
        files: Some(files.clone()),
        control: ControlAccess::CertificateNames(ServerNames::parse(&[ORCHESTRATOR]).expect("names")),
        health_listen: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("addr").to_string();
    let serving = agent.clone();
    tokio::spawn(async move {
        let limits = pageserver_agent_shell::GrpcLimits::default();
        target_agent::service::serve(listener, serving, &limits, security, std::future::pending()).await
    });
    (agent, address)
}

async fn client(address: &str, files: &TlsFiles) -> MigrationTargetClient<Channel> {
    let dial = pageserver_tls::client::dial_address(address);
    let tls = ClientTls::load(files.clone()).expect("client TLS");
    let channel = pageserver_tls::endpoint(&format!("https://{address}"))
        .expect("endpoint")
        .connect_with_connector(pageserver_tls::connector(Some(tls), dial))
        .await
        .expect("a TLS connection");
    MigrationTargetClient::new(channel)
}

#[tokio::test]
async fn only_the_orchestrator_may_switch_over() {
    let dir = Scratch::new("mtls-switchover");
    let ca = Authority::new("test CA").expect("CA");
    let agent_files = issue(&ca, &dir.join(""), "agent", &["127.0.0.1"]);
    let (_agent, address) = start_target(&agent_files, "https://127.0.0.1:9", &dir.join("target.sock")).await;

    let source_like = issue(&ca, &dir.join(""), "source", &["source.test"]);
    let mut stranger = client(&address, &source_like).await;
    stranger.get_status(GetStatusRequest {}).await.expect("status is for any client of the CA");
    let denied = stranger.switchover(SwitchoverRequest {}).await.expect_err("a non-orchestrator switched over");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");

    let orchestrator = issue(&ca, &dir.join(""), "orchestrator", &[ORCHESTRATOR]);
    let refused =
        client(&address, &orchestrator).await.switchover(SwitchoverRequest {}).await.expect_err("no hand-off");
    // Authorised: refused on its merits (nothing handed over yet).
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
}

async fn status(agent: &TargetAgent) -> MigrationStatus {
    target_agent::service::status(agent)
}

/// Waits until `done` holds for the agent's status.
async fn wait_status(agent: &TargetAgent, what: &str, done: impl Fn(&MigrationStatus) -> bool) -> MigrationStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let now = status(agent).await;
        if done(&now) {
            return now;
        }
        assert!(Instant::now() < deadline, "{what}: still {now:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A source agent process serving a memory file over TLS with `files`.
fn source_agent(files: &TlsFiles, dir: &Scratch, name: &str) -> Agent {
    let memory = dir.join(&format!("{name}.mem"));
    memory_file(&memory, PAGES);
    let (cert, key, ca) =
        (files.cert.display().to_string(), files.key.display().to_string(), files.ca.display().to_string());
    let memory = memory.display().to_string();
    Agent::start(
        name,
        &source_agent_binary(),
        &["--memory-file", &memory, "--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &ca],
        dir,
    )
}

async fn hand_off(socket: std::path::PathBuf) -> TargetVmm {
    tokio::task::spawn_blocking(move || {
        let mut vmm = TargetVmm::new(PAGES);
        vmm.hand_off(&socket).expect("a hand-off taken");
        vmm
    })
    .await
    .expect("the VMM's hand-off")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_whose_certificate_is_not_from_the_ca_is_refused() {
    let dir = Scratch::new("mtls-source");
    let ours = Authority::new("our CA").expect("CA");
    let theirs = Authority::new("their CA").expect("CA");
    let impostor = source_agent(&issue(&theirs, &dir.join(""), "impostor", &["127.0.0.1"]), &dir, "impostor");
    let target_files = issue(&ours, &dir.join(""), "target", &["127.0.0.1"]);
    let socket = dir.join("target.sock");
    let (agent, _) = start_target(&target_files, &format!("https://{}", impostor.grpc), &socket).await;
    let _vmm = hand_off(socket).await;
    let failed = wait_status(&agent, "the migration fails", |s| s.phase() == MigrationPhase::Failed).await;
    assert!(failed.error.contains("certificate"), "the reason is not given: {}", failed.error);
    assert_eq!(failed.pages_sent_precopy, 0, "pages came from a source of another CA");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_with_a_certificate_from_the_ca_is_reached() {
    let dir = Scratch::new("mtls-source-ok");
    let ca = Authority::new("our CA").expect("CA");
    let source = source_agent(&issue(&ca, &dir.join(""), "source", &["127.0.0.1"]), &dir, "source");
    let target_files = issue(&ca, &dir.join(""), "target", &["127.0.0.1"]);
    let socket = dir.join("target.sock");
    let (agent, _) = start_target(&target_files, &format!("https://{}", source.grpc), &socket).await;
    let _vmm = hand_off(socket).await;
    let reached =
        wait_status(&agent, "pre-copy over TLS", |s| s.pages_sent_precopy > 0 || s.phase() == MigrationPhase::Failed)
            .await;
    assert_ne!(reached.phase(), MigrationPhase::Failed, "{}", reached.error);
}
