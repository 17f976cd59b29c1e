"""train.py: learning, exact resume (also after SIGKILL), frozen groups, export, gradient equivalences."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from transformers import Qwen2MoeForCausalLM

from hf_models import make_model, peft_adapter, save
from qwen_moe_jax import checkpoint, convert, data, grpo, sharding, training
from qwen_moe_jax import lora as lora_lib
from qwen_moe_jax.demo import build_tokenizer
from qwen_moe_jax.errors import UserError
from qwen_moe_jax.generate import Generator
from qwen_moe_jax.kernels import Kernels
from qwen_moe_jax.model import abstract_model
from qwen_moe_jax.peft_export import export_peft
from qwen_moe_jax.run_dir import RunDir
from qwen_moe_jax.scoring import prompt_logits
from qwen_moe_jax.tokenizer import CHATML_TEMPLATE, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--steps", "16", "--batch-size", "4", "--seq-len", "128", "--lr", "1e-2", "--save-every", "4",
         "--warmup-steps", "2", "--dtype", "float32"]


def train(*args: str, wait: bool = True):
  cmd = [sys.executable, "train.py", *args]
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def metrics(run: Path) -> list[dict]:
  return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A converted tiny model with a byte-level BPE tokenizer and a ChatML template, and learnable data."""
  tmp = tmp_path_factory.mktemp("train")
  tok = build_tokenizer(vocab_size=300)
  hf_model = make_model(seed=4, vocab_size=320, std=0.05)
  save(hf_model, tmp / "hf")
  tok.save(str(tmp / "hf" / "tokenizer.json"))
  (tmp / "hf" / "tokenizer_config.json").write_text(json.dumps(
    {"chat_template": CHATML_TEMPLATE, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
  convert.import_hf(tmp / "hf", tmp / "ckpt", progress=False)
  lines = []
  for i in range(40):
    a, b = i % 7, (i * 3) % 5
    lines.append({"messages": [{"role": "user", "content": f"add {a} and {b}"},
                               {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    lines.append({"text": "the quick brown fox jumps over the lazy dog. " * 2})
  (tmp / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  return tmp


@pytest.fixture(scope="module")
def straight(base):
  """One uninterrupted run, shared by the tests below."""
  run = base / "straight"
  res = train("--checkpoint", str(base / "ckpt"), "--data", str(base / "data.jsonl"), "--out", str(run), *TRAIN)
  assert res.returncode == 0, res.stderr
  return run


def test_fine_tuning_lowers_loss_and_exports(base, straight, tmp_path):
  run = straight
  m = metrics(run)
  assert [r["step"] for r in m] == list(range(1, 17))
  for key in ("loss", "aux_loss", "lr", "tokens_per_s", "grad_norm"):
    assert all(np.isfinite(r[key]) for r in m), key
  first, last = np.mean([r["ce"] for r in m[:3]]), np.mean([r["ce"] for r in m[-3:]])
  print(f"cross-entropy {first:.3f} -> {last:.3f}")
  assert last < 0.6 * first
  assert "expert_load" in m[9] and np.allclose(np.sum(m[9]["expert_load"], axis=-1), 1.0, atol=1e-3)
  assert (run / "loss.png").stat().st_size > 1000

  # the fine-tuned run folder exports to HF; transformers' logits equal ours
  exported = tmp_path / "hf"
  convert.export_hf(run, exported, progress=False)
  hf_model = Qwen2MoeForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
  model = checkpoint.restore(run, dtype=jnp.float32)
  ids = [3, 14, 15, 92, 65, 35, 89, 79]
  with torch.no_grad():
    ref = hf_model(torch.tensor([ids])).logits[0].numpy()
  np.testing.assert_allclose(prompt_logits(model, ids), ref, atol=2e-5 * np.abs(ref).max())
  before = checkpoint.restore(base / "ckpt", dtype=jnp.float32)
  assert not np.allclose(np.asarray(before.embed[...]), np.asarray(model.embed[...]))


def test_resume_after_sigkill_matches_uninterrupted(base, straight, tmp_path):
  args = ["--checkpoint", str(base / "ckpt"), "--data", str(base / "data.jsonl"), *TRAIN]
  killed = tmp_path / "killed"
  proc = train(*args, "--out", str(killed), wait=False)
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if (killed / "metrics.jsonl").exists() and len(metrics(killed)) >= 7 and (killed / "checkpoints" / "4").is_dir():
      break  # a step-4 checkpoint finished (saves are asynchronous: a loaded machine may lag behind the steps)
    time.sleep(0.05)
  assert proc.poll() is None, proc.stderr.read()
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert len(metrics(killed)) < 16
  res = train(*args, "--out", str(killed))
  assert res.returncode == 0, res.stderr
  assert "resuming" in res.stderr and f"tokens read from {killed / 'tokens'}" in res.stderr  # not tokenized again
  a, b = metrics(straight), metrics(killed)
  assert [r["step"] for r in b] == list(range(1, 17))
  for x, y in zip(a, b, strict=True):
    assert (x["loss"], x["grad_norm"], x["lr"]) == (y["loss"], y["grad_norm"], y["lr"]), x["step"]

  # the same flags are required to resume
  res = train(*args[:-len(TRAIN)], *TRAIN[:-2], "--dtype", "bfloat16", "--out", str(killed))
  assert res.returncode == 2 and "different settings" in res.stderr


def test_sigterm_saves_the_step_and_resumes(base, straight, tmp_path):
  """SIGTERM (a scheduler's notice) mid-run: the step under way ends, is saved (not a multiple of --save-every),
  and train.py exits 143; the same command resumes from it to the uninterrupted run's losses."""
  args = ["--checkpoint", str(base / "ckpt"), "--data", str(base / "data.jsonl"), *TRAIN]
  stopped = tmp_path / "stopped"
  proc = train(*args, "--out", str(stopped), wait=False)
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None and not (
      (stopped / "metrics.jsonl").exists() and len(metrics(stopped)) >= 2):
    time.sleep(0.05)
  assert proc.poll() is None, proc.stderr.read()
  proc.terminate()
  assert proc.wait(timeout=300) == 143
  step = len(metrics(stopped))
  assert 2 <= step < 16 and (stopped / "checkpoints" / str(step)).is_dir()
  assert f"stopped by SIGTERM: step {step} saved" in proc.stderr.read()
  res = train(*args, "--out", str(stopped))
  assert res.returncode == 0 and f"from step {step}" in res.stderr, res.stderr
  for x, y in zip(metrics(straight), metrics(stopped), strict=True):
    assert (x["step"], x["loss"], x["grad_norm"]) == (y["step"], y["loss"], y["grad_norm"])


def test_held_out_loss_is_the_cross_entropy_of_the_trained_model(base, tmp_path):
  """--eval-data: eval_loss at every --eval-every steps and at the end, equal to the mean cross-entropy of the
  held-out loss tokens under the saved model, computed here token by token; a missing file is one error line."""
  held_out = tmp_path / "held_out.jsonl"
  lines = [{"messages": [{"role": "user", "content": f"add {a} and {b}"},
                         {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]} for a, b in ((8, 9), (6, 6))]
  lines += [{"text": "a lazy dog sleeps. " * (i + 1)} for i in range(5)]  # 7 documents: two batches of 4 rows
  held_out.write_text("".join(json.dumps(x) + "\n" for x in lines))
  run = tmp_path / "run"
  args = ["--checkpoint", str(base / "ckpt"), "--data", str(base / "data.jsonl"), *TRAIN[2:], "--steps", "6",
          "--eval-every", "4", "--no-pack"]
  res = train(*args, "--out", str(run), "--eval-data", str(held_out))
  assert res.returncode == 0, res.stderr
  m = metrics(run)
  assert [r["step"] for r in m if "eval_loss" in r] == [4, 6]

  tok = load_tokenizer(run)
  docs = data.read_jsonl(held_out, tok, 128, tok.token_to_id("<|endoftext|>"))
  model = checkpoint.restore(run, dtype=jnp.float32)
  nll, count = 0.0, 0
  for d in docs:
    logp = jax.nn.log_softmax(prompt_logits(model, list(d.tokens)), axis=-1)
    for t in range(len(d.tokens) - 1):
      if d.loss_mask[t + 1]:
        nll, count = nll - float(logp[t, d.tokens[t + 1]]), count + 1
  assert m[-1]["eval_tokens"] == count
  np.testing.assert_allclose(m[-1]["eval_loss"], nll / count, rtol=1e-5)
  assert m[-1]["eval_loss"] < m[3]["eval_loss"]  # still learning the arithmetic

  res = train(*args, "--out", str(tmp_path / "other"), "--eval-data", str(tmp_path / "missing.jsonl"))
  assert res.returncode == 2 and "missing.jsonl" in res.stderr and "Traceback" not in res.stderr


def test_train_only_keeps_frozen_groups_fixed(base, tmp_path):
  run = tmp_path / "run"
  res = train("--checkpoint", str(base / "ckpt"), "--data", str(base / "data.jsonl"), "--out", str(run),
              *TRAIN[:1], "4", *TRAIN[2:], "--train-only", "attention,router,shared_expert")
  assert res.returncode == 0, res.stderr
  before = checkpoint.flatten(nnx.state(checkpoint.restore(base / "ckpt", dtype=jnp.float32)))
  after = checkpoint.flatten(nnx.state(checkpoint.restore(run, dtype=jnp.float32)))
  changed = {training.param_group(k) for k in before if not np.array_equal(before[k], after[k])}
  assert changed == {"attention", "router", "shared_expert"}


@pytest.mark.parametrize("line,message", [
  ("{not json", ":3: "),
  ('{"messages": []}', ":3: "),
  ('{"messages": [{"role": "user", "content": "hi"}]}', "assistant"),
  ('{"wrong": 1}', ":3: "),
  ('{"input_ids": [1, 2, "x"]}', ":3: "),
  (json.dumps({"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}),
   "conversations are not cut"),
])
def test_bad_data_lines(base, tmp_path, line, message):
  data = tmp_path / "bad.jsonl"
  data.write_text('{"text": "fine"}\n\n' + line + "\n")
  res = train("--checkpoint", str(base / "ckpt"), "--data", str(data), "--out", str(tmp_path / "run"), *TRAIN)
  assert res.returncode == 2, res.stderr
  assert message in res.stderr and "bad.jsonl" in res.stderr and "Traceback" not in res.stderr


def test_a_run_that_saved_no_checkpoint_starts_over(base, straight, tmp_path):
  """A run that stopped before its first save (here a LoRA run on a bad data line) reruns in place with other
  flags: its folder starts over and the run equals one in a new folder; a folder holding other files is refused."""
  run, bad = tmp_path / "run", tmp_path / "bad.jsonl"
  bad.write_text('{"wrong": 1}\n')
  args = ["--checkpoint", str(base / "ckpt"), "--out", str(run), *TRAIN]
  res = train(*args, "--data", str(bad), "--lora-rank", "4")
  assert res.returncode == 2 and (run / "lora.json").is_file() and not (run / "checkpoints" / "4").exists()
  res = train(*args, "--data", str(base / "data.jsonl"))
  assert res.returncode == 0, res.stderr
  assert "saved no checkpoint; starting it over" in res.stderr and not (run / "lora.json").exists()
  assert [(r["loss"], r["grad_norm"]) for r in metrics(run)] == [(r["loss"], r["grad_norm"]) for r in metrics(straight)]

  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep")
  res = train(*args[:-len(TRAIN) - 2], "--out", str(tmp_path / "mine"), *TRAIN, "--data", str(base / "data.jsonl"))
  assert res.returncode == 2 and "notes.txt); choose a new --out" in res.stderr and "Traceback" not in res.stderr
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


DPO = ["--dpo-beta", "0.5", "--lr", "2e-3", "--seq-len", "256"]


def test_paths_relative_to_the_working_directory(base, tmp_path):
  """--checkpoint, --data and --out relative to the working directory (Orbax takes absolute paths only): a run, its
  resume, and infer.py over the run folder."""
  shutil.copytree(base / "ckpt", tmp_path / "ckpt")
  shutil.copy(base / "data.jsonl", tmp_path / "data.jsonl")
  args = [sys.executable, str(ROOT / "train.py"), "--checkpoint", "ckpt", "--data", "data.jsonl", "--out", "run",
          *TRAIN, "--steps", "2", "--save-every", "1"]
  for _ in range(2):  # the second time, resumed from step 1
    res = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "2")
  assert "resuming" in res.stderr and len(metrics(tmp_path / "run")) == 2
  res = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--checkpoint", "run", "--prompt", "add",
                        "--max-new-tokens", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0 and "generated tokens: " in res.stderr, res.stderr


def preference_lines() -> list[dict]:
  """Pairs whose chosen answer adds, and whose rejected one refuses; a raw-text pair and TRL's one-message answers
  among them."""
  lines = [{"prompt": [{"role": "user", "content": f"add {i % 7} and {i % 5}"}], "chosen": f"It is {i % 7 + i % 5}.",
            "rejected": [{"role": "assistant", "content": "I will not add numbers."}]} for i in range(30)]
  return lines + [{"prompt": "The sky is", "chosen": " blue.", "rejected": " a carpet."}]


@pytest.fixture(scope="module")
def dpo_run(base):
  (base / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in preference_lines()))
  (base / "held_pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in preference_lines()[::5]))
  run = base / "dpo"
  res = train("--checkpoint", str(base / "ckpt"), "--data", str(base / "pairs.jsonl"), "--out", str(run), *TRAIN,
              *DPO, "--eval-data", str(base / "held_pairs.jsonl"), "--eval-every", "8")
  assert res.returncode == 0, res.stderr
  assert res.stderr.count("computing the reference log-probabilities") == 2  # the data's and the held-out's
  return run


def test_dpo_learns_the_preferences(base, dpo_run):
  """--dpo-beta: the first step's policy is the reference (loss log 2, rewards 0); the loss falls and the chosen
  answers' reward rises above the rejected ones' (held out too); SFT lines are refused."""
  m = metrics(dpo_run)
  assert [r["step"] for r in m] == list(range(1, 17))
  assert m[0]["dpo_loss"] == pytest.approx(np.log(2), abs=1e-4) and abs(m[0]["reward_margin"]) < 1e-3
  last = m[-3:]
  print(f"DPO loss {m[0]['dpo_loss']:.3f} -> {np.mean([r['dpo_loss'] for r in last]):.3f}, reward accuracy "
        f"{np.mean([r['reward_accuracy'] for r in last]):.2f}")
  assert np.mean([r["dpo_loss"] for r in last]) < 0.3 and min(r["reward_accuracy"] for r in last) == 1.0
  assert all(r["chosen_reward"] > r["rejected_reward"] for r in last)
  assert [r["step"] for r in m if "eval_loss" in r] == [8, 16] and m[-1]["eval_pairs"] == 7
  assert m[-1]["eval_loss"] < 0.5 * np.log(2)
  res = train("--checkpoint", str(base / "ckpt"), "--data", str(base / "data.jsonl"), "--out",
              str(base / "dpo-bad"), *TRAIN, *DPO)
  assert res.returncode == 2 and "data.jsonl:1: expected a preference pair" in res.stderr


@pytest.mark.parametrize("kind,first", [("sigmoid", np.log(2)), ("ipo", 1.0)])
def test_dpo_with_lora_takes_the_base_as_reference(base, dpo_run, tmp_path, kind, first):
  """DPO over LoRA adapters: the reference is the base (the adapters start at zero), so the first step's margin
  is 0 (the loss log 2; IPO's (1 / (2 beta))^2 = 1 at beta 0.5), and the loss falls as the adapters train."""
  run = tmp_path / "lora-dpo"
  res = train("--checkpoint", str(base / "ckpt"), "--data", str(base / "pairs.jsonl"), "--out", str(run), *TRAIN,
              *DPO, "--steps", "6", "--lr", "1e-2", *LORA, "--dpo-loss", kind)
  assert res.returncode == 0, res.stderr
  m = metrics(run)
  assert m[0]["dpo_loss"] == pytest.approx(first, abs=1e-4) and m[-1]["dpo_loss"] < 0.9 * first
  assert (run / checkpoint.LORA_FILE).is_file()


@pytest.mark.parametrize("kind,beta", [("simpo", "2.0"), ("orpo", "0.5")])
def test_reference_free_preferences_learn(base, dpo_run, tmp_path, kind, beta):
  """--dpo-loss simpo / orpo: no reference pass (nothing computed, nothing kept); the loss falls (held out too) and
  the margin between the chosen answers' reward and the rejected ones' grows; ORPO logs its NLL (below its loss,
  falling) and log odds ratio (rising)."""
  run = tmp_path / kind
  res = train("--checkpoint", str(base / "ckpt"), "--data", str(base / "pairs.jsonl"), "--out", str(run), *TRAIN,
              *DPO, "--dpo-beta", beta, "--dpo-loss", kind, "--eval-data", str(base / "held_pairs.jsonl"))
  assert res.returncode == 0, res.stderr
  assert "computing the reference" not in res.stderr and not list((run / "tokens").glob("*.reference.npz"))
  m, key = metrics(run), f"{kind}_loss"
  last, falls = m[-3:], {"simpo": 0.2, "orpo": 0.8}[kind]  # ORPO's loss is mostly the chosen answers' NLL
  print(f"{kind} loss {m[0][key]:.3f} -> {np.mean([r[key] for r in last]):.3f}, reward margin "
        f"{m[0]['reward_margin']:.3f} -> {np.mean([r['reward_margin'] for r in last]):.3f}")
  assert np.mean([r[key] for r in last]) < falls * m[0][key] and m[-1]["eval_loss"] < falls * m[0][key]
  assert min(r["reward_margin"] for r in last) > m[0]["reward_margin"] + 0.1
  assert min(r["reward_accuracy"] for r in last) == 1.0 and m[-1]["eval_pairs"] == 7
  if kind == "orpo":
    assert all(r["nll_loss"] < r[key] for r in m) and last[-1]["nll_loss"] < 0.8 * m[0]["nll_loss"]
    assert last[-1]["log_odds_ratio"] > m[0]["log_odds_ratio"] + 0.5
  assert (run / "loss.png").is_file()


def test_kto_learns_and_resumes(base, dpo_run, tmp_path):
  """--dpo-loss kto on unpaired lines (each pair's answers as a desirable and an undesirable completion): the
  reference pass covers the completions and the mismatched ones; each loss starts at 0.5 (the model is its
  reference: z = KL = 0; x 1.2 for undesirable ones) and falls (held out too), the units ranked right climb to
  all, the KL estimate is logged; a resumed run reads the labels and reference back and gives the uninterrupted
  losses."""
  def kto_lines(pairs):
    return "".join(json.dumps({"prompt": x["prompt"], "completion": x[k], "label": k == "chosen"}) + "\n"
                   for x in pairs for k in ("chosen", "rejected"))

  (tmp_path / "kto.jsonl").write_text(kto_lines(preference_lines()))
  (tmp_path / "held.jsonl").write_text(kto_lines(preference_lines()[::5]))
  run = tmp_path / "kto"
  args = ["--checkpoint", str(base / "ckpt"), "--data", str(tmp_path / "kto.jsonl"), *TRAIN, *DPO,
          "--dpo-loss", "kto", "--kto-undesirable-weight", "1.2", "--eval-data", str(tmp_path / "held.jsonl")]
  res = train(*args, "--out", str(run))
  assert res.returncode == 0, res.stderr
  assert res.stderr.count("computing the reference log-probabilities") == 2
  m = metrics(run)
  print("KTO loss by step:", " ".join(f"{r['kto_loss']:.3f}" for r in m))
  assert 0.5 <= m[0]["kto_loss"] <= 0.6 and m[0]["kl"] < 1e-5  # 0.5 each, 0.6 weighted undesirable ones
  last = m[-3:]
  assert np.mean([r["kto_loss"] for r in last]) < 0.5 * m[0]["kto_loss"] and m[-1]["eval_loss"] < 0.5 * m[0]["kto_loss"]
  assert min(r["reward_accuracy"] for r in last) == 1.0 and m[-1]["eval_pairs"] == 14
  assert all(r["kl"] >= 0 for r in m) and (run / "loss.png").is_file()

  resumed = tmp_path / "resumed"
  shutil.copytree(run, resumed)
  for step in (12, 16):
    shutil.rmtree(resumed / "checkpoints" / str(step))
  res = train(*args, "--out", str(resumed))
  assert res.returncode == 0 and "resuming" in res.stderr and "computing the reference" not in res.stderr, res.stderr
  for x, y in zip(m, metrics(resumed), strict=True):
    assert (x["loss"], x["grad_norm"], x["kl"]) == (y["loss"], y["grad_norm"], y["kl"])


def test_dpo_resumes_with_its_reference(base, dpo_run, tmp_path):
  """A DPO run resumed from a checkpoint reads its reference log-probabilities back (the starting model is gone
  from the run by then) and gives the uninterrupted losses; without them it cannot resume."""
  args = ["--checkpoint", str(base / "ckpt"), "--data", str(base / "pairs.jsonl"), *TRAIN, *DPO,
          "--eval-data", str(base / "held_pairs.jsonl"), "--eval-every", "8"]
  for gone in ("", "reference"):
    run = tmp_path / f"run{gone}"
    shutil.copytree(dpo_run, run)
    for step in (12, 16):  # back to step 8
      shutil.rmtree(run / "checkpoints" / str(step))
    for file in (run / "tokens").glob(f"*{gone}.npz" if gone else "none"):
      file.unlink()
    res = train(*args, "--out", str(run))
    if gone:
      assert res.returncode == 2 and "DPO's reference log-probabilities" in res.stderr and "start a new run" in \
          res.stderr, res.stderr
      continue
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stderr and "computing the reference" not in res.stderr
    for x, y in zip(metrics(dpo_run), metrics(run), strict=True):
      assert (x["loss"], x["grad_norm"], x.get("eval_loss")) == (y["loss"], y["grad_norm"], y.get("eval_loss"))


GRPO = ["--steps", "24", "--batch-size", "16", "--seq-len", "128", "--lr", "2e-2", "--warmup-steps", "2",
        "--dtype", "float32", "--save-every", "8", "--grpo-group", "8", "--grpo-max-new", "16"]
REWARDS = """
def low_ids(prompts, completions, completion_ids, answer, **kwargs):  # learnable by a tiny model in a few steps
  assert len(prompts) == len(completions) == len(completion_ids) == len(answer)
  return [sum(i < 150 for i in ids) / len(ids) for ids in completion_ids]


def mentions(completions, answer, **kwargs):  # a chat prompt's completion is one assistant message, as in TRL
  texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
  return [float(str(a) in t) for a, t in zip(answer, texts)]


def miscounted(completions, **kwargs):
  return [1.0]
"""
GRPO_RUN = [*GRPO, "--grpo-reward", "{base}/rewards.py:low_ids", "--grpo-reward", "{base}/rewards.py:mentions",
            "--eval-data", "{base}/held_prompts.jsonl"]


@pytest.fixture(scope="module")
def grpo_run(base):
  """GRPO on prompt lines (chat and text) with two reward functions, one reading a column of the data."""
  lines = [{"prompt": [{"role": "user", "content": f"add {i % 7} and {i % 5}"}], "answer": i % 7 + i % 5}
           for i in range(12)]
  (base / "prompts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines + [{"prompt": "The sky is",
                                                                                        "answer": 0}]))
  (base / "held_prompts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[::4]))
  (base / "rewards.py").write_text(REWARDS)
  run = base / "grpo"
  res = train("--checkpoint", str(base / "ckpt"), "--data", str(base / "prompts.jsonl"), "--out", str(run),
              *(f.format(base=base) for f in GRPO_RUN))
  assert res.returncode == 0, res.stderr
  return run


def test_grpo_learns_from_its_rewards(grpo_run):
  """--grpo-reward: each step samples 8 completions of 2 prompts with the model as it is, and the mean reward
  climbs (the low ids' share, from about half); the reward is the functions' sum, each logged; completions stop at
  --grpo-max-new; the held-out prompts' greedy completions are scored every --eval-every steps."""
  m = metrics(grpo_run)
  rewards = [r["reward"] for r in m]
  print("GRPO mean reward by step:", " ".join(f"{x:.2f}" for x in rewards))
  print("GRPO mean entropy by step:", " ".join(f"{r['entropy']:.2f}" for r in m))
  assert np.mean(rewards[:4]) < 0.7 and np.mean(rewards[-4:]) > 0.9
  for r in m:
    assert r["reward"] == pytest.approx(r["reward_low_ids"] + r["reward_mentions"])
    assert 1 <= r["completion_tokens"] <= 16 and 0 <= r["clipped_ratio"] <= 1 and r["reward_std"] >= 0
    assert "grpo_loss" in r and np.isfinite(r["grad_norm"]) and 0 < r["entropy"] < np.log(320)  # nats, vocab 320
  evals = [(r["step"], r["eval_reward"]) for r in m if "eval_reward" in r]
  print("GRPO held-out reward:", evals)
  assert [s for s, _ in evals] == [8, 16, 24] and all(r["eval_prompts"] == 3 for r in m if "eval_reward" in r)
  assert evals[-1][1] > 0.9 and all("eval_reward_low_ids" in r for r in m if "eval_reward" in r)
  assert (grpo_run / "loss.png").is_file()


def test_grpo_resumes_exactly(base, grpo_run, tmp_path):
  """A GRPO run resumed from a checkpoint samples the completions an uninterrupted run samples (each from its own
  stream of the seed and the step), so its losses and rewards are the same; with LoRA on a mesh its first step
  (adapters at zero: the same model) samples the same completions as on one device, and --grpo-beta's KL from the
  base starts at 0 and grows."""
  run = tmp_path / "resumed"
  shutil.copytree(grpo_run, run)
  for step in (16, 24):
    shutil.rmtree(run / "checkpoints" / str(step))
  args = ["--checkpoint", str(base / "ckpt"), "--data", str(base / "prompts.jsonl"),
          *(f.format(base=base) for f in GRPO_RUN)]
  res = train(*args, "--out", str(run))
  assert res.returncode == 0 and "resuming" in res.stderr, res.stderr
  for x, y in zip(metrics(grpo_run), metrics(run), strict=True):
    assert (x["loss"], x["grad_norm"], x["reward"], x.get("eval_reward")) == (y["loss"], y["grad_norm"], y["reward"],
                                                                              y.get("eval_reward"))
  res = train(*args, "--out", str(tmp_path / "lora"), "--steps", "3", *LORA, "--mesh", "data=2,expert=4",
              "--grpo-beta", "0.04", "--grpo-scale-rewards", "none", "--grpo-mask-truncated")
  assert res.returncode == 0, res.stderr
  m = metrics(tmp_path / "lora")
  assert (m[0]["reward"], m[0]["completion_tokens"]) == (metrics(grpo_run)[0]["reward"],
                                                         metrics(grpo_run)[0]["completion_tokens"])
  assert m[0]["kl"] == 0 and m[-1]["kl"] > 0  # the KL penalty's reference is the base: the adapters at zero


def test_grpo_kl_in_a_full_fine_tune_reads_the_starting_weights(base, straight, grpo_run, tmp_path):
  """--grpo-beta without LoRA (on a mesh splitting rows and experts): the KL penalty's reference is a copy of the
  starting weights (here an SFT run folder's step 12), so the KL starts at 0 and grows; a resume reads them again
  (not the resumed weights): the uninterrupted losses and KLs. A resume whose starting weights changed (the SFT run
  saved step 16) or are gone is one line, before anything is written."""
  sft = tmp_path / "sft"
  shutil.copytree(straight, sft)
  shutil.rmtree(sft / "checkpoints" / "16")
  run = tmp_path / "kl"
  args = ["--checkpoint", str(sft), "--data", str(base / "prompts.jsonl"), *GRPO, "--grpo-reward",
          f"{base}/rewards.py:low_ids", "--steps", "8", "--save-every", "4", "--grpo-beta", "0.04",
          "--mesh", "data=2,expert=4"]
  res = train(*args, "--out", str(run))
  assert res.returncode == 0, res.stderr
  m = metrics(run)
  print("full fine-tune GRPO KL by step:", " ".join(f"{r['kl']:.2e}" for r in m))
  assert m[0]["kl"] < 1e-6 and m[-1]["kl"] > 1e-3
  assert json.loads((run / "reference.json").read_text())["reads"][0] == str((sft / "checkpoints" / "12").resolve())

  def resumed(name: str):
    folder = tmp_path / name
    shutil.copytree(run, folder)
    shutil.rmtree(folder / "checkpoints" / "8")
    return folder, train(*args, "--out", str(folder))

  folder, res = resumed("resumed")
  assert res.returncode == 0 and "resuming" in res.stderr, res.stderr
  for x, y in zip(m, metrics(folder), strict=True):
    assert (x["loss"], x["grad_norm"], x["reward"], x["kl"]) == (y["loss"], y["grad_norm"], y["reward"], y["kl"])

  shutil.copytree(straight / "checkpoints" / "16", sft / "checkpoints" / "16")  # the SFT run went on
  folder, res = resumed("moved_on")
  assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
  assert res.stderr.strip().splitlines()[-1].endswith(
    f"reference.json: the KL penalty's reference {sft.resolve()} now reads {(sft / 'checkpoints' / '16').resolve()}, "
    f"not {(sft / 'checkpoints' / '12').resolve()} as when this run started; put those weights back, or start over "
    f"in a new --out")
  assert metrics(folder) == m  # nothing written
  shutil.rmtree(sft)
  res = resumed("gone")[1]
  assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].endswith(
    f"reference.json: the KL penalty's reference, the run's starting weights: {sft.resolve()}: checkpoint folder not "
    f"found"), res.stderr


GSPO = ["--grpo-generation-steps", "2", "--grpo-iterations", "2", "--grpo-importance", "sequence",
        "--grpo-loss-type", "grpo", "--grpo-temperature", "0.9"]


def test_gspo_with_several_steps_per_generation_learns_and_resumes(base, grpo_run, tmp_path):
  """--grpo-generation-steps 2 --grpo-iterations 2 (GSPO's sequence ratios, grpo averaging): a generation every 4
  steps samples 2 steps' prompts at once, and steps 1-4 train on shares 1, 2, 1, 2: the ratio starts at 1 (nothing
  clipped) and is clipped once the policy has moved; the reward climbs; a resumed run (from a generation) has the
  uninterrupted losses and rewards. --save-every must be a multiple of the 4."""
  run = tmp_path / "gspo"
  args = ["--checkpoint", str(base / "ckpt"), "--data", str(base / "prompts.jsonl"),
          *(f.format(base=base) for f in GRPO_RUN), *GSPO]
  res = train(*args, "--out", str(run))
  assert res.returncode == 0, res.stderr
  m = metrics(run)
  rewards = [r["reward"] for r in m]
  print("GSPO mean reward by step:", " ".join(f"{x:.2f}" for x in rewards))
  print("GSPO clip ratio by step:", " ".join(f"{r['clip_ratio']:.2f}" for r in m))
  assert np.mean(rewards[:4]) < 0.6 and np.mean(rewards[-4:]) > 0.75  # 0.52 -> 0.79 measured: 6 generations
  for cycle in range(0, 24, 4):
    a, b, c, d = m[cycle:cycle + 4]
    assert a["rollout_s"] > 0 and b["rollout_s"] == c["rollout_s"] == d["rollout_s"] == 0
    assert (a["reward"], b["reward"]) == (c["reward"], d["reward"]) and a["clip_ratio"] == 0
  assert max(r["clip_ratio"] for r in m) > 0

  resumed = tmp_path / "resumed"
  shutil.copytree(run, resumed)
  shutil.rmtree(resumed / "checkpoints" / "24")
  shutil.rmtree(resumed / "checkpoints" / "16")
  res = train(*args, "--out", str(resumed))
  assert res.returncode == 0 and "resuming" in res.stderr, res.stderr
  for x, y in zip(m, metrics(resumed), strict=True):
    assert (x["loss"], x["grad_norm"], x["reward"], x["clip_ratio"]) == (y["loss"], y["grad_norm"], y["reward"],
                                                                         y["clip_ratio"])


@pytest.mark.parametrize("flags,message", [
  (["--grpo-beta", "0.1"], "the --grpo-* options shape GRPO: give --grpo-reward too"),
  (["--grpo-iterations", "2"], "the --grpo-* options shape GRPO: give --grpo-reward too"),
  (["--grpo-reward", "{rewards}:low_ids", "--grpo-group", "4", "--grpo-reward-weights", "1,2"],
   "--grpo-reward-weights: expected a finite number per --grpo-reward (1), got 1.0, 2.0"),
  (["--grpo-reward", "{rewards}:low_ids", "--grpo-group", "4", "--grpo-reward-weights", "one"],
   "expected comma-separated numbers, got 'one'"),
  (["--grpo-reward", "{rewards}:low_ids", "--grpo-group", "4", "--grpo-iterations", "3"], "--save-every (4) must be "
   "a multiple of --grpo-generation-steps x --grpo-iterations (3)"),
  (["--grpo-reward", "{rewards}:low_ids", "--grpo-group", "4", "--grpo-generation-steps", "0"],
   "--grpo-generation-steps must be >= 1"),
  (["--grpo-reward", "{rewards}:low_ids", "--grpo-group", "4", "--grpo-epsilon", "1"], "--grpo-epsilon must be in "
   "[0, 1)"),
  (["--grpo-reward", "{rewards}:low_ids", "--grpo-group", "4", "--grpo-loss-type", "cispo", "--grpo-epsilon-high",
    "0.28"], "--grpo-loss-type cispo cuts the ratio itself at --grpo-epsilon-high (ScaleRL's 5.0), which must be >= 1 "
   "(below, every token's gradient shrinks), got 0.28"),
  (["--grpo-reward", "{rewards}:low_ids", "--grpo-group", "4", "--grpo-loss-type", "sapo",
    "--grpo-sapo-temperature-neg", "0"], "--grpo-sapo-temperature-neg must be > 0, got 0.0"),
  (["--grpo-reward", "{rewards}:low_ids", "--grpo-group", "4", "--grpo-top-entropy-quantile", "1.5"],
   "--grpo-top-entropy-quantile must be in [0, 1], got 1.5"),
  (["--grpo-reward", "{rewards}:low_ids", "--grpo-group", "4", "--grpo-entropy-coef", "-0.1"],
   "--grpo-entropy-coef must be >= 0, got -0.1"),
  (["--grpo-reward", "{rewards}:low_ids", "--grpo-group", "3"], "(4 rows, a completion each) must be a multiple of "
   "--grpo-group (3)"),
  (["--grpo-reward", "{rewards}:low_ids", "--grpo-group", "4", "--dpo-beta", "0.1"], "give --grpo-reward or "
   "--dpo-beta, not both"),
  (["--grpo-reward", "{rewards}:low_ids", "--grpo-group", "4", "--grpo-temperature", "0"],
   "--grpo-temperature must be > 0"),
  (["--grpo-reward", "{rewards}:low_ids", "--grpo-group", "4", "--grpo-top-p", "0"],
   "--grpo-top-p must be in (0, 1], got 0.0"),
  (["--grpo-top-k", "5"], "the --grpo-* options shape GRPO: give --grpo-reward too"),
  (["--grpo-reward", "{rewards}", "--grpo-group", "4"], "--grpo-reward takes FILE.py:FUNCTION, got"),
  (["--grpo-reward", "{base}/gone.py:f", "--grpo-group", "4"], "gone.py: no such reward file"),
  (["--grpo-reward", "{rewards}:nope", "--grpo-group", "4"], "rewards.py: no function 'nope'"),
  (["--grpo-reward", "{base}/broken.py:low_ids", "--grpo-group", "4"], "broken.py: importing it failed "
   "(ZeroDivisionError: division by zero)"),
  (["--grpo-reward", "{rewards}:low_ids", "--grpo-group", "4", "--data", "{base}/data.jsonl"],
   "data.jsonl:1: expected a 'prompt' (a string or a list of messages), got the keys 'messages'"),
  (["--grpo-reward", "{rewards}:low_ids", "--grpo-group", "4", "--data", "{base}/reserved.jsonl"],
   "reserved.jsonl:1: the key 'completions' is a reward function's own argument; rename it"),
  (["--grpo-reward", "{rewards}:low_ids", "--grpo-group", "4", "--grpo-max-new", "120"],
   "prompts.jsonl:1: the prompt has"),
  (["--grpo-reward", "{rewards}:low_ids", "--grpo-group", "4", "--eval-data", "{base}/data.jsonl"],
   "data.jsonl:1: expected a 'prompt'"),
])
def test_bad_grpo_flags_and_data(base, grpo_run, tmp_path, flags, message):
  (base / "broken.py").write_text("1 / 0\n")
  (base / "reserved.jsonl").write_text(json.dumps({"prompt": "hi", "completions": 3}) + "\n")
  flags = [f.format(base=base, rewards=base / "rewards.py") for f in flags]
  res = train("--checkpoint", str(base / "ckpt"), "--data", str(base / "prompts.jsonl"), "--out",
              str(tmp_path / "r"), *TRAIN, "--grpo-max-new", "16", *flags)
  assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
  assert not (tmp_path / "r").exists() or not any((tmp_path / "r" / "checkpoints").glob("*"))


def test_grpo_reward_of_the_wrong_length(base, grpo_run, tmp_path):
  """A reward function that does not give a number per completion stops the run at its first step, naming it;
  no checkpoint is written."""
  res = train("--checkpoint", str(base / "ckpt"), "--data", str(base / "prompts.jsonl"), "--out",
              str(tmp_path / "r"), *TRAIN, "--grpo-reward", f"{base / 'rewards.py'}:miscounted", "--grpo-group", "4",
              "--grpo-max-new", "16")
  assert res.returncode == 2 and "reward function 'miscounted': expected a finite number (or None) for each of the 4 " \
      "completions" in res.stderr and "Traceback" not in res.stderr, res.stderr
  assert not any((tmp_path / "r" / "checkpoints").glob("*"))


def test_grpo_reward_weights_and_none(base):
  """--grpo-reward-weights weigh the functions' scores in the reward; a function's None (a completion it does not
  judge, as TRL allows) is left out of the sum and of its mean (None when it judged none); an infinite or
  non-numeric score is one error line."""
  def length(completion_ids, **kwargs):
    return [float(len(c)) for c in completion_ids]

  def text_only(prompts, **kwargs):
    return [None if isinstance(p, list) else 1.0 for p in prompts]

  def infinite(prompts, **kwargs):
    return [float("inf")] * len(prompts)

  tc = training.TrainConfig(batch_size=4, grpo_rewards=("r.py:length", "r.py:text_only"), grpo_group=2,
                            grpo_reward_weights=(0.5, 2.0))
  rollouts = grpo.Rollouts([], [("length", length), ("text_only", text_only)], load_tokenizer(base / "ckpt"), tc, [],
                           mesh=None)
  text, chat = grpo.Prompt((1,), "text", {}), grpo.Prompt((1,), [{"role": "user", "content": "x"}], {})
  scores = rollouts.score([text, chat], [[5, 6], [7]])
  np.testing.assert_array_equal(scores, [[2.0, 1.0], [1.0, np.nan]])
  np.testing.assert_array_equal(rollouts.total(scores), [3.0, 0.5])
  assert rollouts._means(scores, "reward") == {"reward": 1.75, "reward_length": 1.5, "reward_text_only": 1.0}
  assert rollouts._means(rollouts.score([chat], [[7]]), "r") == {"r": 0.5, "r_length": 1.0, "r_text_only": None}
  for bad in (infinite, lambda prompts, **kwargs: ["high"] * len(prompts)):
    rollouts.rewards = [("bad", bad)]
    with pytest.raises(UserError, match="reward function 'bad': expected a finite number \\(or None\\) for each of "
                       "the 2 completions"):
      rollouts.score([text, chat], [[5, 6], [7]])


LORA = ["--lora-rank", "4", "--lora-alpha", "16"]


@pytest.fixture(scope="module")
def lora_run(base):
  """A LoRA run on the same data (adapters on every target group), shared by the tests below."""
  run = base / "lora"
  res = train("--checkpoint", str(base / "ckpt"), "--data", str(base / "data.jsonl"), "--out", str(run), *TRAIN, *LORA)
  assert res.returncode == 0, res.stderr
  return run


def test_lora_trains_adapters_only_and_exports_merged(base, lora_run, tmp_path):
  m = metrics(lora_run)
  first, last = np.mean([r["ce"] for r in m[:3]]), np.mean([r["ce"] for r in m[-3:]])
  print(f"LoRA cross-entropy {first:.3f} -> {last:.3f}")
  assert last < 0.9 * first  # 5.70 -> 4.88 measured; frozen weights alone stay at ~5.7
  # steps hold the adapters (and optimizer state) only, all of them
  cfg = checkpoint.load_config(lora_run)
  loc, _ = checkpoint.checked(lora_run, cfg)
  assert loc.path == (base / "ckpt" / "params").resolve() and loc.lora == lora_lib.LoraConfig(4, 16.0)
  assert set(checkpoint.stored_shapes(loc.adapters)) == set(checkpoint.param_shapes(cfg, loc.lora))
  assert not (loc.adapters.path / checkpoint.PARAMS_ITEM).exists()

  # read back, the run is its base with the adapters merged: targeted weights moved, the rest did not
  before = checkpoint.flatten(nnx.state(checkpoint.restore(base / "ckpt", dtype=jnp.float32), nnx.Param))
  model = checkpoint.restore(lora_run, dtype=jnp.float32)
  after = checkpoint.flatten(nnx.state(model, nnx.Param))
  changed = {training.param_group(k) for k in before if not np.array_equal(before[k], after[k])}
  assert changed == {"attention", "shared_expert", "experts", "mlp"} & {training.param_group(k) for k in before}

  # the unmerged model (base + adapters, as trained) gives the merged model's logits, and so does transformers
  # on the exported folder
  one = sharding.make_mesh({}, jax.devices()[:1])
  adapters = checkpoint.load_sharded(loc.adapters, checkpoint.wanted_adapters(cfg, loc.lora, one, jnp.float32),
                                     cfg.num_experts)
  unmerged = training.with_adapters(checkpoint.restore(base / "ckpt", one, jnp.float32), adapters, loc.lora, one,
                                    jnp.float32, Kernels())
  exported = tmp_path / "hf"
  convert.export_hf(lora_run, exported, progress=False)
  hf_model = Qwen2MoeForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
  ids = [3, 14, 15, 92, 65, 35, 89, 79]
  with torch.no_grad():
    ref = hf_model(torch.tensor([ids])).logits[0].numpy()
  for got in (prompt_logits(model, ids), prompt_logits(unmerged, ids)):
    np.testing.assert_allclose(got, ref, atol=2e-5 * np.abs(ref).max())


def test_lora_adapters_export_to_peft(base, lora_run, tmp_path):
  """orbax_to_hf.py --peft: peft loads the adapters onto transformers' base model (experts through
  target_parameters) and its logits equal our merged run's, as do those of the base converted with the adapter
  merged (hf_to_orbax.py --peft); bad uses are one line."""
  from peft import PeftModel
  out = tmp_path / "peft"
  res = subprocess.run([sys.executable, "convert/orbax_to_hf.py", str(lora_run), str(out), "--peft"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr
  config = json.loads((out / "adapter_config.json").read_text())
  assert (config["r"], config["lora_alpha"]) == (4, 16.0)
  hf_model = PeftModel.from_pretrained(Qwen2MoeForCausalLM.from_pretrained(base / "hf", dtype=torch.float32), out)
  ids = [3, 14, 15, 92, 65, 35, 89, 79]
  with torch.no_grad():
    ref = hf_model.eval()(torch.tensor([ids])).logits[0].numpy()
    plain = hf_model.get_base_model()
    with hf_model.disable_adapter():
      untouched = plain(torch.tensor([ids])).logits[0].numpy()
  got = prompt_logits(checkpoint.restore(lora_run, dtype=jnp.float32), ids)
  assert np.abs(got - untouched).max() > 0.1  # the adapters matter
  np.testing.assert_allclose(got, ref, atol=2e-5 * np.abs(ref).max())
  # with int8 experts: the adapters merged in float, then the merged experts quantized
  int8 = prompt_logits(checkpoint.restore(lora_run, dtype=jnp.float32, kernels=Kernels(expert_dtype="int8")), ids)
  assert np.abs(int8 - got).max() < 0.1 * np.abs(got - untouched).max()
  # and back: hf_to_orbax.py --peft merges them into the base as it converts, giving the run's model
  res = subprocess.run([sys.executable, "convert/hf_to_orbax.py", str(base / "hf"), str(tmp_path / "merged"),
                        "--peft", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr
  merged = prompt_logits(checkpoint.restore(tmp_path / "merged", dtype=jnp.float32), ids)
  np.testing.assert_allclose(merged, got, atol=2e-5 * np.abs(got).max())
  for args, message in (([str(base / "ckpt"), str(tmp_path / "x"), "--peft"], "not a LoRA run (no lora.json)"),
                        ([str(lora_run), str(out), "--peft"], "exists and is not empty (pass --force"),
                        ([str(lora_run), str(tmp_path / "y"), "--peft", "--dtype", "int4"], "--dtype must be one of")):
    res = subprocess.run([sys.executable, "convert/orbax_to_hf.py", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
  assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_lora_resume_matches_uninterrupted(lora_run, tmp_path, base):
  """Steps after 8 removed, the same command resumes from the adapters and optimizer state of step 8 and ends
  where the uninterrupted run ended."""
  resumed = tmp_path / "resumed"
  shutil.copytree(lora_run, resumed)
  for step in (12, 16):
    shutil.rmtree(resumed / "checkpoints" / str(step))
  res = train("--checkpoint", str(base / "ckpt"), "--data", str(base / "data.jsonl"), "--out", str(resumed),
              *TRAIN, *LORA)
  assert res.returncode == 0, res.stderr
  assert "from step 8" in res.stderr
  for x, y in zip(metrics(lora_run), metrics(resumed), strict=True):
    assert (x["loss"], x["grad_norm"]) == (y["loss"], y["grad_norm"]), x["step"]
  a, b = (checkpoint.flatten(nnx.state(checkpoint.restore(r, dtype=jnp.float32))) for r in (lora_run, resumed))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_lora_over_int8_experts(base, lora_run, tmp_path, capsys):
  """--expert-dtype int8 with --lora-rank (QLoRA-style): the frozen routed experts are int8 while the adapters
  train, the loss falls, and the run read back (merged into the int8-rounded experts: the weights it trained
  with) gives the logits of the model it trained, as does its export to transformers; resuming with another
  expert dtype is refused."""
  run = tmp_path / "qlora"
  res = train("--checkpoint", str(base / "ckpt"), "--data", str(base / "data.jsonl"), "--out", str(run), *TRAIN,
              *LORA, "--expert-dtype", "int8")
  assert res.returncode == 0, res.stderr
  m = metrics(run)
  first, last = np.mean([r["ce"] for r in m[:3]]), np.mean([r["ce"] for r in m[-3:]])
  print(f"LoRA over int8 experts: cross-entropy {first:.3f} -> {last:.3f}")
  assert last < 0.9 * first
  cfg = checkpoint.load_config(run)
  loc, _ = checkpoint.checked(run, cfg)
  assert loc.lora == lora_lib.LoraConfig(4, 16.0, int8_experts=True)

  one, int8 = sharding.make_mesh({}, jax.devices()[:1]), Kernels(expert_dtype="int8")
  adapters = checkpoint.load_sharded(loc.adapters, checkpoint.wanted_adapters(cfg, loc.lora, one, jnp.float32, int8),
                                     cfg.num_experts)
  trained = training.with_adapters(checkpoint.restore(base / "ckpt", one, jnp.float32, int8), adapters, loc.lora,
                                   one, jnp.float32, int8)
  assert trained.layers[1].mlp.experts_wi[...].dtype == jnp.int8
  ids = [3, 14, 15, 92, 65, 35, 89, 79]
  ref = prompt_logits(trained, ids)  # as the train step computed them: int8 experts, adapters unmerged
  merged = prompt_logits(checkpoint.restore(run, dtype=jnp.float32), ids)
  np.testing.assert_allclose(merged, ref, atol=2e-5 * np.abs(ref).max())
  # read with int8 experts, the run is that very model (adapters unmerged); infer.py reads it so by default
  kept = checkpoint.restore(run, dtype=jnp.float32, kernels=int8)
  assert kept.layers[1].mlp.experts_wi_lora_a[...].dtype == jnp.float32
  np.testing.assert_allclose(prompt_logits(kept, ids), ref, atol=1e-6 * np.abs(ref).max())
  mesh = sharding.make_mesh("fsdp=2,expert=2,tensor=2")  # both ways on a mesh, laid out as the rules say
  for kernels, want in ((Kernels(), merged), (int8, ref)):
    spread = checkpoint.restore(run, mesh, jnp.float32, kernels)
    assert tuple(spread.layers[1].mlp.experts_wi[...].sharding.spec) == ("expert", "fsdp", None, "tensor")
    np.testing.assert_allclose(prompt_logits(spread, ids, mesh), want, atol=2e-6 * np.abs(ref).max())
  res = subprocess.run([sys.executable, "infer.py", "--checkpoint", str(run), "--input-ids", "3,14,15,92",
                        "--dtype", "float32", "--temperature", "0", "--max-new-tokens", "6", "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0 and "trained its LoRA adapters over int8 experts: run so" in res.stderr, res.stderr
  assert json.loads(res.stdout)["output_ids"] == Generator(trained).generate([[3, 14, 15, 92]], 6).output_ids[0]
  # merged into the original float experts instead, the model is off by the experts' rounding
  unrounded = dataclasses.replace(loc, lora=dataclasses.replace(loc.lora, int8_experts=False))
  off = np.abs(prompt_logits(checkpoint.restore(unrounded, dtype=jnp.float32, cfg=cfg), ids) - ref).max()
  assert off > 1e-3 * np.abs(ref).max()
  convert.export_hf(run, tmp_path / "hf", progress=False)
  hf_model = Qwen2MoeForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
  with torch.no_grad():
    np.testing.assert_allclose(hf_model(torch.tensor([ids])).logits[0].numpy(), ref, atol=2e-5 * np.abs(ref).max())
  export_peft(run, tmp_path / "peft")  # peft would apply them to the float experts: said
  assert "trained its adapters over int8 routed experts; peft applies them" in capsys.readouterr().err

  res = train("--checkpoint", str(base / "ckpt"), "--data", str(base / "data.jsonl"), "--out", str(lora_run),
              *TRAIN, *LORA, "--expert-dtype", "int8")
  assert res.returncode == 2 and "resuming with different settings (lora)" in res.stderr, res.stderr
  # resumed from step 12 (adapters, optimizer state, the int8 base re-read), it ends where it ended
  shutil.rmtree(run / "checkpoints" / "16")
  res = train("--checkpoint", str(base / "ckpt"), "--data", str(base / "data.jsonl"), "--out", str(run), *TRAIN,
              *LORA, "--expert-dtype", "int8")
  assert res.returncode == 0 and "from step 12" in res.stderr, res.stderr
  assert [(r["loss"], r["grad_norm"]) for r in metrics(run)] == [(r["loss"], r["grad_norm"]) for r in m]


@pytest.mark.parametrize("flags,message", [
  (["--lora-rank", "0"], "--lora-rank must be >= 1, got 0"),
  (["--lora-rank", "4", "--train-only", "attention"], "drop --train-only / --freeze"),
  (["--lora-rank", "4", "--lora-targets", "attention,router"], "--lora-targets: unknown group 'router'"),
  (["--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha must be > 0, got 0.0"),
  (["--lora-rank", "4", "--lora-targets", ","], "--lora-targets: unknown group ''"),
  (["--lora-alpha", "8"], "--lora-alpha / --lora-targets need --lora-rank"),
  (["--expert-dtype", "int8"], "--expert-dtype int8 holds the routed experts frozen as int8"),
  (["--dpo-loss", "ipo"], "--dpo-loss and --dpo-label-smoothing shape DPO's loss: give --dpo-beta too"),
  (["--dpo-beta", "0.1", "--dpo-label-smoothing", "0.5"], "--dpo-label-smoothing must be in [0, 0.5)"),
  (["--dpo-beta", "0.1", "--dpo-loss", "hinge", "--dpo-label-smoothing", "0.1"],
   "with --dpo-loss sigmoid or simpo, got 0.1 with hinge"),
  (["--dpo-beta", "0.1", "--simpo-gamma", "1"],
   "--simpo-gamma is SimPO's margin: give --dpo-beta and --dpo-loss simpo"),
  (["--dpo-beta", "2", "--dpo-loss", "simpo", "--simpo-gamma", "-1"], "--simpo-gamma must be >= 0, got -1.0"),
  (["--dpo-beta", "0.1", "--kto-desirable-weight", "2"], "--kto-desirable-weight / --kto-undesirable-weight weigh "
   "KTO's losses: give --dpo-beta and --dpo-loss kto too"),
  (["--dpo-beta", "0.1", "--dpo-loss", "kto", "--kto-undesirable-weight", "0"], "--kto-desirable-weight and "
   "--kto-undesirable-weight must be > 0, got (1.0, 0.0)"),
  (["--lr-schedule", "wsd", "--decay-steps", "15"], "--decay-steps must be in [1, 14] (the steps after the 2 of "
   "warmup), got 15"),
])
def test_bad_lora_and_dpo_flags(base, tmp_path, flags, message):
  res = train("--checkpoint", str(base / "ckpt"), "--data", str(base / "data.jsonl"), "--out", str(tmp_path / "r"),
              *TRAIN, *flags)
  assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
  assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_lora_run_with_its_base_gone_or_as_a_lora_base(base, lora_run, tmp_path):
  moved = tmp_path / "moved"
  shutil.copytree(lora_run, moved)
  record = json.loads((moved / checkpoint.LORA_FILE).read_text())
  (moved / checkpoint.LORA_FILE).write_text(json.dumps(record | {"base": str(tmp_path / "gone" / "params")}))
  res = subprocess.run([sys.executable, "infer.py", "--checkpoint", str(moved), "--input-ids", "1,2,3"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 2 and "Traceback" not in res.stderr
  assert f"{moved / checkpoint.LORA_FILE}: base checkpoint {tmp_path / 'gone' / 'params'} not found" in res.stderr
  res = train("--checkpoint", str(lora_run), "--data", str(base / "data.jsonl"), "--out", str(tmp_path / "r"),
              *TRAIN, *LORA)
  assert res.returncode == 2 and "a LoRA run; LoRA on top of it needs its merged weights" in res.stderr
  (moved / checkpoint.LORA_FILE).write_text(json.dumps({"base": record["base"], "rank": 4}))
  with pytest.raises(UserError, match="lora.json: unreadable or incomplete \\(KeyError"):
    checkpoint.locate(moved)


def assert_same_weights(run: Path, other: Path) -> None:
  """The two run folders read back (LoRA adapters merged) to the same float32 weights."""
  got, want = (checkpoint.flatten(nnx.state(checkpoint.restore(r, dtype=jnp.float32), nnx.Param)) for r in (run, other))
  for k, x in want.items():
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(x), err_msg=k)


def test_lora_over_a_hf_folder_read_in_place(base, lora_run, tmp_path):
  """A LoRA run straight from the HF folder (no conversion) trains as over its conversion: the same losses and
  weights read back; lora.json records the folder, and the folder gone is one line."""
  run = tmp_path / "run"
  res = train("--checkpoint", str(base / "hf"), "--data", str(base / "data.jsonl"), "--out", str(run), *TRAIN, *LORA)
  assert res.returncode == 0, res.stderr
  assert [r["loss"] for r in metrics(run)] == [r["loss"] for r in metrics(lora_run)]
  record = json.loads((run / checkpoint.LORA_FILE).read_text())
  assert (record["base"], record["base_item"], record["base_format"]) == (str((base / "hf").resolve()), None, "hf")
  assert_same_weights(run, lora_run)
  (run / checkpoint.LORA_FILE).write_text(json.dumps(record | {"base": str(tmp_path / "gone")}))
  with pytest.raises(UserError, match=f"base checkpoint {tmp_path / 'gone'} not found"):
    checkpoint.locate(run)


def test_peft_adapter_merged_into_a_hf_base(base, tmp_path):
  """train.py --peft: a LoRA run over the HF folder with a peft adapter merged as it is read trains as one over the
  folder converted with that adapter (same losses and weights read back); lora.json records the adapter with its
  base. A full fine-tune's KL reference records it too and locates it again; the adapter gone is one line."""
  peft_adapter(make_model(seed=4, vocab_size=320, std=0.05), tmp_path / "adapter")  # the base fixture's model
  convert.import_hf(base / "hf", tmp_path / "merged", peft=tmp_path / "adapter", progress=False)
  for source, run, extra in ((base / "hf", "run", ["--peft", str(tmp_path / "adapter")]),
                             (tmp_path / "merged", "reference", [])):
    res = train("--checkpoint", str(source), *extra, "--data", str(base / "data.jsonl"), "--out", str(tmp_path / run),
                *TRAIN, "--steps", "4", *LORA)
    assert res.returncode == 0, res.stderr
  assert [r["loss"] for r in metrics(tmp_path / "run")] == [r["loss"] for r in metrics(tmp_path / "reference")]
  record = json.loads((tmp_path / "run" / checkpoint.LORA_FILE).read_text())
  assert (record["base"], record["base_peft"]) == (str((base / "hf").resolve()), str(tmp_path / "adapter"))
  assert_same_weights(tmp_path / "run", tmp_path / "reference")

  run = RunDir(tmp_path / "full")
  located = checkpoint.locate(base / "hf", tmp_path / "adapter")
  run.start(base / "hf", {}, reference=located)
  assert run.reference() == located
  shutil.rmtree(tmp_path / "adapter")
  with pytest.raises(UserError, match="adapter_config.json.*not found"):
    checkpoint.restore(run.reference(), cfg=checkpoint.load_config(base / "hf"))
  run.close()


def _step_outputs(model, mesh, tc, batch, kernels=Kernels()):
  """One train step on `mesh`: (metrics, updated trainable params) as host values."""
  graphdef, abstract = abstract_model(model.config, jnp.float32, sharding.expert_shards(mesh), kernels, tc.lora)
  tx = training.make_optimizer(tc)
  with jax.set_mesh(mesh):
    trainable, frozen = training.split_params(model, tc)
    opt_state = training.compile_init(tx, trainable)(trainable)
    step = training.make_train_step(graphdef, abstract, tc, tx, model.config.router_aux_loss_coef)
    spec = training.batch_spec(mesh, batch["tokens"].shape, tuple(k for k in batch if k not in data.FIELDS))
    compiled = training.compile_step(step, trainable, frozen, opt_state, spec)
    trainable, _, m = compiled(trainable, frozen, opt_state, training.device_batch(batch, mesh))
  flat = checkpoint.unpadded(model.config, checkpoint.flatten(trainable))
  return jax.device_get(m), {k: np.asarray(v) for k, v in flat.items()}


@pytest.fixture(scope="module")
def step_case(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("step")
  save(make_model(seed=8, num_experts=6, num_experts_per_tok=2), tmp / "hf")
  convert.import_hf(tmp / "hf", tmp / "ckpt", progress=False)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 101, (2, 4, 16)).astype(np.int32)  # [K, B, T]
  batch = {
    "tokens": tokens, "targets": np.roll(tokens, -1, axis=-1),
    "loss_mask": (rng.random(tokens.shape) > 0.2).astype(np.int32),
    "positions": np.broadcast_to(np.arange(16, dtype=np.int32), tokens.shape).copy(),
    "segment_ids": np.ones_like(tokens),
  }
  tc = training.TrainConfig(steps=10, batch_size=4, seq_len=16, grad_accum=2, lr=1e-2, warmup_steps=0,
                            compute_dtype="float32", remat="none")
  return tmp / "ckpt", batch, tc


@pytest.fixture(scope="module")
def one_device_step(step_case):
  ckpt, batch, tc = step_case
  one = sharding.make_mesh({}, jax.devices()[:1])
  return _step_outputs(checkpoint.restore(ckpt, one, jnp.float32), one, tc, batch)


@pytest.mark.parametrize("spec", ["expert=8", "data=2,expert=4", "fsdp=2,expert=2,tensor=2"])
def test_train_step_same_on_every_mesh(step_case, one_device_step, spec):
  ckpt, batch, tc = step_case
  mesh = sharding.make_mesh(spec)
  m, p = _step_outputs(checkpoint.restore(ckpt, mesh, jnp.float32), mesh, tc, batch)
  assert_same_step((m, p), one_device_step, tc)


@pytest.mark.parametrize("kind", ["sigmoid", "orpo", "kto"])
def test_dpo_step_same_on_every_mesh(step_case, kind):
  """A DPO step (pairs packed into rows, two micro-batches) on a mesh splitting rows, experts and heads gives the
  one-device step; so do a reference-free ORPO step (no reference log-probabilities in its batch) and a KTO step
  (its KL estimate a mean over the micro-batch's units, wherever their rows are)."""
  ckpt, _, tc = step_case
  rng = np.random.default_rng(3)
  docs = data.Documents.of([data.Document(tuple(rng.integers(0, 101, n).tolist()), tuple(int(j >= 2) for j in range(n)))
                            for n in rng.integers(3, 8, 24)])
  if kind == "kto":
    docs = dataclasses.replace(docs, labels=rng.integers(0, 2, 12).astype(np.uint8))
  tc = dataclasses.replace(tc, dpo_beta=0.2, dpo_loss=kind)
  reference = rng.uniform(-5, -1, len(docs.tokens)).astype(np.float32) if tc.reference else None
  rows = data.BatchStream(docs, 16, 8, seed=0, pairs=True, reference=reference).batch(0)
  batch = {k: v.reshape(2, 4, 16) for k, v in rows.items()}
  one = sharding.make_mesh({}, jax.devices()[:1])
  want = _step_outputs(checkpoint.restore(ckpt, one, jnp.float32), one, tc, batch)
  dpo = {"reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"}
  assert want[0].count >= 8 and np.isfinite(want[0].loss) and set(want[0].stats) == {
    "sigmoid": dpo, "orpo": dpo | {"nll_loss", "log_odds_ratio"}, "kto": {"reward_accuracy", "kl"}}[kind]
  mesh = sharding.make_mesh("fsdp=2,expert=2,tensor=2")
  assert_same_step(_step_outputs(checkpoint.restore(ckpt, mesh, jnp.float32), mesh, tc, batch), want, tc)


@pytest.mark.parametrize("gspo", [False, True])
def test_grpo_step_same_on_a_mesh(step_case, gspo):
  """A GRPO step (a completion per row with its advantage, two micro-batches) on a mesh splitting rows, experts
  and heads gives the one-device step; and so does GSPO's, a later step of a generation (old log-probabilities,
  sequence ratios, clipped, averaged per completion), here with an entropy mask (the top 30% of each micro-batch's
  tokens by entropy)."""
  ckpt, _, tc = step_case
  rng = np.random.default_rng(4)
  prompts = [rng.integers(0, 101, n).tolist() for n in rng.integers(2, 7, 8)]
  completions = [rng.integers(0, 101, n).tolist() for n in rng.integers(1, 9, 8)]
  rows = grpo.rows(prompts, completions, grpo.advantages(rng.normal(size=8), group=4), seq_len=16)
  tc = dataclasses.replace(tc, grpo_rewards=("unused.py:f",), grpo_group=4, grpo_max_new=8)
  if gspo:
    rows[data.OLD_LOGP] = rng.uniform(-5, -4, rows["tokens"].shape).astype(np.float32)
    tc = dataclasses.replace(tc, grpo_iterations=2, grpo_importance="sequence", grpo_loss_type="grpo",
                             grpo_top_entropy_quantile=0.3)
  batch = {k: v.reshape(2, 4, 16) for k, v in rows.items()}
  one = sharding.make_mesh({}, jax.devices()[:1])
  want = _step_outputs(checkpoint.restore(ckpt, one, jnp.float32), one, tc, batch)
  assert want[0].count == (8 if gspo else sum(len(c) for c in completions)) and np.isfinite(want[0].loss)
  assert ("clip_ratio" in want[0].stats) == gspo and want[0].stats["entropy"] > 0
  mesh = sharding.make_mesh("fsdp=2,expert=2,tensor=2")
  assert_same_step(_step_outputs(checkpoint.restore(ckpt, mesh, jnp.float32), mesh, tc, batch), want, tc)


def test_bnpo_averages_the_micro_batches_means(step_case):
  """--grpo-loss-type bnpo: a step of two micro-batches takes the mean of each one's mean over its own completion
  tokens (TRL's bnpo, per micro-batch), where dapo weighs them by their tokens (the micro-batches here have 27 and
  17, so the two differ); the step's stats are still per token. The entropy bonus is a mean per micro-batch too
  (TRL's): minus the coefficient x the mean of the two micro-batches' mean entropies joins the loss."""
  ckpt, _, tc = step_case
  rng = np.random.default_rng(7)
  prompts = [rng.integers(0, 101, n).tolist() for n in rng.integers(2, 7, 8)]
  completions = [rng.integers(0, 101, n).tolist() for n in (8, 7, 6, 6, 5, 4, 4, 4)]
  rows = grpo.rows(prompts, completions, grpo.advantages(rng.normal(size=8), group=4), seq_len=16)
  rows[data.OLD_LOGP] = rng.uniform(-5, -4, rows["tokens"].shape).astype(np.float32)  # some ratios clipped
  tc = dataclasses.replace(tc, grpo_rewards=("unused.py:f",), grpo_group=4, grpo_max_new=8, grpo_iterations=2)
  one = sharding.make_mesh({}, jax.devices()[:1])

  def step(loss_type, batch, accum=2, entropy_coef=0.0):
    kind = dataclasses.replace(tc, grpo_loss_type=loss_type, grad_accum=accum, grpo_entropy_coef=entropy_coef)
    return _step_outputs(checkpoint.restore(ckpt, one, jnp.float32), one, kind, batch)[0]

  batch = {k: v.reshape(2, 4, 16) for k, v in rows.items()}
  halves = [step("dapo", {k: v[i:i + 1] for k, v in batch.items()}, accum=1) for i in range(2)]
  bnpo, dapo = step("bnpo", batch), step("dapo", batch)
  assert [h.count for h in halves] == [27, 17] and bnpo.count == 2
  np.testing.assert_allclose(bnpo.value, (halves[0].value + halves[1].value) / 2, rtol=1e-5)
  np.testing.assert_allclose(dapo.value, (27 * halves[0].value + 17 * halves[1].value) / 44, rtol=1e-5)
  assert abs(bnpo.value - dapo.value) > 1e-3
  np.testing.assert_allclose(bnpo.stats["clip_ratio"], dapo.stats["clip_ratio"])
  means = [h.stats["entropy"] for h in halves]  # each micro-batch's mean entropy per token
  print("entropy per micro-batch:", means, "per token:", dapo.stats["entropy"])
  bonus = step("dapo", batch, entropy_coef=0.5)
  np.testing.assert_allclose(bonus.value, dapo.value, rtol=1e-6)
  np.testing.assert_allclose(bonus.loss - dapo.loss, -0.5 * (means[0] + means[1]) / 2, rtol=1e-5)


def test_grpo_old_logprobs_are_scored_as_the_loss_scores(step_case):
  """The log-probability program (a generation's old log-probabilities, and the KL reference's) scores GRPO's rows
  as the loss does, at the sampling temperature (TRL's tempered log-probabilities): a later step of a generation
  given them has ratios of 1, nothing clipped even within 1e-3, and equals the on-policy step; at temperature 1
  they would differ."""
  ckpt, _, tc = step_case
  rng = np.random.default_rng(6)
  prompts = [rng.integers(0, 101, n).tolist() for n in rng.integers(2, 7, 8)]
  completions = [rng.integers(0, 101, n).tolist() for n in rng.integers(1, 9, 8)]
  rows = grpo.rows(prompts, completions, grpo.advantages(rng.normal(size=8), group=4), seq_len=16)
  tc = dataclasses.replace(tc, grpo_rewards=("unused.py:f",), grpo_group=4, grpo_max_new=8, grpo_temperature=0.3)
  one = sharding.make_mesh({}, jax.devices()[:1])
  model = checkpoint.restore(ckpt, one, jnp.float32)
  graphdef, abstract = abstract_model(model.config, jnp.float32)
  trainable, frozen = training.split_params(model, tc)
  logp = {t: training.row_logprobs(jax.jit(training.make_logprob_step(
    graphdef, abstract, dataclasses.replace(tc, grpo_temperature=t))), trainable, frozen, rows, 4, one)
    for t in (0.3, 1.0)}
  assert np.abs(logp[0.3] - logp[1.0]).max() > 0.1
  batch = {k: v.reshape(2, 4, 16) for k, v in rows.items()}
  on_policy = _step_outputs(model, one, tc, batch)
  later = dataclasses.replace(tc, grpo_iterations=2, grpo_epsilon=1e-3)
  m, _ = _step_outputs(checkpoint.restore(ckpt, one, jnp.float32), one, later,
                            batch | {data.OLD_LOGP: logp[0.3].reshape(2, 4, 16)})
  assert m.stats["clip_ratio"] == 0
  np.testing.assert_allclose([m.loss, m.grad_norm], [on_policy[0].loss, on_policy[0].grad_norm], rtol=1e-5)


@pytest.fixture(scope="module")
def lora_case(step_case):
  """The step case as a LoRA step, with nonzero adapters (B random) given as host arrays (unpadded)."""
  ckpt, batch, tc = step_case
  tc = dataclasses.replace(tc, lora=lora_lib.LoraConfig(3, 6.0))
  rng = np.random.default_rng(5)
  shapes = checkpoint.param_shapes(checkpoint.load_config(ckpt), tc.lora)
  return ckpt, batch, tc, {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in shapes.items()}


def _lora_step(lora_case, mesh, kernels=Kernels()):
  ckpt, batch, tc, host = lora_case
  model = checkpoint.restore(ckpt, mesh, jnp.float32, kernels)
  wanted = checkpoint.wanted_adapters(model.config, tc.lora, mesh, jnp.float32, kernels)
  adapters = {k: jax.device_put(np.pad(host[k], [(0, w - s) for s, w in zip(host[k].shape, v.shape)]), v.sharding)
              for k, v in wanted.items()}
  return _step_outputs(training.with_adapters(model, adapters, tc.lora, mesh, jnp.float32, kernels),
                       mesh, tc, batch, kernels)


@pytest.mark.parametrize("spec,expert_dtype", [("expert=8", "auto"), ("fsdp=2,expert=2,tensor=2", "auto"),
                                               ("fsdp=2,expert=2,tensor=2", "int8")])
def test_lora_train_step_same_on_every_mesh(lora_case, spec, expert_dtype):
  """A LoRA step (adapters through the expert-parallel shard_map, fsdp gathers and tensor-split hidden; over
  int8 experts too, their scales split like them) updates the adapters as one device does; only adapters are
  trained."""
  tc, kernels = lora_case[2], Kernels(expert_dtype=expert_dtype)
  ref = _lora_step(lora_case, sharding.make_mesh({}, jax.devices()[:1]), kernels)
  assert set(ref[1]) == set(lora_case[3])
  assert_same_step(_lora_step(lora_case, sharding.make_mesh(spec), kernels), ref, tc)


def test_train_step_with_one_row_on_fsdp(step_case):
  """Micro-batches of one row, which fsdp cannot split: weights are gathered for replicated tokens."""
  ckpt, batch, tc = step_case
  row, tc1 = {k: v[:, :1] for k, v in batch.items()}, dataclasses.replace(tc, batch_size=1)
  one, mesh = sharding.make_mesh({}, jax.devices()[:1]), sharding.make_mesh("fsdp=2,expert=2,tensor=2")
  assert_same_step(_step_outputs(checkpoint.restore(ckpt, mesh, jnp.float32), mesh, tc1, row),
                   _step_outputs(checkpoint.restore(ckpt, one, jnp.float32), one, tc1, row), tc1)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_optimizer_state_is_split_like_the_parameters(step_case, optimizer):
  """Each parameter-shaped leaf of the optimizer state (AdamW's two moments, Adafactor's unfactored ones) has its
  parameter's sharding, so a device holds its share (left to jit, AdamW's moments were whole on every device)."""
  ckpt, _, tc = step_case
  mesh = sharding.make_mesh("fsdp=2,expert=2,tensor=2")
  tc = dataclasses.replace(tc, optimizer=optimizer)
  trainable, _ = training.split_params(checkpoint.restore(ckpt, mesh, jnp.float32), tc)
  params = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(trainable)}
  with jax.set_mesh(mesh):
    state = training.compile_init(training.make_optimizer(tc), trainable)(trainable)
  matched = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    key = jax.tree_util.keystr(path)
    param = next((params[k] for k in params if key.endswith(k)), None)
    if param is not None and param.shape == leaf.shape:
      assert leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim), key
      matched += 1
    else:
      assert leaf.size * leaf.dtype.itemsize < 64 << 10 or param is not None, key  # counts and factors: small
  per_device = lambda tree: sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
  if optimizer == "adamw":
    assert matched == 2 * len(params)
    assert per_device(state) < 2.1 * per_device(trainable)
  else:
    assert matched > 0


def assert_same_step(got, ref, tc) -> None:
  (m, p), (ref_m, ref_p) = got, ref
  np.testing.assert_allclose(m.loss, ref_m.loss, rtol=1e-5)
  np.testing.assert_allclose(m.grad_norm, ref_m.grad_norm, rtol=1e-4)
  assert set(m.stats) == set(ref_m.stats)
  for k in ref_m.stats:
    np.testing.assert_allclose(m.stats[k], ref_m.stats[k], rtol=1e-5, atol=1e-7, err_msg=k)
  # Adam's first step moves each weight by about lr * sign(gradient): gradients within rounding noise of zero
  # may move differently, so allow 5% of lr (a wrong or missing gradient moves a weight by ~lr)
  for k in ref_p:
    np.testing.assert_allclose(p[k], ref_p[k], atol=0.05 * tc.lr, err_msg=k)


def test_grad_accumulation_equals_one_big_batch(step_case, one_device_step):
  ckpt, batch, tc = step_case
  one = sharding.make_mesh({}, jax.devices()[:1])
  m1, _ = one_device_step
  big = {k: v.reshape(1, 8, 16) for k, v in batch.items()}
  tc2 = dataclasses.replace(tc, grad_accum=1, batch_size=8)
  m2, _ = _step_outputs(checkpoint.restore(ckpt, one, jnp.float32), one, tc2, big)
  np.testing.assert_allclose(m1.value, m2.value, rtol=1e-6)
  np.testing.assert_allclose(m1.tokens, m2.tokens)
  # aux is averaged per micro-batch (a nonlinear statistic), so the gradients differ only through its 0.001 share
  np.testing.assert_allclose(m1.grad_norm, m2.grad_norm, rtol=1e-3)


def test_non_finite_step_is_skipped_and_counted(step_case):
  ckpt, batch, tc = step_case
  one = sharding.make_mesh({}, jax.devices()[:1])
  model = checkpoint.restore(ckpt, one, jnp.float32)
  model.layers[0].attn.q_bias[...] = model.layers[0].attn.q_bias[...].at[0, 0].set(jnp.nan)
  before = {k: np.asarray(v) for k, v in checkpoint.flatten(nnx.state(model)).items()}
  m, after = _step_outputs(model, one, tc, batch)
  assert not np.isfinite(m.loss) and int(m.skipped) == 1
  for k in after:
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)  # no update applied


def test_lean_optimizers_step(step_case):
  """Adafactor, and AdamW with bfloat16 weights and first moments: one step, finite, parameters move."""
  ckpt, batch, tc = step_case
  one = sharding.make_mesh({}, jax.devices()[:1])
  for lean in (dataclasses.replace(tc, optimizer="adafactor"),
               dataclasses.replace(tc, param_dtype="bfloat16", moments_dtype="bfloat16", compute_dtype="bfloat16")):
    model = checkpoint.restore(ckpt, one, jnp.dtype(lean.param_dtype))
    before = {k: np.asarray(v, np.float32) for k, v in checkpoint.flatten(nnx.state(model)).items()}
    m, after = _step_outputs(model, one, lean, batch)
    assert np.isfinite(m.loss) and int(m.skipped) == 0
    assert not np.allclose(after["layers.0.mlp.experts_wi"].astype(np.float32), before["layers.0.mlp.experts_wi"])


def test_learning_rate_schedules():
  """Each --lr-schedule warms up linearly from 0 to lr, then: cosine (optax's warmup_cosine_decay) or linear decay
  to lr x min_lr_ratio at the last step, lr to the end, or wsd: lr until the last `decay` steps, then linear decay
  to lr x min_lr_ratio; a schedule's own flags elsewhere, or a decay past the steps after the warmup, are one line."""
  def made(**kw) -> training.TrainConfig:
    return training.TrainConfig(**{"steps": 50, "lr": 2.0, "warmup_steps": 10, "min_lr_ratio": 0.1, **kw}).validate()

  lr = {kind: [float(training.schedule(made(lr_schedule=kind, **({"decay_steps": 8} if kind == "wsd" else {})))(t))
               for t in range(51)] for kind in training.SCHEDULES}
  for kind, values in lr.items():
    np.testing.assert_allclose(values[:11], np.linspace(0, 2, 11), rtol=1e-6, err_msg=kind)
  cosine = optax.warmup_cosine_decay_schedule(0.0, 2.0, 10, 50, 0.2)
  np.testing.assert_allclose(lr["cosine"], [float(cosine(t)) for t in range(51)], rtol=1e-6)
  np.testing.assert_allclose(lr["linear"][10:], np.linspace(2, 0.2, 41), rtol=1e-6)
  np.testing.assert_allclose(lr["constant"][10:], 2.0)
  np.testing.assert_allclose(lr["wsd"][10:43], 2.0)
  np.testing.assert_allclose(lr["wsd"][42:], np.linspace(2, 0.2, 9), rtol=1e-6)
  assert made(lr_schedule="wsd").decay == 10  # (20% of steps)
  np.testing.assert_allclose(float(training.schedule(made(lr_schedule="linear", warmup_steps=0))(0)), 2.0)
  for kw, message in (({"decay_steps": 5}, "--decay-steps is the wsd schedule's decay"),
                      ({"lr_schedule": "wsd", "decay_steps": 0}, "--decay-steps must be in [1, 40]"),
                      ({"lr_schedule": "step"}, "--lr-schedule must be one of cosine, linear, constant, wsd")):
    with pytest.raises(UserError, match=re.escape(message)):
      made(**kw)


def test_serving_lora_adapters(base, lora_run, tmp_path):
  """LoRA runs served over their base (--lora-modules; here one of rank 4 on every target group and one of rank 2 on
  attention and experts): requests naming one as their model get what its merged weights give (log-probabilities
  within 1e-4, the same text), others (the base's name, or none) the base's, sent at once in any order, the same
  prompt under each (a kept row of one adapter's is not another's); replies name their model; /v1/models lists the
  adapters; another name is a 404. The CLI serves a batch file so; a folder that is no LoRA run is one line."""
  import concurrent.futures
  import urllib.request

  from qwen_moe_jax.openai_api import BadRequest
  from qwen_moe_jax.sampling import Sampling
  from qwen_moe_jax.server import make_server

  second = tmp_path / "lora2"
  res = train("--checkpoint", str(base / "ckpt"), "--data", str(base / "data.jsonl"), "--out", str(second),
              "--steps", "3", "--batch-size", "4", "--seq-len", "128", "--lr", "5e-2", "--save-every", "3",
              "--dtype", "float32", "--lora-rank", "2", "--lora-targets", "attention,experts")
  assert res.returncode == 0, res.stderr
  tok = load_tokenizer(base / "ckpt")
  eos = [tok.eos_token_id]
  prompt = tok.encode("add 3 and 4")
  want = {}
  for name, folder in (("a", lora_run), ("b", second), ("base", base / "ckpt")):
    out = Generator(checkpoint.restore(folder, dtype=jnp.float32)).generate([prompt], 8, Sampling(), stop_ids=eos)
    want[name] = (tok.decode(out.output_ids[0], skip_special_tokens=True), out.output_logprobs[0])
  assert len({text for text, _ in want.values()}) == 3  # (three models that answer differently)
  model, adapters = checkpoint.restore_with_adapters(base / "ckpt", {"a": lora_run, "b": second}, dtype=jnp.float32)
  server = make_server(Generator(model, batch_size=2), tok, name="base", host="127.0.0.1", port=0, rows=2, slots=128,
                       stop_ids=eos, sampling=Sampling(), seed=0, adapters=adapters)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  url = f"http://127.0.0.1:{server.server_address[1]}"

  def complete(model: str | None) -> tuple[int, dict]:
    body = {"prompt": prompt, "max_tokens": 8, "logprobs": 0} | ({"model": model} if model else {})
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode())
    try:
      with urllib.request.urlopen(request, timeout=300) as r:
        return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
      return e.code, json.loads(e.read())

  try:
    asked = ["a", None, "b", "a", "base", "b", "a"]
    with concurrent.futures.ThreadPoolExecutor(len(asked)) as pool:
      replies = list(pool.map(complete, asked))
    for model, (status, reply) in zip(asked, replies):
      text, logprobs = want[model or "base"]
      assert status == 200 and reply["model"] == (model or "base") and reply["choices"][0]["text"] == text, reply
      np.testing.assert_allclose(reply["choices"][0]["logprobs"]["token_logprobs"], logprobs, atol=1e-4)
    status, reply = complete("c")
    assert status == 404 and reply["error"]["param"] == "model" and "'a', 'b'" in reply["error"]["message"], reply
    with urllib.request.urlopen(url + "/v1/models") as r:
      listed = json.loads(r.read())["data"]
    assert [(m["id"], m["parent"]) for m in listed] == [("base", None), ("a", "base"), ("b", "base")]
  finally:
    server.shutdown()
    server.server_close()
  with pytest.raises(BadRequest):  # (the check a request's model gets)
    server.RequestHandlerClass.api.adapter({"model": "c"})
  given = tmp_path / "in.jsonl"
  given.write_text(json.dumps({"custom_id": "1", "method": "POST", "url": "/v1/completions", "body": {
    "prompt": prompt, "max_tokens": 8, "model": "b"}}) + "\n")
  cli = [sys.executable, "infer.py", "--checkpoint", str(base / "ckpt"), "--batch-file", str(given), "--dtype",
         "float32", "--batch-size", "2", "--max-model-len", "128"]
  run = subprocess.run([*cli, "--batch-output", str(tmp_path / "out.jsonl"), "--lora-modules", f"a={lora_run}",
                        f"b={second}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr
  [line] = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert line["response"]["body"]["choices"][0]["text"] == want["b"][0]
  bad = subprocess.run([*cli, "--batch-output", str(tmp_path / "o.jsonl"), "--lora-modules", f"a={base / 'ckpt'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and bad.stderr.strip() == (
    f"error: --lora-modules a={base / 'ckpt'}: not a LoRA run folder (train.py --lora-rank writes one, with "
    "lora.json)"), bad.stderr
  import infer as cli

  for specs in (["a"], ["=x"], ["a=x", "a=y"]):
    with pytest.raises(UserError, match="--lora-modules takes NAME=RUN_DIR, each NAME once"):
      cli.lora_modules(specs)
