"""Generation: one prefill over the prompts, then a decode loop that stays on the device.

Prompts of different lengths share a batch: each row is right-padded, its cache slot s holds its position
s, and padding is its own attention segment, so a row's tokens equal what the prompt gives alone. Shapes
are bucketed (batch and max new tokens to powers of two, prompt and cache lengths by `cache_bucket`), so new
requests rarely recompile; `prefill_rows` prompts at a time are prefilled straight into one shared cache. The decode
loop is a `lax.while_loop` over a chunk of steps with the state (KV cache included) donated, so the cache is
updated in place; the host only wakes between chunks to stream the new tokens.
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

MIN_BUCKET = 16
CACHE_STEP = 256  # cache lengths above this are multiples of it (see cache_bucket)


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 0.0  # 0: greedy
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1: off
  repetition_penalty: float = 1.0  # 1: off; applies to greedy decoding too, as in transformers

  def validate(self, where: str | None = None) -> "Sampling":
    """Bad values are errors naming the flag, or the key in `where` (a file) when given."""
    def name(field: str) -> str:
      return f"{where}: {field}" if where else "--" + field.replace("_", "-")

    if not self.temperature >= 0:
      raise UserError(f"{name('temperature')} must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise UserError(f"{name('top_k')} must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise UserError(f"{name('top_p')} must be in (0, 1], got {self.top_p}")
    if not self.repetition_penalty > 0:
      raise UserError(f"{name('repetition_penalty')} must be > 0, got {self.repetition_penalty}")
    return self

  @property
  def penalized(self) -> bool:
    return self.repetition_penalty != 1.0


def process_logits(logits: jax.Array, s: Sampling, seen: jax.Array | None = None) -> jax.Array:
  """logits [B, V] fp32 -> the logits a token is drawn from, in transformers' order: the repetition penalty on
  the ids each row has seen (seen [B, V] bool: its prompt and output so far; positive logits divided by the
  penalty, negative ones multiplied), then temperature, top-k and top-p, which leave dropped ids at -inf.
  Greedy (temperature 0) stops after the penalty."""
  if s.penalized:
    p = jnp.float32(s.repetition_penalty)
    logits = jnp.where(seen, jnp.where(logits < 0, logits * p, logits / p), logits)
  if s.temperature == 0:
    return logits
  logits = logits / s.temperature
  if s.top_k:
    kth = jax.lax.top_k(logits, min(s.top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if s.top_p < 1:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    cutoff = jnp.min(jnp.where(before < s.top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def sample(logits: jax.Array, keys: jax.Array, s: Sampling, seen: jax.Array | None = None) -> jax.Array:
  """logits [B, V] fp32, keys [B], seen [B, V] (with a repetition penalty) -> token ids [B]."""
  logits = process_logits(logits, s, seen)
  if s.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def mark_seen(seen: jax.Array | None, tokens: jax.Array, real: jax.Array | bool = True) -> jax.Array | None:
  """seen [B, V] with ids tokens [B, T] (or [B]) added where `real`; None (no penalty) stays None."""
  if seen is None:
    return None
  b = tokens.shape[0]
  tokens = tokens.reshape(b, -1)
  real = jnp.broadcast_to(jnp.reshape(real, (b, -1)) if jnp.ndim(real) else real, tokens.shape)
  return seen.at[jnp.arange(b)[:, None], tokens].max(real)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
  cache: KVCache
  tokens: jax.Array  # [B, M] generated ids (M: the bucketed max_new)
  last: jax.Array  # [B] the newest token
  positions: jax.Array  # [B] position of `last`
  done: jax.Array  # [B] bool
  step: jax.Array  # [] tokens generated so far
  keys: jax.Array  # [B] per-row PRNG keys
  stop_ids: jax.Array  # [S] ids that end a row (-1: unused slot)
  limit: jax.Array  # [] max_new_tokens: rows end after this many tokens
  seen: jax.Array | None  # [B, V] bool: ids in each row's prompt and output (repetition penalty; else None)

  def laid_out(self) -> "DecodeState":
    """Fixed shardings under a mesh (cache by the rules, the rest replicated), the same in and out of decode."""
    small = {f.name: jax.tree.map(lambda x: sharding.constrain(x, (None,) * x.ndim), getattr(self, f.name))
             for f in dataclasses.fields(self) if f.name != "cache"}
    return DecodeState(cache=self.cache.laid_out(), **small)


def _row_keys(seed: int, rows: int) -> jax.Array:
  """Row b's key depends only on (seed, b): a prompt samples the same alone or in a batch at row b."""
  base = jax.random.key(seed)
  return jax.vmap(lambda b: jax.random.fold_in(base, b))(jnp.arange(rows))


def _step_keys(keys: jax.Array, step: jax.Array) -> jax.Array:
  return jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)


@functools.partial(jax.jit, static_argnames=("cfg", "rows", "cache_len", "max_new", "dtype", "track_seen"))
def empty_state(keys, stop_ids, limit, *, cfg, rows, cache_len, max_new, dtype, track_seen=False) -> DecodeState:
  """A state with an empty [rows, cache_len] cache and every row done until `prefill` fills it; `track_seen`
  keeps the [rows, V] ids seen per row that a repetition penalty needs."""
  zeros = jnp.zeros((rows,), jnp.int32)
  return DecodeState(
    cache=KVCache.zeros(cfg, rows, cache_len, dtype), tokens=jnp.zeros((rows, max_new), jnp.int32), last=zeros,
    positions=zeros, done=jnp.ones((rows,), bool), step=jnp.int32(1), keys=keys, stop_ids=stop_ids,
    limit=limit, seen=jnp.zeros((rows, cfg.vocab_size), bool) if track_seen else None).laid_out()


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("state",))
def prefill(graphdef, params, state: DecodeState, tokens, lengths, row, *, sampling) -> DecodeState:
  """Runs G prompts and puts them in rows [row, row + G) of the state: their keys and values in the cache
  (slots [0, T), written in place) and their first token.

  tokens [G, T] right-padded, lengths [G] (0: an unused row, done from the start), row [].
  """
  model: QwenMoeForCausalLM = nnx.merge(graphdef, params)
  g, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (g, t))
  segments = (positions < lengths[:, None]).astype(jnp.int32)  # padding: segment 0
  start = row if g < state.last.shape[0] else 0  # one group for all rows: a static offset, which shards cleanly
  out = model(tokens, positions, segments, cache=state.cache, cache_row=start, packed=False)
  last_hidden = jnp.take_along_axis(out.hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [G, D]
  keys = jax.lax.dynamic_slice_in_dim(state.keys, start, g)
  seen = None if state.seen is None else mark_seen(jnp.zeros((g, state.seen.shape[1]), bool), tokens, segments > 0)
  first = sample(model.logits(last_hidden), _step_keys(keys, jnp.int32(0)), sampling, seen)
  done = jnp.isin(first, state.stop_ids) | (state.limit <= 1) | (lengths == 0)

  def put(whole, part):  # part [G] -> rows [start, start + G) of whole [B, ...], from index 0 of the rest
    return jax.lax.dynamic_update_slice(whole, part.astype(whole.dtype), (start,) + (0,) * (whole.ndim - 1))

  return dataclasses.replace(
    state, cache=out.cache, tokens=put(state.tokens, jnp.zeros_like(state.tokens[:g]).at[:, 0].set(first)),
    last=put(state.last, first), positions=put(state.positions, lengths), done=put(state.done, done),
    seen=None if seen is None else put(state.seen, mark_seen(seen, first, lengths > 0))).laid_out()


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "sampling"), donate_argnames=("state",))
def decode(graphdef, params, state: DecodeState, *, steps, sampling) -> DecodeState:
  """Up to `steps` more tokens per row, stopping early once every row is done."""
  model: QwenMoeForCausalLM = nnx.merge(graphdef, params)
  end = jnp.minimum(state.step + steps, state.limit)

  def cond(s: DecodeState):
    return (s.step < end) & ~jnp.all(s.done)

  def body(s: DecodeState) -> DecodeState:
    out = model(s.last[:, None], s.positions[:, None], cache=s.cache, attend_cache=True)
    token = sample(model.logits(out.hidden[:, 0]), _step_keys(s.keys, s.step), sampling, s.seen)
    token = jnp.where(s.done, 0, token)
    done = s.done | jnp.isin(token, s.stop_ids) | (s.step + 1 >= s.limit)
    return DecodeState(
      cache=out.cache, tokens=s.tokens.at[:, s.step].set(token), last=token,
      positions=jnp.where(s.done, s.positions, s.positions + 1), done=done, step=s.step + 1, keys=s.keys,
      stop_ids=s.stop_ids, limit=s.limit, seen=mark_seen(s.seen, token, ~s.done)).laid_out()

  return jax.lax.while_loop(cond, body, state.laid_out()).laid_out()


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
  prompt_tokens: int
  generated_tokens: int
  compile_seconds: float  # compiling prefill and decode for these shapes (0 when already compiled)
  prefill_seconds: float  # prompt processing up to the first token of every row
  decode_seconds: float  # the remaining tokens

  @property
  def decode_tokens_per_s(self) -> float:
    rest = self.generated_tokens - len(self.output_ids)
    return rest / self.decode_seconds if self.decode_seconds > 0 else 0.0


class Generator:
  """Holds a model split into (graphdef, params); `generate` runs prompts through prefill + decode."""

  def __init__(self, model: QwenMoeForCausalLM, mesh: jax.sharding.Mesh | None = None, chunk: int = 16,
               prefill_rows: int | None = None):
    """`chunk`: decode steps per device call (the host streams tokens between calls). `prefill_rows`: prompts
    per prefill call (default: all at once); fewer bound the prefill's activations when the batch is large."""
    self.graphdef, self.params = nnx.split(model)
    self.config = model.config
    self.mesh = mesh
    self.chunk = chunk
    self.prefill_rows = prefill_rows
    self.cache_dtype = model.embed[...].dtype
    self._executables: dict = {}

  def _compiled(self, fn, args: tuple, **statics):
    """Ahead-of-time compiled `fn` for these argument shapes (cached), so timings exclude compilation."""
    shapes = tuple((a.shape, a.dtype) for a in jax.tree.leaves(args))
    key = (fn.__name__, shapes, tuple(sorted(statics.items())))
    if key not in self._executables:
      self._executables[key] = fn.lower(self.graphdef, *args, **statics).compile()
    return self._executables[key]

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
               seed: int = 0, stop_ids: Sequence[int] = (),
               on_tokens: Callable[[int, list[int]], None] | None = None) -> Result:
    """Generates for every prompt; `on_tokens(row, new_ids)` is called as tokens arrive (streaming)."""
    cfg = self.config
    if not prompts:
      raise UserError("no prompts given")
    longest = max(len(p) for p in prompts)
    for i, p in enumerate(prompts):
      if not p:
        raise UserError(f"prompt {i + 1} is empty")
      bad = [t for t in p if not 0 <= t < cfg.vocab_size]
      if bad:
        raise UserError(f"prompt {i + 1}: token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
    if longest >= cfg.context_length:
      raise UserError(f"prompt of {longest} tokens does not fit the model's context of {cfg.context_length} "
                      "positions (max_position_embeddings, or its rope scaling; 1 token must be generated)")
    if max_new_tokens < 1:
      raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    max_new = min(max_new_tokens, cfg.context_length - longest)
    group = bucket(min(self.prefill_rows or len(prompts), len(prompts)), minimum=1)  # rows per prefill call
    rows = -(-len(prompts) // group) * group  # a power of two, or a multiple of the prefill group
    t = cache_bucket(longest)  # never longer than the cache
    cache_len = min(cache_bucket(longest + max_new), max(cfg.context_length, t))
    tokens = np.zeros((rows, t), np.int32)
    lengths = np.zeros((rows,), np.int32)  # padding rows: length 0, done from the start
    for i, p in enumerate(prompts):
      tokens[i, : len(p)] = p
      lengths[i] = len(p)
    stops = np.full(bucket(len(stop_ids), minimum=4), -1, np.int32)
    stops[: len(stop_ids)] = stop_ids
    with _mesh_context(self.mesh):
      clock = [time.perf_counter()]  # start, prefill compiled, first tokens out, decode compiled, end
      state = empty_state(_row_keys(seed, rows), jnp.asarray(stops), jnp.int32(max_new), cfg=cfg, rows=rows,
                          cache_len=cache_len, max_new=bucket(max_new), dtype=self.cache_dtype,
                          track_seen=sampling.penalized)
      run_prefill = self._compiled(prefill, (self.params, state, tokens[:group], lengths[:group], np.int32(0)),
                                   sampling=sampling)
      clock.append(time.perf_counter())
      for row in range(0, len(prompts), group):
        state = run_prefill(self.params, state, tokens[row:row + group], lengths[row:row + group], np.int32(row))
      outputs: list[list[int]] = [[] for _ in prompts]
      shown, run_decode = 0, None
      while True:
        step, done, new = jax.device_get((state.step, state.done, state.tokens))  # [B, M]: small
        self._collect(outputs, new[:, shown:int(step)], stop_ids, on_tokens)
        shown = int(step)
        if shown >= max_new or done[: len(prompts)].all():
          break
        if run_decode is None:  # compiled for the state's actual shardings
          clock.append(time.perf_counter())
          run_decode = self._compiled(decode, (self.params, state), steps=self.chunk, sampling=sampling)
          clock.append(time.perf_counter())
        state = run_decode(self.params, state)
      clock += [time.perf_counter()] * (5 - len(clock))
    start, compiled, prefilled, decode_compiled, end = clock
    return Result(outputs, int(lengths.sum()), sum(len(o) for o in outputs),
                  compile_seconds=(compiled - start) + (decode_compiled - prefilled),
                  prefill_seconds=prefilled - compiled, decode_seconds=end - decode_compiled)

  @staticmethod
  def _collect(outputs, new, stop_ids, on_tokens) -> None:
    stops = set(int(i) for i in stop_ids)
    for row, out in enumerate(outputs):
      if out and out[-1] in stops:
        continue
      fresh = []
      for tok in new[row].tolist():
        fresh.append(tok)
        if tok in stops:
          break
      out.extend(fresh)
      if fresh and on_tokens:
        on_tokens(row, fresh)


def _mesh_context(mesh):
  return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prompt_logits(graphdef, params, tokens):
  model: QwenMoeForCausalLM = nnx.merge(graphdef, params)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return sharding.constrain(model.logits(model(tokens, positions).hidden), (None, None, None))  # every process reads it


def prompt_logits(model: QwenMoeForCausalLM, ids: Sequence[int], mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
  """fp32 logits [T, V] at every prompt position (what --dump-logits saves)."""
  graphdef, params = nnx.split(model)
  with _mesh_context(mesh):
    return np.asarray(_prompt_logits(graphdef, params, jnp.asarray([list(ids)], jnp.int32))[0])
