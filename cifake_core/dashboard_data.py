"""The dashboard's data shaping: pure functions from what `tracking` returns to the tables and frames it shows.

The Streamlit pages in `dashboard/` only lay these out; everything worth testing happens here, without
Streamlit and without a tracking store: runs as a filterable table, the parameters that differ between
runs, per-epoch and ROC curves in long form for plotly, registered versions, and classification results.

Usage:
    table = runs_table(tracking.experiment_runs("cifake"), production_version="3")
    filter_runs(table, statuses=["FINISHED"], stages=["train"], text="demo")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from pandas.io.formats.style import Styler
from PIL import Image

from cifake_core.preprocessing import ImageSource, load_rgb
from cifake_core.tracking import ERROR_TAG, PRODUCTION_ALIAS, USED_PARAM_TAG_PREFIX

KEY_PARAMS = (
    "epochs",
    "fine_epochs",
    "select_fraction",
    "batch_size",
    "optimizer",
    "lr",
    "weight_decay",
    "label_smoothing",
    "grad_clip_norm",
    "translate",
    "image_size",
    "stem_stride",
    "flip_tta",
    "pretrained",
    "max_train_per_class",
    "seed",
)
EPOCH_METRICS = ("train_loss", "val_loss", "val_auc", "val_f1", "learning_rate")
TEST_METRICS = ("test_auc", "test_f1", "test_accuracy", "test_precision", "test_recall", "test_fpr")
FINISHED = "FINISHED"
RUNS_COLUMNS = (
    "run",
    "stage",
    "status",
    "start",
    "duration_s",
    "dataset",
    "fingerprint",
    *KEY_PARAMS,
    "test_auc",
    "test_f1",
    "version",
    "production",
    "error",
    "run_id",
)
_DIFFERS_COLOUR = "background-color: rgba(255, 196, 0, 0.25)"
PREVIEW_SIDE = 256


def run_label(run: Mapping[str, Any]) -> str:
    """A short, unique name for a run in legends and pickers: `train 1a2b3c4d v2`."""
    version = run["tags"].get("cifake.registered_version")
    return " ".join(
        part for part in (run["run_name"] or "run", run["run_id"][:8], f"v{version}" if version else "") if part
    )


def _timestamp(milliseconds: int | None) -> pd.Timestamp:
    """MLflow's epoch milliseconds as a naive UTC timestamp (tables show naive times without converting them)."""
    return pd.to_datetime(milliseconds, unit="ms") if milliseconds else pd.NaT


def used_params(run: Mapping[str, Any]) -> dict[str, str]:
    """The run's parameters with what it trained with in place of the automatic values `mlflow run` logged
    (`batch_size=0`), so a run started by `mlflow run .` and one by `cifake train` compare alike."""
    used = {
        name.removeprefix(USED_PARAM_TAG_PREFIX): value
        for name, value in run["tags"].items()
        if name.startswith(USED_PARAM_TAG_PREFIX)
    }
    return {**run["params"], **used}


def runs_table(runs: Sequence[Mapping[str, Any]], production_version: str | None) -> pd.DataFrame:
    """One row per run, newest first as given: status, timing, dataset, key parameters, test metrics, version.

    Failed and running runs keep their rows, with whatever they logged; what they lack is left empty.
    """
    rows = []
    for run in runs:
        tags, params, metrics = run["tags"], used_params(run), run["metrics"]
        version = tags.get("cifake.registered_version", "")
        ended = run["end_time"] if run["status"] != "RUNNING" else None
        rows.append(
            {
                "run": run_label(run),
                "stage": tags.get("cifake.stage", ""),
                "status": run["status"],
                "start": _timestamp(run["start_time"]),
                "duration_s": (ended - run["start_time"]) / 1000 if ended and run["start_time"] else float("nan"),
                "dataset": tags.get("cifake.dataset", ""),
                "fingerprint": tags.get("cifake.dataset_fingerprint", ""),
                **{name: params.get(name, "") for name in KEY_PARAMS},
                "test_auc": metrics.get("test_auc", float("nan")),
                "test_f1": metrics.get("test_f1", float("nan")),
                "version": version,
                "production": bool(version) and version == production_version,
                "error": tags.get(ERROR_TAG, ""),
                "run_id": run["run_id"],
            }
        )
    return pd.DataFrame(rows, columns=list(RUNS_COLUMNS))


def filter_runs(
    table: pd.DataFrame, statuses: Sequence[str] = (), stages: Sequence[str] = (), text: str = ""
) -> pd.DataFrame:
    """Rows whose status and stage are among those given (none given: any) and that contain `text` anywhere."""
    keep = pd.Series(True, index=table.index)
    if statuses:
        keep &= table["status"].isin(statuses)
    if stages:
        keep &= table["stage"].isin(stages)
    if text.strip():
        needle = text.strip().lower()
        haystacks = table.apply(lambda row: " ".join(str(value) for value in row if pd.notna(value)).lower(), axis=1)
        keep &= haystacks.str.contains(needle, regex=False)
    return table[keep]


def default_comparison(table: pd.DataFrame, count: int = 2) -> list[str]:
    """The run ids compared before the user picks: the newest finished training runs."""
    finished = table[(table["status"] == FINISHED) & (table["stage"] == "train")]
    return finished["run_id"].head(count).tolist()


def parameter_diff(runs: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Every parameter (rows) of each run (columns, by label), differing ones first, with a `differs` column."""
    table = pd.DataFrame({run_label(run): pd.Series(used_params(run), dtype=object) for run in runs})
    if table.empty:
        return table.assign(differs=pd.Series(dtype=bool))
    table = table.fillna("").astype(str)
    table["differs"] = table.nunique(axis=1) > 1
    return table.sort_values("differs", ascending=False, kind="stable")


def highlight_differences(diff: pd.DataFrame) -> Styler:
    """The parameter table with the rows that differ between runs coloured."""
    return diff.style.apply(lambda row: [_DIFFERS_COLOUR if row["differs"] else ""] * len(row), axis=1)


def epoch_curves(histories: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]]) -> pd.DataFrame:
    """Per-epoch metric histories by run label as a long frame: run, metric, epoch, value."""
    rows = [
        {"run": label, "metric": metric, "epoch": step, "value": value}
        for label, metrics in histories.items()
        for metric, points in metrics.items()
        for step, value in points
    ]
    return pd.DataFrame(rows, columns=["run", "metric", "epoch", "value"])


def roc_curves(curves: Mapping[str, Mapping[str, Any] | None]) -> tuple[pd.DataFrame, list[str]]:
    """ROC points by run label from each run's `curves.json` (long: run, fpr, tpr), and the labels lacking one."""
    frames, missing = [], []
    for label, report in curves.items():
        roc = (report or {}).get("roc")
        if not roc:
            missing.append(label)
            continue
        frames.append(pd.DataFrame({"run": label, "fpr": roc["fpr"], "tpr": roc["tpr"]}))
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run", "fpr", "tpr"])
    return frame, missing


def metric_bars(runs: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The test metrics each run logged, long: run, metric, value (runs without test metrics contribute nothing)."""
    rows = [
        {"run": run_label(run), "metric": metric, "value": run["metrics"][metric]}
        for run in runs
        for metric in TEST_METRICS
        if metric in run["metrics"]
    ]
    return pd.DataFrame(rows, columns=["run", "metric", "value"])


def versions_table(versions: Sequence[Mapping[str, Any]], runs: Sequence[Mapping[str, Any]] | None) -> pd.DataFrame:
    """One row per registered version: aliases, production, dataset, metrics (from its run when that run is in
    the experiment, else from the version's tags), run and tags."""
    runs_by_id = {run["run_id"]: run for run in runs or ()}
    rows = []
    for version in versions:
        tags = version["tags"]
        metrics = runs_by_id.get(version["run_id"], {}).get("metrics", {})
        rows.append(
            {
                "version": version["version"],
                "aliases": ", ".join(version["aliases"]),
                "production": PRODUCTION_ALIAS in version["aliases"],
                "created": _timestamp(version["creation_time"]),
                "dataset": tags.get("dataset", ""),
                "val_auc": number(metrics.get("best_val_auc", tags.get("val_auc"))),
                "test_auc": number(metrics.get("test_auc", tags.get("test_auc"))),
                "test_f1": number(metrics.get("test_f1")),
                "fingerprint": tags.get("dataset_fingerprint", ""),
                "run_id": version["run_id"],
                "tags": ", ".join(f"{key}={value}" for key, value in sorted(tags.items())),
            }
        )
    return pd.DataFrame(rows)


def number(value: object) -> float:
    """A metric or a tag as a float; NaN when it is missing or not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def production_version(versions: Sequence[Mapping[str, Any]]) -> str | None:
    """The version the `production` alias points to, among those listed, or None."""
    return next((version["version"] for version in versions if PRODUCTION_ALIAS in version["aliases"]), None)


def promotion_verb(version: str, production_version: str | None) -> str:
    """`promote` to a newer version (or when nothing is production), `roll back` to an older one, `keep` the same."""
    if production_version is None or int(version) > int(production_version):
        return "promote"
    return "keep" if version == production_version else "roll back"


def results_table(names: Sequence[str], classified: pd.DataFrame) -> pd.DataFrame:
    """The classifier's rows (prob_ai, label, threshold, error, model_version) with the uploaded file names first."""
    return classified.assign(file=list(names))[["file", *classified.columns]]


def preview(source: ImageSource) -> Image.Image:
    """An uploaded image as the browser can show it, whatever its format: RGB, at most PREVIEW_SIDE pixels a side."""
    image = load_rgb(source)
    image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    return image
