"""The config contract: defaults, YAML, then flags; validation; and MLproject parameters that match the fields."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cifake_core.cli import build_parser, main
from cifake_core.config import BATCH_SIZE, FIELD_TYPES, FIELDS, GPU_BATCH_SIZE, RunConfig, load_config
from cifake_core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
MLPROJECT_TYPES = {str: "string", int: "int", float: "float"}


def test_defaults_then_yaml_then_overrides(tmp_path: Path):
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("epochs: 3\nlr: 0.01\npretrained: false\n")
    config = load_config(experiment, {"epochs": "5"})
    assert config.train.epochs == 5  # the flag wins over the file
    assert config.train.lr == 0.01  # the file wins over the default
    assert config.model.pretrained == "false"  # YAML's boolean becomes the choice string
    assert config.train.batch_size == RunConfig().train.batch_size


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epoch": "3"}, "Did you mean 'epochs'"),
        ({"epochs": "3.5"}, "epochs must be an integer"),
        ({"epochs": "0"}, "epochs must be at least 1"),
        ({"optimizer": "adam"}, "optimizer must be one of adamw.sgd, got 'adam'"),
        ({"lr": "fast"}, "lr must be a float"),
        ({"lr": "0"}, "lr must be a positive learning rate below 1"),
        ({"val_fraction": "1.5"}, "val_fraction must be a fraction"),
        ({"pretrained": "maybe"}, "pretrained must be one of auto|true|false"),
        ({"stem_stride": "4"}, "stem_stride must be 1 or 2"),
        ({"fine_epochs": "-1"}, "fine_epochs must be 0 .every epoch. or a positive count, got -1"),
        ({"select_fraction": "0"}, "select_fraction must be a fraction above 0 and at most 1"),
        ({"select_fraction": "1.5"}, "select_fraction must be a fraction above 0 and at most 1"),
        ({"batch_size": "1"}, "batch_size must be 0 .auto. or at least 2"),
        ({"num_workers": "-2"}, "num_workers must be -1 .one per core., 0 .in-process. or a number"),
        ({"label_smoothing": "0.9"}, "label_smoothing must be between 0 and 0.5"),
        ({"weight_decay": "-0.1"}, "weight_decay must be 0 .none. or a positive decay below 1 / lr .5., e.g. 0.0005"),
        ({"weight_decay": "30", "lr": "0.05"}, "weight_decay must be 0 .none. or a positive decay below 1 / lr .20."),
        ({"grad_clip_norm": "-1"}, "grad_clip_norm must be 0 .no clipping. or a positive norm"),
        ({"translate": "9"}, "translate must be between 0 and a quarter of image_size .8 pixels., got 9"),
        (
            {"translate": "-1", "image_size": "64"},
            "translate must be between 0 and a quarter of image_size .16 pixels.",
        ),
        ({"flip_tta": "yes"}, "flip_tta must be one of true.false, got 'yes'"),
        ({"promote": "sometimes"}, "promote must be one of auto|always|never"),
        ({"device": "tpu"}, "device must be auto, cpu, cuda, cuda:N or mps"),
        ({"default_threshold": "0.3"}, "default_threshold must be one of"),
        ({"pretrained_weights": "/no/such/file.pth"}, "pretrained_weights must be an existing weights file"),
        ({"data_dir": "/data/caf\udce9"}, "data_dir must be UTF-8 text, as MLflow records it, got '/data/caf.xe9'"),
    ],
)
def test_bad_values_and_unknown_keys_are_rejected_with_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("|", r"\|").replace("(", r"\(")):
        load_config(None, overrides)


def test_auto_batch_size_is_chosen_by_device_and_an_explicit_one_is_kept():
    auto = load_config(None, {"batch_size": "0"}).train
    assert (auto.for_device("cuda").batch_size, auto.for_device("cpu").batch_size) == (GPU_BATCH_SIZE, BATCH_SIZE)
    assert auto.for_device("mps").batch_size == BATCH_SIZE
    assert load_config(None, {"batch_size": "64"}).train.for_device("cuda").batch_size == 64


def test_unknown_key_in_yaml_is_rejected(tmp_path: Path):
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("epochs: 2\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown configuration key 'learning_rate'"):
        load_config(experiment)


def test_yaml_that_is_not_a_mapping_or_missing_is_rejected(tmp_path: Path):
    listing = tmp_path / "list.yaml"
    listing.write_text("- epochs\n")
    with pytest.raises(ConfigError, match="flat mapping"):
        load_config(listing)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a folder; pass a YAML file"):
        load_config(tmp_path)


def test_yaml_that_cannot_be_read_as_text_is_rejected_with_the_fix(tmp_path: Path, monkeypatch):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("experiment_name: café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 0xe9 at offset 20\): save it as UTF-8"):
        load_config(latin1)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", denied)  # as a file this user may not read (the tests may run as root)
    with pytest.raises(ConfigError, match="cannot read config file .*latin1.yaml': Permission denied"):
        load_config(latin1)


def test_config_is_frozen():
    config = load_config()
    with pytest.raises(AttributeError):
        config.train.epochs = 2  # type: ignore[misc]


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_file_only_sets_known_fields(path: Path):
    assert set(yaml.safe_load(path.read_text())) <= set(FIELDS)
    if "data_dir: /" not in path.read_text():  # files pointing at a real dataset folder are checked when used
        load_config(path)


def test_the_default_experiment_file_is_the_built_in_defaults():
    """experiments/default.yaml says it writes the defaults out: a default changed in one place only fails here."""
    assert load_config(ROOT / "experiments" / "default.yaml") == load_config()


def _mlproject() -> dict:
    return yaml.safe_load((ROOT / "MLproject").read_text())


def test_main_entry_point_parameters_are_the_config_fields_with_their_types_and_defaults():
    parameters = _mlproject()["entry_points"]["main"]["parameters"]
    assert set(parameters) == set(FIELDS)
    defaults = RunConfig().flat()
    for name, spec in parameters.items():
        assert spec["type"] == MLPROJECT_TYPES[FIELD_TYPES[name]], name
        assert FIELD_TYPES[name](spec["default"]) == defaults[name], name


def test_every_entry_point_passes_each_parameter_as_the_flag_of_the_same_name():
    for name, entry in _mlproject()["entry_points"].items():
        for parameter, spec in entry["parameters"].items():
            assert f"--{parameter} {{{parameter}}}" in entry["command"], (name, parameter)
            if parameter in FIELDS:
                assert spec["type"] == MLPROJECT_TYPES[FIELD_TYPES[parameter]], (name, parameter)


def test_every_config_field_is_a_train_flag():
    arguments = build_parser().parse_args(["train", *[f"--{name}=1" for name in FIELDS]])
    assert all(getattr(arguments, name) == "1" for name in FIELDS)


def test_cli_reports_a_bad_flag_in_one_line_and_exits_2(capsys):
    assert main(["train", "--epochs", "many"]) == 2
    error = capsys.readouterr().err
    assert "epochs must be an integer, got 'many'" in error
