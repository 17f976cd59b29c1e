"""infer.py and the generation engine against transformers' generate (fp32, greedy), end to end."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hf_models import make_model, save
from qwen_moe_jax import (
  checkpoint,
  convert,
  decode_attention,
  decoding,
  generate,
  kv_cache,
  layers,
  prefixes,
  sampling,
  scoring,
  sharding,
)
from qwen_moe_jax.config import PRESETS
from qwen_moe_jax.demo import demo_config, demo_model, write_hf_demo
from qwen_moe_jax.errors import UserError
from qwen_moe_jax.generate import Arrival, Generator, Piece, Room, Stream, cache_bucket
from qwen_moe_jax.grammar import Grammars
from qwen_moe_jax.kernels import Kernels
from qwen_moe_jax.kv_cache import KVCache
from qwen_moe_jax.model import abstract_model, create_model
from qwen_moe_jax.prefixes import Pool, PrefixIndex
from qwen_moe_jax.sampling import RowSampling, Sampling, SamplingOps
from qwen_moe_jax.scoring import prompt_logits, prompt_scores
from qwen_moe_jax.stop_strings import StopStrings
from qwen_moe_jax.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def random_config(seed: int) -> dict:
  """A qwen2_moe config drawn at random: sizes and options the code was not written against."""
  rng = np.random.default_rng(seed)
  kv = int(rng.choice([1, 2, 3]))
  heads = kv * int(rng.choice([1, 2, 3]))
  head_dim = int(rng.choice([4, 6, 8]))
  layers = int(rng.integers(2, 5))
  experts = int(rng.integers(3, 13))
  return dict(
    vocab_size=int(rng.integers(64, 200)), hidden_size=heads * head_dim, num_attention_heads=heads,
    num_key_value_heads=kv, num_hidden_layers=layers, intermediate_size=int(rng.integers(8, 40)),
    moe_intermediate_size=int(rng.integers(4, 24)), shared_expert_intermediate_size=int(rng.integers(4, 40)),
    num_experts=experts, num_experts_per_tok=int(rng.integers(1, min(experts, 5) + 1)),
    norm_topk_prob=bool(rng.integers(2)), decoder_sparse_step=int(rng.choice([1, 1, 2])),
    mlp_only_layers=[int(i) for i in rng.choice(layers, int(rng.integers(0, 2)), replace=False)],
    qkv_bias=bool(rng.integers(2)), rope_theta=float(rng.choice([1e4, 1e6])),
  )


def infer(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "infer.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env=env)


def hf_greedy(hf_model, prompt: list[int], n: int, repetition_penalty: float = 1.0, logits_processor=()) -> list[int]:
  ids = torch.tensor([prompt])  # the explicit mask: generate would take a token 0 in the prompt for padding
  with torch.no_grad():
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, eos_token_id=None, pad_token_id=0,
                            repetition_penalty=repetition_penalty, logits_processor=list(logits_processor))
  return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("seed,layout,style", [(101, "hub", "v4"), (202, "fused", "v5")])
def test_cli_matches_transformers(seed, layout, style, tmp_path):
  hf_model = make_model(seed=seed, **random_config(seed))
  save(hf_model, tmp_path / "hf", layout=layout, style=style, shard=seed % 2 == 0)
  convert.import_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
  prompt = np.random.default_rng(seed).integers(0, hf_model.config.vocab_size, 9).tolist()
  res = infer("--checkpoint", str(tmp_path / "ckpt"), "--input-ids", ",".join(map(str, prompt)),
              "--dtype", "float32", "--temperature", "0", "--max-new-tokens", "40", "--json", "--logprobs",
              "--dump-logits", str(tmp_path / "logits.npy"))
  assert res.returncode == 0, res.stderr
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert out["input_ids"] == prompt
  assert out["output_ids"] == hf_greedy(hf_model, prompt, 40)
  with torch.no_grad():  # each new token's log-probability under transformers' next-token distribution
    whole = torch.log_softmax(hf_model(torch.tensor([prompt + out["output_ids"]])).logits[0], -1).numpy()
  want = [whole[len(prompt) - 1 + i, t] for i, t in enumerate(out["output_ids"])]
  np.testing.assert_allclose(out["output_logprobs"], want, atol=1e-4)
  with torch.no_grad():
    ref = hf_model(torch.tensor([prompt])).logits[0].numpy()
  logits = np.load(tmp_path / "logits.npy")
  assert logits.shape == ref.shape and logits.dtype == np.float32
  np.testing.assert_allclose(logits, ref, atol=2e-5 * np.abs(ref).max())
  assert "generated tokens: 40" in res.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("tiny")
  hf_model = make_model(seed=9, num_experts=11, num_experts_per_tok=3)
  save(hf_model, tmp / "hf")
  convert.import_hf(tmp / "hf", tmp / "ckpt", progress=False)
  model = checkpoint.restore(tmp / "ckpt", dtype=jnp.float32)
  return hf_model, model, Generator(model), tmp / "ckpt"


PROMPTS = [[5, 7, 9, 11], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8], [42]]


def test_batch_rows_equal_alone_and_transformers(tiny):
  hf_model, _, gen, _ = tiny
  batch = gen.generate(PROMPTS, 36).output_ids
  for prompt, row in zip(PROMPTS, batch):
    assert row == gen.generate([prompt], 36).output_ids[0]
    assert row == hf_greedy(hf_model, prompt, 36)


def test_prefill_in_row_groups_equals_one_prefill(tiny):
  """Prompts prefilled a few rows at a time into one shared cache give what a single prefill gives."""
  _, model, gen, _ = tiny
  prompts = PROMPTS + [[8, 8, 2], [1, 2, 3, 4, 5, 6, 7]]  # 5 prompts: 6 rows, the last group half padding
  grouped = Generator(model, prefill_rows=2)
  assert grouped.generate(prompts, 20).output_ids == gen.generate(prompts, 20).output_ids
  s = Sampling(temperature=1.0, top_k=5)
  assert grouped.generate(prompts, 20, s, seed=4).output_ids == gen.generate(prompts, 20, s, seed=4).output_ids


def test_continuous_batching_equals_one_batch(tiny):
  """More prompts than rows: each waits for a row to finish and is prefilled into it (over the keys and values
  the previous prompt left). Every prompt gets the tokens it gets in one big batch (greedy; sampled with a seed
  and a repetition penalty: its random stream follows the prompt, not the row), streamed under its own index."""
  _, model, gen, _ = tiny
  prompts = PROMPTS + [[8, 8, 2], [1, 2, 3, 4, 5, 6, 7], [60] * 23, [7, 11]]
  free = gen.generate(prompts, 24).output_ids
  stops = [free[0][4], free[1][9]]  # rows end at different steps
  s = Sampling(temperature=1.2, top_k=8, repetition_penalty=1.3)
  one_batch = gen.generate(prompts, 24, stop_ids=stops)
  want = one_batch.output_ids, gen.generate(prompts, 24, s, seed=3).output_ids
  assert len({len(o) for o in want[0]}) > 2
  for rows, prefill_rows in ((1, None), (2, None), (3, 2)):
    queued = Generator(model, batch_size=rows, prefill_rows=prefill_rows)
    streamed = [[] for _ in prompts]
    got = queued.generate(prompts, 24, stop_ids=stops, on_tokens=lambda i, piece: streamed[i].extend(piece.ids))
    assert got.output_ids == want[0] and streamed == want[0]
    for lp, ref in zip(got.output_logprobs, one_batch.output_logprobs, strict=True):
      np.testing.assert_allclose(lp, ref, atol=1e-5)
    assert queued.generate(prompts, 24, s, seed=3).output_ids == want[1]
  limits = [3, 24, 1, 9, 17, 2, 12]  # one per prompt: each row ends at its own step
  assert Generator(model, batch_size=2).generate(prompts, limits).output_ids == \
      [row[:m] for row, m in zip(free, limits)]


def test_stop_when_ends_a_prompt_on_the_host(tiny):
  """A prompt ended by `stop_when` (stop strings) keeps the ids it was told to keep (its row ran on until the
  host looked: those ids are dropped, streamed or not), frees its row for a waiting prompt, and changes no
  other prompt's tokens."""
  _, model, gen, _ = tiny
  prompts = PROMPTS + [[8, 8, 2], [60] * 23]
  free = gen.generate(prompts, 24)
  ends = {1: 5, 3: 1}  # prompt index -> ids kept (1: the prefill's token)

  def stop_when(i, ids, new):
    return ends[i] if i in ends and len(ids) >= ends[i] else None

  want = [row[:ends.get(i, 24)] for i, row in enumerate(free.output_ids)]
  for engine in (gen, Generator(model, batch_size=2)):
    streamed, done = [[] for _ in prompts], []
    got = engine.generate(prompts, 24, stop_when=stop_when, on_tokens=lambda i, piece: streamed[i].extend(piece.ids),
                          on_done=lambda i, out: done.append((i, list(out.ids), out.reason)))
    assert got.output_ids == want and streamed == want and got.generated_tokens == sum(map(len, want))
    assert got.finish_reasons == ["stop" if i in ends else "length" for i in range(len(prompts))]
    assert sorted(done) == [(i, w, r) for i, (w, r) in enumerate(zip(want, got.finish_reasons))]
    if engine is gen:  # each prompt reported as it ends: prompt 3 (one token) first
      assert done[0][0] == 3
    for lp, ref, row in zip(got.output_logprobs, free.output_logprobs, want, strict=True):
      np.testing.assert_allclose(lp, ref[:len(row)], atol=1e-5)


def test_a_prompt_ended_before_it_starts_never_runs(tiny):
  """`stop_when` is asked of waiting prompts too (ids [], 0 new): one it ends then (a server's request whose client
  left while queued) is done with nothing generated and never runs: no row holds its ids after."""
  _, model, _, _ = tiny
  engine = Generator(model, batch_size=1)
  first, gone = PROMPTS[0], PROMPTS[1]
  done = []
  got = engine.generate([first, gone], 6, stop_when=lambda i, ids, new: 0 if i == 1 else None, keep=True,
                        on_done=lambda i, out: done.append((i, list(out.ids), out.reason)))
  assert done == [(1, [], "stop"), (0, got.output_ids[0], "length")] and len(got.output_ids[0]) == 6
  assert engine.generate([gone], 6, keep=True).cached_tokens == [0]  # ran, it would hold all but its last id


def test_prompts_beginning_alike_are_scored_sharing_their_prefix(tiny, monkeypatch):
  """Scoring with share_prefix: the choices of a question (one of them the question's prefix alone, one a single
  id longer, two identical), more of them than rows (split), a few-shot pair, prompts of one id and prompts
  sharing too little run their common prefix once and the rest over a copy of its cache row, giving the
  log-probabilities of scoring each whole, and running fewer ids; groups form as prefixes.families says."""
  _, model, _, _ = tiny
  rng = np.random.default_rng(3)
  question, shot = rng.integers(0, 101, 40).tolist(), rng.integers(0, 101, 24).tolist()
  choices = [question + rng.integers(0, 101, k).tolist() for k in (1, 6, 3, 9, 2)]
  prompts = [*choices, question, choices[2], shot + [5, 6], PROMPTS[1], shot + [7], [42],
             question[:10] + [1, 2, 3]]
  groups = prefixes.families(prompts, 16, 4)
  shared = sorted((n, sorted(g)) for n, g in groups if n)
  assert shared[0] == (24, [7, 9]) and sorted(i for _, g in shared[1:] for i in g) == list(range(7))
  assert all(n >= 40 and len(g) <= 4 for n, g in shared[1:]) and len(groups) == len(shared) + 3
  ran = []
  for name, at in (("_prompt_scores", 2), ("_rest_pass", 4)):  # where the ids [B, T] are
    fn = getattr(scoring, name)
    monkeypatch.setattr(scoring, name, lambda *a, fn=fn, at=at, **k: ran.append(np.asarray(a[at])) or fn(*a, **k))
  want = prompt_scores(Generator(model, share_prefix=0), prompts)
  alone = sum(len(p) - 1 for p in prompts)
  assert sum(int((t != 0).sum()) for t in ran) <= alone  # (ids of 0 count as padding)
  ran.clear()
  got = prompt_scores(Generator(model, prefill_rows=4, share_prefix=16), prompts)
  assert sum(int((t != 0).sum()) for t in ran) <= alone - sum((len(g) - 1) * (n - 1) for n, g in shared)
  for g, w, p in zip(got, want, prompts, strict=True):
    assert len(g.logprobs) == len(g.ranks) == len(p) and g.logprobs[0] is None and g.ranks[0] is None
    np.testing.assert_allclose(g.logprobs[1:], w.logprobs[1:], atol=1e-5)
    assert np.abs(np.subtract(g.ranks[1:], w.ranks[1:])).max(initial=0) <= 1  # (a near tie may flip)


def test_prompt_logprobs_match_transformers(tiny):
  """Each prompt token's log-probability given the ones before it equals transformers' log-softmax, for prompts
  of different lengths scored in padded groups; through infer.py too, scoring only (--max-new-tokens 0) or
  with generated tokens."""
  hf_model, model, gen, ckpt = tiny
  greedy = PROMPTS[0] + gen.generate([PROMPTS[0]], 3, Sampling(temperature=0)).output_ids[0]  # ends in 3 rank-1 ids
  prompts = PROMPTS + [[8, 8, 2, 99, 100], greedy]
  want, ranks = [], []  # ranks: (fewest, most) ids likelier than the target, ties within 1e-4 either way
  for p in prompts:
    with torch.no_grad():
      whole = torch.log_softmax(hf_model(torch.tensor([p])).logits[0], -1).numpy()
    want.append([whole[i - 1, t] for i, t in enumerate(p) if i > 0])
    ranks.append([(1 + np.sum(whole[i - 1] > whole[i - 1, t] + 1e-4), 1 + np.sum(whole[i - 1] > whole[i - 1, t] - 1e-4))
                  for i, t in enumerate(p) if i > 0])
  for engine in (gen, Generator(model, prefill_rows=3)):  # one group of all rows, or groups of 3 (one padded)
    got = prompt_scores(engine, prompts)
    assert [g.logprobs[0] for g in got] == [g.ranks[0] for g in got] == [None] * len(prompts)
    for g, w, r in zip(got, want, ranks, strict=True):
      np.testing.assert_allclose(g.logprobs[1:], w, atol=1e-4)
      assert all(lo <= x <= hi for x, (lo, hi) in zip(g.ranks[1:], r, strict=True)), (g.ranks, r)
    assert got[-1].ranks[-3:] == [1, 1, 1] and any(x > 1 for g in got for x in g.ranks[1:])
  ids = ["--input-ids", ",".join(map(str, prompts[1])), "--input-ids", ",".join(map(str, prompts[3]))]
  common = ["--checkpoint", str(ckpt), *ids, "--dtype", "float32", "--temperature", "0", "--json",
            "--prompt-logprobs"]
  score = infer(*common, "--max-new-tokens", "0")
  assert score.returncode == 0, score.stderr
  rows = [json.loads(x) for x in score.stdout.splitlines()]
  assert [r["output_ids"] for r in rows] == [[], []]
  for r, w, g in zip(rows, (want[1], want[3]), (got[1], got[3]), strict=True):
    assert r["prompt_logprobs"][0] is None and r["prompt_ranks"] == g.ranks
    np.testing.assert_allclose(r["prompt_logprobs"][1:], w, atol=1e-4)
  both = [json.loads(x) for x in infer(*common, "--max-new-tokens", "3").stdout.splitlines()]
  assert [r["prompt_logprobs"] for r in both] == [r["prompt_logprobs"] for r in rows]
  assert [r["output_ids"] for r in both] == gen.generate([prompts[1], prompts[3]], 3).output_ids
  for flags, message in ((["--prompt-logprobs"], "--prompt-logprobs adds a key to the --json objects"),
                         (["--max-new-tokens", "0"], "--max-new-tokens 0 generates nothing")):
    res = infer("--checkpoint", str(ckpt), *ids, *flags)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_fused_attention_prefill_gives_the_same_tokens(tiny, monkeypatch):
  """Generation with the cudnn attention backend (imitated by XLA on CPU, let run in float32 here): prompts of
  different lengths, right-padded, prefilled without a mask, give the einsum path's tokens."""
  monkeypatch.setattr(layers, "FUSED_IMPLEMENTATION", "xla")
  monkeypatch.setattr(layers, "FUSED_DTYPES", (jnp.float32,))
  _, model, gen, ckpt = tiny
  fused = Generator(checkpoint.restore(ckpt, dtype=jnp.float32, kernels=Kernels(attention="cudnn")))
  assert fused.generate(PROMPTS, 24).output_ids == gen.generate(PROMPTS, 24).output_ids


def test_long_prompt_with_few_new_tokens(tmp_path):
  """A 600-token prompt that wants 3 tokens: the prompt is padded to 768 slots, the cache holds exactly that."""
  hf_model = make_model(seed=12, max_position_embeddings=1024)
  save(hf_model, tmp_path / "hf")
  convert.import_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
  gen = Generator(checkpoint.restore(tmp_path / "ckpt", dtype=jnp.float32), prefill_rows=1)
  long = np.random.default_rng(12).integers(0, hf_model.config.vocab_size, 600).tolist()
  out = gen.generate([long, PROMPTS[1]], 3).output_ids  # two prefill calls into one [2, 768] cache
  assert out == [hf_greedy(hf_model, long, 3), hf_greedy(hf_model, PROMPTS[1], 3)]


def test_yarn_generates_past_max_position_embeddings(tmp_path):
  """Qwen2's recipe for long inputs: a v4 config.json with yarn rope scaling (factor 4 over 32 pretraining
  positions here). The context becomes 128 positions; a 30-token prompt with 70 new tokens runs to position 99,
  through the CLI, equal to transformers (which applies yarn the same way)."""
  yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
  hf_model = make_model(seed=13, max_position_embeddings=32, rope=yarn)
  save(hf_model, tmp_path / "hf", style="v4")
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["rope_scaling"]["type"] == "yarn"
  convert.import_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
  prompt = np.random.default_rng(13).integers(0, hf_model.config.vocab_size, 30).tolist()
  res = infer("--checkpoint", str(tmp_path / "ckpt"), "--input-ids", ",".join(map(str, prompt)), "--dtype",
              "float32", "--temperature", "0", "--max-new-tokens", "70", "--json")
  assert res.returncode == 0, res.stderr
  assert json.loads(res.stdout.strip().splitlines()[-1])["output_ids"] == hf_greedy(hf_model, prompt, 70)
  res = infer("--checkpoint", str(tmp_path / "ckpt"), "--input-ids", ",".join(["1"] * 128))
  assert res.returncode == 2 and "128 tokens does not fit the model's context of 128" in res.stderr.strip()


def test_interactive_chat_keeps_the_conversation(tmp_path):
  """--interactive: each turn's prompt is the whole conversation so far (replies included, through the chat
  template), so a turn gives what the one-shot prompt of those messages gives; /reset starts over."""
  common = ["--demo", "--max-new-tokens", "8", "--temperature", "0", "--dtype", "float32", "--json"]
  res = subprocess.run([sys.executable, "infer.py", *common, "--interactive"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, input="hello there\nhow are you\n\n/reset\nhello there\n")
  assert res.returncode == 0, res.stderr
  turns = [json.loads(line) for line in res.stdout.splitlines()]
  assert len(turns) == 3 and turns[2] == turns[0] and "conversation reset" in res.stderr
  messages = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": turns[0]["text"]},
              {"role": "user", "content": "how are you"}]
  (tmp_path / "conversation.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
  one = infer(*common, "--prompts-file", str(tmp_path / "conversation.jsonl"))
  assert one.returncode == 0, one.stderr
  assert json.loads(one.stdout.splitlines()[-1]) == turns[1]
  bad = infer("--demo", "--interactive", "--prompt", "hi")
  assert bad.returncode == 2 and "--interactive reads its messages from stdin" in bad.stderr
  # a turn longer than the demo's 2048-position context is reported, and the chat goes on
  res = subprocess.run([sys.executable, "infer.py", *common, "--interactive"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, input="qx7 " * 8000 + "\nhello there\n")
  assert res.returncode == 0, res.stderr
  assert "does not fit the model's context" in res.stderr and "/reset" in res.stderr
  assert [json.loads(line) for line in res.stdout.splitlines()] == turns[:1]


def test_cache_lengths():
  lengths = (1, 17, 256, 257, 513, 1040, 2000, 2049)
  assert [cache_bucket(n) for n in lengths] == [16, 32, 256, 512, 768, 1280, 2048, 2304]


def test_kv_cache_decoding_equals_recompute(tiny):
  _, model, gen, _ = tiny
  prompt = PROMPTS[1]
  out = gen.generate([prompt], 33).output_ids[0]
  seq = list(prompt)
  for _ in range(33):  # no cache: the full sequence every step (zero-padded to one length: causal)
    padded = seq + [0] * (len(prompt) + 33 - len(seq))
    seq.append(int(prompt_logits(model, padded)[len(seq) - 1].argmax()))
  assert seq[len(prompt):] == out


def test_int8_cache_attention_equals_the_dequantized_cache():
  """Attention over an int8 cache (scales applied to scores and probabilities) equals attention over the cache
  expanded to floats (GQA, blocks of queries over the cache); quantizing errs by at most half a scale step."""
  rng = np.random.default_rng(0)
  k, v = (jnp.asarray(rng.normal(size=(2, 24, 2, 16)) * rng.uniform(0.1, 30, (2, 24, 2, 1)), jnp.float32)
          for _ in range(2))
  k = k.at[0, 3].set(0.0)  # an all-zero vector (an empty slot) has scale 0 and comes back as zeros
  q = jnp.asarray(rng.normal(size=(2, 5, 6, 16)), jnp.float32)
  (kq, ks), (vq, vs) = kv_cache.quantize(k), kv_cache.quantize(v)
  assert kq.dtype == jnp.int8 and ks.shape == (2, 24, 2) and float(ks[0, 3].max()) == 0.0
  k_back, v_back = kq * ks[..., None], vq * vs[..., None]
  assert np.all(np.abs(k_back - k) <= ks[..., None] / 2 * 1.0001) and np.all(k_back[0, 3] == 0)
  np.testing.assert_allclose(kv_cache.round_trip(v), v_back, rtol=1e-6)
  cfg = PRESETS["qwen1.5-moe-a2.7b"]
  ratio = KVCache.nbytes(cfg, 4, 64, jnp.int8) / KVCache.nbytes(cfg, 4, 64, jnp.bfloat16)
  assert ratio == (1 + 4 / cfg.dim_per_head) / 2  # int8 values and a float32 scale per head dim vector
  mask = layers.Mask.over_cache(jnp.asarray([[7, 8, 9, 10, 11], [19, 20, 21, 22, 23]]), 24)
  want = layers.attend(q, k_back, v_back, mask)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  the cache's layout: [B, K, S, H], scales [B, K, S]
  for block in (None, 2):
    got = layers.attend(q, kq, vq, mask, block=block, scales=(ks, vs))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)  # values up to ~100
    got = layers.attend(q, *map(heads_first, (kq, vq)), mask, block=block, scales=tuple(map(heads_first, (ks, vs))),
                        kv_layout="BKSH")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("slots,heads,kv_heads", [(128, 2, 2), (1280, 6, 2), (1024, 20, 1)])
@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int8"])
def test_pallas_decode_attention_equals_the_einsum(slots, heads, kv_heads, quantized):
  """The decode kernel (interpreted on CPU) equals the einsum over the cache with the causal mask: rows at the
  first slot, mid-split, a split's last slot and the cache's last slot, slots past them holding other values
  (as a previous prompt leaves them); splits of 16 / 128 / 128 slots (8, 10, 8 of them) in blocks of 16 / 64
  slots; 1, 3 and 20 query heads per kv head."""
  rng = np.random.default_rng(slots)
  h = 16
  q = jnp.asarray(rng.normal(size=(4, heads, h)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(4, kv_heads, slots, h)) * 3, jnp.float32) for _ in range(2))
  scales = None
  if quantized:
    (k, k_scale), (v, v_scale) = kv_cache.quantize(k), kv_cache.quantize(v)
    scales = (k_scale, v_scale)
  positions = jnp.asarray([0, slots // 3, decode_attention.split_slots(slots) - 1, slots - 1], jnp.int32)
  got = jax.jit(decode_attention.attend)(q, k, v, positions + 1, scales)
  want = layers.attend(q[:, None], k, v, layers.Mask.over_cache(positions[:, None], slots), scales=scales,
                       kv_layout="BKSH")[:, 0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert decode_attention.fits(slots, h) and not decode_attention.fits(64, h)
  assert not decode_attention.fits(slots, 96) and not decode_attention.fits(slots, 8)  # the einsum there
  assert [decode_attention.split_slots(n) for n in (128, 256, 768, 1280, 2048, 32768)] == [16, 32, 64, 128, 256, 4096]
  # blocks past a row's length are never loaded: NaN there (values, or an int8 cache's scales) changes nothing
  dead = jnp.arange(slots) >= (-(-(positions + 1) // 64) * 64)[:, None]  # [B, S] from the next 64-slot boundary
  poison = lambda x: jnp.where(dead[:, None, :, None] if x.ndim == 4 else dead[:, None], jnp.nan, x)  # noqa: E731
  k, v, scales = (k, v, tuple(map(poison, scales))) if quantized else (poison(k), poison(v), None)
  np.testing.assert_array_equal(jax.jit(decode_attention.attend)(q, k, v, positions + 1, scales), got)


@pytest.mark.parametrize("slots,heads,kv_heads", [(384, 6, 2), (2048, 20, 1)])
@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int8"])
def test_pallas_decode_lowers_to_triton(slots, heads, kv_heads, quantized):
  """The kernel as a GPU compiles it: lowered for CUDA on this CPU (the Pallas Triton lowering, which checks
  block shapes and ops), one Triton call with a program per split, kv head and row, at Qwen's head dim of 128."""
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
  cache = jax.ShapeDtypeStruct((4, kv_heads, slots, 128), jnp.int8 if quantized else jnp.bfloat16)
  scales = (f32(4, kv_heads, slots),) * 2 if quantized else None
  fn = jax.jit(lambda q, k, v, n, s: decode_attention.attend(q, k, v, n, s, interpret=False))
  triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
  hlo = jax.export.export(fn, platforms=["cuda"], disabled_checks=[triton])(
    jax.ShapeDtypeStruct((4, heads, 128), jnp.bfloat16), cache, cache, jax.ShapeDtypeStruct((4,), jnp.int32),
    scales).mlir_module()
  splits = slots // decode_attention.split_slots(slots)
  assert hlo.count("@__gpu$xla.gpu.triton") == 1 and 'name = "decode_attention"' in hlo
  grid = [int(x) for x in re.search(r"grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+)", hlo).groups()]
  assert grid[0] == splits and np.prod(grid) == splits * kv_heads * 4  # a program per split, kv head and row


def test_decode_loop_with_the_pallas_kernel_lowers_to_triton(monkeypatch):
  """The whole decode loop of `--decode-attention pallas` as a GPU gets it (lowered for CUDA here, the kernel
  not interpreted): one Triton call per layer inside the on-device loop, int8 cache and all."""
  cfg = demo_config(vocab_size=512)
  model = create_model(cfg, sharding.make_mesh({}, jax.devices()[:1]), jnp.bfloat16, Kernels(decode="pallas"))
  graphdef, params = nnx.split(model)
  monkeypatch.setattr(decode_attention, "attend", functools.partial(decode_attention.attend, interpret=False))
  state = jax.eval_shape(lambda: decoding.empty_state(decoding.prompt_keys(0, range(4)), jnp.full((4,), -1), cfg=cfg,
                                                      rows=4, cache_len=1280, max_new=64, dtype=jnp.int8))
  triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
  hlo = jax.export.export(decoding.decode, platforms=["cuda"], disabled_checks=[triton])(
    graphdef, jax.eval_shape(lambda: params), state, jax.ShapeDtypeStruct((), bool), steps=16,
    ops=SamplingOps.of([Sampling(temperature=0.7, top_p=0.8)])).mlir_module()
  assert hlo.count("@__gpu$xla.gpu.triton") == cfg.num_hidden_layers


@pytest.mark.parametrize("cache_dtype", ["auto", "int8"])
def test_pallas_decode_attention_gives_the_einsums_tokens(tmp_path, cache_dtype, monkeypatch):
  """`--decode-attention pallas` (interpreted on CPU) generates the einsum path's tokens and log-probabilities,
  with continuous batching (rows refilled over a finished prompt's keys, which the kernel must not read), on a
  model with heads 16 wide (the kernel's narrowest) whose decode steps go through it."""
  save(make_model(seed=9, num_experts=11, num_experts_per_tok=3, num_attention_heads=3, num_key_value_heads=1),
       tmp_path / "hf")
  convert.import_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
  calls = []
  kernel = decode_attention.attend
  monkeypatch.setattr(decode_attention, "attend", lambda *a, **k: calls.append(1) or kernel(*a, **k))
  runs = []
  for decode in ("xla", "pallas"):
    model = checkpoint.restore(tmp_path / "ckpt", dtype=jnp.float32, kernels=Kernels(decode=decode))
    runs.append(Generator(model, batch_size=2, kv_cache_dtype=cache_dtype).generate(PROMPTS, [100, 60, 90]))
  assert cache_bucket(max(len(p) + n for p, n in zip(PROMPTS, [100, 60, 90]))) == 128  # the kernel's smallest
  assert model.config.dim_per_head == 16 and calls  # traced into the decode step
  assert runs[1].output_ids == runs[0].output_ids
  for a, b in zip(runs[1].output_logprobs, runs[0].output_logprobs):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("cache_dtype", ["auto", "int8"])
def test_decode_reads_the_cache_in_place(tiny, cache_dtype):
  """The compiled decode loop attends over each layer's cache as it lies: no transpose or copy of a cache-sized
  array. XLA wants the attention matmuls' batch dimensions (row, kv head) outermost (on CPU as on GPU); with the
  cache laid out [B, S, K, H] it copied every layer's key cache into [B, K, S, H] at every step."""
  _, model, _, _ = tiny
  gen, cfg, rows, slots = Generator(model, kv_cache_dtype=cache_dtype), model.config, 4, 384
  state = decoding.empty_state(decoding.prompt_keys(0, range(rows)), jnp.full((4,), -1, jnp.int32), cfg=cfg,
                               rows=rows, cache_len=slots, max_new=16, dtype=gen.cache_dtype)
  hlo = decoding.decode.lower(gen.graphdef, gen.params, state, np.bool_(False), steps=16,
                              ops=SamplingOps()).compile().as_text()
  k, h = cfg.num_key_value_heads, cfg.dim_per_head
  cache_shapes = {f"[{rows},{k},{slots},{h}]", f"[{rows},{slots},{k},{h}]"}
  results = [(line.split(" = ", 1)[0], line.split(" = ", 1)[1].split(" ", 1)) for line in hlo.splitlines()
             if " = " in line]
  moved = [name for name, (shape, op) in results
           if any(c in shape for c in cache_shapes) and ("transpose" in name + op.split("(")[0]
                                                         or op.startswith(("copy(", "transpose(")))]
  assert f"[{rows},{k},{slots},{h}]" in hlo and not moved, moved


def int8_prompt_logprobs(model, ids: list[int]) -> np.ndarray:
  """log-softmax [T, V] at each position of one sequence run over an int8 cache (as decoding sees it)."""
  cache = KVCache.zeros(model.config, 1, len(ids), jnp.dtype(jnp.int8))
  tokens = jnp.asarray([ids])
  out = model(tokens, jnp.arange(len(ids))[None], cache=cache, packed=False)
  return np.asarray(jax.nn.log_softmax(model.logits(out.hidden[0]), axis=-1))


def test_int8_kv_cache_decodes_what_it_holds_and_stays_close(tiny):
  """`kv_cache_dtype="int8"`: each generated token's log-probability is the one the sequence gives when every
  position attends over int8 keys and values (decoding reads back what was written; batching, continuous
  batching and the kept cache do not change the tokens), and stays close to the float cache's (max |delta|
  logprob and mean KL printed)."""
  _, model, gen, _ = tiny
  int8 = Generator(model, kv_cache_dtype="int8")
  got = int8.generate(PROMPTS, 24)
  floats = gen.generate(PROMPTS, 24).output_ids
  for prompt, row, lps, ref in zip(PROMPTS, got.output_ids, got.output_logprobs, floats):
    whole = int8_prompt_logprobs(model, prompt + row)
    want = [whole[len(prompt) - 1 + i, t] for i, t in enumerate(row)]
    np.testing.assert_allclose(lps, want, atol=1e-5)
    assert row == int8.generate([prompt], 24).output_ids[0]
    exact = np.asarray(jax.nn.log_softmax(prompt_logits(model, prompt + ref), axis=-1))
    close = int8_prompt_logprobs(model, prompt + ref)
    kl = (np.exp(exact) * (exact - close)).sum(-1).mean()
    print(f"int8 cache vs float: max |dlogprob| {np.abs(close - exact).max():.4f}, mean KL {kl:.2e}")
    assert np.abs(close - exact).max() < 0.1 and kl < 1e-3
  assert Generator(model, batch_size=2, kv_cache_dtype="int8").generate(PROMPTS, 24).output_ids == got.output_ids
  history = PROMPTS[0]
  for extra in ([], [3, 1, 4], [2, 7] * 12):  # turns over the kept int8 cache, which grows (scales too)
    prompt = history + extra
    turn = int8.generate([prompt], 12, keep=True)
    assert turn.output_ids == int8.generate([prompt], 12).output_ids
    history = prompt + turn.output_ids[0]


def test_prompts_arriving_while_others_decode(tiny):
  """Arrivals (a server's requests) join a running call as its rows free, in the order they came, and get the
  tokens they get in one batch with every prompt given (their random streams follow their indices), also when
  they need sampling steps the call's programs lack (which widen, the running rows going on); one the call has
  no room for (more slots than its cache) is not admitted, and neither is any after it: they are left for the
  next call, which the running prompts do not wait for."""
  _, model, gen, _ = tiny
  prompts = PROMPTS + [[8, 8, 2], [1, 2, 3, 4, 5, 6, 7]]
  limits = [30, 5, 20, 12, 9]
  settings = [Sampling(), Sampling(1.2, 8), Sampling(), Sampling(0.9, top_p=0.8, frequency_penalty=1.0), Sampling()]
  want = gen.generate(prompts, limits, settings, seed=1)
  coming = [Arrival(p, m, s) for p, m, s in zip(prompts[2:], limits[2:], settings[2:])]

  def polled(schedule: dict[int, list[Arrival]]):
    polls = []
    return lambda: polls.append(1) or schedule.get(len(polls), [])

  engine = Generator(model, batch_size=2)
  room = Room(rows=2, slots=64, max_new=32, ops=SamplingOps.of(settings))
  got = engine.generate(prompts[:2], limits[:2], settings[:2], seed=1, arrivals=polled({1: coming[:2], 3: coming[2:]}),
                        room=room)
  assert got.output_ids == want.output_ids and got.left == []
  for lp, ref in zip(got.output_logprobs, want.output_logprobs, strict=True):
    np.testing.assert_allclose(lp, ref, atol=1e-5)
  # programs without the top-p and penalty steps (nor, below, top logprobs and a logit bias) widen for the fourth
  for ops in (SamplingOps.of(settings[:2]), SamplingOps()):
    got = engine.generate(prompts[:2], limits[:2], settings[:2], seed=1, arrivals=polled({1: coming}),
                          room=dataclasses.replace(room, ops=ops))
    assert got.output_ids == want.output_ids and got.left == []
  wide = dataclasses.replace(settings[3], top_logprobs=3, logit_bias=((4, 2.0), (9, -1.0)), repetition_penalty=1.3)
  alone = engine.generate([prompts[3]], limits[3], wide, seed=[Stream(1, 3)])
  got = engine.generate(prompts[:2], limits[:2], settings[:2], seed=1, arrivals=polled({2: [Arrival(
    prompts[3], limits[3], wide, Stream(1, 3))]}), room=dataclasses.replace(room, ops=SamplingOps()))
  assert got.output_ids == want.output_ids[:2] + alone.output_ids and got.left == []
  np.testing.assert_allclose(got.output_logprobs[2], alone.output_logprobs[0], atol=1e-5)
  (top,), (top_alone,) = np.array(got.output_top_logprobs[2:]), np.array(alone.output_top_logprobs)  # [T, 3, 2]
  assert top.shape == (limits[3], 3, 2) and (top[..., 0] == top_alone[..., 0]).all()
  np.testing.assert_allclose(top[..., 1], top_alone[..., 1], atol=1e-5)
  too_long = Arrival(list(range(1, 60)), 10)  # 69 slots of a 64-slot cache
  got = engine.generate(prompts[:2], limits[:2], settings[:2], seed=1, arrivals=polled({2: [too_long]}), room=room)
  assert got.output_ids == want.output_ids[:2] and got.left == [too_long]


def test_steps_no_prompt_takes_are_dropped(tiny, monkeypatch):
  """Once the prompts asking for sampling steps (top-k, penalties, a logit bias, top logprobs) end, the decode calls
  run without them (their arrays leave the state), offline and with arrivals (which bring them back), and once the
  prompts asking for larger sizes (top-k's k, the logit bias's width, the top logprobs' count) end, with the sizes
  the others ask, if a decode program for those was compiled before (never compiling one for it); every prompt's
  tokens, logprobs and top logprobs equal its run alone."""
  _, model, _, _ = tiny
  special = Sampling(1.0, 5, repetition_penalty=1.3, presence_penalty=0.5, logit_bias=((7, 3.0),), top_logprobs=2)
  calls: list[SamplingOps] = []
  compiled = Generator._compiled

  def spied(self, fn, args, model=True, **statics):
    if fn is generate.decode and self is engine:
      calls.append(statics["ops"])
    return compiled(self, fn, args, model, **statics)

  monkeypatch.setattr(Generator, "_compiled", spied)
  engine, limits = Generator(model, batch_size=2), [6, 50]

  def check(got, settings: list[Sampling]) -> None:
    for i, (s, m) in enumerate(zip(settings, limits)):
      alone = Generator(model).generate([PROMPTS[i]], m, s, seed=[Stream(3, i)])
      assert got.output_ids[i] == alone.output_ids[0]
      np.testing.assert_allclose(got.output_logprobs[i], alone.output_logprobs[0], atol=1e-5)
      assert np.array(got.output_top_logprobs[i]).shape == np.array(alone.output_top_logprobs[0]).shape
      np.testing.assert_allclose(np.array(got.output_top_logprobs[i]), np.array(alone.output_top_logprobs[0]),
                                 atol=1e-5)

  check(engine.generate(PROMPTS[:2], limits, [special, Sampling()], seed=3), [special, Sampling()])
  assert calls[-1] == calls[0] == SamplingOps.of([special])  # no decode program without them yet: none compiled
  engine.generate([PROMPTS[1]], 4)  # (now there is)
  calls.clear()
  check(engine.generate(PROMPTS[:2], limits, [special, Sampling()], seed=3), [special, Sampling()])
  assert calls[0].top_logprobs and calls[-1] == SamplingOps()  # (greedy only: no draws either)
  calls.clear()
  polls: list[int] = []
  got = engine.generate([PROMPTS[1]], limits[1], Sampling(), seed=[Stream(3, 1)], room=Room(2, 64, 64),
                        arrivals=lambda: polls.append(1) or ([Arrival(PROMPTS[0], limits[0], special, Stream(3, 0))]
                                                              if len(polls) == 2 else []))
  assert calls[0] == SamplingOps() and any(c.top_logprobs for c in calls) and calls[-1] == SamplingOps()
  got.outputs[:] = got.outputs[::-1]  # (the arrival is prompt 1 here)
  check(got, [special, Sampling()])
  wide = Sampling(1.0, 40, repetition_penalty=1.1, presence_penalty=0.2, top_logprobs=5,
                  logit_bias=((7, 3.0), (9, 1.0), (11, -2.0)))
  calls.clear()
  check(engine.generate(PROMPTS[:2], limits, [wide, special], seed=3), [wide, special])
  assert calls[0] == SamplingOps.of([wide]) and calls[-1] == SamplingOps.of([special])  # (compiled above)


def test_a_free_row_shortens_the_decode_calls(tiny):
  """While a row is free for prompts that may arrive, each decode call runs `arrival_chunk` steps (an arrival waits
  at most that many for the host to see it), with every row busy `chunk` steps, and without arrivals always
  `chunk`; the tokens are the same."""
  _, model, gen, _ = tiny
  want = gen.generate([PROMPTS[0], PROMPTS[1]], [80, 40]).output_ids

  def pieces(arriving: dict[int, list[Arrival]] | None) -> tuple[list[list[int]], list[list[int]]]:
    sizes: list[list[int]] = [[], []]
    polls: list[int] = []
    arrivals = None if arriving is None else lambda: polls.append(1) or arriving.get(len(polls), [])
    got = Generator(model, batch_size=2).generate([PROMPTS[0]], 80, on_tokens=lambda i, p: sizes[i].append(len(
      p.ids)), arrivals=arrivals, room=Room(rows=2, slots=128, max_new=64))
    return got.output_ids, sizes

  ids, sizes = pieces({3: [Arrival(PROMPTS[1], 40)]})
  assert ids == want
  # the first token (prefill), two calls of 4 steps, the arrival's prefill, calls of 16 with both rows busy (the
  # arrival ends in the third: 1 + 16 + 16 + 7 tokens), then of 4 again
  assert sizes == [[1, 4, 4, 16, 16, 16, 4, 4, 4, 4, 4, 3], [1, 16, 16, 7]], sizes
  ids, sizes = pieces(None)
  assert ids == want[:1] and sizes == [[1, 16, 16, 16, 16, 15], []]


def test_sampling_is_seeded_and_respects_top_k(tiny):
  hf_model, model, gen, _ = tiny
  s = Sampling(temperature=1.5, top_k=3)
  result = gen.generate(PROMPTS, 24, s, seed=1)
  a = result.output_ids
  assert a == gen.generate(PROMPTS, 24, s, seed=1).output_ids
  assert a != gen.generate(PROMPTS, 24, s, seed=2).output_ids
  # a prompt given its own stream (seed, index) draws the same tokens wherever it runs
  assert gen.generate([PROMPTS[2], PROMPTS[1]], 24, s, seed=[Stream(5, 0), Stream(1, 1)]).output_ids[1] == a[1]
  # every sampled token is among the 3 most likely given its prefix; its logprob is the model's (not the
  # tempered, truncated distribution's)
  prompt, row = PROMPTS[0], a[0]
  logits = prompt_logits(model, prompt + row + [0] * (24 - len(row)))
  for i, tok in enumerate(row):
    top3 = np.argsort(logits[len(prompt) - 1 + i])[-3:]
    assert tok in top3
    want = logits[len(prompt) - 1 + i, tok] - np.log(np.exp(logits[len(prompt) - 1 + i].astype(np.float64)).sum())
    np.testing.assert_allclose(result.output_logprobs[0][i], want, atol=1e-4)
  # a tiny top-p keeps only the most likely token: greedy
  assert gen.generate(PROMPTS, 12, Sampling(temperature=1.0, top_p=1e-6), seed=3).output_ids == \
      gen.generate(PROMPTS, 12).output_ids


def test_top_logprobs_are_the_models_likeliest_ids(tiny):
  """A prompt asking for top_logprobs gets, at each generated token, that many likeliest ids with their
  log-probabilities under the model (the log-softmax of its logits, best first), next to prompts asking for
  other counts or none, through continuous batching and a stop ended on the host (which drops the tokens after
  it); the tokens are those generated without them."""
  _, model, gen, _ = tiny
  settings = [Sampling(top_logprobs=3), Sampling(1.2, top_logprobs=5, repetition_penalty=1.3), Sampling()]
  plain = gen.generate(PROMPTS, 10, [dataclasses.replace(s, top_logprobs=0) for s in settings], seed=4)
  for engine in (gen, Generator(model, batch_size=1)):
    got = engine.generate(PROMPTS, 10, settings, seed=4, stop_when=lambda i, ids, new: 7 if i == 1 and len(ids) >= 7
                          else None)
    assert got.output_ids[0] == plain.output_ids[0] and got.output_ids[1] == plain.output_ids[1][:7]
    assert got.output_top_logprobs[2] == []
    for prompt, out, lps, top, s in zip(PROMPTS, got.output_ids, got.output_logprobs, got.output_top_logprobs,
                                        settings[:2]):
      logp = np.asarray(jax.nn.log_softmax(prompt_logits(model, prompt + out), axis=-1))[len(prompt) - 1:]
      assert len(top) == len(out) and all(len(t) == s.top_logprobs for t in top)
      for t, (token, lp, pairs) in enumerate(zip(out, lps, top)):
        ids, values = zip(*pairs)
        assert list(ids) == np.argsort(-logp[t], kind="stable")[:s.top_logprobs].tolist()
        np.testing.assert_allclose(values, logp[t, list(ids)], atol=1e-5)
        assert token not in ids or lp == pytest.approx(values[ids.index(token)], abs=1e-6)
      if s.temperature == 0:
        assert [t[0][0] for t in top] == out  # greedy: the likeliest


ROW_SETTINGS = [  # one batch's rows: greedy next to sampled, each truncation alone and combined
  Sampling(0.0, 0, 1.0, 1.3), Sampling(0.7, 0, 1.0, 1.3), Sampling(1.0, 7, 1.0, 0.8), Sampling(0.7, 20, 0.8, 1.05),
  Sampling(1.3, 0, 0.5), Sampling(0.9, min_p=0.1), Sampling(1.2, 30, 0.9, 1.1, min_p=0.05),
  Sampling(0.0, 5, 0.5, min_p=0.3)]  # greedy: its truncation settings do nothing, as in transformers


def test_processed_logits_match_transformers():
  """Each row's logits to draw from equal what transformers' processors leave for that row's settings alone
  (repetition penalty over the ids seen, then temperature, top-k, top-p and min-p), including which ids are
  dropped, with every row of the batch set differently; and equal that row processed alone."""
  from transformers.generation import logits_process as hf
  rng = np.random.default_rng(7)
  n = len(ROW_SETTINGS)
  logits = (3 * rng.standard_normal((n, 97))).astype(np.float32)
  ids = rng.integers(0, 97, (n, 30))  # a row's prompt and output so far
  seen = sampling.mark_seen(jnp.zeros((n, 97), bool), jnp.asarray(ids))
  got = np.asarray(sampling.process_logits(jnp.asarray(logits), SamplingOps.of(ROW_SETTINGS),
                                           RowSampling.of(ROW_SETTINGS), seen))
  for row, s in enumerate(ROW_SETTINGS):
    procs = [hf.RepetitionPenaltyLogitsProcessor(s.repetition_penalty)]
    if s.temperature:
      procs += [hf.TemperatureLogitsWarper(s.temperature)] + ([hf.TopKLogitsWarper(s.top_k)] if s.top_k else []) + \
          ([hf.TopPLogitsWarper(s.top_p)] if s.top_p < 1 else []) + ([hf.MinPLogitsWarper(s.min_p)] if s.min_p else [])
    want = hf.LogitsProcessorList(procs)(torch.tensor(ids[row:row + 1]), torch.tensor(logits[row:row + 1])).numpy()
    np.testing.assert_array_equal(np.isneginf(got[row:row + 1]), np.isneginf(want), err_msg=str(s))
    np.testing.assert_allclose(got[row:row + 1], want, rtol=1e-6, err_msg=str(s))
    alone = sampling.process_logits(jnp.asarray(logits[row:row + 1]), SamplingOps.of([s]), RowSampling.of([s]),
                                    seen[row:row + 1])
    np.testing.assert_array_equal(np.asarray(alone), got[row:row + 1])
    assert np.isneginf(got[row]).any() == bool(s.temperature and (s.top_k or s.top_p < 1 or s.min_p))


def test_presence_and_frequency_penalties():
  """OpenAI's and vLLM's formula, after the repetition penalty (vLLM's order): each id's logit loses
  frequency_penalty x the times the row generated it, and presence_penalty if it did at all; negative values
  favour those ids. Rows without them are left as they are."""
  rng = np.random.default_rng(3)
  logits = (3 * rng.standard_normal((4, 50))).astype(np.float32)
  generated = rng.integers(0, 50, (4, 12))
  counts = np.zeros((4, 50), np.int32)
  for row in range(4):
    np.add.at(counts[row], generated[row], 1)
  settings = [Sampling(presence_penalty=0.8), Sampling(frequency_penalty=0.5, repetition_penalty=1.3),
              Sampling(1.0, presence_penalty=-1.0, frequency_penalty=2.0), Sampling()]
  state_counts = jnp.zeros((4, 50), jnp.int32)
  for step in range(12):  # what the decode state counts, token by token
    state_counts = sampling.count_generated(state_counts, jnp.asarray(generated[:, step]))
  np.testing.assert_array_equal(state_counts, counts)
  seen = sampling.mark_seen(jnp.zeros((4, 50), bool), jnp.asarray(generated))
  got = np.asarray(sampling.process_logits(jnp.asarray(logits), SamplingOps.of(settings), RowSampling.of(settings),
                                           seen, state_counts))
  for row, s in enumerate(settings):
    want = logits[row].copy()
    hit = counts[row] > 0
    want[hit] = np.where(want[hit] < 0, want[hit] * s.repetition_penalty, want[hit] / s.repetition_penalty)
    want -= s.frequency_penalty * counts[row] + s.presence_penalty * hit
    np.testing.assert_allclose(got[row] * (s.temperature or 1), want, rtol=1e-6, atol=1e-6)
  assert not np.allclose(got[0], logits[0]) and np.array_equal(got[3], logits[3])


class OpenAIPenalties:
  """transformers logits processor for the reference: presence / frequency penalties over the generated ids."""

  def __init__(self, prompt_len: int, presence: float, frequency: float):
    self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

  def __call__(self, input_ids, scores):
    out = input_ids[:, self.prompt_len:]
    counts = torch.zeros_like(scores).scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
    return scores - self.frequency * counts - self.presence * (counts > 0)


def test_presence_and_frequency_penalties_match_transformers_greedy(tiny):
  """Greedy decoding with a presence and a frequency penalty (and a repetition penalty, applied first) gives, for
  each prompt of a batch, transformers' greedy tokens under the same penalties, which differ from plain greedy."""
  hf_model, _, gen, _ = tiny
  s = Sampling(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=1.5)
  batch = gen.generate(PROMPTS, 30, s).output_ids
  assert batch != gen.generate(PROMPTS, 30, Sampling(repetition_penalty=1.2)).output_ids
  for prompt, row in zip(PROMPTS, batch):
    assert row == hf_greedy(hf_model, prompt, 30, repetition_penalty=1.2,
                            logits_processor=[OpenAIPenalties(len(prompt), 0.5, 1.5)])


def test_logit_bias_is_added_first(tiny):
  """OpenAI's logit_bias: greedy rows biased each their own way in one batch equal transformers' greedy tokens
  under the same bias (SequenceBiasLogitsProcessor), each alone; +100 forces an id, -100 bans it; the bias comes
  before every other step (the repetition penalty sees biased logits, as in vLLM)."""
  hf_model, _, gen, _ = tiny
  from transformers.generation.logits_process import SequenceBiasLogitsProcessor
  plain = gen.generate(PROMPTS, 12).output_ids
  banned = sorted(set(plain[0][:3]))
  settings = [Sampling(logit_bias=tuple((t, -100.0) for t in banned)), Sampling(logit_bias=((42, 100.0),)),
              Sampling(), Sampling(logit_bias=((7, 3.0), (9, -2.5)))]
  prompts = PROMPTS + [PROMPTS[0]]
  got = gen.generate(prompts, 12, settings).output_ids
  assert got[1] == [42] * 12 and not set(got[0]) & set(banned) and got[2] == plain[2]
  for prompt, row, s in zip(prompts, got, settings):
    bias = SequenceBiasLogitsProcessor(sequence_bias=[[[t], b] for t, b in s.logit_bias]) if s.logit_bias else None
    assert row == hf_greedy(hf_model, prompt, 12, logits_processor=[bias] if bias else [])
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(2, 101)) * 3, jnp.float32)
  seen = jnp.zeros((2, 101), bool).at[:, :50].set(True)
  s = Sampling(1.0, top_k=20, repetition_penalty=1.5, logit_bias=((3, 5.0), (60, -4.0)))
  ops = SamplingOps.of([s])
  biased = logits.at[:, 3].add(5.0).at[:, 60].add(-4.0)
  np.testing.assert_allclose(sampling.process_logits(logits, ops, RowSampling.of([s] * 2), seen),
                             sampling.process_logits(biased, ops, RowSampling.of([dataclasses.replace(
                               s, logit_bias=())] * 2, ops), seen), rtol=1e-6)


def test_min_tokens_holds_the_stop_ids_back(tiny):
  """min_tokens: a row draws no stop id until it has generated that many tokens, then may (transformers' greedy
  generate with min_new_tokens gives the same tokens), next to a row without it that stops where it stops alone."""
  hf_model, _, gen, _ = tiny
  plain = gen.generate(PROMPTS, 12).output_ids
  stop = plain[0][2]  # the third token of the first prompt's greedy answer
  first = plain[0].index(stop) + 1  # where that prompt stops without min_tokens
  got = gen.generate(PROMPTS[:2], 12, [Sampling(min_tokens=6), Sampling()], stop_ids=[stop])
  assert len(got.output_ids[0]) > 6 > first and stop not in got.output_ids[0][:6]
  assert got.output_ids[1] == gen.generate([PROMPTS[1]], 12, stop_ids=[stop]).output_ids[0]
  ids = torch.tensor([PROMPTS[0]])
  with torch.no_grad():
    want = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=6,
                             do_sample=False, eos_token_id=stop, pad_token_id=stop)[0, len(PROMPTS[0]):].tolist()
  assert got.output_ids[0] == want[:len(got.output_ids[0])] and got.finish_reasons[0] == ("stop" if stop in want
                                                                                            else "length")


def test_prompts_sample_with_their_own_settings(tiny):
  """Rows of one batch set differently (greedy next to sampled; top-k, top-p, min-p; each penalty; one prompt twice
  with other settings, its second row copied from the first's) each give what their prompt gives in a batch where
  every prompt has its settings, with the same seed; so do continuous batching (rows refilled under other
  settings) and prefills in groups. Other temperatures run the same compiled programs."""
  _, model, gen, _ = tiny
  prompts = PROMPTS + [[8, 8, 2], [1, 2, 3, 4, 5, 6, 7], PROMPTS[0]]
  settings = [Sampling(), Sampling(1.2, 8, repetition_penalty=1.3), Sampling(0.9, top_p=0.8, presence_penalty=1.5),
              Sampling(1.5, min_p=0.2, frequency_penalty=0.7), Sampling(repetition_penalty=1.5, frequency_penalty=2.0),
              Sampling(1.0, 3)]
  mixed = gen.generate(prompts, 20, settings, seed=5)
  for i, s in enumerate(settings):
    alike = gen.generate(prompts, 20, s, seed=5)
    assert mixed.output_ids[i] == alike.output_ids[i], (i, s)
    np.testing.assert_allclose(mixed.output_logprobs[i], alike.output_logprobs[i], atol=1e-5)
  assert len({tuple(o) for o in mixed.output_ids}) == len(prompts)
  for rows, prefill_rows in ((2, None), (3, 1)):
    queued = Generator(model, batch_size=rows, prefill_rows=prefill_rows).generate(prompts, 20, settings, seed=5)
    assert queued.output_ids == mixed.output_ids
  warmer = [dataclasses.replace(s, temperature=1.1 * s.temperature) for s in settings]  # per-row values, not constants
  assert gen.generate(prompts, 20, warmer, seed=5).compile_seconds == 0  # of the compiled programs: no recompile
  with pytest.raises(ValueError, match="2 samplings and 6 seeds for 6 prompts"):
    gen.generate(prompts, 20, settings[:2])


def test_repetition_penalty_matches_transformers(tiny):
  """Greedy with a repetition penalty: a batch of prompts of different lengths (right-padded: the padding is not
  'seen'), each row equal to transformers' generate alone, and different from plain greedy."""
  hf_model, _, gen, _ = tiny
  s = Sampling(repetition_penalty=1.8)
  batch = gen.generate(PROMPTS, 30, s).output_ids
  assert batch != gen.generate(PROMPTS, 30).output_ids
  for prompt, row in zip(PROMPTS, batch):
    assert row == hf_greedy(hf_model, prompt, 30, repetition_penalty=1.8)
  grouped = Generator(tiny[1], prefill_rows=1)
  assert grouped.generate(PROMPTS, 30, s).output_ids == batch
  # what the penalty sees after the prefill: each row's prompt and first token, not its padding (id 0)
  tokens = np.zeros((4, 32), np.int32)
  lengths = np.array([len(p) for p in PROMPTS] + [0], np.int32)
  for i, p in enumerate(PROMPTS):
    tokens[i, :len(p)] = p
  keys = decoding.prompt_keys(0, range(4))
  state = decoding.empty_state(keys, jnp.full((4,), -1), cfg=gen.config, rows=4, cache_len=64, max_new=16,
                               dtype=jnp.float32, ops=SamplingOps.of([s]))
  state = decoding.prefill(gen.graphdef, gen.params, state, tokens, lengths, np.full((4,), 8, np.int32), keys,
                           RowSampling.of([s] * 4), None, None, ops=SamplingOps.of([s]))
  for i, p in enumerate(PROMPTS):
    assert set(np.flatnonzero(state.seen[i]).tolist()) == set(p) | {batch[i][0]}
  assert not state.seen[3].any()


def test_kept_cache_gives_the_tokens_of_a_fresh_prefill(tiny):
  """`keep` (conversation turns): a prompt that extends the last prompt and its reply runs only its new tokens
  over the kept cache (which grows when the conversation outgrows it) and gives the tokens a fresh prefill gives,
  greedy and sampled with a repetition penalty; a prompt sharing nothing starts over."""
  _, model, gen, _ = tiny
  chat = Generator(model, share_prefix=16)
  s = Sampling(temperature=1.1, top_k=6, repetition_penalty=1.4)
  for how, seed in ((Sampling(), 0), (s, 2)):
    history, expected_reuse = list(range(20)), 0
    for extra in ([], [3, 1, 4], [2, 7] * 12, [8]):  # the third turn outgrows the first 32-slot cache
      prompt = history + extra
      got = chat.generate([prompt], 12, how, seed, keep=True)
      assert got.output_ids == gen.generate([prompt], 12, how, seed).output_ids
      assert got.cached_tokens == [expected_reuse]
      expected_reuse = len(prompt) + len(got.output_ids[0]) - 1  # the reply's last token was never fed back
      history = prompt + got.output_ids[0]
    other = list(range(40, 60))
    got = chat.generate([other], 12, how, seed, keep=True)
    assert got.cached_tokens == [0] and got.output_ids == gen.generate([other], 12, how, seed).output_ids
    chat.generate([[1]], 2)  # a call without `keep` drops the kept cache
    assert chat.generate([other + [1]], 4, keep=True).cached_tokens == [0]


@pytest.mark.parametrize("cache", ["auto", "int8"])
def test_a_finished_row_keeps_its_prompt_and_output(tiny, cache):
  """A finished row holds its prompt's and output's keys and values until a prompt takes it: a prompt continuing
  them (a conversation's next turn) runs only its new ids, in place, in the same call (continuous batching) or,
  with `keep`, in the next; a prompt sharing only their first ids copies those into the row freed longest ago,
  so the row keeps the rest for its own next turn. Each prompt gets the tokens and log-probabilities of
  prefilling it alone (sampled, with a repetition penalty)."""
  _, model, _, _ = tiny
  rng = np.random.default_rng(3)
  system = rng.integers(0, 100, 20).tolist()
  a, b, d = (system + [100] + rng.integers(0, 100, n).tolist() for n in (29, 25, 29))  # 21 ids in common
  s = Sampling(temperature=1.5, top_k=8, repetition_penalty=1.3)
  alone = Generator(model, kv_cache_dtype=cache, share_prefix=0)

  def check(got, prompts, limits, cached):  # each prompt against itself alone, with its random stream
    assert got.cached_tokens == cached
    for i, (p, m) in enumerate(zip(prompts, limits, strict=True)):
      want = alone.generate([p], m, s, seed=[Stream(2, i)])
      assert got.output_ids[i] == want.output_ids[0]
      np.testing.assert_allclose(got.output_logprobs[i], want.output_logprobs[0], atol=1e-5)

  out_a = alone.generate([a], 5, s, seed=[Stream(2, 0)]).output_ids[0]
  turn = a + out_a + [7, 8, 9]
  # rows [a, b (copies the 21 from a's row)]; a ends after 5 tokens, and its next turn takes its row in place
  prompts, limits = [a, b, turn], [5, 12, 6]
  check(Generator(model, batch_size=2, kv_cache_dtype=cache, share_prefix=16).generate(prompts, limits, s, seed=2),
        prompts, limits, [0, 21, len(a) + 5 - 1])
  chat = Generator(model, kv_cache_dtype=cache, share_prefix=16)
  first = chat.generate([a, b], [3, 8], s, seed=2, keep=True)  # a's row is freed first
  check(first, [a, b], [3, 8], [0, 21])
  # d shares 21 ids with b's row (the last freed), which would lose its 32 others: it copies them into a's row (freed
  # longest ago), and b's next turn takes b's row in place; a call without `keep` starts afresh
  prompts = [d, b + first.output_ids[1] + [4]]
  check(chat.generate(prompts, 4, s, seed=2, keep=True), prompts, [4, 4], [21, len(b) + 8 - 1])
  prompts = [prompts[1] + [5]]
  check(chat.generate(prompts, 4, s, seed=2), prompts, [4], [0])
  assert chat._kept is None


@pytest.mark.parametrize("cache", ["auto", "int8"])
def test_prefix_pool_keeps_what_taken_rows_held(tiny, cache):
  """With one decode row, each prompt takes the row another conversation's turn left: the prefix pool keeps what
  the row held, so a conversation's next turn copies its history from the pool (as from a row) and runs only its
  new ids, with the tokens and log-probabilities of prefilling it alone, while what the row held takes the entry's
  place. Without the pool every turn runs whole. In one call too: X, then Y (X's row saved), then X's next turn."""
  _, model, _, _ = tiny
  rng = np.random.default_rng(5)
  s = Sampling(temperature=1.5, top_k=8, repetition_penalty=1.3)
  alone = Generator(model, kv_cache_dtype=cache, share_prefix=0)
  pooled = Generator(model, batch_size=1, kv_cache_dtype=cache, share_prefix=16, prefix_pool=2)
  unpooled = Generator(model, batch_size=1, kv_cache_dtype=cache, share_prefix=16)
  histories = {c: rng.integers(0, 100, 30).tolist() for c in "ABC"}

  def turn(c: str, cached: int, unpooled_cached: int = 0) -> None:  # conversation c's next turn, checked
    prompt = histories[c] + rng.integers(0, 100, 3).tolist()
    got = pooled.generate([prompt], 6, s, seed=[Stream(4, 0)], keep=True)
    want = alone.generate([prompt], 6, s, seed=[Stream(4, 0)])
    assert got.output_ids == want.output_ids and got.cached_tokens == [cached]
    np.testing.assert_allclose(got.output_logprobs[0], want.output_logprobs[0], atol=1e-5)
    assert unpooled.generate([prompt], 6, s, seed=[Stream(4, 0)], keep=True).cached_tokens == [unpooled_cached]
    histories[c] = prompt + got.output_ids[0]

  turn("A", 0)
  turn("B", 0)  # takes A's row: the pool keeps A
  turn("A", len(histories["A"]) - 1)  # from the pool (the reply's last token was never fed back): the row and
  turn("C", 0)  # A's entry trade places (B in the pool); now A's row goes to the other entry
  turn("B", len(histories["B"]) - 1)  # three conversations take turns in one row and two entries
  turn("A", len(histories["A"]) - 1)
  turn("C", len(histories["C"]) - 1)
  turn("C", len(histories["C"]) - 1, len(histories["C"]) - 1)  # the row holds it: in place, pool or not
  x, y = rng.integers(0, 100, 30).tolist(), rng.integers(0, 100, 30).tolist()
  out_x = alone.generate([x], 4, s, seed=[Stream(4, 0)]).output_ids[0]
  prompts = [x, y, x + out_x + [7]]
  got = pooled.generate(prompts, 4, s, seed=4)
  assert got.cached_tokens == [0, 0, len(x) + 4 - 1]
  for i, p in enumerate(prompts):
    assert got.output_ids[i] == alone.generate([p], 4, s, seed=[Stream(4, i)]).output_ids[0]
  assert pooled._pool is None  # a call without `keep` drops it


def test_pool_entry_to_save_into():
  """Pool.target: an entry a row's ids extend (its conversation's earlier turn), else an empty one, else the
  least recently used if used before the row was freed; none when an entry holds the ids already, or every
  entry free of this placement holds something more recent."""
  pool = Pool(3)
  pool.holds, pool.used = [[1, 2, 3], None, [7, 8]], [5.0, 0.0, 1.0]
  assert pool.target([1, 2, 3, 4, 5], 2.0, busy=set()) == 0
  assert pool.target([1, 2, 3, 4, 5], 2.0, busy={0}) == 1
  assert pool.target([1, 2], 2.0, busy=set()) == -1  # entry 0 holds [1, 2] already
  pool.holds[1], pool.used[1] = [9, 9], 3.0
  assert pool.target([4, 4, 4], 2.0, busy=set()) == 2  # least recently used, before 2.0
  assert pool.target([4, 4, 4], 0.5, busy=set()) == -1  # each entry was used after it
  assert pool.target([4, 4, 4], 9.0, busy={2}) == 1


def test_out_of_device_memory_is_one_line_naming_the_flags(tiny, monkeypatch):
  _, _, gen, _ = tiny
  monkeypatch.setattr(generate, "empty_state", lambda *a, **k: jnp.zeros((1 << 20, 1 << 20)))  # 4 TB: XLA refuses
  with pytest.raises(UserError, match=r"out of device memory running 4 rows x 32 cache slots .*--batch-size"):
    gen.generate(PROMPTS, 4)


def test_stops_on_eos(tiny):
  _, _, gen, _ = tiny
  free = gen.generate([PROMPTS[0]], 20)
  stop = free.output_ids[0][5]
  out = gen.generate([PROMPTS[0]], 20, stop_ids=[stop])
  assert out.output_ids[0] == free.output_ids[0][: free.output_ids[0].index(stop) + 1]
  assert free.finish_reasons == ["length"] and out.finish_reasons == ["stop"]


@pytest.mark.parametrize("flags,message", [
  (["--temperature", "-1"], "--temperature"),
  (["--top-p", "0"], "--top-p"),
  (["--top-k", "-2"], "--top-k"),
  (["--repetition-penalty", "0"], "--repetition-penalty"),
  (["--min-p", "1.5"], "--min-p must be in [0, 1]"),
  (["--presence-penalty", "3"], "--presence-penalty must be in [-2, 2]"),
  (["--frequency-penalty", "-2.5"], "--frequency-penalty must be in [-2, 2]"),
  (["--input-ids", "1,x"], "--input-ids"),
  (["--input-ids", "100000"], "outside the vocabulary"),
  (["--prompt", "hello"], "tokenizer.json"),
  (["--input-ids", ",".join(["1"] * 300)], "context"),
  (["--max-new-tokens", "0", "--input-ids", "1"], "--max-new-tokens"),
  (["--prefill-rows", "0"], "--prefill-rows"),
  (["--batch-size", "0"], "--batch-size"),
  (["--prefix-pool", "-1"], "--prefix-pool must be >= 0 and needs --share-prefix > 0, got -1 and 64"),
  (["--prefix-pool", "4", "--share-prefix", "0"], "--prefix-pool must be >= 0 and needs --share-prefix > 0, got 4"),
  (["--logprobs"], "--logprobs adds a key to the --json objects"),
  (["--top-logprobs", "2"], "--top-logprobs adds a key to the --json objects"),
  (["--top-logprobs", "21", "--json"], "--top-logprobs must be in [0, 20], got 21"),
  (["--min-tokens", "-1"], "--min-tokens must be in [0, 2^31), got -1"),
  (["--seed", str(2 ** 64)], f"--seed must be in [-2^63, 2^64), got {2 ** 64}"),
  (["--logit-bias", "5"], "--logit-bias takes ID=BIAS,... (such as 151643=-100), got '5'"),
  (["--logit-bias", "5=300"], "--logit-bias takes token ids >= 0 and biases in [-100, 100], got 5: 300.0"),
  (["--logit-bias", "1000=1"], "prompt 1: logit_bias id 1000 is outside the vocabulary [0, 101)"),
  (["--attention", "cudnn"], "needs a GPU"),
  (["--attention", "splash"], "needs a TPU"),
  (["--decode-attention", "pallas"], "needs a GPU"),
  (["--expert-backend", "tokamax"], "needs tokamax"),
  (["--shutdown-timeout", "-1"], "--shutdown-timeout must be >= 0 seconds, got -1.0"),
  (["--shutdown-timeout", "5"], "--shutdown-timeout and --allowed-origins are --serve's"),
  (["--max-model-len", "64"], "--max-model-len, --served-model-name and --lora-modules are --serve's and "
   "--batch-file's"),
  (["--allowed-origins", "*"], "--allowed-origins are --serve's"),
  (["--allowed-origins", "localhost:3000"], "--allowed-origins: 'localhost:3000' is not an origin (scheme://host[:port]"),
  (["--allowed-origins", "[3000]"], "--allowed-origins takes ORIGIN,... or a JSON list of them, got '[3000]'"),
])
def test_cli_bad_values(tiny, flags, message):
  ckpt = tiny[3]
  args = ["--checkpoint", str(ckpt), *flags]
  if not any(f in flags for f in ("--input-ids", "--prompt")):
    args += ["--input-ids", "1,2"]
  res = infer(*args)
  assert res.returncode == 2, res.stderr
  assert message in res.stderr and "Traceback" not in res.stderr
  assert len(res.stderr.strip().splitlines()) == 1


def test_sampling_settings_from_generation_config(tmp_path):
  import infer as cli

  qwen_chat = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05}
  flags = cli.parse_args(["--demo"])
  sampling_from = lambda flags, gen: cli.sampling_from(flags, gen, tmp_path, Grammars(None))  # noqa: E731
  assert sampling_from(flags, qwen_chat) == Sampling(0.7, 20, 0.8, 1.05)
  assert sampling_from(flags, dict(qwen_chat, do_sample=False)) == Sampling(repetition_penalty=1.05)
  assert sampling_from(flags, {}) == Sampling()
  assert sampling_from(flags, dict(qwen_chat, min_p=0.05)) == Sampling(0.7, 20, 0.8, 1.05, min_p=0.05)
  with pytest.raises(UserError, match="generation_config.json: min_p must be in"):
    sampling_from(flags, dict(qwen_chat, min_p=2))
  flags = cli.parse_args(["--demo", "--temperature", "0", "--repetition-penalty", "1.2"])
  assert sampling_from(flags, qwen_chat) == Sampling(0.0, 20, 0.8, 1.2)


def test_generation_config_repetition_penalty(tiny, tmp_path):
  """generation_config.json's repetition_penalty applies to greedy decoding too (as transformers' generate does
  with the model's generation config); the flag overrides it; a bad value is one line naming the file and key."""
  hf_model, _, _, ckpt = tiny
  folder = shutil.copytree(ckpt, tmp_path / "ckpt")
  path = folder / "generation_config.json"
  gen = dict(json.loads(path.read_text()) if path.is_file() else {}, do_sample=False, repetition_penalty=1.8)
  path.write_text(json.dumps(gen))
  prompt = PROMPTS[1]
  args = ["--checkpoint", str(folder), "--input-ids", ",".join(map(str, prompt)), "--dtype", "float32",
          "--max-new-tokens", "20", "--json"]

  def output_ids(*flags: str) -> list[int]:
    res = infer(*args, *flags)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])["output_ids"]

  assert output_ids() == hf_greedy(hf_model, prompt, 20, repetition_penalty=1.8)
  assert output_ids("--repetition-penalty", "1") == hf_greedy(hf_model, prompt, 20)
  for value, message in (("high", "repetition_penalty must be a number"), (0, "repetition_penalty must be > 0")):
    path.write_text(json.dumps(dict(gen, repetition_penalty=value)))
    res = infer(*args)
    assert res.returncode == 2 and f"generation_config.json: {message}" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_cli_missing_checkpoint(tmp_path):
  res = infer("--checkpoint", str(tmp_path / "nope"), "--input-ids", "1")
  assert res.returncode == 2 and "nope" in res.stderr and "Traceback" not in res.stderr


def test_prompts_file_is_one_batch(tiny, tmp_path):
  """A file's lines join the flags' prompts in one batch, each with its own max_new_tokens and sampling settings
  over the flags'; bad lines are one error naming the line (and the key)."""
  _, model, gen, ckpt = tiny
  prompts = tmp_path / "prompts.jsonl"
  sampled = {"temperature": 1.3, "top_k": 5, "frequency_penalty": 1.0, "min_p": 0.05, "top_logprobs": 2}
  prompts.write_text(json.dumps({"input_ids": PROMPTS[0], "max_new_tokens": 5}) + "\n\n" +
                     json.dumps({"input_ids": PROMPTS[2], "logit_bias": {"17": 100}}) + "\n" +
                     json.dumps({"input_ids": PROMPTS[1], **sampled}))
  int8 = Generator(model, kv_cache_dtype="int8")
  asked = [[3, 1, 4], PROMPTS[0], PROMPTS[2], PROMPTS[1]], [20, 5, 20, 20], [
    Sampling(), Sampling(), Sampling(logit_bias=((17, 100.0),)), Sampling(**sampled)]
  # one batch, or one row that the prompts take in turn; an int8 cache
  for flags, gen in (([], gen), (["--batch-size", "1"], gen), (["--kv-cache-dtype", "int8"], int8)):
    res = infer("--checkpoint", str(ckpt), "--prompts-file", str(prompts), "--input-ids", "3,1,4", "--dtype",
                "float32", "--temperature", "0", "--max-new-tokens", "20", "--json", "--seed", "3", *flags)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(x) for x in res.stdout.splitlines()]
    assert [r["input_ids"] for r in rows] == asked[0]  # flags first, then the file
    want = gen.generate(*asked, seed=3)
    assert [r["output_ids"] for r in rows] == want.output_ids and rows[2]["output_ids"] == [17] * 20
    top, want_top = rows[3]["output_top_logprobs"], want.output_top_logprobs[3]
    assert "output_top_logprobs" not in rows[0] and len(top) == len(want_top)
    for pairs, want_pairs in zip(top, want_top):  # [[id, logprob], [id, logprob]] at each token
      assert [i for i, _ in pairs] == [i for i, _ in want_pairs]
      np.testing.assert_allclose([lp for _, lp in pairs], [lp for _, lp in want_pairs], atol=1e-5)
  assert rows[3]["output_ids"] != gen.generate([PROMPTS[1]], 20).output_ids[0]  # sampled, not greedy
  for bad, message in (('{"prompt": "a", "chat": "b"}', "expected an object with exactly one of"),
                       ('{"input_ids": [2], "max_new_tokens": 0}', "max_new_tokens must be an integer >= 1"),
                       ('{"input_ids": [2], "temperature": "hot"}', "temperature must be a number, got 'hot'"),
                       ('{"input_ids": [2], "top_k": 2.5}', "top_k must be an integer, got 2.5"),
                       ('{"input_ids": [2], "top_p": 0}', "top_p must be in (0, 1], got 0.0"),
                       ('{"input_ids": [2], "presence_penalty": 9}', "presence_penalty must be in [-2, 2]"),
                       ('{"input_ids": [2], "top_logprobs": 25}', "top_logprobs must be in [0, 20], got 25"),
                       ('{"input_ids": [2], "logit_bias": [5]}', "logit_bias must be an object of token ids"),
                       ('{"input_ids": [2], "logit_bias": {"5": "x"}}', 'logit_bias["5"] must be a number')):
    prompts.write_text('{"input_ids": [1]}\n' + bad + "\n")
    res = infer("--checkpoint", str(ckpt), "--prompts-file", str(prompts))
    assert res.returncode == 2 and f"prompts.jsonl:2: {message}" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
  prompts.write_text('{"input_ids": [1]}\n{"input_ids": [2], "temperature": 0}\n')
  res = infer("--checkpoint", str(ckpt), "--prompts-file", str(prompts), "--temperature", "1", "--num-samples", "2")
  assert res.returncode == 2 and "prompts.jsonl:2: --num-samples 2 draws different samples" in res.stderr, res.stderr


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
  """The demo's checkpoint: a tokenizer, and text out of random weights."""
  tmp = tmp_path_factory.mktemp("demo")
  write_hf_demo(tmp / "hf")
  convert.import_hf(tmp / "hf", tmp / "ckpt", progress=False)
  return tmp / "ckpt"


def test_stop_strings_end_the_text(demo_ckpt, tmp_path):
  """--stop: the text ends where the stop string begins and the ids at the token that completed it (a prefix of
  the ids without it), in --json and streamed; a prompts-file line's "stop" replaces the flag's; bad stop
  strings are one error line."""
  common = ["--checkpoint", str(demo_ckpt), "--prompt", "Expert parallelism places", "--max-new-tokens", "40",
            "--temperature", "0", "--dtype", "float32"]
  free = json.loads(infer(*common, "--json").stdout.splitlines()[-1])
  text, ids = free["text"], free["output_ids"]
  stop = text[len(text) // 2:len(text) // 2 + 3]
  assert len(ids) == 40 and stop.strip()
  want = text[:text.find(stop)]
  res = infer(*common, "--json", "--stop", stop, "--stop", "never there")
  assert res.returncode == 0, res.stderr
  out = json.loads(res.stdout.splitlines()[-1])
  assert out["text"] == want and out["output_ids"] == ids[:len(out["output_ids"])] and len(out["output_ids"]) < 40
  assert (out["finish_reason"], free["finish_reason"]) == ("stop", "length")
  tok = load_tokenizer(demo_ckpt)
  assert stop in tok.decode(out["output_ids"]) and stop not in tok.decode(out["output_ids"][:-1])
  streamed = infer(*common, "--stop", stop)
  assert streamed.returncode == 0 and streamed.stdout == want + "\n", streamed.stderr
  lines = tmp_path / "prompts.jsonl"
  lines.write_text(json.dumps({"prompt": "Expert parallelism places", "stop": [stop]}) + "\n" +
                   json.dumps({"prompt": "Expert parallelism places"}) + "\n")
  res = infer(*common[:2], "--prompts-file", str(lines), *common[4:], "--json", "--batch-size", "1")
  assert [json.loads(x)["text"] for x in res.stdout.splitlines()] == [want, text], res.stderr
  for flags, message in ((["--stop", ""], "--stop: stop strings must be non-empty strings"),
                         (["--prompts-file", str(lines)], "prompts.jsonl:1: stop must be a string or a list")):
    lines.write_text(json.dumps({"prompt": "a", "stop": 5}) + "\n")
    res = infer(*common, *flags)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_streaming_holds_back_what_may_begin_a_stop_string(demo_ckpt, capsys):
  """Streamed text, fed one token at a time (and past the stop string), shows exactly the text before the stop
  string: never its start ahead of knowing it completes, nothing after it."""
  import infer as cli

  tok = load_tokenizer(demo_ckpt)
  text = "the experts and the router decide where each token goes"
  for stop, shown in (("router decide", "the experts and the "), ("each tokens", text), ("e", "th")):
    printer = cli.Printer(tok, StopStrings(tok, [stop]))
    for i in tok.encode(text):
      printer(0, Piece([i], [0.0], []))
    printer.close()
    assert capsys.readouterr().out == shown + "\n"


def test_num_samples_draws_each_prompt_several_times(tiny):
  """--num-samples N: each prompt's samples in a row, marked "sample", as the engine gives the prompt repeated N
  times (each with its own random stream); greedy decoding refuses it."""
  _, _, gen, ckpt = tiny
  a, b = PROMPTS[0], PROMPTS[2]
  common = ["--checkpoint", str(ckpt), "--input-ids", ",".join(map(str, a)), "--input-ids", ",".join(map(str, b)),
            "--dtype", "float32", "--max-new-tokens", "12", "--json"]
  res = infer(*common, "--temperature", "1.5", "--top-k", "8", "--num-samples", "3", "--seed", "4")
  assert res.returncode == 0, res.stderr
  rows = [json.loads(x) for x in res.stdout.splitlines()]
  assert [(r["input_ids"], r["sample"]) for r in rows] == [(a, 0), (a, 1), (a, 2), (b, 0), (b, 1), (b, 2)]
  want = gen.generate([a] * 3 + [b] * 3, 12, Sampling(temperature=1.5, top_k=8), seed=4).output_ids
  assert [r["output_ids"] for r in rows] == want and len({tuple(o) for o in want[:3]}) > 1
  greedy = infer(*common, "--temperature", "0", "--num-samples", "2")
  assert greedy.returncode == 2 and "--num-samples 2 draws different samples" in greedy.stderr, greedy.stderr


def test_share_prefix_flag(tiny, tmp_path):
  """--share-prefix N: prompts of a file beginning with the same 20 tokens copy them (counted in the summary
  line) and print what they print with --share-prefix 0; a negative N is refused."""
  _, _, _, ckpt = tiny
  head = list(range(30, 50))
  lines = [{"input_ids": head + tail} for tail in ([1, 2], [3], [4, 5, 6])]
  (tmp_path / "p.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  common = ["--checkpoint", str(ckpt), "--prompts-file", str(tmp_path / "p.jsonl"), "--dtype", "float32",
            "--max-new-tokens", "8", "--json", "--temperature", "0"]
  shared, alone = infer(*common, "--share-prefix", "16"), infer(*common, "--share-prefix", "0")
  assert shared.returncode == 0 and alone.returncode == 0, shared.stderr + alone.stderr
  assert shared.stdout == alone.stdout and len(shared.stdout.splitlines()) == 3
  assert "prompt tokens: 66 (40 copied from other prompts' rows)" in shared.stderr, shared.stderr
  assert "prompt tokens: 66, generated" in alone.stderr
  bad = infer(*common, "--share-prefix", "-1")
  assert bad.returncode == 2 and "--share-prefix must be >= 0, got -1" in bad.stderr, bad.stderr


def test_expert_dtype_int8_flag(tiny):
  """infer.py --expert-dtype int8 generates what the engine generates with the experts restored as int8."""
  _, _, _, ckpt = tiny
  res = infer("--checkpoint", str(ckpt), "--input-ids", "5,7,9,11", "--dtype", "float32", "--max-new-tokens", "8",
              "--json", "--temperature", "0", "--expert-dtype", "int8")
  assert res.returncode == 0, res.stderr
  model = checkpoint.restore(ckpt, dtype=jnp.float32, kernels=Kernels(expert_dtype="int8"))
  assert model.layers[0].mlp.experts_wi[...].dtype == jnp.int8
  want = Generator(model).generate([[5, 7, 9, 11]], 8).output_ids[0]
  assert json.loads(res.stdout.splitlines()[-1])["output_ids"] == want


def test_int8_experts_are_converted_where_they_are_used():
  """int8 experts are converted next to their matmuls. A forward pass over 8 layers holds one layer's converted
  experts at a time (XLA had converted every layer's experts_wo at the program's start, optimization barrier or
  not: temporaries grew by a layer's float32 experts per layer), and the decode loop converts inside the loop
  (XLA had hoisted every layer's experts_wo, converted, out of it: twice the temporaries)."""
  cfg = dataclasses.replace(demo_config(vocab_size=512), num_hidden_layers=8, num_experts=64)
  layer = 4 * 64 * cfg.hidden_size * 3 * cfg.moe_intermediate_size  # one layer's experts in float32
  forward, loop = {}, {}
  for dtype in ("auto", "int8"):
    graphdef, params = abstract_model(cfg, jnp.float32, kernels=Kernels("dense", expert_dtype=dtype))
    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)  # (the dense kernel: XLA's CPU ragged_dot has big temporaries)
    run = lambda p, t: nnx.merge(graphdef, p)(t, jnp.broadcast_to(jnp.arange(16), t.shape)).hidden  # noqa: E731,B023
    forward[dtype] = jax.jit(run).lower(params, tokens).compile().memory_analysis().temp_size_in_bytes
    graphdef, params = abstract_model(cfg, jnp.float32, kernels=Kernels(expert_dtype=dtype))
    state = jax.eval_shape(lambda: decoding.empty_state(decoding.prompt_keys(0, range(16)), jnp.full((4,), -1),
                                                        cfg=cfg, rows=16, cache_len=256, max_new=16, dtype=jnp.float32))
    with jax.set_mesh(sharding.make_mesh({}, jax.devices()[:1])):
      compiled = decoding.decode.lower(graphdef, params, state, jax.ShapeDtypeStruct((), bool), steps=4,
                                       ops=SamplingOps()).compile()
    loop[dtype] = compiled.memory_analysis().temp_size_in_bytes
  print(f"forward temporaries {forward}, decode loop {loop}, a layer's float32 experts {layer}")
  assert forward["int8"] < forward["auto"] + layer, forward
  assert loop["int8"] < loop["auto"] + layer, loop


def test_identical_prompts_are_prefilled_once(tiny):
  """Identical prompts prefilled in one call (--num-samples) run once and fill each of their rows: every sample
  gets the tokens and log-probabilities it gets prefilled alone (its own random stream, its own penalty), in the
  first prefill and when rows freed at once are refilled together, over a float and an int8 cache."""
  _, model, _, _ = tiny
  a, b, c = PROMPTS
  prompts = [a, a, b, b, a, c, b]
  s = Sampling(temperature=1.5, top_k=8, repetition_penalty=1.3)
  for cache in ("auto", "int8"):
    want = Generator(model, batch_size=1, kv_cache_dtype=cache).generate(prompts, 10, s, seed=2)  # nothing shared
    assert want.shared_tokens == 0 and len({tuple(want.output_ids[i]) for i in (0, 1, 4)}) > 1
    # all rows in one call: a runs once for 3 rows, b once for 3; two rows: [a, a], then [b, b] (both rows end
    # at the same step), then [a, c], then [b]
    for engine, shared in ((Generator(model, kv_cache_dtype=cache), 2 * len(a) + 2 * len(b)),
                           (Generator(model, batch_size=2, kv_cache_dtype=cache), len(a) + len(b))):
      got = engine.generate(prompts, 10, s, seed=2)
      assert got.output_ids == want.output_ids and got.shared_tokens == shared
      for lp, ref in zip(got.output_logprobs, want.output_logprobs, strict=True):
        np.testing.assert_allclose(lp, ref, atol=1e-5)


@pytest.mark.parametrize("cache", ["auto", "int8"])
def test_a_freed_row_copies_a_running_sample(tiny, cache):
  """A freed row whose next prompt another row is generating from (samples ending at different steps) copies
  that row's cache and draws its first token in the next decode step: the tokens and log-probabilities of
  prefilling it alone (sampled, with a repetition penalty), the prompt tokens but the last (which the decode step
  runs) counted as shared."""
  _, model, _, _ = tiny
  a, b, c = PROMPTS
  prompts, limits = [a, b, a, c], [12, 3, 9, 2]
  s = Sampling(temperature=1.5, top_k=8, repetition_penalty=1.3)
  want = Generator(model, batch_size=1, kv_cache_dtype=cache).generate(prompts, limits, s, seed=2)
  # rows [a, b]; after step 2 row 1 (b's keys and values, b's ids seen) takes the second a, copied from row 0;
  # after step 11 both end and row 0 takes c
  gen = Generator(model, batch_size=2, kv_cache_dtype=cache)
  got = gen.generate(prompts, limits, s, seed=2)
  assert got.output_ids == want.output_ids and got.shared_tokens == len(a) - 1
  for lp, ref in zip(got.output_logprobs, want.output_logprobs, strict=True):
    np.testing.assert_allclose(lp, ref, atol=1e-5)
  # the forked row as the decode step finds it: the source's cache, the prompt's last id at its position,
  # nothing generated yet, the prompt's ids alone seen; the source row untouched
  keys = decoding.prompt_keys(2, range(2))
  state = decoding.empty_state(keys, jnp.full((4,), -1), cfg=gen.config, rows=2, cache_len=32, max_new=16,
                               dtype=gen.cache_dtype, ops=SamplingOps.of([s]))
  tokens = np.zeros((2, 32), np.int32)
  tokens[0, :len(b)], tokens[1, :len(a)] = b, a
  state = decoding.prefill(gen.graphdef, gen.params, state, tokens, np.array([len(b), len(a)], np.int32),
                           np.array([8, 8], np.int32), keys, RowSampling.of([s] * 2), None, None,
                           ops=SamplingOps.of([s]))
  cache_before, seen_before, count_before = [np.asarray(x) for x in jax.tree.leaves(state.cache)], *map(
    np.asarray, (state.seen, state.count))  # the state is donated to fork
  ids = np.full((2, 8), -1, np.int32)
  ids[0, :len(a)] = a
  kv = decoding.prompt_slots(state.cache, np.array([1, 0], np.int32), ids)
  state = decoding.fork(state, np.array([0, 2], np.int32), kv, ids, np.array([5, 1], np.int32),
                        decoding.prompt_keys(2, [7, 0]), RowSampling.of([s] * 2))  # the second row: past the
  # state's, unused
  for got_c, was in zip(jax.tree.leaves(state.cache), cache_before, strict=True):  # slots [0, 8) of row 1
    np.testing.assert_array_equal(got_c[0, :, :8], was[1, :, :8])
    np.testing.assert_array_equal(got_c[0, :, 8:], was[0, :, 8:])  # the rest: row 0's own, hidden by the mask
    np.testing.assert_array_equal(got_c[1], was[1])
  assert (state.last[0], state.positions[0], state.count[0], state.done[0], state.limit[0]) == (a[-1], 3, 0, 0, 5)
  assert set(np.flatnonzero(state.seen[0]).tolist()) == set(a)
  assert np.array_equal(state.seen[1], seen_before[1]) and state.count[1] == count_before[1]


def test_a_copied_prompt_longer_than_its_bucket_fits_the_cache():
  """A 520-token prompt copied from a running row (whole, or its first 510 ids): its power-of-two bucket (1,024)
  is longer than the cache (768 slots for 530 positions), so the copy takes the cache's slots, as a prefill
  would; the rows get the tokens of prefilling each alone."""
  cfg, _, model = demo_model("float32")
  a = np.random.default_rng(0).integers(0, cfg.vocab_size, 520).tolist()
  assert generate.bucket(len(a)) > cache_bucket(len(a) + 10)
  # the short one ends first: its row takes a copied from row 0, or a's first 510 ids and runs its own 10
  for third, shared in ((a, len(a) - 1), (a[:510] + [7] * 10, 510)):
    prompts, limits = [a, [5, 6], third], [10, 3, 10]
    got = Generator(model, batch_size=2).generate(prompts, limits)
    assert got.shared_tokens == shared
    assert got.output_ids == Generator(model, batch_size=1).generate(prompts, limits).output_ids


def test_results_are_written_in_input_order_as_they_complete():
  import infer as cli

  written = []
  in_order = cli.InOrder(lambda k, text: written.append((k, text)))
  for k in (2, 0, 4, 3):
    in_order(k, f"r{k}")
  assert written == [(0, "r0")]  # 2, 3 and 4 wait for 1
  in_order(1, "r1")
  assert written == [(k, f"r{k}") for k in range(5)]


def test_compile_cache_is_reused(tiny, tmp_path):
  """The default cache folder fills (capped: entries carry access times); a second run with the same shapes
  names it explicitly, loads every program from it (no new entry) and gives the same tokens."""
  ckpt, cache = tiny[3], tmp_path / "qwen-moe-jax" / "xla"
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"} | {"XDG_CACHE_HOME": str(tmp_path)}
  args = ["--checkpoint", str(ckpt), "--input-ids", "3,1,4", "--dtype", "float32", "--temperature", "0",
          "--max-new-tokens", "20", "--json"]
  first = infer(*args, env=env)  # conftest's environment caches every compile, however fast
  assert first.returncode == 0, first.stderr
  entries = sorted(p.name for p in cache.iterdir())
  assert any("prefill" in e and e.endswith("-atime") for e in entries), entries
  assert any("decode" in e for e in entries), entries
  second = infer(*args, "--compile-cache", str(cache), env=env)
  assert second.returncode == 0, second.stderr
  assert second.stdout == first.stdout
  assert sorted(p.name for p in cache.iterdir()) == entries
  assert infer(*args, "--compile-cache", "off").returncode == 0 and not (ROOT / "off").exists()
  (tmp_path / "file").write_text("x")
  bad = infer(*args, "--compile-cache", str(tmp_path / "file" / "xla"))
  assert bad.returncode == 2 and "--compile-cache" in bad.stderr and "Traceback" not in bad.stderr
  assert len(bad.stderr.strip().splitlines()) == 1


def test_demo_runs_end_to_end():
  """The README's main job: random HF checkpoint -> converter -> chat template -> streamed generation."""
  res = infer("--demo", "--max-new-tokens", "12")
  assert res.returncode == 0, res.stderr
  assert "RANDOM weights" in res.stderr and "generated tokens: " in res.stderr and "tokens/s" in res.stderr
  assert res.stdout.endswith("\n")


def test_prefix_index_finds_the_row_holding_the_longest_prefix(monkeypatch):
  a, b = list(range(100)), list(range(40)) + [7] * 30
  index = PrefixIndex()
  index.add(0, a)
  index.add(1, b)
  assert index.longest(list(range(50)) + [1, 2]) == (0, 50)  # 3 whole blocks match a (b: 2), then 2 more ids
  assert index.longest(b) == (1, 69)  # all but its last id
  assert index.longest(list(range(16))) == (-1, 0)  # no whole block before its last id
  assert index.longest([1] + list(range(1, 40))) == (-1, 0)
  monkeypatch.setattr(prefixes, "hash", lambda _: 0, raising=False)  # every block key collides
  index = PrefixIndex()
  index.add(0, a)
  assert index.longest(b) == (0, 40)  # the ids themselves decide how many are shared


@pytest.mark.parametrize("cache", ["auto", "int8"])
def test_prompts_sharing_a_prefix_copy_it(tiny, cache, monkeypatch):
  """Prompts that begin with the same ids (a few-shot prefix) copy them from a row holding them and run only the
  rest: in the first prefill (from a prompt prefilled before them in the same call) and when a freed row takes
  one (from a running row). Sampled with a repetition penalty, each gets the tokens and log-probabilities of
  prefilling it alone; a prefix shorter than `share_prefix` is run."""
  _, model, _, _ = tiny
  rng = np.random.default_rng(5)
  head = rng.integers(0, 50, 40).tolist()
  t0, t1, t2, t3 = ([50 + j] + rng.integers(0, 100, n).tolist() for j, n in enumerate((2, 8, 0, 19)))
  prompts = [head + t0, head + t1, PROMPTS[1], head + t2, head[:20] + t3, head + t1]
  limits = [12, 3, 6, 9, 5, 4]
  s = Sampling(temperature=1.5, top_k=8, repetition_penalty=1.3)
  want = Generator(model, batch_size=1, kv_cache_dtype=cache, share_prefix=0).generate(prompts, limits, s, seed=2)
  assert want.shared_tokens == 0
  # all rows: head + t0 prefilled with PROMPTS[1], the others copy 40 ids (head + t2: all but its last, which
  # the decode step runs) or 20 (head[:20] + t3) from its row; two rows: [p0, p1 copied], p2 prefilled when p1
  # ends, then p3 copied from p0's row, p4 from p3's, p5 from p0's or p3's; two prompts per prefill call: as all
  # rows; by default (64) nothing is this long, and the two head + t1 are prefilled in one call (run once)
  for engine, shared in ((Generator(model, kv_cache_dtype=cache, share_prefix=16), 40 + 40 + 20 + 40),
                         (Generator(model, kv_cache_dtype=cache, share_prefix=21), 40 + 40 + 40),
                         (Generator(model, batch_size=2, kv_cache_dtype=cache, share_prefix=16), 40 + 40 + 20 + 40),
                         (Generator(model, prefill_rows=2, kv_cache_dtype=cache, share_prefix=16), 40 + 40 + 20 + 40),
                         (Generator(model, kv_cache_dtype=cache), len(head + t1))):
    got = engine.generate(prompts, limits, s, seed=2)
    assert got.output_ids == want.output_ids and got.shared_tokens == shared
    for lp, ref in zip(got.output_logprobs, want.output_logprobs, strict=True):
      np.testing.assert_allclose(lp, ref, atol=1e-5)
  monkeypatch.setattr(generate, "COPY_SLOTS", 64)  # the prompts' 64 slots: one row per copy call
  got = Generator(model, kv_cache_dtype=cache, share_prefix=16).generate(prompts, limits, s, seed=2)
  assert got.output_ids == want.output_ids and got.shared_tokens == 40 + 40 + 20 + 40
