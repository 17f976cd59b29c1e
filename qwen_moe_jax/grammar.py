"""Structured output: a regular expression, a JSON schema or a list of choices turned into an automaton over token
ids, which the decode loop follows on the device (no host round trip per token), masking every id the automaton
does not allow (vLLM's guided decoding, OpenAI's response_format).

outlines-core builds the token-level automaton (`Index`: its states, and for each the ids allowed and the state
each leads to) in a child process with a time and a memory limit; automaton.py's `Grammar` compresses it: ids that
act alike in every state (most of a 150k vocabulary does, in a JSON schema: ordinary text inside a string) share a
class, so the automaton is a [states, classes] table (a generic JSON object: 1623 x 225 cells) plus each id's class
[V], instead of [states, V]. Class 0 is never allowed (special tokens, ids past the tokenizer's), class 1 holds the
stop ids, allowed in accepting states only.

On the device (`Tables`), a decode state holds G grammars: each slot's classes of every id [G, V], and the
grammars' cells flattened into one array [N], where a state's row of cells starts at its *cell* (`base + s * C`)
and a cell holds the cell of the state it leads to (-1: not allowed). A row follows its grammar with two
numbers, its slot and its state's cell; slot 0 is no grammar (every id class 0, cell 0 leading to itself).
Shapes: B rows, V vocabulary, G slots, N cells.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import pickle
import threading
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwen_moe_jax.automaton import MEMORY, SECONDS, STOP, Grammar, Store, build, pow2
from qwen_moe_jax.errors import UserError

KINDS = ("regex", "json_schema", "choice")  # what structured output is asked with (flags', keys' names)


def grammar_room(grammars: set[Grammar]) -> dict[str, int]:
  """SamplingOps' `grammars` and `grammar_cells` that hold these grammars (none: zeros, no tables)."""
  if not grammars:
    return {"grammars": 0, "grammar_cells": 0}
  return {"grammars": pow2(len(grammars) + 1), "grammar_cells": pow2(1 + sum(g.cells for g in grammars))}


class Grammars:
  """Grammars over one tokenizer's ids, built on request (outlines-core) and cached: the most recent `size` by
  their source, so the requests of one schema share one Grammar (and one slot on the device). Each build runs in
  a child process, stopped past `seconds` or `memory` bytes (automaton.build); with a `store`, what was built
  before (by any process on this machine) is read from disk instead."""

  def __init__(self, tok, size: int = 64, seconds: float | None = SECONDS, memory: int = MEMORY,
               store: Store | None = None):
    self.tok, self.size, self.seconds, self.memory, self.store = tok, size, seconds, memory, store
    self._cache: collections.OrderedDict[tuple, Grammar] = collections.OrderedDict()
    self._lock = threading.Lock()  # over the cache and `_building` (the server's request threads build grammars)
    self._building: dict[tuple, threading.Lock] = {}  # a lock per grammar being built: a request for it waits
    # for that build, others do not (a large schema can take outlines-core minutes)

  @functools.cached_property
  def _vocabulary(self) -> tuple[bytes, int, int, str]:
    """(outlines_core.Vocabulary pickled for the builds' processes, its EOS id, the tokenizer's ids, a hash of them
    and outlines-core's version: what a grammar depends on besides its regex, the store's key)."""
    import outlines_core  # imported on first use: structured output is optional at run time

    eos = self.tok.eos_token_id if self.tok.eos_token_id is not None else self.tok.vocab_size
    ids = self.tok.token_bytes()
    made = hashlib.sha256(f"{eos} {self.tok.vocab_size} {importlib.metadata.version('outlines-core')}".encode())
    for spelled in sorted(ids):
      made.update(b"%d:%s%r" % (len(spelled), spelled, ids[spelled]))
    return pickle.dumps(outlines_core.Vocabulary(eos, ids)), eos, self.tok.vocab_size, made.hexdigest()

  def pick(self, given: dict, where: str | None, names: dict[str, str] | None = None) -> Grammar | None:
    """The grammar that `given` (a file line or request `where`, else the flags) asks for with one of `names`
    (key -> kind, one of KINDS; default: the kinds' own names), None when it asks for none; more than one is a
    UserError."""
    names = names or {k: k for k in KINDS}
    shown = (lambda k: k) if where else (lambda k: f"--{k}")  # noqa: E731
    label = (lambda k: f"{where}: {k}") if where else shown  # noqa: E731
    asked = [k for k in names if given.get(k) is not None]
    if len(asked) > 1:
      raise UserError(f"{where + ': ' if where else ''}give only one of {', '.join(map(shown, names))} (got "
                      f"{' and '.join(map(shown, asked))})")
    if not asked:
      return None
    if self.tok is None:
      raise UserError(f"{label(asked[0])}: structured output needs tokenizer.json in the checkpoint folder")
    return getattr(self, names[asked[0]])(given[asked[0]], label(asked[0]))

  def regex(self, pattern: str, where: str) -> Grammar:
    """Output that matches `pattern` whole (Rust's regex syntax, close to Python's)."""
    if not isinstance(pattern, str) or not pattern:
      raise UserError(f"{where}: a regex must be a non-empty string, got {pattern!r}")
    return self._build(("regex", pattern), pattern, f"regex {pattern!r}", where)

  def json_schema(self, schema: Any, where: str) -> Grammar:
    """JSON that follows `schema` (a dict, or its JSON text), as outlines-core reads JSON Schema (whitespace: at
    most one space between tokens; {"type": "object"}: any object, nested a few levels deep)."""
    if isinstance(schema, str):
      try:
        schema = json.loads(schema)
      except json.JSONDecodeError as e:
        raise UserError(f"{where}: the JSON schema is not valid JSON ({e.msg})") from None
    if not isinstance(schema, dict):
      raise UserError(f"{where}: a JSON schema must be a JSON object, got {schema!r}")
    return self._build(("json", json.dumps(schema, sort_keys=True)), schema_regex(schema, where), "JSON schema",
                       where)

  def choice(self, options: Any, where: str) -> Grammar:
    """Output that is exactly one of the strings in `options`."""
    if not isinstance(options, list) or not options or not all(isinstance(o, str) and o for o in options):
      raise UserError(f"{where}: choice must be a non-empty list of non-empty strings, got {options!r}")
    pattern = "|".join(f"({literal(o)})" for o in options)
    return self._build(("choice", *options), pattern, f"choice of {len(options)}", where)

  def of_pattern(self, pattern: str, source: str) -> Grammar:
    """The grammar of a regex another process built (a multi-process server's followers rebuild its first
    process's: equal to it)."""
    return self._build(("pattern", pattern), pattern, source, source)

  def _build(self, key: tuple, pattern: str, source: str, where: str) -> Grammar:
    with self._lock:
      vocabulary, eos, size, fingerprint = self._vocabulary
      building = self._building.setdefault(key, threading.Lock())
    with building:  # a request for a grammar being built waits for it, then finds it cached
      with self._lock:
        if key in self._cache:
          self._cache.move_to_end(key)
          return self._cache[key]
      try:
        grammar = self.store and self.store.get(fingerprint, pattern, size, source)
        if grammar is None:
          grammar = build(pattern, vocabulary, size, eos, source, where, seconds=self.seconds, memory=self.memory)
          if self.store:
            self.store.put(fingerprint, grammar)
      except UserError:
        with self._lock:
          self._building.pop(key, None)
        raise
      with self._lock:
        self._cache[key] = grammar
        if len(self._cache) > self.size:
          self._cache.popitem(last=False)
        self._building.pop(key, None)
      return grammar


def schema_regex(schema: dict, where: str) -> str:
  """The regex of the JSON that follows `schema` (outlines-core's reading of JSON Schema), else a UserError naming
  `where`."""
  from outlines_core.json_schema import build_regex_from_schema  # imported on first use, as in Grammars

  try:
    return build_regex_from_schema(json.dumps(schema, sort_keys=True))
  except ValueError as e:
    raise UserError(f"{where}: unsupported JSON schema: {e}") from None


def literal(text: str) -> str:
  """`text` as a literal in Rust's regex syntax."""
  return "".join("\\" + c if c in r"\.+*?()|[]{}^$#&-~" else c for c in text)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Tables:
  """The grammars a decode state holds (see the module's docstring)."""
  classes: jax.Array  # [G, V] int32
  cells: jax.Array  # [N] int32

  @staticmethod
  def empty(slots: int, cells: int, vocab: int) -> "Tables":
    """Only slot 0 (no grammar): every id class 0 and cell 0 leading to itself."""
    return Tables(jnp.zeros((slots, vocab), jnp.int32), jnp.full((cells,), -1, jnp.int32).at[0].set(0))


def successors(tables: Tables, slot: jax.Array, at: jax.Array) -> jax.Array:
  """slot, at [B] (each row's grammar and state's cell) -> [B, V] the cell each id leads to (-1: not allowed)."""
  return tables.cells[at[:, None] + tables.classes[slot]]


def loaded(tables: Tables, slot, classes, base, cells) -> Tables:
  """`tables` with a grammar in `slot`: its classes [V] and its cells [K] at cells [base, base + K)."""
  return Tables(tables.classes.at[slot].set(classes), jax.lax.dynamic_update_slice(tables.cells, cells, (base,)))


class Registry:
  """Which grammar each slot of a decode state's Tables holds and where its cells lie, filled as prompts are
  admitted; `release` frees those of grammars no prompt follows any more, for later ones (a grammar that finds no
  room waits for the next call). Cells are given first fit from the free ranges, which merge as they free."""

  def __init__(self, slots: int, cells: int, vocab: int, stop_ids: Sequence[int]):
    self.slots, self.cells, self.vocab, self.stop_ids = slots, cells, vocab, list(stop_ids)
    self.placed: dict[Grammar, tuple[int, int]] = {}  # grammar -> (slot, base)
    self.waiting: list[Grammar] = []  # reserved, not yet on the device
    self.free_slots = list(range(slots - 1, 0, -1))  # slot 0: no grammar's (taken from the end: lowest first)
    self.free_cells = [(1, cells - 1)] if cells > 1 else []  # [(start, count)] in order; cell 0: slot 0's

  def reserve(self, grammar: Grammar | None) -> bool:
    """Room for `grammar` (None, or one already reserved: always)."""
    if grammar is None or grammar in self.placed:
      return True
    fit = next((k for k, (_, count) in enumerate(self.free_cells) if count >= grammar.cells), None)
    if not self.free_slots or fit is None:
      return False
    base, count = self.free_cells[fit]
    self.free_cells[fit:fit + 1] = [(base + grammar.cells, count - grammar.cells)] if count > grammar.cells else []
    self.placed[grammar] = (self.free_slots.pop(), base)
    self.waiting.append(grammar)
    return True

  def release(self, keep: set) -> None:
    """Frees the slots and cells of the placed grammars not in `keep` (those the running and waiting prompts
    follow): rows that ended may still point there, but read nothing they use."""
    for g in [g for g in self.placed if g not in keep]:
      slot, base = self.placed.pop(g)
      self.free_slots.append(slot)
      ranges = sorted(self.free_cells + [(base, g.cells)])
      self.free_cells = []
      for start, count in ranges:  # merged with their neighbours
        if self.free_cells and sum(self.free_cells[-1]) == start:
          self.free_cells[-1] = (self.free_cells[-1][0], self.free_cells[-1][1] + count)
        else:
          self.free_cells.append((start, count))

  def start(self, grammar: Grammar | None) -> tuple[int, int]:
    """A row's (slot, cell of its first state) for `grammar` (reserved); (0, 0) for none."""
    if grammar is None:
      return 0, 0
    slot, base = self.placed[grammar]
    return slot, base + grammar.initial * grammar.table.shape[1]

  def payloads(self):
    """(slot, classes [V], base, cells [K]) of each reserved grammar not yet on the device (decoding.load_grammar
    puts one there)."""
    for g in self.waiting:
      slot, base = self.placed[g]
      classes = np.zeros(self.vocab, np.int32)
      classes[:len(g.classes)] = g.classes
      classes[[i for i in self.stop_ids if 0 <= i < self.vocab]] = STOP
      cells = np.full(g.cells, -1, np.int32)
      cells[:g.table.size] = np.where(g.table >= 0, base + g.table * g.table.shape[1], -1).ravel()
      yield np.int32(slot), classes, np.int32(base), cells
    self.waiting = []
