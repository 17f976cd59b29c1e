"""A regular expression -> a token automaton (`Grammar`): outlines-core's Index over a tokenizer's ids, compressed
(see grammar.py for how the decode loop follows it), built in a child process with a time and a memory limit.

outlines-core's build grows exponentially with some regexes (a JSON string's minLength / maxLength, a regex's
repetition counts: maxLength 16 took 2.8 s, 18 13-24 s, 20 over a minute and 7 GB with Qwen2's vocabulary), so one
request could stall or kill a server. `build` runs it in a child Python process (this module: numpy and
outlines-core, ~0.1 s to start), kills it past `seconds`, and caps its address space at `memory` bytes more than it
starts with (Linux); either is one UserError.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from qwen_moe_jax.cache_home import cache_home
from qwen_moe_jax.errors import UserError

NEVER, STOP = 0, 1  # the classes every grammar has (see grammar.py's docstring)
SECONDS, MEMORY = 60.0, 8 << 30  # a build's default limits
GROWTH = ("outlines-core's automaton grows exponentially with a string's minLength / maxLength and a regex's "
          "repetition counts")


class Grammar:
  """A token automaton: `classes` [V'] int32 each id's class (V' the tokenizer's ids), `table` [S, C] int32 the
  state each class leads to from each state (-1: not allowed; column STOP leads back to the state where it may
  end), `initial` the first state. Grammars built from the same regex (`pattern`) are equal, so their rows share
  one slot on the device however often it was built (`Grammars` caches the recent ones); one made without a
  pattern equals only itself."""

  def __init__(self, classes: np.ndarray, table: np.ndarray, initial: int, source: str, pattern: str | None = None):
    self.classes, self.table, self.initial, self.source, self.pattern = classes, table, initial, source, pattern

  def __eq__(self, other) -> bool:
    return self is other or (isinstance(other, Grammar) and self.pattern is not None and self.pattern == other.pattern)

  def __hash__(self) -> int:
    return hash(self.pattern) if self.pattern is not None else object.__hash__(self)

  @property
  def cells(self) -> int:
    """Its cells on the device: the table padded to a power of two (see Registry)."""
    return pow2(self.table.size)

  def __repr__(self) -> str:
    return f"Grammar({self.source}, {self.table.shape[0]} states x {self.table.shape[1]} classes)"


def pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def automaton(transitions: dict[int, dict[int, int]], initial: int, final: Sequence[int], vocab: int,
              ignore: int, source: str, pattern: str | None = None) -> Grammar:
  """outlines-core's Index (of the regex `pattern`) as a Grammar: transitions {state: {id: next state}} over ids <
  vocab (`ignore`: its EOS id, which STOP replaces). Ids alike in every state are found by a random linear hash of
  their columns (one pass over the transitions), then the table is checked against every transition and allowed
  count."""
  states = sorted(set(transitions) | {t for row in transitions.values() for t in row.values()} | {initial})
  number = {s: k for k, s in enumerate(states)}
  columns, rng = [], np.random.default_rng(0)
  hashes = np.zeros(vocab, np.uint64)
  for s in states:
    row = {t: n for t, n in transitions.get(s, {}).items() if t != ignore and 0 <= t < vocab}
    ids = np.fromiter(row, np.int64, len(row))
    nexts = np.fromiter((number[n] for n in row.values()), np.int64, len(row))
    columns.append((ids, nexts))
    hashes[ids] += rng.integers(1, 2**63, dtype=np.uint64) * (nexts.astype(np.uint64) + np.uint64(1))
  unique, inverse = np.unique(hashes, return_inverse=True)
  labels = np.where(unique == 0, NEVER, np.cumsum(unique != 0) + STOP)  # sorted: 0 (never allowed) first
  classes = labels[inverse].astype(np.int32)
  table = np.full((len(states), int(labels.max(initial=STOP)) + 1), -1, np.int32)
  sizes = np.bincount(classes, minlength=table.shape[1])
  sizes[:STOP + 1] = 0
  for k, (ids, nexts) in enumerate(columns):
    table[k, classes[ids]] = nexts
    if not (np.array_equal(table[k, classes[ids]], nexts) and sizes[table[k] >= 0].sum() == len(ids)):
      raise RuntimeError(f"{source}: two ids that act differently hashed alike (state {k})")  # ~2^-64
  finals = [number[s] for s in final if s in number]
  table[finals, STOP] = finals
  return Grammar(classes, table, number[initial], source, pattern)


class Store:
  """Grammars built before, on disk (`folder`): one .npz each (no pickle), named by a hash of what made it (the
  tokenizer's byte vocabulary, outlines-core's version, the regex: `fingerprint` and the pattern), so a schema builds
  once per machine rather than once per run or server start (any JSON object: 11 s with Qwen2's vocabulary, 2
  cores). The most recently used stay, up to `max_bytes` in all (the newest always); a file that does not read back
  as the grammar asked for is built again; a folder that cannot be written is skipped."""

  FORMAT = 1  # the stored arrays' meaning: change it when Grammar's arrays change

  def __init__(self, folder: str | Path, max_bytes: int = 1 << 30):
    self.folder, self.max_bytes = Path(folder), max_bytes

  def path(self, fingerprint: str, pattern: str) -> Path:
    key = hashlib.sha256(f"{self.FORMAT}\0{fingerprint}\0{pattern}".encode()).hexdigest()
    return self.folder / f"{key[:32]}.npz"

  def get(self, fingerprint: str, pattern: str, vocab: int, source: str) -> Grammar | None:
    """The stored grammar of `pattern` over `vocab` ids, or None (none stored, or a file that is not it)."""
    path = self.path(fingerprint, pattern)
    try:
      with np.load(path, allow_pickle=False) as f:
        classes, table, initial, stored = f["classes"], f["table"], int(f["initial"]), f["pattern"].tobytes()
      fits = (stored == pattern.encode() and classes.dtype == table.dtype == np.int32 and classes.shape == (vocab,)
              and table.ndim == 2 and 0 <= initial < len(table) and 0 <= classes.min()
              and classes.max() < table.shape[1] and -1 <= table.min() and table.max() < len(table))
      if fits:
        os.utime(path)  # recently used
    except (OSError, ValueError, TypeError, KeyError, EOFError, zipfile.BadZipFile):
      return None
    return Grammar(classes, table, initial, source, pattern) if fits else None

  def put(self, fingerprint: str, grammar: Grammar) -> None:
    """Stores `grammar` (written whole under a temporary name, then renamed), the least recently used going once
    the files are over `max_bytes` in all; a folder that cannot be written is no error."""
    path, written = self.path(fingerprint, grammar.pattern), None
    try:
      self.folder.mkdir(parents=True, exist_ok=True)
      with tempfile.NamedTemporaryFile(dir=self.folder, suffix=".tmp", delete=False) as f:
        written = f.name
        np.savez_compressed(f, classes=grammar.classes, table=grammar.table, initial=np.int64(grammar.initial),
                            pattern=np.frombuffer(grammar.pattern.encode(), np.uint8))
      os.replace(written, path)
      total = 0
      for stored in sorted(self.folder.glob("*.npz"), key=lambda p: p.stat().st_mtime, reverse=True):
        total += stored.stat().st_size
        if total > self.max_bytes and stored != path:
          stored.unlink(missing_ok=True)
    except OSError:
      if written:
        Path(written).unlink(missing_ok=True)


def store_of(folder: str | None, flag: str) -> Store | None:
  """The Store `flag` names: `folder` (created now: one that cannot be is a UserError), else
  ~/.cache/qwen-moe-jax/grammars ($XDG_CACHE_HOME's; created when first written); "off": none."""
  if folder == "off":
    return None
  if folder is None:
    return Store(cache_home("grammars"))
  try:
    Path(folder).mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f"{flag} {folder}: cannot create the folder ({e.strerror})") from None
  return Store(folder)


def build_limits(text: str, flag: str) -> tuple[float, int]:
  """'SECONDS,GIB' -> (seconds, bytes), both positive, else a UserError naming `flag`."""
  try:
    seconds, gib = (float(x) for x in text.split(","))
    assert seconds > 0 and gib > 0 and seconds * gib < float("inf")
  except (ValueError, AssertionError):
    raise UserError(f"{flag} takes SECONDS,GIB (two positive numbers, such as 60,8), got {text!r}") from None
  return seconds, int(gib * 2**30)


def build(pattern: str, vocabulary: bytes, vocab: int, eos: int, source: str, where: str, *, seconds: float | None,
          memory: int) -> Grammar:
  """The Grammar of `pattern` over a pickled outlines_core.Vocabulary (`vocab` ids, `eos` its EOS id), built in a
  child process within `seconds` (None: however long it takes) and `memory` bytes; a bad pattern or a limit reached
  is a UserError naming `where` and `source`."""
  root = str(Path(__file__).resolve().parents[1])  # this package's folder, for a run from a source tree
  env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
  job = pickle.dumps((pattern, vocabulary, vocab, eos, source, memory))
  try:
    done = subprocess.run([sys.executable, "-m", __name__], input=job, capture_output=True, env=env,
                          timeout=seconds, check=False)
  except subprocess.TimeoutExpired:
    raise UserError(f"{where}: building the {source} took over {seconds:g} s ({GROWTH})") from None
  if done.returncode > 0:  # not a limit: its last line says why (a Python error)
    why = (done.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
    raise RuntimeError(f"building the {source} failed in its process (exit {done.returncode}): {why}")
  kind, value = ("memory", None) if done.returncode else pickle.loads(done.stdout)  # a signal: Rust aborts on OOM
  if kind == "memory":
    raise UserError(f"{where}: building the {source} needed over {memory / 2**30:.3g} GiB of memory ({GROWTH})")
  if kind == "error":
    raise UserError(f"{where}: cannot build the {source}: {value}")
  classes, table, initial = value
  return Grammar(classes, table, initial, source, pattern)


def _build_here() -> None:
  """The child's side of `build`: reads its job on stdin, writes ("grammar", (classes, table, initial)), ("error",
  message) or ("memory", None) on stdout."""
  import outlines_core

  pattern, vocabulary, vocab, eos, source, memory = pickle.loads(sys.stdin.buffer.read())
  if os.path.exists("/proc/self/statm"):  # Linux: cap the address space (elsewhere the time limit only)
    import resource

    with open("/proc/self/statm") as f:  # its address space now, in pages
      start = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    soft = start + memory if hard == resource.RLIM_INFINITY else min(start + memory, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
  try:
    index = outlines_core.Index(pattern, pickle.loads(vocabulary))
    g = automaton(index.get_transitions(), index.get_initial_state(), index.get_final_states(), vocab, eos, source)
    result = ("grammar", (g.classes, g.table, g.initial))
  except (ValueError, RuntimeError) as e:  # a bad pattern; two ids hashed alike (~2^-64)
    result = ("error", str(e))
  except MemoryError:
    result = ("memory", None)
  sys.stdout.buffer.write(pickle.dumps(result))


if __name__ == "__main__":
  _build_here()
