#!/usr/bin/env bash
# Checks deploy/: the image's Dockerfile and the Kubernetes manifests.
#  1. kustomize/monitoring's generated files are what generate.py writes;
#  2. every kustomization renders (kubectl kustomize; components through
#     kustomize/examples);
#  3. every rendered object is valid for Kubernetes 1.29 (native sidecars
#     included) and for the newest version kubernetes-validate knows, with
#     --strict (unknown fields rejected);
#  4. yamllint on every YAML file under deploy/ (.yamllint);
#  5. PodMonitor, PrometheusRule and Certificate validate against schemas
#     generated from their CRDs (npm: @kubernetes-models/prometheus-operator
#     and @kubernetes-models/cert-manager, pinned in crd-check/package-lock.json);
#  6. lint.py: native sidecars with the agents' exact securityContext,
#     numeric probe ports, hugepages requests = limits, no privilege,
#     pinned images;
#  7. the Dockerfile: hadolint, and dockerfile_check.py (apt packages exist,
#     cargo packages are the workspace's, COPY sources are what it builds);
#  8. each check above fails on a deliberately broken copy.
# Installs what it needs (idempotent): the PyPI tools of
# check-requirements.txt into target/deploy-check/venv, the npm packages into
# target/deploy-check/crd-check. `check.sh --install` only installs
# (scripts/setup calls it).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
work=$root/target/deploy-check
venv=$work/venv
step() { printf '== %s\n' "$*"; }
fail() { echo "deploy/check.sh: $*" >&2; exit 1; }

install() {
  mkdir -p "$work"
  if ! cmp -s "$here/check-requirements.txt" "$venv/requirements.txt"; then
    echo "deploy/check.sh: installing $(grep -v '^#' "$here/check-requirements.txt" | tr '\n' ' ')(PyPI, into $venv)"
    if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
      [ "$(id -u)" = 0 ] || fail "python3 venv is missing (apt-get install python3-venv)"
      export DEBIAN_FRONTEND=noninteractive
      apt-get install -y -qq --no-install-recommends python3-venv >/dev/null ||
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv >/dev/null; }
    fi
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$here/check-requirements.txt"
    cp "$here/check-requirements.txt" "$venv/requirements.txt"
  fi
  if ! cmp -s "$here/crd-check/package-lock.json" "$work/crd-check/package-lock.json" ||
    [ ! -d "$work/crd-check/node_modules/@kubernetes-models/prometheus-operator" ]; then
    command -v npm >/dev/null 2>&1 || fail "npm not found (apt-get install npm)"
    echo "deploy/check.sh: installing the CRD schemas (npm ci, into $work/crd-check)"
    rm -rf "$work/crd-check" && mkdir -p "$work/crd-check"
    cp "$here/crd-check/package.json" "$here/crd-check/package-lock.json" "$work/crd-check/"
    (cd "$work/crd-check" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  fi
}
install
[ "${1:-}" = --install ] && exit 0

py=$venv/bin/python
export PATH=$venv/bin:$PATH
tmp=$(mktemp -d "$work/run.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# Kubernetes versions: 1.29 (the first with native sidecars on by default)
# and the newest kubernetes-validate has schemas for.
newest=$("$py" -c 'import kubernetes_validate, os, re
d = os.path.join(os.path.dirname(kubernetes_validate.__file__), "kubernetes-json-schema")
print(max((m.group(1) for m in (re.fullmatch(r"v(\d+\.\d+\.\d+)-local-strict", n) for n in os.listdir(d)) if m),
          key=lambda v: tuple(map(int, v.split(".")))))')
versions=(1.29.0 "$newest")

# The checks, as functions of the tree they check, so that step 8 can run
# them on broken copies.
render_all() { # SRC OUT: renders every kustomization (not components) under SRC/kustomize
  local src=$1 out=$2 k name
  mkdir -p "$out"
  while IFS= read -r k; do
    grep -q '^kind: Component' "$k" && continue
    name=$(dirname "${k#"$src"/kustomize/}" | tr / _)
    kubectl kustomize "$(dirname "$k")" > "$out/$name.yaml" || { echo "cannot render $(dirname "$k")" >&2; return 1; }
  done < <(find "$src/kustomize" -name kustomization.yaml | sort)
}
validate_all() { # DIR: kubernetes-validate --strict on every rendered file, each version
  local v out rc=0
  for v in "${versions[@]}"; do
    # Custom resources have no schema here (step 5 checks them): their
    # "Couldn't find schema" warnings are expected; anything else fails.
    out=$(kubernetes-validate --strict --quiet -k "$v" "$1"/*.yaml 2>&1) || rc=1
    grep -v "Couldn't find schema for kind \(PodMonitor\|PrometheusRule\|Certificate\|Issuer\) " <<<"$out" | grep . && rc=1
  done
  return $rc
}
crd_check() { # DIR: the custom resources of the rendered files against their CRD schemas
  "$py" - "$1" > "$tmp/crs.json" <<'PY'
import glob, json, sys, yaml
crs = [{"file": f, "doc": d} for f in sorted(glob.glob(sys.argv[1] + "/*.yaml")) for d in yaml.safe_load_all(open(f))
       if d and d["apiVersion"].split("/")[0] in ("monitoring.coreos.com", "cert-manager.io")]
json.dump(crs, sys.stdout)
PY
  # ES modules resolve packages from the script's directory: run a copy there.
  cp "$here/crd-check/crd_check.mjs" "$work/crd-check/" && node "$work/crd-check/crd_check.mjs" "$tmp/crs.json"
}
lint_all() { # DIR: lint.py on the rendered VM pods and Job (base alone is not a whole VM pod)
  "$py" "$here/lint.py" $(ls "$1"/*.yaml | grep -v '/base\.yaml$')
}
dockerfile() { # DOCKERFILE
  hadolint "$1" && "$py" "$here/dockerfile_check.py" "$1" "$root"
}

step "generated files are up to date with generate.py"
"$py" "$here/generate.py" --check

step "kubectl kustomize renders every kustomization ($(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: //p'))"
render_all "$here" "$tmp/rendered"
echo "OK: $(cd "$tmp/rendered" && echo *.yaml)"

step "kubernetes-validate --strict for Kubernetes ${versions[*]}"
validate_all "$tmp/rendered"
echo "OK"

step "yamllint deploy/"
yamllint -c "$here/.yamllint" -s "$here"
echo "OK"

step "custom resources against their CRD schemas"
crd_check "$tmp/rendered"

step "lint.py: sidecars, securityContext, probes, hugepages, privileges, images"
lint_all "$tmp/rendered"

step "Dockerfile: hadolint $(hadolint --version | awk '{print $NF}'), packages and COPY sources"
dockerfile "$here/Dockerfile"

# Each check must be able to fail: a copy of deploy/ broken for it.
step "each check rejects a broken copy"
broken() { # NAME: a fresh copy of deploy/ at $tmp/NAME
  rm -rf "${tmp:?}/$1" && cp -r "$here" "$tmp/$1" && echo "$tmp/$1"
}
expect_fail() { # WHAT PATTERN COMMAND...: COMMAND must fail with PATTERN in its output
  local what=$1 pattern=$2 out; shift 2
  if out=$("$@" 2>&1); then fail "a copy with $what passed"; fi
  grep -q -- "$pattern" <<<"$out" || fail "a copy with $what failed for another reason: $out"
  echo "OK: rejects $what"
}
# generate.py reads ../dashboards and checks its own directory's tree: run
# the copy's, beside the real dashboards.
mkdir -p "$tmp/gen" && ln -s "$root/dashboards" "$tmp/gen/dashboards" && cp -r "$here" "$tmp/gen/deploy"
echo '# edited by hand' >> "$tmp/gen/deploy/kustomize/monitoring/prometheusrule.yaml"
expect_fail "a hand-edited generated file" "not what deploy/generate.py writes" "$py" "$tmp/gen/deploy/generate.py" --check
b=$(broken render) && sed -i 's#path: agent.yaml#path: missing.yaml#' "$b/kustomize/overlays/source/kustomization.yaml"
expect_fail "a patch file that does not exist" "cannot render" render_all "$b" "$b/out"
b=$(broken schema) && render_all "$here" "$b/out" &&
  sed -i '0,/restartPolicy: Always/s//restartPolicy: Always\n    restartPolicyy: Always/' "$b/out/overlays_source.yaml"
expect_fail "an unknown field in a Pod" "restartPolicyy" validate_all "$b/out"
b=$(broken yaml) && sed -i 's/^  - name: pageserver$/  - name: pageserver   /' "$b/kustomize/job/kustomization.yaml"
expect_fail "trailing spaces" "trailing-spaces" yamllint -c "$b/.yamllint" -s "$b"
b=$(broken crd) && render_all "$here" "$b/out" && sed -i 's/interval: 5s/interval: 5 seconds/' "$b/out/monitoring.yaml"
expect_fail "a PodMonitor interval that is no duration" "interval must match pattern" crd_check "$b/out"
b=$(broken lint) && render_all "$here" "$b/out" &&
  sed -i 's/privileged: false/privileged: true/; s/grpc:\n *port: 50052/grpc: {port: health}/' "$b/out/overlays_target.yaml" &&
  "$py" - "$b/out/overlays_source.yaml" <<'PY'
import sys, yaml
docs = list(yaml.safe_load_all(open(sys.argv[1])))
pod = next(d for d in docs if d["kind"] == "Pod")
agent = pod["spec"]["initContainers"][0]
del agent["restartPolicy"]                                   # not a native sidecar
agent["securityContext"]["capabilities"]["add"] = ["SYS_NICE"]
agent["readinessProbe"]["grpc"]["port"] = "health"           # a named port
pod["spec"]["hostNetwork"] = True
vmm = pod["spec"]["containers"][0]
vmm["resources"]["limits"]["hugepages-2Mi"] = "4Gi"          # requests != limits
vmm["image"] = "vmm:latest"
yaml.safe_dump_all(docs, open(sys.argv[1], "w"))
PY
for pattern in "must be a native sidecar" "securityContext is" "port 'health' is not numeric" "hostNetwork: true" \
  "hugepages-2Mi requests 2Gi != limits 4Gi" "image 'vmm:latest' is not pinned" "container vmm: privileged: true"; do
  expect_fail "lint: $pattern" "$pattern" lint_all "$b/out"
done
b=$(broken docker) && sed -i 's#/out/lib/libpageserver_vmm_shim.so /usr#/out/lib/libvmm_shim.so /usr#' "$b/Dockerfile"
expect_fail "a COPY of a file the build does not produce" "libvmm_shim.so, which the build stage does not produce" dockerfile "$b/Dockerfile"
b=$(broken docker2) && sed -i 's/-p pageserver-vmm-shim/-p pageserver-vmm-shimm/; s/libclang-dev \\/libclang-devv \\/' "$b/Dockerfile"
expect_fail "a cargo package and an apt package that do not exist" "no such package in the workspace" dockerfile "$b/Dockerfile"
expect_fail "an apt package that does not exist" "apt package libclang-devv does not exist" dockerfile "$b/Dockerfile"
b=$(broken docker3) && sed -i 's/^FROM debian:bookworm-slim$/FROM debian:latest/' "$b/Dockerfile"
expect_fail "an image tagged latest (hadolint)" "DL3007" dockerfile "$b/Dockerfile"

echo "deploy/check.sh: all checks passed"
