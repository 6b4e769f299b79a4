"""Batch prediction: classify image files and folders with a registered model, onnxruntime only.

Folders are searched recursively for png, jpg, jpeg, webp, bmp, gif and tiff files. A file that cannot be
read or decoded gets its own row with the reason and never stops the run. Results go to the terminal as a
table, or to `.csv` / `.jsonl`. With `--explain DIR`, a Grad-CAM overlay of each classified image is written
there (`explain.py`, from the PyTorch checkpoint of the model's run: the only step that needs torch).

Usage:
    scorer = load_scorer("models:/cifake-detector@production")
    files = collect_images([Path("photos")])
    results = predict_files(files, scorer, threshold="default")
    results = explain_results(results, files, "models:/cifake-detector@production", scorer.image_size, Path("why"))
    write_results(results, Path("results.csv"))
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from cifake_core import tracking
from cifake_core.data import IMAGE_EXTENSIONS
from cifake_core.errors import CifakeError
from cifake_core.files import printable_name
from cifake_core.pyfunc_model import CifakeOnnxModel

OUTPUT_FORMATS = (".csv", ".jsonl")
PREDICT_BATCH = 256


class PredictInputError(CifakeError, ValueError):
    """A path to classify or an output file that cannot be used."""


def collect_images(paths: Sequence[Path]) -> list[Path]:
    """The image files named, and those found recursively in the folders named, in a stable order."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
        elif path.is_file():
            files.append(path)  # named explicitly: tried whatever its extension, and reported if unreadable
        else:
            raise PredictInputError(f"{path} does not exist: pass image files or folders that hold them")
    if not files:
        raise PredictInputError(
            f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {', '.join(map(str, paths))}"
        )
    return files


def load_scorer(model_uri: str) -> CifakeOnnxModel:
    """The cifake pyfunc model behind `model_uri`, unwrapped so that files can be scored in batches."""
    scorer = tracking.load_pyfunc(model_uri).unwrap_python_model()
    if not isinstance(scorer, CifakeOnnxModel):
        raise PredictInputError(f"{model_uri} is not a cifake detector (it is a {type(scorer).__name__})")
    return scorer


def predict_files(files: Sequence[Path], scorer: CifakeOnnxModel, threshold: str) -> pd.DataFrame:
    """One row per file: path, prob_ai, label, threshold, error, model_version."""
    value = scorer.resolve_threshold(threshold)
    chunks = []
    with tqdm(
        total=len(files), unit="image", desc="classifying", disable=None if len(files) > PREDICT_BATCH else True
    ) as bar:
        for start in range(0, len(files), PREDICT_BATCH):
            batch = files[start : start + PREDICT_BATCH]
            chunks.append(scorer.classify(batch, value).assign(path=[printable_name(str(path)) for path in batch]))
            bar.update(len(batch))
    results = pd.concat(chunks, ignore_index=True)
    return results[["path", *[column for column in results.columns if column != "path"]]]


def write_results(results: pd.DataFrame, output: Path | None) -> None:
    """A table on stdout, or a `.csv` / `.jsonl` file chosen by the output's extension."""
    if output is None:
        sys.stdout.write(results.to_string(index=False, float_format=lambda x: f"{x:.4f}") + "\n")
    elif output.suffix.lower() == ".csv":
        results.to_csv(output, index=False)
    else:
        results.to_json(output, orient="records", lines=True)


def check_output(output: Path | None) -> None:
    """Refuse an output file we cannot write before any image is classified."""
    if output is None:
        return
    if output.suffix.lower() not in OUTPUT_FORMATS:
        raise PredictInputError(f"--output must end in {' or '.join(OUTPUT_FORMATS)}, got {output}")
    if not output.parent.is_dir():
        raise PredictInputError(f"--output folder {output.parent} does not exist")


def check_explain_folder(folder: Path | None) -> None:
    """Refuse, before any image is classified, an --explain folder that cannot hold the overlays; create it."""
    if folder is None:
        return
    if folder.exists() and not folder.is_dir():
        raise PredictInputError(f"--explain {folder} is a file: pass a folder for the overlays")
    folder.mkdir(parents=True, exist_ok=True)


def load_checkpoint_model(model_uri: str):
    """The PyTorch detector from the checkpoint that `model_uri`'s run logged, in eval mode on the CPU: what
    explanations need (importing torch, which scoring never does)."""
    from cifake_core.models import load_checkpoint

    with tempfile.TemporaryDirectory(prefix="cifake-checkpoint-") as download:
        model, _ = load_checkpoint(tracking.download_checkpoint(model_uri, Path(download)))
    return model


def explain_results(
    results: pd.DataFrame, files: Sequence[Path], model_uri: str, image_size: int, folder: Path
) -> pd.DataFrame:
    """The results of `files` with a column `explanation`: the Grad-CAM overlay written in `folder` for each
    classified image (empty for rows that failed), made with the checkpoint of `model_uri`'s run."""
    from cifake_core.explain import write_explanations  # torch is loaded only when explanations are asked for

    model = load_checkpoint_model(model_uri)
    classified = (results["error"] == "").to_numpy()
    # The files themselves: a results path is a name made printable, which may name no file.
    written = write_explanations(
        model, [path for path, ok in zip(files, classified, strict=True) if ok], image_size, folder
    )
    explanations = pd.Series("", index=results.index, dtype=object)
    explanations[classified] = [str(path) if path else "" for path in written]
    return results.assign(explanation=explanations)
