"""Recipe sweep: validation AUC against training time for a few training recipes, on capped data.

Each recipe is a set of config overrides (`image_size=64`, `stem_stride=1 lr=0.004`, ...) on top of the
defaults. Every recipe runs the real training stage (`experiments/stage.py train`, with `promote=never`)
in its own process against its own SQLite store, so the figures are the pipeline's own: the kept model's
validation AUC (`best_val_auc`, with `flip_tta` when on), the per-epoch one (one view of each image) and
training seconds as logged to MLflow. Only validation figures are reported: the sweep picks a recipe, the test
split judges it once afterwards in a full run. `--parallel N` trains N recipes at once (a GPU has room for
several; their seconds then include each other's load), `--work_dir` keeps each recipe's store in a subfolder
instead of a throwaway folder.

Usage:
    .venv/bin/python bench/recipe.py --data_dir /tmp/cifake --max_train_per_class 5000 --epochs 3 \\
        --recipes "" "stem_stride=1" "image_size=64" --output recipe.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cifake_core import tracking  # noqa: E402

EXPERIMENT = "recipe-sweep"
# The store to read is chosen through MLFLOW_TRACKING_URI: one reader at a time.
_STORE_READ = threading.Lock()


def _overrides(recipe: str) -> list[str]:
    """`"image_size=64 lr=0.004"` -> `["--image_size", "64", "--lr", "0.004"]`."""
    flags: list[str] = []
    for item in recipe.split():
        key, _, value = item.partition("=")
        flags += [f"--{key}", value]
    return flags


def run_recipe(recipe: str, common: list[str], folder: str) -> dict:
    """Train one recipe in a child process working in `folder` (its store and artifacts); its logged figures."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{folder}/recipe.db"
    # One process a recipe (`--processes 1`), whatever the cores: its figures and peak memory are that process's.
    command = [sys.executable, str(ROOT / "experiments" / "stage.py"), "train", "--processes", "1", *common]
    command += _overrides(recipe)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONPATH": path}
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=folder, env=environment, stdout=subprocess.DEVNULL)
    # wait4, not wait: the child's own peak resident memory comes with its exit status.
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    if (code := os.waitstatus_to_exitcode(status)) != 0:
        raise SystemExit(f"[bench] recipe {recipe!r} failed (exit {code}); its log is above")
    with _STORE_READ:
        os.environ["MLFLOW_TRACKING_URI"] = store
        newest = tracking.experiment_runs(EXPERIMENT)[0]
        history = tracking.metric_histories(newest["run_id"], ["val_auc", "epoch_seconds", "images_per_second"])
    speeds = [value for _, value in history["images_per_second"]]
    return {
        "recipe": recipe or "defaults",
        "best_val_auc": newest["metrics"]["best_val_auc"],
        "val_auc_one_view": [value for _, value in history["val_auc"]],
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
    parser.add_argument("--parallel", type=int, default=1, help="recipes trained at once")
    parser.add_argument("--work_dir", default="", help="keep each recipe's store in a subfolder here")
    parser.add_argument("--output", default="", help="write the figures to this JSON file")
    arguments = parser.parse_args()

    common = [
        "--data_dir", arguments.data_dir, "--epochs", str(arguments.epochs),
        "--max_train_per_class", str(arguments.max_train_per_class),
        "--max_test_per_class", str(arguments.max_test_per_class),
        "--experiment_name", EXPERIMENT, "--promote", "never", "--device", arguments.device,
    ]  # fmt: skip

    def train_and_report(numbered: tuple[int, str]) -> dict:
        index, recipe = numbered
        print(f"[bench] training {recipe or 'defaults'} ...", flush=True)
        result = run_recipe(recipe, common, str(Path(work_dir) / f"recipe{index}"))
        print(
            f"[bench] {result['recipe']}: val AUC {result['best_val_auc']:.4f}, "
            f"{result['train_seconds'] / 60:.1f} min of training, {result['images_per_second']:.0f} img/s, "
            f"peak {result['peak_rss_mb']:.0f} MB",
            flush=True,
        )
        return result

    with contextlib.ExitStack() as stack:
        work_dir = arguments.work_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="cifake-recipe-"))
        with ThreadPoolExecutor(max_workers=arguments.parallel) as pool:
            results = list(pool.map(train_and_report, enumerate(arguments.recipes)))

    print("\n| recipe | images/s | training min | peak MB | val AUC | val AUC by epoch (one view) |")
    print("|---|---|---|---|---|---|")
    for result in results:
        by_epoch = ", ".join(f"{value:.3f}" for value in result["val_auc_one_view"])
        minutes = result["train_seconds"] / 60
        peak = result["peak_rss_mb"]
        kept = result["best_val_auc"]
        print(
            f"| {result['recipe']} | {result['images_per_second']:.0f} | {minutes:.1f} | {peak:.0f} | {kept:.4f} "
            f"| {by_epoch} |"
        )
    if arguments.output:
        Path(arguments.output).write_text(json.dumps({"arguments": vars(arguments), "results": results}, indent=2))


if __name__ == "__main__":
    main()
