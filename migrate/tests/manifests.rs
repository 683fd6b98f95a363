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
use std::process::Command;

use pageserver_test_support::manifests::{self, Container};

/// The repository's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_owned()
}

/// Where cargo put this workspace's binaries.
fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_pageserver-migrate")).parent().expect("target/release").to_owned()
}

/// The containers of `kubectl kustomize deploy/kustomize/DIR`.
fn containers(dir: &str) -> Vec<Container> {
    let documents = manifests::rendered(&root(), &root().join("deploy/kustomize").join(dir));
    manifests::containers(&documents)
}

#[test]
fn the_binaries_take_every_flag_the_manifests_give_them() {
    let mut checked = Vec::new();
    for dir in ["overlays/source", "overlays/target", "job"] {
        for container in containers(dir) {
            let command = container.spec["command"][0].as_str().unwrap_or_default().to_owned();
            if !["source-agent", "target-agent", "pageserver-migrate"].contains(&command.as_str()) {
                continue;
            }
            let args: Vec<String> = container.spec["args"]
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
