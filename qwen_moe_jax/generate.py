"""Generation: prefill the prompts into a shared KV cache, then a decode loop that stays on the device.

Prompts of different lengths share a batch: each row is right-padded, its cache slot s holds its position
s, and padding is its own attention segment, so a row's tokens equal what the prompt gives alone. Shapes
are bucketed (batch and max new tokens to powers of two, prompt and cache lengths by `cache_bucket`), so new
requests rarely recompile; `prefill_rows` prompts at a time are prefilled straight into the cache, and
identical prompts in one prefill call (the samples of a prompt) run once, their keys and values written to
each of their rows. A prompt that begins with ids another row holds (a running sample of it, a shared
few-shot or system prefix: prefixes.py; or a finished prompt and its output, which a row keeps until it is
taken: a conversation's last turn) copies those slots from that row and runs only the rest (`fork`).
The decode loop (decoding.py, with the other device programs) is a `lax.while_loop` over a chunk of steps with
the state (KV cache included) donated, so the cache is updated in place; the host only wakes between chunks to
stream the new tokens, to end rows at stop strings (`stop_when`) and, when there are more prompts than rows
(`batch_size`), to prefill waiting prompts into rows that finished (continuous batching; rows freed at once are
refilled in one call), and to take prompts that arrived meanwhile (a server's requests: `arrivals`). Each row
counts its own tokens and samples with its own settings, and a prompt's random stream depends only on the seed
and the prompt's index (or its own `Stream`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
import warnings
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_moe_jax.decoding import (
  DecodeState,
  decode,
  empty_cache,
  empty_state,
  end_row,
  exchange,
  fork,
  grown_cache,
  kept_state,
  load_grammar,
  prefill,
  prefix_slots,
  prompt_keys,
  prompt_slots,
  resized,
)
from qwen_moe_jax.errors import UserError
from qwen_moe_jax.grammar import Registry
from qwen_moe_jax.kv_cache import KVCache
from qwen_moe_jax.model import QwenMoeForCausalLM
from qwen_moe_jax.prefixes import Pool, PrefixIndex, common_prefix
from qwen_moe_jax.sampling import MAX_TOP_LOGPROBS, RowSampling, Sampling, SamplingOps

MIN_BUCKET = 16
CACHE_STEP = 256  # cache lengths above this are multiples of it (see cache_bucket)
COPY_SLOTS = 16_384  # most slots per row group copied in one call (Generator.generate's `copy`)
GRAMMAR_SLOTS, GRAMMAR_CELLS = 8, 1 << 21  # room a call keeps for grammars once one came (see grammar.py): 7
# schemas, or a generic JSON object (1 << 19 cells) and a few small ones; 8 MB of cells, 8 x V classes


def copy_rows(group: int, slots: int) -> int:
  """Rows per copy call for prompts of `slots` slots: at most `group` and COPY_SLOTS // slots, a power of two."""
  return min(group, 1 << max(0, (COPY_SLOTS // slots).bit_length() - 1))


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
  """Next power of two >= n (at least `minimum`)."""
  return max(minimum, 1 << max(0, (n - 1).bit_length()))


def room_ops(ops: SamplingOps, vocab: int) -> SamplingOps:
  """The sampling steps a call takes on for prompts that need `ops` and may arrive while it runs (a server's):
  top-k, top_logprobs and logit_bias rounded up to buckets, and room for several grammars once one comes, so that
  the programs compiled are few."""
  return dataclasses.replace(
    ops, top_k=min(bucket(ops.top_k), vocab) if ops.top_k else 0,
    top_logprobs=min(bucket(ops.top_logprobs, 1), MAX_TOP_LOGPROBS) if ops.top_logprobs else 0,
    logit_bias=bucket(ops.logit_bias, 1) if ops.logit_bias else 0,
    grammars=max(ops.grammars, GRAMMAR_SLOTS) if ops.grammars else 0,
    grammar_cells=max(ops.grammar_cells, GRAMMAR_CELLS) if ops.grammars else 0)


def cache_bucket(n: int) -> int:
  """Cache slots for n positions: a power of two up to CACHE_STEP, then the next multiple of CACHE_STEP.

  Every decode step reads the whole cache, so a long context rounded to a power of two could read up to 2x the
  bytes it needs (at batch 64 and 1k context the cache is about as big as the weights).
  """
  return bucket(n) if n <= CACHE_STEP else -(-n // CACHE_STEP) * CACHE_STEP


class Stream(NamedTuple):
  """A prompt's random stream: its tokens are drawn with keys from (seed, index) alone."""
  seed: int
  index: int


@dataclasses.dataclass(frozen=True)
class Arrival:
  """A prompt that arrives while a call runs (Generator.generate's `arrivals`)."""
  ids: Sequence[int]
  max_new_tokens: int
  sampling: Sampling = Sampling()
  stream: Stream | None = None  # None: (the call's seed, or 0, and the prompt's index in the call)


@dataclasses.dataclass(frozen=True)
class Room:
  """What a call holds beyond what its given prompts need, for arrivals: at least `rows` rows, `slots` cache slots
  (prompt and new tokens; at most the context), `max_new` new tokens a row, and the sampling steps `ops`."""
  rows: int = 0
  slots: int = 0
  max_new: int = 0
  ops: SamplingOps = SamplingOps()


class Output(NamedTuple):
  """A prompt's generation, as `on_done` gets it."""
  ids: list[int]  # generated ids (a stop id included, as transformers does)
  logprobs: list[float]  # each one's log-probability (see chosen_logprob)
  reason: str  # "stop" (a stop id, or stop_when) or "length" (max_new_tokens or the context): OpenAI's finish_reason
  cached: int  # the prompt's ids not run (see Result.cached_tokens)
  top: list[list[tuple[int, float]]]  # at each generated id, the prompt's top_logprobs likeliest ids and their
  # log-probabilities, best first (see sampling.likeliest; [] when it asked for none)


class Piece(NamedTuple):
  """A prompt's newest generated ids, as `on_tokens` gets them (streaming), with their log-probabilities and
  likeliest ids (as in Output)."""
  ids: list[int]
  logprobs: list[float]
  top: list[list[tuple[int, float]]]


@dataclasses.dataclass
class Result:
  outputs: list[Output]  # per prompt
  prompt_tokens: int
  generated_tokens: int
  compile_seconds: float  # compiling prefill and decode for these shapes (0 when already compiled)
  prefill_seconds: float  # the first rows' prompts, up to their first tokens (a copied prompt's: the next step's)
  decode_seconds: float  # the rest (with continuous batching, the prefills of queued prompts too)
  left: list[Arrival] = dataclasses.field(default_factory=list)  # arrivals not admitted (Generator.generate)

  @property
  def output_ids(self) -> list[list[int]]:
    return [o.ids for o in self.outputs]

  @property
  def output_logprobs(self) -> list[list[float]]:
    return [o.logprobs for o in self.outputs]

  @property
  def finish_reasons(self) -> list[str]:
    return [o.reason for o in self.outputs]

  @property
  def cached_tokens(self) -> list[int]:
    """Per prompt, its ids not run, their keys and values from another row: an identical prompt prefilled in the
    same call, or a row holding the prompt's first ids (Generator.generate's `place`: all but the last, for a
    sample of a running prompt)."""
    return [o.cached for o in self.outputs]

  @property
  def output_top_logprobs(self) -> list[list[list[tuple[int, float]]]]:
    return [o.top for o in self.outputs]

  @property
  def shared_tokens(self) -> int:
    return sum(self.cached_tokens)

  @property
  def decode_tokens_per_s(self) -> float:
    rest = self.generated_tokens - len(self.output_ids)
    return rest / self.decode_seconds if self.decode_seconds > 0 else 0.0


class Generator:
  """Holds a model split into (graphdef, params); `generate` runs prompts through prefill + decode."""

  def __init__(self, model: QwenMoeForCausalLM, mesh: jax.sharding.Mesh | None = None, chunk: int = 16,
               prefill_rows: int | None = None, batch_size: int | None = None, kv_cache_dtype: str = "auto",
               share_prefix: int = 64, prefix_pool: int = 0, arrival_chunk: int = 4):
    """`chunk`: decode steps per device call (the host streams tokens between calls); `arrival_chunk` while a row
    is free for prompts that may arrive (`generate`'s `arrivals`): an arrival waits at most that many steps for
    the host to see it, for more returns to the host while the rows are not all busy. `prefill_rows`: prompts
    per prefill call (default: all rows at once); fewer bound the prefill's activations when the batch is large.
    `batch_size`: most rows decoded at once (rounded up like the batch); more prompts wait and are prefilled
    into rows as they finish (default: every prompt gets a row). `kv_cache_dtype`: "auto" (the model's dtype)
    or "int8" (quantized, see kv_cache.py). `share_prefix`: a prompt whose first `share_prefix` or more ids
    another row holds copies them from it (0: only samples of one prompt share). `prefix_pool`: cache rows past
    the decode rows that keep what finished rows held when other prompts take those rows (least recently used
    out first), for later prompts to copy as a row's (see `generate`); they cost memory, not decode time."""
    self.graphdef, self.params = nnx.split(model)
    self.config = model.config
    self.mesh = mesh
    self.chunk, self.arrival_chunk = chunk, min(arrival_chunk, chunk)
    self.prefill_rows = prefill_rows
    self.batch_size = batch_size
    self.share_prefix = share_prefix
    self.prefix_pool = prefix_pool if share_prefix else 0
    self.cache_dtype = jnp.dtype(jnp.int8) if kv_cache_dtype == "int8" else model.embed[...].dtype
    self._executables: dict = {}
    self._compile_seconds = 0.0
    self._clock = itertools.count(1)  # when rows were freed: a count, so every process of a server orders them alike
    self._kept: tuple[DecodeState, list, list[int]] | None = None  # (state, holds, freed), see `generate`
    self._pool: tuple[KVCache, Pool] | None = None  # the prefix pool's cache [prefix_pool rows] and entries

  def load(self, model: QwenMoeForCausalLM) -> None:
    """Takes new weights of the same shapes and shardings (a training step's): the compiled programs stay; a kept
    cache goes (it was computed with the old weights)."""
    self.graphdef, self.params = nnx.split(model)
    self.drop_kept()

  def drop_weights(self) -> None:
    """Lets go of the weights until the next `load` (a training step's memory then holds no copy of them)."""
    self.params = None
    self.drop_kept()

  def drop_kept(self) -> None:
    """Frees the KV cache a `keep` call kept and the prefix pool (for work that needs the memory)."""
    self._kept = self._pool = None

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

  def _narrowest_decode(self, ops: SamplingOps, settings: Sequence[Sampling]) -> SamplingOps:
    """The fewest and smallest sampling steps that a decode program was compiled for (for any shapes: a server's
    are one), that `ops` covers and that cover what `settings` (the prompts running or waiting) take: steps no
    prompt takes any more dropped, sizes (top-k's k, the logit bias's width, the top logprobs' count) back to one
    a smaller ask ran with. The grammar tables keep their size (their cells are in use), or go with the last
    grammar. `ops` when none narrower was compiled (a compile would stall every running row), or no prompt is
    left (the call is ending)."""
    if not settings:
      return ops
    need = SamplingOps.of(settings)
    tables = (ops.grammars, ops.grammar_cells) if need.grammars else (0, 0)
    fits = [ran for name, _, statics in self._executables if name == "decode" for ran in [dict(statics)["ops"]]
            if ops.covers(ran) and ran.covers(need) and (ran.grammars, ran.grammar_cells) == tables]
    return min(fits, key=lambda ran: sum(dataclasses.astuple(ran)), default=ops)

  def validate(self, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
               settings: Sequence[Sampling] = ()) -> None:
    """Prompts of ids in the vocabulary, each leaving room in the context for a new token; max_new_tokens >= 1;
    logit_bias ids in the vocabulary, grammars over no more ids than it has."""
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
    for i, s in enumerate(settings):
      bad = [t for t, _ in s.logit_bias if t >= cfg.vocab_size]
      if bad:
        raise UserError(f"prompt {i + 1}: logit_bias id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
      if s.grammar is not None and len(s.grammar.classes) > cfg.vocab_size:
        raise UserError(f"prompt {i + 1}: the {s.grammar.source} is over a tokenizer of {len(s.grammar.classes)} ids, "
                        f"more than the model's vocabulary of {cfg.vocab_size}")

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
               sampling: Sampling | Sequence[Sampling] = Sampling(), seed: int | Sequence[Stream] = 0,
               stop_ids: Sequence[int] = (),
               on_tokens: Callable[[int, Piece], None] | None = None, keep: bool = False,
               stop_when: Callable[[int, list[int], int], int | None] | None = None,
               on_done: Callable[[int, Output], None] | None = None,
               arrivals: Callable[[], Sequence[Arrival]] | None = None, room: Room | None = None,
               on_return: Callable[[], None] | None = None) -> Result:
    """Generates for every prompt, at most `max_new_tokens` (one for all, or one per prompt) and never past the
    context; `sampling`: one for all, or one per prompt (the rows of one batch may sample differently); `seed`:
    prompt i draws from stream (seed, i), or from its own `Stream` (seed, index) when one per prompt is given;
    `on_tokens(prompt index, Piece)` is called as tokens arrive (streaming).

    `stop_when(prompt index, output ids so far, how many of them are new)` (stop strings): None to go on, or how
    many of the ids to keep; the prompt then ends there (the host sees tokens between decode calls, so the
    row may have run a few steps further, which are dropped). It is asked of each waiting prompt too (ids [], 0
    new) at every return to the host: one it ends then (a server's request whose client left) never runs.

    `on_done(prompt index, Output)` is called once per prompt as soon as it ends (a long run's results can be
    written as they complete).

    A row that finishes keeps its prompt's and output's keys and values until another prompt takes it (rows are
    taken least recently freed first), and a prompt beginning with what such a row holds copies it like any
    other row's (`place`): a conversation's next turn runs only its new ids. `keep` (the turns of a
    conversation, a server's calls) keeps the KV cache after the call too, for the next `keep` call of as many
    rows.

    `arrivals()` (a server's requests) is called at each return to the host (every `chunk` steps at most, every
    `arrival_chunk` while a row is free) for prompts that arrived meanwhile (each valid, see `validate`): they take
    the next prompt indices, in order, and rows as rows free. `room` sizes the call for them (rows, cache slots,
    new tokens, sampling steps: else the given prompts size it); an arrival needing sampling steps it lacks adds
    them (`room_ops`; the programs with them compile then, once), the running rows going on; steps no running or
    waiting prompt takes any more are dropped at the next return to the host (any call) when a decode program
    without them was compiled before (a compile would stall the running rows). An arrival the call
    has no room for (its cache slots or new tokens, a grammar when the grammars running fill its tables: those no
    prompt follows any more give theirs up) is not admitted:
    the call takes no more, ends when its rows finish, and returns it and those after it in `Result.left`, for the
    next call.

    `on_return()` is called at each return to the host, once the new tokens are read and before any other callback
    (a server spanning several processes makes every process see the same arrivals and stops from there on).
    """
    cfg, n, prompts = self.config, len(prompts), [list(p) for p in prompts]
    wants = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    settings = [sampling] * n if isinstance(sampling, Sampling) else list(sampling)
    streams = [Stream(seed, i) for i in range(n)] if isinstance(seed, int) else list(seed)
    if len(wants) != n or len(settings) != n or len(streams) != n:
      raise ValueError(f"{len(wants)} max_new_tokens, {len(settings)} samplings and {len(streams)} seeds for {n} "
                       "prompts")
    room = room or Room()
    ops = SamplingOps.of(settings) | room.ops
    self.validate(prompts, wants, settings)
    if not len(stop_ids) and any(s.grammar is not None for s in settings):
      raise UserError("structured output needs a stop id to end on (an EOS id: the config's, generation_config.json's "
                      "or the tokenizer's), and none is known")
    limits = [min(m, cfg.context_length - len(p)) for p, m in zip(prompts, wants)]  # [n]
    longest = max(len(p) for p in prompts)
    wanted = max(min(self.batch_size or n, n), room.rows)
    group = bucket(min(self.prefill_rows or wanted, wanted), minimum=1)  # rows per prefill call
    rows = -(-wanted // group) * group  # a power of two, or a multiple of the prefill group
    t = cache_bucket(longest)  # never longer than the cache
    cache_len = min(cache_bucket(max(len(p) + m for p, m in zip(prompts, limits))), max(cfg.context_length, t))
    cache_len = max(cache_len, min(cache_bucket(room.slots), cfg.context_length))
    if arrivals:
      t = cache_len  # an arrival's prompt may be as long as the cache holds
    max_new = bucket(max(max(limits), room.max_new))
    grammars = Registry(ops.grammars, ops.grammar_cells, cfg.vocab_size, stop_ids)
    reserved = [grammars.reserve(s.grammar) for s in settings]
    assert all(reserved), "the grammars' tables hold fewer grammars than the prompts bring"  # ops is sized for all
    stops = np.full(bucket(len(stop_ids), minimum=4), -1, np.int32)
    stops[: len(stop_ids)] = stop_ids
    kept, self._kept = self._kept, None
    pool_cache, pool = self._pool or (None, None)
    self._pool = None  # given back at the end of a `keep` call
    if kept and (not keep or kept[0].last.shape[0] != rows):
      kept = None
    if kept:
      cache_len = max(cache_len, kept[0].cache.length)
    cached = [0] * n  # per prompt: ids not run (see Result.cached_tokens)

    def width(ids: list[list[int]]) -> int:  # slots for these prompts: a bucket, never past the cache
      return min(bucket(max(map(len, ids))), t)

    def row_sampling(indices: list[int], r: int) -> RowSampling:  # prompts' settings, padded to r rows
      return RowSampling.of([settings[i] for i in indices] + [Sampling()] * (r - len(indices)), ops, grammars)

    def keys(indices: Sequence[int]) -> jax.Array:  # prompts' random streams
      return prompt_keys([streams[i].seed for i in indices], [streams[i].index for i in indices])

    def fill(state: DecodeState, placed: list[tuple[int, int]]) -> DecodeState:
      """The state with prompts prefilled into rows, placed [(row, prompt index)], `group` rows per call; identical
      prompts in a call (the samples of one prompt) run once and fill each of their rows."""
      for at in range(0, len(placed), group):
        part = placed[at:at + group]
        distinct: dict[tuple[int, ...], int] = {}
        source = []
        for _, i in part:
          p = tuple(prompts[i])
          cached[i] = len(p) if p in distinct else 0
          source.append(distinct.setdefault(p, len(distinct)))
        whole = (group == rows == bucket(len(part), minimum=1) and len(distinct) == len(part)
                 and all(row == j for j, (row, _) in enumerate(part))
                 and all(owner[r] < 0 and holds[r] is None for r in range(len(part), rows)))
        # prompts in order in rows 0.., the few others idle, holding nothing (the layout writes every row)
        g, r = (rows, rows) if whole else (bucket(len(distinct), minimum=1), bucket(len(part), minimum=1))
        tokens, lengths = np.zeros((g, width(list(distinct))), np.int32), np.zeros(g, np.int32)
        for j, ids in enumerate(distinct):
          tokens[j, :len(ids)], lengths[j] = ids, len(ids)
        owners = [i for _, i in part] + [0] * (r - len(part))
        spare = range(rows, rows + r - len(part))  # distinct rows past the state's: dropped
        targets = (None if whole else np.array([row for row, _ in part] + list(spare), np.int32),
                   None if len(distinct) == len(part) else np.array(source + [0] * (r - len(part)), np.int32))
        caps = np.array([limits[i] if j < len(part) else 0 for j, i in enumerate(owners)], np.int32)
        args = (tokens, lengths, caps, keys(owners), row_sampling(owners[:len(part)], r), *targets)
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
                keys([i for _, i, _, _ in part] + [0] * len(spare)),
                row_sampling([i for _, i, _, _ in part], r))
        state = self._compiled(fork, (state, *args), model=False)(state, *args)
      return state

    def held(source: int) -> list[int] | None:  # what a row, or past the rows a pool entry, holds
      return holds[source] if source < rows else pool.holds[source - rows]

    def place(state: DecodeState) -> DecodeState:
      """Waiting prompts take the free rows, in order. A prompt that a running row holds whole (a sample of it),
      or that begins with at least `share_prefix` ids a row holds (a running row's prompt, a prompt's filled before
      it here, or a finished prompt and its output, which its free row holds until taken) or a prefix pool entry
      holds, copies them (`copy`; a pool entry's are loaded into the row first); the others are prefilled
      (`fill`). A prompt takes the free row holding its prefix when that row loses fewer ids than the prompt
      reuses (a conversation's next turn: in place), else the free row that has held nothing or was freed longest
      ago; what a row loses the pool then keeps (`Pool.target`), and a pool entry a row takes is free again. The
      pool's saves and loads run first (`moved`), then the fills, then the copies (in the order planned): a row a
      copy reads is not filled or loaded here (the prompt waits), and a row a copy writes is read by no later copy."""
      index, running = PrefixIndex(), {}  # running: a running row of each prompt
      free = [row for row in range(rows) if owner[row] < 0]
      for row in [r for r in range(rows) if owner[r] >= 0] + sorted(free, key=lambda r: -freed[r]):
        if holds[row] is not None:  # running rows, then free ones, most recently freed first, then the pool's
          index.add(row, holds[row])
        if owner[row] >= 0:
          running.setdefault(tuple(prompts[owner[row]]), row)
      for e in sorted(range(len(pool.holds)) if pool else [], key=lambda e: -pool.used[e]):
        if pool.holds[e] is not None:
          index.add(rows + e, pool.holds[e])
      free.sort(key=lambda r: (holds[r] is not None, freed[r]))
      filled, filling, copies, read, loads = [], set(), [], set(), []
      saves: dict[int, int] = {}  # pool entry -> the row saved to it (read before the saves write: not loaded)
      while waiting and free:
        i = waiting[-1]
        p = prompts[i]
        if tuple(p) in running:
          source, n = running[tuple(p)], len(p) - 1
        else:
          source = -1 if tuple(p) in filling else index.longest(p)[0]
          n = common_prefix(p[:-1], held(source)[:-1]) if source >= 0 and held(source) is not None else 0
          source = source if 0 < self.share_prefix <= n and source - rows not in saves else -1
        if 0 <= source < rows:
          row = source if source in free and len(holds[source]) - 1 - n <= n else free[0]
        else:  # prefilled, or loaded from the pool
          row = next((r for r in free if r not in read), -1)
          if row < 0:
            break
        waiting.pop()
        free.remove(row)
        owner[row], shown[row] = i, 0
        # what the row holds goes (to the pool, if it keeps it), or some of it, taken in place
        taken = row != source or len(holds[row]) - 1 > n
        if source >= rows:  # the row will hold all the entry holds and more: the entry is free again
          loads.append((source - rows, row, n))
          pool.holds[source - rows], source = None, row
        if pool and taken and holds[row] is not None and len(holds[row]) > self.share_prefix:
          e = pool.target(holds[row], freed[row], set(saves))
          if e >= 0:
            saves[e] = row
            pool.holds[e], pool.used[e] = holds[row], freed[row]
        if source >= 0:
          copies.append((row, i, source, n))
          read.add(source)
          holds[row], cached[i] = None, n  # what it holds now depends on the copy calls' order
        else:  # identical prompts prefilled in one call run once (`fill`)
          filled.append((row, i))
          filling.add(tuple(p))
          holds[row] = p
          index.add(row, p)
      state = moved(state, saves, loads)
      for payload in grammars.payloads():  # the grammars of prompts admitted since the last placement
        state = self._compiled(load_grammar, (state, *payload), model=False)(state, *payload)
      state = fill(state, filled) if filled else state
      state = copy(state, copies) if copies else state
      for row, i, _, _ in copies:
        holds[row] = prompts[i]
      return state

    self._compile_seconds = 0.0
    outputs: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    tops: list[list[list[tuple[int, float]]]] = [[] for _ in prompts]
    stopped = [False] * n  # ended by stop_when

    def output(i: int) -> Output:
      reason = "stop" if stopped[i] or (outputs[i] and outputs[i][-1] in stop_ids) else "length"
      return Output(outputs[i], logprobs[i], reason, cached[i], tops[i])

    left: list[Arrival] = []  # arrivals not admitted (see the docstring)

    def admit(new: Sequence[Arrival]) -> None:
      """Arrivals join the prompts waiting for a row, or, from the first the call has no room for, `left`. One
      needing sampling steps the call's programs lack widens them (`ops`, `room_ops` of its own; the state follows
      before the next device call), save the grammar tables once the call has some: a grammar finding them full
      waits for the next call."""
      nonlocal ops, grammars
      for a in new:
        limit = min(a.max_new_tokens, cfg.context_length - len(a.ids))
        need, fits = SamplingOps.of([a.sampling]), not left and len(a.ids) + limit <= cache_len and limit <= max_new
        if fits and not ops.covers(need):
          wide = ops | room_ops(need, cfg.vocab_size)
          if ops.grammars:  # the registry places grammars in tables of this size
            wide = dataclasses.replace(wide, grammars=ops.grammars, grammar_cells=ops.grammar_cells)
          elif wide.grammars:
            grammars = Registry(wide.grammars, wide.grammar_cells, cfg.vocab_size, stop_ids)
          ops = wide
        if not fits or not ops.covers(need) or not grammars.reserve(a.sampling.grammar):
          left.append(a)
          continue
        waiting.insert(0, len(prompts))  # taken last
        cached.append(0)
        streams.append(a.stream or Stream(seed if isinstance(seed, int) else 0, len(prompts)))
        prompts.append(list(a.ids))
        limits.append(limit)
        settings.append(a.sampling)
        outputs.append([])
        logprobs.append([])
        tops.append([])
        stopped.append(False)

    def drop_ended() -> None:
      """Waiting prompts that stop_when ends before they start end without running."""
      if stop_when is None:
        return
      for i in [i for i in waiting if stop_when(i, [], 0) is not None]:
        waiting.remove(i)
        stopped[i] = True
        if on_done:
          on_done(i, output(i))

    def moved(state: DecodeState, saves: dict[int, int], loads: list[tuple[int, int, int]]) -> DecodeState:
      """The prefix pool's entries saved from rows, saves {entry: row}, and loaded into rows, loads [(entry, row,
      n ids used)], in one call (`exchange`)."""
      nonlocal pool_cache
      if not saves and not loads:
        return state

      def padded(values: list[int], past: int | None = None) -> np.ndarray:  # to a bucket (none: one, so that each
        # donated cache is written) with reads of index 0, or writes to distinct indices from `past` on (dropped)
        extra = range(bucket(len(values), minimum=1) - len(values))
        return np.array(values + [0 if past is None else past + k for k in extra], np.int32)

      save_rows, save_entries = padded(list(saves.values())), padded(list(saves), self.prefix_pool)
      load_entries, load_rows = padded([e for e, _, _ in loads]), padded([r for _, r, _ in loads], rows)
      widths = {"save_width": min(bucket(max([len(pool.holds[e]) for e in saves], default=1)), cache_len),
                "load_width": min(bucket(max([n for _, _, n in loads], default=1)), cache_len)}
      args = (state.cache, pool_cache, save_rows, save_entries, load_entries, load_rows)
      cache, pool_cache = self._compiled(exchange, args, model=False, **widths)(*args)
      return dataclasses.replace(state, cache=cache)

    owner = [-1] * rows  # the prompt in each row (-1: none)
    shown = [0] * rows  # the tokens of each row's prompt seen
    waiting = list(range(n))[::-1]  # prompts without a row yet, next last
    cache_gb = KVCache.nbytes(cfg, rows + self.prefix_pool, cache_len, self.cache_dtype) / 1e9
    pooled = f", its {self.prefix_pool} prefix pool rows included" if self.prefix_pool else ""
    with mesh_context(self.mesh), _out_of_memory_hint(
        f"out of device memory running {rows} rows x {cache_len} cache slots (KV cache {cache_gb:.2f} GB in all"
        f"{pooled}): decode fewer prompts at once (--batch-size), prefill fewer per call (--prefill-rows)"
        + (" or pool fewer (--prefix-pool)" if self.prefix_pool else "")):
      start = time.perf_counter()
      if self.prefix_pool and pool is None:
        pool_cache, pool = self._compiled(empty_cache, (), model=False, cfg=cfg, rows=self.prefix_pool,
                                          length=cache_len, dtype=self.cache_dtype)(), Pool(self.prefix_pool)
      elif pool is not None and pool_cache.length < cache_len:
        pool_cache = self._compiled(grown_cache, (pool_cache,), model=False, length=cache_len)(pool_cache)
      if kept:  # its free rows hold the finished prompts and outputs of the last `keep` call
        state = kept_state(kept[0].cache, prompt_keys(0, range(rows)), jnp.asarray(stops), cache_len=cache_len,
                           max_new=max_new, vocab=cfg.vocab_size, ops=ops)
        holds, freed = kept[1], kept[2]
        kept = None  # the old cache, when it grew
      else:
        state = empty_state(prompt_keys(0, range(rows)), jnp.asarray(stops), cfg=cfg, rows=rows,
                            cache_len=cache_len, max_new=max_new, dtype=self.cache_dtype, ops=ops)
        holds, freed = [None] * rows, [0] * rows  # per row: the ids it holds (the last one's keys and values
        # may be missing: it is still to run, or a finished row's last token); when it was freed (self._clock)
      drop_ended()
      state = place(state)
      prefilled = None  # when the first rows' first tokens were out, compilation excluded
      while True:
        count, done, new, new_lp, top_ids, top_lps = jax.device_get(
          (state.count, state.done, state.tokens, state.logprobs, state.top_ids, state.top_logprobs))
        if prefilled is None:
          prefilled = time.perf_counter() - self._compile_seconds
        if on_return:
          on_return()
        for row, i in enumerate(owner):
          if i >= 0 and count[row] > shown[row]:
            fresh = new[row, shown[row]:count[row]].tolist()
            outputs[i].extend(fresh)
            logprobs[i].extend(new_lp[row, shown[row]:count[row]].tolist())
            if settings[i].top_logprobs:
              k, at = settings[i].top_logprobs, slice(shown[row], count[row])
              tops[i].extend(list(zip(*pair)) for pair in zip(top_ids[row, at, :k].tolist(),
                                                              top_lps[row, at, :k].tolist()))
            shown[row] = int(count[row])
            keep_ids = stop_when(i, outputs[i], len(fresh)) if stop_when else None
            if keep_ids is not None:  # ended on the host: drop what follows, free the row
              del fresh[len(fresh) - (len(outputs[i]) - keep_ids):], outputs[i][keep_ids:], logprobs[i][keep_ids:]
              del tops[i][keep_ids:]
              state, stopped[i] = end_row(state, np.int32(row)), True
            if on_tokens and fresh:
              on_tokens(i, Piece(fresh, logprobs[i][-len(fresh):], tops[i][-len(fresh):]))
          if i >= 0 and (done[row] or stopped[i]):
            owner[row], holds[row], freed[row] = -1, prompts[i] + outputs[i], next(self._clock)
            if on_done:
              on_done(i, output(i))
        before, running = ops, lambda: [settings[i] for i in owner if i >= 0] + [settings[i] for i in waiting]
        grammars.release({s.grammar for s in running()})  # (their slots and cells go to later grammars)
        if arrivals and not left:
          admit(arrivals())  # (an arrival may widen `ops`)
        ops = self._narrowest_decode(ops, running())
        if not ops.grammars and before.grammars:  # the tables went with the last grammar: a later one makes new
          grammars = Registry(0, 0, cfg.vocab_size, stop_ids)
        if ops != before:  # the state follows
          with warnings.catch_warnings():  # the cache is reused in place, not the few arrays that change
            warnings.filterwarnings("ignore", "Some donated buffers were not usable")
            program = self._compiled(resized, (state,), model=False, ops=ops, vocab=cfg.vocab_size)
          state = program(state)
        drop_ended()
        if waiting and -1 in owner:  # continuous batching; read again after: a refilled row may be done at once
          state = place(state)
          continue
        if all(i < 0 for i in owner):
          break
        refill = np.bool_(bool(waiting))  # stop at the first finished row, to hand it the next prompt
        steps = np.int32(self.arrival_chunk if arrivals and not left and -1 in owner else self.chunk)
        state = self._compiled(decode, (self.params, state, refill, steps), ops=ops)(self.params, state, refill, steps)
      end = time.perf_counter() - self._compile_seconds
    if keep:
      self._kept = state, holds, freed
      self._pool = (pool_cache, pool) if pool else None
    return Result([output(i) for i in range(len(prompts))], sum(len(p) for p in prompts),
                  sum(len(o) for o in outputs), compile_seconds=self._compile_seconds,
                  prefill_seconds=prefilled - start, decode_seconds=end - prefilled, left=left)


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
