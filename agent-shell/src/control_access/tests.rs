use std::net::SocketAddr;

use tonic::transport::server::TcpConnectInfo;

use super::*;

fn from(address: &str) -> Request<()> {
    let mut request = Request::new(());
    let remote: SocketAddr = address.parse().expect("address");
    request.extensions_mut().insert(TcpConnectInfo { local_addr: None, remote_addr: Some(remote) });
    request
}

#[test]
fn plaintext_control_is_for_loopback_peers_only() {
    let access = ControlAccess::LoopbackPeers;
    access.authorize(&from("127.0.0.1:4000"), "MigrationSource/SetPaused").expect("loopback");
    access.authorize(&from("[::1]:4000"), "MigrationSource/SetPaused").expect("loopback v6");
    let refused = access.authorize(&from("10.0.0.2:4000"), "MigrationSource/SetPaused").expect_err("remote");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(refused.message().contains("10.0.0.2:4000"), "{}", refused.message());
    let unknown = access.authorize(&Request::new(()), "MigrationTarget/Switchover").expect_err("no address");
    assert_eq!(unknown.code(), tonic::Code::PermissionDenied);
}

#[test]
fn without_tls_a_certificate_rule_refuses_everyone() {
    let names = ServerNames::parse(&["orchestrator"]).expect("names");
    let refused = ControlAccess::CertificateNames(names)
        .authorize(&from("127.0.0.1:4000"), "MigrationTarget/Switchover")
        .expect_err("no certificate, even from loopback");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(refused.message().contains("none was presented"), "{}", refused.message());
}
