"""OpenAI's Batch API files, run offline (`infer.py --batch-file IN.jsonl --batch-output OUT.jsonl`).

Each line of IN is a request as OpenAI's batch input file has it: {"custom_id", "method": "POST", "url":
"/v1/chat/completions" | "/v1/completions" | "/v1/responses", "body"}. It runs through the server's Api (the same
checks, chat template, tools, structured output, and the engine: requests join the running batch as rows free),
and OUT gets a line per request, in IN's order, as OpenAI's batch output file has it: {"id", "custom_id",
"response": {"status_code", "request_id", "body"}, "error": null}, the body the reply, or the error of a request
refused (400) or failed (500). Every line is checked before any runs (the first bad one: one error naming FILE:LINE).
OUT is written as OUT.<requests' digest>.partial (`partial`), a line as each request ends, and renamed OUT once
every request has its line; a run that finds it (an earlier run of the same requests, stopped) keeps its lines and
runs the requests after them.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import queue
import sys
import uuid
from pathlib import Path

from tqdm import tqdm

from qwen_moe_jax import responses_api
from qwen_moe_jax.errors import UserError
from qwen_moe_jax.openai_api import Api, BadRequest, error_body

ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/responses": "responses"}


@dataclasses.dataclass(frozen=True)
class Request:
  line: int  # its line in the input file, from 1
  custom_id: str
  kind: str  # the route's: chat, completions or responses
  body: dict


def read(path: Path, output: Path) -> list[Request]:
  """The requests of batch input file `path`, whose results are to go to `output`; UserError naming FILE:LINE for
  the first line that is not one (not a JSON object, no custom_id string or one an earlier line has, a method other
  than POST, a url not served, a body not an object), or naming `output` if it exists or its folder does not.
  Blank lines are skipped."""
  if os.path.lexists(output):
    raise UserError(f"--batch-output {output}: already exists (give a new file, or remove it)")
  if not output.resolve().parent.is_dir():
    raise UserError(f"--batch-output {output}: no such folder")
  try:
    text = path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: cannot read the batch file ({e})") from None
  requests, seen = [], set()
  for n, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    where = f"{path}:{n}"
    try:
      obj = json.loads(line)
    except (ValueError, RecursionError) as e:
      raise UserError(f"{where}: not a JSON object ({getattr(e, 'msg', None) or type(e).__name__})") from None
    if not isinstance(obj, dict):
      raise UserError(f"{where}: not a JSON object, got {line:.100}")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
      raise UserError(f"{where}: custom_id must be a non-empty string, got {custom_id!r:.100}")
    if custom_id in seen:
      raise UserError(f"{where}: custom_id {custom_id!r:.100} is an earlier line's too (each request's is its own)")
    if obj.get("method") != "POST":
      raise UserError(f"{where}: method must be POST, got {obj.get('method')!r:.100}")
    if obj.get("url") not in ROUTES:
      raise UserError(f"{where}: url must be one of {', '.join(ROUTES)}, got {obj.get('url')!r:.100}")
    if not isinstance(obj.get("body"), dict):
      raise UserError(f"{where}: body must be a JSON object (the request), got {obj.get('body')!r:.100}")
    seen.add(custom_id)
    requests.append(Request(n, custom_id, ROUTES[obj["url"]], obj["body"]))
  if not requests:
    raise UserError(f"{path}: no requests in the batch file")
  return requests


def run(api: Api, requests: list[Request], output: Path, window: int, progress: bool = True) -> collections.Counter:
  """Runs `requests`, up to `window` samples (prompts x n) submitted ahead of the first unfinished one (at least
  that one's), writing each one's output line, in order, to their `partial` file (after the lines `resumed` keeps of
  an earlier run's), renamed `output` at the end; returns how many lines had each status code."""
  partial = partial_file(output, requests)
  done = resumed(partial, requests)
  stored = responses_api.Stored()  # (nothing is stored: a batch's previous_response_id finds no response, a 404)
  under_way: collections.deque = collections.deque()  # (request, its refusal or (events, asked, jobs, prompts))
  ahead, upcoming = 0, iter(requests[len(done):])
  counts = collections.Counter(line["response"]["status_code"] for line in done)
  with partial.open("a", encoding="utf-8") as out, tqdm(total=len(requests), initial=len(done), unit="request",
                                                        disable=not progress) as bar:
    while True:
      while not under_way or ahead < window:
        request = next(upcoming, None)
        if request is None:
          break
        under_way.append((request, _start(api, request, stored)))
        ahead += _samples(under_way[-1][1])
      if not under_way:
        break
      request, started = under_way.popleft()
      ahead -= _samples(started)
      status, body = started if isinstance(started[0], int) else _finish(api, request, *started)
      counts[status] += 1
      line = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": request.custom_id, "response": {
        "status_code": status, "request_id": uuid.uuid4().hex, "body": body}, "error": None}
      out.write(json.dumps(line, ensure_ascii=False) + "\n")
      out.flush()
      bar.update()
  os.replace(partial, output)
  return counts


def partial_file(output: Path, requests: list[Request]) -> Path:
  """Where a run of `requests` writes their lines until all are there: OUT.<the requests' digest>.partial (so that
  a later run of other requests, even with the same custom_ids, does not take it for its own)."""
  digest = hashlib.sha256(json.dumps([(r.custom_id, r.kind, r.body) for r in requests], sort_keys=True).encode())
  return output.with_name(f"{output.name}.{digest.hexdigest()[:16]}.partial")


def resumed(partial: Path, requests: list[Request]) -> list[dict]:
  """The output lines an earlier, stopped run of `requests` left in `partial` (none if it is absent), which is cut
  to them: a last line cut short is dropped. UserError if they are not the first requests' lines."""
  if not partial.exists():
    return []
  lines, size = [], 0  # the whole lines, and their bytes
  with partial.open("rb") as f:
    for raw in f:
      try:
        line = json.loads(raw) if raw.endswith(b"\n") else None
      except ValueError:
        line = None
      if not isinstance(line, dict) or "status_code" not in (line.get("response") or {}):
        break
      lines.append(line)
      size += len(raw)
  if [line.get("custom_id") for line in lines] != [r.custom_id for r in requests[:len(lines)]]:
    raise UserError(f"{partial}: its lines are not the results of the batch file's first {len(lines)} requests: "
                    "remove it to start over")
  with partial.open("r+b") as f:
    f.truncate(size)
  print(f"resuming: {partial} holds the results of {len(lines)} of the {len(requests)} requests", file=sys.stderr)
  return lines


def _start(api: Api, request: Request, stored: responses_api.Stored) -> tuple:
  """Submits `request`'s jobs: (events, the request it runs as, jobs, prompts), or its refusal (status, error): a
  BadRequest's, or an unexpected failure's 500."""
  events: queue.Queue = queue.Queue()
  try:
    if request.body.get("stream"):
      raise BadRequest("stream: a batch request's reply comes whole (give false or leave it out)", "stream")
    asked, jobs, prompts = responses_api.jobs(api, request.kind, request.body, events, stored)
  except BadRequest as e:
    return e.status, error_body(str(e), param=e.param)
  except Exception as e:  # noqa: BLE001  (a bug: this request's line says so, as the server's 500; the batch goes on)
    print(f"error: {request.custom_id}: {type(e).__name__}: {e}", file=sys.stderr)
    return 500, error_body(f"{type(e).__name__}: {e}", "server_error")
  api.engine.submit(jobs)
  return events, asked, jobs, prompts


def _samples(started: tuple) -> int:
  return 0 if isinstance(started[0], int) else len(started[2])


def _finish(api: Api, request: Request, events: queue.Queue, asked: dict, jobs: list, prompts: list) -> tuple:
  """Waits for a started request's jobs: (200, its reply), or (500, the error) if the engine failed them."""
  results: list[tuple | None] = [None] * len(jobs)
  while any(r is None for r in results):
    event = events.get()
    if event[0] == "error":
      return 500, error_body(event[2], "server_error")
    results[event[1]] = event[2:]
  return 200, responses_api.reply(api, request.kind, request.body, asked, results, prompts)
