//! The Kubernetes manifests as the tests read them: `kubectl kustomize DIR`
//! rendered, each YAML document as JSON (through python3's PyYAML: kubectl
//! has no client-side JSON output for a kustomization), and the containers
//! in them with the securityContext that applies to each.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// Every document of a YAML stream on stdin, as one JSON array on stdout.
const YAML_TO_JSON: &str =
    "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)";

/// kubectl: `deploy/check.sh`'s pinned one if it is installed (in
/// `target/deploy-check/venv` of `repo`), else the one on PATH
/// (`scripts/setup` installs it).
pub fn kubectl(repo: &Path) -> PathBuf {
    let pinned = repo.join("target/deploy-check/venv/bin/kubectl");
    if pinned.is_file() { pinned } else { PathBuf::from("kubectl") }
}

/// The documents `kubectl kustomize dir` renders; panics, saying why, if
/// it cannot.
pub fn rendered(repo: &Path, dir: &Path) -> Vec<Value> {
    let out = Command::new(kubectl(repo))
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("running kubectl (scripts/setup installs it): {e}"));
    assert!(out.status.success(), "kubectl kustomize {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    let mut python = Command::new("python3")
        .args(["-c", YAML_TO_JSON])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running python3");
    python.stdin.take().expect("stdin").write_all(&out.stdout).expect("writing the manifests to python3");
    let json = python.wait_with_output().expect("python3");
    assert!(json.status.success(), "python3 with PyYAML: {}", String::from_utf8_lossy(&json.stderr));
    serde_json::from_slice(&json.stdout).expect("python3's JSON")
}

/// Every container (init containers included) of every pod spec in
/// `documents` (a Pod's, or a Job's template), each with its effective
/// securityContext: the pod's, overridden by the container's own.
pub fn containers(documents: &[Value]) -> Vec<Container> {
    let mut found = Vec::new();
    for document in documents {
        let spec = match document["kind"].as_str() {
            Some("Pod") => &document["spec"],
            Some("Job") | Some("Deployment") | Some("StatefulSet") | Some("DaemonSet") => {
                &document["spec"]["template"]["spec"]
            }
            _ => continue,
        };
        for list in ["initContainers", "containers"] {
            for spec_of_container in spec[list].as_array().into_iter().flatten() {
                let mut security = spec["securityContext"].as_object().cloned().unwrap_or_default();
                if let Some(own) = spec_of_container["securityContext"].as_object() {
                    security.extend(own.clone());
                }
                found.push(Container { spec: spec_of_container.clone(), security: Value::Object(security) });
            }
        }
    }
    found
}

/// A container of a rendered manifest.
#[derive(Debug, Clone)]
pub struct Container {
    /// Its spec as written.
    pub spec: Value,
    /// The securityContext that applies to it.
    pub security: Value,
}

impl Container {
    pub fn name(&self) -> &str {
        self.spec["name"].as_str().unwrap_or_default()
    }
}
