"""One process of the multi-process test (run by parallel_test.py, not collected by pytest).

Trains the BatchNorm MLP of the parallel tests for a few steps with the runner of argv[2] ("shard"
by default; "pmap" must refuse a multi-process run) and, on
process 0, saves the final parameters and the loss trajectory to the .npz file named by argv[1].
The multi-process layout comes from the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID; XLA_FLAGS for the number of CPU devices).
"""

import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position

import jdl  # pylint: disable=wrong-import-position
from jdl import data, models, parallel  # pylint: disable=wrong-import-position


def main(out_path: str, layout: str) -> None:
  parallel.initialize_distributed()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(94, 6)).astype(np.float32)
  y = (x @ rng.normal(size=(6, 3))).argmax(1).astype(np.int32)
  index, count = jax.process_index(), jax.process_count()
  train = data.ArraySource(x[:64], y[:64], 16, shuffle=True, seed=3, process_index=index,
                           process_count=count)
  test = data.ArraySource(x[64:], y[64:], 10, shuffle=False, process_index=index,
                          process_count=count)
  runner = parallel.make_runner(layout, batch_size=16)
  model = models.MLP(hidden=(16,), num_classes=3, normalization="batch", axis_name=runner.axis_name)
  state = jdl.create_train_state(model, optax.adam(0.05), x[:1], jax.random.PRNGKey(0))
  train_step, eval_step = jdl.make_steps(jdl.tasks.classification(top_k=(2,)),
                                         axis_name=runner.axis_name)
  state, history = jdl.fit(state, train_step, eval_step, train, test, num_steps=8,
                           eval_every_steps=2, progress=False, runner=runner)
  if index == 0:
    flat = {
        jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0))
        for path, leaf in jax.tree_util.tree_leaves_with_path((state.params, state.model_state))
    }
    np.savez(out_path, train_loss=[r["train_loss"] for r in history],
             test_accuracy=[r["test_accuracy"] for r in history], devices=jax.device_count(),
             processes=count, **flat)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "shard")
