"""Benchmark: the shakespeare_char transformer's train step, jdl against a PyTorch eager contender.

Both train the experiment's default model (4 pre-LayerNorm blocks, 4 heads, width 128, context
64, tied embeddings, GELU, batch 12) with the experiment's optimizer (AdamW 1e-3, b2 0.99, weight
decay 0.1 on matrices, clipping at 1.0, 100 warm-up steps then cosine decay to 0.1) on the same
windows of tiny_shakespeare, drawn by one seed, in one process, taking turns every `--block`
steps so that a slow spell of a shared machine falls on both. Printed: each contender's median
step time (after `--warmup` steps; jdl's compile is left out), tokens/s, the validation loss after
the last step, jdl's time over torch's, and that ratio's median and quartiles over the blocks.

jdl runs as a user's loop runs it: `jdl.make_train_step` under `jax.jit` with the state donated,
fed numpy batches. torch runs eagerly with its own CPU kernels (`scaled_dot_product_attention`
for the attention), all of the machine's cores for both. The process first calls
`jdl.experiment.reuse_host_memory()`, as a CPU run of an experiment does: malloc then keeps freed
memory for reuse, for both contenders (`--default_malloc` leaves glibc's default, under which
each of jdl's steps faults its 42 MiB temporary buffer in again).

  pip install -e ".[bench]"     # torch (its CPU build suffices)
  python -m benchmarks.bench_torch_shakespeare --text=../shared/data/tiny_shakespeare.txt
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import numpy as np

BLOCK, BATCH, WIDTH, LAYERS, HEADS = 64, 12, 128, 4, 4
PEAK_LR, B2, EPS, WEIGHT_DECAY, CLIP, WARMUP, END_FRACTION = 1e-3, 0.99, 1e-8, 0.1, 1.0, 100, 0.1


def load_tokens(path: str) -> tuple[np.ndarray, np.ndarray, int]:
  """(train tokens, validation tokens, vocabulary size): characters as their rank in the sorted
  character set; the last tenth of the text is the validation split."""
  with open(path, encoding="utf-8") as file:
    text = file.read()
  chars = sorted(set(text))
  table = {c: i for i, c in enumerate(chars)}
  tokens = np.fromiter((table[c] for c in text), np.int32, len(text))
  cut = len(tokens) * 9 // 10
  return tokens[:cut], tokens[cut:], len(chars)


def windows(tokens: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Inputs and next-token labels of the windows at `starts` ([..., BLOCK] each)."""
  rows = tokens[starts[..., None] + np.arange(BLOCK + 1)]
  return rows[..., :-1], rows[..., 1:]


def learning_rate(step: int, total: int) -> float:
  """Linear warm-up to the peak, then cosine decay to END_FRACTION of it at `total` steps."""
  if step < WARMUP:
    return PEAK_LR * step / WARMUP
  progress = min((step - WARMUP) / max(total - WARMUP, 1), 1.0)
  return PEAK_LR * (END_FRACTION + (1 - END_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


class Contender:
  """One implementation's training: `step(index, inputs, labels)` trains on one batch (returns
  when it is done), `validation_loss(batches)` evaluates."""

  def step(self, index: int, inputs: np.ndarray, labels: np.ndarray) -> None:
    raise NotImplementedError

  def validation_loss(self, batches) -> float:
    raise NotImplementedError


class JdlContender(Contender):
  """`jdl.make_train_step` under `jax.jit` with the state donated, fed numpy batches."""

  def __init__(self, vocab: int, total_steps: int, first_inputs: np.ndarray) -> None:
    import jax  # pylint: disable=import-outside-toplevel
    import jdl  # pylint: disable=import-outside-toplevel
    from jdl import models, optim  # pylint: disable=import-outside-toplevel

    self.jax, self.jdl = jax, jdl
    model = models.TransformerLM(num_classes=vocab, block_size=BLOCK, num_layers=LAYERS,
                                 num_heads=HEADS, width=WIDTH)
    tx = optim.make_optimizer(
        {"name": "adamw", "learning_rate": PEAK_LR, "b2": B2, "eps": EPS,
         "weight_decay": WEIGHT_DECAY, "clip_norm": CLIP, "schedule": "warmup_cosine",
         "warmup_steps": WARMUP, "end_fraction": END_FRACTION}, total_steps=total_steps)
    self.state = jdl.create_train_state(model, tx, first_inputs[:1], jax.random.key(0))
    self.task = jdl.tasks.classification()
    self.train_step = jax.jit(jdl.make_train_step(self.task), donate_argnums=0)

  def step(self, index: int, inputs: np.ndarray, labels: np.ndarray) -> None:
    self.state, metrics = self.train_step(self.state, {"input": inputs, "label": labels})
    self.jax.block_until_ready(metrics)

  def validation_loss(self, batches) -> float:
    evaluate = self.jax.jit(self.jdl.make_eval_step(self.task))
    sums = [evaluate(self.state, {"input": x, "label": y}) for x, y in batches]
    return sum(float(s["loss_sum"]) for s in sums) / sum(float(s["count"]) for s in sums)


class TorchContender(Contender):
  """The same model and optimizer in PyTorch, eagerly."""

  def __init__(self, vocab: int, total_steps: int) -> None:
    import torch  # pylint: disable=import-outside-toplevel
    from torch import nn  # pylint: disable=import-outside-toplevel
    from torch.nn import functional as F  # pylint: disable=import-outside-toplevel

    self.torch, self.F, self.vocab, self.total_steps = torch, F, vocab, total_steps
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)

    class Block(nn.Module):
      def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH, eps=1e-6), nn.LayerNorm(WIDTH, eps=1e-6)
        self.qkv, self.out = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.up, self.down = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

      def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, HEADS, WIDTH // HEADS).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(y.transpose(1, 2).reshape(b, t, WIDTH))
        return x + self.down(F.gelu(self.up(self.ln2(x)), approximate="tanh"))

    class GPT(nn.Module):
      def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, WIDTH), nn.Embedding(BLOCK, WIDTH)
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln = nn.LayerNorm(WIDTH, eps=1e-6)

      def forward(self, idx):
        x = self.tokens(idx) + self.positions(torch.arange(idx.shape[1]))
        for block in self.blocks:
          x = block(x)
        return self.ln(x) @ self.tokens.weight.T

    self.model = GPT()
    matrices = [p for p in self.model.parameters() if p.ndim >= 2]
    others = [p for p in self.model.parameters() if p.ndim < 2]
    self.optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": WEIGHT_DECAY},
                                        {"params": others, "weight_decay": 0.0}],
                                       lr=PEAK_LR, betas=(0.9, B2), eps=EPS)

  def step(self, index: int, inputs: np.ndarray, labels: np.ndarray) -> None:
    torch, F = self.torch, self.F
    for group in self.optimizer.param_groups:
      group["lr"] = learning_rate(index, self.total_steps)
    logits = self.model(torch.from_numpy(inputs).long())
    loss = F.cross_entropy(logits.reshape(-1, self.vocab),
                           torch.from_numpy(labels).long().reshape(-1))
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
    self.optimizer.step()

  def validation_loss(self, batches) -> float:
    torch, F = self.torch, self.F
    with torch.no_grad():
      total = count = 0.0
      for inputs, labels in batches:
        logits = self.model(torch.from_numpy(inputs).long())
        total += float(F.cross_entropy(logits.reshape(-1, self.vocab),
                                       torch.from_numpy(labels).long().reshape(-1),
                                       reduction="sum"))
        count += labels.size
    return total / count


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--text", default="../shared/data/tiny_shakespeare.txt")
  parser.add_argument("--steps", type=int, default=600, help="train steps of each contender")
  parser.add_argument("--warmup", type=int, default=20, help="untimed first steps")
  parser.add_argument("--block", type=int, default=10, help="steps each takes in turn")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--default_malloc", action="store_true",
                      help="do not call jdl.experiment.reuse_host_memory()")
  args = parser.parse_args()
  if not args.default_malloc:
    from jdl import experiment  # pylint: disable=import-outside-toplevel
    print(f"reuse_host_memory applied: {experiment.reuse_host_memory()}")
  train, valid, vocab = load_tokens(args.text)
  rng = np.random.default_rng(args.seed)
  starts = rng.integers(0, len(train) - BLOCK - 1, size=(args.steps, BATCH))
  batches = [windows(train, row) for row in starts]
  valid_starts = rng.integers(0, len(valid) - BLOCK - 1, size=(8, 256))
  validation = [windows(valid, row) for row in valid_starts]
  contenders: dict[str, Contender] = {
      "jdl": JdlContender(vocab, len(batches), batches[0][0]),
      "torch": TorchContender(vocab, len(batches))}
  times: dict[str, list[float]] = {name: [] for name in contenders}
  # The contenders take turns every `block` steps, each on its own run through the same batches,
  # so a slow spell of a shared machine falls on both; a block's steps are timed one by one.
  for first in range(0, len(batches), args.block):
    for name, contender in contenders.items():
      for index in range(first, min(first + args.block, len(batches))):
        start = time.perf_counter()
        contender.step(index, *batches[index])
        if index >= args.warmup:
          times[name].append(time.perf_counter() - start)
  print(f"{len(batches)} steps in blocks of {args.block} taking turns, batch {BATCH} x context "
        f"{BLOCK}, {os.cpu_count()} CPU cores")
  for name, contender in contenders.items():
    step = statistics.median(times[name])
    print(f"{name:5s}: step {1e3 * step:.2f} ms (median), {BATCH * BLOCK / step:,.0f} tokens/s, "
          f"validation loss {contender.validation_loss(validation):.4f}")
  blocks = [(statistics.median(times["jdl"][i:i + args.block]),
             statistics.median(times["torch"][i:i + args.block]))
            for i in range(0, len(times["jdl"]), args.block)]
  paired = sorted(j / t for j, t in blocks)
  print(f"jdl / torch step time: {statistics.median(times['jdl']) / statistics.median(times['torch']):.3f}"
        f" (medians); per block of {args.block}: median {statistics.median(paired):.3f}, "
        f"quartiles {paired[len(paired) // 4]:.3f} to {paired[3 * len(paired) // 4]:.3f}")

if __name__ == "__main__":
  main()
