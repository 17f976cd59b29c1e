"""Prompts that share tokens: the samples of a prompt (`infer.py --num-samples`, pass@k, RL rollouts) and prompts
that begin alike (few-shot examples, one document asked several questions, a long system prompt).

P x N prompts of L tokens, M new tokens each, three ways in the same run: "identical", P prompts each sampled N
times (the engine runs each prompt once and fills its N rows from that run); "prefix", every prompt the same
L - T tokens followed by T of its own (the engine runs the common part once and copies it); "distinct", every
prompt different from its first token (the same shapes and work, nothing to share: what each costs run alone).
Each way runs with every row at once, through --rows rows (continuous batching: rows that end at the same
step are refilled together), and through --rows rows with answer lengths drawn from [M / 2, 2 M] (prompts
ending at different steps: a freed row copies what it shares from a row still generating). Then the "prefix"
and "distinct" prompts scored (`--prompt-logprobs`: each token's log-probability, --rows prompts per call; the
common part runs once for each group of --rows prompts, as for the choices of a question), and the "prefix"
prompts scored with --share-prefix 0 (each run whole). Runs a demo-sized
random model on whatever device jax finds (compilation excluded: every shape runs once first) and prints one
JSON object.

python benchmarks/prompt_sharing.py [--prompts 4] [--samples 8] [--prompt-len 1000] [--tail 100] [--new-tokens 16]
    [--rows 8]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import jax
import numpy as np

from qwen_moe_jax.demo import demo_model
from qwen_moe_jax.generate import Generator
from qwen_moe_jax.sampling import Sampling
from qwen_moe_jax.scoring import prompt_scores


def timed(gen: Generator, prompts: list[list[int]], new: list[int]) -> dict:
  """The second of two runs (the first compiles): seconds in all, in the first prefill, prompt tokens shared."""
  for _ in range(2):
    start = time.perf_counter()
    r = gen.generate(prompts, new, Sampling(temperature=1.0), seed=0)
    seconds = time.perf_counter() - start - r.compile_seconds
  assert [len(o) for o in r.output_ids] == new
  return {"seconds": round(seconds, 3), "first_prefill_s": round(r.prefill_seconds, 3),
          "shared_tokens": r.shared_tokens}


def scored(gen: Generator, prompts: list[list[int]]) -> dict:
  """The second of two runs of prompt_scores (the first compiles): seconds."""
  for _ in range(2):
    start = time.perf_counter()
    scores = prompt_scores(gen, prompts)
    seconds = time.perf_counter() - start
  assert [len(s.logprobs) for s in scores] == [len(p) for p in prompts]
  return {"seconds": round(seconds, 3)}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--prompts", type=int, default=4)
  ap.add_argument("--samples", type=int, default=8)
  ap.add_argument("--prompt-len", type=int, default=1000)
  ap.add_argument("--tail", type=int, default=100, help='"prefix" prompts: tokens of their own after the common ones')
  ap.add_argument("--new-tokens", type=int, default=16)
  ap.add_argument("--rows", type=int, default=8, help="rows for the continuous-batching runs")
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = ap.parse_args()
  cfg, mesh, model = demo_model(args.dtype)
  rng = np.random.default_rng(0)
  base = rng.integers(0, cfg.vocab_size, (args.prompts, args.prompt_len)).tolist()
  same = [p for p in base for _ in range(args.samples)]
  distinct = [[(p[0] + j) % cfg.vocab_size] + p[1:] for p in base for j in range(args.samples)]
  tails = rng.integers(0, cfg.vocab_size, (len(same), args.tail)).tolist()
  prefix = [base[0][:args.prompt_len - args.tail] + tail for tail in tails]
  fixed = [args.new_tokens] * len(same)
  varied = rng.integers(max(1, args.new_tokens // 2), 2 * args.new_tokens + 1, len(same)).tolist()
  runs = {}
  for rows, new, label in ((None, fixed, "all_rows"), (args.rows, fixed, f"{args.rows}_rows"),
                           (args.rows, varied, f"{args.rows}_rows_varied_lengths")):
    gen = Generator(model, mesh, batch_size=rows)
    for name, prompts in (("identical", same), ("prefix", prefix), ("distinct", distinct)):
      runs[f"{name}_{label}"] = timed(gen, prompts, new)
  for name, prompts, share in (("prefix", prefix, 64), ("prefix_unshared", prefix, 0), ("distinct", distinct, 64)):
    runs[f"scoring_{name}"] = scored(Generator(model, mesh, prefill_rows=args.rows, share_prefix=share), prompts)
  print(json.dumps({
    "benchmark": "prompt_sharing", "prompts": args.prompts, "samples": args.samples,
    "prompt_len": args.prompt_len, "tail": args.tail, "new_tokens": args.new_tokens, "rows": args.rows,
    "runs": runs, "dtype": args.dtype,
    "device": jax.devices()[0].device_kind, "machine": platform.machine(), "jax": jax.__version__,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }))


if __name__ == "__main__":
  main()
