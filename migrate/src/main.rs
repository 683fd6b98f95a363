//! `pageserver-migrate`: migrates a running QEMU VM to a target QEMU
//! through the source and target agents, prints a line per step, and on
//! failure leaves the VM in the safest state and says which (stderr, and
//! `vm_state` in the report). `--dry-run` prints the steps and contacts
//! nothing. Exit status: 0 migrated, 1 failed (the VM state on stderr),
//! 2 bad flags.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use pageserver_agent_shell::exit::describe;
use pageserver_agent_shell::parse_duration;
use pageserver_migrate::plan::dry_run;
use pageserver_migrate::progress::Progress;
use pageserver_migrate::qmp::QmpAddress;
use pageserver_migrate::report::MigrateReport;
use pageserver_migrate::stop_signal::stop_signal;
use pageserver_migrate::{MigrationPlan, NoHooks, migrate};
use pageserver_tls::{ClientTls, TlsFiles};

#[derive(Debug, Parser)]
#[command(about = "Migrates a running QEMU VM through the page-server agents: QEMU moves the device state \
             (x-ignore-shared), the agents move the memory (pre-copy, then post-copy on faults)")]
struct Args {
    /// The source agent's gRPC URL: https://NAME:PORT (mutual TLS; NAME
    /// must be in its certificate) or http://HOST:PORT with --plaintext.
    #[arg(long, env = "PAGESERVER_SOURCE_AGENT", value_name = "URL")]
    source_agent: String,
    /// The target agent's gRPC URL.
    #[arg(long, env = "PAGESERVER_TARGET_AGENT", value_name = "URL")]
    target_agent: String,
    /// The source QEMU's QMP: a Unix socket (PATH or unix:PATH; `-qmp
    /// unix:PATH,server=on,wait=off`), or tls:HOST:PORT (a QMP chardev with
    /// tls-creds-x509 and verify-peer=on: this orchestrator's certificate is
    /// the client's, and QEMU's must be valid for HOST).
    #[arg(long, value_name = "ADDRESS")]
    source_qmp: QmpAddress,
    /// The target QEMU's QMP (as --source-qmp); that QEMU runs with
    /// `-incoming defer` and the VMM shim as role `target`.
    #[arg(long, value_name = "ADDRESS")]
    target_qmp: QmpAddress,
    /// QEMU's own migration stream (device state only), as the source QEMU
    /// dials it: `tcp:HOST:PORT`.
    #[arg(long, value_name = "URI", value_parser = parse_migration_uri)]
    migration_uri: String,
    /// What the target QEMU listens on (`migrate-incoming`), when not
    /// --migration-uri: e.g. tcp:0.0.0.0:4445 while the source dials the
    /// target pod's Service name.
    #[arg(long, value_name = "URI", value_parser = parse_migration_uri)]
    incoming_uri: Option<String>,
    /// This orchestrator's client certificate (PEM): its name must be in
    /// both agents' --control-allow-name.
    #[arg(long, env = "PAGESERVER_TLS_CERT", value_name = "PATH", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "PAGESERVER_TLS_KEY", value_name = "PATH", requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// The CA certificates (PEM) the agents' certificates must chain to.
    #[arg(long, env = "PAGESERVER_TLS_CA", value_name = "PATH", requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// Talk to the agents without TLS (http:// URLs; agents on loopback or
    /// started with --plaintext).
    #[arg(long, env = "PAGESERVER_PLAINTEXT", conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    plaintext: bool,
    /// The longest any one step may take (pre-copy convergence included).
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    timeout: Duration,
    /// Report as soon as the VM runs on the target, without waiting for
    /// the target agent to hold every page.
    #[arg(long)]
    no_wait_postcopy: bool,
    /// Write the report (JSON) here, also after a failure.
    #[arg(long, value_name = "PATH")]
    report_json: Option<PathBuf>,
    /// Print the steps a migration would take and exit; nothing is
    /// contacted.
    #[arg(long)]
    dry_run: bool,
    /// No progress lines (errors and the VM's state still go to stderr).
    #[arg(long)]
    quiet: bool,
}

fn parse_migration_uri(uri: &str) -> Result<String, String> {
    let address = uri.strip_prefix("tcp:").ok_or("expected tcp:HOST:PORT")?;
    let (host, port) = address.rsplit_once(':').ok_or("expected tcp:HOST:PORT")?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!("{uri}: expected tcp:HOST:PORT"));
    }
    Ok(uri.to_owned())
}

/// The agents' URLs against the TLS flags: https with certificates, http
/// with --plaintext, nothing else.
fn check_urls(args: &Args) -> Result<(), String> {
    for (flag, url) in [("--source-agent", &args.source_agent), ("--target-agent", &args.target_agent)] {
        match (url.split_once("://").map(|(scheme, _)| scheme), args.plaintext) {
            (Some("https"), false) if args.tls_cert.is_some() => {}
            (Some("https"), false) => {
                return Err(format!("{flag} {url}: https needs --tls-cert, --tls-key and --tls-ca"));
            }
            (Some("http"), true) => {}
            (Some("https"), true) => return Err(format!("{flag} {url}: https with --plaintext")),
            (Some("http"), false) => {
                return Err(format!("{flag} {url}: http (no TLS) needs --plaintext; give https:// and the TLS flags"));
            }
            _ => return Err(format!("{flag} {url}: expected https://HOST:PORT or http://HOST:PORT")),
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let qmp_over_tls = [&args.source_qmp, &args.target_qmp].into_iter().any(|a| matches!(a, QmpAddress::Tls { .. }));
    if qmp_over_tls && args.tls_cert.is_none() {
        eprintln!("Error: a QMP over TLS (tls:HOST:PORT) needs --tls-cert, --tls-key and --tls-ca");
        return ExitCode::from(2);
    }
    if let Err(message) = check_urls(&args) {
        eprintln!("Error: {message}");
        return ExitCode::from(2);
    }
    let plan = MigrationPlan {
        source_agent: args.source_agent.clone(),
        target_agent: args.target_agent.clone(),
        source_qmp: args.source_qmp.clone(),
        target_qmp: args.target_qmp.clone(),
        migration_uri: args.migration_uri.clone(),
        incoming_uri: args.incoming_uri.clone(),
        step_timeout: args.timeout,
        wait_postcopy: !args.no_wait_postcopy,
    };
    let transport = if args.plaintext { "plaintext" } else { "mutual TLS" };
    if args.dry_run {
        print!("{}", dry_run(&plan, transport));
        return ExitCode::SUCCESS;
    }
    let tls = match (args.tls_cert.clone(), args.tls_key.clone(), args.tls_ca.clone()) {
        (Some(cert), Some(key), Some(ca)) => match ClientTls::load(TlsFiles { cert, key, ca }) {
            Ok(tls) => Some(tls),
            Err(error) => {
                eprintln!("Error: loading the TLS certificates: {}", describe(&error));
                return ExitCode::from(2);
            }
        },
        _ => None,
    };
    let progress = Progress::start(args.quiet);
    let result = migrate(&plan, tls.as_ref(), &progress, &mut NoHooks, Box::pin(stop_signal())).await;
    let (report, code) = match result {
        Ok(migrated) => {
            let report = MigrateReport {
                vm_state: "the VM runs on the target".to_owned(),
                target_run_state: migrated.target_run_state,
                migration_seconds: migrated.migration_seconds,
                migration: migrated.report,
                failed_step: None,
            };
            if !args.quiet {
                println!("\n{}", report.migration);
            }
            (report, ExitCode::SUCCESS)
        }
        Err(error) => {
            let message = describe(&error);
            eprintln!("Error: {message}");
            eprintln!("VM: {}", error.vm);
            let mut report = MigrateReport {
                vm_state: error.vm.to_string(),
                failed_step: Some(error.step.name().to_owned()),
                ..MigrateReport::default()
            };
            report.migration.failure = Some(message);
            report.migration.transport = transport.to_owned();
            (report, ExitCode::FAILURE)
        }
    };
    if let Some(path) = &args.report_json {
        let written = serde_json::to_string_pretty(&report)
            .map_err(std::io::Error::other)
            .and_then(|text| std::fs::write(path, text + "\n"));
        if let Err(error) = written {
            eprintln!("Error: writing the report to {}: {error}", path.display());
            return ExitCode::FAILURE;
        }
    }
    code
}
