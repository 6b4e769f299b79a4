"""Errors a user can fix, and the statuses and errors by which training processes tell their launcher how they
ended. Each user error's message names the problem and the fix; the CLI prints it as one line.

Usage:
    raise DatasetError(f"missing folder {path!r}: ...")
"""

# Set by `cifake train` for the training processes it starts: each leaves its one-line error in torchrun's error
# file rather than printing it, and the launching process prints the first failure's once
# (`distributed.torchrun`), where every process would print the same line amid torchrun's report.
LAUNCHER_REPORTS_ERRORS = "CIFAKE_LAUNCHER_REPORTS_ERRORS"
# Set by the same launcher: the file where the process that starts the MLflow run writes its id, so that the
# launcher can end the run should that process be killed outright (`tracking.end_run_left_running`).
RUN_ID_FILE_VARIABLE = "CIFAKE_RUN_ID_FILE"
# Set by the same launcher: the folder it made for one launch, which holds the run-id file and the splits it made
# when it checked the data (`data.write_split_files`), read by the processes instead of each scanning the dataset
# again. torchrun's wrapper removes it when it ends, as it outlives a launcher killed outright.
LAUNCH_FOLDER_VARIABLE = "CIFAKE_LAUNCH_FOLDER"
# The exit status of a command stopped by Ctrl-C or SIGTERM, as a shell reports Ctrl-C (128 + SIGINT).
INTERRUPTED_STATUS = 130
# The exit status of a training process whose collective failed because another process of its group ended: never
# the cause of a failure, which the launcher looks for among the others.
PEER_ENDED_STATUS = 3


class PeerEndedError(RuntimeError):
    """A training process's collective failed because another process of its group ended first, which is the
    cause: not a mistake of the user's, and never this process's own failure."""


class CifakeError(Exception):
    """A mistake in something the user gave: a folder, a file, an image, a parameter or a model reference."""


class ConfigError(CifakeError, ValueError):
    """A configuration key or value that cannot be used."""


class DatasetError(CifakeError, ValueError):
    """A dataset folder or download that cannot be used."""


class ImageError(CifakeError, ValueError):
    """An input that is not a usable image."""


class DeviceError(CifakeError, ValueError):
    """A requested device that this machine does not have."""


class PretrainedWeightsError(CifakeError, RuntimeError):
    """Pretrained weights were required but could not be loaded."""


class RegistryError(CifakeError, LookupError):
    """A registered model, version or alias that does not exist."""


class ThresholdError(CifakeError, ValueError):
    """A decision threshold that is neither a name from thresholds.json nor a number in [0, 1]."""
