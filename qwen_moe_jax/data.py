"""Training data: a JSONL file -> documents -> a deterministic, resumable stream of packed batches (numpy only).

Each non-blank line is a JSON object with exactly one key, or a prompt and its completion:
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
  {"prompt": ..., "completion": ...}  TRL's prompt-completion format, loss on the completion only (TRL's
      completion_only_loss): the prompt a string (the completion encoded after it, then eos) or a list of messages
      (the completion rendered as the assistant's reply, its end-of-turn tokens included); the completion a string
      or a list of one assistant message. It must fit one row, as a conversation.
A document of n tokens gives n - 1 next-token targets. A text or input_ids document longer than a row is cut into
rows of seq_len tokens that overlap by one (each starts with the token the previous one ends with), so every
target is learned exactly once; a conversation must fit one row (it is never cut).

For DPO (`pairs`), every line is a preference pair, {"prompt": ..., "chosen": ..., "rejected": ...} (TRL's
formats): the prompt a string (each answer encoded after it, eos appended) or a list of messages (each answer
rendered as the assistant's reply to them by the chat template, its end-of-turn tokens included); the answers
strings, or lists of one assistant message. It makes two documents, the prompt and the chosen answer, then the
prompt and the rejected one, loss on the answers' tokens only; a pair stays in one row (both must fit).

For KTO (`kto`), every line is an unpaired example, {"prompt": ..., "completion": ..., "label": true or false}
(TRL's format: the completion desirable or not). It makes two documents as a pair's: the prompt and its
completion, then the prompt and the completion of another line (the one before; the first line takes the second's),
the mismatched pair whose log-ratio estimates KTO's KL term (TRL pairs each prompt with a batch neighbour's
completion). Documents.labels holds each line's label.
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
COMPLETION_KEYS = ("prompt", "completion")
PAIR_KEYS = ("prompt", "chosen", "rejected")
KTO_KEYS = ("prompt", "completion", "label")
ROLES = ("system", "user", "assistant")
FIELDS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")
REFERENCE = "ref_logp"  # a DPO batch's fp32 [B, T]: the reference model's log-probability of each target
ADVANTAGE = "advantage"  # a GRPO batch's fp32 [B, T]: each target's advantage (its completion's; grpo.py)
OLD_LOGP = "old_logp"  # and [B, T] each target's log-probability under the policy that sampled it
LABEL = "kto_label"  # a KTO batch's fp32 [B, T]: 1 on a desirable completion's unit, 0 on an undesirable one's
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
  labels: np.ndarray | None = None  # KTO's: [n / 2] uint8, 1 where line i's completion is desirable

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


def read_jsonl(path: str | Path, tokenizer: Tokenizer | None, seq_len: int, eos_id: int | None,
               pairs: bool = False, kto: bool = False) -> Documents:
  """Every line parsed and checked; the first bad one is a UserError naming `path:line`.

  tokenizer may be None when the file has only input_ids lines; eos_id (or None) ends each text document. The
  file is read ENCODE_LINES lines at a time, whose texts `tokenizers` encodes in one parallel batch. `pairs`:
  preference pairs, documents 2i and 2i + 1 the chosen and rejected answers of line i; `kto`: KTO's lines,
  documents 2i and 2i + 1 line i's completion and the mismatched one (see the module's docstring).
  """
  pairs = pairs or kto
  tokens, masks, lengths = [], [], []  # per chunk of lines: its rows' tokens and loss masks, concatenated
  chunk: list[tuple[str, list[str], Finish]] = []

  def flush():  # the chunk's texts encoded at once, then its documents built and checked in line order
    encoded = tokenizer.encode_batch([t for _, texts, _ in chunk for t in texts]) if tokenizer else []
    rows, at = [], 0
    for where, texts, finish in chunk:
      docs = finish(encoded[at:at + len(texts)])
      at += len(texts)
      for doc_tokens, doc_mask in docs:
        if not doc_mask.any():
          raise UserError(f"{where}: the document has no token to learn ({len(doc_tokens)} tokens, none a loss "
                          "target)")
      rows += docs if pairs else split(*docs[0], seq_len)
    if rows:
      tokens.append(np.concatenate([t for t, _ in rows]))
      masks.append(np.concatenate([m for _, m in rows]))
      lengths.extend(len(t) for t, _ in rows)
    chunk.clear()

  labels, previous = [], None  # KTO's: each line's label; the completion the next line's KL document takes
  if kto:  # the first line takes the second's completion
    head = [(_parse(raw, where, kto=True), where) for where, raw in itertools.islice(lines(path), 2)]
    if len(head) < 2:
      raise UserError(f"{path}: KTO needs at least 2 lines (its KL estimate pairs each prompt with another line's "
                      "completion)")
    previous = _answer(head[1][0]["completion"], "completion", head[1][1])
  for where, raw in lines(path):
    try:
      record = _parse(raw, where, pairs, kto)
      if kto:
        answer = _answer(record["completion"], "completion", where)
        texts, finish = _from_answers(record["prompt"], [answer, previous], tokenizer, eos_id, seq_len, where,
                                      "the completion + another line's (KTO's KL estimate)")
        previous = answer
        labels.append(record["label"])
      elif pairs:
        texts, finish = _from_answers(record["prompt"], [_answer(record[k], k, where) for k in ("chosen", "rejected")],
                                      tokenizer, eos_id, seq_len, where, "chosen + rejected")
      elif sorted(record) == sorted(COMPLETION_KEYS):
        texts, finish = _from_answers(record["prompt"], [_answer(record["completion"], "completion", where)],
                                      tokenizer, eos_id, seq_len, where, "prompt + completion")
      else:
        texts, finish = _prepare(record, tokenizer, eos_id, seq_len, where)
    except UserError:
      flush()  # a bad line is reported after any earlier line's own error
      raise
    chunk.append((where, texts, finish))
    if len(chunk) == ENCODE_LINES:
      flush()
  flush()
  if not lengths:
    expected = f"the keys {_keys(PAIR_KEYS)}" if pairs else f"one of {_keys(KINDS)}"
    raise UserError(f"{path}: no documents (empty or blank file); expected JSON lines with {expected}")
  return Documents(np.concatenate(tokens), np.concatenate(masks), np.concatenate([[0], np.cumsum(lengths)]),
                   np.array(labels, np.uint8) if kto else None)


def lines(path: str | Path) -> Iterator[tuple[str, bytes]]:
  """("path:line", the line's bytes) of each non-blank line of a JSONL file, a UTF-8 BOM dropped; an unreadable
  file is a UserError."""
  try:
    with open(path, "rb") as f:
      for line_no, raw in enumerate(f, 1):
        if raw.strip():
          yield f"{path}:{line_no}", raw.removeprefix(codecs.BOM_UTF8) if line_no == 1 else raw
  except OSError as e:
    raise UserError(f"{path}: cannot read the data file ({e.strerror})") from None


def read_cached(path: str | Path, tokenizer: Tokenizer | None, seq_len: int, eos_id: int | None, folder: Path,
                write: bool, digest: str | None = None, pairs: bool = False, kto: bool = False) -> Documents:
  """`read_jsonl`, its result kept in `folder` as FOLDER/<fingerprint>-<seq_len>.npz, so a resumed run reads
  tokens instead of tokenizing again. For a run folder, whose tokenizer (so eos_id) is fixed: the key is the data
  file's bytes and seq_len. `write`: this process saves the file (atomically; the others only read it). An
  unreadable file is ignored (and replaced). `digest`: the file's `fingerprint`, when the caller has it (hashing
  a large file again costs a full read)."""
  file = cached_file(path, seq_len, folder, digest, pairs or kto)
  names = ("tokens", "loss_mask", "offsets") + ("labels",) * kto
  saved = load_npz(file, *names)
  if saved is not None:
    print(f"{path}: tokens read from {file}", file=sys.stderr)
    return Documents(*saved)
  docs = read_jsonl(path, tokenizer, seq_len, eos_id, pairs, kto)
  if write:
    save_npz(file, **{k: getattr(docs, k) for k in names})
  return docs


def cached_file(path: str | Path, seq_len: int, folder: Path, digest: str | None = None, pairs: bool = False) -> Path:
  """Where `read_cached` keeps a data file's tokens (a KTO file's: as pairs, since its lines are no pairs' lines)."""
  return folder / f"{digest or fingerprint(path)}-{seq_len}{'-pairs' if pairs else ''}.npz"


def load_npz(file: Path, *names: str) -> list[np.ndarray] | None:
  """The arrays `names` of a file `save_npz` wrote, or None when it is missing or unreadable."""
  try:
    with np.load(file, allow_pickle=False) as saved:
      return [saved[name] for name in names]
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
    return None


def save_npz(file: Path, **arrays: np.ndarray) -> None:
  """np.savez to `file`, atomically (written aside, then renamed)."""
  file.parent.mkdir(parents=True, exist_ok=True)
  partial = file.parent / f".{file.name}.{os.getpid()}.partial"
  with open(partial, "wb") as f:
    np.savez(f, **arrays)
  os.replace(partial, file)


Finish = Callable[[list[list[int]]], list[tuple[np.ndarray, np.ndarray]]]  # encoded texts -> documents (tokens,
# loss_mask)


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


def parse_object(raw: bytes, where: str) -> dict[str, Any]:
  """A JSONL line's object; a UserError naming `where` when it is not one."""
  try:
    record = json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError:
    raise UserError(f"{where}: not valid UTF-8") from None
  except json.JSONDecodeError as e:
    raise UserError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(record, dict):
    raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
  return record


def _parse(raw: bytes, where: str, pairs: bool = False, kto: bool = False) -> dict[str, Any]:
  record = parse_object(raw, where)
  if kto:
    if sorted(record) != sorted(KTO_KEYS):
      raise UserError(f"{where}: expected a KTO example, the keys {_keys(KTO_KEYS)}; got {_keys(record)}")
    if not isinstance(record["label"], bool):
      raise UserError(f"{where}: 'label' must be true (a desirable completion) or false, got {record['label']!r}")
    return record
  if pairs and sorted(record) != sorted(PAIR_KEYS):
    raise UserError(f"{where}: expected a preference pair, the keys {_keys(PAIR_KEYS)}; got {_keys(record)}")
  keys = tuple(sorted(record))
  if not pairs and (len(record) != 1 or next(iter(record)) not in KINDS) and keys != tuple(sorted(COMPLETION_KEYS)):
    hint = {tuple(sorted(PAIR_KEYS)): " (a preference pair: train with --dpo-beta)",
            tuple(sorted(KTO_KEYS)): " (a KTO example: train with --dpo-beta B --dpo-loss kto)"}.get(keys, "")
    raise UserError(f"{where}: expected exactly one of the keys {_keys(KINDS)}, or "
                    f"{' and '.join(map(repr, COMPLETION_KEYS))}; got {_keys(record)}{hint}")
  return record


def _prepare(record: dict[str, Any], tokenizer: Tokenizer | None, eos_id: int | None, seq_len: int,
             where: str) -> tuple[list[str], Finish]:
  """(texts to encode, how their ids make the document): a record checked, and a conversation rendered."""
  ((kind, value),) = record.items()
  if kind == "input_ids":
    ids = _checked_ids(value, tokenizer, where)
    return [], lambda _: [_all_targets(ids)]
  if tokenizer is None:
    raise UserError(f"{where}: a {kind!r} line needs a tokenizer, and none was given")
  if kind == "text":
    if not isinstance(value, str):
      raise UserError(f"{where}: 'text' must be a string, got {type(value).__name__}")
    return [value], lambda encoded: [_all_targets(encoded[0] + ([] if eos_id is None else [eos_id]))]
  pieces, finish = _from_messages(value, tokenizer, seq_len, where)
  return pieces, lambda encoded: [finish(encoded)]


def _from_answers(prompt: Any, answers: list[str], tokenizer: Tokenizer | None, eos_id: int | None, seq_len: int,
                  where: str, what: str) -> tuple[list[str], Finish]:
  """(texts to encode, how their ids make the documents, the prompt then each answer) of a prompt-completion line, a
  preference pair or a KTO line (see the module's docstring); `what`: the answers, for the too-long message."""
  if tokenizer is None:
    raise UserError(f"{where}: a prompt and answers need a tokenizer, and none was given")
  if isinstance(prompt, list):
    if prompt and isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant":
      raise UserError(f"{where}: 'prompt' ends with an assistant message; the answers are its reply")
    made = [_from_messages(prompt + [{"role": "assistant", "content": a}], tokenizer, seq_len, where, last_only=True)
            for a in answers]
    texts = [t for pieces, _ in made for t in pieces]

    def documents(encoded: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
      out, at = [], 0
      for pieces, finish in made:
        out.append(finish(encoded[at:at + len(pieces)]))
        at += len(pieces)
      return out
  elif isinstance(prompt, str):
    texts = [prompt, *answers]

    def documents(encoded: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
      asked, end = encoded[0], [] if eos_id is None else [eos_id]
      return [(np.array(asked + answer + end, np.int32),
               np.array([0] * len(asked) + [1] * (len(answer) + len(end)), np.uint8)) for answer in encoded[1:]]
  else:
    raise UserError(f"{where}: 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")

  def finish(encoded: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    docs = documents(encoded)
    if sum(len(t) for t, _ in docs) > seq_len:
      shared = ": the two share a row" if len(docs) > 1 else ""
      raise UserError(f"{where}: the line makes {' + '.join(str(len(t)) for t, _ in docs)} tokens ({what}), more "
                      f"than seq_len={seq_len}{shared}; shorten it or raise the sequence length")
    for _, mask in docs:
      mask[0] = 0
    return docs

  return texts, finish


def _answer(value: Any, key: str, where: str) -> str:
  """A pair's answer: a string, or a list of one assistant message (TRL's conversational format)."""
  if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and \
      value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str):
    return value[0]["content"]
  if not isinstance(value, str):
    raise UserError(f"{where}: {key!r} must be a string or a list of one assistant message")
  return value


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


def _from_messages(messages: Any, tokenizer: Tokenizer, seq_len: int, where: str, last_only: bool = False
                   ) -> tuple[list[str], Callable[[list[list[int]]], tuple[np.ndarray, np.ndarray]]]:
  """The rendered conversation cut where each assistant message's text begins and ends (the renderings of
  messages[:i] with the generation prompt and of messages[:i + 1]), each piece encoded alone: an assistant
  message's tokens are those generated after its prompt's tokens, as at inference. `last_only`: loss on the last
  assistant message alone (a preference pair's answer)."""
  if not isinstance(messages, list) or not messages:
    raise UserError(f"{where}: 'messages' must be a non-empty list (an empty conversation has nothing to learn)")
  check_messages(messages, where)
  turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
  if not turns:
    raise UserError(f"{where}: no assistant message, so nothing to learn")
  if turns[0] == 0:
    raise UserError(f"{where}: message 1 is an assistant message; a conversation must open with a system or user one")
  messages = messages[:turns[-1] + 1]
  text = render(tokenizer, messages, False, where)
  cuts = [0]  # pieces text[cuts[j]:cuts[j + 1]]: odd ones are assistant messages
  for i in turns:
    prompt, turn = render(tokenizer, messages[:i], True, where), render(tokenizer, messages[:i + 1], False, where)
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
    last = 2 * len(turns) - 1  # the last assistant message's piece
    mask = np.concatenate([np.full(len(piece), j % 2 and (j == last or not last_only), np.uint8)
                           for j, piece in enumerate(encoded)])
    mask[0] = 0
    return np.array(tokens, np.int32), mask

  return pieces, finish


def check_messages(messages: list, where: str) -> None:
  """Each message an object of exactly 'role' (one of ROLES) and 'content' (a string); else a UserError naming
  `where` and the message."""
  for k, m in enumerate(messages, 1):
    if not isinstance(m, dict) or sorted(m) != ["content", "role"]:
      raise UserError(f"{where}: message {k} must be an object with exactly the keys 'role' and 'content'")
    if m["role"] not in ROLES:
      raise UserError(f"{where}: message {k} has role {m['role']!r}; expected one of {_keys(ROLES)}")
    if not isinstance(m["content"], str):
      raise UserError(f"{where}: message {k} content must be a string, got {type(m['content']).__name__}")


def render(tokenizer: Tokenizer, messages: list[dict[str, str]], prompt: bool, where: str) -> str:
  """The chat template's text of these messages (`prompt`: with the generation prompt); its own complaints name
  `where`."""
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

  Epoch e visits the units (documents; with `pairs`, preference pairs: documents 2i and 2i + 1) in the order
  `default_rng([seed, e]).permutation(n)` and packs them greedily, in that order, into rows of seq_len tokens (a new
  row when the next unit does not fit; one unit per row when pack=False). The rows of consecutive epochs form one
  endless stream and batch s is rows [s*B, (s+1)*B): a pure function of the arguments and s, so a resumed run sees
  exactly the batches of an uninterrupted one. `reference` (DPO): each token's log-probability under the
  reference model ([total] fp32, as Documents.tokens), given to the batches as REFERENCE; KTO's documents' labels
  are given as LABEL.
  """

  def __init__(self, documents: Documents, seq_len: int, batch_size: int, seed: int, pack: bool = True,
               pairs: bool = False, reference: np.ndarray | None = None):
    if not len(documents) or batch_size < 1 or seed < 0:
      raise ValueError("BatchStream needs documents, batch_size >= 1 and seed >= 0")
    self._documents, self._reference, self._group = documents, reference, 2 if pairs else 1
    self._lengths = documents.lengths.reshape(-1, self._group).sum(axis=1)  # [n] of each unit
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

  def every_unit(self) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """Each unit once, in file order, one per row, batch_size rows a batch (the last completed with empty rows):
    (batch, the units of its rows)."""
    for first in range(0, len(self._lengths), self.batch_size):
      units = np.arange(first, min(first + self.batch_size, len(self._lengths)))
      out = self._empty()
      for b in range(len(units)):
        self._fill_row(out, b, units[b:b + 1])
      yield out, units

  def put_back(self, per_token: np.ndarray, rows: np.ndarray, units: np.ndarray) -> None:
    """per_token [total] (as Documents.tokens) gets values rows [B, T] of `every_unit`'s rows of these units, each
    at its target's position (a document's first token gets none)."""
    for b, u in enumerate(units.tolist()):
      t = 0
      for d in range(u * self._group, (u + 1) * self._group):
        start, end = self._documents.offsets[d], self._documents.offsets[d + 1]
        per_token[start + 1:end] = rows[b, t:t + end - start - 1]
        t += end - start

  def _empty(self) -> dict[str, np.ndarray]:
    out = {k: np.zeros((self.batch_size, self.seq_len), np.int32) for k in FIELDS}
    for name, given in ((REFERENCE, self._reference), (LABEL, self._documents.labels)):
      if given is not None:
        out[name] = np.zeros((self.batch_size, self.seq_len), np.float32)
    return out

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

  def _fill_row(self, out: dict[str, np.ndarray], b: int, units: np.ndarray):
    t = 0
    docs = (units[:, None] * self._group + np.arange(self._group)).reshape(-1)
    for segment, d in enumerate(docs.tolist(), 1):
      start, end = self._documents.offsets[d], self._documents.offsets[d + 1]
      n = end - start
      tokens = self._documents.tokens[start:end]
      out["tokens"][b, t:t + n] = tokens
      out["targets"][b, t:t + n - 1] = tokens[1:]
      out["loss_mask"][b, t:t + n - 1] = self._documents.loss_mask[start + 1:end]
      out["positions"][b, t:t + n] = np.arange(n)
      out["segment_ids"][b, t:t + n] = segment
      if self._reference is not None:
        out[REFERENCE][b, t:t + n - 1] = self._reference[start + 1:end]
      if self._documents.labels is not None:
        out[LABEL][b, t:t + n] = self._documents.labels[d // self._group]
      t += n
