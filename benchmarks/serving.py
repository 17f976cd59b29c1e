"""Requests arriving over time (a server's traffic): joining the running batch against waiting for it to end.

N requests arrive at random times (exponential gaps: a Poisson stream at --rate requests/s) with long-tailed
answer lengths, and run through B rows two ways, on the same schedule: `join` (what `infer.py --serve` does: one
generate call takes each request as it arrives, through `arrivals`, into the next free row), and `waves` (each
generate call runs the requests that had arrived when it began, until its longest answer ends; arrivals wait for
the next call). With `--mixed K`, every K-th request also asks for its 5 likeliest ids at each token (OpenAI's
top_logprobs, which eval harnesses send), a sampling step the other requests' programs lack: joining, it widens
the running call's (a request the call did not admit, as before that was possible, would wait for the next call,
the script handles that too). Latency is a request's end minus its arrival (and the first token's, time to first
token). Greedy outputs are checked equal. Runs a demo-sized random model on whatever device jax finds (the figures
are those of the first run after the first that compiles nothing, of at most 8 runs; `compile_s` says what it
compiled) and prints one JSON object.

python benchmarks/serving.py [--requests 48] [--rows 8] [--rate 24] [--mixed 0] [--dtype float32]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import jax
import numpy as np
from continuous_batching import long_tailed  # the same workload

from qwen_moe_jax.demo import demo_model
from qwen_moe_jax.generate import Arrival, Generator, Output, Room
from qwen_moe_jax.sampling import Sampling


class Schedule:
  """The requests, each arriving `at` seconds after `start`; `arrived()` gives those due, once each."""

  def __init__(self, prompts: list[list[int]], limits: list[int], settings: list[Sampling], at: np.ndarray):
    self.prompts, self.limits, self.settings, self.at = prompts, limits, settings, at
    self.start, self.next = time.perf_counter(), 0

  def arrived(self) -> list[int]:
    now = time.perf_counter() - self.start
    due = self.next + int(np.searchsorted(self.at[self.next:], now, side="right"))
    taken, self.next = list(range(self.next, due)), due
    return taken

  def wait(self) -> None:  # until the next request arrives
    time.sleep(max(0.0, self.at[self.next] - (time.perf_counter() - self.start)))


def run(gen: Generator, schedule: Schedule, rows: int, slots: int,
        join: bool) -> tuple[list, list[float], list[float], float]:
  """Every request's output ids, latency and time to its first token, in request order, and the seconds spent
  compiling."""
  n, s = len(schedule.prompts), schedule
  outputs: list = [None] * n
  ended, first, compiling, left = np.zeros(n), np.zeros(n), 0.0, []  # left: requests a call did not admit, first
  # in the next
  while s.next < n or left:
    if not left:
      s.wait()
    order = left + s.arrived()  # the call's prompt i is request order[i]

    def arrivals() -> list[Arrival]:
      new = s.arrived()
      order.extend(new)
      return [Arrival(s.prompts[r], s.limits[r], s.settings[r]) for r in new]

    def on_done(i: int, out: Output) -> None:
      outputs[order[i]], ended[order[i]] = list(out.ids), time.perf_counter() - s.start

    def on_tokens(i: int, _) -> None:
      first[order[i]] = first[order[i]] or time.perf_counter() - s.start

    result = gen.generate([s.prompts[r] for r in order], [s.limits[r] for r in order], [s.settings[r] for r in order],
                          on_tokens=on_tokens, on_done=on_done, arrivals=arrivals if join else None,
                          room=Room(rows, slots, slots))
    left = order[len(order) - len(result.left):]
    compiling += result.compile_seconds
  return outputs, (ended - schedule.at).tolist(), (first - schedule.at).tolist(), compiling


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--requests", type=int, default=48)
  ap.add_argument("--rows", type=int, default=8)
  ap.add_argument("--rate", type=float, default=24.0, help="requests per second, on average")
  ap.add_argument("--prompt-len", type=int, nargs=2, default=[8, 64], help="prompt lengths drawn from [lo, hi]")
  ap.add_argument("--max-new", type=int, default=192, help="the longest answer")
  ap.add_argument("--mixed", type=int, default=0, help="every K-th request asks for top logprobs (0: none)")
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = ap.parse_args()
  cfg, mesh, model = demo_model(args.dtype)
  rng = np.random.default_rng(0)
  prompts, limits = long_tailed(rng, cfg.vocab_size, args.requests, args.prompt_len, args.max_new)
  at = np.cumsum(rng.exponential(1 / args.rate, args.requests))
  settings = [Sampling(top_logprobs=5 if args.mixed and r % args.mixed == args.mixed - 1 else 0)
              for r in range(args.requests)]
  slots = args.prompt_len[1] + args.max_new
  gen = Generator(model, mesh, batch_size=args.rows)
  report = {}
  outputs = {}
  for mode in ("waves", "join"):
    for attempt in range(8):  # the first run compiles; the shapes a call meets vary a little with timing
      start = time.perf_counter()
      outputs[mode], latency, ttft, compiling = run(gen, Schedule(prompts, limits, settings, at), args.rows, slots,
                                                  mode == "join")
      seconds = time.perf_counter() - start
      if attempt and not compiling:
        break
    report[mode] = {"seconds": round(seconds, 3), "compile_s": round(compiling, 3), "runs": attempt + 1,
                    **{name: {"mean": round(float(np.mean(x)), 3), "median": round(float(np.median(x)), 3),
                              "p90": round(float(np.percentile(x, 90)), 3)}
                       for name, x in (("latency_s", latency), ("first_token_s", ttft))}}
  assert outputs["join"] == outputs["waves"], "joining the running batch changed the outputs"
  print(json.dumps({
    "benchmark": "serving", "requests": args.requests, "rows": args.rows, "rate_per_s": args.rate,
    "with_top_logprobs": sum(bool(x.top_logprobs) for x in settings),
    "arrivals_over_s": round(float(at[-1]), 3), "generated_tokens": sum(map(len, outputs["join"])),
    "answer_lengths": {"min": min(limits), "median": int(np.median(limits)), "max": max(limits)},
    **report, "mean_latency_speedup": round(report["waves"]["latency_s"]["mean"] / report["join"]["latency_s"]["mean"],
                                            2),
    "same_outputs": True, "dtype": args.dtype, "device": jax.devices()[0].device_kind,
    "machine": platform.machine(), "jax": jax.__version__,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }))


if __name__ == "__main__":
  main()
