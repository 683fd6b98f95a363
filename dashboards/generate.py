#!/usr/bin/env python3
"""Writes the Grafana dashboards pageserver-target.json and pageserver-source.json.

The JSON files are generated: edit this file, then run

    python3 dashboards/generate.py          # rewrite both dashboards
    python3 dashboards/generate.py --check  # exit 1 if a committed file differs

The dashboards are built with Grafana's own typed builders: the
grafana-foundation-sdk package (PyPI) at exactly SDK_VERSION below, which
check.sh installs when missing. That is the newest release whose builders
write schemaVersion 39, the version Grafana 10.4 saves: Grafana 10.4 loads
these dashboards as they are, newer versions migrate them when loading (the
SDK's 11.6 builders and later write 41, which Grafana 10.4 does not know).

Every query filters on vm=~"$vm", every panel and target uses the
${datasource} variable, every rate() uses $__rate_interval (dashboards/lint.py
checks all three, and check.sh type-checks the output against @grafana/schema).
"""
import importlib.metadata
import os
import sys

# The SDK's release for Grafana 11.5 (its versions are <build>!<Grafana version>);
# check.sh installs exactly this one.
SDK_VERSION = "1769699452!11.5.0"

INSTALL_HINT = (
    "install it with\n"
    "  python3 -m pip install 'grafana-foundation-sdk==%s'\n"
    "(add --break-system-packages for Debian's own python3; dashboards/check.sh does this itself)" % SDK_VERSION
)
try:
    installed = importlib.metadata.version("grafana-foundation-sdk")
except importlib.metadata.PackageNotFoundError:
    installed = None
if installed != SDK_VERSION:
    # Another version may write other JSON, and --check would then fail.
    print("generate.py: needs grafana-foundation-sdk==%s (%s); %s" % (
        SDK_VERSION, "found %s" % installed if installed else "not installed", INSTALL_HINT), file=sys.stderr)
    sys.exit(2)

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, statetimeline, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import heatmap as hm
from grafana_foundation_sdk.models import prometheus as pm
from grafana_foundation_sdk.models import units

HERE = os.path.dirname(os.path.abspath(__file__))
V = 'vm=~"$vm"'
RI = "$__rate_interval"


def ds():
    """The dashboard's data source: whatever the `datasource` variable selects."""
    return dm.DataSourceRef(type_val="prometheus", uid="${datasource}")


def sel(metric, extra=""):
    """A selector of `metric` filtered on the vm variable (plus `extra` matchers)."""
    return "%s{%s%s}" % (metric, V, ("," + extra) if extra else "")


def rate(metric, extra=""):
    return "rate(%s[%s])" % (sel(metric, extra), RI)


def quantile(q, metric, by):
    return "histogram_quantile(%s, sum by (%s) (%s))" % (q, ", ".join(by + ["le"]), rate(metric + "_bucket"))


def query(ref, expr, legend="__auto", instant=False, fmt=None):
    q = (
        prometheus.Dataquery()
        .ref_id(ref)
        .datasource(ds())
        .editor_mode(pm.QueryEditorMode.CODE)
        .expr(expr)
        .legend_format(legend)
    )
    q = q.instant() if instant else q.range()
    return q.format(fmt) if fmt else q


def thresholds(*steps):
    """steps: (color, value|None) pairs; the first value is None (-Infinity)."""
    return (
        db.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=v, color=c) for c, v in steps])
    )


def value_mappings(entries):
    """entries: [(value, text, color)] -> one `value` mapping."""
    return [
        dm.ValueMap(
            options={str(v): dm.ValueMappingResult(text=t, color=c, index=i) for i, (v, t, c) in enumerate(entries)}
        )
    ]


def hide_nothing():
    return cb.HideSeriesConfig().legend(False).tooltip(False).viz(False)


def placed(panel, title, desc, targets, w, h):
    """`panel` (a builder) with what every panel has: title, description, the
    data source variable, its size and its queries."""
    return panel.title(title).description(desc).datasource(ds()).span(w).height(h).targets(targets)


def timeseries_panel(title, desc, targets, unit=units.Short, w=12, h=8, stack=False, step=False,
                     axis_label="", min0=True, legend_calcs=("mean", "max", "lastNotNull"),
                     steps=(("green", None),), thresholds_style=cm.GraphThresholdsStyleMode.OFF):
    p = (
        placed(timeseries.Panel(), title, desc, targets, w, h)
        .unit(unit)
        .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.PALETTE_CLASSIC))
        .mappings([])
        .thresholds(thresholds(*steps))
        .axis_border_show(False)
        .axis_centered_zero(False)
        .axis_color_mode(cm.AxisColorMode.TEXT)
        .axis_label(axis_label)
        .axis_placement(cm.AxisPlacement.AUTO)
        .bar_alignment(cm.BarAlignment.CENTER)
        .draw_style(cm.GraphDrawStyle.LINE)
        .fill_opacity(30 if stack else 10)
        .gradient_mode(cm.GraphGradientMode.NONE)
        .hide_from(hide_nothing())
        .insert_nulls(False)
        .line_interpolation(cm.LineInterpolation.STEP_AFTER if step else cm.LineInterpolation.LINEAR)
        .line_width(1)
        .point_size(4)
        .scale_distribution(cb.ScaleDistributionConfig().type(cm.ScaleDistribution.LINEAR))
        .show_points(cm.VisibilityMode.NEVER)
        .span_nulls(False)
        .stacking(cb.StackingConfig().group("A").mode(cm.StackingMode.NORMAL if stack else cm.StackingMode.NONE))
        .thresholds_style(cb.GraphThresholdsStyleConfig().mode(thresholds_style))
        .legend(
            cb.VizLegendOptions()
            .calcs(list(legend_calcs))
            .display_mode(cm.LegendDisplayMode.TABLE)
            .placement(cm.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING))
        .overrides([])
    )
    return p.min(0) if min0 else p


def stat_panel(title, desc, targets, unit=units.Short, w=4, h=4, mappings=(), steps=(("green", None),),
               text_mode=cm.BigValueTextMode.AUTO, color_mode=cm.BigValueColorMode.VALUE,
               graph=cm.BigValueGraphMode.NONE, calc="lastNotNull"):
    return (
        placed(stat.Panel(), title, desc, targets, w, h)
        .unit(unit)
        .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
        .mappings(list(mappings))
        .thresholds(thresholds(*steps))
        .overrides([])
        .color_mode(color_mode)
        .graph_mode(graph)
        .justify_mode(cm.BigValueJustifyMode.AUTO)
        .orientation(cm.VizOrientation.AUTO)
        .reduce_options(cb.ReduceDataOptions().calcs([calc]).fields("").values(False))
        .show_percent_change(False)
        .percent_change_color_mode(cm.PercentChangeColorMode.STANDARD)
        .text_mode(text_mode)
        .wide_layout(True)
    )


def state_timeline_panel(title, desc, targets, mappings, w=24, h=5):
    return (
        placed(statetimeline.Panel(), title, desc, targets, w, h)
        .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
        .mappings(mappings)
        .thresholds(thresholds(("text", None)))
        .overrides([])
        .fill_opacity(80)
        .hide_from(hide_nothing())
        .line_width(0)
        .align_value(cm.TimelineValueAlignment.LEFT)
        .legend(
            cb.VizLegendOptions()
            .calcs([])
            .display_mode(cm.LegendDisplayMode.LIST)
            .placement(cm.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .merge_values(True)
        .row_height(0.9)
        .show_value(cm.VisibilityMode.AUTO)
        .tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.SINGLE).sort(cm.SortOrder.NONE))
    )


def heatmap_panel(title, desc, targets, unit=units.Seconds, w=12, h=8):
    return (
        placed(heatmap.Panel(), title, desc, targets, w, h)
        .hide_from(hide_nothing())
        .scale_distribution(cb.ScaleDistributionConfig().type(cm.ScaleDistribution.LINEAR))
        .overrides([])
        .calculate(False)
        .cell_gap(1)
        .cell_values(heatmap.CellValues().unit(units.Short))
        .color(
            heatmap.HeatmapColorOptions()
            .exponent(0.5)
            .fill("dark-orange")
            .mode(hm.HeatmapColorMode.SCHEME)
            .reverse(False)
            .scale(hm.HeatmapColorScale.EXPONENTIAL)
            .scheme("Oranges")
            .steps(64)
        )
        .exemplars_color("rgba(255,0,255,0.7)")
        .filter_values(heatmap.FilterValueRange().le(1e-9))
        .show_legend()
        .rows_frame(heatmap.RowsHeatmapOptions().layout(cm.HeatmapCellLayout.AUTO))
        .selection_mode(hm.HeatmapSelectionMode.X)
        .show_value(cm.VisibilityMode.NEVER)
        .mode(cm.TooltipDisplayMode.SINGLE)
        .show_color_scale(False)
        .show_y_histogram()
        .y_axis(heatmap.YAxisConfig().axis_placement(cm.AxisPlacement.LEFT).reverse(False).unit(unit))
    )


def axis_right(label=None):
    """Override properties: the matched series on a right-hand axis."""
    props = [dm.DynamicConfigValue(id_val="custom.axisPlacement", value=cm.AxisPlacement.RIGHT)]
    if label:
        props.append(dm.DynamicConfigValue(id_val="custom.axisLabel", value=label))
    return props


class Board:
    """A dashboard builder that numbers its rows and panels 1, 2, … in the
    order they are added. The SDK's Dashboard builder places them on the grid
    (left to right, a new line once 24 columns are full, rows below the
    tallest panel) but leaves ids to us. It does not move a panel that is too
    wide for what is left of a line to the next one: the widths of each line
    must add up to 24 (lint.py rejects a panel past column 24)."""

    def __init__(self, uid, title, desc):
        self.next_id = 1
        self.ids = set()
        self.builder = (
            db.Dashboard(title)
            .uid(uid)
            .description(desc)
            .tags(["pageserver", "migration"])
            .editable()
            .fiscal_year_start_month(0)
            .tooltip(dm.DashboardCursorSync.CROSSHAIR)
            .live_now(False)
            .refresh("10s")
            .time("now-30m", "now")
            .timezone("")
            .week_start("")
            .version(1)
            .annotation(
                db.AnnotationQuery()
                .built_in(1)
                .datasource(dm.DataSourceRef(type_val="grafana", uid="-- Grafana --"))
                .enable(True)
                .hide(True)
                .icon_color("rgba(0, 211, 255, 1)")
                .name("Annotations & Alerts")
                .type("dashboard")
            )
            .link(
                db.DashboardLink("pageserver")
                .type(dm.DashboardLinkType.DASHBOARDS)
                .icon("dashboard")
                .tags(["pageserver"])
                .as_dropdown(False)
                .include_vars(True)
                .keep_time(True)
                .target_blank(False)
                .tooltip("")
                .url("")
            )
            .with_variable(
                db.DatasourceVariable("datasource")
                .label("Data source")
                .type("prometheus")
                .hide(dm.VariableHide.DONT_HIDE)
                .include_all(False)
                .multi(False)
                .regex("")
            )
            .with_variable(
                db.QueryVariable("vm")
                .label("VM")
                .datasource(ds())
                .query("label_values(pageserver_build_info, vm)")
                .hide(dm.VariableHide.DONT_HIDE)
                .include_all(True)
                .all_value(".*")
                .multi(True)
                .options([])
                .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
                .regex("")
                .sort(dm.VariableSort.ALPHABETICAL_ASC)
            )
        )

    def _id(self, pid):
        if pid is None:
            pid, self.next_id = self.next_id, self.next_id + 1
        if pid in self.ids:
            raise ValueError("panel id %d used twice" % pid)
        self.ids.add(pid)
        return pid

    def row(self, title):
        self.builder.with_row(db.Row(title).id(self._id(None)))

    def panel(self, p, pid=None):
        """Adds panel builder `p`; `pid` keeps a panel added later from
        renumbering the ones after it (links point at panel ids)."""
        self.builder.with_panel(p.id(self._id(pid)))

    def build(self):
        d = self.builder.build()
        # The SDK's variable model writes an interval variable's auto,
        # auto_min and auto_count on every variable; Grafana's schema has
        # them on none of ours (tsc --strict in check.sh rejects them).
        for v in d.templating.list_val:
            v.auto = v.auto_min = v.auto_count = None
        return d


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


def phase_mappings():
    return value_mappings([(n, p, c) for n, p, c in PHASES])


BUILD_INFO_DESC = "Versions of the agents serving the selected VMs (pageserver_build_info)."


def target_dashboard():
    b = Board(
        "pageserver-target",
        "pageserver / target agent",
        "Post-copy live migration, target side: pre-copy progress, switchover, guest page faults, "
        "fetches from the source. Metrics of target-agent (job pageserver-target).",
    )
    b.row("Migration")
    b.panel(stat_panel(
        "Phase", "Current migration phase of the target agent (pageserver_target_phase).",
        [query("A", PHASE_EXPR, "{{vm}}", instant=True)], unit=units.NoUnit, w=5,
        mappings=phase_mappings(), color_mode=cm.BigValueColorMode.BACKGROUND))
    b.panel(stat_panel(
        "Source reachable", "Whether the target agent can reach the source agent "
        "(pageserver_target_source_up). Down during post-copy freezes faults on stale pages.",
        [query("A", "min by (vm) (%s)" % sel("pageserver_target_source_up"), "{{vm}}", instant=True)],
        unit=units.NoUnit, w=4, color_mode=cm.BigValueColorMode.BACKGROUND, steps=(("red", None), ("green", 1)),
        mappings=value_mappings([(0, "DOWN", "red"), (1, "UP", "green")])))
    b.panel(stat_panel(
        "Stale pages at switchover", "Pages the final bitmap (taken while the source is paused) "
        "reported dirty since the last pre-copy round: what post-copy must still fetch.",
        [query("A", "max by (vm) (%s)" % sel("pageserver_target_stale_pages_at_switchover"), "{{vm}}",
               instant=True)], w=4))
    b.panel(stat_panel(
        "Faults waiting", "Guest page faults blocked right now, waiting for a page from the source.",
        [query("A", "sum by (vm) (%s)" % sel("pageserver_target_faults_waiting"), "{{vm}}", instant=True)],
        w=4, steps=(("green", None), ("orange", 1)), graph=cm.BigValueGraphMode.AREA))
    b.panel(stat_panel(
        "Pre-copy rounds", "Pre-copy rounds run (round 0 sends every page).",
        [query("A", "max by (vm) (%s)" % sel("pageserver_target_precopy_rounds_total"), "{{vm}}",
               instant=True)], w=3))
    b.panel(stat_panel(
        "Versions", BUILD_INFO_DESC,
        [query("A", "max by (agent, version) (%s)" % sel("pageserver_build_info"), "{{agent}} {{version}}",
               instant=True)], unit=units.NoUnit, w=4, text_mode=cm.BigValueTextMode.NAME))
    b.panel(state_timeline_panel(
        "Phase over time", "Migration phase of each VM over time.",
        [query("A", PHASE_EXPR, "{{vm}}")], phase_mappings()))
    b.panel(timeseries_panel(
        "Pages by state (migration progress)",
        "Guest pages in each state: unknown (before the final bitmap), fresh, stale, being fetched, "
        "installed. Post-copy is done when every page is installed.",
        [query("A", "sum by (vm, state) (%s)" % sel("pageserver_target_pages"), "{{vm}} {{state}}")],
        stack=True, axis_label="pages"))
    b.panel(timeseries_panel(
        "Dirty pages per pre-copy round",
        "Dirty set of the latest pre-copy round (pageserver_target_precopy_dirty_pages); pre-copy "
        "converges as it shrinks. The transfer rate of pre-copy pages is on the right axis.",
        [query("A", "max by (vm) (%s)" % sel("pageserver_target_precopy_dirty_pages"),
               "{{vm}} dirty pages (latest round)"),
         query("B", "sum by (vm) (%s)" % rate("pageserver_target_precopy_pages_total"), "{{vm}} pre-copy pages/s")],
        step=True, axis_label="pages")
        .override_by_regexp(".*pages/s$", axis_right("pages/s") + [
            dm.DynamicConfigValue(id_val="custom.lineInterpolation", value=cm.LineInterpolation.LINEAR)]))

    b.row("Page faults (post-copy)")
    b.panel(heatmap_panel(
        "Fault latency",
        "Time from a guest page fault to the page being mapped, all resolutions "
        "(pageserver_target_fault_latency_seconds, buckets from 1 µs to 1 s).",
        [query("A", "sum by (le) (%s)" % rate("pageserver_target_fault_latency_seconds_bucket"), "{{le}}",
               fmt=pm.PromQueryFormat.HEATMAP)]))
    b.panel(timeseries_panel(
        "Fault latency p50 / p99 by resolution",
        "fresh: mapped at once; fetched: stale or unknown, fetched from the source first; "
        "missing: a hole known fresh, zero-filled.",
        [query("A", quantile("0.5", "pageserver_target_fault_latency_seconds", ["vm", "resolution"]),
               "{{vm}} p50 {{resolution}}"),
         query("B", quantile("0.99", "pageserver_target_fault_latency_seconds", ["vm", "resolution"]),
               "{{vm}} p99 {{resolution}}")],
        unit=units.Seconds, min0=False))
    b.panel(timeseries_panel(
        "Faults/s by resolution", "Guest page faults served per second, by how they were resolved.",
        [query("A", "sum by (vm, resolution) (%s)" % rate("pageserver_target_faults_total"), "{{vm}} {{resolution}}")],
        unit=units.OpsPerSecond, stack=True, axis_label="faults/s"))
    b.panel(timeseries_panel(
        "Fault latency p99 by state known",
        "Faults on pages whose state was not yet known (before the final bitmap) always go to the source.",
        [query("A", quantile("0.99", "pageserver_target_fault_latency_seconds", ["vm", "state_known"]),
               "{{vm}} p99 state_known={{state_known}}")],
        unit=units.Seconds, min0=False))
    b.panel(timeseries_panel(
        "Faults waiting", "Guest page faults blocked on a fetch from the source.",
        [query("A", "sum by (vm) (%s)" % sel("pageserver_target_faults_waiting"), "{{vm}}")],
        axis_label="faults"))
    b.panel(timeseries_panel(
        "Faults blocked by reason",
        "Guest page faults the target agent read and will not resolve (pageserver_target_faults_blocked), "
        "by reason: outside_regions, install_failed, source_refused, source_unreachable, fault_loop_stopped, "
        "migration_failed. The vCPUs behind "
        "them stay frozen rather than get a wrong page; anything above 0 fires PageserverFaultsBlocked. "
        "The target agent's status and log say why.",
        [query("A", "sum by (vm, reason) (%s)" % sel("pageserver_target_faults_blocked"), "{{vm}} {{reason}}")],
        step=True, axis_label="faults", steps=(("green", None), ("red", 1)),
        thresholds_style=cm.GraphThresholdsStyleMode.DASHED),
        pid=23)

    b.row("Transfer from the source")
    b.panel(timeseries_panel(
        "Pages fetched/s: demand vs background",
        "Pages fetched after switchover: by faults (demand) and by the background pull; "
        "'unknown' is the part fetched while the page's state was not yet known.",
        [query("A", "sum by (vm, origin) (%s)" % rate("pageserver_target_pages_fetched_total"), "{{vm}} {{origin}}"),
         query("B", "sum by (vm) (%s)\nor\nsum by (vm) (%s) * 0" % (
             rate("pageserver_target_pages_fetched_unknown_total"), rate("pageserver_target_pages_fetched_total")),
             "{{vm}} of which unknown")],
        w=8, axis_label="pages/s"))
    b.panel(timeseries_panel(
        "Bytes received/s", "Bytes received from the source agent (pre-copy and post-copy).",
        [query("A", "sum by (vm) (%s)" % rate("pageserver_target_bytes_received_total"), "{{vm}}")],
        unit=units.BytesPerSecondSI, w=8))
    b.panel(timeseries_panel(
        "Fetch latency p50 / p99", "Round trip of a page fetch from the source agent.",
        [query("A", quantile("0.5", "pageserver_target_fetch_latency_seconds", ["vm"]), "{{vm}} p50"),
         query("B", quantile("0.99", "pageserver_target_fetch_latency_seconds", ["vm"]), "{{vm}} p99")],
        unit=units.Seconds, w=8, min0=False))
    b.panel(timeseries_panel(
        "Pages installed in bulk/s",
        "Fresh pages mapped by the bulk install after the final bitmap (one UFFDIO_CONTINUE per run).",
        [query("A", "sum by (vm) (%s)" % rate("pageserver_target_pages_installed_bulk_total"), "{{vm}}")],
        axis_label="pages/s"))
    b.panel(timeseries_panel(
        "Pre-copy pages/s", "Pages transferred by pre-copy rounds.",
        [query("A", "sum by (vm) (%s)" % rate("pageserver_target_precopy_pages_total"), "{{vm}}")],
        axis_label="pages/s"))

    # Ids from 30 on: added after the others, which keep theirs.
    b.next_id = 30
    b.row("Recovery")
    b.panel(timeseries_panel(
        "Seconds without progress",
        "Seconds since the migration last moved a page or a bitmap, in pre-copy and post-copy "
        "(pageserver_target_stalled_seconds; 0 in the other phases). Above 10 s fires PageserverMigrationStalled.",
        [query("A", "max by (vm) (%s)" % sel("pageserver_target_stalled_seconds"), "{{vm}}")],
        unit=units.Seconds, w=8, steps=(("green", None), ("orange", 10)),
        thresholds_style=cm.GraphThresholdsStyleMode.DASHED))
    b.panel(timeseries_panel(
        "Reconnects and source restarts",
        "Connections to the source opened after the first (a broken link, a dead source agent), and new "
        "source-agent incarnations followed (each makes every page not known fresh stale).",
        [query("A", "sum by (vm) (%s)" % sel("pageserver_target_source_reconnects_total"), "{{vm}} reconnects"),
         query("B", "sum by (vm) (%s)" % sel("pageserver_target_source_restarts_total"), "{{vm}} restarts")],
        step=True, w=8))
    b.panel(timeseries_panel(
        "Replies refused by the fence",
        "Replies from another memory than the migration's source, or read while the source VM was not paused "
        "(pageserver_target_source_replies_refused_total). None of them is installed; any fires "
        "PageserverSourceRepliesRefused.",
        [query("A", "sum by (vm) (%s)" % sel("pageserver_target_source_replies_refused_total"), "{{vm}}")],
        step=True, w=8, steps=(("green", None), ("red", 1)), thresholds_style=cm.GraphThresholdsStyleMode.DASHED))
    return b.build()


SRC_LAT = "pageserver_source_request_duration_seconds"


def source_dashboard():
    b = Board(
        "pageserver-source",
        "pageserver / source agent",
        "Post-copy live migration, source side: RPCs served to the target, pages and bytes served, dirty "
        "tracking. Metrics of source-agent (job pageserver-source).",
    )
    b.row("State")
    b.panel(stat_panel(
        "Paused", "Whether the source VM is paused (SetPaused; also 1 when its VMM is gone or a memory "
        "file is served): then its final bitmap can be taken and every page it serves is final.",
        [query("A", "max by (vm) (%s)" % sel("pageserver_source_paused"), "{{vm}}", instant=True)],
        unit=units.NoUnit, w=6, color_mode=cm.BigValueColorMode.BACKGROUND, steps=(("green", None), ("orange", 1)),
        mappings=value_mappings([(0, "running", "green"), (1, "paused", "orange")])))
    b.panel(stat_panel(
        "Epoch", "The newest complete dirty-tracking epoch.",
        [query("A", "max by (vm) (%s)" % sel("pageserver_source_epoch"), "{{vm}}", instant=True)],
        unit=units.NoUnit, w=6, graph=cm.BigValueGraphMode.AREA))
    b.panel(stat_panel(
        "Requests/s", "All RPCs served per second.",
        [query("A", "sum by (vm) (%s)" % rate(SRC_LAT + "_count"), "{{vm}}")],
        unit=units.RequestsPerSecond, w=6, graph=cm.BigValueGraphMode.AREA, calc="mean"))
    b.panel(stat_panel(
        "Versions", BUILD_INFO_DESC,
        [query("A", "max by (agent, version) (%s)" % sel("pageserver_build_info"), "{{agent}} {{version}}",
               instant=True)], unit=units.NoUnit, w=6, text_mode=cm.BigValueTextMode.NAME))

    b.row("RPCs")
    b.panel(timeseries_panel(
        "RPC latency p50 / p99", "Server-side duration of each RPC (GetPages: of each request inside the stream).",
        [query("A", quantile("0.5", SRC_LAT, ["vm", "rpc"]), "{{vm}} p50 {{rpc}}"),
         query("B", quantile("0.99", SRC_LAT, ["vm", "rpc"]), "{{vm}} p99 {{rpc}}")],
        unit=units.Seconds, min0=False))
    b.panel(timeseries_panel(
        "Requests/s by RPC", "RPCs served per second, and the ones rejected (bad input, wrong state, limits).",
        [query("A", "sum by (vm, rpc) (%s)" % rate(SRC_LAT + "_count"), "{{vm}} {{rpc}}"),
         query("B", "sum by (vm, rpc) (%s)\nor\nsum by (vm, rpc) (%s) * 0" % (
             rate("pageserver_source_requests_rejected_total"), rate(SRC_LAT + "_count")), "{{vm}} {{rpc}} rejected")],
        unit=units.RequestsPerSecond)
        .override_by_regexp(".* rejected$", [
            dm.DynamicConfigValue(id_val="custom.lineStyle", value=cb.LineStyle().dash([10, 10]).fill("dash").build()),
            dm.DynamicConfigValue(id_val="color", value=db.FieldColor().fixed_color("red")
                                  .mode(dm.FieldColorModeId.FIXED).build())]))

    b.row("Pages served")
    b.panel(timeseries_panel(
        "Pages served/s", "Pages sent to the target (GetPage, GetPages), and of those the zero pages (holes).",
        [query("A", "sum by (vm) (%s)" % rate("pageserver_source_pages_served_total"), "{{vm}} pages"),
         query("B", "sum by (vm) (%s)\nor\nsum by (vm) (%s) * 0" % (
             rate("pageserver_source_zero_pages_served_total"), rate("pageserver_source_pages_served_total")),
             "{{vm}} of which zero")],
        axis_label="pages/s"))
    b.panel(timeseries_panel(
        "Bytes served/s", "Page bytes sent to the target.",
        [query("A", "sum by (vm) (%s)" % rate("pageserver_source_bytes_served_total"), "{{vm}}")],
        unit=units.BytesPerSecondSI))

    b.row("Dirty tracking")
    b.panel(timeseries_panel(
        "Dirty scan duration p50 / p99", "Time of one PAGEMAP_SCAN pass over the guest memory "
        "(collects and re-protects the pages written since the last epoch).",
        [query("A", quantile("0.5", "pageserver_source_dirty_scan_duration_seconds", ["vm"]), "{{vm}} p50"),
         query("B", quantile("0.99", "pageserver_source_dirty_scan_duration_seconds", ["vm"]), "{{vm}} p99")],
        unit=units.Seconds, w=8, min0=False))
    b.panel(timeseries_panel(
        "Dirty pages per scan", "Pages one scan found dirty: mean and p99 over the interval.",
        [query("A", "sum by (vm) (%s)\n/\nsum by (vm) (%s)" % (
            rate("pageserver_source_dirty_scan_pages_sum"), rate("pageserver_source_dirty_scan_pages_count")),
            "{{vm}} mean"),
         query("B", quantile("0.99", "pageserver_source_dirty_scan_pages", ["vm"]), "{{vm}} p99")],
        w=8, axis_label="pages"))
    b.panel(timeseries_panel(
        "Epoch and paused", "Dirty-tracking epoch (left) and paused state (right, 1 = paused).",
        [query("A", "max by (vm) (%s)" % sel("pageserver_source_epoch"), "{{vm}} epoch"),
         query("B", "max by (vm) (%s)" % sel("pageserver_source_paused"), "{{vm}} paused")],
        w=8, step=True, legend_calcs=("lastNotNull",))
        .override_by_regexp(".* paused$", axis_right() + [
            dm.DynamicConfigValue(id_val="max", value=1),
            dm.DynamicConfigValue(id_val="custom.fillOpacity", value=30)]))
    return b.build()


def render(model):
    """The dashboard as JSON: keys sorted, two-space indent, a final newline,
    so that the same dashboard is always the same bytes."""
    return JSONEncoder(sort_keys=True, indent=2, ensure_ascii=False).encode(model) + "\n"


def main():
    check = "--check" in sys.argv[1:]
    stale = []
    for name, build in (("pageserver-target.json", target_dashboard), ("pageserver-source.json", source_dashboard)):
        path = os.path.join(HERE, name)
        text = render(build())
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
