"""The serving engine under `infer.py --serve`: one thread owns the device and runs generate calls back to back over
jobs (a prompt and its settings: a request with "n" samples or several prompts makes several) that the HTTP
threads submit (openai_api.py makes them). A job that arrives while a call runs joins it as its rows free
(Generator.generate's `arrivals`, polled every decode chunk), so requests do not wait for each other (continuous
batching). Calls keep their KV cache (`keep`): a finished request's row holds its prompt and reply until a new
request takes it, so a conversation's next turn runs only its new tokens. Every call has the same shapes (`rows`
rows, a cache of `slots` slots), so the decode program compiles once for each set of sampling steps: a call takes
those its requests need (`room_ops`), and a request needing more widens a running call's as it joins.

Served LoRA adapters (`adapters`: infer.py --lora-modules): a job names one (its request's model) or none (the
base model); a call runs one, whose values the engine puts into the model's adapter leaves before it (all zero:
the base model), so the compiled programs serve every adapter. A call takes the waiting jobs of the adapter the
oldest one asks for, and admits arrivals of that adapter only while no job of another waits (then it drains, and
the next call serves those). Switching drops the kept cache (its rows were computed under the other weights).

Over several processes (jax.distributed), process 0's engine tells every other's (`follow`) at each sync point what
it saw (serving_link.py).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import queue
import signal
import sys
import threading

from flax import nnx

from qwen_moe_jax import checkpoint
from qwen_moe_jax.errors import UserError
from qwen_moe_jax.generate import Arrival, Generator, Output, Piece, Room, Stream, room_ops
from qwen_moe_jax.grammar import Grammars
from qwen_moe_jax.sampling import SETTINGS, Sampling, SamplingOps
from qwen_moe_jax.scoring import prompt_scores
from qwen_moe_jax.serving_link import Link
from qwen_moe_jax.serving_metrics import Meter, Metrics
from qwen_moe_jax.stop_strings import StopStrings, TextStream
from qwen_moe_jax.tokenizer import Tokenizer


@dataclasses.dataclass
class Job:
  """One prompt of a request, generated as one row (or scored: `echo` with `logprobs`); its events go to the
  request's queue tagged with `choice`: ("text", choice, text, Piece: the ids it came from, None at the end) as
  text arrives (streamed requests), then ("done", choice, Output, scores: PromptScores of a scored job, else None)
  or ("error", choice, message)."""
  ids: list[int]
  max_new_tokens: int
  sampling: Sampling
  stream: Stream
  stops: StopStrings | None
  choice: int
  events: queue.Queue
  text: TextStream | None = None  # streamed requests: the text shown so far
  cancelled: bool = False  # the client went away (set by its HTTP thread; the engine sees it at its next sync)
  score: bool = False  # the prompt's scores, and with max_new_tokens 1 its greedy next token, from one forward pass
  meter: Meter | None = dataclasses.field(default_factory=Meter)  # its times, from now (None: not counted)
  serial: int = -1  # its number, the same on every process (Engine.submit)
  ended: bool = False  # the engine saw `cancelled` (every process at the same sync): its row ends, or it never starts
  adapter: str | None = None  # the served LoRA adapter it runs with (None: the base model)

  def wire(self) -> dict:
    """What a follower's engine needs of the job, as JSON (`unwired` reads it)."""
    s = self.sampling
    return {"serial": self.serial, "ids": self.ids, "max_new_tokens": self.max_new_tokens,
            "sampling": {f: getattr(s, f) for f in SETTINGS},
            "grammar": [s.grammar.pattern, s.grammar.source] if s.grammar else None, "stream": list(self.stream),
            "stops": self.stops.stops if self.stops else None, "choice": self.choice, "score": self.score,
            "adapter": self.adapter}

  @staticmethod
  def unwired(obj: dict, tok: Tokenizer, grammars: Grammars) -> "Job":
    """A job from its `wire` form, on a follower: no client reads its events, no metrics count it."""
    sampling = Sampling(**obj["sampling"] | {"logit_bias": tuple(map(tuple, obj["sampling"]["logit_bias"])),
                                             "grammar": obj["grammar"] and grammars.of_pattern(*obj["grammar"])})
    return Job(obj["ids"], obj["max_new_tokens"], sampling, Stream(*obj["stream"]),
               obj["stops"] and StopStrings(tok, obj["stops"]), obj["choice"], _NOWHERE, score=obj["score"],
               meter=None, serial=obj["serial"], adapter=obj["adapter"])


class _Nowhere:
  """A follower's jobs' event queue: nobody reads it."""

  def put(self, event: tuple) -> None:
    pass


_NOWHERE = _Nowhere()


class Stopped(BaseException):
  """The server stops: its engine's loop ends there (not an Exception: a call's error handling lets it through)."""


class Engine:
  """Runs the jobs on one thread, in generate calls of fixed shapes (Room), joining running calls as they come.

  What it decides depends only on what it saw at its sync points (`_sync`): the jobs submitted and the clients gone
  by then. `link` (several processes): process 0's engine sends that to the others', which `follow` on their own
  thread (and need the tokenizer `tok`, for the jobs' stop strings and grammars)."""

  def __init__(self, generator: Generator, rows: int, slots: int, stop_ids: list[int], metrics: Metrics,
               link: Link | None = None, tok: Tokenizer | None = None, grammars: Grammars | None = None,
               adapters: dict[str, dict] | None = None):
    self.generator, self.stop_ids, self.metrics, self.link, self.tok = generator, stop_ids, metrics, link, tok
    self.adapters = adapters or {}  # name -> the values of the model's adapter leaves (restore_with_adapters)
    self.adapter: str | None = None  # the one the model holds (None: the base model, its adapter leaves zero)
    leaves = next(iter(self.adapters.values()), {})
    self.zeros = {k: x for k, x in checkpoint.flatten(generator.params).items() if k in leaves}  # (as restored)
    self.room = Room(rows=rows, slots=slots, max_new=slots)
    self.leads = link is None or link.leads
    self.pending: collections.deque[Job] = collections.deque()  # jobs seen, not yet taken (the engine's thread's)
    self.live: dict[int, Job] = {}  # jobs seen, not yet ended, by serial
    self.inbox: list[Job] = []  # process 0: jobs submitted, not yet seen (under `ready`)
    self.serials, self.closing, self.ready = itertools.count(), False, threading.Condition()
    self.grammars = None if self.leads else grammars or Grammars(tok)
    self.thread = threading.Thread(target=self._serve, daemon=True, name="engine") if self.leads else None
    if self.thread:
      self.thread.start()

  def follow(self) -> None:
    """A follower's engine, on this thread, until process 0's stops."""
    self._serve()

  def close(self) -> None:
    """Stops the engine at its next sync point (with followers: tells them) and returns once it has stopped (so
    that no device call is under way as the process exits)."""
    with self.ready:
      self.closing = True
      self.ready.notify()
    self.thread.join()

  def warm_up(self, sampling: Sampling) -> None:
    """Runs a one-id prompt for two tokens with `sampling` (the server's defaults), so that the first requests find
    the decode program compiled (and a short prompt's prefill)."""
    events: queue.Queue = queue.Queue()
    self.submit([Job([0], 2, sampling, Stream(0, 0), None, 0, events, meter=None)])
    event = events.get()
    if event[0] == "error":
      raise UserError(f"warming up the server: {event[2]}")

  def submit(self, jobs: list[Job]) -> None:
    self.metrics.queued([j.meter for j in jobs])
    with self.ready:
      for j in jobs:
        j.serial = next(self.serials)
      self.inbox.extend(jobs)
      self.ready.notify()

  def _sync(self) -> None:
    """The engine sees what came: the jobs submitted join `pending`, and the jobs whose clients left end (`ended`:
    their rows end, or they never start); process 0 tells the followers, which wait for it here."""
    if self.leads:
      with self.ready:
        new, self.inbox, stop = self.inbox, [], self.closing
      gone = [j for j in self.live.values() if j.cancelled and not j.ended]
      if self.link:
        self.link.send({"jobs": [j.wire() for j in new], "gone": [j.serial for j in gone], "stop": stop})
    else:
      message = self.link.receive()
      new = [Job.unwired(obj, self.tok, self.grammars) for obj in message["jobs"]]
      gone, stop = [self.live[serial] for serial in message["gone"]], message["stop"]
    if stop:
      raise Stopped
    for j in gone:
      j.ended = True
    self.live.update((j.serial, j) for j in new)
    self.pending.extend(new)

  def _take(self, running: bool = False) -> list[Job]:
    """The jobs seen and waiting of the adapter the oldest asks for; for a `running` call (of the model's adapter),
    none while a scored job or a job of another adapter waits (the call then drains, and those run next)."""
    if not self.pending or running and any(j.score or j.adapter != self.adapter for j in self.pending):
      return []
    adapter = self.pending[0].adapter
    jobs = [j for j in self.pending if j.adapter == adapter]
    self.pending = collections.deque(j for j in self.pending if j.adapter != adapter)
    return jobs

  def _use(self, adapter: str | None) -> None:
    """Puts `adapter`'s values (None: zeros) into the model's adapter leaves, unless it holds them."""
    if adapter != self.adapter:
      gen = self.generator
      values = self.adapters[adapter] if adapter is not None else self.zeros
      gen.load(nnx.merge(gen.graphdef, checkpoint.replaced(gen.params, values)))
      self.adapter = adapter

  def _serve(self) -> None:
    try:
      while True:
        if self.leads:
          with self.ready:
            self.ready.wait_for(lambda: self.inbox or self.pending or self.closing)
        self._sync()
        jobs = self._take()
        if jobs:
          self._use(jobs[0].adapter)
        for part, run in (([j for j in jobs if j.score], self._score), ([j for j in jobs if not j.score], self._call)):
          if part:
            run(part)
    except Stopped:
      return

  def _score(self, jobs: list[Job]) -> None:
    """Scored jobs, in one `prompt_scores` call (prompts that begin alike run their common ids once)."""
    self.generator.drop_kept()  # the rows' cache: its memory is the scoring pass's now
    try:  # an id after each prompt: where it is predicted, the greedy next token (its own score is not read)
      scores = prompt_scores(self.generator, [j.ids + [0] for j in jobs])
    except Exception as e:  # noqa: BLE001  (as in _call)
      return self._fail(jobs, e)
    for j, s in zip(jobs, scores, strict=True):
      new = slice(len(j.ids), len(j.ids) + j.max_new_tokens)
      out = Output(s.best[new], s.best_logprobs[new], "length", 0, [])
      self._finished(j, out)
      j.events.put(("done", j.choice, out, s))

  def _fail(self, jobs: list[Job], e: Exception) -> None:
    """Every job gets the error (out of memory, or a bug): the server goes on."""
    message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
    print(f"error: {message}", file=sys.stderr)
    for j in jobs:
      self.live.pop(j.serial, None)
      self.metrics.failed(j.meter)
      j.events.put(("error", j.choice, message))

  def _finished(self, j: Job, out: Output) -> None:
    self.live.pop(j.serial, None)
    self.metrics.finished(j.meter, len(j.ids), out.cached, len(out.ids), "abort" if j.ended else out.reason)

  def _call(self, jobs: list[Job]) -> None:
    ops = room_ops(SamplingOps.of([j.sampling for j in jobs]), self.generator.config.vocab_size)
    room = dataclasses.replace(self.room, ops=ops)  # arrivals needing more steps widen it (Generator.generate)
    offered: list[Job] = []  # jobs handed to the call as arrivals: the admitted ones first, in order

    def job(i: int) -> Job:  # the call's prompt i
      return jobs[i] if i < len(jobs) else offered[i - len(jobs)]

    def arrivals() -> list[Arrival]:
      new = self._take(running=True)
      offered.extend(new)
      return [Arrival(j.ids, j.max_new_tokens, j.sampling, j.stream) for j in new]

    def on_tokens(i: int, piece: Piece) -> None:
      j = job(i)
      self.metrics.tokens(j.meter, len(piece.ids))
      if j.text is not None:
        j.events.put(("text", j.choice, j.text.push(piece.ids), piece))

    def stop_when(i: int, ids: list[int], new: int) -> int | None:
      j = job(i)
      if j.ended:
        return len(ids)
      return j.stops.end(ids, new) if j.stops else None

    def on_done(i: int, out: Output) -> None:
      j = job(i)
      self._finished(j, out)
      if j.text is not None:
        j.events.put(("text", j.choice, j.text.close(), None))
      j.events.put(("done", j.choice, out, None))

    try:
      result = self.generator.generate(
        [j.ids for j in jobs], [j.max_new_tokens for j in jobs], [j.sampling for j in jobs],
        [j.stream for j in jobs], self.stop_ids, on_tokens, stop_when=stop_when, on_done=on_done,
        keep=True, arrivals=arrivals, room=room, on_return=self._sync)
    except Exception as e:  # noqa: BLE001  (out of memory, or a bug): this call's jobs fail, the server goes on
      return self._fail(jobs + offered, e)
    left = offered[len(offered) - len(result.left):]  # not admitted: they start the next call
    self.pending.extendleft(reversed(left))


def follow(generator: Generator, tok: Tokenizer, *, name: str, rows: int, slots: int, stop_ids: list[int],
           grammars: Grammars | None = None, adapters: dict[str, dict] | None = None) -> None:
  """Another process than the first of a multi-process server: runs the engine as process 0's tells it (its
  `make_server` arguments), until that stops. SIGTERM and SIGINT here ask process 0 to stop the server (this process
  cannot leave alone: every generate call spans all processes)."""
  link = Link()
  for signum in (signal.SIGTERM, signal.SIGINT):  # (SIGTERM's default here is jax's preemption notice: it would
    signal.signal(signum, lambda *_: link.ask_to_stop())  # go on serving)
  Engine(generator, rows, slots, stop_ids, Metrics(name), link, tok, grammars, adapters).follow()
