"""Data-parallel training across processes with torchrun: process group, shards, reductions, rank 0.

One code path serves one process and many: every helper here is the identity when the process is alone
(no torchrun), so `pipeline.train` never branches on the world size except to let rank 0 alone talk to
MLflow and write files. Backend: NCCL when each process has a CUDA device, gloo on CPUs.

`run_processes` is how `cifake train` starts such a group on one machine by itself (`processes`, 2 on a CPU by
default), through `python -m cifake_core.distributed`: torchrun, with a failure told in one line (`torchrun`).
torchrun started by hand does the same across machines.

Usage (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT):
    with process_group(resolve_device("auto")) as device:
        sampler = epoch_sampler(len(train_images), seed=42)
        sampler.set_epoch(epoch)
        totals = all_reduce_sum(torch.tensor([loss_sum, seen]))
        if is_main_process(): ...
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from cifake_core.data import usable_cores
from cifake_core.errors import (
    INTERRUPTED_STATUS,
    LAUNCH_FOLDER_VARIABLE,
    LAUNCHER_REPORTS_ERRORS,
    PEER_ENDED_STATUS,
    RUN_ID_FILE_VARIABLE,
    DeviceError,
    PeerEndedError,
)

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

log = logging.getLogger(__name__)

# Ranks other than 0 wait at a barrier while rank 0 evaluates, exports and registers the model, which on the
# full CIFAKE test split with its robustness report takes many minutes on a CPU: the default 10-30 minute
# collective timeout would kill a healthy run. A crashed rank still ends the job at once: torchrun stops the
# others.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=6)


# On a 2-core CPU two 1-thread processes train 1.17x as fast as one 2-thread process (at 32 px the layers are too
# small to split well across threads; docs/BENCHMARKS.md, "`train` starts the two processes itself"), and their two
# batches of 128 make the global batch of 256 that the recipe was measured with, a GPU's single batch.
CPU_PROCESSES = 2


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU; a named device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise DeviceError(f"device={name} but this machine has no such CUDA device: use device=auto or device=cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("device=mps but MPS is not available here: use device=auto or device=cpu")
    return device


def process_count(processes: int, device_type: str, cores: int) -> int:
    """The training processes to start: `processes`, or for 0 (auto) `CPU_PROCESSES` on a CPU with at least that
    many cores and one otherwise (a GPU, Apple's MPS, a one-core machine)."""
    count = processes or (CPU_PROCESSES if device_type == "cpu" and cores >= CPU_PROCESSES else 1)
    if count > 1 and device_type == "mps":
        raise DeviceError(f"processes={count} on Apple MPS is not supported by PyTorch: pass processes=1 or device=cpu")
    return count


def _terminate_with_parent() -> None:
    """Have the kernel send this process SIGTERM when its parent dies, even by SIGKILL, so that the training
    processes never outlive the `cifake train` that started them (Linux's PR_SET_PDEATHSIG; elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def run_processes(count: int, arguments: Sequence[str], launch_folder: Path) -> int:
    """Run `cifake ARGUMENTS` as `count` processes of one torchrun group on this machine and wait; returns torchrun's
    exit status. `launch_folder`, a temporary folder made for this launch, is passed on (`LAUNCH_FOLDER_VARIABLE`)
    and removed when torchrun's wrapper ends. Each process gets an equal share of the cores as threads unless
    OMP_NUM_THREADS is set. Ctrl-C or SIGTERM here (a KeyboardInterrupt) is passed on as SIGTERM, and so is this
    process's death by SIGKILL, so rank 0 still ends its MLflow run KILLED."""
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, usable_cores() // count)))
    log.info("training as %d processes of %s thread(s) each (processes=1: this process alone)", count, threads)
    launch = {LAUNCH_FOLDER_VARIABLE: str(launch_folder), RUN_ID_FILE_VARIABLE: str(launch_folder / "run_id")}
    try:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "cifake_core.distributed", "--standalone", f"--nproc_per_node={count}"]
            + ["-m", "cifake_core.cli", *arguments],
            env=os.environ | launch | {"OMP_NUM_THREADS": threads, LAUNCHER_REPORTS_ERRORS: "1"},
            preexec_fn=_terminate_with_parent,  # torchrun passes SIGTERM on to the processes it started
        )
    except BaseException:
        shutil.rmtree(launch_folder, ignore_errors=True)
        raise
    try:
        return launcher.wait()
    except KeyboardInterrupt:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait()
        raise


def torchrun(arguments: Sequence[str], run_id_file: Path) -> int:
    """`torchrun ARGUMENTS` in this process with its failure told in one line, and its exit status: the message the
    first failed process left in its error file (`errors.LAUNCHER_REPORTS_ERRORS`), else which process failed and
    how. torchrun's own report, a traceback and a box per process, would bury the one line a user needs. An MLflow
    run that a process killed outright (SIGKILL, the out-of-memory killer) left RUNNING is ended here, with that
    line as its error: its id is in `run_id_file`."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    silence_torchrun_logs()
    try:
        run(parse_args(list(arguments)))
        return 0
    except SignalException as stopped:  # the process that started this one tells of the interruption
        status, reason, exit_status = "KILLED", f"interrupted ({stopped.sigval.name})", 128 + stopped.sigval
    except ChildFailedError as failed:
        rank, failure = _first_failure(failed.failures)
        status, reason = "FAILED", _failure_message(rank, failure)
        print(reason, file=sys.stderr)
        # A message left is a mistake the user can fix, whose status is 2 as in one process; the process that
        # left it may itself have been stopped by torchrun before it exited.
        exit_status = 2 if _left_message(failure) else 1
    # Imported only now: MLflow would delay every group's start by 1.3-1.6 s, and only a failure needs it.
    from cifake_core import tracking

    tracking.end_run_left_running(run_id_file, status, reason)
    return exit_status


def silence_torchrun_logs() -> None:
    """Drop the records of torchrun's loggers (`torch.distributed.elastic.*`), those imported later included: each
    sets its own level as it is imported, so a level set on their parent is no use, but their records stop at the
    parent's handler."""
    elastic = logging.getLogger("torch.distributed.elastic")
    elastic.addHandler(logging.NullHandler())
    elastic.propagate = False


def _first_failure(failures: dict[int, ProcessFailure]) -> tuple[int, ProcessFailure]:
    """The rank whose failure caused the others, and its `ProcessFailure`. torchrun lists failures in the order it
    saw them and then stops the rest (their SIGTERM, or status 130, comes after), so the first listed is the cause;
    timestamps do not tell, as those without an error file all get the second torchrun looked. Before that order
    come a process that left a message (a mistake the user can fix) and one killed by SIGKILL (the out-of-memory
    killer; torchrun sends it only to a process that ignored SIGTERM for 30 s), whose peers may have failed on the
    lost connection before torchrun looked. A process that stopped on that lost connection comes last: it is never
    the cause while another failed."""

    def precedence(listed: tuple[int, tuple[int, ProcessFailure]]) -> tuple[bool, bool, bool, int]:
        position, (_, failure) = listed
        return not _left_message(failure), not _killed_outright(failure), _peer_ended(failure), position

    _, first = min(enumerate(failures.items()), key=precedence)
    return first


def _left_message(failure: ProcessFailure) -> bool:
    return os.path.isfile(failure.error_file)


def _killed_outright(failure: ProcessFailure) -> bool:
    return failure.exitcode == -signal.SIGKILL


def _peer_ended(failure: ProcessFailure) -> bool:
    return failure.exitcode == PEER_ENDED_STATUS


def _failure_message(rank: int, failure: ProcessFailure) -> str:
    if _left_message(failure):
        return failure.message  # the process's own line, e.g. "cifake train: error: ..."
    if _killed_outright(failure):
        return f"cifake: training process {rank} was killed by SIGKILL (often the out-of-memory killer: see dmesg)"
    if failure.exitcode < 0:
        return f"cifake: training process {rank} was stopped by {failure.signal_name()}"
    if failure.exitcode == INTERRUPTED_STATUS:  # SIGTERM or SIGINT sent to that process alone: it ended its run
        return f"cifake: training process {rank} was interrupted (SIGTERM or Ctrl-C sent to it alone)"
    if _peer_ended(failure):  # every process lost its connection: a network fault, not a process's
        return f"cifake: training process {rank} lost the connection to the others of its group"
    return f"cifake: training process {rank} failed with exit status {failure.exitcode} (its traceback is above)"


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _rank_device(device: torch.device) -> torch.device:
    """Each process's device: under torchrun with CUDA, the GPU of its LOCAL_RANK."""
    if device.type != "cuda":
        if device.type == "mps":
            raise DeviceError("torchrun on Apple MPS is not supported by PyTorch: pass device=cpu")
        return device
    if local_rank() >= torch.cuda.device_count():
        raise DeviceError(
            f"LOCAL_RANK {local_rank()} but this node has {torch.cuda.device_count()} CUDA devices: start at most "
            "that many processes per node (torchrun --nproc_per_node)"
        )
    torch.cuda.set_device(local_rank())
    return torch.device("cuda", local_rank())


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Join the torchrun process group (if launched by torchrun) for the duration; yield this process's device
    (`device` itself, or under torchrun with CUDA the GPU of this process's LOCAL_RANK)."""
    if not launched_by_torchrun():
        yield device
        return
    device = _rank_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, device_id=device if backend == "nccl" else None)
    try:
        with peer_loss_named():
            yield device
            dist.barrier()  # rank 0 reaches it after publishing the model; the others wait here until then
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def peer_loss_named() -> Iterator[None]:
    """Raise a collective's failure on the end of another process of the group as `PeerEndedError`, from the
    original: that is what an MLflow run ended inside the block records, rather than gloo's transport error. From
    then on this process ignores SIGTERM."""
    try:
        yield
    except Exception as error:
        # gloo's lost connection is a plain RuntimeError; NCCL's and the rendezvous store's are DistErrors.
        if not (isinstance(error, dist.DistError) or "gloo/transport" in str(error)):
            raise
        # torchrun sends SIGTERM to the processes left as it sees one end, while this one, already on its way out,
        # ends its MLflow run: a KeyboardInterrupt landing in an import or an exit handler there prints a traceback
        # of its own and can leave the run unended.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise PeerEndedError("another training process of its group ended first; it is the cause") from error


@contextlib.contextmanager
def local_main_first() -> Iterator[None]:
    """Run the block on each node's first process before the node's others, e.g. to create a shared folder once."""
    if dist.is_initialized() and local_rank() != 0:
        dist.barrier()
    yield
    if dist.is_initialized() and local_rank() == 0:
        dist.barrier()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` under DistributedDataParallel when there are several processes (gradients averaged at each
    step), else `model` itself."""
    if not dist.is_initialized():
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def sync_buffers(model: torch.nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics), which each rank has updated with its
    own last batch, so that all ranks evaluate the very model rank 0 saves."""
    if dist.is_initialized():
        for buffer in unwrap(model).buffers():
            dist.broadcast(buffer, src=0)


def epoch_sampler(count: int, seed: int) -> DistributedSampler:
    """This process's share of a shuffled epoch of `count` samples (all of them when alone); call `set_epoch`
    before each epoch. drop_last keeps every rank at the same number of steps, as DDP requires."""
    return DistributedSampler(
        range(count), num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed, drop_last=world_size() > 1
    )


def _collective_device() -> torch.device:
    """NCCL moves only CUDA tensors, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over all processes (a copy; unchanged when alone)."""
    if not dist.is_initialized():
        return values
    summed = values.to(_collective_device(), copy=True)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed.to(values.device)


def shard_bounds(count: int) -> tuple[int, int]:
    """The contiguous slice [start, stop) of `count` rows that this process scores in a sharded evaluation."""
    per_rank = -(-count // world_size())
    start = min(count, rank() * per_rank)
    return start, min(count, start + per_rank)


def gather_shards(local: torch.Tensor, count: int) -> torch.Tensor:
    """Every process's `shard_bounds` rows joined in order into the full `count` rows (identity when alone)."""
    if not dist.is_initialized():
        return local
    per_rank = -(-count // world_size())
    padded = torch.zeros((per_rank, *local.shape[1:]), dtype=local.dtype, device=_collective_device())
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[:count].to(local.device)


if __name__ == "__main__":  # how `run_processes` starts torchrun
    try:
        status = torchrun(sys.argv[1:], Path(os.environ[RUN_ID_FILE_VARIABLE]))
    finally:  # the launch folder is this process's to remove: it outlives a launcher killed outright
        shutil.rmtree(os.environ[LAUNCH_FOLDER_VARIABLE], ignore_errors=True)
    sys.exit(status)
