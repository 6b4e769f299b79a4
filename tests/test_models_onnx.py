"""The network, its checkpoints and pretrained-weight handling, and the ONNX export's parity with PyTorch."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch

from cifake_core import models
from cifake_core.distributed import resolve_device
from cifake_core.engine import evaluate, predict_logits, prob_ai
from cifake_core.errors import DeviceError, PretrainedWeightsError
from cifake_core.onnx_export import OnnxParityError, export_onnx
from cifake_core.onnx_runtime import INPUT_NAME, OUTPUT_NAME, onnx_session


@pytest.fixture(scope="module")
def random_model() -> models.ImageClassifier:
    torch.manual_seed(0)
    model, source = models.create_model(pretrained="false", pretrained_weights="", stem_stride=2)
    assert source == "random"
    return model.eval()


def _batch(count: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 3, size, size), dtype=np.uint8)


def test_model_takes_uint8_images_and_normalises_inside(random_model):
    images = torch.from_numpy(_batch(3))
    with torch.no_grad():
        from_uint8 = random_model(images)
        from_float = random_model(images.float())
    assert from_uint8.shape == (3, 2)
    torch.testing.assert_close(from_uint8, from_float)


def test_pretrained_auto_falls_back_to_random_within_seconds_offline(monkeypatch):
    monkeypatch.setattr(models, "host_reachable", lambda host: False)
    started = time.perf_counter()
    _, source = models.create_model(pretrained="auto", pretrained_weights="", stem_stride=2)
    assert source == "random"
    assert time.perf_counter() - started < 20


def test_pretrained_true_fails_with_a_clear_message_offline(monkeypatch):
    monkeypatch.setattr(models, "host_reachable", lambda host: False)
    with pytest.raises(PretrainedWeightsError, match="pretrained_weights=PATH"):
        models.create_model(pretrained="true", pretrained_weights="", stem_stride=2)


def test_pretrained_weights_file_is_loaded(tmp_path: Path):
    torch.manual_seed(1)
    imagenet_like = timm.create_model(models.ARCHITECTURE, pretrained=False, num_classes=1000)
    weights = tmp_path / "imagenet.pth"
    torch.save(imagenet_like.state_dict(), weights)
    model, source = models.create_model(pretrained="auto", pretrained_weights=str(weights), stem_stride=2)
    assert source == "file:imagenet.pth"
    stem = "conv_stem.weight"
    torch.testing.assert_close(model.backbone.state_dict()[stem], imagenet_like.state_dict()[stem])
    head = model.backbone.get_classifier()
    assert head.out_features == 2  # ImageNet head replaced by ours
    assert head.weight.std() < 2 * models.HEAD_INIT_STD


def test_a_new_model_starts_near_chance_for_every_kind_of_image():
    # timm's own head (+-0.71 per weight for 2 classes) starts at logits of ~3 and a loss far above ln 2.
    torch.manual_seed(0)
    model, _ = models.create_model(pretrained="false", pretrained_weights="", stem_stride=1)
    images = torch.from_numpy(
        np.concatenate([_batch(8), np.zeros((1, 3, 32, 32), np.uint8), np.full((1, 3, 32, 32), 255, np.uint8)])
    )
    with torch.no_grad():
        logits = model.train()(images)  # batch statistics, as in the first training step
    assert logits.abs().max() < 0.5
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1] * 5))
    assert loss == pytest.approx(np.log(2), abs=0.1)
    assert logits.std() > 0  # a small head, not a dead one: the images still move the logits


def test_broken_pretrained_weights_file_is_a_clear_error(tmp_path: Path):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match="could not load pretrained_weights"):
        models.create_model(pretrained="auto", pretrained_weights=str(broken), stem_stride=2)


def test_checkpoint_is_self_describing_and_round_trips(random_model, tmp_path: Path):
    path = tmp_path / "best.pt"
    models.save_checkpoint(path, random_model, {"epochs": 3}, epoch=2, metrics={"val_auc": 0.75})
    restored, meta = models.load_checkpoint(path)
    assert meta["epoch"] == 2 and meta["config"] == {"epochs": 3} and meta["metrics"]["val_auc"] == 0.75
    images = torch.from_numpy(_batch(4))
    with torch.no_grad():
        torch.testing.assert_close(restored(images), random_model(images))


def test_evaluate_returns_prefixed_floats(random_model):
    images, labels = torch.from_numpy(_batch(16)), torch.tensor([0, 1] * 8)
    metrics = evaluate(random_model, images, labels, batch_size=8, device=torch.device("cpu"), prefix="val")
    assert {"val_loss", "val_auc", "val_f1", "val_accuracy"} <= set(metrics)
    assert all(isinstance(value, float) for value in metrics.values())


def test_unavailable_device_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceError, match="device=auto or device=cpu"):
        resolve_device("cuda")
    assert resolve_device("auto").type in {"cpu", "mps"}


def test_onnx_export_matches_pytorch_with_a_dynamic_batch(random_model, tmp_path: Path):
    path = tmp_path / "model.onnx"
    report = export_onnx(random_model, 32, path, check_batch=_batch(8))
    assert report["onnx_max_abs_diff"] < 1e-4
    onnx.checker.check_model(str(path), full_check=True)
    assert not [p for p in tmp_path.iterdir() if p.name != "model.onnx"]  # one self-contained file
    session = onnx_session(path)
    for count in (1, 5, 33):
        batch = _batch(count, seed=count)
        with torch.no_grad():
            expected = prob_ai(random_model(torch.from_numpy(batch))).numpy()
        actual = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        np.testing.assert_allclose(actual, expected, atol=1e-4)


def test_a_stride_1_stem_keeps_twice_the_resolution_through_checkpoint_and_onnx(random_model, tmp_path: Path):
    torch.manual_seed(1)
    model, _ = models.create_model(pretrained="false", pretrained_weights="", stem_stride=1)
    model.eval()
    images = torch.from_numpy(_batch(4))
    with torch.no_grad():
        assert model.backbone.forward_features(images.float()).shape[-1] == 2
        assert random_model.backbone.forward_features(images.float()).shape[-1] == 1
    path = tmp_path / "best.pt"
    models.save_checkpoint(path, model, {"stem_stride": 1}, epoch=1, metrics={})
    restored, _ = models.load_checkpoint(path)
    assert restored.backbone.conv_stem.stride == (1, 1)
    report = export_onnx(restored, 32, tmp_path / "model.onnx", check_batch=_batch(8))
    assert report["onnx_max_abs_diff"] < 1e-4


def test_onnx_export_refuses_a_graph_that_disagrees(random_model, tmp_path: Path, monkeypatch):
    monkeypatch.setattr("cifake_core.onnx_export.PARITY_TOLERANCE", -1.0)
    path = tmp_path / "model.onnx"
    with pytest.raises(OnnxParityError):
        export_onnx(random_model, 32, path, check_batch=_batch(2))
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left behind


def test_an_epoch_whose_last_batch_would_hold_one_image_trains(random_model):
    from cifake_core.engine import train_one_epoch

    model = random_model.train()
    images, labels = torch.from_numpy(_batch(17)), torch.tensor([0, 1] * 8 + [0])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    order, generator = torch.randperm(17), torch.Generator().manual_seed(0)
    metrics = train_one_epoch(model, images, labels, order, optimizer, scheduler, 16, torch.device("cpu"), generator)
    assert metrics["images_per_second"] > 0 and np.isfinite(metrics["train_loss"])
    random_model.eval()


def test_label_smoothing_reaches_the_training_loss(random_model):
    from cifake_core.engine import train_one_epoch

    model = copy.deepcopy(random_model).train()
    half = torch.from_numpy(_batch(16, size=32)[..., :16])
    images = torch.cat([half, half.flip(-1)], dim=-1)  # mirror-symmetric, so the random flip changes nothing
    labels = torch.tensor([0, 1] * 8)
    with torch.no_grad():
        logits = model(images.contiguous(memory_format=torch.channels_last))
    for smoothing in (0.0, 0.3):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay put: both epochs see the same logits
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
        metrics = train_one_epoch(
            model,
            images,
            labels,
            torch.arange(16),
            optimizer,
            scheduler,
            16,
            torch.device("cpu"),
            torch.Generator().manual_seed(0),
            label_smoothing=smoothing,
        )
        expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=smoothing)
        assert metrics["train_loss"] == pytest.approx(float(expected), rel=1e-4)
    assert float(expected) != pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-3)


def test_each_trained_images_loss_is_recorded_at_its_index(random_model):
    """`sample_losses` gets the loss of every image the epoch trained on, at the image's index, and nothing else:
    the stale losses from which later epochs draw their hard examples."""
    from cifake_core.engine import train_one_epoch

    model = copy.deepcopy(random_model).train()
    half = torch.from_numpy(_batch(16, size=32)[..., :16])
    images = torch.cat([half, half.flip(-1)], dim=-1)  # mirror-symmetric, so the random flip changes nothing
    labels = torch.tensor([0, 1] * 8)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))[:12]
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(
            model(images[order].contiguous(memory_format=torch.channels_last)), labels[order], reduction="none"
        )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    sample_losses = torch.full((16,), -1.0)
    generator = torch.Generator().manual_seed(0)
    metrics = train_one_epoch(
        model,
        images,
        labels,
        order,
        optimizer,
        scheduler,
        12,
        torch.device("cpu"),
        generator,
        sample_losses=sample_losses,
    )
    torch.testing.assert_close(sample_losses[order], expected, rtol=1e-4, atol=1e-6)
    untrained = torch.ones(16, dtype=torch.bool)
    untrained[order] = False
    assert torch.all(sample_losses[untrained] == -1.0)
    assert metrics["train_loss"] == pytest.approx(float(expected.mean()), rel=1e-4)


def test_grad_clip_norm_bounds_each_step(random_model):
    from cifake_core.engine import train_one_epoch

    images, labels = torch.from_numpy(_batch(16)), torch.tensor([0, 1] * 8)
    steps = {}
    for clip in (0.0, 1e-3):
        model = copy.deepcopy(random_model).train()
        before = torch.cat([parameter.detach().flatten() for parameter in model.parameters()])
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # plain SGD: the step is the (clipped) gradient
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
        generator = torch.Generator().manual_seed(0)
        train_one_epoch(
            model, images, labels, torch.arange(16), optimizer, scheduler, 16, torch.device("cpu"), generator,
            grad_clip_norm=clip,
        )  # fmt: skip
        after = torch.cat([parameter.detach().flatten() for parameter in model.parameters()])
        steps[clip] = float((after - before).norm())
    assert steps[1e-3] == pytest.approx(1e-3, rel=1e-3)
    assert steps[0.0] > 100 * steps[1e-3]


@pytest.mark.gpu
def test_training_and_export_run_on_cuda(tiny_demo, tracking_store):
    from cifake_core import pipeline
    from cifake_core.config import load_config

    config = load_config(None, {"data_dir": str(tiny_demo), "epochs": "1", "batch_size": "16", "device": "cuda"})
    result = pipeline.train(config)
    assert result.version == "1" and 0.0 <= result.metrics["test_auc"] <= 1.0


def _with_flip_tta(model: models.ImageClassifier) -> models.ImageClassifier:
    averaging = copy.deepcopy(model)
    averaging.flip_tta = True
    return averaging


def test_flip_tta_scores_the_mean_of_image_and_mirror_when_evaluating_only(random_model):
    averaging = _with_flip_tta(random_model)
    images = torch.from_numpy(_batch(6))
    with torch.no_grad():
        plain, mirrored = random_model(images), random_model(images.flip(-1))
        torch.testing.assert_close(averaging(images), (plain + mirrored) / 2)
        torch.testing.assert_close(averaging(images.flip(-1)), averaging(images))
        assert not torch.allclose(plain, mirrored, atol=1e-4)  # the network itself is not mirror-invariant
        averaging.train()
        torch.testing.assert_close(averaging(images), copy.deepcopy(random_model).train()(images))


def test_single_view_scores_the_image_alone_and_restores_flip_tta(random_model):
    averaging = _with_flip_tta(random_model).eval()
    images = torch.from_numpy(_batch(4))
    with torch.no_grad():
        with models.single_view(averaging) as scoring:
            torch.testing.assert_close(scoring(images), copy.deepcopy(random_model).eval()(images))
        assert averaging.flip_tta
        with pytest.raises(RuntimeError), models.single_view(averaging):
            raise RuntimeError("an evaluation that fails")
        assert averaging.flip_tta
        torch.testing.assert_close(averaging(images), (random_model(images) + random_model(images.flip(-1))) / 2)


def test_flip_tta_is_in_the_onnx_graph_and_the_checkpoint(random_model, tmp_path: Path):
    averaging = _with_flip_tta(random_model)
    path = tmp_path / "model.onnx"
    assert export_onnx(averaging, 32, path, check_batch=_batch(8))["onnx_max_abs_diff"] < 1e-4
    session = onnx_session(path)
    for count in (1, 5):
        batch = _batch(count, seed=count)
        with torch.no_grad():
            expected = prob_ai(averaging(torch.from_numpy(batch))).numpy()
        np.testing.assert_allclose(session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0], expected, atol=1e-4)
        mirrored = np.ascontiguousarray(batch[..., ::-1])
        np.testing.assert_allclose(session.run([OUTPUT_NAME], {INPUT_NAME: mirrored})[0], expected, atol=1e-4)
    for flip_tta in ("true", "false"):
        models.save_checkpoint(tmp_path / "best.pt", averaging, {"flip_tta": flip_tta}, epoch=1, metrics={})
        assert models.load_checkpoint(tmp_path / "best.pt")[0].flip_tta is (flip_tta == "true")
    models.save_checkpoint(tmp_path / "old.pt", averaging, {"stem_stride": 2}, epoch=1, metrics={})
    assert models.load_checkpoint(tmp_path / "old.pt")[0].flip_tta is False  # written before flip_tta existed


@pytest.mark.parametrize("stem_stride", [1, 2])
def test_folding_batchnorm_keeps_the_logits_and_leaves_the_model_alone(stem_stride: int):
    torch.manual_seed(0)
    model, _ = models.create_model(pretrained="false", pretrained_weights="", stem_stride=stem_stride, flip_tta=True)
    # Statistics far from a new network's (mean 0, variance 1, scale 1, shift 0), so a wrong fold shows.
    for norm in (module for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d)):
        norm.running_mean.uniform_(-1.0, 1.0)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.uniform_(-0.5, 0.5)
    model = model.to(memory_format=torch.channels_last).train()
    before = copy.deepcopy(model.state_dict())

    folded = models.fold_batchnorm(model)

    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in folded.modules())
    assert model.training and any(isinstance(module, torch.nn.BatchNorm2d) for module in model.modules())
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    images = torch.from_numpy(_batch(8))
    with torch.no_grad():
        expected = model.eval()(images)
        torch.testing.assert_close(folded(images), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(predict_logits(model, images, 3, torch.device("cpu")), expected, rtol=1e-4, atol=1e-5)
