#!/usr/bin/env python3
"""Writes the Grafana dashboards pageserver-target.json and pageserver-source.json.

The JSON files are generated: edit this file, then run

    python3 dashboards/generate.py          # rewrite both dashboards
    python3 dashboards/generate.py --check  # exit 1 if a committed file differs

Every query filters on vm=~"$vm", every panel and target uses the
${datasource} variable, every rate() uses $__rate_interval (dashboards/lint.py
checks all three, and check.sh type-checks the output against @grafana/schema).
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DS = {"type": "prometheus", "uid": "${datasource}"}
V = 'vm=~"$vm"'
RI = "$__rate_interval"


def sel(metric, extra=""):
    """A selector of `metric` filtered on the vm variable (plus `extra` matchers)."""
    return "%s{%s%s}" % (metric, V, ("," + extra) if extra else "")


def rate(metric, extra=""):
    return "rate(%s[%s])" % (sel(metric, extra), RI)


def quantile(q, metric, by):
    return "histogram_quantile(%s, sum by (%s) (%s))" % (q, ", ".join(by + ["le"]), rate(metric + "_bucket"))


def target(ref, expr, legend="__auto", fmt="time_series", instant=False):
    t = {
        "datasource": DS,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend,
        "range": not instant,
        "instant": instant,
        "refId": ref,
    }
    if fmt != "time_series":
        t["format"] = fmt
    return t


def thresholds(*steps):
    """steps: (color, value|None) pairs; the first value is None (-Infinity)."""
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in steps]}


def value_mappings(entries):
    """entries: [(value, text, color)] -> one `value` mapping."""
    return [
        {
            "type": "value",
            "options": {
                str(v): {"text": text, "color": color, "index": i} for i, (v, text, color) in enumerate(entries)
            },
        }
    ]


class Builder:
    def __init__(self):
        self.panels = []
        self.next_id = 1
        self.y = 0  # top of the current line of panels
        self.x = 0
        self.line_h = 0

    def _place(self, w, h):
        if self.x + w > 24:
            self.y += self.line_h
            self.x, self.line_h = 0, 0
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.line_h = max(self.line_h, h)
        return pos

    def _id(self):
        i = self.next_id
        self.next_id += 1
        return i

    def row(self, title):
        if self.x:
            self.y += self.line_h
            self.x, self.line_h = 0, 0
        self.panels.append(
            {
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "id": self._id(),
                "panels": [],
                "title": title,
                "type": "row",
            }
        )
        self.y += 1

    def _panel(self, kind, title, desc, w, h, targets, options, defaults, overrides=None):
        refs = "ABCDEFGH"
        self.panels.append(
            {
                "datasource": DS,
                "description": desc,
                "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
                "gridPos": self._place(w, h),
                "id": self._id(),
                "options": options,
                "targets": [dict(t, refId=refs[i]) for i, t in enumerate(targets)],
                "title": title,
                "type": kind,
            }
        )

    def timeseries(self, title, desc, targets, unit="short", w=12, h=8, stack=False, step=False,
                   axis_label="", min0=True, legend_calcs=("mean", "max", "lastNotNull"), overrides=None):
        custom = {
            "axisBorderShow": False,
            "axisCenteredZero": False,
            "axisColorMode": "text",
            "axisLabel": axis_label,
            "axisPlacement": "auto",
            "barAlignment": 0,
            "drawStyle": "line",
            "fillOpacity": 30 if stack else 10,
            "gradientMode": "none",
            "hideFrom": {"legend": False, "tooltip": False, "viz": False},
            "insertNulls": False,
            "lineInterpolation": "stepAfter" if step else "linear",
            "lineWidth": 1,
            "pointSize": 4,
            "scaleDistribution": {"type": "linear"},
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"group": "A", "mode": "normal" if stack else "none"},
            "thresholdsStyle": {"mode": "off"},
        }
        defaults = {
            "color": {"mode": "palette-classic"},
            "custom": custom,
            "mappings": [],
            "thresholds": thresholds(("green", None)),
            "unit": unit,
        }
        if min0:
            defaults["min"] = 0
        options = {
            "legend": {
                "calcs": list(legend_calcs),
                "displayMode": "table",
                "placement": "bottom",
                "showLegend": True,
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
        self._panel("timeseries", title, desc, w, h, targets, options, defaults, overrides)

    def stat(self, title, desc, targets, unit="short", w=4, h=4, mappings=None, steps=(("green", None),),
             text_mode="auto", color_mode="value", graph="none", decimals=None, calc="lastNotNull"):
        defaults = {
            "color": {"mode": "thresholds"},
            "mappings": mappings or [],
            "thresholds": thresholds(*steps),
            "unit": unit,
        }
        if decimals is not None:
            defaults["decimals"] = decimals
        options = {
            "colorMode": color_mode,
            "graphMode": graph,
            "justifyMode": "auto",
            "orientation": "auto",
            "percentChangeColorMode": "standard",
            "reduceOptions": {"calcs": [calc], "fields": "", "values": False},
            "showPercentChange": False,
            "textMode": text_mode,
            "wideLayout": True,
        }
        self._panel("stat", title, desc, w, h, targets, options, defaults)

    def state_timeline(self, title, desc, targets, mappings, w=24, h=5):
        defaults = {
            "color": {"mode": "thresholds"},
            "custom": {"fillOpacity": 80, "hideFrom": {"legend": False, "tooltip": False, "viz": False},
                       "lineWidth": 0},
            "mappings": mappings,
            "thresholds": thresholds(("text", None)),
        }
        options = {
            "alignValue": "left",
            "legend": {"calcs": [], "displayMode": "list", "placement": "bottom", "showLegend": True},
            "mergeValues": True,
            "rowHeight": 0.9,
            "showValue": "auto",
            "tooltip": {"mode": "single", "sort": "none"},
        }
        self._panel("state-timeline", title, desc, w, h, targets, options, defaults)

    def heatmap(self, title, desc, targets, unit="s", w=12, h=8):
        defaults = {
            "custom": {
                "hideFrom": {"legend": False, "tooltip": False, "viz": False},
                "scaleDistribution": {"type": "linear"},
            }
        }
        options = {
            "calculate": False,
            "cellGap": 1,
            "cellValues": {"unit": "short"},
            "color": {
                "exponent": 0.5,
                "fill": "dark-orange",
                "mode": "scheme",
                "reverse": False,
                "scale": "exponential",
                "scheme": "Oranges",
                "steps": 64,
            },
            "exemplars": {"color": "rgba(255,0,255,0.7)"},
            "filterValues": {"le": 1e-9},
            "legend": {"show": True},
            "rowsFrame": {"layout": "auto"},
            "selectionMode": "x",
            "showValue": "never",
            "tooltip": {"mode": "single", "showColorScale": False, "yHistogram": True},
            "yAxis": {"axisPlacement": "left", "reverse": False, "unit": unit},
        }
        self._panel("heatmap", title, desc, w, h, targets, options, defaults)


def dashboard(uid, title, desc, tags, panels):
    return {
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": desc,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [
            {
                "asDropdown": False,
                "icon": "dashboard",
                "includeVars": True,
                "keepTime": True,
                "tags": ["pageserver"],
                "targetBlank": False,
                "title": "pageserver",
                "tooltip": "",
                "type": "dashboards",
                "url": "",
            }
        ],
        "liveNow": False,
        "panels": panels,
        "refresh": "10s",
        "schemaVersion": 39,
        "tags": tags,
        "templating": {
            "list": [
                {
                    "hide": 0,
                    "includeAll": False,
                    "label": "Data source",
                    "multi": False,
                    "name": "datasource",
                    "options": [],
                    "query": "prometheus",
                    "refresh": 1,
                    "regex": "",
                    "skipUrlSync": False,
                    "type": "datasource",
                },
                {
                    "allValue": ".*",
                    "datasource": DS,
                    "hide": 0,
                    "includeAll": True,
                    "label": "VM",
                    "multi": True,
                    "name": "vm",
                    "options": [],
                    "query": "label_values(pageserver_build_info, vm)",
                    "refresh": 2,
                    "regex": "",
                    "skipUrlSync": False,
                    "sort": 1,
                    "type": "query",
                },
            ]
        },
        "time": {"from": "now-30m", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": title,
        "uid": uid,
        "version": 1,
        "weekStart": "",
    }


PHASES = [
    # (ordinal, phase label value, colour)
    (1, "waiting-for-handoff", "blue"),
    (2, "precopy", "purple"),
    (3, "precopy-converged", "yellow"),
    (4, "postcopy", "orange"),
    (5, "complete", "green"),
    (6, "failed", "red"),
]
# The current phase of each VM as one number (the gauge is 1 for the current
# phase and 0 for the others), so that one series per VM carries it.
PHASE_EXPR = "sum by (vm) (\n  " + "\n  or ".join(
    "%s * %d" % (sel("pageserver_target_phase", 'phase="%s"' % p), n) for n, p, _ in PHASES
) + "\n)"
PHASE_MAPPINGS = value_mappings([(n, p, c) for n, p, c in PHASES])

BUILD_INFO_DESC = "Versions of the agents serving the selected VMs (pageserver_build_info)."


def target_dashboard():
    b = Builder()
    b.row("Migration")
    b.stat("Phase", "Current migration phase of the target agent (pageserver_target_phase).",
           [target("A", PHASE_EXPR, "{{vm}}", instant=True)], unit="none", w=5,
           mappings=PHASE_MAPPINGS, color_mode="background")
    b.stat("Source reachable", "Whether the target agent can reach the source agent "
           "(pageserver_target_source_up). Down during post-copy freezes faults on stale pages.",
           [target("A", "min by (vm) (%s)" % sel("pageserver_target_source_up"), "{{vm}}", instant=True)],
           unit="none", w=4, color_mode="background", steps=(("red", None), ("green", 1)),
           mappings=value_mappings([(0, "DOWN", "red"), (1, "UP", "green")]))
    b.stat("Stale pages at switchover", "Pages the final bitmap (taken while the source is paused) "
           "reported dirty since the last pre-copy round: what post-copy must still fetch.",
           [target("A", "max by (vm) (%s)" % sel("pageserver_target_stale_pages_at_switchover"), "{{vm}}",
                   instant=True)], w=4)
    b.stat("Faults waiting", "Guest page faults blocked right now, waiting for a page from the source.",
           [target("A", "sum by (vm) (%s)" % sel("pageserver_target_faults_waiting"), "{{vm}}", instant=True)],
           w=4, steps=(("green", None), ("orange", 1)), graph="area")
    b.stat("Pre-copy rounds", "Pre-copy rounds run (round 0 sends every page).",
           [target("A", "max by (vm) (%s)" % sel("pageserver_target_precopy_rounds_total"), "{{vm}}",
                   instant=True)], w=3)
    b.stat("Versions", BUILD_INFO_DESC,
           [target("A", "max by (agent, version) (%s)" % sel("pageserver_build_info"),
                   "{{agent}} {{version}}", instant=True)], unit="none", w=4, text_mode="name")
    b.state_timeline("Phase over time", "Migration phase of each VM over time.",
                     [target("A", PHASE_EXPR, "{{vm}}")], PHASE_MAPPINGS)
    b.timeseries("Pages by state (migration progress)",
                 "Guest pages in each state: unknown (before the final bitmap), fresh, stale, being fetched, "
                 "installed. Post-copy is done when every page is installed.",
                 [target("A", "sum by (vm, state) (%s)" % sel("pageserver_target_pages"), "{{vm}} {{state}}")],
                 stack=True, axis_label="pages")
    b.timeseries("Dirty pages per pre-copy round",
                 "Dirty set of the latest pre-copy round (pageserver_target_precopy_dirty_pages); pre-copy "
                 "converges as it shrinks. The transfer rate of pre-copy pages is on the right axis.",
                 [target("A", "max by (vm) (%s)" % sel("pageserver_target_precopy_dirty_pages"),
                         "{{vm}} dirty pages (latest round)"),
                  target("B", "sum by (vm) (%s)" % rate("pageserver_target_precopy_pages_total"),
                         "{{vm}} pre-copy pages/s")],
                 step=True, axis_label="pages",
                 overrides=[{"matcher": {"id": "byRegexp", "options": ".*pages/s$"},
                             "properties": [{"id": "custom.axisPlacement", "value": "right"},
                                            {"id": "custom.axisLabel", "value": "pages/s"},
                                            {"id": "custom.lineInterpolation", "value": "linear"}]}])

    b.row("Page faults (post-copy)")
    b.heatmap("Fault latency",
              "Time from a guest page fault to the page being mapped, all resolutions "
              "(pageserver_target_fault_latency_seconds, buckets from 1 µs to 1 s).",
              [target("A", "sum by (le) (%s)" % rate("pageserver_target_fault_latency_seconds_bucket"),
                      "{{le}}", fmt="heatmap")])
    b.timeseries("Fault latency p50 / p99 by resolution",
                 "fresh: mapped at once; fetched: stale or unknown, fetched from the source first; "
                 "missing: a hole known fresh, zero-filled.",
                 [target("A", quantile("0.5", "pageserver_target_fault_latency_seconds", ["vm", "resolution"]),
                         "{{vm}} p50 {{resolution}}"),
                  target("B", quantile("0.99", "pageserver_target_fault_latency_seconds", ["vm", "resolution"]),
                         "{{vm}} p99 {{resolution}}")],
                 unit="s", min0=False)
    b.timeseries("Faults/s by resolution", "Guest page faults served per second, by how they were resolved.",
                 [target("A", "sum by (vm, resolution) (%s)" % rate("pageserver_target_faults_total"),
                         "{{vm}} {{resolution}}")],
                 unit="ops", w=8, stack=True, axis_label="faults/s")
    b.timeseries("Fault latency p99 by state known",
                 "Faults on pages whose state was not yet known (before the final bitmap) always go to the "
                 "source.",
                 [target("A", quantile("0.99", "pageserver_target_fault_latency_seconds", ["vm", "state_known"]),
                         "{{vm}} p99 state_known={{state_known}}")],
                 unit="s", w=8, min0=False)
    b.timeseries("Faults waiting", "Guest page faults blocked on a fetch from the source.",
                 [target("A", "sum by (vm) (%s)" % sel("pageserver_target_faults_waiting"), "{{vm}}")],
                 w=8, axis_label="faults")

    b.row("Transfer from the source")
    b.timeseries("Pages fetched/s: demand vs background",
                 "Pages fetched after switchover: by faults (demand) and by the background pull; "
                 "'unknown' is the part fetched while the page's state was not yet known.",
                 [target("A", "sum by (vm, origin) (%s)" % rate("pageserver_target_pages_fetched_total"),
                         "{{vm}} {{origin}}"),
                  target("B", "sum by (vm) (%s)\nor\nsum by (vm) (%s) * 0" % (
                      rate("pageserver_target_pages_fetched_unknown_total"),
                      rate("pageserver_target_pages_fetched_total")), "{{vm}} of which unknown")],
                 w=8, axis_label="pages/s")
    b.timeseries("Bytes received/s", "Bytes received from the source agent (pre-copy and post-copy).",
                 [target("A", "sum by (vm) (%s)" % rate("pageserver_target_bytes_received_total"), "{{vm}}")],
                 unit="Bps", w=8)
    b.timeseries("Fetch latency p50 / p99", "Round trip of a page fetch from the source agent.",
                 [target("A", quantile("0.5", "pageserver_target_fetch_latency_seconds", ["vm"]), "{{vm}} p50"),
                  target("B", quantile("0.99", "pageserver_target_fetch_latency_seconds", ["vm"]), "{{vm}} p99")],
                 unit="s", w=8, min0=False)
    b.timeseries("Pages installed in bulk/s",
                 "Fresh pages mapped by the bulk install after the final bitmap (one UFFDIO_CONTINUE per run).",
                 [target("A", "sum by (vm) (%s)" % rate("pageserver_target_pages_installed_bulk_total"),
                         "{{vm}}")],
                 w=12, axis_label="pages/s")
    b.timeseries("Pre-copy pages/s", "Pages transferred by pre-copy rounds.",
                 [target("A", "sum by (vm) (%s)" % rate("pageserver_target_precopy_pages_total"), "{{vm}}")],
                 w=12, axis_label="pages/s")
    return dashboard(
        "pageserver-target",
        "pageserver / target agent",
        "Post-copy live migration, target side: pre-copy progress, switchover, guest page faults, "
        "fetches from the source. Metrics of target-agent (job pageserver-target).",
        ["pageserver", "migration"],
        b.panels,
    )


SRC_LAT = "pageserver_source_request_duration_seconds"


def source_dashboard():
    b = Builder()
    b.row("State")
    b.stat("Paused", "Whether the source VM is paused (SetPaused; also 1 when its VMM is gone or a memory "
           "file is served): then its final bitmap can be taken and every page it serves is final.",
           [target("A", "max by (vm) (%s)" % sel("pageserver_source_paused"), "{{vm}}", instant=True)],
           unit="none", w=6, color_mode="background", steps=(("green", None), ("orange", 1)),
           mappings=value_mappings([(0, "running", "green"), (1, "paused", "orange")]))
    b.stat("Epoch", "The newest complete dirty-tracking epoch.",
           [target("A", "max by (vm) (%s)" % sel("pageserver_source_epoch"), "{{vm}}", instant=True)],
           unit="none", w=6, graph="area")
    b.stat("Requests/s", "All RPCs served per second.",
           [target("A", "sum by (vm) (%s)" % rate(SRC_LAT + "_count"), "{{vm}}")],
           unit="reqps", w=6, graph="area", calc="mean")
    b.stat("Versions", BUILD_INFO_DESC,
           [target("A", "max by (agent, version) (%s)" % sel("pageserver_build_info"),
                   "{{agent}} {{version}}", instant=True)], unit="none", w=6, text_mode="name")

    b.row("RPCs")
    b.timeseries("RPC latency p50 / p99", "Server-side duration of each RPC "
                 "(GetPages: of each request inside the stream).",
                 [target("A", quantile("0.5", SRC_LAT, ["vm", "rpc"]), "{{vm}} p50 {{rpc}}"),
                  target("B", quantile("0.99", SRC_LAT, ["vm", "rpc"]), "{{vm}} p99 {{rpc}}")],
                 unit="s", min0=False)
    b.timeseries("Requests/s by RPC", "RPCs served per second, and the ones rejected (bad input, "
                 "wrong state, limits).",
                 [target("A", "sum by (vm, rpc) (%s)" % rate(SRC_LAT + "_count"), "{{vm}} {{rpc}}"),
                  target("B", "sum by (vm, rpc) (%s)\nor\nsum by (vm, rpc) (%s) * 0" % (
                      rate("pageserver_source_requests_rejected_total"), rate(SRC_LAT + "_count")),
                         "{{vm}} {{rpc}} rejected")],
                 unit="reqps",
                 overrides=[{"matcher": {"id": "byRegexp", "options": ".* rejected$"},
                             "properties": [{"id": "custom.lineStyle",
                                             "value": {"dash": [10, 10], "fill": "dash"}},
                                            {"id": "color", "value": {"fixedColor": "red", "mode": "fixed"}}]}])

    b.row("Pages served")
    b.timeseries("Pages served/s", "Pages sent to the target (GetPage, GetPages), and of those the zero "
                 "pages (holes).",
                 [target("A", "sum by (vm) (%s)" % rate("pageserver_source_pages_served_total"), "{{vm}} pages"),
                  target("B", "sum by (vm) (%s)\nor\nsum by (vm) (%s) * 0" % (
                      rate("pageserver_source_zero_pages_served_total"),
                      rate("pageserver_source_pages_served_total")), "{{vm}} of which zero")],
                 axis_label="pages/s")
    b.timeseries("Bytes served/s", "Page bytes sent to the target.",
                 [target("A", "sum by (vm) (%s)" % rate("pageserver_source_bytes_served_total"), "{{vm}}")],
                 unit="Bps")

    b.row("Dirty tracking")
    b.timeseries("Dirty scan duration p50 / p99", "Time of one PAGEMAP_SCAN pass over the guest memory "
                 "(collects and re-protects the pages written since the last epoch).",
                 [target("A", quantile("0.5", "pageserver_source_dirty_scan_duration_seconds", ["vm"]),
                         "{{vm}} p50"),
                  target("B", quantile("0.99", "pageserver_source_dirty_scan_duration_seconds", ["vm"]),
                         "{{vm}} p99")],
                 unit="s", w=8, min0=False)
    b.timeseries("Dirty pages per scan", "Pages one scan found dirty: mean and p99 over the interval.",
                 [target("A", "sum by (vm) (%s)\n/\nsum by (vm) (%s)" % (
                     rate("pageserver_source_dirty_scan_pages_sum"),
                     rate("pageserver_source_dirty_scan_pages_count")), "{{vm}} mean"),
                  target("B", quantile("0.99", "pageserver_source_dirty_scan_pages", ["vm"]), "{{vm}} p99")],
                 w=8, axis_label="pages")
    b.timeseries("Epoch and paused", "Dirty-tracking epoch (left) and paused state (right, 1 = paused).",
                 [target("A", "max by (vm) (%s)" % sel("pageserver_source_epoch"), "{{vm}} epoch"),
                  target("B", "max by (vm) (%s)" % sel("pageserver_source_paused"), "{{vm}} paused")],
                 w=8, step=True, legend_calcs=("lastNotNull",),
                 overrides=[{"matcher": {"id": "byRegexp", "options": ".* paused$"},
                             "properties": [{"id": "custom.axisPlacement", "value": "right"},
                                            {"id": "max", "value": 1},
                                            {"id": "custom.fillOpacity", "value": 30}]}])
    return dashboard(
        "pageserver-source",
        "pageserver / source agent",
        "Post-copy live migration, source side: RPCs served to the target, pages and bytes served, dirty "
        "tracking. Metrics of source-agent (job pageserver-source).",
        ["pageserver", "migration"],
        b.panels,
    )


def render(d):
    return json.dumps(d, indent=2, ensure_ascii=False) + "\n"


def main():
    check = "--check" in sys.argv[1:]
    stale = []
    for name, d in (("pageserver-target.json", target_dashboard()), ("pageserver-source.json", source_dashboard())):
        path = os.path.join(HERE, name)
        text = render(d)
        if check:
            try:
                with open(path, encoding="utf-8") as f:
                    if f.read() != text:
                        stale.append(name)
            except FileNotFoundError:
                stale.append(name)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
    if stale:
        print("generate.py: out of date (run python3 dashboards/generate.py): " + ", ".join(stale), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
