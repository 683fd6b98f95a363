#!/usr/bin/env python3
"""Structural checks on rendered manifests (kubectl kustomize output).

    lint.py RENDERED.yaml...

Each failure names the file, the object, the container and what is wrong;
exit 1 if any. What is checked (see deploy/README.md for why):
- every agent container (source-agent, target-agent) is a native sidecar
  (in initContainers, restartPolicy: Always) with exactly the agents'
  securityContext;
- every probe is on a numeric port;
- no privileged: true, allowPrivilegeEscalation: true, hostNetwork,
  hostPID, hostIPC or hostPath anywhere; no capability added;
- every container runs non-root, drops ALL and has a seccomp profile;
- hugepages requests = limits, and a pod with a HugePages-2Mi emptyDir
  requests huge pages; a VM pod's guest memory is a HugePages-2Mi or
  Memory emptyDir;
- every image is pinned (a tag other than `latest`, or a digest), and is
  one kustomize `images:` rewrites (pageserver or vmm);
- the VMM container preloads the shim and sets the shim's environment.
"""
import sys

import yaml

AGENT_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "runAsGroup": 65532,
    "allowPrivilegeEscalation": False,
    "privileged": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "Localhost", "localhostProfile": "pageserver-agent.json"},
}
AGENTS = {"source-agent", "target-agent"}
IMAGES = {"pageserver", "vmm"}  # the names kustomize `images:` rewrites
SHIM_ENV = {"LD_PRELOAD", "PAGESERVER_SHIM_ROLE", "PAGESERVER_SHIM_MEM_PATH", "PAGESERVER_SHIM_SOCKET",
            "PAGESERVER_SHIM_VM"}


def pod_specs(doc):
    kind = doc.get("kind")
    if kind == "Pod":
        return [doc.get("spec", {})]
    if kind in ("Job", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        return [doc["spec"]["template"]["spec"]]
    return []


def check_pod(spec, where, errors):
    err = lambda what: errors.append("%s: %s" % (where, what))
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            err("%s: true" % key)
    volumes = spec.get("volumes", [])
    for v in volumes:
        if "hostPath" in v:
            err("volume %s is a hostPath" % v["name"])
    huge_volume = any(v.get("emptyDir", {}).get("medium") == "HugePages-2Mi" for v in volumes)
    inits = spec.get("initContainers", [])
    containers = [("initContainers", c) for c in inits] + [("containers", c) for c in spec.get("containers", [])]
    huge_requested = False
    for section, c in containers:
        name = c.get("name")
        at = lambda what: err("container %s: %s" % (name, what))
        sc = c.get("securityContext", {})
        if name in AGENTS:
            if section != "initContainers" or c.get("restartPolicy") != "Always":
                at("an agent must be a native sidecar (in initContainers, restartPolicy: Always)")
            if sc != AGENT_SECURITY:
                at("securityContext is %s, must be exactly %s" % (sc, AGENT_SECURITY))
        if sc.get("privileged"):
            at("privileged: true")
        if sc.get("allowPrivilegeEscalation") is not False:
            at("allowPrivilegeEscalation must be false")
        if sc.get("runAsNonRoot") is not True or not sc.get("runAsUser"):
            at("must run as a non-root uid (runAsNonRoot: true, runAsUser)")
        caps = sc.get("capabilities", {})
        if caps.get("add"):
            at("adds capabilities %s" % caps["add"])
        if caps.get("drop") != ["ALL"]:
            at("must drop ALL capabilities")
        if sc.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
            at("needs a seccompProfile (RuntimeDefault or Localhost)")
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            p = c.get(probe)
            if not p:
                continue
            for kind in ("grpc", "tcpSocket", "httpGet"):
                if kind in p and not isinstance(p[kind].get("port"), int):
                    at("%s %s port %r is not numeric" % (probe, kind, p[kind].get("port")))
        res = c.get("resources", {})
        req, lim = res.get("requests", {}), res.get("limits", {})
        for key in set(req) | set(lim):
            if key.startswith("hugepages-"):
                huge_requested = True
                if req.get(key) != lim.get(key):
                    at("%s requests %s != limits %s" % (key, req.get(key), lim.get(key)))
        image = c.get("image", "")
        base = image.split("@")[0].rsplit("/", 1)[-1]
        repo, _, tag = base.partition(":")
        if "@sha256:" not in image and (not tag or tag == "latest"):
            at("image %r is not pinned (no tag, or latest)" % image)
        if repo not in IMAGES:
            at("image %r is not one kustomize images: rewrites (%s)" % (image, sorted(IMAGES)))
        if name == "vmm":
            env = {e["name"] for e in c.get("env", [])}
            if not SHIM_ENV <= env:
                at("VMM lacks the shim's environment %s" % sorted(SHIM_ENV - env))
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            media = {v["name"]: v.get("emptyDir", {}).get("medium") for v in volumes}
            if not any(media.get(m) in ("HugePages-2Mi", "Memory") and m == "guest-memory" for m in mounts):
                at("guest-memory must be an emptyDir of medium HugePages-2Mi or Memory mounted in the VMM")
    if huge_volume and not huge_requested:
        err("a HugePages-2Mi emptyDir but no container requests hugepages-2Mi")


def main(paths):
    errors = []
    count = 0
    for path in paths:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if not doc:
                    continue
                where = "%s: %s/%s" % (path, doc.get("kind"), doc.get("metadata", {}).get("name"))
                for spec in pod_specs(doc):
                    count += 1
                    check_pod(spec, where, errors)
    for e in errors:
        print("lint.py: " + e, file=sys.stderr)
    if errors:
        return 1
    print("OK: %d pod specs in %d files" % (count, len(paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
