"""The `cifake` command: the same stages as the MLproject entry points, with the same flag names.

Every configuration field is a flag of the same name (`--epochs 8`), applied over `--config FILE.yaml`,
applied over the defaults. Mistakes a user can make end with one line naming the problem and the fix
(exit status 2); Ctrl-C and SIGTERM end the run KILLED (exit status 130).

Usage:
    cifake train --config experiments/default.yaml --epochs 8
    cifake data prepare --data_dir /data/cifake --output_dir outputs/data
    cifake data download /data/cifake
    cifake evaluate --model_uri models:/cifake-detector@production --data_dir /data/cifake
    cifake promote --version 3
    cifake serve --port 5001
    cifake predict photos/ --output results.csv --explain gradcam/
    cifake dashboard --port 8501
    cifake server --backend_store_uri postgresql://mlflow@db:5432/mlflow --artifacts_destination s3://bucket/mlflow
    cifake train --processes 1                                          # on a CPU: one process, not the auto 2
    torchrun --nproc_per_node 4 experiments/stage.py train --epochs 8   # the same train, data-parallel
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from cifake_core.config import FIELD_TYPES, FIELDS, RunConfig, load_config
from cifake_core.errors import (
    INTERRUPTED_STATUS,
    LAUNCHER_REPORTS_ERRORS,
    PEER_ENDED_STATUS,
    CifakeError,
    ConfigError,
    PeerEndedError,
)

DEFAULT_MODEL_URI = "models:/cifake-detector@production"
_EVALUATE_FIELDS = ("data_dir", "max_test_per_class", "seed", "num_workers", "experiment_name", "eval_dirs")
_PROMOTE_FIELDS = ("registered_model_name", "experiment_name")


def _add_config_flags(parser: argparse.ArgumentParser, names: Sequence[str] = tuple(FIELDS)) -> None:
    parser.add_argument("--config", default="", help="experiment YAML file (e.g. experiments/default.yaml)")
    defaults = RunConfig().flat()
    for name in names:
        _, item = FIELDS[name]
        parser.add_argument(
            f"--{name}",
            default=None,
            metavar=FIELD_TYPES[name].__name__.upper(),
            help=f"{item.metadata['help']} (default: {defaults[name]!r})",
        )


def _config_from(arguments: argparse.Namespace) -> RunConfig:
    if arguments.config and os.environ.get("MLFLOW_RUN_ID"):
        # Under `mlflow run` every MLproject parameter arrives as a flag and would silently override the file.
        raise ConfigError(
            "a --config file cannot be combined with `mlflow run`: pass the settings as -P parameters, or run "
            f"`cifake train --config {arguments.config}`"
        )
    overrides = {name: getattr(arguments, name) for name in FIELDS if getattr(arguments, name, None) is not None}
    return load_config(arguments.config or None, overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifake", description="Train, track and ship a detector of AI images.")
    stages = parser.add_subparsers(dest="stage", required=True)

    _add_config_flags(stages.add_parser("train", help="train, export, log, register and promote (MLproject main)"))

    data = stages.add_parser("data", help="download or prepare a dataset").add_subparsers(dest="action", required=True)
    download = data.add_parser("download", help="fetch CIFAKE from Kaggle with kagglehub")
    download.add_argument("destination", type=Path, help="folder to put CIFAKE in")
    prepare = data.add_parser("prepare", help="write manifest.csv and dataset_summary.json (MLproject prepare_data)")
    _add_config_flags(
        prepare, [*(n for n, (section, _) in FIELDS.items() if section == "data"), "num_workers", "experiment_name"]
    )
    prepare.add_argument("--output_dir", type=Path, default=Path("outputs/data"), help="where to write the files")

    evaluate = stages.add_parser("evaluate", help="score a registered version or run on a dataset's test split")
    evaluate.add_argument(
        "--model_uri", default=DEFAULT_MODEL_URI, help="models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID/model"
    )
    _add_config_flags(evaluate, _EVALUATE_FIELDS)

    promote = stages.add_parser("promote", help="point the `production` alias at a version (promote or roll back)")
    promote.add_argument("--version", required=True, help="registered version number to make production")
    _add_config_flags(promote, _PROMOTE_FIELDS)

    serve = stages.add_parser("serve", help="serve a model over REST with `mlflow models serve` (default: production)")
    serve.add_argument("--model_uri", default=DEFAULT_MODEL_URI, help="model to serve; an alias is resolved now")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    serve.add_argument("--port", type=_port, default=5001, help="TCP port")
    serve.add_argument("--workers", type=_positive, default=1, help="server worker processes")

    predict = stages.add_parser("predict", help="classify image files and folders (recursive)")
    predict.add_argument("paths", nargs="+", type=Path, help="image files and folders")
    predict.add_argument("--model_uri", default=DEFAULT_MODEL_URI, help="model to use")
    predict.add_argument("--threshold", default="default", help="a name from thresholds.json or a number in [0, 1]")
    predict.add_argument("--output", type=Path, default=None, help="results.csv or results.jsonl (default: a table)")
    predict.add_argument(
        "--explain", type=Path, default=None, metavar="DIR", help="write a Grad-CAM overlay of each image to DIR"
    )

    server = stages.add_parser("server", help="run a shared MLflow tracking server and registry (`mlflow server`)")
    server.add_argument(
        "--backend_store_uri",
        required=True,
        help="database for runs and the registry: postgresql://USER:PASSWORD@HOST:PORT/DB (sqlite:///PATH alone)",
    )
    server.add_argument(
        "--artifacts_destination",
        default="./mlartifacts",
        help="where the server stores artifacts: a folder or an object store (s3://, gs://, wasbs://)",
    )
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    server.add_argument("--port", type=_port, default=5000, help="TCP port")
    server.add_argument("--workers", type=_positive, default=2, help="server worker processes")

    dashboard = stages.add_parser("dashboard", help="open the Streamlit dashboard: runs, models, classify")
    dashboard.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    dashboard.add_argument("--port", type=_port, default=8501, help="TCP port")
    return parser


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port between 1 and 65535, got {text!r}")
    return int(text)


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _run(arguments: argparse.Namespace, argv: Sequence[str]) -> int | None:
    if arguments.stage == "serve":
        return _serve(arguments)
    if arguments.stage == "predict":
        return _predict(arguments)
    if arguments.stage == "dashboard":
        return _dashboard(arguments)
    if arguments.stage == "server":
        return _server(arguments)
    config = None if arguments.stage == "data" and arguments.action == "download" else _config_from(arguments)
    # Imported after the config is checked, so a mistyped flag is answered without loading torch and MLflow; a
    # launcher of training processes never loads MLflow or the model (pipeline), which only its processes use.
    if arguments.stage == "train":
        from cifake_core import distributed
        from cifake_core.data import usable_cores

        if not distributed.launched_by_torchrun():
            device_type = distributed.resolve_device(config.train.device).type
            processes = distributed.process_count(config.train.processes, device_type, usable_cores())
            if processes > 1:
                from cifake_core.launch import launch_training

                return launch_training(config, processes, argv)
    from cifake_core import pipeline

    if arguments.stage == "train":
        result = pipeline.train(config)
        if result is None:  # a torchrun rank other than 0: rank 0 reports
            return None
        print(
            json.dumps(
                {
                    "run_id": result.run_id,
                    "version": result.version,
                    "promoted": result.promoted,
                    "reason": result.promotion_reason,
                    **result.metrics,
                },
                indent=2,
            )
        )
    elif arguments.stage == "data" and arguments.action == "download":
        from cifake_core.data import download_cifake

        print(f"CIFAKE is ready in {download_cifake(arguments.destination)}")
    elif arguments.stage == "data":
        prepared = pipeline.prepare_data(config, arguments.output_dir)
        summary = {
            key: prepared.summary[key] for key in ("dataset", "fingerprint", "counts", "duplicates", "skipped_count")
        }
        print(json.dumps(summary, indent=2))
        print(f"wrote {arguments.output_dir / 'manifest.csv'} and {arguments.output_dir / 'dataset_summary.json'}")
    elif arguments.stage == "evaluate":
        print(json.dumps(pipeline.evaluate_model(arguments.model_uri, config), indent=2))
    elif arguments.stage == "promote":
        previous = pipeline.promote(
            config.publish.registered_model_name, arguments.version, config.publish.experiment_name
        )
        print(f"{config.publish.registered_model_name}@production: v{previous or '-'} -> v{arguments.version}")


def _exec_module(module: str, arguments: list[str]) -> None:
    """Replace this process by `python -m MODULE ARGUMENTS`, so the server gets its signals directly."""
    os.execv(sys.executable, [sys.executable, "-m", module, *arguments])


def _serve(arguments: argparse.Namespace) -> None:
    from cifake_core import tracking

    pinned_uri = tracking.pin_model_uri(arguments.model_uri)
    print(
        f"serving {pinned_uri} (resolved from {arguments.model_uri}) on http://{arguments.host}:{arguments.port}; "
        "an alias is resolved at start-up, so restart the server after a promotion",
        flush=True,
    )
    _exec_module(
        "mlflow",
        ["models", "serve", "-m", pinned_uri, "--env-manager", "local", "-h", arguments.host, "-p", str(arguments.port)]
        + ["-w", str(arguments.workers)],
    )


def _predict(arguments: argparse.Namespace) -> int:
    from cifake_core.predict import (
        check_explain_folder,
        check_output,
        collect_images,
        explain_results,
        load_scorer,
        predict_files,
        write_results,
    )

    check_output(arguments.output)
    check_explain_folder(arguments.explain)
    files = collect_images(arguments.paths)
    scorer = load_scorer(arguments.model_uri)
    results = predict_files(files, scorer, arguments.threshold)
    if arguments.explain:
        results = explain_results(results, files, arguments.model_uri, scorer.image_size, arguments.explain)
    write_results(results, arguments.output)
    failed = int((results["error"] != "").sum())
    print(
        f"{len(results) - failed} classified, {failed} failed"
        + (f"; results in {arguments.output}" if arguments.output else "")
        + (f"; Grad-CAM overlays in {arguments.explain}" if arguments.explain else ""),
        file=sys.stderr,
    )
    return 1 if failed else 0


def _server(arguments: argparse.Namespace) -> None:
    from cifake_core.tracking_server import check_backend_store, server_arguments

    check_backend_store(arguments.backend_store_uri)
    print(f"MLflow tracking server on http://{arguments.host}:{arguments.port}", flush=True)
    store, artifacts = arguments.backend_store_uri, arguments.artifacts_destination
    _exec_module("mlflow", server_arguments(store, artifacts, arguments.host, arguments.port, arguments.workers))


def _dashboard(arguments: argparse.Namespace) -> None:
    app = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"
    if not app.is_file():
        raise CifakeError(f"{app} is missing: the dashboard runs from a source checkout (`pip install -e .` in it)")
    _exec_module(
        "streamlit",
        ["run", str(app), "--server.address", arguments.host, "--server.port", str(arguments.port)]
        + ["--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal"],
    )


def _log_level(environment: Mapping[str, str]) -> int:
    """Under torchrun rank 0 speaks for all. The processes of one node meet the same data and model problems, so
    only the first of each node warns (once per node, as it alone writes that node's caches); the others report
    errors alone."""
    if environment.get("RANK", "0") == "0":
        return logging.INFO
    return logging.WARNING if environment.get("LOCAL_RANK", "0") == "0" else logging.ERROR


def _launcher_error_file() -> str | None:
    """In a training process that `cifake train` started (`distributed.run_processes`), torchrun's error file for
    it, whose message the launching process prints; elsewhere None."""
    return os.environ.get("TORCHELASTIC_ERROR_FILE") if os.environ.get(LAUNCHER_REPORTS_ERRORS) else None


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    logging.getLogger("cifake_core").setLevel(_log_level(os.environ))
    previous_handler = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        status = _run(arguments, sys.argv[1:] if argv is None else argv)
    except (CifakeError, OSError) as error:  # OSError: a folder or file the user named that cannot be written
        message = f"cifake {arguments.stage}: error: {error}"
        if error_file := _launcher_error_file():
            Path(error_file).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))
        else:
            print(message, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if not _launcher_error_file():  # the launcher tells of the interruption, or of the failure that caused it
            print(f"cifake {arguments.stage}: interrupted; any open MLflow run was ended as KILLED", file=sys.stderr)
        return INTERRUPTED_STATUS
    except PeerEndedError:
        if not _launcher_error_file():
            raise
        # The peer that ended first is the cause, and the launcher names it: this process's traceback would bury it.
        print(
            f"cifake {arguments.stage}: training process {os.environ.get('RANK', '?')} stopped: another training "
            "process of its group ended",
            file=sys.stderr,
        )
        return PEER_ENDED_STATUS
    finally:
        # Once the work is over nothing is left to end cleanly: torchrun's SIGTERM to a process on its way out would
        # otherwise raise KeyboardInterrupt inside an exit handler, with a traceback of its own.
        signal.signal(signal.SIGTERM, previous_handler)
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
