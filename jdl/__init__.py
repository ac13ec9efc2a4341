"""jdl: a JAX functional training library: Flax linen models, Optax optimizers, and one pure train
step `(state, batch) -> (state, metrics)` under jit, sharded jit and pmap. The names below are the
public API; the modules (`jdl.transfer`, `jdl.analysis`, `jdl.parallel`, ...) hold the rest.
"""

import os as _os

# TensorFlow's C++ info logs are noise for a JAX user: quiet them (unless set) before it loads.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

# pylint: disable=wrong-import-position
from jdl import data, models, tasks
from jdl.checkpoint import (
    CheckpointError, Checkpointer, CheckpointWriteError, CorruptCheckpointError,
)
from jdl.config import ConfigError, apply_overrides, base_config
from jdl.experiment import train_and_evaluate
from jdl.loop import NonFiniteError, Preempted, evaluate, fit
from jdl.losses import (
    binary_cross_entropy, cross_entropy_from_probabilities, make_weight_penalty,
    mean_squared_error, softmax_cross_entropy,
)
from jdl.metrics import compute_metrics, empty_metrics, merge_metrics
from jdl.optim import current_learning_rate, make_optimizer, make_schedule
from jdl.state import TrainState, count_params, create_train_state
from jdl.step import make_eval_step, make_steps, make_train_step
from jdl.tasks import Task
from jdl.writers import MetricWriter, read_jsonl

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "CheckpointWriteError", "Checkpointer", "ConfigError",
    "CorruptCheckpointError", "MetricWriter", "NonFiniteError", "Preempted", "Task", "TrainState",
    "apply_overrides", "base_config", "binary_cross_entropy", "compute_metrics", "count_params",
    "create_train_state", "cross_entropy_from_probabilities", "current_learning_rate", "data",
    "empty_metrics", "evaluate", "fit", "make_eval_step", "make_optimizer", "make_schedule",
    "make_steps", "make_train_step", "make_weight_penalty", "mean_squared_error", "merge_metrics",
    "models", "read_jsonl", "softmax_cross_entropy", "tasks", "train_and_evaluate",
]
