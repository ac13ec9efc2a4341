"""Generates text from a trained language-model workdir (e.g. one of `shakespeare_char`).

  python -m experiments.sample --workdir=runs/shakespeare_char --prompt="ROMEO:" \\
      --num_tokens=500 --temperature=0.8 --top_k=10 --seed=0 --checkpoint=best

The same workdir, prompt, settings and seed always give the same text.
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np

from jdl import generate as generate_lib
from jdl import runs


def sample_text(workdir: str, *, prompt: str, num_tokens: int, temperature: float = 1.0,
                top_k: int | None = None, seed: int = 0, checkpoint: str = "latest",
                num_samples: int = 1) -> list[str]:
  """`num_samples` continuations of `prompt` (the prompt included) from the run in `workdir`."""
  run = runs.load_run(workdir, checkpoint=checkpoint)
  if run.config.task != "language_model" or run.vocabulary is None:
    raise ValueError(f"{workdir} is a {run.config.task!r} run; sampling needs a language model.")
  if not prompt:
    raise ValueError("the prompt is empty; give at least one character, e.g. --prompt=\"\\n\".")
  tokens = np.tile(run.vocabulary.encode(prompt)[None, :], (num_samples, 1))
  generated = generate_lib.generate(
      run.state.apply_fn, run.state.variables(), tokens, num_new_tokens=num_tokens,
      key=jax.random.PRNGKey(seed), temperature=temperature, top_k=top_k,
      block_size=run.meta.input_shape[0])
  return [run.vocabulary.decode(row) for row in np.asarray(generated)]


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a trained language-model workdir")
  parser.add_argument("--prompt", default="\n", help="text to continue")
  parser.add_argument("--num_tokens", type=int, default=500, help="characters to generate")
  parser.add_argument("--temperature", type=float, default=0.8, help="0: always the most likely")
  parser.add_argument("--top_k", type=int, default=None, help="sample among the k most likely")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num_samples", type=int, default=1)
  parser.add_argument("--checkpoint", default="latest", help="latest, best or a step number")
  args = parser.parse_args(argv)
  try:
    texts = sample_text(args.workdir, prompt=args.prompt, num_tokens=args.num_tokens,
                        temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                        checkpoint=args.checkpoint, num_samples=args.num_samples)
  except (ValueError, FileNotFoundError) as error:
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2) from None
  for index, text in enumerate(texts):
    if len(texts) > 1:
      print(f"--- sample {index} ---")
    print(text)


if __name__ == "__main__":
  main()
