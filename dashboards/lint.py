#!/usr/bin/env python3
"""Checks the dashboards' conventions that Grafana's schema cannot express.

    python3 dashboards/lint.py DASHBOARD.json... [RULES.yml...]

For a rule file (.yml): every pageserver_* name in it is a metric the agents
export (promtool checks the rest). For each dashboard:
- a `datasource` variable (type datasource, query prometheus) and a `vm` query
  variable on label_values(pageserver_build_info, vm) through ${datasource};
- a stable uid, unique panel ids, panels inside the 24-column grid and not
  overlapping;
- every panel and every target uses {"type": "prometheus", "uid": "${datasource}"};
- every query has `vm=~"$vm"` in each of its metric selectors (not just
  somewhere in the string), and names only metrics the agents export;
- every rate()/irate()/increase() range is [$__rate_interval];
- every non-row panel has a title, a unit (stat, timeseries) and at least one target.
Exits 1 with one line per problem.
"""
import json
import re
import sys

DS = {"type": "prometheus", "uid": "${datasource}"}
VM = 'vm=~"$vm"'

HISTOGRAMS = {
    "pageserver_target_fault_latency_seconds",
    "pageserver_target_fetch_latency_seconds",
    "pageserver_source_request_duration_seconds",
    "pageserver_source_dirty_scan_duration_seconds",
    "pageserver_source_dirty_scan_pages",
}
SCALARS = {
    "pageserver_target_faults_total",
    "pageserver_target_pages_fetched_total",
    "pageserver_target_pages_fetched_unknown_total",
    "pageserver_target_pages_installed_bulk_total",
    "pageserver_target_bytes_received_total",
    "pageserver_target_precopy_rounds_total",
    "pageserver_target_precopy_pages_total",
    "pageserver_target_precopy_dirty_pages",
    "pageserver_target_stale_pages_at_switchover",
    "pageserver_target_pages",
    "pageserver_target_phase",
    "pageserver_target_source_up",
    "pageserver_target_faults_waiting",
    "pageserver_target_faults_blocked",
    "pageserver_target_source_reconnects_total",
    "pageserver_target_source_restarts_total",
    "pageserver_target_source_replies_refused_total",
    "pageserver_target_stalled_seconds",
    "pageserver_source_pages_served_total",
    "pageserver_source_zero_pages_served_total",
    "pageserver_source_bytes_served_total",
    "pageserver_source_requests_rejected_total",
    "pageserver_source_paused",
    "pageserver_source_epoch",
    "pageserver_build_info",
}
KNOWN = SCALARS | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}

METRIC = re.compile(r"\b(pageserver_[a-z0-9_]+)\b(\{[^}]*\})?")
METRIC_NAME = re.compile(r"\b(pageserver_[a-z0-9_]+)\b(?![ \t]*:)")
RANGE_FN = re.compile(r"\b(rate|irate|increase)\s*\(")


def walk_panels(panels):
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels", []))


def range_arg(expr, start):
    """The [range] of the range-vector function whose '(' is at expr[start-1]."""
    depth, i = 1, start
    while i < len(expr) and depth:
        depth += {"(": 1, ")": -1}.get(expr[i], 0)
        i += 1
    ranges = re.findall(r"\[([^\]]*)\]", expr[start:i])
    return ranges[-1] if ranges else None


def lint_expr(where, expr, problems):
    if not expr.strip():
        problems.append("%s: empty query" % where)
        return
    if VM not in expr:
        problems.append('%s: query has no vm=~"$vm": %s' % (where, expr))
    for m in METRIC.finditer(expr):
        name, matchers = m.group(1), m.group(2) or ""
        if name not in KNOWN:
            problems.append("%s: unknown metric %s" % (where, name))
        if VM not in matchers:
            problems.append('%s: selector %s%s lacks vm=~"$vm"' % (where, name, matchers))
    for m in RANGE_FN.finditer(expr):
        rng = range_arg(expr, m.end())
        if rng != "$__rate_interval":
            problems.append("%s: %s() over [%s], not [$__rate_interval]" % (where, m.group(1), rng))


def lint_rules(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    names = set(METRIC_NAME.findall(text))
    problems = ["%s: unknown metric %s" % (path, n) for n in sorted(names - KNOWN)]
    if not names:
        problems.append("%s: names no pageserver metric" % path)
    return problems


def lint(path):
    if path.endswith((".yml", ".yaml")):
        return lint_rules(path)
    problems = []
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    if not re.fullmatch(r"[a-z0-9-]{1,40}", str(d.get("uid", ""))):
        problems.append("%s: missing or unstable uid %r" % (path, d.get("uid")))
    variables = {v.get("name"): v for v in d.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("%s: no `datasource` variable of type datasource, query prometheus" % path)
    vm = variables.get("vm")
    vm_query = vm and vm.get("query")
    if isinstance(vm_query, dict):
        vm_query = vm_query.get("query")
    if not vm or vm.get("type") != "query" or vm_query != "label_values(pageserver_build_info, vm)":
        problems.append("%s: no `vm` query variable on label_values(pageserver_build_info, vm)" % path)
    elif vm.get("datasource") != DS:
        problems.append("%s: the vm variable does not query ${datasource}" % path)

    ids, cells = set(), {}
    for p in walk_panels(d.get("panels", [])):
        where = "%s: panel %r" % (path, p.get("title"))
        pid = p.get("id")
        if pid in ids:
            problems.append("%s: duplicate id %s" % (where, pid))
        ids.add(pid)
        g = p.get("gridPos", {})
        if g.get("x", 0) + g.get("w", 0) > 24 or min(g.get(k, -1) for k in "xywh") < 0:
            problems.append("%s: gridPos %s outside the 24-column grid" % (where, g))
        for cx in range(g.get("x", 0), g.get("x", 0) + g.get("w", 0)):
            for cy in range(g.get("y", 0), g.get("y", 0) + g.get("h", 0)):
                if (cx, cy) in cells:
                    problems.append("%s: overlaps panel %r" % (where, cells[(cx, cy)]))
                    break
                cells[(cx, cy)] = p.get("title")
            else:
                continue
            break
        if p.get("type") == "row":
            continue
        if not p.get("title"):
            problems.append("%s: no title" % where)
        if p.get("datasource") != DS:
            problems.append("%s: panel datasource is %s, not %s" % (where, p.get("datasource"), DS))
        if p.get("type") in ("stat", "timeseries") and not p.get("fieldConfig", {}).get("defaults", {}).get("unit"):
            problems.append("%s: no unit" % where)
        targets = p.get("targets") or []
        if not targets:
            problems.append("%s: no targets" % where)
        for t in targets:
            tw = "%s target %s" % (where, t.get("refId"))
            if t.get("datasource") != DS:
                problems.append("%s: datasource is %s, not %s" % (tw, t.get("datasource"), DS))
            lint_expr(tw, t.get("expr", ""), problems)
    return problems


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    problems = []
    for path in sys.argv[1:]:
        problems += lint(path)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        sys.exit(1)
    print("lint: %s OK" % ", ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
