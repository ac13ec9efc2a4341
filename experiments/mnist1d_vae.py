"""A variational autoencoder of MNIST-1D signals: a generative task through the same step and fit.

The VAE (`jdl.models.VAE`: Dense 40 -> 128 -> a Gaussian over 8 latent dimensions -> 128 -> 40)
draws its codes from its own random stream, "sample", which the task names; its loss is the
negative ELBO (`jdl.models.elbo_loss`), whose reconstruction and KL terms are logged beside it
(`train_kl`, `test_reconstruction`, ... in metrics.jsonl and TensorBoard). At the end it plots
signals decoded from codes drawn from the prior (`samples.png`) and test signals with their
reconstructions (`reconstructions.png`) into the workdir. Labels are not used.

  python -m experiments.mnist1d_vae
  python -m experiments.mnist1d_vae --config.latent=2 --config.num_steps=6000
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np

import jdl
from jdl import data as data_lib
from jdl import experiment, models
from jdl.analysis import plots


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # initialisation and every random stream (data order, codes)
  config.hidden = (128,)  # encoder widths; the decoder mirrors them
  config.latent = 8  # dimensions of the latent code
  config.optimizer = ml_collections.ConfigDict({"name": "adam", "learning_rate": 1e-3})
  config.batch_size = 100
  config.num_steps = 4000  # 100 epochs of the 4000 training signals
  config.eval_every_steps = 1000
  config.num_samples = 16  # signals drawn from the prior for samples.png
  config.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS's default: None
  config.progress = True
  config.cpu_threads = 1  # a model this small trains fastest on one CPU thread
  config.compilation_cache_dir = "~/.cache/jdl/xla"  # "" for none
  config.lock()
  return config


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the VAE on MNIST-1D, logs to `workdir`, plots samples and reconstructions there."""
  train_data, test_data, _ = data_lib.load_classification_data(
      "mnist1d", batch_size=config.batch_size, eval_batch_size=1000, data_dir=config.data_dir,
      seed=config.seed)
  model = models.VAE(hidden=tuple(config.hidden), latent=config.latent)
  task = jdl.Task(loss=models.elbo_loss, rng_streams=(models.vae.SAMPLE_STREAM,))
  state = jdl.create_train_state(model, jdl.make_optimizer(config.optimizer),
                                 train_data.inputs[:1], jax.random.key(config.seed),
                                 rng_streams=task.rng_streams)
  train_step, eval_step = jdl.make_steps(task, check_finite=True)
  with jdl.MetricWriter(workdir) as writer:
    writer.write_config(config)
    state, history = jdl.fit(state, train_step, eval_step, train_data, test_data,
                             num_steps=config.num_steps, eval_every_steps=config.eval_every_steps,
                             writer=writer, progress=config.progress)
  example_shape = train_data.inputs.shape[1:]
  codes = jax.random.normal(jax.random.key(config.seed + 1), (config.num_samples, config.latent))
  samples = model.apply({"params": state.params}, codes, example_shape, method=models.VAE.decode)
  plots.plot_examples(np.asarray(samples), os.path.join(workdir, "samples.png"),
                      title=f"decoded from {config.num_samples} codes drawn from N(0, I)")
  originals = test_data.inputs[:config.num_samples]
  outputs = model.apply({"params": state.params}, originals, train=False,
                        rngs={models.vae.SAMPLE_STREAM: jax.random.key(config.seed + 2)})
  plots.plot_examples(np.asarray(outputs["reconstruction"]),
                      os.path.join(workdir, "reconstructions.png"), references=originals,
                      title="test signals (grey) and their reconstructions")
  final = history[-1]
  print(f"final test ELBO: {final['test_elbo']:.3f} per signal (reconstruction "
        f"{final['test_reconstruction']:.3f}, KL {final['test_kl']:.3f}) after "
        f"{int(final['step'])} steps; plots in {workdir}")
  return {"state": state, "history": history}


def main() -> None:
  experiment.main(get_config, name="mnist1d_vae", train=train)


if __name__ == "__main__":
  main()
