"""The device side of generation: the decode state (KV cache, tokens so far, each row's settings) and the jitted
programs over it, each donating the state so the cache is updated in place: `prefill` (prompts into rows),
`decode` (a `lax.while_loop` of steps that stays on the device), `prompt_slots` / `prefix_slots` and `fork` (a row
takes another row's prefix), `exchange` (the prefix pool's saves and loads), `end_row`, `resized` (room for more
or fewer sampling steps). generate.py drives them from the host.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_moe_jax import sharding
from qwen_moe_jax.errors import UserError
from qwen_moe_jax.grammar import Tables, loaded, successors
from qwen_moe_jax.kv_cache import KVCache
from qwen_moe_jax.model import QwenMoeForCausalLM
from qwen_moe_jax.sampling import (
  NO_ID,
  RowSampling,
  Sampling,
  SamplingOps,
  chosen_logprob,
  count_generated,
  likeliest,
  mark_seen,
  sample,
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
  cache: KVCache
  tokens: jax.Array  # [B, M] generated ids (M: the bucketed max_new)
  logprobs: jax.Array  # [B, M] fp32 their log-probabilities (see chosen_logprob)
  last: jax.Array  # [B] the newest token
  positions: jax.Array  # [B] position of `last`
  done: jax.Array  # [B] bool
  count: jax.Array  # [B] tokens generated so far in each row
  keys: jax.Array  # [B] per-row PRNG keys (of the prompt in the row)
  stop_ids: jax.Array  # [S] ids that end a row (-1: unused slot)
  limit: jax.Array  # [B] max_new_tokens of each row's prompt: the row ends after this many tokens
  sampling: RowSampling  # [B] each row's prompt's sampling settings
  seen: jax.Array | None  # [B, V] bool: ids in each row's prompt and output (repetition penalty; else None)
  counts: jax.Array | None  # [B, V] int32: times each row generated each id (presence / frequency; else None)
  top_ids: jax.Array | None  # [B, M, K] at each generated token, the K likeliest ids (ops.top_logprobs; else None)
  top_logprobs: jax.Array | None  # [B, M, K] fp32 their log-probabilities (see likeliest)
  grammars: Tables | None  # the grammars rows follow (ops.grammars; else None), see grammar.py
  grammar_at: jax.Array | None  # [B] int32 the cell of each row's grammar state

  def laid_out(self) -> "DecodeState":
    """Fixed shardings under a mesh (cache by the rules, the rest replicated), the same in and out of decode."""
    small = {f.name: jax.tree.map(lambda x: sharding.constrain(x, (None,) * x.ndim), getattr(self, f.name))
             for f in dataclasses.fields(self) if f.name != "cache"}
    return DecodeState(cache=self.cache.laid_out(), **small)


SEEDS = 1 << 63  # seeds are in [-SEEDS, 2 x SEEDS): int64's and uint64's


def checked_seed(seed: int, name: str) -> int:
  """`seed` if `prompt_keys` takes it, else a UserError naming it (`name`: the flag or field)."""
  if not -SEEDS <= seed < 2 * SEEDS:
    raise UserError(f"{name} must be in [-2^63, 2^64), got {seed}")
  return seed


def prompt_keys(seed: int | Sequence[int], indices: Sequence[int]) -> jax.Array:
  """Prompt i's key depends only on (seed, i) (one seed, or one per index): it samples the same alone, in a batch,
  or queued for a free row. A seed past int32's range (up to 64 bits, see SEEDS) folds its high 32 bits into the key
  of its low 32."""
  indices = np.asarray(indices, np.int32)
  seeds = [int(s) for s in np.broadcast_to(np.asarray(seed, dtype=object), indices.shape)]
  as_int32 = lambda x: (x + (1 << 31)) % (1 << 32) - (1 << 31)  # noqa: E731  x's low 32 bits, signed
  low, high = np.array([as_int32(s) for s in seeds], np.int32), np.array([as_int32(s >> 32) for s in seeds], np.int32)
  wide = np.array([as_int32(s) != s for s in seeds])

  def key(low, high, wide, index):
    base = jax.random.key(low)
    return jax.random.fold_in(jax.lax.cond(wide, lambda: jax.random.fold_in(base, high), lambda: base), index)

  return jax.vmap(key)(low, high, wide, indices)


def _step_keys(keys: jax.Array, count: jax.Array) -> jax.Array:
  """keys [B], count [] or [B] (tokens generated so far) -> the keys of each row's next token."""
  return jax.vmap(jax.random.fold_in)(keys, jnp.broadcast_to(count, keys.shape))


@functools.partial(jax.jit, static_argnames=("cfg", "rows", "cache_len", "max_new", "dtype", "ops"))
def empty_state(keys, stop_ids, *, cfg, rows, cache_len, max_new, dtype, ops=SamplingOps()) -> DecodeState:
  """A state with an empty [rows, cache_len] cache and every row done until `prefill` fills it, with the [rows, V]
  ids seen per row (`seen`) or generated (`counts`) that the penalties in `ops` need."""
  return _state(KVCache.zeros(cfg, rows, cache_len, dtype), keys, stop_ids, max_new, cfg.vocab_size, ops)


def kept_state(cache: KVCache, keys, stop_ids, *, cache_len, max_new, vocab, ops=SamplingOps()) -> DecodeState:
  """A state around a kept cache (an earlier call's: used up), its slots padded to `cache_len`, every row done
  (`fork` sets a row going)."""
  grow = _grown_state if cache_len > cache.length else _same_state
  return grow(cache, keys, stop_ids, cache_len=cache_len, max_new=max_new, vocab=vocab, ops=ops)


@functools.partial(jax.jit, static_argnames=("cache_len", "max_new", "vocab", "ops"))
def _grown_state(cache: KVCache, keys, stop_ids, *, cache_len, max_new, vocab, ops) -> DecodeState:
  return _state(cache.grown(cache_len), keys, stop_ids, max_new, vocab, ops)


@functools.partial(jax.jit, static_argnames=("cache_len", "max_new", "vocab", "ops"), donate_argnames=("cache",))
def _same_state(cache: KVCache, keys, stop_ids, *, cache_len, max_new, vocab, ops) -> DecodeState:
  return _state(cache, keys, stop_ids, max_new, vocab, ops)  # the cache updated in place from here on


def _state(cache: KVCache, keys, stop_ids, max_new: int, vocab: int, ops: SamplingOps) -> DecodeState:
  rows = cache.k[0].shape[0]
  zeros = jnp.zeros((rows,), jnp.int32)
  return DecodeState(
    cache=cache, tokens=jnp.zeros((rows, max_new), jnp.int32), logprobs=jnp.zeros((rows, max_new), jnp.float32),
    last=zeros, positions=zeros, done=jnp.ones((rows,), bool), count=zeros, keys=keys, stop_ids=stop_ids,
    limit=zeros, sampling=jax.tree.map(jnp.asarray, RowSampling.of([Sampling()] * rows, ops)),
    seen=jnp.zeros((rows, vocab), bool) if ops.repetition else None,
    counts=jnp.zeros((rows, vocab), jnp.int32) if ops.counted else None,
    **_top_zeros(rows, max_new, ops),
    grammars=Tables.empty(ops.grammars, ops.grammar_cells, vocab) if ops.grammars else None,
    grammar_at=zeros if ops.grammars else None).laid_out()


def _top_zeros(rows: int, max_new: int, ops: SamplingOps) -> dict:
  """DecodeState's top_ids and top_logprobs for `rows` rows, zeros (None when no row reports any)."""
  shape = (rows, max_new, ops.top_logprobs)
  return {"top_ids": jnp.zeros(shape, jnp.int32) if ops.top_logprobs else None,
          "top_logprobs": jnp.zeros(shape, jnp.float32) if ops.top_logprobs else None}


@functools.partial(jax.jit, static_argnames=("graphdef", "ops"), donate_argnames=("state",))
def prefill(graphdef, params, state: DecodeState, tokens, lengths, limits, keys, settings: RowSampling, rows,
            source, *, ops: SamplingOps) -> DecodeState:
  """Runs G prompts and puts them in R rows of the state, row rows[r] getting prompt source[r] (a prompt run once
  fills the rows of all its samples): its keys and values in the cache (slots [0, T), written in place; later
  slots keep what a previous prompt left there, which the causal mask hides), the row's token limit, PRNG key
  and first token (drawn with the row's key).

  tokens [G, T] right-padded, lengths [G]; limits, keys, settings, rows, source [R] (rows past the state's:
  unused).
  source None: prompt r fills row rows[r] (R == G, nothing shared: no gather). rows None too: prompt g fills
  row g of all G == B rows (a length of 0: unused, done from the start), a fixed layout, which shards cleanly.
  """
  model: QwenMoeForCausalLM = nnx.merge(graphdef, params)
  g, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (g, t))
  segments = (positions < lengths[:, None]).astype(jnp.int32)  # padding: segment 0
  out = model(tokens, positions, segments, cache=state.cache, packed=False,
              cache_rows=None if rows is None else (rows, source))
  assert rows is not None or g == state.last.shape[0], (g, state.last.shape)
  if source is None:
    source = jnp.arange(g)
  last_hidden = jnp.take_along_axis(out.hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [G, D]
  seen = None if state.seen is None else mark_seen(jnp.zeros((g, state.seen.shape[1]), bool), tokens, segments > 0)
  logits, length = model.logits(last_hidden)[source], lengths[source]  # [R, V], [R]
  seen = None if seen is None else seen[source]
  counts = None if state.counts is None else jnp.zeros((len(source), state.counts.shape[1]), jnp.int32)
  nexts = successors(state.grammars, settings.grammar_slot, settings.grammar_start) if ops.grammars else None
  first = sample(logits, _step_keys(keys, jnp.int32(0)), ops, settings, seen, counts,
                 jnp.zeros(len(source), jnp.int32), state.stop_ids, None if nexts is None else nexts >= 0)
  done = jnp.isin(first, state.stop_ids) | (limits <= 1) | (length == 0)
  tokens_out = jnp.zeros((len(first), state.tokens.shape[1]), jnp.int32).at[:, 0].set(first)
  top = _top_zeros(len(first), state.tokens.shape[1], ops)
  if ops.top_logprobs:
    ids, lps = likeliest(logits, ops.top_logprobs)
    top = {"top_ids": top["top_ids"].at[:, 0].set(ids), "top_logprobs": top["top_logprobs"].at[:, 0].set(lps)}

  def put(whole, part):  # part [R, ...] -> rows `rows` of whole [B, ...]
    part = part.astype(whole.dtype)
    return part if rows is None else whole.at[rows].set(part, mode="drop")

  return dataclasses.replace(
    state, cache=out.cache, tokens=put(state.tokens, tokens_out),
    logprobs=put(state.logprobs, jnp.zeros(tokens_out.shape).at[:, 0].set(chosen_logprob(logits, first))),
    last=put(state.last, first), positions=put(state.positions, length), done=put(state.done, done),
    count=put(state.count, length > 0), limit=put(state.limit, limits), keys=put(state.keys, keys),
    sampling=jax.tree.map(put, state.sampling, settings),
    seen=None if seen is None else put(state.seen, mark_seen(seen, first, length > 0)),
    counts=None if counts is None else put(state.counts, count_generated(counts, first, length > 0)),
    grammar_at=None if nexts is None else put(state.grammar_at, _taken(nexts, first)),
    **{name: None if x is None else put(getattr(state, name), x) for name, x in top.items()}).laid_out()


@functools.partial(jax.jit, static_argnames=("graphdef", "ops"), donate_argnames=("state",))
def decode(graphdef, params, state: DecodeState, refill, steps, *, ops: SamplingOps) -> DecodeState:
  """Up to `steps` [] more tokens per row (traced: one program for any count), stopping early once every row is
  done, or, with `refill` [] (prompts wait for a row), once any row finishes. Done rows keep their tokens, count,
  last token and position (their steps write that token's key and value at its slot, which nothing reads)."""
  model: QwenMoeForCausalLM = nnx.merge(graphdef, params)
  rows, width = state.tokens.shape
  done_before = state.done

  def cond(carry):
    i, s = carry
    return (i < steps) & ~jnp.all(s.done) & ~(refill & jnp.any(s.done & ~done_before))

  def body(carry):
    i, s = carry
    out = model(s.last[:, None], s.positions[:, None], cache=s.cache, attend_cache=True)
    logits = model.logits(out.hidden[:, 0])
    nexts = successors(s.grammars, s.sampling.grammar_slot, s.grammar_at) if ops.grammars else None
    token = sample(logits, _step_keys(s.keys, s.count), ops, s.sampling, s.seen, s.counts, s.count, s.stop_ids,
                   None if nexts is None else nexts >= 0)
    live = ~s.done
    count = s.count + live
    done = s.done | (live & jnp.isin(token, s.stop_ids)) | (count >= s.limit)
    at = jnp.where(live, s.count, width)  # done rows write nowhere
    put = lambda whole, new: whole.at[jnp.arange(rows), at].set(new, mode="drop")  # noqa: E731
    top = {}
    if ops.top_logprobs:
      ids, lps = likeliest(logits, ops.top_logprobs)
      top = {"top_ids": put(s.top_ids, ids), "top_logprobs": put(s.top_logprobs, lps)}
    return i + 1, dataclasses.replace(
      s, cache=out.cache, tokens=put(s.tokens, token), logprobs=put(s.logprobs, chosen_logprob(logits, token)), **top,
      last=jnp.where(live, token, s.last), positions=s.positions + live, done=done, count=count,
      seen=mark_seen(s.seen, token, live), counts=count_generated(s.counts, token, live),
      grammar_at=None if nexts is None else jnp.where(live, _taken(nexts, token), s.grammar_at)).laid_out()

  return jax.lax.while_loop(cond, body, (jnp.int32(0), state.laid_out()))[1].laid_out()


@functools.partial(jax.jit, static_argnames=("ops", "vocab"), donate_argnames=("state",))
def resized(state: DecodeState, *, ops: SamplingOps, vocab: int) -> DecodeState:
  """The state with room for exactly the sampling steps `ops`, each row going on as before: a step turned on
  (a running call's, for a prompt arriving with more) starts neutral for the rows that do not take it (no ids seen
  or counted, none biased, grammar slot 0; the likeliest ids they did not ask for are zeros); a step turned off
  (no row takes it any more: the caller's check) drops its arrays (the logit bias's to width 0)."""
  rows, width = state.tokens.shape

  def sized(x: jax.Array | None, shape: tuple[int, ...], value, dtype) -> jax.Array:  # None: all `value`
    if x is None:
      return jnp.full(shape, value, dtype)
    x = x[tuple(slice(0, n) for n in shape)]
    return jnp.pad(x, [(0, n - m) for m, n in zip(x.shape, shape)], constant_values=value)

  k, top, s, tables = ops.logit_bias, ops.top_logprobs, state.sampling, state.grammars
  if ops.grammars:
    tables = Tables.empty(ops.grammars, ops.grammar_cells, vocab) if tables is None else Tables(
      sized(tables.classes, (ops.grammars, vocab), 0, jnp.int32),
      sized(tables.cells, (ops.grammar_cells,), -1, jnp.int32))
  return dataclasses.replace(
    state, sampling=dataclasses.replace(s, bias_ids=sized(s.bias_ids, (rows, k), NO_ID, jnp.int32),
                                        biases=sized(s.biases, (rows, k), 0.0, jnp.float32)),
    seen=sized(state.seen, (rows, vocab), False, bool) if ops.repetition else None,
    counts=sized(state.counts, (rows, vocab), 0, jnp.int32) if ops.counted else None,
    top_ids=sized(state.top_ids, (rows, width, top), 0, jnp.int32) if top else None,
    top_logprobs=sized(state.top_logprobs, (rows, width, top), 0.0, jnp.float32) if top else None,
    grammars=tables if ops.grammars else None,
    grammar_at=sized(state.grammar_at, (rows,), 0, jnp.int32) if ops.grammars else None).laid_out()


@jax.jit
def prompt_slots(cache: KVCache, sources, prompt) -> KVCache:
  """Slots [0, P) of cache rows `sources` [R] (prompt [R, P]: only its width is used): what `fork` copies,
  read in a program of its own so that `fork` writes its (donated) cache in place."""
  return cache.slots(sources, prompt.shape[1])


@functools.partial(jax.jit, static_argnames=("graphdef",))
def prefix_slots(graphdef, params, cache: KVCache, sources, tokens, starts, prompt) -> KVCache:
  """`prompt_slots` of rows whose slots [0, starts[r]) hold the prompt's first ids, with the prompt's next ids up
  to its last (excluded) run over them: tokens [R, W] right-padded, at positions starts[r].. (padding past the
  P slots: dropped; inside them it writes slots from the prompt's last id's on, which decode steps write before
  they read them)."""
  model: QwenMoeForCausalLM = nnx.merge(graphdef, params)
  positions = starts[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
  return model(tokens, positions, cache=prompt_slots(cache, sources, prompt).laid_out(), attend_cache=True).cache


@functools.partial(jax.jit, donate_argnames=("state",))
def fork(state: DecodeState, rows, kv: KVCache, prompt, limits, keys, settings: RowSampling) -> DecodeState:
  """Rows `rows` [R] take prompts whose keys and values up to their last id `kv` holds (slots [0, P), from
  `prompt_slots` or `prefix_slots`), which they get (their later slots, hidden by the mask, are written over
  before they are read); each row is set to feed the prompt's last token at its position, so that the next decode step
  draws the row's first token (with its own key, as the prefill would). prompt [R, P] the ids, -1 padded (its
  length, and the ids a repetition penalty sees); limits, keys, settings [R]; rows past the state's: unused."""
  length = jnp.sum(prompt >= 0, axis=1)
  put = lambda whole, part: whole.at[rows].set(part.astype(whole.dtype), mode="drop")  # noqa: E731
  cache = state.cache.put(rows, kv)
  seen = None if state.seen is None else mark_seen(jnp.zeros((len(rows), state.seen.shape[1]), bool),
                                                    jnp.maximum(prompt, 0), prompt >= 0)
  return dataclasses.replace(
    state, cache=cache, last=put(state.last, jnp.take_along_axis(prompt, (length - 1)[:, None], axis=1)[:, 0]),
    positions=put(state.positions, length - 1), done=put(state.done, jnp.zeros_like(rows, bool)),
    count=put(state.count, jnp.zeros_like(rows)), limit=put(state.limit, limits), keys=put(state.keys, keys),
    sampling=jax.tree.map(put, state.sampling, settings), seen=None if seen is None else put(state.seen, seen),
    counts=None if state.counts is None else put(state.counts, jnp.zeros((len(rows), state.counts.shape[1]))),
    grammar_at=None if state.grammar_at is None else put(state.grammar_at, settings.grammar_start)).laid_out()


@functools.partial(jax.jit, static_argnames=("save_width", "load_width"), donate_argnames=("cache", "pool"))
def exchange(cache: KVCache, pool: KVCache, save_rows, save_entries, load_entries, load_rows, *, save_width: int,
             load_width: int) -> tuple[KVCache, KVCache]:
  """(cache, pool) with slots [0, save_width) of cache rows `save_rows` [S] saved to prefix pool entries
  `save_entries` [S], and slots [0, load_width) of pool entries `load_entries` [L] loaded into cache rows
  `load_rows` [L] (indices past the arrays: dropped), every read before any write: a row can take an entry's ids
  while what it held takes that entry's place (generate.py)."""
  saved, loaded = cache.slots(save_rows, save_width), pool.slots(load_entries, load_width)
  return cache.put(load_rows, loaded).laid_out(), pool.put(save_entries, saved).laid_out()


@functools.partial(jax.jit, static_argnames=("cfg", "rows", "length", "dtype"))
def empty_cache(*, cfg, rows, length, dtype) -> KVCache:
  return KVCache.zeros(cfg, rows, length, dtype)


@functools.partial(jax.jit, static_argnames=("length",))  # (a donated cache could not hold the longer one)
def grown_cache(cache: KVCache, *, length: int) -> KVCache:
  return cache.grown(length).laid_out()


def _taken(nexts: jax.Array, token: jax.Array) -> jax.Array:
  """nexts [B, V] (see grammar.successors), token [B] -> the cell [B] each row's token leads to."""
  return jnp.take_along_axis(nexts, token[:, None], axis=1)[:, 0]


@functools.partial(jax.jit, donate_argnames=("state",))
def load_grammar(state: DecodeState, slot, classes, base, cells) -> DecodeState:
  """The state with a grammar in its tables (grammar.Registry.payloads)."""
  return dataclasses.replace(state, grammars=loaded(state.grammars, slot, classes, base, cells)).laid_out()


@functools.partial(jax.jit, donate_argnames=("state",))
def end_row(state: DecodeState, row) -> DecodeState:
  """The state with `row` done (ended on the host: a stop string)."""
  return dataclasses.replace(state, done=state.done.at[row].set(True)).laid_out()
