"""Expert parallelism and sharding on 8 host CPU devices: same numbers as one device, any-mesh restores,
the rules table, and two processes forming one 8-device mesh."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from prometheus_client.parser import text_string_to_metric_families

from hf_models import make_model, save
from qwen_moe_jax import checkpoint, convert, decode_attention, kv_cache, layers, sharding
from qwen_moe_jax import model as model_module
from qwen_moe_jax.automaton import automaton
from qwen_moe_jax.config import QwenMoeConfig
from qwen_moe_jax.demo import build_tokenizer, write_hf_demo
from qwen_moe_jax.errors import UserError
from qwen_moe_jax.generate import Arrival, Generator, Room, Stream
from qwen_moe_jax.grammar import Grammars
from qwen_moe_jax.kernels import Kernels
from qwen_moe_jax.model import create_model, embed_lookup
from qwen_moe_jax.sampling import Sampling
from qwen_moe_jax.scoring import prompt_scores
from qwen_moe_jax.tokenizer import CHATML_TEMPLATE, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]


def mesh_of(spec: str | None) -> jax.sharding.Mesh:
  if spec is None:
    return sharding.make_mesh({}, jax.devices()[:1])
  n = int(np.prod([int(p.split("=")[1]) for p in spec.split(",")]))
  return sharding.make_mesh(spec, jax.devices()[:n])


def logits_on(model, mesh, ids):
  graphdef, params = nnx.split(model)

  @jax.jit
  def fn(params, x):
    m = nnx.merge(graphdef, params)
    return m.logits(m(x, jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape)).hidden)

  with jax.set_mesh(mesh):
    return np.asarray(fn(params, jnp.asarray(ids)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("shard")
  torch_model = make_model(seed=9, num_experts=12, num_experts_per_tok=3)  # 12 experts: expert=8 pads to 16
  save(torch_model, tmp / "hf")
  save(torch_model, tmp / "hf-fused", layout="fused")
  convert.import_hf(tmp / "hf", tmp / "ckpt", progress=False)
  ids = np.random.default_rng(0).integers(0, 101, (8, 10))
  model = checkpoint.restore(tmp / "ckpt", dtype=jnp.float32)
  reference = (logits_on(model, mesh_of(None), ids), Generator(model).generate(PROMPTS, 16).output_ids,
               Generator(model, batch_size=1).generate(SAMPLED, LIMITS, SETTINGS, seed=5).output_ids,
               Generator(model, batch_size=1).generate(FEW_SHOT, FEW_LIMITS, PENALIZED, seed=5).output_ids,
               prompt_scores(Generator(model, share_prefix=0), FEW_SHOT))
  return tmp / "ckpt", ids, reference


PENALIZED = Sampling(temperature=0.8, top_k=6, repetition_penalty=1.5)  # sampled, with per-row seen ids
SAMPLED = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[0]]  # a prompt sampled 3 times
SETTINGS = [PENALIZED, Sampling(0.8, top_p=0.9, frequency_penalty=1.0), Sampling(presence_penalty=0.5), PENALIZED,
            Sampling(1.0, min_p=0.1, repetition_penalty=1.2)]  # each row its own (the third greedy)
LIMITS = [16, 9, 12, 16, 5]  # the second prompt ends first: its row takes a sample of the first from a running row
HEAD = np.random.default_rng(1).integers(0, 101, 20).tolist()
FEW_SHOT = [HEAD + [1, 2], HEAD + [3, 4, 5, 6], PROMPTS[1], HEAD + [7]]  # prompts with a 20-id prefix in common
FEW_LIMITS = [16, 4, 8, 8]  # two rows: the second copies the first's prefix, ends, runs PROMPTS[1]; then the
# last copies it from the first, still running


@pytest.mark.parametrize("spec", ["expert=2", "expert=4", "expert=8", "data=2,expert=4", "expert=4,tensor=2",
                                  "fsdp=2,expert=2,tensor=2"])
def test_same_logits_and_tokens_on_every_mesh(ckpt, spec, monkeypatch):
  folder, ids, (ref_logits, ref_tokens, ref_penalized, ref_few_shot, ref_scores) = ckpt
  mesh = mesh_of(spec)
  model = checkpoint.restore(folder, mesh, jnp.float32)
  wi = model.layers[0].mlp.experts_wi[...]
  assert wi.shape[0] % mesh.shape["expert"] == 0 and wi.sharding.spec[0] == "expert"
  np.testing.assert_allclose(logits_on(model, mesh, ids), ref_logits, atol=1e-5)
  with monkeypatch.context() as m:  # as for long inputs: attention in blocks of 4 queries, MLPs of 4 tokens per device
    m.setattr(layers, "QUERY_BLOCK", 4)
    m.setattr(model_module, "MLP_TOKENS", 4)
    np.testing.assert_allclose(logits_on(model, mesh, ids), ref_logits, atol=1e-5)
  assert Generator(model, mesh).generate(PROMPTS, 16).output_ids == ref_tokens
  # one prompt per prefill call: rows written in place at a traced offset into a cache split over devices
  assert Generator(model, mesh, prefill_rows=1).generate(PROMPTS, 16).output_ids == ref_tokens
  # and two rows for the prompts in turn (continuous batching), each with its own sampling settings, a freed row
  # copying a running sample's cache; four rows: a repeated prompt run once for its rows in the first prefill,
  # then copied (reference: one prompt per row, nothing shared)
  queued = Generator(model, mesh, prefill_rows=1, batch_size=2).generate(SAMPLED, LIMITS, SETTINGS, seed=5)
  assert queued.output_ids == ref_penalized and queued.shared_tokens == len(PROMPTS[0]) - 1
  shared = Generator(model, mesh, batch_size=4).generate(SAMPLED, LIMITS, SETTINGS, seed=5)
  assert shared.output_ids == ref_penalized and shared.shared_tokens == 2 * len(PROMPTS[0]) - 1
  # a common prefix copied from a row that holds it: in the first prefill, then into a freed row
  few_shot = Generator(model, mesh, batch_size=2, share_prefix=16).generate(FEW_SHOT, FEW_LIMITS, PENALIZED, seed=5)
  assert few_shot.output_ids == ref_few_shot and few_shot.shared_tokens == 2 * len(HEAD)
  # scored, the prompts with the prefix run it once into a cache split over devices, their rests over copies
  for got, want in zip(prompt_scores(Generator(model, mesh, share_prefix=16), FEW_SHOT), ref_scores, strict=True):
    np.testing.assert_allclose(got.logprobs[1:], want.logprobs[1:], atol=1e-5)


def test_prefix_pool_on_a_mesh(ckpt):
  """On a data=2 x expert=4 mesh (the pool's rows split over the data axis as the cache's), a prompt continuing one
  whose row another prompt took copies what the row held from the prefix pool, with one device's tokens."""
  folder = ckpt[0]
  first, other = HEAD + [1, 2], PROMPTS[1]
  one = Generator(checkpoint.restore(folder, dtype=jnp.float32), share_prefix=0)
  follow_up = first + one.generate([first], 5).output_ids[0] + [7]
  prompts = [first, other, follow_up]
  model = checkpoint.restore(folder, mesh_of("data=2,expert=4"), jnp.float32)
  got = Generator(model, mesh_of("data=2,expert=4"), batch_size=1, share_prefix=16, prefix_pool=2).generate(prompts, 5)
  assert got.cached_tokens == [0, 0, len(first) + 5 - 1]
  assert got.output_ids == [one.generate([p], 5).output_ids[0] for p in prompts]


def test_arrivals_widen_the_sampling_steps_on_a_mesh(ckpt):
  """On a data=2 x expert=4 mesh, prompts arriving while a greedy prompt decodes bring sampling steps its programs
  lack (penalties, top-k, top-p, min-p): the state widens on the mesh and every prompt gets one device's tokens."""
  folder, _, (_, ref_tokens, ref_penalized, _, _) = ckpt
  mesh = mesh_of("data=2,expert=4")
  arriving = [[Arrival(p, m, s, Stream(5, i)) for i, (p, m, s) in enumerate(zip(SAMPLED, LIMITS, SETTINGS))]]
  got = Generator(checkpoint.restore(folder, mesh, jnp.float32), mesh, batch_size=2).generate(
    [PROMPTS[0]], 16, room=Room(rows=2, slots=64, max_new=16), arrivals=lambda: arriving.pop() if arriving else [])
  assert got.output_ids == ref_tokens[:1] + ref_penalized and got.left == []


def test_grammar_rows_on_a_mesh(ckpt):
  """Rows under a grammar (sampled, queued for 2 rows, a prompt's samples sharing its prefill) draw the same ids
  on an 8-device mesh as on one device, and follow it: an even id under 50, then one to three ids in [60, 70),
  then the stop id."""
  folder = ckpt[0]
  transitions = {0: dict.fromkeys(range(0, 50, 2), 1), **{s: dict.fromkeys(range(60, 70), s + 1) for s in (1, 2, 3)}}
  grammar = automaton(transitions, 0, [2, 3, 4], vocab=101, ignore=-1, source="hand")
  settings = [Sampling(temperature=1.0, grammar=grammar)] * 3 + [Sampling()]
  prompts, stop = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[2]], [7]
  one = Generator(checkpoint.restore(folder, dtype=jnp.float32), batch_size=2).generate(prompts, 8, settings, 5, stop)
  mesh = mesh_of("data=2,expert=4")
  got = Generator(checkpoint.restore(folder, mesh, jnp.float32), mesh, batch_size=2).generate(prompts, 8, settings,
                                                                                              5, stop)
  assert got.output_ids == one.output_ids
  for ids in one.output_ids[:3]:
    assert ids[0] % 2 == 0 and ids[0] < 50 and ids[-1] == 7 and 2 <= len(ids) - 1 <= 4
    assert all(60 <= t < 70 for t in ids[1:-1])


@pytest.mark.parametrize("spec", ["expert=8", "fsdp=2,expert=2,tensor=2", "data=2,expert=4"])
def test_int8_experts_on_every_mesh(ckpt, spec):
  """--expert-dtype int8: the routed experts restored as int8 with float32 scales laid out like them (12 experts
  padded to 16 on expert=8; wo's scales split over fsdp like its model dim) give the one-device int8 logits and
  tokens, within the quantization error of the float model's logits."""
  folder, ids, (ref_logits, *_) = ckpt
  int8 = Kernels(expert_dtype="int8")
  one = checkpoint.restore(folder, dtype=jnp.float32, kernels=int8)
  mesh = mesh_of(spec)
  model = checkpoint.restore(folder, mesh, jnp.float32, kernels=int8)
  mlp = model.layers[0].mlp
  wi, wo, wi_scale, wo_scale = (x[...] for x in (mlp.experts_wi, mlp.experts_wo, mlp.experts_wi_scale,
                                                 mlp.experts_wo_scale))
  assert wi.dtype == wo.dtype == jnp.int8 and wi_scale.dtype == wo_scale.dtype == jnp.float32
  assert wi_scale.sharding.spec[0] == wi.sharding.spec[0] and wo_scale.sharding.spec[1:2] == wo.sharding.spec[2:3]
  want = logits_on(one, mesh_of(None), ids)
  np.testing.assert_allclose(logits_on(model, mesh, ids), want, atol=1e-5)
  logp, ref_logp = jax.nn.log_softmax(want), jax.nn.log_softmax(ref_logits)
  assert 0 < np.abs(want - ref_logits).max() < 0.01 * np.abs(ref_logits).max()  # quantized, but close
  assert np.mean(np.sum(np.exp(ref_logp) * (ref_logp - logp), axis=-1)) < 1e-4
  assert Generator(model, mesh).generate(PROMPTS, 16).output_ids == Generator(one).generate(PROMPTS, 16).output_ids


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_kept_cache_turns_on_a_mesh(ckpt, kv_cache_dtype):
  """Conversation turns over a kept KV cache split over devices (kv heads, int8 scales too; grown on the way)
  give the one-device fresh tokens."""
  folder = ckpt[0]
  one = Generator(checkpoint.restore(folder, dtype=jnp.float32), kv_cache_dtype=kv_cache_dtype)
  mesh = mesh_of("fsdp=2,expert=2,tensor=2")
  chat = Generator(checkpoint.restore(folder, mesh, jnp.float32), mesh, kv_cache_dtype=kv_cache_dtype,
                   share_prefix=16)
  prompt = list(range(1, 21))
  for extra in ([], [4] * 30):
    prompt = prompt + extra
    got = chat.generate([prompt], 8, PENALIZED, seed=1, keep=True)
    assert got.output_ids == one.generate([prompt], 8, PENALIZED, seed=1).output_ids
    prompt = prompt + got.output_ids[0]
  assert got.cached_tokens[0] > 0
  if kv_cache_dtype == "int8":
    cache = chat._kept[0].cache
    assert cache.k[0].dtype == jnp.int8 and tuple(cache.k_scale[0].sharding.spec) == tuple(cache.k[0].sharding.spec)[:3]


def test_save_on_one_mesh_restore_on_others(tmp_path):
  cfg = QwenMoeConfig(vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24, decoder_sparse_step=1)
  (tmp_path / "ckpt").mkdir()
  (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
  model = create_model(cfg, mesh_of("fsdp=2,expert=4"), jnp.float32, seed=3)  # 6 experts padded to 8
  assert model.layers[0].mlp.experts_wi[...].shape[0] == 8
  checkpoint.save_params(tmp_path / "ckpt" / checkpoint.PARAMS_DIR, model)
  saved = checkpoint.unpadded(cfg, checkpoint.flatten(nnx.state(model)))
  assert checkpoint.stored_shapes(checkpoint.locate(tmp_path / "ckpt"))["layers.0.mlp.experts_wi"][0][0] == 6
  for spec in (None, "expert=2", "expert=8", "data=2,tensor=4"):
    restored = checkpoint.restore(tmp_path / "ckpt", mesh_of(spec), jnp.float32)
    flat = checkpoint.unpadded(cfg, checkpoint.flatten(nnx.state(restored)))
    for k, v in saved.items():
      np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(v), err_msg=f"{spec}: {k}")


def test_restore_into_other_config_names_the_parameter(ckpt):
  folder = ckpt[0]
  other = dataclasses.replace(checkpoint.load_config(folder), moe_intermediate_size=24)
  with pytest.raises(UserError, match=r"layers\.0\.mlp\.experts_wi.* shape \(12, 48, 2, 20\).*\(12, 48, 2, 24\)"):
    checkpoint.restore(folder, cfg=other)


def test_rules_and_mesh_errors():
  mesh = mesh_of("expert=4,tensor=2")
  assert sharding.spec_for(("expert", "embed", None, "moe_mlp"), (8, 16, 2, 6), mesh) == \
      jax.sharding.PartitionSpec("expert", None, None, "tensor")
  assert sharding.spec_for(("kv_heads", None), (3, 8), mesh) == jax.sharding.PartitionSpec(None, None)  # 3 % 2
  with pytest.raises(ValueError, match="both map to mesh axis 'tensor'"):
    sharding.spec_for(("q_heads", "mlp"), (4, 4), mesh)
  for bad, msg in [("expert=3", "uses 3 devices, but 8"), ("model=8", "axis one of"), ("expert=x", "integer"),
                   ("expert=8,expert=1", "twice"), ("expert=0", ">= 1")]:
    with pytest.raises(UserError, match=msg):
      sharding.make_mesh(bad)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launched(script: str, args: list[str], outputs: list[tuple]) -> list[subprocess.Popen]:
  """`script` with `args` as processes 0 and 1 of 2 (4 CPU devices each), process i writing to outputs[i]
  (stdout, stderr)."""
  port = _free_port()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  return [subprocess.Popen([sys.executable, script, *args, "--coordinator", f"localhost:{port}",
                            "--num-processes", "2", "--process-id", str(i)],
                           cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
          for i, (out, err) in enumerate(outputs)]


@contextlib.contextmanager
def _logged(script: str, args: list[str], tmp_path: Path):
  """`script` as processes 0 and 1 of 2, each writing to tmp_path/process-<i>.log: yields (processes, log paths);
  kills both on the way out."""
  logs = [tmp_path / f"process-{i}.log" for i in range(2)]
  files = [open(log, "w") for log in logs]
  procs = _launched(script, args, [(f, f) for f in files])
  try:
    yield procs, logs
  finally:
    for p, f in zip(procs, files):
      p.kill()
      f.close()


def _write_id_lines(path: Path) -> None:
  """16 training lines of 12 token ids each."""
  path.write_text("".join(json.dumps({"input_ids": [(i * 7 + j) % 101 for j in range(12)]}) + "\n" for i in range(16)))


def _two_processes(script: str, args: list[str], timeout: int = 300) -> list[subprocess.CompletedProcess]:
  procs = _launched(script, args, [(subprocess.PIPE, subprocess.PIPE)] * 2)
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      p.kill()
  return [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def _trained_both_ways(args: list[str], tmp_path: Path) -> list[tuple[dict, dict]]:
  """train.py with `args` on 2 processes and on one: their metrics.jsonl records, step by step."""
  results = _two_processes("train.py", args + ["--out", str(tmp_path / "multi")])
  for r in results:
    assert r.returncode == 0, r.stderr[-2000:]
  single = subprocess.run([sys.executable, "train.py", *args, "--out", str(tmp_path / "single")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert single.returncode == 0, single.stderr
  read = lambda run: [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
  return list(zip(read(tmp_path / "multi"), read(tmp_path / "single"), strict=True))


@pytest.mark.parametrize("source,mesh", [("ckpt", "data=2,expert=4"), ("hf", "expert=8"), ("hf-fused", "expert=8")])
def test_two_processes_form_one_mesh(ckpt, tmp_path, source, mesh):
  """2 processes x 4 CPU devices: infer.py gives the single-process numbers (of the converted checkpoint), also
  reading an HF folder in place (per-expert or fused expert tensors) with the experts split across the processes
  (each reads the experts it holds: 0-7, and 8-11 with the padding)."""
  args = ["--input-ids", "1,2,3,4,5", "--max-new-tokens", "12", "--dtype", "float32", "--json", "--prompt-logprobs",
          "--mesh", mesh, "--dump-logits"]
  results = _two_processes("infer.py", ["--checkpoint", str(ckpt[0].parent / source), *args,
                                        str(tmp_path / "multi.npy")])
  for r in results:
    assert r.returncode == 0, r.stderr[-2000:]
  single = subprocess.run([sys.executable, "infer.py", "--checkpoint", str(ckpt[0]), *args,
                           str(tmp_path / "single.npy")], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert single.returncode == 0, single.stderr
  json_lines = lambda out: [json.loads(x) for x in out.splitlines() if x.startswith("{")]  # noqa: E731 (gloo logs)
  (multi,), (one,), rest = json_lines(results[0].stdout), json_lines(single.stdout), json_lines(results[1].stdout)
  np.testing.assert_allclose(multi.pop("prompt_logprobs")[1:], one.pop("prompt_logprobs")[1:], atol=1e-5)
  assert multi == one and rest == []
  np.testing.assert_allclose(np.load(tmp_path / "multi.npy"), np.load(tmp_path / "single.npy"), atol=1e-5)


@pytest.mark.parametrize("lora", [[], ["--lora-rank", "4"]], ids=["full", "lora"])
def test_two_processes_train_like_one(ckpt, tmp_path, lora):
  """2 processes train (all weights, or LoRA adapters: lora.json written by one, read by both) as one does."""
  folder = ckpt[0]
  data = tmp_path / "data.jsonl"
  _write_id_lines(data)
  args = ["--checkpoint", str(folder), "--data", str(data), "--steps", "3", "--batch-size", "4", "--seq-len", "32",
          "--dtype", "float32", "--mesh", "data=2,expert=4", "--save-every", "3", *lora]
  for a, b in _trained_both_ways(args, tmp_path):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)


def test_two_processes_stop_together_on_sigterm(ckpt, tmp_path):
  """SIGTERM to one of 2 training processes: both save the same step (jax's preemption sync point) and exit 143;
  the same command on both resumes from it to one process's uninterrupted losses."""
  data = tmp_path / "data.jsonl"
  _write_id_lines(data)
  args = ["--checkpoint", str(ckpt[0]), "--data", str(data), "--steps", "40", "--batch-size", "4", "--seq-len", "32",
          "--dtype", "float32", "--mesh", "data=2,expert=4", "--save-every", "40", "--out", str(tmp_path / "multi")]
  metrics = tmp_path / "multi" / "metrics.jsonl"
  with _logged("train.py", args, tmp_path) as (procs, logs):
    deadline = time.monotonic() + 600
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
      time.sleep(0.05)
    procs[1].terminate()
    assert [p.wait(timeout=300) for p in procs] == [143, 143], [log.read_text()[-3000:] for log in logs]
  step = len(metrics.read_text().splitlines())
  assert step < 40 and (tmp_path / "multi" / "checkpoints" / str(step)).is_dir()
  assert all(f"stopped by SIGTERM: step {step} saved" in log.read_text() for log in logs)
  for a, b in _trained_both_ways(args[:-2], tmp_path):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)


def _chat_checkpoint(tmp_path: Path) -> None:
  """tmp_path/ckpt: a tiny model learnable in a few steps, with a byte-level BPE tokenizer and a ChatML template."""
  tok = build_tokenizer(vocab_size=300)
  save(make_model(seed=4, vocab_size=320, std=0.05), tmp_path / "hf")
  tok.save(str(tmp_path / "hf" / "tokenizer.json"))
  (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML_TEMPLATE,
                                                                      "eos_token": "<|im_end|>"}))
  convert.import_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)


REWARD_LOGGED = """import jax
from pathlib import Path


def low(completion_ids, **kwargs):  # each call's number of completions, in calls-<processes>-<process>.txt
  with open(Path(__file__).parent / f"calls-{jax.process_count()}-{jax.process_index()}.txt", "a") as f:
    f.write(f"{len(completion_ids)}\\n")
  return [sum(i < 150 for i in c) / len(c) for c in completion_ids]
"""


@pytest.mark.parametrize("kind", ["grpo", "dpo"])
def test_two_processes_grpo_and_dpo_like_one(tmp_path, kind):
  """2 processes run GRPO (LoRA, with the KL penalty, a generation trained 3 times, sampled at temperature 0.8 with
  top-k and top-p: each samples the same
  completions, scores its half of them with the reward function and gathers the other's, has their old
  log-probabilities and takes the same steps) and DPO (full: the reference log-probabilities on every process) as
  one does."""
  _chat_checkpoint(tmp_path)
  data = tmp_path / "data.jsonl"
  args = ["--checkpoint", str(tmp_path / "ckpt"), "--data", str(data), "--steps", "3", "--batch-size", "8",
          "--seq-len", "48", "--lr", "1e-2", "--warmup-steps", "1", "--dtype", "float32", "--mesh", "data=2,expert=4",
          "--save-every", "3"]
  if kind == "grpo":
    data.write_text("".join(json.dumps({"prompt": f"count to {i}"}) + "\n" for i in range(6)))
    (tmp_path / "rewards.py").write_text(REWARD_LOGGED)
    args += ["--lora-rank", "4", "--grpo-reward", f"{tmp_path / 'rewards.py'}:low", "--grpo-group", "4",
             "--grpo-max-new", "12", "--grpo-beta", "0.1", "--grpo-iterations", "3", "--grpo-temperature", "0.8",
             "--grpo-top-k", "40", "--grpo-top-p", "0.95"]
  else:
    data.write_text("".join(json.dumps({"prompt": f"count to {i}", "chosen": " one two", "rejected": " no"}) + "\n"
                            for i in range(12)))
    args += ["--dpo-beta", "0.5"]
  for a, b in _trained_both_ways(args, tmp_path):
    if kind == "grpo":
      assert (a["reward"], a["completion_tokens"]) == (b["reward"], b["completion_tokens"])
      np.testing.assert_allclose([a["kl"], a["clip_ratio"]], [b["kl"], b["clip_ratio"]], rtol=1e-5, atol=1e-7)
    else:
      np.testing.assert_allclose(a["reward_margin"], b["reward_margin"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
  if kind == "grpo":  # one generation of 8 completions: each judged once
    calls = {f.stem: f.read_text().split() for f in tmp_path.glob("calls-*.txt")}
    assert calls == {"calls-2-0": ["4"], "calls-2-1": ["4"], "calls-1-0": ["8"]}


def test_two_processes_reward_function_failing_on_one(tmp_path):
  """A reward function raising on one process of two: that process stops with its traceback, the other with one
  line naming it (neither waits for the other's share)."""
  (tmp_path / "rewards.py").write_text("import jax\n\n\ndef judge(completion_ids, **kwargs):\n"
                                       "  if jax.process_index() == 1:\n"
                                       "    raise ConnectionError('judge unreachable')\n"
                                       "  return [0.0] * len(completion_ids)\n")
  (tmp_path / "data.jsonl").write_text("".join(json.dumps({"prompt": f"count to {i}"}) + "\n" for i in range(4)))
  _chat_checkpoint(tmp_path)
  first, second = _two_processes("train.py", [
    "--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "run"),
    "--steps", "1", "--batch-size", "8", "--seq-len", "48", "--dtype", "float32", "--mesh", "data=2,expert=4",
    "--grpo-reward", f"{tmp_path / 'rewards.py'}:judge", "--grpo-group", "4", "--grpo-max-new", "8"])
  assert first.returncode == 2 and first.stderr.strip().splitlines()[-1] == (
    "error: the reward functions failed on process 1 (its output has the error)"), first.stderr[-2000:]
  assert second.returncode == 1 and "ConnectionError: judge unreachable" in second.stderr, second.stderr[-2000:]


def _post(url: str, body: dict) -> dict:
  request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(request, timeout=300) as r:
    return json.loads(r.read()) if not body.get("stream") else r.read().decode()


def _aborted(url: str) -> float:
  """The server's count of jobs ended because their clients left (its /metrics)."""
  text = urllib.request.urlopen(url + "/metrics").read().decode()
  return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
             if s.name.endswith("request_success_total") and s.labels["finished_reason"] == "abort")


def _serving_url(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 600) -> str:
  """The URL process 0 prints once it serves (each process alive meanwhile)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    line = next((x for x in logs[0].read_text().splitlines() if x.startswith("serving ")), None)
    if line:
      return line.split()[3]
    for p, log in zip(procs, logs):
      assert p.poll() is None, log.read_text()[-3000:]
    time.sleep(0.5)
  raise AssertionError(f"no server after {timeout} s: {logs[0].read_text()[-3000:]}")


def test_two_processes_serve_like_one(tmp_path):
  """`infer.py --serve` over 2 processes x 4 CPU devices (data=2 x expert=4): process 0 answers HTTP and process 1
  runs the same engine from process 0's messages. Requests at once (more than the 2 rows: they queue and join the
  running call as rows free), greedy and seeded samples, stop strings, structured output, a streamed chat, a scored
  prompt give what one process's engine gives; a client leaving mid-reply ends its job on both (the next request
  is answered as alone); SIGTERM to the follower (a scheduler stopping it) asks process 0 to stop: a stream under
  way ends in full (--shutdown-timeout), then both end cleanly. `--interactive` over 2 processes is one line."""
  write_hf_demo(tmp_path / "hf")
  convert.import_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
  tok = load_tokenizer(tmp_path / "ckpt")
  eos = [tok.eos_token_id]
  reference = Generator(checkpoint.restore(tmp_path / "ckpt", dtype=jnp.float32))

  def expected(ids, n, sampling=Sampling(), stream=Stream(0, 0)) -> str:
    return tok.decode(reference.generate([ids], n, sampling, seed=[stream], stop_ids=eos).output_ids[0],
                      skip_special_tokens=True)

  greedy_text = expected(tok.encode("the cat"), 40)
  stop = greedy_text[12:15]  # a stop string the greedy reply to "the cat" holds
  chat = [{"role": "user", "content": "yes or no?"}]
  choices = ["yes", "no", "maybe so"]
  grammar = Grammars(tok).choice(choices, "choice")
  want = {
    "greedy": expected([3, 4, 5], 40),
    "sampled": expected([7, 8, 9, 10], 30, Sampling(temperature=0.9), Stream(11, 0)),
    "stop": greedy_text[:greedy_text.find(stop)],
    "choice": expected(tok.apply_chat_template(chat, add_generation_prompt=True), 20, Sampling(grammar=grammar)),
    "streamed": expected(tok.apply_chat_template(chat, add_generation_prompt=True), 25),
    "after": expected([9, 9, 8], 20),
    "drained": expected([2, 3], 300),
  }
  scores = prompt_scores(reference, [[5, 6, 7, 8, 0]])[0]

  serve = ["--checkpoint", str(tmp_path / "ckpt"), "--serve", "127.0.0.1:0", "--dtype", "float32", "--mesh",
           "data=2,expert=4", "--batch-size", "2", "--max-model-len", "512", "--temperature", "0", "--compile-cache",
           "off", "--shutdown-timeout", "60"]
  with _logged("infer.py", serve, tmp_path) as (procs, logs):
    url = _serving_url(procs, logs)
    requests = {
      "greedy": ("/v1/completions", {"prompt": [3, 4, 5], "max_tokens": 40}),
      "sampled": ("/v1/completions", {"prompt": [7, 8, 9, 10], "max_tokens": 30, "temperature": 0.9, "seed": 11}),
      "stop": ("/v1/completions", {"prompt": "the cat", "max_tokens": 40, "stop": [stop]}),
      "choice": ("/v1/chat/completions", {"messages": chat, "max_tokens": 20, "guided_choice": choices}),
      "streamed": ("/v1/chat/completions", {"messages": chat, "max_tokens": 25, "stream": True}),
      "scored": ("/v1/completions", {"prompt": [5, 6, 7, 8], "max_tokens": 0, "echo": True, "logprobs": 0}),
    }
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
      replies = dict(zip(requests, pool.map(lambda r: _post(url + r[0], r[1]), requests.values())))
    texts = {k: r["choices"][0]["text"] for k, r in replies.items() if k in ("greedy", "sampled", "stop")}
    texts["choice"] = replies["choice"]["choices"][0]["message"]["content"]
    events = [json.loads(x.removeprefix("data: ")) for x in replies["streamed"].split("\n\n") if x[6:7] == "{"]
    texts["streamed"] = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert replies["stop"]["choices"][0]["finish_reason"] == "stop" and texts["choice"] in choices
    np.testing.assert_allclose(replies["scored"]["choices"][0]["logprobs"]["token_logprobs"][1:],
                               scores.logprobs[1:4], atol=1e-5)

    body = json.dumps({"prompt": [5, 6, 7], "max_tokens": 500}).encode()
    with socket.create_connection(tuple(url.removeprefix("http://").split(":"))) as client:  # leaves mid-reply
      client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
      time.sleep(0.3)
    deadline = time.monotonic() + 60
    while _aborted(url) < 1:
      assert time.monotonic() < deadline, "the job whose client left did not end"
      time.sleep(0.2)
    texts["after"] = _post(url + "/v1/completions", {"prompt": [9, 9, 8], "max_tokens": 20})["choices"][0]["text"]
    connection = http.client.HTTPConnection(*url.removeprefix("http://").split(":"), timeout=300)
    connection.request("POST", "/v1/completions", json.dumps({"prompt": [2, 3], "max_tokens": 300, "stream": True}))
    reply = connection.getresponse()
    streamed = reply.readline()  # its first event: under way
    procs[1].terminate()
    streamed += reply.read()
    events = [json.loads(x[6:]) for x in streamed.decode().split("\n\n") if x[6:7] == "{"]
    texts["drained"] = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert texts == want
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [0, 0], [log.read_text()[-3000:] for log in logs]
    lines = logs[0].read_text().splitlines()
    assert "process 1 asked to stop the server" in lines
    assert "stopping: new requests get 503; waiting up to 60 s for the 1 under way" in lines
  for r in _two_processes("infer.py", ["--checkpoint", str(tmp_path / "ckpt"), "--interactive"]):
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
      "error: --interactive needs a single process (--serve serves from several)"), r.stderr[-2000:]


def test_two_processes_run_a_batch_file(tmp_path):
  """`infer.py --batch-file` over 2 processes x 4 CPU devices: process 0 reads the file and writes the results,
  process 1 runs the same engine; the replies are one process's engine's, and both end cleanly."""
  write_hf_demo(tmp_path / "hf")
  convert.import_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
  tok = load_tokenizer(tmp_path / "ckpt")
  reference = Generator(checkpoint.restore(tmp_path / "ckpt", dtype=jnp.float32))
  bodies = [{"prompt": [3, 4, 5], "max_tokens": 30}, {"prompt": [7, 8], "max_tokens": 20, "temperature": 0.9,
                                                       "seed": 11}, {"prompt": [9], "max_tokens": 25}]
  want = [tok.decode(reference.generate([b["prompt"]], b["max_tokens"], Sampling(b.get("temperature", 0.0)),
                                        seed=[Stream(b.get("seed", 0), 0)], stop_ids=[tok.eos_token_id]).output_ids[0],
                     skip_special_tokens=True) for b in bodies]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps({"custom_id": str(i), "method": "POST", "url":
                                                         "/v1/completions", "body": b}) + "\n"
                                             for i, b in enumerate(bodies)))
  runs = _two_processes("infer.py", ["--checkpoint", str(tmp_path / "ckpt"), "--batch-file",
                                     str(tmp_path / "in.jsonl"), "--batch-output", str(tmp_path / "out.jsonl"),
                                     "--dtype", "float32", "--mesh", "data=2,expert=4", "--batch-size", "2",
                                     "--max-model-len", "128", "--temperature", "0", "--compile-cache", "off"])
  assert [r.returncode for r in runs] == [0, 0], [r.stderr[-3000:] for r in runs]
  lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert [x["response"]["body"]["choices"][0]["text"] for x in lines] == want


@pytest.mark.parametrize("spec", ["fsdp=2,tensor=4", "data=2,fsdp=2,tensor=2", "expert=2,tensor=2,fsdp=2"])
@pytest.mark.parametrize("rows", [4, 1])
def test_embedding_lookup_and_its_gradient_on_split_tables(spec, rows):
  """The shard_map lookup (vocabulary over tensor, model dim over fsdp) equals jnp.take, ids at every shard edge;
  one row (a batch the mesh cannot split) too."""
  rng = np.random.default_rng(3)
  table = jnp.asarray(rng.normal(size=(64, 12)), jnp.float32)  # [V, D]
  tokens = np.concatenate([[0, 7, 8, 15, 16, 31, 32, 63], rng.integers(0, 64, 24)]).reshape(rows, 32 // rows)
  tokens = jnp.asarray(tokens)
  weights = jnp.asarray(rng.normal(size=(*tokens.shape, 12)), jnp.float32)
  mesh = mesh_of(spec)

  def loss(lookup, table):
    return jnp.sum(lookup(table, tokens) * weights)

  with jax.set_mesh(mesh):
    table_sharded = jax.device_put(table, jax.sharding.NamedSharding(
      mesh, sharding.spec_for(("vocab", "embed"), table.shape, mesh)))
    got = jax.jit(embed_lookup)(table_sharded, tokens)
    grad = jax.jit(jax.grad(lambda t: loss(embed_lookup, t)))(table_sharded)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.take(table, tokens, axis=0)))
  np.testing.assert_allclose(np.asarray(grad), np.asarray(jax.grad(lambda t: loss(
    lambda a, b: jnp.take(a, b, axis=0), t))(table)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec", ["data=2,tensor=2", "fsdp=2,tensor=4"])
def test_splash_attention_on_a_mesh(spec):
  """Splash attention in its shard_map gives the one-device outputs and gradients: rows and heads split (q and
  kv heads alike on tensor=2), or rows only (2 kv heads on tensor=4: each tensor device computes every head)."""
  rng = np.random.default_rng(3)
  b, t, n, kv, h = 4, 128, 4, 2, 8
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, heads, h)), jnp.float32) for heads in (n, kv, kv))
  segments = jnp.asarray(np.repeat([[1, 2, 0]], b, 0).repeat([60, 50, 18], 1), jnp.int32)
  positions = jnp.asarray(np.r_[np.arange(60), np.arange(50), np.arange(18)][None].repeat(b, 0), jnp.int32)
  mask = layers.Mask.self_attention(positions, segments)
  weights = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
  grad = lambda fn: jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, mask) * weights), (0, 1, 2))  # noqa: E731
  with jax.set_mesh(mesh_of(spec)):
    got, got_grads = jax.jit(layers.attend_splash)(q, k, v, mask), jax.jit(grad(layers.attend_splash))(q, k, v)
  np.testing.assert_allclose(got, layers.attend(q, k, v, mask), rtol=1e-5, atol=1e-5)
  for a, e in zip(got_grads, grad(layers.attend)(q, k, v), strict=True):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", ["data=2,tensor=2", "fsdp=2,tensor=4", "expert=8"])
@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int8"])
def test_pallas_decode_attention_on_a_mesh(spec, quantized):
  """The decode kernel in its shard_map gives the einsum's outputs: rows and heads split (tensor=2), rows only
  (2 kv heads on tensor=4), rows over the expert axis; float and int8 caches."""
  rng = np.random.default_rng(4)
  b, n, kv, s, h = 8, 4, 2, 128, 8
  q = jnp.asarray(rng.normal(size=(b, n, h)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(b, kv, s, h)), jnp.float32) for _ in range(2))
  scales = None
  if quantized:
    (k, k_scale), (v, v_scale) = kv_cache.quantize(k), kv_cache.quantize(v)
    scales = (k_scale, v_scale)
  positions = jnp.asarray(rng.integers(0, s, b), jnp.int32)
  with jax.set_mesh(mesh_of(spec)):
    got = jax.jit(decode_attention.attend)(q, k, v, positions + 1, scales)
  want = layers.attend(q[:, None], k, v, layers.Mask.over_cache(positions[:, None], s), scales=scales,
                       kv_layout="BKSH")[:, 0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
