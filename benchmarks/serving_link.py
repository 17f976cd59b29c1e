"""What a multi-process server's sync costs (qwen_moe_jax/serving_link.py): process 0 sends a message at each of its
engine's sync points (every return of the decode loop to the host: every 16 steps at most), and the others wait
for it there.

Starts itself as 2 processes on this machine (jax.distributed over loopback, CPU). Process 0 sends --messages
messages like a busy server's (one new job of a --prompt-tokens prompt in every 4th, the rest empty), then the
follower reads them back: the time per send (process 0, with the block deletions), per receive of a message already
there (what a host return of a follower costs beyond process 0's), per message when the follower reads while
process 0 sends, and how many messages the store still holds at the end (process 0 deletes what was read, a block
of 64 at a time). Prints one JSON object (process 0).

python benchmarks/serving_link.py [--messages 4096] [--prompt-tokens 1000]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time

import jax


def message(k: int, prompt_tokens: int) -> dict:
  job = {"serial": k, "ids": list(range(prompt_tokens)), "max_new_tokens": 1000, "sampling": {"temperature": 0.7},
         "grammar": None, "stream": [0, k], "stops": None, "choice": 0, "score": False}
  return {"jobs": [job] if k % 4 == 0 else [], "gone": [], "stop": False}


def run(args) -> None:
  jax.distributed.initialize(args.coordinator, 2, args.process_id)
  from qwen_moe_jax.serving_link import PREFIX, Link

  link = Link()
  barrier = lambda name: link.client.wait_at_barrier(f"bench/{name}", 600_000)  # noqa: E731
  messages = [message(k, args.prompt_tokens) for k in range(args.messages)]
  timings = {}
  for phase in ("apart", "together"):
    if phase == "apart" and link.leads:  # every message is there before the follower reads
      start = time.perf_counter()
      for m in messages:
        link.send(m)
      timings["send_us"] = (time.perf_counter() - start) / len(messages) * 1e6
    barrier(f"{phase} sent")
    start = time.perf_counter()
    if link.leads and phase == "together":
      for m in messages:
        link.send(m)
    elif not link.leads:
      for m in messages:
        assert link.receive() == m
      link.client.key_value_set(f"bench/{phase}", str((time.perf_counter() - start) / len(messages) * 1e6))
    barrier(f"{phase} read")
    if link.leads:
      timings[{"apart": "receive_us", "together": "together_us"}[phase]] = float(
        link.client.blocking_key_value_get(f"bench/{phase}", 60_000))
  if link.leads:
    size = len(json.dumps(messages[0]))
    timings["messages_kept"] = sum("/read/" not in k for k, _ in link.client.key_value_dir_get(PREFIX + "/"))
    print(json.dumps({"benchmark": "serving_link", "messages": args.messages, "prompt_tokens": args.prompt_tokens,
                      "job_message_bytes": size, **{k: round(v, 1) for k, v in timings.items()},
                      "transport": "jax.distributed key-value store, 2 processes over loopback",
                      "machine": platform.machine(), "cpus": os.cpu_count(), "jax": jax.__version__,
                      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--messages", type=int, default=4096)
  ap.add_argument("--prompt-tokens", type=int, default=1000)
  ap.add_argument("--coordinator")
  ap.add_argument("--process-id", type=int)
  args = ap.parse_args()
  if args.coordinator:
    return run(args)
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, __file__, "--messages", str(args.messages), "--prompt-tokens",
                             str(args.prompt_tokens), "--coordinator", f"localhost:{port}", "--process-id", str(i)],
                            env=env) for i in range(2)]
  codes = [p.wait() for p in procs]
  if codes != [0, 0]:
    sys.exit(f"error: the processes exited with {codes}")


if __name__ == "__main__":
  main()
