#!/usr/bin/env bash
# Checks the Grafana dashboards and the Prometheus alert rules in dashboards/:
#  1. the dashboards are what generate.py writes (they are generated);
#  2. conventions (lint.py): ${datasource} on every panel and target,
#     vm=~"$vm" in every metric selector, [$__rate_interval] in every
#     rate()/increase(), the datasource and vm variables, stable uid, ids and
#     grid; only metric names the agents export (dashboards and alerts);
#  3. every panel query is valid PromQL (promtool parses it as a rule);
#  4. promtool check rules alerts.yml, promtool test rules alerts_test.yml;
#  5. both dashboards type-check against Grafana's schema (@grafana/schema,
#     with each panel's options typed by its plug-in's schema) under
#     tsc --strict, and a deliberately broken copy fails to.
# Needs promtool (Debian package prometheus: scripts/setup installs it, and so
# does this script when run as root), node and npm (the npm packages go to
# target/dashboard-check/, reused while schema-check/package-lock.json is
# unchanged), python3 (3.11 or later) with the grafana-foundation-sdk version
# that generate.py pins (installed with pip when missing).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
work=$(cd "$here/.." && pwd)/target/dashboard-check
dashboards=("$here/pageserver-target.json" "$here/pageserver-source.json")
step() { printf '== %s\n' "$*"; }

if ! command -v promtool >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  # As scripts/setup does; a server the package's init script may have
  # started is stopped again.
  echo "check.sh: installing promtool (Debian: prometheus)"
  export DEBIAN_FRONTEND=noninteractive
  prometheus_before=$(pidof prometheus || true)
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null ||
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
  if [ -z "$prometheus_before" ] && pidof prometheus >/dev/null; then
    /etc/init.d/prometheus stop >/dev/null 2>&1 || true
  fi
fi
command -v promtool >/dev/null 2>&1 ||
  { echo "check.sh: promtool not found (apt-get install --no-install-recommends prometheus)" >&2; exit 1; }
for tool in node npm python3; do
  command -v "$tool" >/dev/null 2>&1 || { echo "check.sh: $tool not found" >&2; exit 1; }
done

# The Grafana Foundation SDK (PyPI) that generate.py builds the dashboards
# with, at the exact version generate.py pins (SDK_VERSION); installed the way
# scripts/setup installs grpcurl.
sdk_version=$(sed -n 's/^SDK_VERSION = "\(.*\)"$/\1/p' "$here/generate.py")
[ -n "$sdk_version" ] || { echo "check.sh: no SDK_VERSION in generate.py" >&2; exit 1; }
sdk_installed() {
  python3 -c 'import importlib.metadata as m, sys; sys.exit(m.version("grafana-foundation-sdk") != sys.argv[1])' \
    "$sdk_version" 2>/dev/null
}
if ! sdk_installed; then
  echo "check.sh: installing grafana-foundation-sdk==$sdk_version (PyPI)"
  if ! python3 -m pip --version >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends python3-pip >/dev/null ||
      { apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-pip >/dev/null; }
  fi
  pip_install() {
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check "$@" "grafana-foundation-sdk==$sdk_version"
  }
  pip_install 2>/dev/null || pip_install --break-system-packages # Debian's own python3 is "externally managed"
  sdk_installed || { echo "check.sh: grafana-foundation-sdk==$sdk_version is still not installed" >&2; exit 1; }
fi
mkdir -p "$work"
tmp=$(mktemp -d "$work/run.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

step "dashboards are up to date with generate.py"
python3 "$here/generate.py" --check
echo "OK"

step "lint: datasource, vm filter, \$__rate_interval, variables, grid, metric names"
python3 "$here/lint.py" "${dashboards[@]}" "$here/alerts.yml"

step "every panel query parses as PromQL"
{
  echo "groups:"
  echo "  - name: panel-queries"
  echo "    rules:"
  n=0
  for d in "${dashboards[@]}"; do
    while IFS= read -r q; do
      n=$((n + 1))
      printf '      - record: panel_query:%d\n        expr: %s\n' "$n" \
        "$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$q")"
    done < <(python3 "$here/panel_queries.py" "$d" vm1)
  done
} > "$tmp/panel-queries.yml"
promtool check rules "$tmp/panel-queries.yml"

step "promtool check rules alerts.yml"
promtool check rules "$here/alerts.yml"

step "promtool test rules alerts_test.yml"
(cd "$here" && promtool test rules alerts_test.yml)

step "dashboards type-check against @grafana/schema (tsc --strict)"
if ! cmp -s "$here/schema-check/package-lock.json" "$work/package-lock.json" ||
  [ ! -x "$work/node_modules/typescript/bin/tsc" ]; then
  rm -rf "$work/node_modules"
  cp "$here/schema-check/package.json" "$here/schema-check/package-lock.json" "$work/"
  (cd "$work" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
tsc() { node "$work/node_modules/typescript/bin/tsc" "$@"; }
tsconfig() { # a tsconfig.json for the .ts files in directory $1, relative to the tsconfig
  sed "s#generated/\\*\\.ts#$1/*.ts#" "$here/schema-check/tsconfig.json"
}
rm -rf "$work/generated"
python3 "$here/schema-check/gen_ts.py" "$work/generated" "${dashboards[@]}"
tsconfig generated > "$work/tsconfig.json"
(cd "$work" && tsc -p tsconfig.json)
echo "OK: $(cd "$work/generated" && echo *.ts) (@grafana/schema $(node -p "require('$work/node_modules/@grafana/schema/package.json').version"), typescript $(tsc --version | cut -d' ' -f2))"

# The type check must be able to fail: a copy with a string where the schema
# wants a number, and an unknown stat colour mode, must both be rejected.
python3 - "${dashboards[0]}" "$tmp/broken/dashboard.json" <<'EOF'
import json, os, sys
d = json.load(open(sys.argv[1]))
d["panels"][1]["gridPos"]["h"] = "4"
next(p for p in d["panels"] if p["type"] == "stat")["options"]["colorMode"] = "bogus"
os.makedirs(os.path.dirname(sys.argv[2]))
json.dump(d, open(sys.argv[2], "w"))
EOF
python3 "$here/schema-check/gen_ts.py" "$tmp/broken" "$tmp/broken/dashboard.json"
tsconfig broken > "$tmp/tsconfig.json"
if out=$(tsc -p "$tmp/tsconfig.json" 2>&1); then
  echo "check.sh: a deliberately broken dashboard passed the type check" >&2
  exit 1
fi
grep -q "'string' is not assignable to type 'number'" <<<"$out" && grep -q '"bogus"' <<<"$out" ||
  { echo "check.sh: the broken dashboard failed for another reason:" >&2; echo "$out" >&2; exit 1; }
echo "OK: a broken copy is rejected ($(grep -c 'error TS' <<<"$out") errors)"

echo "dashboards/check.sh: all checks passed"
