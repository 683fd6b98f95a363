//! Every flag the Kubernetes manifests give the product's binaries is one
//! the binaries take: `kubectl kustomize` renders the source and target
//! overlays and the migration Job, and each container running
//! `source-agent`, `target-agent` or `pageserver-migrate` has its `args`
//! parsed by the real binary (followed by `--help`, which clap answers
//! only once everything before it parsed). A flag renamed in the code but
//! not in the manifests fails here, not on a node.
//!
//! Needs kubectl (`scripts/setup` installs it, and `deploy/check.sh` its
//! own in target/deploy-check/venv) and python3 with PyYAML.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use std::io::Write;

/// The repository's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_owned()
}

/// Where cargo put this workspace's binaries.
fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_pageserver-migrate")).parent().expect("target/release").to_owned()
}

fn kubectl() -> PathBuf {
    let venv = root().join("target/deploy-check/venv/bin/kubectl");
    if venv.is_file() { venv } else { PathBuf::from("kubectl") }
}

/// The containers of `kubectl kustomize deploy/kustomize/DIR`, as JSON.
fn containers(dir: &str) -> Vec<serde_json::Value> {
    let path = root().join("deploy/kustomize").join(dir);
    let rendered = Command::new(kubectl())
        .arg("kustomize")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("running kubectl (scripts/setup installs it): {e}"));
    assert!(rendered.status.success(), "kubectl kustomize {dir}: {}", String::from_utf8_lossy(&rendered.stderr));
    let mut python = Command::new("python3")
        .args(["-c", "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running python3");
    python.stdin.take().expect("stdin").write_all(&rendered.stdout).expect("writing to python3");
    let out = python.wait_with_output().expect("python3");
    assert!(out.status.success(), "python3 with PyYAML could not read the manifests");
    let documents: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("JSON");
    let mut found = Vec::new();
    for document in documents {
        let spec = match document["kind"].as_str() {
            Some("Pod") => &document["spec"],
            Some("Job") => &document["spec"]["template"]["spec"],
            _ => continue,
        };
        for list in ["initContainers", "containers"] {
            found.extend(spec[list].as_array().into_iter().flatten().cloned());
        }
    }
    found
}

#[test]
fn the_binaries_take_every_flag_the_manifests_give_them() {
    let mut checked = Vec::new();
    for dir in ["overlays/source", "overlays/target", "job"] {
        for container in containers(dir) {
            let command = container["command"][0].as_str().unwrap_or_default().to_owned();
            if !["source-agent", "target-agent", "pageserver-migrate"].contains(&command.as_str()) {
                continue;
            }
            let args: Vec<String> = container["args"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|arg| arg.as_str().map(str::to_owned))
                .collect();
            assert!(!args.is_empty(), "{dir}: {command} has no args");
            let out = Command::new(bin_dir().join(&command)).args(&args).arg("--help").output().expect("runs");
            assert!(
                out.status.success(),
                "{dir}: {command} refuses the manifest's flags {args:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            checked.push(format!("{dir}: {command}"));
        }
    }
    assert_eq!(checked.len(), 3, "expected source-agent, target-agent and pageserver-migrate: {checked:?}");
}

#[test]
fn the_check_catches_a_flag_the_binary_does_not_take() {
    let out = Command::new(bin_dir().join("source-agent"))
        .args(["--listen=0.0.0.0:50051", "--no-such-flag=1", "--help"])
        .output()
        .expect("runs");
    assert!(!out.status.success(), "an unknown flag before --help was accepted");
}
