"""Generation: prefill the prompts into a shared KV cache, then a decode loop that stays on the device.

Prompts of different lengths share a batch: each row is right-padded, its cache slot s holds its position
s, and padding is its own attention segment, so a row's tokens equal what the prompt gives alone. Shapes
are bucketed (batch and max new tokens to powers of two, prompt and cache lengths by `cache_bucket`), so new
requests rarely recompile; `prefill_rows` prompts at a time are prefilled straight into the cache, and
identical prompts in one prefill call (the samples of a prompt) run once, their keys and values written to
each of their rows. A prompt that begins with ids another row holds (a running sample of it, a shared
few-shot or system prefix: prefixes.py) copies those slots from that row and runs only the rest (`fork`).
The decode loop is a `lax.while_loop` over a chunk of steps with the state (KV cache included) donated, so
the cache is updated in place; the host only wakes between chunks to stream the new tokens, to end rows at
stop strings (`stop_when`) and, when there are more prompts than rows (`batch_size`), to prefill waiting
prompts into rows that finished (continuous batching; rows freed at once are refilled in one call). Each row
counts its own tokens, and a prompt's random stream depends only on the seed and the prompt's index.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_moe_jax import sharding
from qwen_moe_jax.errors import UserError
from qwen_moe_jax.kv_cache import KVCache
from qwen_moe_jax.model import QwenMoeForCausalLM
from qwen_moe_jax.prefixes import PrefixIndex, common_prefix
from qwen_moe_jax.sampling import RowSampling, Sampling, SamplingOps, chosen_logprob, count_generated, mark_seen, sample

MIN_BUCKET = 16
CACHE_STEP = 256  # cache lengths above this are multiples of it (see cache_bucket)
COPY_SLOTS = 16_384  # most slots per row group copied in one call (Generator.generate's `copy`)


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

  def laid_out(self) -> "DecodeState":
    """Fixed shardings under a mesh (cache by the rules, the rest replicated), the same in and out of decode."""
    small = {f.name: jax.tree.map(lambda x: sharding.constrain(x, (None,) * x.ndim), getattr(self, f.name))
             for f in dataclasses.fields(self) if f.name != "cache"}
    return DecodeState(cache=self.cache.laid_out(), **small)


def prompt_keys(seed: int, indices: Sequence[int]) -> jax.Array:
  """Prompt i's key depends only on (seed, i): it samples the same alone, in a batch, or queued for a free row."""
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.int32))


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
    limit=zeros, sampling=jax.tree.map(jnp.asarray, RowSampling.of([Sampling()] * rows)),
    seen=jnp.zeros((rows, vocab), bool) if ops.repetition else None,
    counts=jnp.zeros((rows, vocab), jnp.int32) if ops.counted else None).laid_out()


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
  first = sample(logits, _step_keys(keys, jnp.int32(0)), ops, settings, seen, counts)
  done = jnp.isin(first, state.stop_ids) | (limits <= 1) | (length == 0)
  tokens_out = jnp.zeros((len(first), state.tokens.shape[1]), jnp.int32).at[:, 0].set(first)

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
    counts=None if counts is None else put(state.counts, count_generated(counts, first, length > 0))).laid_out()


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "ops"), donate_argnames=("state",))
def decode(graphdef, params, state: DecodeState, refill, *, steps, ops: SamplingOps) -> DecodeState:
  """Up to `steps` more tokens per row, stopping early once every row is done, or, with `refill` [] (prompts
  wait for a row), once any row finishes. Done rows keep their tokens, count, last token and position (their
  steps write that token's key and value at its slot, which nothing reads)."""
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
    token = sample(logits, _step_keys(s.keys, s.count), ops, s.sampling, s.seen, s.counts)
    live = ~s.done
    count = s.count + live
    done = s.done | (live & jnp.isin(token, s.stop_ids)) | (count >= s.limit)
    at = jnp.where(live, s.count, width)  # done rows write nowhere
    return i + 1, dataclasses.replace(
      s, cache=out.cache, tokens=s.tokens.at[jnp.arange(rows), at].set(token, mode="drop"),
      logprobs=s.logprobs.at[jnp.arange(rows), at].set(chosen_logprob(logits, token), mode="drop"),
      last=jnp.where(live, token, s.last), positions=s.positions + live, done=done, count=count,
      seen=mark_seen(s.seen, token, live), counts=count_generated(s.counts, token, live)).laid_out()

  return jax.lax.while_loop(cond, body, (jnp.int32(0), state.laid_out()))[1].laid_out()


@jax.jit
def prompt_slots(cache: KVCache, sources, prompt) -> KVCache:
  """Slots [0, P) of cache rows `sources` [R] (prompt [R, P]: only its width is used): what `fork` copies,
  read in a program of its own so that `fork` writes its (donated) cache in place."""
  return jax.tree.map(lambda c: c[sources, :, :prompt.shape[1]], cache)


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
  at = (rows[:, None], slice(None), jnp.arange(prompt.shape[1])[None])  # [R, P] first, as LayerKV.write indexes
  cache = jax.tree.map(lambda c, x: c.at[at].set(jnp.moveaxis(x, 2, 1), unique_indices=True, mode="drop"),
                       state.cache, kv)
  seen = None if state.seen is None else mark_seen(jnp.zeros((len(rows), state.seen.shape[1]), bool),
                                                    jnp.maximum(prompt, 0), prompt >= 0)
  return dataclasses.replace(
    state, cache=cache, last=put(state.last, jnp.take_along_axis(prompt, (length - 1)[:, None], axis=1)[:, 0]),
    positions=put(state.positions, length - 1), done=put(state.done, jnp.zeros_like(rows, bool)),
    count=put(state.count, jnp.zeros_like(rows)), limit=put(state.limit, limits), keys=put(state.keys, keys),
    sampling=jax.tree.map(put, state.sampling, settings), seen=None if seen is None else put(state.seen, seen),
    counts=None if state.counts is None else put(state.counts, jnp.zeros((len(rows), state.counts.shape[1])))
  ).laid_out()


@functools.partial(jax.jit, donate_argnames=("state",))
def _end_row(state: DecodeState, row) -> DecodeState:
  """The state with `row` done (ended on the host: a stop string)."""
  return dataclasses.replace(state, done=state.done.at[row].set(True)).laid_out()


def copy_rows(group: int, slots: int) -> int:
  """Rows per copy call for prompts of `slots` slots: at most `group` and COPY_SLOTS // slots, a power of two."""
  return min(group, 1 << max(0, (COPY_SLOTS // slots).bit_length() - 1))


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
  """Next power of two >= n (at least `minimum`)."""
  return max(minimum, 1 << max(0, (n - 1).bit_length()))


def cache_bucket(n: int) -> int:
  """Cache slots for n positions: a power of two up to CACHE_STEP, then the next multiple of CACHE_STEP.

  Every decode step reads the whole cache, so a long context rounded to a power of two could read up to 2x the
  bytes it needs (at batch 64 and 1k context the cache is about as big as the weights).
  """
  return bucket(n) if n <= CACHE_STEP else -(-n // CACHE_STEP) * CACHE_STEP


@dataclasses.dataclass
class Result:
  output_ids: list[list[int]]  # per prompt, generated ids (a stop id included, as transformers does)
  output_logprobs: list[list[float]]  # per prompt, each generated id's log-probability (see chosen_logprob)
  prompt_tokens: int
  generated_tokens: int
  compile_seconds: float  # compiling prefill and decode for these shapes (0 when already compiled)
  prefill_seconds: float  # the first rows' prompts, up to their first tokens (a copied prompt's: the next step's)
  decode_seconds: float  # the rest (with continuous batching, the prefills of queued prompts too)
  reused_tokens: int = 0  # prompt tokens whose keys and values came from the kept cache (`keep`)
  shared_tokens: int = 0  # prompt tokens not run, their keys and values from another row: an identical prompt
  # prefilled in the same call, or a row holding the prompt's first ids (`copy`: all but the last, for a sample)
  finish_reasons: list[str] = dataclasses.field(default_factory=list)  # per prompt: "stop" (a stop id, or
  # stop_when) or "length" (max_new_tokens or the context), as OpenAI's finish_reason

  @property
  def decode_tokens_per_s(self) -> float:
    rest = self.generated_tokens - len(self.output_ids)
    return rest / self.decode_seconds if self.decode_seconds > 0 else 0.0


class Generator:
  """Holds a model split into (graphdef, params); `generate` runs prompts through prefill + decode."""

  def __init__(self, model: QwenMoeForCausalLM, mesh: jax.sharding.Mesh | None = None, chunk: int = 16,
               prefill_rows: int | None = None, batch_size: int | None = None, kv_cache_dtype: str = "auto",
               share_prefix: int = 64):
    """`chunk`: decode steps per device call (the host streams tokens between calls). `prefill_rows`: prompts
    per prefill call (default: all rows at once); fewer bound the prefill's activations when the batch is large.
    `batch_size`: most rows decoded at once (rounded up like the batch); more prompts wait and are prefilled
    into rows as they finish (default: every prompt gets a row). `kv_cache_dtype`: "auto" (the model's dtype)
    or "int8" (quantized, see kv_cache.py). `share_prefix`: a prompt whose first `share_prefix` or more ids
    another row holds copies them from it (0: only samples of one prompt share)."""
    self.graphdef, self.params = nnx.split(model)
    self.config = model.config
    self.mesh = mesh
    self.chunk = chunk
    self.prefill_rows = prefill_rows
    self.batch_size = batch_size
    self.share_prefix = share_prefix
    self.cache_dtype = jnp.dtype(jnp.int8) if kv_cache_dtype == "int8" else model.embed[...].dtype
    self._executables: dict = {}
    self._compile_seconds = 0.0
    self._kept: tuple[DecodeState, list[int]] | None = None  # (state, ids in its cache row 0), see `generate`

  def _compiled(self, fn, args: tuple, model: bool = True, **statics):
    """Ahead-of-time compiled `fn` for these argument shapes (cached), so timings exclude compilation; `model`:
    fn takes the graphdef first."""
    shapes = tuple((a.shape, a.dtype) for a in jax.tree.leaves(args))
    key = (fn.__name__, shapes, tuple(sorted(statics.items())))
    if key not in self._executables:
      start = time.perf_counter()
      self._executables[key] = fn.lower(*(self.graphdef,) * model, *args, **statics).compile()
      self._compile_seconds += time.perf_counter() - start
    return self._executables[key]

  def validate(self, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int]) -> None:
    """Prompts of ids in the vocabulary, each leaving room in the context for a new token; max_new_tokens >= 1."""
    cfg = self.config
    if not prompts:
      raise UserError("no prompts given")
    for i, p in enumerate(prompts):
      if not p:
        raise UserError(f"prompt {i + 1} is empty")
      bad = [t for t in p if not 0 <= t < cfg.vocab_size]
      if bad:
        raise UserError(f"prompt {i + 1}: token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
    longest = max(len(p) for p in prompts)
    if longest >= cfg.context_length:
      raise UserError(f"prompt of {longest} tokens does not fit the model's context of {cfg.context_length} "
                      "positions (max_position_embeddings, or its rope scaling; 1 token must be generated)")
    if min(max_new_tokens) < 1:
      raise UserError(f"--max-new-tokens must be >= 1, got {min(max_new_tokens)}")

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
               sampling: Sampling | Sequence[Sampling] = Sampling(), seed: int = 0, stop_ids: Sequence[int] = (),
               on_tokens: Callable[[int, list[int]], None] | None = None, keep: bool = False,
               stop_when: Callable[[int, list[int], int], int | None] | None = None,
               on_done: Callable[[int, list[int], list[float], str], None] | None = None) -> Result:
    """Generates for every prompt, at most `max_new_tokens` (one for all, or one per prompt) and never past the
    context; `sampling`: one for all, or one per prompt (the rows of one batch may sample differently);
    `on_tokens(prompt index, new_ids)` is called as tokens arrive (streaming).

    `stop_when(prompt index, output ids so far, how many of them are new)` (stop strings): None to go on, or how
    many of the ids to keep; the prompt then ends there (the host sees tokens between decode calls, so the
    row may have run a few steps further, which are dropped).

    `on_done(prompt index, output ids, their logprobs, finish reason)` is called once per prompt as soon as it
    ends (a long run's results can be written as they complete).

    `keep` (one prompt: the turns of a conversation) keeps the KV cache after the call; the next kept call
    runs only the part of its prompt after the longest prefix it shares with this prompt and its output.
    """
    cfg, n = self.config, len(prompts)
    wants = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    settings = [sampling] * n if isinstance(sampling, Sampling) else list(sampling)
    if len(wants) != n or len(settings) != n:
      raise ValueError(f"{len(wants)} max_new_tokens and {len(settings)} samplings for {n} prompts")
    ops = SamplingOps.of(settings)
    self.validate(prompts, wants)
    limits = [min(m, cfg.context_length - len(p)) for p, m in zip(prompts, wants)]  # [n]
    longest = max(len(p) for p in prompts)
    wanted = min(self.batch_size or n, n)
    group = bucket(min(self.prefill_rows or wanted, wanted), minimum=1)  # rows per prefill call
    rows = -(-wanted // group) * group  # a power of two, or a multiple of the prefill group
    t = cache_bucket(longest)  # never longer than the cache
    cache_len = min(cache_bucket(max(len(p) + m for p, m in zip(prompts, limits))), max(cfg.context_length, t))
    stops = np.full(bucket(len(stop_ids), minimum=4), -1, np.int32)
    stops[: len(stop_ids)] = stop_ids
    kept, self._kept = self._kept, None
    reused = common_prefix(kept[1], prompts[0][:-1]) if keep and kept and n == 1 else 0  # < len(prompts[0])
    if reused:
      cache_len = max(cache_len, kept[0].cache.length)

    shared = 0  # prompt tokens not run (see Result.shared_tokens)

    def width(ids: list[list[int]]) -> int:  # slots for these prompts: a bucket, never past the cache
      return min(bucket(max(map(len, ids))), t)

    def row_sampling(indices: list[int], r: int) -> RowSampling:  # prompts' settings, padded to r rows
      return RowSampling.of([settings[i] for i in indices] + [Sampling()] * (r - len(indices)))

    def fill(state: DecodeState, placed: list[tuple[int, int]]) -> DecodeState:
      """The state with prompts prefilled into rows, placed [(row, prompt index)], `group` rows per call; identical
      prompts in a call (the samples of one prompt) run once and fill each of their rows."""
      nonlocal shared
      for at in range(0, len(placed), group):
        part = placed[at:at + group]
        distinct: dict[tuple[int, ...], int] = {}
        source = [distinct.setdefault(tuple(prompts[i]), len(distinct)) for _, i in part]
        shared += sum(len(prompts[i]) for _, i in part) - sum(map(len, distinct))
        whole = (group == rows and len(distinct) == len(part) and all(row == j for j, (row, _) in enumerate(part))
                 and all(i < 0 for i in owner[len(part):]))  # prompts in order in rows 0.., the rest idle
        g, r = (rows, rows) if whole else (bucket(len(distinct), minimum=1), bucket(len(part), minimum=1))
        tokens, lengths = np.zeros((g, width(list(distinct))), np.int32), np.zeros(g, np.int32)
        for j, ids in enumerate(distinct):
          tokens[j, :len(ids)], lengths[j] = ids, len(ids)
        owners = [i for _, i in part] + [0] * (r - len(part))
        spare = range(rows, rows + r - len(part))  # distinct rows past the state's: dropped
        targets = (None if whole else np.array([row for row, _ in part] + list(spare), np.int32),
                   None if len(distinct) == len(part) else np.array(source + [0] * (r - len(part)), np.int32))
        caps = np.array([limits[i] if j < len(part) else 0 for j, i in enumerate(owners)], np.int32)
        args = (tokens, lengths, caps, prompt_keys(seed, owners), row_sampling(owners[:len(part)], r), *targets)
        state = self._compiled(prefill, (self.params, state, *args), ops=ops)(self.params, state, *args)
      return state

    def copy(state: DecodeState, copies: list[tuple[int, int, int, int]]) -> DecodeState:
      """Rows take prompts whose first ids other rows hold, copies [(row, prompt index, source row, n ids held)]:
      the source's slots [0, n) are copied, the prompt's ids from n to its last (excluded) run over them
      (`prefix_slots`; nothing to run for a sample of a running prompt), and the last is left to the next
      decode step, which draws the row's first token (`fork`). The copied slots exist twice until `fork` writes
      them: at most `group` rows and COPY_SLOTS slots per call."""
      p = width([prompts[i] for _, i, _, _ in copies])
      per_call = copy_rows(group, p)
      for at in range(0, len(copies), per_call):
        part = copies[at:at + per_call]
        r = bucket(len(part), minimum=1)
        ids = np.full((r, p), -1, np.int32)
        rest = [prompts[i][n:-1] for _, i, _, n in part]  # what the prompt runs itself
        tokens, starts = np.zeros((r, bucket(max(map(len, rest)))), np.int32), np.zeros(r, np.int32)
        for j, (_, i, _, n) in enumerate(part):
          ids[j, :len(prompts[i])], tokens[j, :len(rest[j])], starts[j] = prompts[i], rest[j], n
        spare = list(range(rows, rows + r - len(part)))  # distinct rows past the state's: dropped
        sources = np.array([source for _, _, source, _ in part] + [0] * len(spare), np.int32)
        if any(rest):
          args = (state.cache, sources, tokens, starts, ids)
          kv = self._compiled(prefix_slots, (self.params, *args))(self.params, *args)
        else:
          kv = self._compiled(prompt_slots, (state.cache, sources, ids), model=False)(state.cache, sources, ids)
        args = (np.array([row for row, *_ in part] + spare, np.int32), kv, ids,
                np.array([limits[i] for _, i, _, _ in part] + [1] * len(spare), np.int32),
                prompt_keys(seed, [i for _, i, _, _ in part] + [0] * len(spare)),
                row_sampling([i for _, i, _, _ in part], r))
        state = self._compiled(fork, (state, *args), model=False)(state, *args)
      return state

    def place(state: DecodeState, placed: list[tuple[int, int]]) -> DecodeState:
      """Rows take prompts, placed [(row, prompt index)]: a prompt that a running row holds whole (a sample of
      it), or that begins with at least `share_prefix` ids another row holds (a running row's, or a prompt's
      prefilled before it here), is copied (`copy`); the others are prefilled (`fill`)."""
      nonlocal shared
      taken = {row for row, _ in placed}
      index, held = PrefixIndex(), {}  # held: a running row of each prompt
      for row, i in enumerate(owner):
        if i >= 0 and row not in taken:
          index.add(row, prompts[i])
          held.setdefault(tuple(prompts[i]), row)
      filled, filling, copies = [], set(), []
      for row, i in placed:
        p = tuple(prompts[i])
        if p in held:
          copies.append((row, i, held[p], len(p) - 1))
          continue
        source, n = index.longest(p) if p not in filling else (-1, 0)
        if 0 < self.share_prefix <= n:
          copies.append((row, i, source, n))
        else:  # identical prompts prefilled in one call run once (`fill`)
          filled.append((row, i))
          filling.add(p)
          index.add(row, p)
      shared += sum(n for *_, n in copies)
      state = fill(state, filled) if filled else state
      return copy(state, copies) if copies else state

    self._compile_seconds = 0.0
    outputs: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    stopped = [False] * n  # ended by stop_when

    def finish_reason(i: int) -> str:
      return "stop" if stopped[i] or (outputs[i] and outputs[i][-1] in stop_ids) else "length"

    owner = [i if i < n else -1 for i in range(rows)]  # the prompt in each row (-1: none)
    waiting = list(range(rows, n))[::-1]  # prompts without a row yet, next last
    cache_gb = KVCache.nbytes(cfg, rows, cache_len, self.cache_dtype) / 1e9
    with mesh_context(self.mesh), _out_of_memory_hint(
        f"out of device memory running {rows} rows x {cache_len} cache slots (KV cache {cache_gb:.2f} GB in all): "
        "decode fewer prompts at once (--batch-size) or prefill fewer per call (--prefill-rows)"):
      start = time.perf_counter()
      if reused:  # the kept cache's row 0 holds the prompt's first `reused` ids: the rest runs over them
        state = kept_state(kept[0].cache, prompt_keys(seed, [0]), jnp.asarray(stops), cache_len=cache_len,
                           max_new=bucket(limits[0]), vocab=cfg.vocab_size, ops=ops)
        kept = None  # the old cache, when it grew
        state = copy(state, [(0, 0, 0, reused)])
      else:
        state = empty_state(prompt_keys(seed, range(rows)), jnp.asarray(stops), cfg=cfg, rows=rows,
                            cache_len=cache_len, max_new=bucket(max(limits)), dtype=self.cache_dtype, ops=ops)
        state = place(state, [(row, i) for row, i in enumerate(owner) if i >= 0])
      shown = [0] * rows
      prefilled = None  # when the first rows' first tokens were out, compilation excluded
      while True:
        count, done, new, new_lp = jax.device_get((state.count, state.done, state.tokens, state.logprobs))
        if prefilled is None:
          prefilled = time.perf_counter() - self._compile_seconds
        freed = []  # (row, the waiting prompt it takes)
        for row, i in enumerate(owner):
          if i >= 0 and count[row] > shown[row]:
            fresh = new[row, shown[row]:count[row]].tolist()
            outputs[i].extend(fresh)
            logprobs[i].extend(new_lp[row, shown[row]:count[row]].tolist())
            shown[row] = int(count[row])
            keep_ids = stop_when(i, outputs[i], len(fresh)) if stop_when else None
            if keep_ids is not None:  # ended on the host: drop what follows, free the row
              del fresh[len(fresh) - (len(outputs[i]) - keep_ids):], outputs[i][keep_ids:], logprobs[i][keep_ids:]
              state, stopped[i] = _end_row(state, np.int32(row)), True
            if on_tokens and fresh:
              on_tokens(i, fresh)
          if i >= 0 and (done[row] or stopped[i]):
            owner[row] = -1
            if on_done:
              on_done(i, outputs[i], logprobs[i], finish_reason(i))
            if waiting:  # continuous batching: the next prompt takes the row
              owner[row], shown[row] = waiting.pop(), 0
              freed.append((row, owner[row]))
        if all(i < 0 for i in owner):
          break
        if freed:  # read again after: a refilled row may be done at once (a stop id, or one token wanted)
          state = place(state, freed)
          continue
        refill = np.bool_(bool(waiting))  # stop at the first finished row, to hand it the next prompt
        state = self._compiled(decode, (self.params, state, refill), steps=self.chunk, ops=ops)(
          self.params, state, refill)
      end = time.perf_counter() - self._compile_seconds
    if keep and n == 1:
      self._kept = state, list(prompts[0]) + outputs[0][:-1]  # the last token was never fed back: not cached
    reasons = [finish_reason(i) for i in range(n)]
    return Result(outputs, logprobs, sum(len(p) for p in prompts), sum(len(o) for o in outputs),
                  compile_seconds=self._compile_seconds, prefill_seconds=prefilled - start,
                  decode_seconds=end - prefilled, reused_tokens=reused, shared_tokens=shared,
                  finish_reasons=reasons)


@contextlib.contextmanager
def _out_of_memory_hint(message: str):
  """An allocation failure (XLA's RESOURCE_EXHAUSTED) becomes a UserError with `message`: what to lower."""
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise UserError(message) from None


def mesh_context(mesh):
  """`jax.set_mesh(mesh)`, or nothing without a mesh."""
  return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
