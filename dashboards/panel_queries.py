#!/usr/bin/env python3
"""Prints every panel query of a Grafana dashboard as plain PromQL, one a line.

    python3 dashboards/panel_queries.py DASHBOARD.json VM [--titles]

Substitutes what Grafana would: $vm / ${vm} -> VM (regex-escaped, as Grafana
escapes a multi-value variable for Prometheus), $__rate_interval -> 1m. The
${datasource} variable only selects the data source and never appears in a
query. Newlines inside a query become spaces. With --titles each line is
`panel title<TAB>refId<TAB>query`.
Exit 1 if the dashboard has no query, or a query still holds a `$` variable.
"""
import json
import re
import sys

RATE_INTERVAL = "1m"


def escape_vm(name):
    # Grafana's prometheusSpecialRegexEscape: a regex-escaped value, with the
    # backslash doubled because it sits inside a PromQL double-quoted string.
    return re.sub(r"([$^*{}\[\]'+?.()|\\])", r"\\\\\1", name)


def walk(panels):
    for p in panels:
        yield p
        yield from walk(p.get("panels", []))


def queries(dashboard, vm):
    vm_value = escape_vm(vm)
    for p in walk(dashboard.get("panels", [])):
        for t in p.get("targets") or []:
            expr = t.get("expr")
            if not expr:
                continue
            q = expr.replace("${__rate_interval}", RATE_INTERVAL).replace("$__rate_interval", RATE_INTERVAL)
            q = re.sub(r"\$\{vm(?::[a-z]+)?\}|\$vm\b", lambda _: vm_value, q)
            q = " ".join(q.split())
            yield p.get("title", ""), t.get("refId", ""), q


def main():
    args = [a for a in sys.argv[1:] if a != "--titles"]
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    with open(args[0], encoding="utf-8") as f:
        dashboard = json.load(f)
    found = list(queries(dashboard, args[1]))
    if not found:
        print("%s: no panel query" % args[0], file=sys.stderr)
        sys.exit(1)
    bad = False
    for title, ref, q in found:
        if "$" in q:
            print("%s: unsubstituted variable in %r %s: %s" % (args[0], title, ref, q), file=sys.stderr)
            bad = True
        print("%s\t%s\t%s" % (title, ref, q) if "--titles" in sys.argv[1:] else q)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
