"""Data-parallel training: the helpers in a real 2-process gloo group, and `torchrun` running the train stage.

Everything runs on CPU processes (gloo); the same code takes NCCL on GPUs.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mlflow import MlflowClient

from cifake_core import distributed
from cifake_core.config import RunConfig
from cifake_core.data import load_split_arrays, prepare_splits
from cifake_core.depthwise import CpuBackwardDepthwiseConv2d
from cifake_core.engine import predict_logits, prob_ai
from cifake_core.errors import LAUNCHER_REPORTS_ERRORS, PEER_ENDED_STATUS, DeviceError, PeerEndedError
from cifake_core.metrics import binary_metrics
from cifake_core.models import create_model, load_checkpoint
from cifake_core.network import free_port
from cifake_core.pointwise import MatmulPointwiseConv2d
from cifake_core.tracking import run_json_artifact
from tests.servers import child_environment

WORLD = 2


def _check_helpers(rank: int, port: int, results: dict) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        count = 7  # uneven: shards of 4 and 3
        start, stop = distributed.shard_bounds(count)
        rows = torch.arange(count, dtype=torch.float32).view(-1, 1) * 10
        gathered = distributed.gather_shards(rows[start:stop] + 0.5, count)
        sampler = distributed.epoch_sampler(9, seed=3)
        sampler.set_epoch(1)
        results[rank] = {
            "bounds": (start, stop),
            "gathered": gathered.view(-1).tolist(),
            "sum": distributed.all_reduce_sum(torch.tensor([rank + 1.0])).item(),
            "share": list(sampler),
        }
    finally:
        dist.destroy_process_group()


def test_shards_gather_in_order_sums_reduce_and_epoch_shares_are_disjoint():
    results = mp.Manager().dict()
    mp.spawn(_check_helpers, args=(free_port(), results), nprocs=WORLD)
    assert results[0]["bounds"] == (0, 4) and results[1]["bounds"] == (4, 7)
    expected = [value * 10 + 0.5 for value in range(7)]
    assert results[0]["gathered"] == expected and results[1]["gathered"] == expected
    assert results[0]["sum"] == results[1]["sum"] == 3.0
    shares = [set(results[rank]["share"]) for rank in range(WORLD)]
    assert len(results[0]["share"]) == len(results[1]["share"]) == 4  # drop_last: the same steps on each rank
    assert not shares[0] & shares[1] and shares[0] | shares[1] <= set(range(9))


def test_alone_the_helpers_are_the_identity():
    rows = torch.arange(5.0)
    assert distributed.world_size() == 1 and distributed.is_main_process()
    assert distributed.shard_bounds(5) == (0, 5) and distributed.gather_shards(rows, 5) is rows
    sampler = distributed.epoch_sampler(5, seed=0)
    sampler.set_epoch(1)
    assert sorted(sampler) == list(range(5))  # one process keeps every sample, odd counts included
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model, torch.device("cpu")) is model


def test_the_process_count_is_two_on_a_cpu_with_two_cores_one_elsewhere_and_as_asked_when_set():
    assert distributed.process_count(0, "cpu", cores=2) == 2
    assert distributed.process_count(0, "cpu", cores=16) == 2  # the recipe's global batch, not one a core
    assert distributed.process_count(0, "cpu", cores=1) == 1
    assert distributed.process_count(0, "cuda", cores=64) == 1
    assert distributed.process_count(0, "mps", cores=8) == 1
    assert distributed.process_count(3, "cpu", cores=2) == 3
    assert distributed.process_count(1, "cpu", cores=2) == 1
    with pytest.raises(DeviceError, match="processes=2 on Apple MPS"):
        distributed.process_count(2, "mps", cores=8)


def _averaged_gradients(rank: int, port: int, results: dict) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # the same starting weights on both ranks, as DDP broadcasts them
        model, _ = create_model(pretrained="false", pretrained_weights="", stem_stride=1)
        model = model.to(memory_format=torch.channels_last).train()
        plain = copy.deepcopy(model)
        for module in plain.modules():
            if type(module) in (CpuBackwardDepthwiseConv2d, MatmulPointwiseConv2d):
                module.__class__ = torch.nn.Conv2d
        generator = torch.Generator().manual_seed(rank)  # each rank its own batch
        images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=generator)
        images = images.contiguous(memory_format=torch.channels_last)  # as the pipeline feeds a CPU model
        labels = torch.randint(0, 2, (8,), generator=generator)
        for name, network in (("cpu_paths", model), ("conv2d", plain)):
            parallel = distributed.wrap(network, torch.device("cpu"))
            torch.nn.functional.cross_entropy(parallel(images), labels).backward()
            results[(rank, name)] = torch.cat([parameter.grad.flatten() for parameter in network.parameters()])
    finally:
        dist.destroy_process_group()


def test_the_cpu_training_paths_give_ddp_the_averaged_gradients_of_plain_convolutions():
    """The depthwise backward pass and the 1x1 matrix products, under DistributedDataParallel as `torchrun` trains:
    both ranks end the step with the gradients that plain `torch.nn.Conv2d` layers give, averaged over the ranks."""
    results = mp.Manager().dict()
    mp.spawn(_averaged_gradients, args=(free_port(), results), nprocs=WORLD)
    expected = results[(0, "conv2d")]
    assert torch.equal(results[(1, "conv2d")], expected)  # DDP averaged them: one gradient on both ranks
    for rank in range(WORLD):
        torch.testing.assert_close(results[(rank, "cpu_paths")], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_torchrun_on_two_cpu_processes_logs_one_run_and_one_version(tiny_demo: Path, tracking_store: str, tmp_path):
    env = child_environment(MLFLOW_TRACKING_URI=tracking_store, OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", str(WORLD), "experiments/stage.py", "train"]
    flags = ["--data_dir", str(tiny_demo), "--epochs", "2", "--batch_size", "16", "--num_workers", "0"]
    done = subprocess.run(
        [*command, *flags, "--device", "cpu"], env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout[done.stdout.index("{\n") :])  # printed once, by rank 0

    client = MlflowClient()
    (run,) = client.search_runs([mlflow.get_experiment_by_name("cifake").experiment_id])
    assert run.info.status == "FINISHED"
    assert {"train_loss", "train_accuracy", "val_loss", "val_auc", "test_auc", "test_f1"} <= set(run.data.metrics)
    assert [metric.step for metric in client.get_metric_history(run.info.run_id, "val_auc")] == [1, 2]
    (version,) = client.search_model_versions("name = 'cifake-detector'")
    assert str(version.version) == result["version"] == "1"

    # The logged test figures are those of one process evaluating the same checkpoint on the whole test split.
    checkpoint = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="checkpoint/best.pt", dst_path=str(tmp_path)
    )
    model, _ = load_checkpoint(Path(checkpoint))
    data = RunConfig().data
    prepared = prepare_splits(tiny_demo, data.val_fraction, 0, 0, data.seed, 0)
    images, labels = load_split_arrays(prepared, "test", RunConfig().model.image_size, 0)
    logits = predict_logits(model, torch.from_numpy(images), 512, torch.device("cpu"))
    scores = prob_ai(logits / run.data.metrics["temperature"]).numpy()
    threshold = run_json_artifact(run.info.run_id, "reports/metrics.json")["threshold"]
    single = binary_metrics(labels, scores, threshold, "test")
    for key in ("test_auc", "test_f1", "test_accuracy"):
        assert single[key] == pytest.approx(run.data.metrics[key], abs=1e-6), key


def _train_as_two_processes(tracking_store: str, data_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    """`cifake train` for one epoch as `mlflow run` calls it: a child process outside torchrun, which starts two
    training processes (the auto count on a CPU with two cores)."""
    common = ["--data_dir", str(data_dir), "--epochs", "1", "--num_workers", "0", "--device", "cpu", "--processes", "2"]
    return subprocess.run(
        [sys.executable, "-m", "cifake_core.cli", "train", *common, *flags],
        env=child_environment(MLFLOW_TRACKING_URI=tracking_store),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def test_train_starts_its_own_process_group_and_rank_0_alone_reports(tiny_demo: Path, tracking_store: str):
    """One run, trained by two processes, and one result printed."""
    done = _train_as_two_processes(tracking_store, tiny_demo, "--batch_size", "16")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"run_id"') == 1
    result = json.loads(done.stdout[done.stdout.index("{\n") :])
    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name("cifake").experiment_id])
    assert run.info.status == "FINISHED" and result["run_id"] == run.info.run_id
    assert run.data.params["processes"] == "2"  # the world size the workers joined, not the flag echoed
    # The launcher scans the data once; the processes read its splits instead of scanning again, the same splits.
    assert done.stderr.count("scanning ") == 1, done.stderr[-3000:]
    data = RunConfig().data
    scanned = prepare_splits(tiny_demo, data.val_fraction, 0, 0, data.seed, 0)
    assert run.data.tags["cifake.dataset_fingerprint"] == scanned.fingerprint
    # Both processes build the model; the node's first alone warns that the ImageNet weights are out of reach.
    assert done.stderr.count("no ImageNet weights") <= 1, done.stderr[-3000:]


def test_a_mistake_met_after_the_processes_started_is_one_line_and_status_2(
    tiny_demo: Path, tracking_store: str, tmp_path: Path
):
    """A weights file that exists but is not weights is found only when each process loads it: the user gets its
    message once, with no traceback and no torchrun report, and exit status 2, as from one process."""
    not_weights = tmp_path / "weights.pth"
    not_weights.write_text("not a checkpoint")
    done = _train_as_two_processes(tracking_store, tiny_demo, "--pretrained_weights", str(not_weights))
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count("error: could not load pretrained_weights") == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr[-3000:]
    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name("cifake").experiment_id])
    assert run.info.status == "FAILED"


def test_the_launcher_tells_the_failure_that_left_a_message_over_one_stopped_in_the_same_second(tmp_path: Path):
    """torchrun stops the other processes when one fails, and their failures may carry the same second: the one
    with the user's message is the cause. Without a message, how the process ended."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    left = tmp_path / "error.json"
    left.write_text(json.dumps({"message": "cifake train: error: the fix", "timestamp": 1000}))
    reported = ProcessFailure(local_rank=1, pid=12, exitcode=2, error_file=str(left))
    stopped = ProcessFailure(local_rank=0, pid=11, exitcode=-15, error_file="<N/A>")
    stopped.timestamp = 1000
    rank, failure = distributed._first_failure({0: stopped, 1: reported})
    assert (rank, distributed._failure_message(rank, failure)) == (1, "cifake train: error: the fix")
    killed = ProcessFailure(local_rank=0, pid=11, exitcode=-9, error_file="<N/A>")
    assert "out-of-memory killer" in distributed._failure_message(0, killed)
    assert "SIGTERM" in distributed._failure_message(0, stopped)
    crashed = ProcessFailure(local_rank=0, pid=11, exitcode=1, error_file="<N/A>")
    assert "exit status 1 (its traceback is above)" in distributed._failure_message(0, crashed)


def test_the_launcher_tells_the_failure_torchrun_saw_first_or_a_process_killed_outright():
    """torchrun lists failures as it saw them, then stops the others: the first listed is the cause, whatever the
    ranks; a process killed by SIGKILL (out of memory) is the cause of its peers' lost connection."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    interrupted = ProcessFailure(local_rank=1, pid=12, exitcode=130, error_file="<N/A>")  # SIGTERM sent to it alone
    stopped = ProcessFailure(local_rank=0, pid=11, exitcode=-15, error_file="<N/A>")  # then torchrun's SIGTERM
    rank, failure = distributed._first_failure({1: interrupted, 0: stopped})
    assert rank == 1 and "was interrupted" in distributed._failure_message(rank, failure)
    lost_peer = ProcessFailure(local_rank=0, pid=11, exitcode=1, error_file="<N/A>")
    killed = ProcessFailure(local_rank=1, pid=12, exitcode=-9, error_file="<N/A>")
    assert distributed._first_failure({0: lost_peer, 1: killed}) == (1, killed)
    # A process that stopped because its peer ended (cli's PEER_ENDED_STATUS) is never the cause, though seen first.
    peer_ended = ProcessFailure(local_rank=1, pid=12, exitcode=PEER_ENDED_STATUS, error_file="<N/A>")
    assert distributed._first_failure({1: peer_ended, 0: stopped}) == (0, stopped)
    assert "lost the connection" in distributed._failure_message(1, peer_ended)


def test_torchrun_loggers_are_silent_in_the_launcher_those_imported_later_too(monkeypatch, caplog, capfd):
    """torchrun's report would bury the launcher's one line; a rendezvous backend, say, makes its logger only once
    torchrun runs, and sets its own level then."""
    elastic = logging.getLogger("torch.distributed.elastic")
    monkeypatch.setattr(elastic, "handlers", [])
    monkeypatch.setattr(elastic, "propagate", True)
    late = logging.getLogger("torch.distributed.elastic.a_module_imported_late")
    late.setLevel(logging.WARNING)
    late.warning("Sending process 11 closing signal SIGTERM")
    # What a user saw: the record reached torch's handler (stderr) and the root's.
    assert "closing signal" in capfd.readouterr().err and "closing signal" in caplog.text
    caplog.clear()
    distributed.silence_torchrun_logs()
    late.warning("Sending process 12 closing signal SIGTERM")
    assert caplog.text == "" and capfd.readouterr().err == ""


def test_a_collective_failed_by_a_peers_end_is_raised_as_that_cause_and_other_errors_pass_unchanged(
    monkeypatch: pytest.MonkeyPatch,
):
    """gloo's lost connection (a plain RuntimeError) and torch's DistError become PeerEndedError, chained to the
    original, so that the MLflow run records the cause, and torchrun's SIGTERM to the survivors is ignored from
    then on; any other error, a bug included, is raised as it was."""
    lost = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer")
    handlers = []
    monkeypatch.setattr(signal, "signal", lambda signum, handler: handlers.append((signum, handler)))
    for other in (ValueError("a bug"), RuntimeError("CUDA out of memory")):
        with pytest.raises(type(other)) as raised, distributed.peer_loss_named():
            raise other
        assert raised.value is other and handlers == []
    for collective_error in (lost, dist.DistError("NCCL communicator was aborted")):
        with pytest.raises(PeerEndedError, match="another training process of its group ended first") as raised:
            with distributed.peer_loss_named():
                raise collective_error
        assert raised.value.__cause__ is collective_error
        assert handlers.pop() == (signal.SIGTERM, signal.SIG_IGN)


def test_a_process_whose_peer_ended_says_so_in_one_line_where_other_errors_keep_their_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
):
    """Under `cifake train`'s launcher, which names the process that ended, its peer's lost connection is one line
    and a status the launcher never blames; a bug, or the same error under torchrun started by hand, is raised."""
    from cifake_core import cli

    def fail_with(error: Exception):
        def run(*_) -> None:
            raise error

        return run

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(cli, "_run", fail_with(PeerEndedError("another training process of its group ended first")))
    with pytest.raises(PeerEndedError):
        cli.main(["train"])
    monkeypatch.setenv(LAUNCHER_REPORTS_ERRORS, "1")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    capsys.readouterr()
    assert cli.main(["train"]) == PEER_ENDED_STATUS
    told = "cifake train: training process 1 stopped: another training process of its group ended\n"
    assert capsys.readouterr().err == told
    assert signal.getsignal(signal.SIGTERM) is before  # torchrun's SIGTERM on the way out just ends the process
    monkeypatch.setattr(cli, "_run", fail_with(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["train"])
