"""Multi-turn chat (a server's conversations): each turn's prompt is the whole conversation so far, so without a
cache of earlier turns every turn runs the history again.

C conversations of T turns share a system prompt of S tokens; each turn adds a user message of U tokens, and the
reply (R new tokens, greedy) joins the history. Turn k of every conversation runs as one generate call of fixed
shapes (what `infer.py --serve`'s engine runs when C users send their k-th message together), three ways:
`rerun` (--share-prefix 0: every prompt runs whole), `shared` (the default --share-prefix 64 without kept rows:
each call runs the system prompt once and copies it, but the history again) and `kept` (what the server does:
`keep=True`, each finished row holding its prompt and reply, so a conversation's next turn copies them and runs
only its new message). Then with half as many rows as conversations, so that each call's second half of
conversations takes the rows of its first half: `kept_few_rows` (what the rows keep is lost to the next prompts)
and `pooled_few_rows` (`--prefix-pool` of that many rows keeps it). Outputs are checked equal. Runs a demo-sized
random model on whatever device jax finds (compilation excluded: each way runs twice, the second timed) and prints
one JSON object.

python benchmarks/conversations.py [--conversations 8] [--turns 4] [--system 500] [--user 60] [--reply 24]
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
from qwen_moe_jax.generate import Generator, Room, cache_bucket


def chat(gen: Generator, system: list[int], messages: list[list[list[int]]], reply: int, room: Room,
         keep: bool) -> tuple[list[list[int]], float, int]:
  """Every conversation's turns through `gen`: (their outputs, seconds without compiling, prompt ids run)."""
  histories = [list(system) for _ in messages[0]]
  outputs, seconds, run = [], 0.0, 0
  gen.drop_kept()
  for turn in messages:  # [C] user messages of this turn
    prompts = [h + m for h, m in zip(histories, turn, strict=True)]
    start = time.perf_counter()
    result = gen.generate(prompts, reply, keep=keep, room=room)
    seconds += time.perf_counter() - start - result.compile_seconds
    run += result.prompt_tokens - result.shared_tokens
    outputs += result.output_ids
    histories = [p + out for p, out in zip(prompts, result.output_ids, strict=True)]
  return outputs, seconds, run


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--conversations", type=int, default=8)
  ap.add_argument("--turns", type=int, default=4)
  ap.add_argument("--system", type=int, default=500, help="system prompt tokens, common to every conversation")
  ap.add_argument("--user", type=int, default=60, help="tokens of each user message")
  ap.add_argument("--reply", type=int, default=24, help="new tokens of each reply")
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = ap.parse_args()
  cfg, mesh, model = demo_model(args.dtype)
  rng = np.random.default_rng(0)
  system = rng.integers(0, cfg.vocab_size, args.system).tolist()
  messages = [[rng.integers(0, cfg.vocab_size, args.user).tolist() for _ in range(args.conversations)]
              for _ in range(args.turns)]
  slots = cache_bucket(args.system + args.turns * (args.user + args.reply))
  few = args.conversations // 2
  report, outputs = {}, {}
  for way, share, keep, rows, pool in (("rerun", 0, False, args.conversations, 0),
                                       ("shared", 64, False, args.conversations, 0),
                                       ("kept", 64, True, args.conversations, 0),
                                       ("kept_few_rows", 64, True, few, 0), ("pooled_few_rows", 64, True, few, few)):
    gen = Generator(model, mesh, share_prefix=share, batch_size=rows, prefix_pool=pool)
    room = Room(rows=rows, slots=slots, max_new=args.reply)
    for _ in range(2):  # the first compiles
      outputs[way], seconds, run = chat(gen, system, messages, args.reply, room, keep)
    report[way] = {"seconds": round(seconds, 3), "prompt_tokens_run": run, "rows": rows, "prefix_pool": pool}
  assert all(out == outputs["rerun"] for out in outputs.values()), "the ways gave different outputs"
  print(json.dumps({
    "benchmark": "conversations", "conversations": args.conversations, "turns": args.turns,
    "system_tokens": args.system, "user_tokens": args.user, "reply_tokens": args.reply, "cache_slots": slots,
    "prompt_tokens": sum(args.conversations * (args.system + k * (args.user + args.reply) + args.user)
                         for k in range(args.turns)),
    **report, "kept_speedup_over_rerun": round(report["rerun"]["seconds"] / report["kept"]["seconds"], 2),
    "pooled_speedup_over_kept_few_rows": round(
      report["kept_few_rows"]["seconds"] / report["pooled_few_rows"]["seconds"], 2),
    "same_outputs": True, "dtype": args.dtype, "device": jax.devices()[0].device_kind,
    "machine": platform.machine(), "jax": jax.__version__,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }))


if __name__ == "__main__":
  main()
