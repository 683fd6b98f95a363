//! Both agents run under the least-privilege settings their Kubernetes
//! manifests give them, enforced by a real OCI runtime (`runc`), through a
//! whole migration: the settings are proven by running them, not by parsing
//! them.
//!
//! The manifests are rendered with `kubectl kustomize` (the source and the
//! target overlays), and the `securityContext` of the containers named
//! `source-agent` and `target-agent` becomes an OCI bundle per agent process,
//! as kubelet and the runtime would make it: `runAsUser`/`runAsGroup` the
//! process's uid and gid, `allowPrivilegeEscalation: false` its
//! `noNewPrivileges`, `capabilities` its capability sets (none for
//! `drop: [ALL]`), `readOnlyRootFilesystem` a read-only root, and the
//! `Localhost` seccomp profile (a file in `deploy/seccomp/`) its
//! `linux.seccomp`. The root file system is bind mounts of the host's (the
//! agent binaries' directory among them); the network namespace is the
//! host's, so that the agents' 127.0.0.1 sockets work.
//!
//! The real `pageserver-demo` then migrates a 4 KiB-page guest over mutual
//! TLS with `PAGESERVER_BIN_DIR` pointing at wrappers that start each agent
//! with `runc run` (the VMM stand-ins run as themselves, as root: a VMM of
//! another uid than the agent's, which each agent is told to accept with
//! `PAGESERVER_HANDOFF_ALLOW_UID`, as a pod would). Every byte of the
//! target's memory must match the source's at pause time, and each agent
//! process, read from `/proc/PID/status` while it runs, must have the
//! manifest's uid and gid (all four), its capability sets, `NoNewPrivs: 1`
//! and a seccomp filter (`Seccomp: 2`).
//!
//! The same run with the profile minus `userfaultfd` must fail, and say so:
//! the demo exits non-zero and the source agent's log names userfaultfd and
//! the permission error. runc refusing the profile would fail both runs:
//! loading it is the proof that the profile is valid.
//!
//! Needs root and `runc` (`scripts/setup` installs it), `kubectl` and
//! PyYAML (`scripts/setup`), and the workspace's binaries (`scripts/test`).
//! Skipped, saying why, only where neither runc nor root is there.

mod common;
mod demo_process;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::assert_every_byte_verified;
use demo_process::DemoDir;
use pageserver_test_support::manifests::{self, Container};
use serde_json::{Value, json};

/// The agents, by the name of their container and of their binary.
const AGENTS: [(&str, &str); 2] = [("source", "source-agent"), ("target", "target-agent")];
/// A hang guard only.
const PATIENCE: Duration = Duration::from_secs(120);

/// The repository's root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_path_buf()
}

/// Whether the test can run here: `None` to skip (neither runc nor root),
/// with the reason printed.
fn runc_or_skip() -> Option<()> {
    let runc = Command::new("runc").arg("--version").output().is_ok_and(|o| o.status.success());
    let root = rustix::process::geteuid().is_root();
    match (runc, root) {
        (false, false) => {
            eprintln!("SKIPPED: runc is not installed and this is not root (scripts/setup installs runc, as root)");
            None
        }
        (false, true) => panic!("runc is not installed: run scripts/setup (it installs runc with apt)"),
        (true, false) => panic!("runc needs root to run the agents' containers: run the tests as root (scripts/test)"),
        (true, true) => Some(()),
    }
}

/// What a manifest asks of one agent's container: its `securityContext`
/// (the pod's, where the container's does not say).
#[derive(Debug, Clone)]
struct Policy {
    uid: u32,
    gid: u32,
    no_new_privileges: bool,
    read_only_root: bool,
    /// Capabilities added after `drop: [ALL]`.
    add: Vec<String>,
    /// The seccomp profile file in `deploy/seccomp/`.
    profile: PathBuf,
}

/// The policy of `container` from `kubectl kustomize deploy/kustomize/overlays/OVERLAY`.
fn policy_of(overlay: &str, container: &str) -> Policy {
    let dir = repo().join("deploy/kustomize/overlays").join(overlay);
    let documents = manifests::rendered(&repo(), &dir);
    let found: Vec<Container> =
        manifests::containers(&documents).into_iter().filter(|found| found.name() == container).collect();
    assert_eq!(found.len(), 1, "containers named {container} in the {overlay} overlay");
    let context: Value = found[0].security.clone();
    let what = format!("the {container} container's securityContext ({overlay} overlay): {context}");
    let id = |key: &str| {
        let id = context[key].as_u64().unwrap_or_else(|| panic!("no {key} in {what}"));
        u32::try_from(id).unwrap_or_else(|_| panic!("{key} out of range in {what}"))
    };
    let (uid, gid) = (id("runAsUser"), id("runAsGroup"));
    assert_eq!(context["runAsNonRoot"], true, "runAsNonRoot in {what}");
    assert_ne!(uid, 0, "runAsNonRoot with uid 0 in {what}");
    assert_ne!(context["privileged"], true, "privileged in {what}");
    let drop: Vec<&str> =
        context["capabilities"]["drop"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    assert!(drop.contains(&"ALL"), "the test expects capabilities dropped with drop: [ALL] in {what}");
    let add = context["capabilities"]["add"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|cap| if cap.starts_with("CAP_") { cap.to_owned() } else { format!("CAP_{cap}") })
        .collect();
    assert_eq!(context["seccompProfile"]["type"], "Localhost", "seccompProfile in {what}");
    let localhost = context["seccompProfile"]["localhostProfile"].as_str().unwrap_or_else(|| panic!("{what}"));
    let file = Path::new(localhost).file_name().unwrap_or_else(|| panic!("localhostProfile {localhost:?}"));
    Policy {
        uid,
        gid,
        no_new_privileges: context["allowPrivilegeEscalation"] == false,
        read_only_root: context["readOnlyRootFilesystem"] == true,
        add,
        profile: repo().join("deploy/seccomp").join(file),
    }
}

/// The capability bits (linux/capability.h) of `names`.
fn capability_mask(names: &[String]) -> u64 {
    const CAPS: [&str; 41] = [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];
    names
        .iter()
        .map(|name| {
            let bit = CAPS.iter().position(|cap| name.strip_prefix("CAP_") == Some(cap));
            1u64 << bit.unwrap_or_else(|| panic!("unknown capability {name}"))
        })
        .fold(0, |mask, bit| mask | bit)
}

/// The seccomp profile file as kubelet's runtime hands it to runc: the same
/// structure, in `linux.seccomp` (fields runc does not know, such as the
/// profile's `comment`, left out). Checks it refuses by default.
fn seccomp_of(profile: &Path) -> Value {
    let text = std::fs::read_to_string(profile).unwrap_or_else(|e| panic!("reading {}: {e}", profile.display()));
    let profile: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", profile.display()));
    assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO", "the profile must refuse what it does not list");
    let mut seccomp = serde_json::Map::new();
    for key in ["defaultAction", "defaultErrnoRet", "architectures", "flags"] {
        if let Some(value) = profile.get(key) {
            seccomp.insert(key.to_owned(), value.clone());
        }
    }
    let rules: Vec<Value> = profile["syscalls"]
        .as_array()
        .expect("the profile's syscalls")
        .iter()
        .map(|rule| {
            let mut kept = serde_json::Map::new();
            for key in ["names", "action", "errnoRet", "args"] {
                if let Some(value) = rule.get(key) {
                    kept.insert(key.to_owned(), value.clone());
                }
            }
            Value::Object(kept)
        })
        .collect();
    seccomp.insert("syscalls".to_owned(), Value::Array(rules));
    Value::Object(seccomp)
}

/// `seccomp` without `name` anywhere.
fn without_syscall(mut seccomp: Value, name: &str) -> Value {
    for rule in seccomp["syscalls"].as_array_mut().expect("syscalls") {
        if let Some(names) = rule["names"].as_array_mut() {
            names.retain(|n| n != name);
        }
    }
    seccomp
}

/// The OCI config of an agent's container, without `process.args` (the
/// wrapper adds them, and the per-run mounts).
fn oci_config(policy: &Policy, seccomp: Value, hostname: &str, binaries: &Path) -> Value {
    let caps: Vec<String> = policy.add.clone();
    let bind_ro = |source: &str, destination: &str| {
        json!({"destination": destination, "type": "bind", "source": source,
               "options": ["rbind", "ro", "nosuid", "nodev"]})
    };
    json!({
        "ociVersion": "1.0.2",
        "hostname": hostname,
        "root": {"path": "rootfs", "readonly": policy.read_only_root},
        "process": {
            "terminal": false,
            "user": {"uid": policy.uid, "gid": policy.gid},
            "cwd": "/",
            "env": [
                "PATH=/usr/bin:/bin",
                // The VMM (the stand-in, root) is another uid than the agent's:
                // allowed explicitly, as the pod's manifest would.
                "PAGESERVER_HANDOFF_ALLOW_UID=0",
            ],
            "noNewPrivileges": policy.no_new_privileges,
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps, "inheritable": [], "ambient": []
            }
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            bind_ro("/usr", "/usr"),
            bind_ro(&binaries.display().to_string(), "/opt/pageserver"),
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "seccomp": seccomp,
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                            "/proc/sched_debug", "/proc/scsi", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// The wrapper the demo runs as an agent (`PAGESERVER_BIN_DIR`): a bundle of
/// its own per start (the rootfs: empty directories and links to the bind
/// mounts; /etc: passwd, group, hosts), the agent's TLS files copied in for
/// the agent's user (as a Secret volume is), its hand-off socket in a
/// directory of the bundle mounted at /run/pageserver (a volume shared with
/// the VMM, who reaches it through a link at the path the demo chose), then
/// `runc run`, which forwards signals to the agent and exits with its status.
/// `PAGESERVER_DIE_WITH_PARENT` is not passed in: the agent's parent is
/// runc, and in its pid namespace it has none (the test deletes what runc
/// leaves).
const WRAPPER: &str = r#"#!/usr/bin/env python3
import json, os, shutil, sys
root, agent, runc_root, uid, gid = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
args = sys.argv[6:]
bundle = os.path.join(root, "bundles", f"{agent}-{os.getpid()}")
rootfs, secrets, run = (os.path.join(bundle, d) for d in ("rootfs", "secrets", "run"))
for d in (rootfs, secrets, run, os.path.join(rootfs, "etc")):
    os.makedirs(d)
for link in ("bin", "lib", "lib64", "sbin"):
    os.symlink("usr/" + link, os.path.join(rootfs, link))
for name, text in (("passwd", f"root:x:0:0::/:/usr/sbin/nologin\nagent:x:{uid}:{gid}::/:/usr/sbin/nologin\n"),
                   ("group", f"root:x:0:\nagent:x:{gid}:\n"), ("hosts", "127.0.0.1 localhost\n")):
    with open(os.path.join(rootfs, "etc", name), "w") as f:
        f.write(text)
for d in (secrets, run):
    os.chown(d, uid, gid)
    os.chmod(d, 0o700)
inside = []
for arg in args:
    flag, _, value = arg.partition("=")
    if flag in ("--tls-cert", "--tls-key", "--tls-ca"):
        copy = os.path.join(secrets, os.path.basename(value))
        shutil.copyfile(value, copy)
        os.chown(copy, uid, gid)
        os.chmod(copy, 0o400)
        arg = f"{flag}=/etc/pageserver/tls/{os.path.basename(value)}"
    elif flag == "--handoff-socket":
        name = os.path.basename(value)
        os.symlink(os.path.join(run, name), value)
        arg = f"{flag}=/run/pageserver/{name}"
    inside.append(arg)
with open(os.path.join(root, agent + ".config.json")) as f:
    config = json.load(f)
config["process"]["args"] = ["/opt/pageserver/" + agent] + inside
if "RUST_LOG" in os.environ:
    config["process"]["env"].append("RUST_LOG=" + os.environ["RUST_LOG"])
for source, destination, mode in ((secrets, "/etc/pageserver/tls", "ro"), (run, "/run/pageserver", "rw")):
    config["mounts"].append({"destination": destination, "type": "bind", "source": source,
                             "options": ["rbind", mode, "nosuid", "nodev", "noexec"]})
with open(os.path.join(bundle, "config.json"), "w") as f:
    json.dump(config, f)
os.execvp("runc", ["runc", "--root", runc_root, "run", "--bundle", bundle, f"{agent}-{os.getpid()}"])
"#;

/// One run's containers: the wrappers, the configs, the bundles and runc's
/// state (a `--root` of its own, so that no other run's containers are
/// touched). Dropped: every container of this run deleted (`runc delete
/// -f`), then everything removed, also when the test panics.
struct Containers {
    dir: PathBuf,
    runc_root: PathBuf,
}

impl Containers {
    /// Wrappers in `dir/bin` for both agents (the stand-in and the shim
    /// are `demo`'s), each agent's container made from its `policies` with
    /// `seccomp`.
    fn new(name: &str, demo: &DemoDir, policies: &[(Policy, Value)]) -> Self {
        let tag = format!("pageserver-runc-{name}-{}", std::process::id());
        let containers = Self { dir: std::env::temp_dir().join(&tag), runc_root: PathBuf::from("/run").join(&tag) };
        containers.clean();
        std::fs::create_dir_all(containers.dir.join("bin")).expect("creating the wrappers' directory");
        std::fs::create_dir_all(containers.dir.join("bundles")).expect("creating the bundles' directory");
        let binaries = demo.bin("source-agent").parent().expect("the binaries' directory").to_path_buf();
        let script = containers.dir.join("wrapper.py");
        std::fs::write(&script, WRAPPER).expect("writing the wrapper");
        for ((overlay, agent), (policy, seccomp)) in AGENTS.iter().zip(policies) {
            let config = oci_config(policy, seccomp.clone(), &format!("vm1-{overlay}"), &binaries);
            let path = containers.dir.join(format!("{agent}.config.json"));
            std::fs::write(&path, serde_json::to_vec_pretty(&config).expect("JSON")).expect("writing a config");
            let wrapper = containers.dir.join("bin").join(agent);
            let text = format!(
                "#!/bin/sh\nexec python3 {} {} {agent} {} {} {} \"$@\"\n",
                script.display(),
                containers.dir.display(),
                containers.runc_root.display(),
                policy.uid,
                policy.gid
            );
            std::fs::write(&wrapper, text).expect("writing the wrapper");
            std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod 755");
        }
        for other in ["vmm-standin", "libpageserver_vmm_shim.so"] {
            std::os::unix::fs::symlink(demo.bin(other), containers.dir.join("bin").join(other))
                .expect("linking a binary");
        }
        containers
    }

    fn bin_dir(&self) -> PathBuf {
        self.dir.join("bin")
    }

    /// The containers runc knows in this run's state.
    fn ids(&self) -> Vec<String> {
        let out = Command::new("runc").arg("--root").arg(&self.runc_root).args(["list", "-q"]).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).lines().map(str::to_owned).collect()).unwrap_or_default()
    }

    fn clean(&self) {
        for id in self.ids() {
            let _ = Command::new("runc").arg("--root").arg(&self.runc_root).args(["delete", "-f", &id]).status();
        }
        let _ = std::fs::remove_dir_all(&self.runc_root);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        self.clean();
    }
}

/// `/proc/PID/status` of every process now, by pid: (ppid, name, status).
fn processes() -> BTreeMap<u32, (u32, String, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return BTreeMap::new() };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let status = std::fs::read_to_string(entry.path().join("status")).ok()?;
            let ppid = status.lines().find_map(|l| l.strip_prefix("PPid:"))?.trim().parse().ok()?;
            let name = status.lines().find_map(|l| l.strip_prefix("Name:"))?.trim().to_owned();
            Some((pid, (ppid, name, status)))
        })
        .collect()
}

/// The agents now running under runc below `ancestor`: (pid, name, status).
fn agents_below(ancestor: u32) -> Vec<(u32, String, String)> {
    let all = processes();
    let descends = |mut pid: u32| {
        let mut under_runc = false;
        while let Some((ppid, _, _)) = all.get(&pid) {
            under_runc |= all.get(ppid).is_some_and(|(_, name, _)| name == "runc");
            if *ppid == ancestor {
                return under_runc;
            }
            pid = *ppid;
        }
        false
    };
    all.iter()
        .filter(|(pid, (_, name, _))| AGENTS.iter().any(|(_, agent)| agent == name) && descends(**pid))
        .map(|(pid, (_, name, status))| (*pid, name.clone(), status.clone()))
        .collect()
}

/// How a process's `/proc/PID/status` differs from `policy`.
fn differences(status: &str, policy: &Policy) -> Vec<String> {
    let field = |name: &str| status.lines().find_map(|line| line.strip_prefix(name)).map(str::trim);
    let mut wrong = Vec::new();
    for (name, wanted) in [("Uid:", policy.uid), ("Gid:", policy.gid)] {
        let ids: Vec<u32> =
            field(name).unwrap_or_default().split_whitespace().filter_map(|id| id.parse().ok()).collect();
        if ids.len() != 4 || ids.iter().any(|&id| id != wanted) {
            wrong.push(format!("{name} {ids:?}, not {wanted} (real, effective, saved, file system)"));
        }
    }
    // A process of a uid other than 0 keeps no permitted or effective
    // capability across its exec without ambient ones: the bounding set is
    // what the manifest added.
    let bounding = capability_mask(&policy.add);
    for (name, wanted) in [("CapEff:", 0), ("CapPrm:", 0), ("CapAmb:", 0), ("CapBnd:", bounding)] {
        let caps = field(name).and_then(|hex| u64::from_str_radix(hex, 16).ok());
        if caps != Some(wanted) {
            wrong.push(format!("{name} {caps:x?}, not {wanted:x}"));
        }
    }
    let no_new_privs = if policy.no_new_privileges { "1" } else { "0" };
    for (name, wanted, meaning) in
        [("NoNewPrivs:", no_new_privs, "no new privileges"), ("Seccomp:", "2", "a seccomp filter")]
    {
        if field(name) != Some(wanted) {
            wrong.push(format!("{name} {:?}, not {wanted} ({meaning})", field(name)));
        }
    }
    wrong
}

/// The outcome of one containerised run.
struct Run {
    output: std::process::Output,
    /// Each agent process seen while the demo ran, by pid: (name, its last status).
    agents: BTreeMap<u32, (String, String)>,
    dir: DemoDir,
}

/// The demo migrating a 64 MiB guest with both agents in containers made
/// from the manifests, `seccomp` changing each agent's profile as given.
fn migrate_in_containers(name: &str, change: impl Fn(Value) -> Value) -> Run {
    let policies: Vec<(Policy, Value)> = AGENTS
        .iter()
        .map(|(overlay, agent)| {
            let policy = policy_of(overlay, agent);
            let profile = change(seccomp_of(&policy.profile));
            (policy, profile)
        })
        .collect();
    let dir = DemoDir::new(&format!("oci-{name}"), None);
    let containers = Containers::new(name, &dir, &policies);
    let mut child = dir
        .demo(&["--memory", "64MiB", "--run-ms", "1000", "--vcpus", "2", "--dirty-rate", "5000"])
        .env("PAGESERVER_BIN_DIR", containers.bin_dir())
        .spawn()
        .expect("starting the demo");
    let demo = child.id();
    let mut agents: BTreeMap<u32, (String, String)> = BTreeMap::new();
    let started = Instant::now();
    loop {
        for (pid, name, status) in agents_below(demo) {
            agents.insert(pid, (name, status));
        }
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if started.elapsed() > PATIENCE {
            let _ = child.kill();
            panic!("the demo did not finish; logs:\n{}", dir.all_logs());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let output = demo_process::output_of(child);
    let left = containers.ids();
    assert!(left.is_empty(), "containers still there after the demo: {left:?}");
    drop(containers);
    Run { output, agents, dir }
}

#[test]
fn the_check_catches_a_process_outside_the_policy() {
    // This test runs as root, with capabilities and no seccomp filter.
    let own = std::fs::read_to_string("/proc/self/status").expect("own status");
    let policy = Policy {
        uid: 65532,
        gid: 65532,
        no_new_privileges: true,
        read_only_root: true,
        add: Vec::new(),
        profile: PathBuf::new(),
    };
    let wrong = differences(&own, &policy);
    for field in ["Uid:", "Gid:", "CapBnd:", "Seccomp:"] {
        assert!(wrong.iter().any(|w| w.starts_with(field)), "{field} not caught: {wrong:?}");
    }
    assert_eq!(capability_mask(&["CAP_SYS_NICE".to_owned(), "CAP_CHOWN".to_owned()]), (1 << 23) | 1);
}

#[test]
fn both_agents_migrate_a_guest_in_containers_made_from_their_manifests() {
    if runc_or_skip().is_none() {
        return;
    }
    let run = migrate_in_containers("allowed", |seccomp| seccomp);
    let report = run.dir.report(&run.output);
    assert!(run.output.status.success(), "{}\n{}", String::from_utf8_lossy(&run.output.stderr), run.dir.all_logs());
    assert_every_byte_verified(&report);

    let mut names: Vec<&str> = run.agents.values().map(|(name, _)| name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["source-agent", "target-agent"], "the agent processes seen under runc");
    for (pid, (name, status)) in &run.agents {
        let overlay = AGENTS.iter().find(|(_, agent)| agent == name).map(|(overlay, _)| *overlay).expect("an agent");
        let wrong = differences(status, &policy_of(overlay, name));
        assert!(wrong.is_empty(), "{name} (pid {pid}) is not as its manifest says: {wrong:?}\n{status}");
    }
}

#[test]
fn an_agent_refused_userfaultfd_by_its_profile_fails_and_says_so() {
    if runc_or_skip().is_none() {
        return;
    }
    let run = migrate_in_containers("no-userfaultfd", |seccomp| without_syscall(seccomp, "userfaultfd"));
    let logs = run.dir.all_logs();
    let said = format!("{}\n{logs}", String::from_utf8_lossy(&run.output.stderr));
    assert!(!run.output.status.success(), "the demo succeeded without userfaultfd:\n{said}");
    let log = std::fs::read_to_string(run.dir.logs().join("source-agent.log")).unwrap_or_default();
    let line = log.lines().find(|line| line.contains("userfaultfd") && line.contains("Operation not permitted"));
    assert!(line.is_some(), "the source agent's log names userfaultfd and the permission error:\n{said}");
}
