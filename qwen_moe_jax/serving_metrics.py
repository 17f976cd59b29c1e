"""The server's Prometheus metrics (GET /metrics on `infer.py --serve`), named as vLLM's under the prefix
`qwen_moe_jax:` instead of `vllm:` (so a vLLM dashboard works once the prefix is replaced), labelled with the
served model's name:

  num_requests_running / _waiting    gauges: jobs (a request's prompts x its n) with a token out, and without one
                                     yet (queued, or in their prefill)
  prompt_tokens_total                counter: prompt ids of finished jobs; prefix_cache_queries_total the same,
                                     prefix_cache_hits_total those a kept row already held (not run)
  generation_tokens_total            counter: generated ids, as they reach the host (every decode chunk)
  request_success_total              counter by finished_reason: stop, length, abort (the client went away)
  request_errors_total               counter: jobs failed by the engine (out of memory, a bug)
  time_to_first_token_seconds,       histograms per job: submitted -> first token; submitted -> done; and
  e2e_request_latency_seconds,       (done - first token) / (generated - 1), for jobs generating two or more
  time_per_output_token_seconds

The engine thread updates them; prometheus_client's metrics are thread-safe.
"""

from __future__ import annotations

import dataclasses
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "qwen_moe_jax:"
FINISHED_REASONS = ("stop", "length", "abort")
FIRST_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0, 300.0)
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)


@dataclasses.dataclass
class Meter:
  """One job's times and the generated ids counted so far."""
  submitted: float = dataclasses.field(default_factory=time.monotonic)
  first_token: float | None = None
  counted: int = 0
  ended: bool = False  # finished or failed (a call failing after some of its jobs finished fails them all)


class Metrics:
  def __init__(self, model_name: str):
    self.registry = CollectorRegistry()

    def make(kind, name: str, doc: str, **kwargs):
      return kind(PREFIX + name, doc, ["model_name"], registry=self.registry, **kwargs).labels(model_name)

    self.running = make(Gauge, "num_requests_running", "Jobs generating (a token out).")
    self.waiting = make(Gauge, "num_requests_waiting", "Jobs without a token out yet (queued or prefilling).")
    self.prompt_tokens = make(Counter, "prompt_tokens", "Prompt ids of finished jobs (not aborted unstarted).")
    self.cache_queries = make(Counter, "prefix_cache_queries", "Prompt ids looked up in the kept rows.")
    self.cache_hits = make(Counter, "prefix_cache_hits", "Prompt ids a kept row held (not run).")
    self.generation_tokens = make(Counter, "generation_tokens", "Generated ids.")
    self.errors = make(Counter, "request_errors", "Jobs the engine failed.")
    self.first_token = make(Histogram, "time_to_first_token_seconds", "Submitted to first token.",
                            buckets=FIRST_TOKEN_BUCKETS)
    self.latency = make(Histogram, "e2e_request_latency_seconds", "Submitted to done.", buckets=REQUEST_BUCKETS)
    self.per_token = make(Histogram, "time_per_output_token_seconds", "A job's mean time per id after its first.",
                          buckets=PER_TOKEN_BUCKETS)
    success = Counter(PREFIX + "request_success", "Finished jobs.", ["model_name", "finished_reason"],
                      registry=self.registry)
    self.success = {reason: success.labels(model_name, reason) for reason in FINISHED_REASONS}

  def queued(self, meters: list[Meter | None]) -> None:
    self.waiting.inc(sum(m is not None for m in meters))

  def tokens(self, meter: Meter | None, n: int) -> None:
    """`n` more ids generated (the first ones: the job now runs)."""
    if meter is None:
      return
    if meter.first_token is None:
      meter.first_token = time.monotonic()
      self.waiting.dec()
      self.running.inc()
      self.first_token.observe(meter.first_token - meter.submitted)
    meter.counted += n
    self.generation_tokens.inc(n)

  def finished(self, meter: Meter | None, prompt: int, cached: int, generated: int, reason: str) -> None:
    """A job done: `prompt` ids (`cached` of them not run), `generated` ids in all (a scored job's come only
    here), ended for `reason` (FINISHED_REASONS). One aborted before it started ran no prompt ids: counted only
    as a request."""
    if meter is None or meter.ended:
      return
    if generated > meter.counted:
      self.tokens(meter, generated - meter.counted)
    self._leave(meter)
    now = time.monotonic()
    if meter.first_token is not None or reason != "abort":
      self.prompt_tokens.inc(prompt)
      self.cache_queries.inc(prompt)
      self.cache_hits.inc(cached)
    self.success[reason].inc()
    self.latency.observe(now - meter.submitted)
    if generated > 1:
      self.per_token.observe((now - meter.first_token) / (generated - 1))

  def failed(self, meter: Meter | None) -> None:
    if meter is not None and not meter.ended:
      self._leave(meter)
      self.errors.inc()

  def _leave(self, meter: Meter) -> None:
    meter.ended = True
    (self.waiting if meter.first_token is None else self.running).dec()

  def exposition(self) -> tuple[bytes, str]:
    """(the text format's body, its content type)."""
    return generate_latest(self.registry), CONTENT_TYPE_LATEST
