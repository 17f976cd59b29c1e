"""The GPU table's script, run end to end on CPU with a tiny config (float32), so the lent GPU's few minutes
go to measuring, not debugging. Timings here mean nothing; the rows, parity and memory figures are checked."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"int8_cache", "int8_experts", "machine", "probe", "hf_train", "parity", "hf_decode", "hf_prefill",
          "hf_throughput", "decode", "throughput", "prefill", "grammar", "profile", "pallas_decode", "train", "fit",
          "lora", "kernels", "qlora", "qlora_big", "done"}


def test_gpu_table_runs_every_stage_on_cpu(tmp_path):
  """Asked for the GPU kernels on CPU, the probe finds both failing and the run goes on with the XLA paths."""
  out = tmp_path / "table.jsonl"
  res = subprocess.run([sys.executable, "benchmarks/gpu_table.py", "--preset", "tiny", "--out", str(out),
                        "--trace", str(tmp_path / "trace"), "--experts", "tokamax", "--attention", "cudnn"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, res.stderr
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert res.stdout.splitlines() == out.read_text().splitlines()
  probes = [r for r in records if r["stage"] == "probe"]
  assert [(r["kernel"], r["ok"]) for r in probes[:3]] == [("tokamax", False), ("cudnn", False),
                                                          ("cudnn unpacked", False)]
  assert probes[3]["using"] == {"experts": "ragged", "attention": "xla", "decode": "xla", "expert_dtype": "auto"}
  assert [(r["kernel"], r["ok"]) for r in probes[4:]] == [("pallas decode", True)]  # interpreted on CPU
  assert [r for r in records if ("error" in r and r["stage"] != "probe") or "skipped" in r] == []
  assert {r["stage"] for r in records} == STAGES
  parity = [r for r in records if r["stage"] == "parity"]
  assert len(parity) == 2  # reference kernels, and transformers on the same weights
  assert all(r["max_abs_diff_over_scale"] < 1e-5 and r["argmax_agreement"] == 1.0 for r in parity)
  rows = {(r["stage"], r.get("batch")): r for r in records}
  assert rows[("decode", 1)]["ms_per_step"] > 0 and rows[("decode", 4)]["ms_per_step"] > 0
  assert rows[("grammar", 1)]["ms_per_step"] > 0 and rows[("grammar", 4)]["ms_per_step"] > 0
  assert rows[("throughput", 8)]["new_tokens"] == 24 and rows[("throughput", 8)]["tokens_per_s"] > 0
  pallas = [r for r in records if r["stage"] == "pallas_decode"]
  assert [r.get("batch") for r in pallas] == [1, 4, 8] and all(r.get("ms_per_step", 1) > 0 for r in pallas)
  int8 = [r for r in records if r["stage"] == "int8_cache"]
  assert [(r.get("batch"), r["kv_cache_dtype"]) for r in int8] == [(1, "int8"), (4, "int8"), (8, "int8")]
  int8_experts = [r for r in records if r["stage"] == "int8_experts"]
  assert [r.get("batch") for r in int8_experts] == [1, 4, 8] and all(r.get("ms_per_step", 1) > 0 for r in int8_experts)
  fit = rows[("fit", 1)]
  assert fit["freeze"] == ["experts"] and fit["held_gb"] > 0 and fit["step_temp_gb"] > 0
  lora = rows[("lora", 1)]
  assert lora["lora"]["rank"] == 16 and 0 < lora["held_gb"] < fit["held_gb"] and lora["tokens_per_s"] > 0
  qlora = rows[("qlora", 1)]
  assert qlora["lora"]["int8_experts"] and 0 < qlora["held_gb"] < lora["held_gb"] and qlora["tokens_per_s"] > 0
  assert rows[("qlora_big", 1)]["held_gb"] > 0  # the tiny plan's "big" model is the tiny one
  assert all(r["top_ops_ms"] for r in records if r["stage"] == "profile")


def test_gpu_table_runs_only_the_stages_asked_for(tmp_path):
  out = tmp_path / "table.jsonl"
  res = subprocess.run([sys.executable, "benchmarks/gpu_table.py", "--preset", "tiny", "--out", str(out),
                        "--only", "parity,hf_inference"], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, res.stderr
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert {r["stage"] for r in records} == {"probe", "parity", "hf_decode", "hf_prefill", "hf_throughput", "done"}
  assert [r["what"] for r in records if r["stage"] == "parity"] == ["our kernels vs reference kernels",
                                                                    "ours vs transformers, same weights"]


def test_probe_accepts_kernels_that_agree(monkeypatch):
  """The probe's own comparison (forward and backward): tokamax and cuDNN imitated by their XLA equivalents pass."""
  monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
  import gpu_table
  import jax

  from qwen_moe_jax import layers
  from qwen_moe_jax.kernels import Kernels
  monkeypatch.setitem(sys.modules, "tokamax", types.SimpleNamespace(ragged_dot=jax.lax.ragged_dot))
  monkeypatch.setattr(layers, "FUSED_IMPLEMENTATION", "xla")
  run = gpu_table.Run(None, 100, None)
  assert gpu_table.probe(run, gpu_table.PLANS["tiny"], Kernels("tokamax", "cudnn")) == Kernels("tokamax", "cudnn")
  monkeypatch.setattr(layers, "attend_fused", lambda q, k, v, mask: layers.attend(q, k, v, mask) * 1.1)  # wrong
  assert gpu_table.probe(run, gpu_table.PLANS["tiny"], Kernels("tokamax", "cudnn")) == Kernels("tokamax", "xla")


def test_capacity_planner_compiles_every_program(tmp_path):
  """benchmarks/capacity.py on a small config: prefill, decode, prefix-copy and train programs compile; the byte
  counts add up."""
  from qwen_moe_jax.demo import demo_config
  config = tmp_path / "config.json"
  config.write_text(json.dumps(demo_config(512).to_hf_dict()))
  res = subprocess.run([sys.executable, "benchmarks/capacity.py", "--config", str(config), "--devices", "2",
                        "--batch", "2", "--context", "64", "--prompt-len", "32", "--train", "--seq-len", "64"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, res.stderr
  report = json.loads(res.stdout.splitlines()[-1])
  assert report["mesh"]["expert"] == 2 and report["kv_cache"]["batch"] == 2
  for program in ("prefill", "decode_step"):
    p = report[program]
    assert p["temp_gb"] > 0
    assert abs(p["peak_estimate_gb"] - (report["param_gb_per_device"] + report["kv_cache"]["gb_per_device"]
                                        + p["temp_gb"])) < 2e-3
  copy = report["prefix_copy"]  # both rows in one call; the copied slots held next to the cache
  assert copy["rows"] == 2 and copy["slots"] == 32 and copy["temp_gb"] > 0
  assert abs(copy["peak_estimate_gb"] - (report["param_gb_per_device"] + report["kv_cache"]["gb_per_device"]
                                         + copy["copy_gb"] + copy["temp_gb"])) < 2e-3
  assert report["train_step"]["temp_gb"] > 0


def test_capacity_planner_lora_step(tmp_path):
  """--lora-rank: the adapters are what is trained (their optimizer state is a sliver of the frozen weights);
  over int8 experts the frozen weights shrink and the adapters do not."""
  from qwen_moe_jax.demo import demo_config
  config = tmp_path / "config.json"
  config.write_text(json.dumps(demo_config(512).to_hf_dict()))
  steps = {}
  for expert_dtype in ("auto", "int8"):
    res = subprocess.run([sys.executable, "benchmarks/capacity.py", "--config", str(config), "--devices", "1",
                          "--batch", "1", "--context", "64", "--prompt-len", "32", "--train", "--seq-len", "64",
                          "--lora-rank", "4", "--expert-dtype", expert_dtype], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    steps[expert_dtype] = step = json.loads(res.stdout.splitlines()[-1])["train_step"]
    assert step["lora_rank"] == 4 and step["temp_gb"] > 0
    assert 0 < step["trainable_gb_per_device"] < step["frozen_gb_per_device"] / 10
    assert step["optimizer_state_gb_per_device"] < 2.1 * step["trainable_gb_per_device"]
  assert steps["int8"]["trainable_gb_per_device"] == steps["auto"]["trainable_gb_per_device"]
  assert steps["int8"]["frozen_gb_per_device"] < 0.8 * steps["auto"]["frozen_gb_per_device"]


def test_attention_memory_benchmark_shows_blocks_smaller():
  """benchmarks/attention_memory.py: at 2048 tokens the query blocks need less than the one-block program."""
  res = subprocess.run([sys.executable, "benchmarks/attention_memory.py", "--seq", "2048"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr
  report = json.loads(res.stdout.splitlines()[-1])
  assert report["query_block"] == 512
  for program in ("prefill_temp_gb", "train_temp_gb"):
    assert 0 < report["query_blocks"][program] < report["one_block"][program] / 2


def test_continuous_batching_benchmark_runs():
  """benchmarks/continuous_batching.py, small: both ways give the same outputs (the script asserts it)."""
  res = subprocess.run([sys.executable, "benchmarks/continuous_batching.py", "--prompts", "6", "--rows", "2",
                        "--max-new", "24"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr
  report = json.loads(res.stdout.splitlines()[-1])
  assert report["same_outputs"] and report["generated_tokens"] >= 6 * 4
  assert report["waves_s"] > 0 and report["continuous_s"] > 0


def test_serving_benchmark_runs():
  """benchmarks/serving.py, small: requests arriving over time (every third asking for top logprobs) give the same
  outputs joining the running batch as in waves (the script asserts it), every request timed."""
  res = subprocess.run([sys.executable, "benchmarks/serving.py", "--requests", "6", "--rows", "2", "--rate", "50",
                        "--max-new", "24", "--mixed", "3"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr
  report = json.loads(res.stdout.splitlines()[-1])
  assert report["same_outputs"] and report["generated_tokens"] >= 6 * 4 and report["with_top_logprobs"] == 2
  assert all(report[m]["latency_s"]["mean"] > 0 for m in ("waves", "join"))


def test_serving_link_benchmark_runs():
  """benchmarks/serving_link.py, small: 2 processes; the follower reads back every message sent (the script
  asserts it; more than a block's, so process 0 deletes what was read)."""
  res = subprocess.run([sys.executable, "benchmarks/serving_link.py", "--messages", "200", "--prompt-tokens", "10"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  report = json.loads(res.stdout.splitlines()[-1])
  assert report["messages"] == 200 and min(report[k] for k in ("send_us", "receive_us", "together_us")) > 0


def test_conversations_benchmark_runs():
  """benchmarks/conversations.py, small: the ways give the same outputs (the script asserts it) and run the
  prompt tokens they should: every one; all but the system prompt of every conversation but the first; and with
  kept rows, after the first turn, each conversation's new message and the reply's last token (never fed); with
  half the rows, as many with a prefix pool of the other half, more without."""
  c, t, system, user, reply = 2, 3, 80, 20, 6
  res = subprocess.run([sys.executable, "benchmarks/conversations.py", "--conversations", str(c), "--turns", str(t),
                        "--system", str(system), "--user", str(user), "--reply", str(reply)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr
  report = json.loads(res.stdout.splitlines()[-1])
  total = sum(c * (system + k * (user + reply) + user) for k in range(t))
  assert report["same_outputs"] and report["prompt_tokens"] == total == report["rerun"]["prompt_tokens_run"]
  assert report["shared"]["prompt_tokens_run"] == total - t * (c - 1) * system
  assert report["kept"]["prompt_tokens_run"] == c * (system + user) - (c - 1) * system + (t - 1) * c * (user + 1)
  # one row for the two conversations: with a pool of one, a turn's row and the pool's entry trade places
  assert report["pooled_few_rows"]["prompt_tokens_run"] == report["kept"]["prompt_tokens_run"]
  assert report["kept_few_rows"]["prompt_tokens_run"] > report["kept"]["prompt_tokens_run"] + (t - 1) * user


def test_structured_output_benchmark_runs():
  """benchmarks/structured_output.py, small: each grammar's build over Qwen2's vocabulary is reported with its size
  and the time to read it back from the store, and the constrained rows ran every step (the script asserts both
  decodes generated all their tokens)."""
  res = subprocess.run([sys.executable, "benchmarks/structured_output.py", "--rows", "2", "--new", "8"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr
  report = json.loads(res.stdout.splitlines()[-1])
  built = report["build_qwen2_vocabulary"]
  assert [b["what"] for b in built][1:] == ["regex (ISO date)", "JSON schema (5 fields, nested)", "JSON object (any)"]
  assert all(b["states"] > 1 and b["classes"] > 2 and b["device_cells"] >= b["states"] for b in built[1:])
  assert all(0 < b["stored_seconds"] < b["seconds"] and b["stored_kb"] > 0 for b in built[1:])  # read back, not built
  decode = report["decode_demo_model"]
  assert decode["free"]["decode_tokens_per_s"] > 0 and decode["grammar"]["decode_tokens_per_s"] > 0


def test_data_prep_benchmark_runs():
  res = subprocess.run([sys.executable, "benchmarks/data_prep.py", "--lines", "40", "--seq-len", "512"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr
  rows = [json.loads(line) for line in res.stdout.splitlines()]
  assert [r["kind"] for r in rows] == ["chat", "text"]
  assert all(r["documents"] == 40 and r["tokens"] > 40 * 100 and r["cached_seconds"] >= 0 for r in rows)


def test_prompt_sharing_benchmark_runs():
  """benchmarks/prompt_sharing.py, small: identical copies and a common prefix share prompt tokens, distinct
  prompts none."""
  res = subprocess.run([sys.executable, "benchmarks/prompt_sharing.py", "--prompts", "2", "--samples", "3",
                        "--prompt-len", "80", "--tail", "10", "--new-tokens", "4", "--rows", "2"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr
  runs = json.loads(res.stdout.splitlines()[-1])["runs"]
  assert runs["identical_all_rows"]["shared_tokens"] == 2 * 2 * 80  # 2 of each prompt's 3 copies
  # rows [p0, p0] (run once); the third p0 takes a row holding p0 and its answer (all but its last id), and p1 is
  # prefilled (a fill draws its first token a step before a copy: it ends first); the second p1 takes p1's row,
  # and the third copies it from that running row
  assert runs["identical_2_rows"]["shared_tokens"] == 80 + 3 * 79
  assert runs["identical_2_rows_varied_lengths"]["shared_tokens"] >= 2 * 80  # copied from running samples too
  for label in ("all_rows", "2_rows", "2_rows_varied_lengths"):
    assert runs[f"prefix_{label}"]["shared_tokens"] == 5 * 70  # the 6 prompts' first 70 tokens run once
    assert runs[f"distinct_{label}"]["shared_tokens"] == 0
  assert all(runs[f"scoring_{name}"]["seconds"] > 0 for name in ("prefix", "prefix_unshared", "distinct"))
