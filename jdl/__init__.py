"""jdl: a JAX functional training library.

Pure Flax linen models, Optax optimizers, and one pure train step `(state, batch) -> (state,
metrics)` that runs under jit, sharded jit and pmap. Everything below is public API.
"""

import os as _os

# TensorFlow serves only the input pipeline; its C++ info logs (oneDNN notices and the like) are
# noise for a JAX user. Set before anything imports TensorFlow; a value the user set wins.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from jdl import augment, data, models, parallel, resident  # pylint: disable=wrong-import-position
from jdl.config import ConfigError, apply_overrides, classification_config, run_experiment
from jdl.logging import MetricWriter, read_jsonl
from jdl.checkpoint import CheckpointError, Checkpointer
from jdl.loop import NonFiniteError, Preempted, evaluate, fit, train_and_evaluate
from jdl.losses import (
    binary_cross_entropy,
    cross_entropy_from_probabilities,
    kernels_only_mask,
    l1_penalty,
    l2_penalty,
    make_weight_penalty,
    mean_squared_error,
    softmax_cross_entropy,
)
from jdl.metrics import (
    classification_metrics,
    compute_metrics,
    empty_metrics,
    loss_metrics,
    merge_metrics,
)
from jdl.runtime import set_cpu_dot_library, set_cpu_threads
from jdl.optim import (
    current_learning_rate, ema_parameters, make_optimizer, make_schedule, with_parameter_ema,
)
from jdl.state import (
    PendingTrainState, TrainState, count_params, create_train_state, start_train_state,
)
from jdl.step import make_classification_steps, make_eval_step, make_train_step

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "Checkpointer", "ConfigError", "MetricWriter", "NonFiniteError",
    "PendingTrainState", "Preempted", "TrainState", "apply_overrides", "binary_cross_entropy",
    "classification_config", "classification_metrics", "compute_metrics", "count_params",
    "current_learning_rate", "ema_parameters", "with_parameter_ema",
    "augment", "create_train_state", "cross_entropy_from_probabilities", "data", "empty_metrics",
    "evaluate",
    "fit", "kernels_only_mask", "l1_penalty", "l2_penalty", "loss_metrics",
    "make_classification_steps", "make_eval_step", "make_optimizer", "make_schedule",
    "make_train_step", "make_weight_penalty", "mean_squared_error", "merge_metrics", "models",
    "parallel", "resident",
    "read_jsonl", "run_experiment", "set_cpu_dot_library", "set_cpu_threads", "softmax_cross_entropy",
    "start_train_state",
    "train_and_evaluate",
]
