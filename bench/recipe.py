"""Recipe sweep: validation AUC against training time for a few training recipes, on capped data.

Each recipe is a set of config overrides (`image_size=64`, `stem_stride=1 lr=0.004`, ...) on top of the
defaults. Every recipe runs the real training stage (`experiments/stage.py train`, with `promote=never`)
in its own process against a throwaway SQLite store, so the figures are the pipeline's own: per-epoch
validation AUC and training seconds as logged to MLflow. Only validation figures are reported: the sweep
picks a recipe, the test split judges it once afterwards in a full run.

Usage:
    .venv/bin/python bench/recipe.py --data_dir /tmp/cifake --max_train_per_class 5000 --epochs 3 \\
        --recipes "" "stem_stride=1" "image_size=64" --output recipe.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cifake_core import tracking  # noqa: E402

EXPERIMENT = "recipe-sweep"


def _overrides(recipe: str) -> list[str]:
    """`"image_size=64 lr=0.004"` -> `["--image_size", "64", "--lr", "0.004"]`."""
    flags: list[str] = []
    for item in recipe.split():
        key, _, value = item.partition("=")
        flags += [f"--{key}", value]
    return flags


def run_recipe(recipe: str, common: list[str], folder: str) -> dict:
    """Train one recipe in a child process working in `folder` (its store and artifacts); its logged figures."""
    store = f"sqlite:///{folder}/recipe.db"
    command = [sys.executable, str(ROOT / "experiments" / "stage.py"), "train", *common, *_overrides(recipe)]
    environment = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=folder, env=environment, stdout=subprocess.DEVNULL)
    # wait4, not wait: the child's own peak resident memory comes with its exit status.
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    if (code := os.waitstatus_to_exitcode(status)) != 0:
        raise SystemExit(f"[bench] recipe {recipe!r} failed (exit {code}); its log is above")
    os.environ["MLFLOW_TRACKING_URI"] = store
    newest = tracking.experiment_runs(EXPERIMENT)[0]
    history = tracking.metric_histories(newest["run_id"], ["val_auc", "epoch_seconds", "images_per_second"])
    speeds = [value for _, value in history["images_per_second"]]
    return {
        "recipe": recipe or "defaults",
        "val_auc": [value for _, value in history["val_auc"]],
        "train_seconds": sum(value for _, value in history["epoch_seconds"]),
        "images_per_second": sum(speeds) / len(speeds),
        "wall_seconds": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="dataset root in the CIFAKE layout")
    parser.add_argument("--max_train_per_class", type=int, default=5000)
    parser.add_argument("--max_test_per_class", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--recipes", nargs="+", default=["", "stem_stride=1", "image_size=64"])
    parser.add_argument("--output", default="", help="write the figures to this JSON file")
    arguments = parser.parse_args()

    common = [
        "--data_dir", arguments.data_dir, "--epochs", str(arguments.epochs),
        "--max_train_per_class", str(arguments.max_train_per_class),
        "--max_test_per_class", str(arguments.max_test_per_class),
        "--experiment_name", EXPERIMENT, "--promote", "never", "--device", arguments.device,
    ]  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory(prefix="cifake-recipe-") as folder:
        for recipe in arguments.recipes:
            print(f"[bench] training {recipe or 'defaults'} ...", flush=True)
            results.append(run_recipe(recipe, common, folder))
            result = results[-1]
            print(
                f"[bench] {result['recipe']}: val AUC {result['val_auc'][-1]:.4f}, "
                f"{result['train_seconds'] / 60:.1f} min of training, {result['images_per_second']:.0f} img/s, "
                f"peak {result['peak_rss_mb']:.0f} MB",
                flush=True,
            )

    print("\n| recipe | images/s | training min | peak MB | val AUC by epoch |\n|---|---|---|---|---|")
    for result in results:
        by_epoch = ", ".join(f"{value:.3f}" for value in result["val_auc"])
        minutes = result["train_seconds"] / 60
        peak = result["peak_rss_mb"]
        print(f"| {result['recipe']} | {result['images_per_second']:.0f} | {minutes:.1f} | {peak:.0f} | {by_epoch} |")
    if arguments.output:
        Path(arguments.output).write_text(json.dumps({"arguments": vars(arguments), "results": results}, indent=2))


if __name__ == "__main__":
    main()
