#!/usr/bin/env python3
"""Checks deploy/Dockerfile against the workspace, since no image can be
built here (no container engine):

    dockerfile_check.py DOCKERFILE REPO_ROOT

- every package the build stage `apt-get install`s exists in Debian's
  package lists (apt-cache show; this machine runs the same release);
- every `-p PACKAGE` of its `cargo build` is a workspace package (read
  from the members' Cargo.toml);
- what the runtime stage copies is what that build produces: each
  binary package's binary, the cdylib's lib<name>.so, at the paths the
  manifests use; and it runs as USER 65532:65532.
Each failure says what is wrong; exit 1 if any.
"""
import os
import re
import subprocess
import sys
import tomllib

# Announced, not in the workspace yet: reported, not failed. Remove an
# entry once its package is in the workspace (then it is checked as any other).
# Where the manifests expect things (deploy/kustomize, the Job).
WANTED = {
    "/usr/local/bin/source-agent",
    "/usr/local/bin/target-agent",
    "/usr/local/bin/pageserver-migrate",
    "/usr/local/lib/pageserver/libpageserver_vmm_shim.so",
}


def instructions(text):
    """(stage index, instruction, arguments) with continuations joined and
    comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    stage = -1
    for line in text.splitlines():
        if not line.strip():
            continue
        op, _, rest = line.strip().partition(" ")
        op = op.upper()
        if op == "FROM":
            stage += 1
        yield stage, op, rest.strip()


def workspace(root):
    """{package name: (its Cargo.toml, its directory)} of the workspace members."""
    with open(os.path.join(root, "Cargo.toml"), "rb") as f:
        members = tomllib.load(f)["workspace"]["members"]
    packages = {}
    for m in members:
        with open(os.path.join(root, m, "Cargo.toml"), "rb") as f:
            manifest = tomllib.load(f)
        packages[manifest["package"]["name"]] = (manifest, os.path.join(root, m))
    return packages


def products(name, manifest, directory):
    """The files `cargo build --release -p NAME` leaves in target/release/."""
    out = set()
    if manifest.get("lib", {}).get("crate-type") == ["cdylib"]:
        lib = manifest["lib"].get("name", name).replace("-", "_")
        out.add("lib%s.so" % lib)
    bins = [b["name"] for b in manifest.get("bin", [])]
    if not bins and os.path.exists(os.path.join(directory, "src", "main.rs")):
        bins = [name]
    out.update(bins)
    return out


def main(dockerfile, root):
    errors, notes = [], []
    with open(dockerfile) as f:
        steps = list(instructions(f.read()))
    last = max(s for s, _, _ in steps)
    packages = workspace(root)

    apt, cargo_packages = [], []
    for stage, op, rest in steps:
        if stage == last or op != "RUN":
            continue
        for m in re.finditer(r"apt-get install ((?:\s*-\S+)*)((?:\s+[a-z0-9][a-z0-9.+-]*(?:=\S+)?)+)", rest):
            apt += m.group(2).split()
        for m in re.finditer(r"cargo build ([^&;]*)", rest):
            cargo_packages += re.findall(r"-p\s+(\S+)", m.group(1))
    if not apt:
        errors.append("the build stage installs no Debian package (libclang-dev is needed by bindgen)")
    for pkg in apt:
        name = pkg.split("=")[0]
        if subprocess.run(["apt-cache", "show", name], capture_output=True).returncode != 0:
            errors.append("apt package %s does not exist in Debian's lists (apt-cache show)" % name)
    if not cargo_packages:
        errors.append("the build stage has no `cargo build -p ...`")
    built = set()
    for pkg in cargo_packages:
        if pkg in packages:
            built |= products(pkg, *packages[pkg])
        else:
            errors.append("cargo build -p %s: no such package in the workspace (%s)" % (pkg, ", ".join(sorted(packages))))

    # The build stage copies target/release/X to /out/...; the runtime stage
    # copies /out/... to its destination. Follow each file through both.
    staged = {}
    for stage, op, rest in steps:
        if stage != last and op == "RUN":
            for m in re.finditer(r"cp ((?:target/release/\S+\s+)+)(/out/\S+?)/?(?=\s|$)", rest):
                for src in m.group(1).split():
                    name = os.path.basename(src)
                    if name not in built:
                        errors.append("the build stage copies %s, which the cargo build does not produce (it builds %s)"
                                      % (src, ", ".join(sorted(built))))
                    staged["%s/%s" % (m.group(2), name)] = name
    installed, user = set(), None
    for stage, op, rest in steps:
        if stage != last:
            continue
        if op == "COPY" and rest.startswith("--from="):
            args = rest.split()[1:]
            *srcs, dest = args
            for src in srcs:
                if src not in staged:
                    errors.append("the runtime stage copies %s, which the build stage does not produce" % src)
                installed.add(os.path.join(dest, os.path.basename(src)) if dest.endswith("/") else dest)
        if op == "USER":
            user = rest
    for path in sorted(WANTED - installed):
        errors.append("the image lacks %s (the manifests use it)" % path)
    if user != "65532:65532":
        errors.append("the runtime stage's USER is %r, must be 65532:65532" % user)
    for n in notes:
        print("dockerfile_check: note: " + n)
    for e in errors:
        print("dockerfile_check: %s: %s" % (dockerfile, e), file=sys.stderr)
    if errors:
        return 1
    print("OK: apt %s; cargo -p %s; image files %s" % (" ".join(apt), " ".join(cargo_packages), " ".join(sorted(installed))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
