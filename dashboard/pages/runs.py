"""Runs page: the experiment's runs as a filterable table; the selected runs' curves, parameters and test metrics."""

import cached_store as store
import plotly.express as px
import streamlit as st

from cifake_core import dashboard_data as data

tracking_uri = store.connect()
st.title("Runs")
runs = store.runs(tracking_uri)
if not runs:
    st.info(
        f"The experiment `{store.EXPERIMENT}` has no runs in `{tracking_uri}` yet. Train one with `make demo` or "
        f"`cifake train --epochs 8`, with MLFLOW_TRACKING_URI pointing at this store."
    )
    st.stop()

table = data.runs_table(runs, data.production_version(store.versions(tracking_uri)))
status_column, stage_column, text_column = st.columns(3)
statuses = status_column.multiselect("Status", sorted(table["status"].unique()), placeholder="any status")
stages = stage_column.multiselect("Stage", sorted(set(table["stage"]) - {""}), placeholder="any stage")
text = text_column.text_input("Contains", placeholder="dataset, fingerprint, run id, error...")
shown = data.filter_runs(table, statuses, stages, text)
st.dataframe(
    shown,
    hide_index=True,
    column_config={
        "start": st.column_config.DatetimeColumn("start (UTC)", format="YYYY-MM-DD HH:mm"),
        "duration_s": st.column_config.NumberColumn("duration", format="%.0f s"),
        "test_auc": st.column_config.NumberColumn(format="%.4f"),
        "test_f1": st.column_config.NumberColumn(format="%.4f"),
        "production": st.column_config.CheckboxColumn("production"),
    },
)
if shown.empty:
    st.warning("No run matches these filters: clear them to see every run.")
    st.stop()

labels = dict(zip(table["run_id"], table["run"], strict=True))
selected = st.multiselect(
    "Compare runs",
    shown["run_id"].tolist(),
    default=data.default_comparison(shown),
    format_func=labels.get,
    placeholder="pick two or more runs",
)
if len(selected) < 2:
    st.info("Select two or more runs above to overlay their curves and compare their parameters and test metrics.")
    st.stop()

chosen = [run for run in runs if run["run_id"] in selected]
for run in chosen:
    if run["status"] != data.FINISHED:
        reason = run["tags"].get("cifake.error", "it has not finished")
        st.warning(f"{data.run_label(run)} is {run['status']}: {reason.rstrip('.')}. It shows only what it logged.")

st.subheader("Per-epoch curves")
curves = data.epoch_curves({data.run_label(run): store.histories(tracking_uri, run["run_id"]) for run in chosen})
if curves.empty:
    st.info("None of these runs logged per-epoch metrics.")
else:
    figure = px.line(curves, x="epoch", y="value", color="run", facet_col="metric", facet_col_wrap=3, markers=True)
    figure.update_yaxes(matches=None, showticklabels=True, title=None)
    figure.update_xaxes(dtick=1)
    figure.for_each_annotation(lambda annotation: annotation.update(text=annotation.text.split("=")[-1]))
    st.plotly_chart(figure)

st.subheader("ROC on test")
roc, missing = data.roc_curves(
    {data.run_label(run): store.report(tracking_uri, run["run_id"], "reports/curves.json") for run in chosen}
)
if missing:
    st.caption(f"No `reports/curves.json` (the run did not reach its test reports): {', '.join(missing)}")
if not roc.empty:
    figure = px.line(roc, x="fpr", y="tpr", color="run", labels={"fpr": "false-positive rate", "tpr": "recall (ai)"})
    figure.add_shape(type="line", x0=0, y0=0, x1=1, y1=1, line={"dash": "dash", "color": "grey"})
    st.plotly_chart(figure)

st.subheader("Parameters")
st.caption("Highlighted rows differ between the selected runs.")
st.dataframe(data.highlight_differences(data.parameter_diff(chosen)))

st.subheader("Test metrics")
bars = data.metric_bars(chosen)
if bars.empty:
    st.info("None of these runs logged test metrics.")
else:
    st.plotly_chart(px.bar(bars, x="metric", y="value", color="run", barmode="group", range_y=(0, 1)))
