"""Benchmark: the shakespeare_char transformer's train step, jdl against a PyTorch eager contender.

Both train the experiment's default model (4 pre-LayerNorm blocks, 4 heads, width 128, context
64, tied embeddings, GELU, batch 12) with the experiment's optimizer (AdamW 1e-3, b2 0.99, weight
decay 0.1 on matrices, clipping at 1.0, 100 warm-up steps then cosine decay to 0.1) on the same
windows of tiny_shakespeare, drawn by one seed, in one process, taking turns round after round.
Printed: each contender's median step time (after the warm-up steps; jdl's compile is left out)
over all rounds, tokens/s, the validation loss after the last step, and jdl's time over torch's.

jdl runs as a user's loop runs it: `jdl.make_train_step` under `jax.jit` with the state donated,
fed numpy batches. torch runs eagerly with its own CPU kernels (`scaled_dot_product_attention`
for the attention), all of the machine's cores for both.

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


def run_jdl(batches, validation, vocab: int, warmup: int) -> tuple[list[float], float]:
  """Step times after `warmup` steps, and the validation loss after the last step."""
  import jax  # pylint: disable=import-outside-toplevel
  import jdl  # pylint: disable=import-outside-toplevel
  from jdl import models, optim  # pylint: disable=import-outside-toplevel

  model = models.TransformerLM(num_classes=vocab, block_size=BLOCK, num_layers=LAYERS,
                               num_heads=HEADS, width=WIDTH)
  tx = optim.make_optimizer(
      {"name": "adamw", "learning_rate": PEAK_LR, "b2": B2, "eps": EPS,
       "weight_decay": WEIGHT_DECAY, "clip_norm": CLIP, "schedule": "warmup_cosine",
       "warmup_steps": WARMUP, "end_fraction": END_FRACTION}, total_steps=len(batches))
  state = jdl.create_train_state(model, tx, batches[0][0][:1], jax.random.key(0))
  task = jdl.tasks.classification()
  step = jax.jit(jdl.make_train_step(task), donate_argnums=0)
  times = []
  for index, (inputs, labels) in enumerate(batches):
    start = time.perf_counter()
    state, metrics = step(state, {"input": inputs, "label": labels})
    jax.block_until_ready(metrics)
    if index >= warmup:
      times.append(time.perf_counter() - start)
  evaluate = jax.jit(jdl.make_eval_step(task))
  sums = [evaluate(state, {"input": x, "label": y}) for x, y in validation]
  loss = sum(float(s["loss_sum"]) for s in sums) / sum(float(s["count"]) for s in sums)
  return times, loss


def run_torch(batches, validation, vocab: int, warmup: int) -> tuple[list[float], float]:
  """The same model and optimizer in PyTorch, eagerly."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel
  from torch.nn import functional as F  # pylint: disable=import-outside-toplevel

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

  model = GPT()
  matrices = [p for p in model.parameters() if p.ndim >= 2]
  others = [p for p in model.parameters() if p.ndim < 2]
  optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": WEIGHT_DECAY},
                                 {"params": others, "weight_decay": 0.0}],
                                lr=PEAK_LR, betas=(0.9, B2), eps=EPS)
  times = []
  for index, (inputs, labels) in enumerate(batches):
    start = time.perf_counter()
    for group in optimizer.param_groups:
      group["lr"] = learning_rate(index, len(batches))
    logits = model(torch.from_numpy(inputs).long())
    loss = F.cross_entropy(logits.reshape(-1, vocab), torch.from_numpy(labels).long().reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    optimizer.step()
    if index >= warmup:
      times.append(time.perf_counter() - start)
  with torch.no_grad():
    total = count = 0.0
    for inputs, labels in validation:
      logits = model(torch.from_numpy(inputs).long())
      total += float(F.cross_entropy(logits.reshape(-1, vocab),
                                     torch.from_numpy(labels).long().reshape(-1), reduction="sum"))
      count += labels.size
  return times, total / count


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--text", default="../shared/data/tiny_shakespeare.txt")
  parser.add_argument("--steps", type=int, default=300, help="train steps a round")
  parser.add_argument("--warmup", type=int, default=20, help="untimed steps a round")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  train, valid, vocab = load_tokens(args.text)
  rng = np.random.default_rng(args.seed)
  starts = rng.integers(0, len(train) - BLOCK - 1, size=(args.steps, BATCH))
  batches = [windows(train, row) for row in starts]
  valid_starts = rng.integers(0, len(valid) - BLOCK - 1, size=(8, 256))
  validation = [windows(valid, row) for row in valid_starts]
  contenders = {"jdl": run_jdl, "torch": run_torch}
  times: dict[str, list[float]] = {name: [] for name in contenders}
  losses: dict[str, list[float]] = {name: [] for name in contenders}
  for round_index in range(args.rounds):
    order = list(contenders) if round_index % 2 == 0 else list(reversed(contenders))
    for name in order:
      step_times, loss = contenders[name](batches, validation, vocab, args.warmup)
      times[name].append(statistics.median(step_times))
      losses[name].append(loss)
      print(f"round {round_index}: {name:5s} step {1e3 * times[name][-1]:.2f} ms, "
            f"validation loss {loss:.4f}", flush=True)
  print(f"\n{args.steps} steps x {args.rounds} rounds, batch {BATCH} x context {BLOCK}, "
        f"{os.cpu_count()} CPU cores")
  for name in contenders:
    step = statistics.median(times[name])
    print(f"{name:5s}: step {1e3 * step:.2f} ms (median of round medians), "
          f"{BATCH * BLOCK / step:,.0f} tokens/s, validation loss "
          f"{statistics.median(losses[name]):.4f}")
  paired = [j / t for j, t in zip(times["jdl"], times["torch"])]
  print(f"jdl / torch step time: {statistics.median(times['jdl']) / statistics.median(times['torch']):.3f}"
        f" (per round: {', '.join(f'{r:.3f}' for r in paired)})")


if __name__ == "__main__":
  main()
