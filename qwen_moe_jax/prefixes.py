"""Which cache row holds the longest prefix of a prompt, so that a new prompt copies those slots instead of
running them (generate.py: few-shot prompts, one document asked several questions, a long system prompt), and
which prefix pool entry keeps what a taken row held (`Pool`).

Prompts are indexed by their leading blocks of BLOCK ids, each block keyed by a hash chained over the blocks
before it (vLLM's prefix cache keys its blocks the same way), so a lookup costs one dict probe per block; the
match found is then measured id by id, which makes it exact whatever the hashes do. Python hashes tuples of
ints the same in every process (PYTHONHASHSEED salts only str and bytes), so with several processes every one
picks the same rows.
"""

from __future__ import annotations

from typing import Iterator, Sequence

BLOCK = 16


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  """How many leading ids a and b share."""
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n


def _block_keys(ids: Sequence[int]) -> Iterator[int]:
  """One key per full block of ids, each depending on every id up to its block's end."""
  key = 0
  for end in range(BLOCK, len(ids) + 1, BLOCK):
    key = hash((key, tuple(ids[end - BLOCK:end])))
    yield key


class PrefixIndex:
  """Cache rows by the prompts whose keys and values they hold."""

  def __init__(self):
    self._rows: dict[int, tuple[int, Sequence[int]]] = {}  # block key -> (row, its prompt), the first row added

  def add(self, row: int, prompt: Sequence[int]) -> None:
    """Row `row` holds the keys and values of prompt[:-1] (its last id may be still to run: a copied row's is)."""
    for key in _block_keys(prompt[:-1]):
      self._rows.setdefault(key, (row, prompt))

  def longest(self, prompt: Sequence[int]) -> tuple[int, int]:
    """(row, n): the first row added of those holding the most whole leading blocks of prompt[:-1], and how many
    of prompt's leading ids it holds, counted id by id (n < len(prompt): the last id's logits are needed);
    (-1, 0) when no row holds prompt's first block."""
    hit = None
    for key in _block_keys(prompt[:-1]):
      if key not in self._rows:
        break
      hit = self._rows[key]
    if hit is None:
      return -1, 0
    row, other = hit
    return row, common_prefix(prompt[:-1], other[:-1])


class Pool:
  """What the prefix pool's entries hold (`Generator(prefix_pool=N)`: keys and values of finished rows kept past
  the decode rows, for a conversation whose row was taken by another prompt): entry e holds the keys and values of
  holds[e][:-1] (None: nothing), saved from a row freed at used[e] (the Generator's clock)."""

  def __init__(self, size: int):
    self.holds: list[list[int] | None] = [None] * size
    self.used = [0] * size

  def target(self, ids: list[int], freed: int, busy: set[int]) -> int:
    """The entry to save a row holding `ids` (freed at `freed`) into, none of `busy` (saved to in this
    placement): one whose ids it extends (an earlier turn of its conversation), else an empty one, else the least
    recently used if used before `freed`; -1: none (an entry holds `ids` already, or each holds something used
    later)."""
    if any(held is not None and common_prefix(held[:-1], ids[:-1]) == len(ids) - 1 for held in self.holds):
      return -1
    free = [e for e in range(len(self.holds)) if e not in busy]
    for e in free:
      held = self.holds[e]
      if held is not None and common_prefix(held[:-1], ids[:-1]) == len(held) - 1:
        return e
    empty = [e for e in free if self.holds[e] is None]
    if empty:
      return empty[0]
    oldest = min(free, key=lambda e: self.used[e], default=-1)
    return oldest if oldest >= 0 and self.used[oldest] < freed else -1


def families(prompts: Sequence[Sequence[int]], least: int, most: int) -> list[tuple[int, list[int]]]:
  """Prompts grouped to run a common prefix once (scoring.py): [(n, indices)] where the prompts at `indices` (2 to
  `most` of them) share their first n >= `least` ids, and (0, [i]) for each prompt left alone.

  Prompts are taken in sorted order, so those sharing most are neighbours. A prompt joins the group before it
  when it shares at least `least` ids with it and the ids the group would stop sharing, times the group's
  prompts but one (each would run them again), do not outnumber the ids still shared (which a group of its own
  would run again): the choices of one question stay together, two documents under one short system prompt
  do not.
  """
  out: list[tuple[int, list[int]]] = []
  group: list[int] = []
  n = 0
  for i in sorted(range(len(prompts)), key=lambda i: tuple(prompts[i])):  # (lists, tuples or arrays alike)
    m = min(n, common_prefix(prompts[group[-1]], prompts[i])) if group else 0
    if group and m >= least and len(group) < most and (n - m) * (len(group) - 1) <= m:
      group.append(i)
      n = m
      continue
    if group:
      out.append((n if len(group) > 1 else 0, group))
    group, n = [i], len(prompts[i])
  out.append((n if len(group) > 1 else 0, group))
  return out
