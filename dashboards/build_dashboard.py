#!/usr/bin/env python3
"""Build dashboards/kiln.json (the Kiln Grafana dashboard) with grafana-foundation-sdk.

    .venv/bin/python dashboards/build_dashboard.py            # rewrite dashboards/kiln.json
    .venv/bin/python dashboards/build_dashboard.py --check    # exit 1 if kiln.json is stale

The JSON is committed (Grafana imports it as is, and the Helm chart ships it); this script is
its source. Every PromQL expression here is run against a live Prometheus scraping a live
Kiln server by tests/test_deploy_prometheus_live.py; heavy ones read the recording rules in
dashboards/prometheus-rules.yaml.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as pb
from grafana_foundation_sdk.builders import stat as statb
from grafana_foundation_sdk.builders import table as tableb
from grafana_foundation_sdk.builders import timeseries as tsb
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm

OUT = Path(__file__).resolve().parent / "kiln.json"
UID = "kiln-overview"

DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
# Every Kiln series carries these selectors; namespace/pod are empty outside Kubernetes and
# `=~".*"` (the "All" value) matches an empty label too.
SEL = 'namespace=~"$namespace", pod=~"$pod", model=~"$model"'
SEL_NO_MODEL = 'namespace=~"$namespace", pod=~"$pod"'

# Recording rules (dashboards/prometheus-rules.yaml).
REQ = "namespace_pod_model_outcome:kiln_inference_requests:rate1m"
REQ_PROTOCOL = "namespace_pod_model_protocol:kiln_inference_requests:rate1m"
LAT_PROTOCOL_BUCKET = "namespace_pod_model_protocol_le:kiln_request_duration_seconds_bucket:rate1m"
SAMPLES = "namespace_pod_model:kiln_inference_samples:rate1m"
LAT_BUCKET = "namespace_pod_model_phase_le:kiln_request_duration_seconds_bucket:rate1m"
LAT_SUM = "namespace_pod_model_phase:kiln_request_duration_seconds_sum:rate1m"
LAT_COUNT = "namespace_pod_model_phase:kiln_request_duration_seconds_count:rate1m"
BATCH_BUCKET = "namespace_pod_model_le:kiln_batch_size_bucket:rate1m"
BATCH_SUM = "namespace_pod_model:kiln_batch_size_sum:rate1m"
BATCH_COUNT = "namespace_pod_model:kiln_batch_size_count:rate1m"
VREQ = "namespace_pod_model_version_outcome:kiln_inference_requests:rate1m"
VLAT_BUCKET = "namespace_pod_model_version_le:kiln_request_duration_seconds_bucket:rate1m"
FEEDBACK = "namespace_pod_model_result:kiln_feedback:rate1m"
CAPTURE = "namespace_pod_model_result:kiln_capture_samples:rate1m"


def q(expr: str, legend: str = "__auto", ref: str = "A", *, instant: bool = False, table: bool = False) -> pb.Dataquery:
    query = pb.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DS)
    if instant:
        query = query.instant()
    else:
        query = query.range()
    if table:
        query = query.format(pm.PromQueryFormat.TABLE)
    return query


def ratio_or_zero(num_sel: str, by: str) -> str:
    """sum(errors)/sum(all) that reads 0 (not "no data") while there are no errors."""
    grp = f"sum by ({by}) " if by else "sum "
    return (
        f"({grp}({REQ}{{{SEL}, {num_sel}}}) or 0 * {grp}({REQ}{{{SEL}}}))"
        f" / {grp}({REQ}{{{SEL}}})"
    )


def legend_bottom() -> cb.VizLegendOptions:
    return (
        cb.VizLegendOptions()
        .display_mode(cm.LegendDisplayMode.TABLE)
        .placement(cm.LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs(["mean", "max", "lastNotNull"])
    )


def timeseries(title: str, description: str, unit: str, *targets: pb.Dataquery, stack: bool = False) -> tsb.Panel:
    panel = (
        tsb.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .height(8)
        .span(8)
        .line_width(1)
        .fill_opacity(10 if not stack else 60)
        .show_points(cm.VisibilityMode.NEVER)
        .legend(legend_bottom())
        .tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING))
    )
    if stack:
        panel = panel.stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL))
    for t in targets:
        panel = panel.with_target(t)
    return panel


def stat(title: str, description: str, unit: str, target: pb.Dataquery, *, thresholds: list[tuple[float | None, str]] | None = None) -> statb.Panel:
    steps = [dm.Threshold(value=v, color=c) for v, c in (thresholds or [(None, "green")])]
    return (
        statb.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .height(4)
        .span(4)
        .with_target(target)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .color_mode(cm.BigValueColorMode.BACKGROUND)
        .graph_mode(cm.BigValueGraphMode.AREA)
        .thresholds(db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(steps))
    )


def table(title: str, description: str, target: pb.Dataquery, *, unit: str = "none", span: int = 12, hide: list[str] | None = None) -> tableb.Panel:
    exclude = {name: True for name in ["Time", *(hide or [])]}
    return (
        tableb.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .height(8)
        .span(span)
        .with_target(target)
        .with_transformation(dm.DataTransformerConfig(id_val="organize", options={"excludeByName": exclude}))
    )


def variable(name: str, label: str, query: str) -> db.QueryVariable:
    return (
        db.QueryVariable(name)
        .label(label)
        .datasource(DS)
        .query(query)
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(dm.VariableOption(selected=True, text="All", value="$__all"))
    )


def build() -> dict:
    quantiles = [("p50", 0.5), ("p95", 0.95), ("p99", 0.99)]
    d = (
        db.Dashboard("Kiln inference server")
        .uid(UID)
        .description("Kiln (Open Inference Protocol / KServe v2): traffic, latency per phase, batching, "
                     "concurrency, model state, compile cache and parity. Source: dashboards/build_dashboard.py.")
        .tags(["kiln", "inference", "kserve-v2"])
        .editable()
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .with_variable(
            db.DatasourceVariable("datasource").label("Data source").type("prometheus")
            .current(dm.VariableOption(selected=True, text="default", value="default"))
        )
        .with_variable(variable("namespace", "Namespace", "label_values(kiln_model_state, namespace)"))
        .with_variable(variable("model", "Model", 'label_values(kiln_model_state{namespace=~"$namespace"}, model)'))
        .with_variable(variable("pod", "Pod", 'label_values(kiln_model_state{namespace=~"$namespace", model=~"$model"}, pod)'))
        # ---------------------------------------------------------------- overview
        .with_row(db.Row("Overview"))
        .with_panel(stat("Requests/s", "All inference requests per second (every outcome).", "reqps",
                         q(f"sum({REQ}{{{SEL}}})")))
        .with_panel(stat("Server error ratio", "server_error / all requests over 1 m (alert: > 1% for 5 m).",
                         "percentunit", q(ratio_or_zero('outcome="server_error"', "")),
                         thresholds=[(None, "green"), (0.001, "orange"), (0.01, "red")]))
        .with_panel(stat("Rejected ratio", "Requests turned away with 503 (queue full) / all requests.",
                         "percentunit", q(ratio_or_zero('outcome="rejected"', "")),
                         thresholds=[(None, "green"), (0.001, "orange"), (0.01, "red")]))
        .with_panel(stat("p99 latency", "End-to-end (phase=total) p99 over all selected models and pods.", "s",
                         q(f'histogram_quantile(0.99, sum by (le) ({LAT_BUCKET}{{{SEL}, phase="total"}}))'),
                         thresholds=[(None, "green"), (0.25, "orange"), (0.5, "red")]))
        .with_panel(stat("Models READY", "Model versions whose current state is READY.", "none",
                         q(f'count(kiln_model_state{{{SEL}, state="READY"}} == 1) or vector(0)')))
        .with_panel(stat("Models not READY", "Model versions LOADING, COMPILING, VERIFYING, WARMING or FAILED.",
                         "none", q(f'count(kiln_model_state{{{SEL}, state!="READY"}} == 1) or vector(0)'),
                         thresholds=[(None, "green"), (1, "orange")]))
        # ---------------------------------------------------------------- traffic
        .with_row(db.Row("Traffic"))
        .with_panel(timeseries("Requests/s by outcome", "success | client_error | server_error | rejected.", "reqps",
                               q(f"sum by (outcome) ({REQ}{{{SEL}}})", "{{outcome}}")))
        .with_panel(timeseries("Requests/s and samples/s by model",
                               "Samples/s > requests/s when clients send batches.", "reqps",
                               q(f"sum by (model) ({REQ}{{{SEL}}})", "{{model}} requests"),
                               q(f"sum by (model) ({SAMPLES}{{{SEL}}})", "{{model}} samples", "B")))
        .with_panel(timeseries("Error ratio by model", "server_error and rejected shares of all requests.",
                               "percentunit",
                               q(ratio_or_zero('outcome="server_error"', "model"), "{{model}} server_error"),
                               q(ratio_or_zero('outcome="rejected"', "model"), "{{model}} rejected", "B")))
        .with_panel(timeseries("Requests/s by protocol",
                               "HTTP (REST, JSON or binary tensors) and gRPC share one infer core: the "
                               "protocol label tells the transports apart.", "reqps",
                               q(f"sum by (protocol) ({REQ_PROTOCOL}{{{SEL}}})", "{{protocol}}")))
        .with_panel(timeseries("p99 latency by protocol", "End-to-end (phase=total) p99 per transport.", "s",
                               q(f"histogram_quantile(0.99, sum by (le, protocol) ({LAT_PROTOCOL_BUCKET}{{{SEL}}}))",
                                 "{{protocol}}")))
        # ---------------------------------------------------------------- latency
        .with_row(db.Row("Latency (from the kiln_request_duration_seconds histogram)"))
    )
    for name, quantile in quantiles:
        d = d.with_panel(timeseries(
            f"Latency {name} by phase",
            f"{name} of each phase: decode, queue (batcher), compute (backend), encode, and total.", "s",
            q(f"histogram_quantile({quantile}, sum by (le, phase) ({LAT_BUCKET}{{{SEL}}}))", "{{phase}}")))
    d = (
        d.with_panel(timeseries(
            "End-to-end latency by model", "p50 / p95 / p99 of phase=total per model.", "s",
            *[q(f'histogram_quantile({quantile}, sum by (le, model) ({LAT_BUCKET}{{{SEL}, phase="total"}}))',
                f"{{{{model}}}} {name}", "ABC"[i]) for i, (name, quantile) in enumerate(quantiles)]))
        .with_panel(timeseries(
            "Mean time per phase", "Where a request's time goes, on average (stacked).", "s",
            q(f'sum by (phase) ({LAT_SUM}{{{SEL}, phase!="total"}}) / sum by (phase) ({LAT_COUNT}{{{SEL}, phase!="total"}})',
              "{{phase}}"), stack=True))
        .with_panel(timeseries(
            "Mean latency by pod", "End-to-end mean per pod: one slow pod stands out here.", "s",
            q(f'sum by (pod) ({LAT_SUM}{{{SEL}, phase="total"}}) / sum by (pod) ({LAT_COUNT}{{{SEL}, phase="total"}})',
              "{{pod}}")))
        # ---------------------------------------------------------------- batching / concurrency
        .with_row(db.Row("Batching and concurrency"))
        .with_panel(timeseries(
            "Executed batch size", "Samples per backend call (kiln_batch_size): p50, p95 and mean per model.", "none",
            q(f"histogram_quantile(0.5, sum by (le, model) ({BATCH_BUCKET}{{{SEL}}}))", "{{model}} p50"),
            q(f"histogram_quantile(0.95, sum by (le, model) ({BATCH_BUCKET}{{{SEL}}}))", "{{model}} p95", "B"),
            q(f"sum by (model) ({BATCH_SUM}{{{SEL}}}) / sum by (model) ({BATCH_COUNT}{{{SEL}}})", "{{model}} mean", "C")))
        .with_panel(timeseries(
            "Queue depth", "Requests waiting in each model's batcher queue (kiln_queue_depth).", "none",
            q(f"sum by (model) (kiln_queue_depth{{{SEL}}})", "{{model}}")))
        .with_panel(timeseries(
            "In-flight requests by pod", "Requests being decoded, queued, computed or encoded (kiln_inflight_requests). "
            "The HPA's kiln_inflight_requests_avg1m is this, averaged over 1 m.", "none",
            q(f"sum by (pod) (kiln_inflight_requests{{{SEL}}})", "{{pod}}")))
        # ---------------------------------------------------------------- models
        .with_row(db.Row("Models: state, backend, precision, compile, parity"))
        .with_panel(table(
            "Model state", "Current state, chosen backend and precision of each model version on each pod.",
            q(f"max by (model, version, backend, precision, state, pod) (kiln_model_state{{{SEL}}} == 1)",
              instant=True, table=True), hide=["Value"]))
        .with_panel(timeseries(
            "Models by state", "Count of model versions in each state over time.", "none",
            q(f"count by (state) (kiln_model_state{{{SEL}}} == 1)", "{{state}}")).span(12))
        .with_panel(table(
            "Parity: max abs error vs the reference",
            "Measured at verify time: artifact vs ONNX Runtime FP32 on the source, per output.",
            q(f"max by (model, version, output) (kiln_parity_max_abs_error{{{SEL}}})", instant=True, table=True),
            unit="sci", span=8))
        .with_panel(table(
            "Mean compile time", "kiln_compile_seconds: sum / count since process start, per model and backend.",
            q(f"sum by (model, backend) (kiln_compile_seconds_sum{{{SEL}}}) "
              f"/ sum by (model, backend) (kiln_compile_seconds_count{{{SEL}}})", instant=True, table=True),
            unit="s", span=8))
        .with_panel(timeseries(
            "Compile cache lookups by result", "kiln_compile_cache_total since process start: hit | miss | corrupt.",
            "none", q(f"sum by (result) (kiln_compile_cache_total{{{SEL_NO_MODEL}}})", "{{result}}")).span(4))
        .with_panel(stat(
            "Compile cache hit ratio", "hits / lookups since process start (a warm restart is close to 100%).",
            "percentunit",
            q(f'(sum(kiln_compile_cache_total{{{SEL_NO_MODEL}, result="hit"}}) or vector(0)) '
              f"/ sum(kiln_compile_cache_total{{{SEL_NO_MODEL}}})")).span(4).height(8))
    )
    d = monitoring_rows(d)
    d = rollout_row(d)
    out = json.loads(json.dumps(d.build(), cls=JSONEncoder))
    for i, panel in enumerate(out["panels"], 1):  # stable ids, in layout order
        panel["id"] = i
    return out


def monitoring_rows(d: db.Dashboard) -> db.Dashboard:
    """Model quality (service/monitor, docs/monitoring.md): live accuracy from feedback, drift, capture."""
    return (
        d.with_row(db.Row("Model quality: live accuracy from feedback, drift, traffic capture"))
        .with_panel(timeseries(
            "Live accuracy (top-1) and MAE from feedback",
            "kiln_live_accuracy (classifiers) or kiln_live_mae (regressors) over the last feedback window, with the "
            "config's accuracy.min_accuracy (alert KilnLiveAccuracyLow below it).", "none",
            q(f'label_replace(max by (model, version) (kiln_live_accuracy{{{SEL}}}), "metric", "top-1", "", "") '
              f'or label_replace(max by (model, version) (kiln_live_mae{{{SEL}}}), "metric", "MAE", "", "")',
              "{{model}} v{{version}} {{metric}}"),
            q(f"max by (model, version) (kiln_live_accuracy_min{{{SEL}}})", "{{model}} v{{version}} min_accuracy", "B")))
        .with_panel(timeseries(
            "Feedback/s by result", "Labels joined to a prediction, late (after monitor.feedback.max_delay_s), "
            "unmatched (unknown or evicted request id) and duplicate.", "reqps",
            q(f"sum by (result) ({FEEDBACK}{{{SEL}}})", "{{result}}")))
        .with_panel(timeseries(
            "Labelled rows in the live window", "kiln_live_labels: how many labelled rows the live metric averages.",
            "none", q(f"max by (model, version) (kiln_live_labels{{{SEL}}})", "{{model}} v{{version}}")))
        .with_panel(stat(
            "Model versions drifting", "Versions whose last drift window failed the Bonferroni-corrected KS test "
            "(or the predicted-class test); alert KilnDriftDetected after 10 minutes.", "none",
            q(f"count(max by (model, version) (kiln_drift_detected{{{SEL}}}) == 1) or vector(0)"),
            thresholds=[(None, "green"), (1, "red")]))
        .with_panel(timeseries(
            "Drift detected", "kiln_drift_detected per model version (1 = the last window drifted).", "none",
            q(f"max by (model, version) (kiln_drift_detected{{{SEL}}})", "{{model}} v{{version}}")).span(8))
        .with_panel(timeseries(
            "Smallest KS p-value by model", "min over input features of kiln_drift_p_value{test=\"ks\"}; drift when it "
            "is below 0.05 / features (Bonferroni).", "sci",
            q(f'min by (model, version) (kiln_drift_p_value{{{SEL}, test="ks"}})', "{{model}} v{{version}}")))
        .with_panel(timeseries(
            "Largest PSI and KS statistic by model", "Population stability index (> 0.25: a large shift) and KS "
            "statistic of the most shifted input feature.", "none",
            q(f'max by (model, version) (kiln_drift_statistic{{{SEL}, test="psi", input!="predicted_class"}})',
              "{{model}} v{{version}} PSI"),
            q(f'max by (model, version) (kiln_drift_statistic{{{SEL}, test="ks"}})', "{{model}} v{{version}} KS", "B")))
        .with_panel(table(
            "Most drifted inputs (KS statistic)", "The 10 input features whose window differs most from the reference.",
            q(f'topk(10, max by (model, version, input) (kiln_drift_statistic{{{SEL}, test="ks"}}))',
              instant=True, table=True), span=8))
        .with_panel(timeseries(
            "Captured samples/s by result", "kiln_capture_samples_total: stored, dropped (queue full), evicted (the "
            "store's byte cap), failed.", "reqps", q(f"sum by (result) ({CAPTURE}{{{SEL}}})", "{{result}}")))
        .with_panel(timeseries(
            "Capture store bytes by model", "Tensor bytes of each model's captured samples (KILN_MONITOR_MAX_BYTES "
            "bounds the whole store).", "bytes", q(f"sum by (model) (kiln_capture_bytes{{{SEL}}})", "{{model}}")))
    )


def rollout_row(d: db.Dashboard) -> db.Dashboard:
    """Model updates: the versions a rollout routes to, side by side (service/rollout.py, service/poll.py)."""
    errors = 'outcome=~"server_error|timeout|rejected"'
    by = "model, version"
    return (
        d.with_row(db.Row("Rollout: canary and shadow versions beside the stable one"))
        .with_panel(timeseries(
            "Rollout weight by version", "Share of unversioned requests per version (role stable / canary; for a "
            "shadow, the share of requests copied to it). A canary at 0 after a rollback.", "percentunit",
            q(f"max by (model, version, role) (kiln_rollout_weight{{{SEL}}})", "{{model}} v{{version}} {{role}}")))
        .with_panel(timeseries(
            "Disagreement with the stable version",
            "Rows on which a canary / shadow answers differently from the stable version on the same inputs "
            "(top-1, or relative error above rtol): over the guard's window (gauge) and over the rate interval.",
            "percentunit",
            q(f"max by (model, version, baseline) (kiln_version_disagreement{{{SEL}}})",
              "{{model}} v{{version}} vs v{{baseline}} (window)"),
            q(f"sum by (model, version, baseline) (rate(kiln_version_disagreeing_rows_total{{{SEL}}}[$__rate_interval]) "
              f"or 0 * rate(kiln_version_compared_rows_total{{{SEL}}}[$__rate_interval])) "
              f"/ sum by (model, version, baseline) (rate(kiln_version_compared_rows_total{{{SEL}}}[$__rate_interval]))",
              "{{model}} v{{version}} vs v{{baseline}}", "B")))
        .with_panel(timeseries(
            "Error ratio by version", "Server errors, timeouts and rejections / requests, per version (what the "
            "guard's max_error_rate reads, over its own window: the dashed series).", "percentunit",
            q(f"(sum by ({by}) ({VREQ}{{{SEL}, {errors}}}) or 0 * sum by ({by}) ({VREQ}{{{SEL}}})) "
              f"/ sum by ({by}) ({VREQ}{{{SEL}}})", "{{model}} v{{version}}"),
            q(f"max by ({by}) (kiln_rollout_window_error_rate{{{SEL}}})", "{{model}} v{{version}} (guard window)",
              "B")))
        .with_panel(timeseries(
            "Latency p50 / p99 by version", "End-to-end latency per version, and the p99 the guard's max_p99_ms "
            "reads over its window.", "s",
            q(f"histogram_quantile(0.5, sum by (le, {by}) ({VLAT_BUCKET}{{{SEL}}}))", "{{model}} v{{version}} p50"),
            q(f"histogram_quantile(0.99, sum by (le, {by}) ({VLAT_BUCKET}{{{SEL}}}))", "{{model}} v{{version}} p99",
              "B"),
            q(f"max by ({by}) (kiln_rollout_window_p99_seconds{{{SEL}}})", "{{model}} v{{version}} p99 (guard window)",
              "C")))
        .with_panel(timeseries(
            "Rollout copies/s", "Requests copied off the request path (to a shadow, or to the stable version for a "
            "canary's comparison) by outcome: success, error, dropped (too many in flight).", "reqps",
            q(f"sum by (model, version, outcome) (rate(kiln_rollout_copies_total{{{SEL}}}[$__rate_interval]))",
              "{{model}} v{{version}} {{outcome}}")))
        .with_panel(timeseries(
            "Rollbacks and repository changes", "Canaries the guard rolled back (by the bound they broke), and the "
            "changes repository polls applied (poll mode), over the last hour.", "none",
            q(f"sum by (model, version, bound) (increase(kiln_rollout_rollbacks_total{{{SEL}}}[1h]))",
              "rollback {{model}} v{{version}} {{bound}}"),
            q(f"sum by (change) (increase(kiln_repository_changes_total{{{SEL_NO_MODEL}}}[1h]))", "{{change}}", "B")))
    )


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if kiln.json differs from the generated one")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
