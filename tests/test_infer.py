"""infer.py and the generation engine against transformers' generate (fp32, greedy), end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_models import make_model, save
from qwen_moe_jax import checkpoint, convert, generate, layers, sampling
from qwen_moe_jax.errors import UserError
from qwen_moe_jax.generate import Generator, cache_bucket, prompt_logits
from qwen_moe_jax.kernels import Kernels
from qwen_moe_jax.sampling import Sampling

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


def hf_greedy(hf_model, prompt: list[int], n: int, repetition_penalty: float = 1.0) -> list[int]:
  ids = torch.tensor([prompt])  # the explicit mask: generate would take a token 0 in the prompt for padding
  with torch.no_grad():
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, eos_token_id=None, pad_token_id=0,
                            repetition_penalty=repetition_penalty)
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
    got = queued.generate(prompts, 24, stop_ids=stops, on_tokens=lambda i, ids: streamed[i].extend(ids))
    assert got.output_ids == want[0] and streamed == want[0]
    for lp, ref in zip(got.output_logprobs, one_batch.output_logprobs, strict=True):
      np.testing.assert_allclose(lp, ref, atol=1e-5)
    assert queued.generate(prompts, 24, s, seed=3).output_ids == want[1]
  limits = [3, 24, 1, 9, 17, 2, 12]  # one per prompt: each row ends at its own step
  assert Generator(model, batch_size=2).generate(prompts, limits).output_ids == \
      [row[:m] for row, m in zip(free, limits)]


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


def test_sampling_is_seeded_and_respects_top_k(tiny):
  hf_model, model, gen, _ = tiny
  s = Sampling(temperature=1.5, top_k=3)
  result = gen.generate(PROMPTS, 24, s, seed=1)
  a = result.output_ids
  assert a == gen.generate(PROMPTS, 24, s, seed=1).output_ids
  assert a != gen.generate(PROMPTS, 24, s, seed=2).output_ids
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


@pytest.mark.parametrize("penalty,temperature,top_k,top_p", [
  (1.3, 0.0, 0, 1.0), (1.3, 0.7, 0, 1.0), (0.8, 1.0, 7, 1.0), (1.05, 0.7, 20, 0.8), (1.0, 1.3, 0, 0.5)])
def test_processed_logits_match_transformers(penalty, temperature, top_k, top_p):
  """The logits a token is drawn from equal what transformers' processors leave (repetition penalty over the
  ids seen, then temperature, top-k, top-p), including which ids are dropped."""
  from transformers.generation import logits_process as hf
  rng = np.random.default_rng(int(penalty * 100 + top_k))
  logits = (3 * rng.standard_normal((4, 97))).astype(np.float32)
  ids = rng.integers(0, 97, (4, 30))  # a row's prompt and output so far
  procs = [hf.RepetitionPenaltyLogitsProcessor(penalty)]
  if temperature:
    procs += [hf.TemperatureLogitsWarper(temperature)] + ([hf.TopKLogitsWarper(top_k)] if top_k else []) + \
        ([hf.TopPLogitsWarper(top_p)] if top_p < 1 else [])
  want = hf.LogitsProcessorList(procs)(torch.tensor(ids), torch.tensor(logits)).numpy()
  s = Sampling(temperature, top_k, top_p, penalty)
  seen = sampling.mark_seen(jnp.zeros((4, 97), bool), jnp.asarray(ids)) if s.penalized else None
  got = np.asarray(sampling.process_logits(jnp.asarray(logits), s, seen))
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  plain = np.asarray(sampling.process_logits(jnp.asarray(logits), Sampling(temperature, top_k, top_p)))
  assert penalty == 1.0 or not np.allclose(got, plain)


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
  keys = generate.prompt_keys(0, range(4))
  state = generate.empty_state(keys, jnp.full((4,), -1), cfg=gen.config, rows=4, cache_len=64, max_new=16,
                               dtype=jnp.float32, track_seen=True)
  state = generate.prefill(gen.graphdef, gen.params, state, tokens, lengths, np.full((4,), 8, np.int32), keys,
                           np.int32(0), sampling=s)
  for i, p in enumerate(PROMPTS):
    assert set(np.flatnonzero(state.seen[i]).tolist()) == set(p) | {batch[i][0]}
  assert not state.seen[3].any()


def test_kept_cache_gives_the_tokens_of_a_fresh_prefill(tiny):
  """`keep` (conversation turns): a prompt that extends the last prompt and its reply runs only its new tokens
  over the kept cache (which grows when the conversation outgrows it) and gives the tokens a fresh prefill gives,
  greedy and sampled with a repetition penalty; a prompt sharing nothing starts over."""
  _, model, gen, _ = tiny
  chat = Generator(model)
  s = Sampling(temperature=1.1, top_k=6, repetition_penalty=1.4)
  for how, seed in ((Sampling(), 0), (s, 2)):
    history, expected_reuse = [5, 7, 9, 11], 0
    for extra in ([], [3, 1, 4], [2, 7] * 12, [8]):  # the third turn outgrows the first 32-slot cache
      prompt = history + extra
      got = chat.generate([prompt], 12, how, seed, keep=True)
      assert got.output_ids == gen.generate([prompt], 12, how, seed).output_ids
      assert got.reused_tokens == expected_reuse
      expected_reuse = len(prompt) + len(got.output_ids[0]) - 1  # the reply's last token was never fed back
      history = prompt + got.output_ids[0]
    other = chat.generate([[42, 43]], 12, how, seed, keep=True)
    assert other.reused_tokens == 0 and other.output_ids == gen.generate([[42, 43]], 12, how, seed).output_ids
    chat.generate([[1]], 2)  # a call without `keep` drops the kept cache
    assert chat.generate([[42, 43, 1]], 4, keep=True).reused_tokens == 0


def test_out_of_device_memory_is_one_line_naming_the_flags(tiny, monkeypatch):
  _, _, gen, _ = tiny
  monkeypatch.setattr(generate, "empty_state", lambda *a, **k: jnp.zeros((1 << 20, 1 << 20)))  # 4 TB: XLA refuses
  with pytest.raises(UserError, match=r"out of device memory running 4 rows x 32 cache slots .*--batch-size"):
    gen.generate(PROMPTS, 4)


def test_stops_on_eos(tiny):
  _, _, gen, _ = tiny
  free = gen.generate([PROMPTS[0]], 20).output_ids[0]
  stop = free[5]
  out = gen.generate([PROMPTS[0]], 20, stop_ids=[stop]).output_ids[0]
  assert out == free[: free.index(stop) + 1]


@pytest.mark.parametrize("flags,message", [
  (["--temperature", "-1"], "--temperature"),
  (["--top-p", "0"], "--top-p"),
  (["--top-k", "-2"], "--top-k"),
  (["--repetition-penalty", "0"], "--repetition-penalty"),
  (["--input-ids", "1,x"], "--input-ids"),
  (["--input-ids", "100000"], "outside the vocabulary"),
  (["--prompt", "hello"], "tokenizer.json"),
  (["--input-ids", ",".join(["1"] * 300)], "context"),
  (["--max-new-tokens", "0", "--input-ids", "1"], "--max-new-tokens"),
  (["--prefill-rows", "0"], "--prefill-rows"),
  (["--batch-size", "0"], "--batch-size"),
  (["--logprobs"], "--logprobs adds a key to the --json objects"),
  (["--attention", "cudnn"], "needs a GPU"),
  (["--expert-backend", "tokamax"], "needs tokamax"),
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
  assert cli.sampling_from(flags, qwen_chat, tmp_path) == Sampling(0.7, 20, 0.8, 1.05)
  assert cli.sampling_from(flags, dict(qwen_chat, do_sample=False), tmp_path) == Sampling(repetition_penalty=1.05)
  assert cli.sampling_from(flags, {}, tmp_path) == Sampling()
  flags = cli.parse_args(["--demo", "--temperature", "0", "--repetition-penalty", "1.2"])
  assert cli.sampling_from(flags, qwen_chat, tmp_path) == Sampling(0.0, 20, 0.8, 1.2)


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
  _, _, gen, ckpt = tiny
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps({"input_ids": PROMPTS[0], "max_new_tokens": 5}) + "\n\n" +
                     json.dumps({"input_ids": PROMPTS[2]}) + "\n")
  for flags in ([], ["--batch-size", "1"]):  # one batch, or one row that the prompts take in turn
    res = infer("--checkpoint", str(ckpt), "--prompts-file", str(prompts), "--input-ids", "3,1,4", "--dtype",
                "float32", "--temperature", "0", "--max-new-tokens", "20", "--json", *flags)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(x) for x in res.stdout.splitlines()]
    assert [r["input_ids"] for r in rows] == [[3, 1, 4], PROMPTS[0], PROMPTS[2]]  # flags first, then the file
    assert [r["output_ids"] for r in rows] == gen.generate([[3, 1, 4], PROMPTS[0], PROMPTS[2]], [20, 5, 20]).output_ids
  for bad in ('{"prompt": "a", "chat": "b"}', '{"input_ids": [2], "max_new_tokens": 0}'):
    prompts.write_text('{"input_ids": [1]}\n' + bad + "\n")
    res = infer("--checkpoint", str(ckpt), "--prompts-file", str(prompts))
    assert res.returncode == 2 and "prompts.jsonl:2" in res.stderr and "Traceback" not in res.stderr


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
