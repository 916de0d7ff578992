"""Training reliability: atomic checkpoint files, resume, pre-emption, non-finite losses."""

from mambaout_pl.errors import (
    CheckpointError,
    CheckpointMismatchError,
    NonFiniteLossError,
    OutputExistsError,
    OutputPathError,
    OutputWriteError,
    UnsafeCheckpointError,
)
from mambaout_pl.training.atomic import (
    atomic_symlink,
    atomic_torch_save,
    atomic_write,
    staged_folder,
)
from mambaout_pl.training.checkpoint_io import (
    AtomicCheckpointIO,
    ModelCheckpoint,
    find_last_checkpoint,
    last_checkpoint_candidates,
    last_checkpoint_folders,
    read_checkpoint,
)
from mambaout_pl.training.nonfinite import NONFINITE_LOSS_MODES, NonFiniteLossMixin
from mambaout_pl.training.preemption import PreemptionCheckpoint
from mambaout_pl.training.resume import (
    CHECKPOINT_KEY,
    RESUME_MAY_CHANGE,
    RNG_STATES_KEY,
    check_checkpoint_fits,
    differing_hyperparameters,
    rng_states,
    set_rng_states,
)
from mambaout_pl.training.run_folders import (
    check_new_output,
    check_output_paths,
    prediction_folder,
    reserve_log_versions,
)

__all__ = [
    "CHECKPOINT_KEY",
    "NONFINITE_LOSS_MODES",
    "RESUME_MAY_CHANGE",
    "RNG_STATES_KEY",
    "AtomicCheckpointIO",
    "CheckpointError",
    "CheckpointMismatchError",
    "ModelCheckpoint",
    "NonFiniteLossError",
    "NonFiniteLossMixin",
    "OutputExistsError",
    "OutputPathError",
    "OutputWriteError",
    "PreemptionCheckpoint",
    "UnsafeCheckpointError",
    "atomic_symlink",
    "atomic_torch_save",
    "atomic_write",
    "check_checkpoint_fits",
    "check_new_output",
    "check_output_paths",
    "differing_hyperparameters",
    "find_last_checkpoint",
    "last_checkpoint_candidates",
    "last_checkpoint_folders",
    "prediction_folder",
    "read_checkpoint",
    "reserve_log_versions",
    "rng_states",
    "set_rng_states",
    "staged_folder",
]
