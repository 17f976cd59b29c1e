"""Training data: a JSONL file -> documents -> a deterministic, resumable stream of packed batches (numpy only).

Each non-blank line is a JSON object with exactly one key:
  {"messages": [{"role": ..., "content": "..."}, ...]}  rendered with the tokenizer's chat template. Loss only on
      the tokens each assistant message adds: its content and the end-of-turn tokens after it (`<|im_end|>\\n` in
      ChatML, so the model learns to stop), never on system / user turns or the `<|im_start|>assistant\\n` header.
      The text of each assistant message is encoded apart from the prompt before it, as it is generated at
      inference (transformers' tokenization of the whole text differs only where a message's text begins by
      merging with the prompt's end, e.g. an answer starting with a newline after the header's newline).
      Roles are system / user / assistant; tool roles and tool calls are refused (the contract has no keys for
      them). Messages after the last assistant message carry no loss and are dropped.
  {"text": "..."}          encoded, then eos appended (when an eos id is given); loss on every token.
  {"input_ids": [...]}     token ids as they are; loss on every token.
A document of n tokens gives n - 1 next-token targets. A text or input_ids document longer than a row is cut into
rows of seq_len tokens that overlap by one (each starts with the token the previous one ends with), so every
target is learned exactly once; a conversation must fit one row (it is never cut).
"""

from __future__ import annotations

import bisect
import codecs
import dataclasses
import hashlib
import itertools
import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from qwen_moe_jax.errors import UserError
from qwen_moe_jax.tokenizer import Tokenizer

KINDS = ("messages", "text", "input_ids")
ROLES = ("system", "user", "assistant")
FIELDS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")
INT32_LIMIT = 2**31  # batches are int32
CACHED_EPOCHS = 4  # packings kept by a BatchStream; a training run only moves forward
ENCODE_LINES = 1024  # read_jsonl: lines whose texts are encoded in one batch


@dataclasses.dataclass(frozen=True)
class Document:
  """One training document; a batch row holds one (pack=False) or several."""

  tokens: tuple[int, ...]  # [n] token ids
  loss_mask: tuple[int, ...]  # [n] 1 where that token is a prediction target (the first token never is)


@dataclasses.dataclass(frozen=True)
class Documents:
  """A sequence of Documents held in flat arrays, 5 bytes a token (Python tuples take about 50): document i is
  tokens[offsets[i]:offsets[i + 1]] with its loss_mask."""

  tokens: np.ndarray  # [total] int32
  loss_mask: np.ndarray  # [total] uint8
  offsets: np.ndarray  # [n + 1] int64

  @classmethod
  def of(cls, docs: Iterable[Document]) -> "Documents":
    docs = list(docs)
    lengths = np.array([len(d.tokens) for d in docs], np.int64)
    total = int(lengths.sum())
    return cls(np.fromiter(itertools.chain.from_iterable(d.tokens for d in docs), np.int32, total),
               np.fromiter(itertools.chain.from_iterable(d.loss_mask for d in docs), np.uint8, total),
               np.concatenate([[0], np.cumsum(lengths)]))

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)  # [n]

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> Document:
    if not 0 <= i < len(self):
      raise IndexError(i)
    part = slice(self.offsets[i], self.offsets[i + 1])
    return Document(tuple(self.tokens[part].tolist()), tuple(self.loss_mask[part].tolist()))


def fingerprint(path: str | Path) -> str:
  """First 16 hex digits of the sha256 of the file's bytes: tells a resumed run that its data file changed."""
  digest = hashlib.sha256()
  try:
    with open(path, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
  except OSError as e:
    raise UserError(f"{path}: cannot read the data file ({e.strerror})") from None
  return digest.hexdigest()[:16]


def read_jsonl(path: str | Path, tokenizer: Tokenizer | None, seq_len: int, eos_id: int | None) -> Documents:
  """Every line parsed and checked; the first bad one is a UserError naming `path:line`.

  tokenizer may be None when the file has only input_ids lines; eos_id (or None) ends each text document. The
  file is read ENCODE_LINES lines at a time, whose texts `tokenizers` encodes in one parallel batch.
  """
  tokens, masks, lengths = [], [], []  # per chunk of lines: its rows' tokens and loss masks, concatenated
  chunk: list[tuple[str, list[str], Finish]] = []

  def flush():  # the chunk's texts encoded at once, then its documents built and checked in line order
    encoded = tokenizer.encode_batch([t for _, texts, _ in chunk for t in texts]) if tokenizer else []
    rows, at = [], 0
    for where, texts, finish in chunk:
      doc_tokens, doc_mask = finish(encoded[at:at + len(texts)])
      at += len(texts)
      if not doc_mask.any():
        raise UserError(f"{where}: the document has no token to learn ({len(doc_tokens)} tokens, none a loss target)")
      rows += split(doc_tokens, doc_mask, seq_len)
    if rows:
      tokens.append(np.concatenate([t for t, _ in rows]))
      masks.append(np.concatenate([m for _, m in rows]))
      lengths.extend(len(t) for t, _ in rows)
    chunk.clear()

  try:
    with open(path, "rb") as f:
      for line_no, raw in enumerate(f, 1):
        if not raw.strip():
          continue
        where = f"{path}:{line_no}"
        try:
          texts, finish = _prepare(_parse(raw.removeprefix(codecs.BOM_UTF8) if line_no == 1 else raw, where),
                                   tokenizer, eos_id, seq_len, where)
        except UserError:
          flush()  # a bad line is reported after any earlier line's own error
          raise
        chunk.append((where, texts, finish))
        if len(chunk) == ENCODE_LINES:
          flush()
  except OSError as e:
    raise UserError(f"{path}: cannot read the data file ({e.strerror})") from None
  flush()
  if not lengths:
    raise UserError(f"{path}: no documents (empty or blank file); expected JSON lines with one of {_keys(KINDS)}")
  return Documents(np.concatenate(tokens), np.concatenate(masks), np.concatenate([[0], np.cumsum(lengths)]))


def read_cached(path: str | Path, tokenizer: Tokenizer | None, seq_len: int, eos_id: int | None, folder: Path,
                write: bool, digest: str | None = None) -> Documents:
  """`read_jsonl`, its result kept in `folder` as FOLDER/<fingerprint>-<seq_len>.npz, so a resumed run reads
  tokens instead of tokenizing again. For a run folder, whose tokenizer (so eos_id) is fixed: the key is the data
  file's bytes and seq_len. `write`: this process saves the file (atomically; the others only read it). An
  unreadable file is ignored (and replaced). `digest`: the file's `fingerprint`, when the caller has it (hashing
  a large file again costs a full read)."""
  file = folder / f"{digest or fingerprint(path)}-{seq_len}.npz"
  try:
    with np.load(file, allow_pickle=False) as saved:
      docs = Documents(saved["tokens"], saved["loss_mask"], saved["offsets"])
    print(f"{path}: tokens read from {file}", file=sys.stderr)
    return docs
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
    pass
  docs = read_jsonl(path, tokenizer, seq_len, eos_id)
  if write:
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{file.name}.{os.getpid()}.partial"
    with open(partial, "wb") as f:
      np.savez(f, tokens=docs.tokens, loss_mask=docs.loss_mask, offsets=docs.offsets)
    os.replace(partial, file)
  return docs


Finish = Callable[[list[list[int]]], tuple[np.ndarray, np.ndarray]]  # encoded texts -> (tokens, loss_mask)


def split(tokens: np.ndarray, mask: np.ndarray, seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """A document [n] as rows of at most seq_len tokens overlapping by one: row k holds tokens
  [k (L - 1), k (L - 1) + L) and learns the targets after its first token, so each target falls in exactly one
  row."""
  rows = []
  for s in range(0, max(len(tokens) - 1, 1), seq_len - 1):
    row_mask = mask[s:s + seq_len].copy()
    row_mask[0] = 0
    rows.append((tokens[s:s + seq_len], row_mask))
  return rows


def _keys(keys) -> str:
  return ", ".join(repr(k) for k in keys) or "none"


def _parse(raw: bytes, where: str) -> dict[str, Any]:
  try:
    record = json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError:
    raise UserError(f"{where}: not valid UTF-8") from None
  except json.JSONDecodeError as e:
    raise UserError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(record, dict):
    raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
  if len(record) != 1 or next(iter(record)) not in KINDS:
    raise UserError(f"{where}: expected exactly one of the keys {_keys(KINDS)}; got {_keys(record)}")
  return record


def _prepare(record: dict[str, Any], tokenizer: Tokenizer | None, eos_id: int | None, seq_len: int,
             where: str) -> tuple[list[str], Finish]:
  """(texts to encode, how their ids make the document): a record checked, and a conversation rendered."""
  ((kind, value),) = record.items()
  if kind == "input_ids":
    ids = _checked_ids(value, tokenizer, where)
    return [], lambda _: _all_targets(ids)
  if tokenizer is None:
    raise UserError(f"{where}: a {kind!r} line needs a tokenizer, and none was given")
  if kind == "text":
    if not isinstance(value, str):
      raise UserError(f"{where}: 'text' must be a string, got {type(value).__name__}")
    return [value], lambda encoded: _all_targets(encoded[0] + ([] if eos_id is None else [eos_id]))
  return _from_messages(value, tokenizer, seq_len, where)


def _all_targets(ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
  return np.array(ids, np.int32), (np.arange(len(ids)) > 0).astype(np.uint8)


def _checked_ids(ids: Any, tokenizer: Tokenizer | None, where: str) -> list[int]:
  if not isinstance(ids, list) or not all(type(i) is int for i in ids):
    raise UserError(f"{where}: 'input_ids' must be a list of integers")
  limit = INT32_LIMIT if tokenizer is None else tokenizer.vocab_size
  for j, i in enumerate(ids):
    if not 0 <= i < limit:
      raise UserError(f"{where}: input_ids[{j}] = {i} is outside the vocabulary [0, {limit})")
  return ids


def _from_messages(messages: Any, tokenizer: Tokenizer, seq_len: int, where: str) -> tuple[list[str], Finish]:
  """The rendered conversation cut where each assistant message's text begins and ends (the renderings of
  messages[:i] with the generation prompt and of messages[:i + 1]), each piece encoded alone: an assistant
  message's tokens are those generated after its prompt's tokens, as at inference."""
  if not isinstance(messages, list) or not messages:
    raise UserError(f"{where}: 'messages' must be a non-empty list (an empty conversation has nothing to learn)")
  for k, m in enumerate(messages, 1):
    if not isinstance(m, dict) or sorted(m) != ["content", "role"]:
      raise UserError(f"{where}: message {k} must be an object with exactly the keys 'role' and 'content'")
    if m["role"] not in ROLES:
      raise UserError(f"{where}: message {k} has role {m['role']!r}; expected one of {_keys(ROLES)}")
    if not isinstance(m["content"], str):
      raise UserError(f"{where}: message {k} content must be a string, got {type(m['content']).__name__}")
  turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
  if not turns:
    raise UserError(f"{where}: no assistant message, so nothing to learn")
  if turns[0] == 0:
    raise UserError(f"{where}: message 1 is an assistant message; a conversation must open with a system or user one")
  messages = messages[:turns[-1] + 1]
  text = _render(tokenizer, messages, False, where)
  cuts = [0]  # pieces text[cuts[j]:cuts[j + 1]]: odd ones are assistant messages
  for i in turns:
    prompt, turn = _render(tokenizer, messages[:i], True, where), _render(tokenizer, messages[:i + 1], False, where)
    if not (text.startswith(turn) and turn.startswith(prompt) and len(prompt) >= cuts[-1]):
      raise UserError(f"{where}: the chat template is not prefix-stable at assistant message {i + 1} (rendering "
                      "the conversation up to it does not extend the earlier turns' text), so its tokens cannot "
                      "be located; use a template that renders each turn the same way whatever follows")
    cuts += [len(prompt), len(turn)]
  pieces = [text[a:b] for a, b in zip(cuts, cuts[1:] + [len(text)])]

  def finish(encoded: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    tokens = [t for piece in encoded for t in piece]
    if len(tokens) > seq_len:
      raise UserError(f"{where}: the conversation has {len(tokens)} tokens, more than seq_len={seq_len} "
                      "(conversations are not cut); shorten it or raise the sequence length")
    mask = np.concatenate([np.full(len(piece), j % 2, np.uint8) for j, piece in enumerate(encoded)])
    mask[0] = 0
    return np.array(tokens, np.int32), mask

  return pieces, finish


def _render(tokenizer: Tokenizer, messages: list[dict[str, str]], prompt: bool, where: str) -> str:
  try:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
  except UserError as e:  # the template's own complaint, e.g. roles that must alternate
    raise UserError(f"{where}: {e}") from None


def _pack(lengths: np.ndarray, seq_len: int) -> np.ndarray:
  """Greedy packing, in order, of documents of these lengths [n] -> row bounds [rows + 1]."""
  bounds, fill = [0], 0
  for i, n in enumerate(lengths.tolist()):
    if fill + n > seq_len:
      bounds.append(i)
      fill = 0
    fill += n
  bounds.append(len(lengths))
  return np.array(bounds)


class BatchStream:
  """Deterministic, resumable stream of packed batches.

  Epoch e visits the documents in the order `default_rng([seed, e]).permutation(n)` and packs them greedily, in that
  order, into rows of seq_len tokens (a new row when the next document does not fit; one document per row when
  pack=False). The rows of consecutive epochs form one endless stream and batch s is rows [s*B, (s+1)*B): a pure
  function of the arguments and s, so a resumed run sees exactly the batches of an uninterrupted one.
  """

  def __init__(self, documents: Documents, seq_len: int, batch_size: int, seed: int, pack: bool = True):
    if not len(documents) or batch_size < 1 or seed < 0:
      raise ValueError("BatchStream needs documents, batch_size >= 1 and seed >= 0")
    self._documents = documents
    self._lengths = documents.lengths  # [n]
    if self._lengths.max() > seq_len:
      raise ValueError(f"a document has {self._lengths.max()} tokens, more than seq_len={seq_len}")
    self.seq_len, self.batch_size, self.seed, self.pack = seq_len, batch_size, seed, pack
    self._first_row = [0]  # _first_row[e]: stream index of epoch e's first row, for the epochs counted so far
    self._packed: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # a few recent epochs' packings

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """Batch `step`: int32 [batch_size, seq_len] arrays tokens, targets, loss_mask, positions, segment_ids.

    targets[t] is the next token of the same document (0 where none); loss_mask[t] is 1 where targets[t] is a loss
    token; positions restart at 0 for each document; segment_ids number a row's documents 1, 2, ... (0: padding).
    """
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    out = self._empty()
    for b in range(self.batch_size):
      epoch, r = self._locate(step * self.batch_size + b)
      order, bounds = self._epoch(epoch)
      self._fill_row(out, b, order[bounds[r]:bounds[r + 1]])
    return out

  def one_pass(self) -> Iterator[dict[str, np.ndarray]]:
    """Epoch 0's rows, each once, in batches like `batch`'s; the last batch is completed with empty rows
    (no loss tokens). For evaluation."""
    order, bounds = self._epoch(0)
    rows = len(bounds) - 1
    for first in range(0, rows, self.batch_size):
      out = self._empty()
      for b, r in enumerate(range(first, min(first + self.batch_size, rows))):
        self._fill_row(out, b, order[bounds[r]:bounds[r + 1]])
      yield out

  def _empty(self) -> dict[str, np.ndarray]:
    return {k: np.zeros((self.batch_size, self.seq_len), np.int32) for k in FIELDS}

  def epoch_of(self, step: int) -> int:
    """The epoch of batch `step`'s first row (for logging)."""
    return self._locate(step * self.batch_size)[0]

  def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(order [n], bounds [rows + 1]): row r of the epoch holds documents order[bounds[r]:bounds[r + 1]]."""
    if epoch not in self._packed:
      order = np.random.default_rng([self.seed, epoch]).permutation(len(self._lengths))
      bounds = _pack(self._lengths[order], self.seq_len) if self.pack else np.arange(len(order) + 1)
      if len(self._packed) >= CACHED_EPOCHS:
        del self._packed[next(iter(self._packed))]  # the oldest entry
      self._packed[epoch] = order, bounds
    return self._packed[epoch]

  def _locate(self, row: int) -> tuple[int, int]:
    """Stream row -> (epoch, row within the epoch); counts the rows of epochs not yet seen."""
    while self._first_row[-1] <= row:
      self._first_row.append(self._first_row[-1] + len(self._epoch(len(self._first_row) - 1)[1]) - 1)
    epoch = bisect.bisect_right(self._first_row, row) - 1
    return epoch, row - self._first_row[epoch]

  def _fill_row(self, out: dict[str, np.ndarray], b: int, docs: np.ndarray):
    t = 0
    for segment, d in enumerate(docs.tolist(), 1):
      start, n = self._documents.offsets[d], self._lengths[d]
      tokens = self._documents.tokens[start:start + n]
      out["tokens"][b, t:t + n] = tokens
      out["targets"][b, t:t + n - 1] = tokens[1:]
      out["loss_mask"][b, t:t + n - 1] = self._documents.loss_mask[start + 1:start + n]
      out["positions"][b, t:t + n] = np.arange(n)
      out["segment_ids"][b, t:t + n] = segment
      t += n
