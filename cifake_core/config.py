"""Typed, validated configuration for every cifake stage.

One frozen dataclass per concern (data, model, training, evaluation, publishing), built in three layers: the defaults
here, then a flat YAML file from `experiments/`, then command-line flags. Every field name is also the CLI
flag and the MLproject parameter, so the three can never disagree. Values are validated once, here; code
further down takes the typed fields it needs and never re-checks them.

Usage:
    config = load_config("experiments/default.yaml", {"epochs": "3"})
    config.train.epochs  # -> 3
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cifake_core import FOLDER_FOR_CLASS
from cifake_core.errors import ConfigError
from cifake_core.files import printable_name

THRESHOLD_NAMES = ("0.5", "f1", "youden", "fpr_1pct")
PROMOTE_CHOICES = ("auto", "always", "never")
PRETRAINED_CHOICES = ("auto", "true", "false")
SWITCH_CHOICES = ("true", "false")
OPTIMIZER_CHOICES = ("adamw", "sgd")
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# batch_size=0 picks these. A GPU runs launch-bound at 128; at 512 training diverged for an epoch at the one-cycle
# peak and ended lower (val AUC 0.968 against 0.979-0.982 at 256 on CIFAKE). 256 is also the global batch of the
# two-process CPU run the README reports (bench/gpu.sh, docs/BENCHMARKS.md).
BATCH_SIZE = 128
GPU_BATCH_SIZE = 256


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class DataConfig:
    data_dir: str = field(default="", metadata=_help("dataset root in the CIFAKE layout; empty = demo data"))
    val_fraction: float = field(default=0.1, metadata=_help("share of train held out for validation"))
    max_train_per_class: int = field(default=0, metadata=_help("cap on train+val images per class; 0 = all"))
    max_test_per_class: int = field(default=0, metadata=_help("cap on test images per class; 0 = all"))
    seed: int = field(default=42, metadata=_help("seed for splits, initialisation and batch order"))


@dataclass(frozen=True)
class ModelConfig:
    image_size: int = field(default=32, metadata=_help("square input side in pixels (CIFAKE is 32)"))
    pretrained: str = field(default="auto", metadata=_help("ImageNet weights from the hub: auto|true|false"))
    pretrained_weights: str = field(default="", metadata=_help("local weights file; overrides the hub"))
    stem_stride: int = field(
        default=1, metadata=_help("stride of the first convolution: 1 (keeps 32 px inputs whole) or 2 (timm's)")
    )
    flip_tta: str = field(
        default="true",
        metadata=_help(
            "score each image as the mean of its own and its mirror image's logits, wherever the model predicts "
            "(the kept model's validation, test, ONNX export, serving; not the check after each epoch): true|false; "
            "doubles the cost of a prediction"
        ),
    )


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = field(default=22, metadata=_help("training epochs"))
    fine_epochs: int = field(
        default=10,
        metadata=_help(
            "the last N epochs train at stem_stride, and the kept epoch is picked among them (only they are "
            "validated); the epochs before them train with a stride-2 stem (coarse: at 32 px about 2x cheaper a step "
            "on a CPU); 0 = every epoch at stem_stride"
        ),
    )
    select_fraction: float = field(
        default=0.4,
        metadata=_help(
            "each epoch after the first trains on this fraction of the training images, those with the highest "
            "last loss most likely (selective backprop), at that fraction of the epoch's cost; 1 = all"
        ),
    )
    batch_size: int = field(
        default=0,
        metadata=_help(
            f"images per optimisation step and process; 0 = auto: {GPU_BATCH_SIZE} on CUDA, {BATCH_SIZE} elsewhere"
        ),
    )
    optimizer: str = field(
        default="sgd",
        metadata=_help(
            "sgd (Nesterov momentum) or adamw; each wants its own lr and weight_decay, AdamW's as measured in "
            "experiments/cifake_adamw.yaml"
        ),
    )
    lr: float = field(default=0.2, metadata=_help("peak learning rate of the one-cycle schedule"))
    weight_decay: float = field(
        default=5e-4,
        metadata=_help(
            "weight decay of the convolution and linear weights: AdamW's decoupled, SGD's added to the gradient"
        ),
    )
    label_smoothing: float = field(
        default=0.0, metadata=_help("share of each training target spread over both classes; 0 = hard labels")
    )
    grad_clip_norm: float = field(
        default=1.0, metadata=_help("largest gradient norm a step applies (larger ones scaled down); 0 = no clipping")
    )
    device: str = field(default="auto", metadata=_help("auto|cpu|cuda|cuda:N|mps"))
    processes: int = field(
        default=0,
        metadata=_help(
            "training processes this command starts on this machine, one torchrun group (data-parallel); 0 = auto: "
            "2 on a CPU with at least 2 cores, else 1; ignored when torchrun started this process"
        ),
    )
    num_workers: int = field(
        default=-1, metadata=_help("processes that decode images; 0 = in-process, -1 = one per available CPU core")
    )
    translate: int = field(
        default=2,
        metadata=_help(
            "largest random shift of a training image, in pixels along each axis (the uncovered border filled by "
            "reflection); 0 = none"
        ),
    )
    augment: str = field(
        default="false", metadata=_help("train on degraded copies too (down/up-scale, blur, noise, crop): true|false")
    )

    def for_device(self, device_type: str) -> TrainConfig:
        """This config with `batch_size=0` (auto) replaced by the size for `device_type` (`cuda`, `cpu`, `mps`)."""
        if self.batch_size:
            return self
        return dataclasses.replace(self, batch_size=GPU_BATCH_SIZE if device_type == "cuda" else BATCH_SIZE)


@dataclass(frozen=True)
class EvalConfig:
    eval_dirs: str = field(
        default="",
        metadata=_help("extra test sets, comma-separated folders holding test/FAKE and test/REAL, or FAKE and REAL"),
    )

    @property
    def folders(self) -> dict[str, Path]:
        """Each extra test set's folder holding FAKE/ and REAL/, by its metric name (`eval_dir_name`), in order."""
        return {eval_dir_name(item): eval_dir_classes(item) for item in eval_dir_items(self.eval_dirs)}


@dataclass(frozen=True)
class PublishConfig:
    experiment_name: str = field(default="cifake", metadata=_help("MLflow experiment"))
    registered_model_name: str = field(default="cifake-detector", metadata=_help("MLflow registered model"))
    promote: str = field(default="auto", metadata=_help("alias `production` for the new version: auto|always|never"))
    default_threshold: str = field(
        default="f1", metadata=_help("threshold the model applies unless a request names one: 0.5|f1|youden|fpr_1pct")
    )


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluation: EvalConfig = EvalConfig()
    publish: PublishConfig = PublishConfig()

    def flat(self) -> dict[str, Any]:
        """All fields as one flat mapping, as logged to MLflow and written to `config.yaml`."""
        return {name: getattr(getattr(self, section), name) for name, (section, _) in FIELDS.items()}


def eval_dir_items(eval_dirs: str) -> list[str]:
    """The folders named in an `eval_dirs` value: comma-separated, blanks around each ignored."""
    return [item.strip() for item in eval_dirs.split(",") if item.strip()]


def eval_dir_classes(folder: str | Path) -> Path | None:
    """The folder holding an extra test set's FAKE/ and REAL/: `folder/test` (the CIFAKE layout) or `folder`."""
    folder = Path(folder).expanduser()
    for candidate in (folder / "test", folder):
        if all((candidate / name).is_dir() for name in FOLDER_FOR_CLASS.values()):
            return candidate
    return None


def eval_dir_name(folder: str | Path) -> str:
    """A folder's name as a metric-key part (`eval_<name>_auc`): `/data/SDXL v1/` -> `sdxl_v1`; a folder named
    `test` is named after its parent, since `/data/sdxl/test` is the sdxl test set."""
    folder = Path(folder).expanduser().resolve()
    name = folder.parent.name if folder.name.lower() == "test" else folder.name
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _collect_fields() -> tuple[dict[str, tuple[str, dataclasses.Field]], dict[str, type]]:
    fields: dict[str, tuple[str, dataclasses.Field]] = {}
    types: dict[str, type] = {}
    for section in dataclasses.fields(RunConfig):
        section_type = type(section.default)
        hints = typing.get_type_hints(section_type)
        for item in dataclasses.fields(section_type):
            if item.name in fields:
                raise RuntimeError(f"config field {item.name!r} is defined in two sections")
            fields[item.name] = (section.name, item)
            types[item.name] = hints[item.name]
    return fields, types


FIELDS, FIELD_TYPES = _collect_fields()


def _coerce(name: str, value: Any) -> Any:
    """Turn a YAML or CLI value into the field's type, or say exactly what is wrong with it."""
    expected = FIELD_TYPES[name]
    if expected is str:
        if isinstance(value, bool):  # YAML reads `pretrained: true` as a boolean
            return str(value).lower()
        if isinstance(value, (int, float)):
            return str(value)
        if isinstance(value, str):
            if printable_name(value) != value:  # a path given in bytes that are not UTF-8
                raise ConfigError(
                    f"{name} must be UTF-8 text, as MLflow records it, got '{printable_name(value)}': for a path, "
                    "rename the folder or file, or link to it under a UTF-8 name"
                )
            return value.strip()
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    raise ConfigError(f"{name} must be {'an integer' if expected is int else 'a ' + expected.__name__}, got {value!r}")


def _one_of(values: dict[str, Any], name: str, choices: tuple[str, ...]) -> tuple[str, bool, str]:
    return name, values[name] in choices, "one of " + "|".join(choices)


def _check(values: dict[str, Any]) -> None:
    # The figure only for a learning rate that passes its own rule: lr 0 is told as lr's mistake, not a crash.
    decay_bound = f"1 / lr ({1 / values['lr']:g})" if values["lr"] > 0 else "1 / lr"
    rules: list[tuple[str, bool, str]] = [
        ("val_fraction", 0.0 < values["val_fraction"] < 1.0, "a fraction strictly between 0 and 1, e.g. 0.1"),
        ("max_train_per_class", values["max_train_per_class"] >= 0, "0 (no cap) or a positive count"),
        ("max_test_per_class", values["max_test_per_class"] >= 0, "0 (no cap) or a positive count"),
        ("seed", values["seed"] >= 0, "a non-negative integer"),
        ("image_size", 32 <= values["image_size"] <= 512, "between 32 and 512 pixels"),
        ("stem_stride", values["stem_stride"] in (1, 2), "1 or 2"),
        _one_of(values, "pretrained", PRETRAINED_CHOICES),
        ("epochs", values["epochs"] >= 1, "at least 1"),
        ("fine_epochs", values["fine_epochs"] >= 0, "0 (every epoch) or a positive count"),
        ("select_fraction", 0.0 < values["select_fraction"] <= 1.0, "a fraction above 0 and at most 1, e.g. 0.5"),
        (
            "batch_size",
            values["batch_size"] == 0 or values["batch_size"] >= 2,
            "0 (auto) or at least 2 (BatchNorm needs two images per batch)",
        ),
        _one_of(values, "optimizer", OPTIMIZER_CHOICES),
        ("lr", 0.0 < values["lr"] < 1.0, "a positive learning rate below 1, e.g. 0.2"),
        (  # decay shrinks the weights by lr x weight_decay at each step: at 1 or more it would zero or flip them
            "weight_decay",
            0.0 <= values["weight_decay"] and values["lr"] * values["weight_decay"] < 1.0,
            f"0 (none) or a positive decay below {decay_bound}, e.g. 0.0005",
        ),
        ("label_smoothing", 0.0 <= values["label_smoothing"] <= 0.5, "between 0 and 0.5, e.g. 0.1"),
        ("grad_clip_norm", values["grad_clip_norm"] >= 0.0, "0 (no clipping) or a positive norm, e.g. 1.0"),
        ("device", bool(_DEVICE_PATTERN.match(values["device"])), "auto, cpu, cuda, cuda:N or mps"),
        ("processes", values["processes"] >= 0, "0 (auto) or a number of processes, e.g. 1 for this process only"),
        ("num_workers", values["num_workers"] >= -1, "-1 (one per core), 0 (in-process) or a number of processes"),
        (
            "translate",
            0 <= values["translate"] <= values["image_size"] // 4,
            f"between 0 and a quarter of image_size ({values['image_size'] // 4} pixels)",
        ),
        _one_of(values, "augment", SWITCH_CHOICES),
        _one_of(values, "flip_tta", SWITCH_CHOICES),
        ("experiment_name", bool(values["experiment_name"]), "a non-empty MLflow experiment name"),
        ("registered_model_name", bool(values["registered_model_name"]), "a non-empty registered model name"),
        _one_of(values, "promote", PROMOTE_CHOICES),
        _one_of(values, "default_threshold", THRESHOLD_NAMES),
    ]
    problems = [f"{name} must be {expected}, got {values[name]!r}" for name, ok, expected in rules if not ok]
    weights = values["pretrained_weights"]
    if weights and not Path(weights).expanduser().is_file():
        problems.append(f"pretrained_weights must be an existing weights file, got {weights!r}")
    problems.extend(_eval_dir_problems(values["eval_dirs"]))
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def _eval_dir_problems(eval_dirs: str) -> list[str]:
    problems: list[str] = []
    seen: dict[str, str] = {}
    for item in eval_dir_items(eval_dirs):
        name = eval_dir_name(item)
        if not Path(item).expanduser().is_dir():
            problems.append(f"eval_dirs: {item!r} is not a folder; pass existing folders, separated by commas")
        elif eval_dir_classes(item) is None:
            problems.append(
                f"eval_dirs: {item!r} holds neither test/FAKE and test/REAL nor FAKE and REAL; put its AI-generated "
                "images in FAKE/ and its photographs in REAL/"
            )
        elif not name or name == "test":
            problems.append(f"eval_dirs: {item!r} gives no usable name for its metrics: rename the folder")
        elif name in seen:
            problems.append(
                f"eval_dirs: {seen[name]!r} and {item!r} would both log as eval_{name}_*: rename one of the folders"
            )
        seen.setdefault(name, item)
    return problems


def _unknown_key_error(key: str, origin: str) -> ConfigError:
    close = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown configuration key {key!r} in {origin}.{hint} Valid keys: {', '.join(FIELDS)}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A flat `key: value` experiment file, as a mapping; keys are checked by `load_config`."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder; pass a YAML file such as experiments/default.yaml")
    if not path.is_file():
        raise ConfigError(
            f"config file {str(path)!r} does not exist; pass a YAML file such as experiments/default.yaml"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read config file {str(path)!r}: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
            f"{error.start}): save it as UTF-8"
        ) from error
    try:
        content = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from error
    if not isinstance(content, dict):
        raise ConfigError(f"config file {str(path)!r} must be a flat mapping of `key: value` lines")
    return content


def load_config(yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults, then the YAML file, then `overrides` (CLI flags); unknown keys and bad values raise ConfigError."""
    values = RunConfig().flat()
    layers = [(read_yaml(yaml_path) if yaml_path else {}, str(yaml_path)), (overrides or {}, "the command line")]
    for layer, origin in layers:
        for key, value in layer.items():
            if key not in FIELDS:
                raise _unknown_key_error(key, origin)
            if value is not None:
                values[key] = _coerce(key, value)
    _check(values)
    sections: dict[str, dict[str, Any]] = {}
    for name, (section, _) in FIELDS.items():
        sections.setdefault(section, {})[name] = values[name]
    section_types = {item.name: type(item.default) for item in dataclasses.fields(RunConfig)}
    return RunConfig(**{name: section_types[name](**kwargs) for name, kwargs in sections.items()})
