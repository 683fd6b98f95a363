#!/usr/bin/env bash
# Regenerates deploy/seccomp/pageserver-agent.json, the agents' seccomp
# profile (Kubernetes `seccompProfile: {type: Localhost}`; the OCI/Docker
# JSON that kubelet hands to the runtime), from what the agents actually do.
#
# Usage, as root from the repository root, after
# `cargo build --release --workspace` (needs strace: apt-get install strace):
#
#   deploy/seccomp/trace.sh              # rewrites deploy/seccomp/pageserver-agent.json
#   deploy/seccomp/trace.sh OUT.json     # writes OUT.json instead
#   BIN_DIR=DIR deploy/seccomp/trace.sh  # binaries from DIR (default target/release)
#
# How: real migrations with the real `pageserver-demo` and VMM stand-ins,
# each agent (source-agent, target-agent, every restart included) run under
# `strace -f -qq -D -e trace=all` through PAGESERVER_BIN_DIR wrappers (`-D`:
# strace is not the agent's parent, so signals from the demo reach the
# agent itself, and PAGESERVER_DIE_WITH_PARENT still names its parent). The
# runs: mutual TLS (the default) and --plaintext; 4 KiB pages (shmem) and
# --hugetlb (2 MiB; the demo reserves the huge pages and gives them back);
# chaos: both agents killed and restarted, the source agent stopped and
# continued, certificates rotated (SIGHUP to both agents; TLS only), the whole source
# side killed and a switchover before the pause (the target agent's failure
# paths). Every run ends with SIGTERM to both agents (their shutdown). The
# union of the system calls of every thread of every agent process is the
# allow-list; nothing else is allowed (SCMP_ACT_ERRNO: EPERM).
#
# Decisions the generator makes (and writes into the profile's "comment"):
# - `socket` is allowed only for the address families seen in the traces.
# - `clone3` is refused with ENOSYS (seccomp cannot see into its argument
#   struct); glibc then falls back to `clone`, which is allowed only without
#   any CLONE_NEW* namespace flag (the agents create no namespace: this keeps
#   user namespaces, the one kind an unprivileged process may create, out).
# - `ioctl` and `prctl` are allowed whole: the agents' ioctls are the
#   userfaultfd and PAGEMAP_SCAN requests, whose numbers encode struct sizes
#   of the kernel headers, and a request missed by the traces (a rare path)
#   would fail a migration, not harden it; without capabilities prctl gives
#   nothing beyond the process itself.
# - x86_64 only (SCMP_ARCH_X86_64): the agents are 64-bit and make no i386
#   or x32 calls, so those ABIs are refused. Other architectures need their
#   own trace (aarch64 has no open, poll, epoll_wait...).
set -euo pipefail
cd "$(dirname "$0")/../.."

out=${1:-deploy/seccomp/pageserver-agent.json}
bin=$(realpath "${BIN_DIR:-target/release}")
command -v strace >/dev/null || { echo "trace.sh: strace is missing (apt-get install strace)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "trace.sh: run as root (the demo's userfaultfd, huge pages)" >&2; exit 1; }
for b in pageserver-demo source-agent target-agent vmm-standin libpageserver_vmm_shim.so; do
  [ -f "$bin/$b" ] || { echo "trace.sh: $bin/$b missing: cargo build --release --workspace" >&2; exit 1; }
done

work=$(mktemp -d /tmp/pageserver-seccomp-trace.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir "$work/bin" "$work/traces" "$work/logs"
ln -s "$bin/vmm-standin" "$bin/libpageserver_vmm_shim.so" "$work/bin/"
# Each agent sees a container's /dev (a private mount namespace, a tmpfs on
# /dev with the usual devices and the host's /dev/shm, where the demo keeps
# its files): no /dev/userfaultfd, as in a pod, so the source agent's hole
# guard takes the userfaultfd(2) system call, as it does in a container.
mkdir "$work/host-dev"
for agent in source-agent target-agent; do
  cat >"$work/bin/$agent" <<EOF
#!/bin/sh
exec unshare --mount --propagation private -- sh -ec '
  mount --rbind /dev "$work/host-dev"
  mount -t tmpfs -o mode=755,size=64k tmpfs /dev
  for d in null zero full random urandom tty; do touch /dev/\$d; mount --bind "$work/host-dev/\$d" /dev/\$d; done
  mkdir /dev/shm && mount --rbind "$work/host-dev/shm" /dev/shm
  exec strace -f -qq -D -e trace=all -o "$work/traces/$agent.\$\$" "$bin/$agent" "\$@"' "$agent" "\$@"
EOF
  chmod 755 "$work/bin/$agent"
done

run() {
  echo "trace.sh: pageserver-demo $*" >&2
  PAGESERVER_BIN_DIR="$work/bin" "$bin/pageserver-demo" --memory 64MiB --run-ms 1500 --vcpus 2 \
    --log-dir "$work/logs" "$@" >"$work/logs/demo.out" 2>&1 || echo "trace.sh: (exit $?, expected for a failure path)" >&2
}
run
run --plaintext
run --hugetlb
run --chaos kill-source-agent@precopy,kill-target-agent@postcopy
run --hugetlb --chaos kill-target-agent@switchover,stop-source-agent:300@postcopy
run --chaos rotate-certificates@postcopy
run --chaos kill-source-side@postcopy --source-unreachable-timeout 2s
run --chaos switchover-before-pause@switchover --pause-timeout 2s
# strace -D outlives its tracee by a moment: wait until every trace is closed.
for _ in $(seq 100); do
  fuser -s "$work"/traces/* 2>/dev/null || break
  sleep 0.1
done

python3 - "$work/traces" "$out" <<'EOF'
import json, os, re, sys

traces, out = sys.argv[1], sys.argv[2]
call = re.compile(r"^\d+\s+([a-z0-9_]+)\(")
family = re.compile(r"^\d+\s+socket\((AF_[A-Z0-9]+)")
names, families = set(), set()
for f in os.listdir(traces):
    for line in open(os.path.join(traces, f), errors="replace"):
        if m := call.match(line):
            names.add(m.group(1))
        if m := family.match(line):
            families.add(m.group(1))
if not {"userfaultfd", "ioctl", "mmap"} <= names:
    sys.exit(f"trace.sh: the traces look incomplete: {sorted(names)}")
# x86_64 <sys/socket.h> and <linux/sched.h>.
AF = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16}
CLONE_NEW = {"CLONE_NEWNS": 0x20000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
             "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
             "CLONE_NEWNET": 0x40000000}
unknown = families - AF.keys()
if unknown:
    sys.exit(f"trace.sh: socket families without a number here: {sorted(unknown)}")
# What the runtime itself calls in the agent's process between loading the
# filter and exec'ing the agent (runc 1.1, seen with `strace -f runc run`:
# it checks that /proc/self/fd is procfs and marks inherited fds
# close-on-exec); without them no agent starts.
RUNTIME = {"fstatfs", "getdents64"}
names |= RUNTIME
special = {"socket", "clone", "clone3"}
syscalls = [{"names": sorted(names - special), "action": "SCMP_ACT_ALLOW"}]
for f in sorted(families, key=AF.get):
    syscalls.append({"names": ["socket"], "action": "SCMP_ACT_ALLOW",
                     "args": [{"index": 0, "value": AF[f], "op": "SCMP_CMP_EQ"}]})
mask = sum(CLONE_NEW.values())
if names & {"clone", "clone3"}:
    syscalls.append({"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                     "args": [{"index": 0, "value": mask, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]})
if "clone3" in names:
    syscalls.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38})
profile = {
    "comment": [
        "The system calls of source-agent and target-agent, and nothing else, on x86_64.",
        "Generated by deploy/seccomp/trace.sh from strace of real migrations (see its header); do not edit by hand.",
        "Plus what runc calls between loading the filter and exec'ing the agent: " + ", ".join(sorted(RUNTIME)) + ".",
        "Anything else fails with EPERM (SCMP_ACT_ERRNO), so an agent reports it instead of being killed.",
        "socket: only the address families the agents use (" + ", ".join(sorted(families, key=AF.get)) + ").",
        "clone3: ENOSYS (seccomp cannot read its argument struct), so glibc falls back to clone; "
        "clone: only without CLONE_NEW* flags (" + hex(mask) + "): no namespaces, user namespaces included.",
        "ioctl and prctl allowed whole: userfaultfd/PAGEMAP_SCAN request numbers encode kernel struct sizes, "
        "and a request the traces missed would fail a migration; prctl without capabilities reaches only the process.",
        "Only SCMP_ARCH_X86_64: the agents make no i386 or x32 calls; another architecture needs its own trace.",
    ],
    "defaultAction": "SCMP_ACT_ERRNO",
    "architectures": ["SCMP_ARCH_X86_64"],
    "syscalls": syscalls,
}
with open(out, "w") as f:
    json.dump(profile, f, indent=2)
    f.write("\n")
print(f"trace.sh: {len(names)} system calls ({len(names - {'clone3'})} allowed), socket families "
      f"{sorted(families)}: {out}", file=sys.stderr)
EOF
