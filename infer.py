"""Generate text from a qwen2_moe checkpoint folder (from convert/hf_to_orbax.py, or a train.py run folder), or from
a Hugging Face model folder read in place (also named by its repo id once in the Hugging Face cache).

  python infer.py --demo
  python infer.py --checkpoint DIR --chat "Why is the sky blue?" [--system TEXT]
  python infer.py --checkpoint Qwen/Qwen1.5-MoE-A2.7B-Chat --peft ADAPTER_DIR --chat "Hello"
  python infer.py --checkpoint DIR --prompt "def fib(n):" --prompt "Once upon a time" --max-new-tokens 64
  python infer.py --checkpoint DIR --input-ids 1,2,3 --temperature 0 --json --dump-logits logits.npy
  python infer.py --checkpoint DIR --interactive [--system TEXT]
  python infer.py --checkpoint DIR --prompts-file eval.jsonl --json --prompt-logprobs --max-new-tokens 0
  python infer.py --checkpoint DIR --serve 8000 [--batch-size 32] [--max-model-len 4096]
  python infer.py --checkpoint DIR --batch-file requests.jsonl --batch-output results.jsonl

Prompts (--prompt raw text, --chat one user turn through the chat template, --input-ids token ids, or
--prompts-file JSONL with "prompt" / "chat" / "messages" / "input_ids" per line, optionally "max_new_tokens",
"stop" and sampling settings ("temperature", "top_p", ...: the flags' names)) may be repeated and run as one
batch (or --batch-size rows at a time, refilled as prompts finish). One prompt streams its tokens to stdout as
they are generated; --json prints one object per prompt. Sampling defaults (and a repetition penalty) come from
the checkpoint's generation_config.json, else greedy.
--interactive chats turn by turn: each line read from stdin is a user message, answered with the whole
conversation so far as the prompt (/reset starts over, /exit or end of input quits). --serve answers OpenAI's
/v1/completions and /v1/chat/completions over HTTP (see qwen_moe_jax/server.py), requests joining the running
batch as rows free; --batch-file runs a file in the form of OpenAI's Batch API (qwen_moe_jax/openai_batch.py) through
the same engine, its results in that form too.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from qwen_moe_jax import checkpoint, hf_io, openai_batch, runtime
from qwen_moe_jax.automaton import MEMORY, SECONDS, build_limits, store_of
from qwen_moe_jax.decoding import checked_seed
from qwen_moe_jax.errors import UserError, cli_main
from qwen_moe_jax.generate import Generator, Output, Piece
from qwen_moe_jax.grammar import Grammars
from qwen_moe_jax.kernels import Kernels
from qwen_moe_jax.openai_api import Api, prepare_json_object
from qwen_moe_jax.sampling import SETTINGS, Sampling, given_settings
from qwen_moe_jax.scoring import PromptScores, prompt_logits, prompt_scores
from qwen_moe_jax.server import allowed_origins, make_server
from qwen_moe_jax.serving_engine import Engine, follow
from qwen_moe_jax.serving_link import Link
from qwen_moe_jax.serving_metrics import Metrics
from qwen_moe_jax.stop_strings import StopStrings, TextStream, text_of
from qwen_moe_jax.tokenizer import load_tokenizer, stop_ids

DEMO_CHAT = "Tell me about mixture-of-experts language models."
SERVE_ROWS, SERVE_SLOTS = 16, 4096  # --serve's default --batch-size and largest default --max-model-len
API_KEY_VARIABLE = "QWEN_MOE_JAX_API_KEY"  # --serve's default --api-key
SHUTDOWN_TIMEOUT = 20.0  # --serve's default --shutdown-timeout, seconds


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--checkpoint", help="checkpoint folder, train.py run folder, or Hugging Face model folder (read "
                  "in place), also as a repo id in the Hugging Face cache (Qwen/Qwen1.5-MoE-A2.7B-Chat)")
  ap.add_argument("--peft", metavar="ADAPTER_DIR",
                  help="a peft LoRA adapter folder (or repo id in the Hugging Face cache) trained on the model, merged "
                  "into the weights as the Hugging Face folder --checkpoint names is read")
  ap.add_argument("--demo", action="store_true",
                  help="build a small RANDOM-weight qwen2_moe checkpoint (HF layout + tokenizer), convert it, "
                       "and generate from it: shows the whole pipeline and its speed, no files needed")
  ap.add_argument("--prompt", action="append", default=[], help="raw text prompt (repeatable)")
  ap.add_argument("--chat", action="append", default=[],
                  help="a user message, rendered with the chat template (repeatable)")
  ap.add_argument("--system", help="system prompt for --chat and --interactive")
  ap.add_argument("--interactive", action="store_true",
                  help="multi-turn chat: user messages from stdin, one per line (/reset, /exit)")
  ap.add_argument("--input-ids", action="append", default=[], help="comma-separated token ids (repeatable)")
  ap.add_argument("--prompts-file", help='JSONL: one {prompt|chat|messages|input_ids} object per line, '
                                         'optionally with its own "max_new_tokens", "stop" and sampling settings '
                                         '("temperature", "top_k", "top_p", "min_p", "repetition_penalty", '
                                         '"presence_penalty", "frequency_penalty", "min_tokens", "logit_bias", '
                                         '"top_logprobs") and structured output ("regex", "json_schema" or '
                                         '"choice")')
  ap.add_argument("--max-new-tokens", type=int, default=128)
  ap.add_argument("--stop", action="append", default=[],
                  help="end the text where this string begins (repeatable; left out of the text, as OpenAI's stop)")
  ap.add_argument("--temperature", type=float, help="0 is greedy")
  ap.add_argument("--top-k", type=int)
  ap.add_argument("--top-p", type=float)
  ap.add_argument("--min-p", type=float, help="drop ids less likely than this times the likeliest (0: off)")
  ap.add_argument("--repetition-penalty", type=float,
                  help="divide positive / multiply negative logits of ids already in the row (1: off; greedy too)")
  ap.add_argument("--presence-penalty", type=float,
                  help="subtract from the logits of ids generated so far (OpenAI's; -2 to 2, 0: off; greedy too)")
  ap.add_argument("--frequency-penalty", type=float,
                  help="subtract, times the count, from the logits of ids generated so far (OpenAI's; -2 to 2)")
  ap.add_argument("--min-tokens", type=int, metavar="N",
                  help="no stop id (EOS) before N new tokens (vLLM's min_tokens; 0: off)")
  ap.add_argument("--logit-bias", metavar="ID=BIAS,...",
                  help="add BIAS (-100 to 100: -100 bans the id, 100 forces it) to the logit of token ID before "
                  "sampling, e.g. 151643=-100 (OpenAI's logit_bias)")
  ap.add_argument("--regex", help="structured output: the text matches this regular expression whole (Rust's "
                  "syntax, close to Python's)")
  ap.add_argument("--json-schema", metavar="FILE|JSON",
                  help="structured output: the text is JSON following this JSON Schema (a file, or the schema "
                  "itself); '{\"type\": \"object\"}': any JSON object")
  ap.add_argument("--choice", action="append", default=[],
                  help="structured output: the text is exactly one of these strings (repeatable)")
  ap.add_argument("--grammar-limits", metavar="SECONDS,GIB", default=f"{SECONDS:g},{MEMORY >> 30}",
                  help="structured output: building a grammar (outlines-core's automaton of a regex, schema or "
                  "choice, in a child process; it grows exponentially with a string's maxLength or a regex's "
                  "repetition counts) stops past this time or memory, and its prompt or request is refused "
                  "(default %(default)s)")
  ap.add_argument("--grammar-cache", metavar="DIR|off",
                  help="structured output: grammars built before are read from this folder instead of built again "
                  "(any JSON object: seconds), by any run on this machine (default: ~/.cache/qwen-moe-jax/grammars, "
                  "its most recently used, up to 1 GiB)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--num-samples", type=int, default=1,
                  help="samples per prompt (sampling only; --json objects then carry \"sample\")")
  ap.add_argument("--json", action="store_true",
                  help='one {"input_ids", "output_ids", "text", "finish_reason"} object per prompt')
  ap.add_argument("--logprobs", action="store_true",
                  help='with --json: add "output_logprobs", the model\'s log-probability of each generated token')
  ap.add_argument("--top-logprobs", type=int, metavar="N",
                  help='with --json: add "output_top_logprobs", at each generated token the N likeliest ids and '
                  'their log-probabilities, [[id, logprob], ...] best first (at most 20)')
  ap.add_argument("--prompt-logprobs", action="store_true",
                  help='with --json: add "prompt_logprobs", each prompt token\'s log-probability given the ones '
                  'before it, and "prompt_ranks", its rank among the vocabulary (1: the greedy choice; null for the '
                  'first token); --max-new-tokens 0 scores without generating')
  ap.add_argument("--dump-logits", help="save fp32 logits over the prompt positions [T, V] (one prompt) with numpy")
  ap.add_argument("--batch-size", type=int,
                  help="most prompts decoded at once (default: all); the rest wait and take rows as they finish")
  ap.add_argument("--prefill-rows", type=int,
                  help="prompts per prefill call (default: all); fewer bound the prefill's memory for large batches")
  ap.add_argument("--share-prefix", type=int, default=64, metavar="N",
                  help="a prompt whose first N or more tokens another row holds (a common few-shot or system "
                  "prefix) copies their keys and values instead of running them; --prompt-logprobs runs the first "
                  "tokens prompts have in common once (0: only a prompt's samples share)")
  ap.add_argument("--prefix-pool", type=int, default=0, metavar="N",
                  help="keep, in N cache rows past the decode rows, what finished rows held when other prompts take "
                  "their rows (least recently used out first), for prompts beginning with it to copy as a row's "
                  "(--share-prefix): a served conversation's next turn runs only its new tokens although its row was "
                  "taken; costs N rows of --max-model-len slots of memory, no decode time")
  ap.add_argument("--serve", metavar="[HOST:]PORT",
                  help="serve OpenAI's /v1/completions and /v1/chat/completions on this port (host default "
                  "127.0.0.1; port 0: any free one), --batch-size rows (default 16) at once")
  ap.add_argument("--batch-file", metavar="IN.jsonl",
                  help="run OpenAI Batch API requests: one {custom_id, method: POST, url: /v1/chat/completions, "
                  "/v1/completions or /v1/responses, body} per line, as --serve would answer them (--batch-size rows, "
                  "default 16, at once), their replies written to --batch-output")
  ap.add_argument("--batch-output", metavar="OUT.jsonl",
                  help="with --batch-file: the results file, one {id, custom_id, response: {status_code, request_id, "
                  "body}, error} per request in the input's order (written as OUT.jsonl.<digest>.partial until every "
                  "request has its line, and resumed from there if stopped; must not exist)")
  ap.add_argument("--max-model-len", type=int,
                  help="with --serve or --batch-file: cache slots per row, a request's prompt and new tokens (default: "
                  "the model's context, at most 4096)")
  ap.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=RUN_DIR",
                  help="with --serve or --batch-file: serve these LoRA run folders (train.py --lora-rank) over the "
                  "checkpoint, each under its NAME: a request whose model is NAME runs with its adapters, one naming "
                  "the checkpoint (or none) without (vLLM's flag)")
  ap.add_argument("--served-model-name", help="with --serve or --batch-file: the model's name in replies (default: the "
                  "folder's, or the repo id --checkpoint gave)")
  ap.add_argument("--api-key", default=os.environ.get(API_KEY_VARIABLE) or None,
                  help=f"with --serve: requests (but /health and /metrics) must send 'Authorization: Bearer KEY', as "
                  f"OpenAI's clients send their api_key (default: ${API_KEY_VARIABLE}, which keeps the key out of "
                  f"the process list; unset: no key asked)")
  ap.add_argument("--allowed-origins", metavar="ORIGIN,...|*",
                  help="with --serve: web pages from these origins (such as http://localhost:3000; '*': any) may "
                  "call the server from a browser (CORS; vLLM's JSON list form is read too). Default: none")
  ap.add_argument("--shutdown-timeout", type=float, default=SHUTDOWN_TIMEOUT, metavar="SECONDS",
                  help="with --serve: on SIGTERM or Ctrl-C, answer new requests (and /health) with 503 and wait up "
                  "to this long for the requests under way to end (a second signal stops at once; 0: stop at "
                  f"once; default {SHUTDOWN_TIMEOUT:g}, inside Kubernetes' default 30 s grace period)")
  ap.add_argument("--kv-cache-dtype", choices=("auto", "int8"), default="auto",
                  help="auto: the model's --dtype; int8: keys and values quantized per slot and head (half of "
                  "bf16's bytes: twice the rows or context)")
  runtime.add_args(ap, decoding=True)
  args = ap.parse_args(argv)
  if bool(args.checkpoint) == bool(args.demo):
    ap.error("give exactly one of --checkpoint DIR or --demo")
  for flag in ("logprobs", "top_logprobs", "prompt_logprobs"):
    if getattr(args, flag) and not args.json:
      raise UserError(f"--{flag.replace('_', '-')} adds a key to the --json objects: give --json too")
  if args.max_new_tokens == 0 and not args.prompt_logprobs:
    raise UserError("--max-new-tokens 0 generates nothing: it scores the prompts, with --json --prompt-logprobs")
  if args.share_prefix < 0:
    raise UserError(f"--share-prefix must be >= 0, got {args.share_prefix}")
  if args.prefix_pool < 0 or (args.prefix_pool and not args.share_prefix):
    raise UserError(f"--prefix-pool must be >= 0 and needs --share-prefix > 0, got {args.prefix_pool} and "
                    f"{args.share_prefix}")
  for flag in ("batch_size", "prefill_rows", "num_samples"):
    if getattr(args, flag) is not None and getattr(args, flag) < 1:
      raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
  checked_seed(args.seed, "--seed")
  args.grammar_limits = build_limits(args.grammar_limits, "--grammar-limits")
  args.grammar_cache = store_of(args.grammar_cache, "--grammar-cache")
  args.allowed_origins = allowed_origins(args.allowed_origins)
  if not args.shutdown_timeout >= 0:  # (nan too)
    raise UserError(f"--shutdown-timeout must be >= 0 seconds, got {args.shutdown_timeout}")
  prompts = ("--prompt", "--chat", "--input-ids", "--prompts-file", "--dump-logits", "--prompt-logprobs")
  for mode, why, extra in (("interactive", "reads its messages from stdin", ()),
                           ("serve", "takes its prompts over HTTP", ("--json", "--num-samples", "--interactive")),
                           ("batch_file", "takes its prompts from the batch file", ("--json", "--num-samples",
                                                                                   "--interactive", "--serve"))):
    values = {f: getattr(args, f[2:].replace("-", "_")) for f in prompts + extra}
    given = [f for f, v in values.items() if (v > 1 if f == "--num-samples" else v)]
    if getattr(args, mode) and given:
      raise UserError(f"--{mode.replace('_', '-')} {why}: drop {', '.join(given)}")
  api = "--serve" if args.serve else "--batch-file" if args.batch_file else None  # OpenAI's API's requests
  if api and (args.regex or args.json_schema or args.choice):
    raise UserError(f"{api} takes structured output per request (response_format, or vLLM's guided_json, "
                    "guided_regex, guided_choice): drop --regex, --json-schema, --choice")
  if (args.max_model_len is not None or args.served_model_name or args.lora_modules) and not api:
    raise UserError("--max-model-len, --served-model-name and --lora-modules are --serve's and --batch-file's")
  args.lora_modules = lora_modules(args.lora_modules)
  if (args.shutdown_timeout != SHUTDOWN_TIMEOUT or args.allowed_origins) and not args.serve:
    raise UserError("--shutdown-timeout and --allowed-origins are --serve's")
  if bool(args.batch_file) != bool(args.batch_output):
    raise UserError("--batch-file and --batch-output go together (the requests, and where their results go)")

  if args.max_model_len is not None and args.max_model_len < 2:
    raise UserError(f"--max-model-len must be >= 2, got {args.max_model_len}")
  return args


def lora_modules(specs: list[str]) -> dict[str, str]:
  """--lora-modules NAME=RUN_DIR ... as {name: folder}."""
  modules: dict[str, str] = {}
  for spec in specs:
    name, _, folder = spec.partition("=")
    if not name or not folder or name in modules:
      raise UserError(f"--lora-modules takes NAME=RUN_DIR, each NAME once, got {spec!r}")
    modules[name] = folder
  return modules


@dataclasses.dataclass
class Request:
  """One prompt to generate for, with what its line (or the flags) asked."""
  ids: list[int]
  max_new_tokens: int  # a file line's "max_new_tokens", else --max-new-tokens
  stops: StopStrings | None  # a file line's "stop", else --stop; None: none
  sampling: Sampling  # the flags' (or generation_config.json's), with a file line's own settings over them
  where: str  # the flag or file line it came from


def read_prompts(args: argparse.Namespace, tok, sampling: Sampling, grammars: Grammars) -> list[Request]:
  """Every prompt, in the order given (flags first, then the prompts file)."""
  specs: list[tuple[str, object, str]] = []  # (kind, value, where)
  specs += [("prompt", p, "--prompt") for p in args.prompt]
  specs += [("chat", c, "--chat") for c in args.chat]
  specs += [("input_ids", s, "--input-ids") for s in args.input_ids]
  flag_stops = stop_strings(tok, args.stop, "--stop")
  asked = [(args.max_new_tokens, flag_stops, sampling)] * len(specs)
  if args.prompts_file:
    for spec, limit, stop, settings, obj in _prompts_file(Path(args.prompts_file)):
      specs.append(spec)
      grammar = grammars.pick(obj, spec[2])
      asked.append((args.max_new_tokens if limit is None else limit,
                    flag_stops if stop is None else stop_strings(tok, stop, spec[2]),
                    dataclasses.replace(sampling, **settings, **{"grammar": grammar} if grammar else {}
                                        ).validate(spec[2])))
  if args.demo and not specs:
    specs.append(("chat", DEMO_CHAT, "--demo"))
    asked.append((args.max_new_tokens, flag_stops, sampling))
  if not specs:
    raise UserError("no prompt: give --prompt, --chat, --input-ids or --prompts-file")
  return [Request(_encode(args, tok, kind, value, where), *more, where)
          for (kind, value, where), more in zip(specs, asked, strict=True)]


def _encode(args: argparse.Namespace, tok, kind: str, value, where: str) -> list[int]:
  """A prompt's token ids: given, encoded, or rendered through the chat template."""
  if kind == "input_ids":
    return _ids(value, where)
  if tok is None:
    raise UserError(f"{where}: text prompts need tokenizer.json in the checkpoint folder (or use --input-ids)")
  if kind == "prompt":
    return tok.encode(value)
  messages = value if kind == "messages" else (
    ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": value}])
  return tok.apply_chat_template(messages, add_generation_prompt=True)


def stop_strings(tok, stops: list[str] | str, where: str) -> StopStrings | None:
  """The stop strings of a flag or file line (a string or a list of them; None when there are none)."""
  stops = [stops] if isinstance(stops, str) else stops
  if not stops:
    return None
  if tok is None:
    raise UserError(f"{where}: stop strings need tokenizer.json in the checkpoint folder")
  return StopStrings(tok, stops, where)


def _ids(value, where: str) -> list[int]:
  try:
    ids = [int(x) for x in value.split(",") if x.strip()] if isinstance(value, str) else [int(x) for x in value]
  except (ValueError, TypeError):
    raise UserError(f"{where}: input ids must be integers separated by commas, got {value!r}") from None
  return ids


def _prompts_file(path: Path) -> list[tuple[tuple[str, object, str], int | None, list[str] | None, dict, dict]]:
  """((kind, value, where), max_new_tokens or None, stop strings or None, sampling settings given, the line) per
  non-empty line."""
  try:
    lines = path.read_text().splitlines()
  except (FileNotFoundError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: cannot read ({e})") from None
  specs = []
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"{path}:{n}"
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"{where}: not valid JSON ({e.msg})") from None
    kinds = [k for k in ("prompt", "chat", "messages", "input_ids") if isinstance(obj, dict) and k in obj]
    if len(kinds) != 1:
      raise UserError(f"{where}: expected an object with exactly one of prompt, chat, messages, input_ids")
    limit = obj.get("max_new_tokens")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
      raise UserError(f"{where}: max_new_tokens must be an integer >= 1, got {limit!r}")
    stop = obj.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and
                                                          all(isinstance(x, str) for x in stop))):
      raise UserError(f"{where}: stop must be a string or a list of strings, got {stop!r}")
    specs.append(((kinds[0], obj[kinds[0]], where), limit, stop, given_settings(obj, SETTINGS, where), obj))
  return specs


GENERATION_CONFIG_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")  # those transformers has


def generation_config(folder: Path) -> dict:
  """The checkpoint's generation_config.json ({} when absent), read once for sampling and stop ids."""
  path = folder / "generation_config.json"
  if not path.is_file():
    return {}
  try:
    gen = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise UserError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(gen, dict):
    raise UserError(f"{path}: expected a JSON object")
  return gen


def sampling_from(args: argparse.Namespace, gen: dict, folder: Path, grammars: Grammars) -> Sampling:
  """Flags win; else generation_config.json's sampling if it samples; else greedy. Its repetition_penalty
  applies either way, as in transformers (Qwen's chat models ship 1.05). The structured-output flags give the
  grammar."""
  sampled, where = bool(gen.get("do_sample")), str(folder / "generation_config.json")
  given = {k: v for k, v in given_settings(gen, GENERATION_CONFIG_KEYS, where).items()
           if sampled or k == "repetition_penalty"}
  defaults = dataclasses.replace(Sampling(temperature=1.0) if sampled else Sampling(), **given).validate(where)
  flags = {f: getattr(args, f) for f in SETTINGS}
  if args.logit_bias is not None:
    flags["logit_bias"] = logit_bias_flag(args.logit_bias)
  schema = args.json_schema
  if schema is not None and not schema.lstrip().startswith("{"):  # a file
    try:
      schema = Path(schema).read_text()
    except (OSError, UnicodeDecodeError) as e:
      raise UserError(f"--json-schema: cannot read {schema} ({e})") from None
  flags["grammar"] = grammars.pick({"regex": args.regex, "json-schema": schema, "choice": args.choice or None}, None,
                                   {"regex": "regex", "json-schema": "json_schema", "choice": "choice"})
  return dataclasses.replace(defaults, **{f: v for f, v in flags.items() if v is not None}).validate()


def logit_bias_flag(text: str) -> tuple[tuple[int, float], ...]:
  """--logit-bias ID=BIAS,... as sorted (id, bias) pairs."""
  try:
    return tuple(sorted((int(token), float(bias)) for token, bias in (item.split("=") for item in text.split(","))))
  except ValueError:
    raise UserError(f"--logit-bias takes ID=BIAS,... (such as 151643=-100), got {text!r}") from None


def prepare_demo(workdir: Path) -> Path:
  """Random HF checkpoint -> converter -> checkpoint folder, the path a real model takes."""
  from qwen_moe_jax.convert import import_hf
  from qwen_moe_jax.demo import write_hf_demo

  print("demo: building a small qwen2_moe checkpoint with RANDOM weights (the text will be gibberish)",
        file=sys.stderr)
  cfg = write_hf_demo(workdir / "hf")
  import_hf(workdir / "hf", workdir / "checkpoint", progress=False)
  print(f"demo: converted {workdir / 'hf'} -> {workdir / 'checkpoint'} ({cfg.num_hidden_layers} layers, "
        f"{cfg.num_experts} experts, top-{cfg.num_experts_per_tok}, hidden {cfg.hidden_size})", file=sys.stderr)
  return workdir / "checkpoint"


@cli_main
def main() -> None:
  args = parse_args()
  mesh, dtype, kernels = runtime.setup(args)
  signal.signal(signal.SIGTERM, signal.SIG_DFL)  # SIGTERM ends this process (jax.distributed.initialize made it a
  # preemption notice, which only training reads); --serve sets its own once serving
  with tempfile.TemporaryDirectory(prefix="qwen-moe-demo-") as tmp:
    folder = prepare_demo(Path(tmp)) if args.demo else hf_io.model_folder(args.checkpoint)
    run(args, folder, mesh, dtype, kernels)


def run(args, folder: Path, mesh, dtype, kernels: Kernels) -> None:
  cfg = checkpoint.load_config(folder)
  tok = load_tokenizer(folder) if (folder / "tokenizer.json").is_file() else None
  live = "--serve" if args.serve else "--batch-file" if args.batch_file else "--interactive" if args.interactive \
    else None
  if live and tok is None:
    raise UserError(f"{live} needs tokenizer.json in the checkpoint folder")
  if args.interactive and jax.process_count() > 1:
    raise UserError("--interactive needs a single process (--serve serves from several)")
  gen = generation_config(folder)
  grammars = Grammars(tok, seconds=args.grammar_limits[0], memory=args.grammar_limits[1], store=args.grammar_cache)
  sampling = sampling_from(args, gen, folder, grammars)
  batch = []  # the batch file's requests, read and checked (with where their results go) before the model loads
  if args.batch_file and jax.process_index() == 0:
    batch = openai_batch.read(Path(args.batch_file), Path(args.batch_output))
  requests = [] if live else read_prompts(args, tok, sampling, grammars)
  prompts, limits, stops = ([r.ids for r in requests], [r.max_new_tokens for r in requests],
                            [r.stops for r in requests])
  if args.dump_logits and len(prompts) != 1:
    raise UserError(f"--dump-logits takes exactly one prompt, got {len(prompts)}")
  greedy = next((r for r in requests if r.sampling.temperature == 0), None)
  if args.num_samples > 1 and greedy:
    raise UserError(f"{greedy.where}: --num-samples {args.num_samples} draws different samples of a prompt, but "
                    "its decoding is greedy: give --temperature > 0 (or a generation_config.json that samples)")
  if args.expert_dtype is None and checkpoint.trained_expert_dtype(folder) == "int8":
    kernels = dataclasses.replace(kernels, expert_dtype="int8")
    if jax.process_index() == 0:
      print(f"note: {folder} trained its LoRA adapters over int8 experts: run so, the adapters unmerged "
            f"(--expert-dtype auto merges them into float experts)", file=sys.stderr)
  source = checkpoint.locate(folder, args.peft and hf_io.model_folder(args.peft))
  adapters = {}  # --lora-modules' adapters, by name (serving_engine.py)
  if args.lora_modules:
    model, adapters = checkpoint.restore_with_adapters(source, args.lora_modules, mesh, dtype, kernels, cfg)
  else:
    model = checkpoint.restore(source, mesh, dtype, kernels, cfg)
  generator = Generator(model, mesh, prefill_rows=args.prefill_rows,
                        batch_size=args.batch_size or (SERVE_ROWS if args.serve or args.batch_file else None),
                        kv_cache_dtype=args.kv_cache_dtype, share_prefix=args.share_prefix,
                        prefix_pool=args.prefix_pool)
  if args.interactive:
    return chat(args, generator, tok, sampling, stop_ids(cfg, tok, gen))
  if args.serve:
    return serve(args, generator, folder, tok, sampling, stop_ids(cfg, tok, gen), grammars, adapters)
  if args.batch_file:
    return run_batch(args, batch, generator, folder, tok, sampling, stop_ids(cfg, tok, gen), grammars, adapters)

  lead = jax.process_index() == 0  # with several processes, the first one reports
  scores = prompt_scores(generator, prompts) if args.prompt_logprobs else None
  if args.max_new_tokens == 0:  # scoring only
    if any(limits):
      raise UserError(f"{args.prompts_file}: a line's max_new_tokens asks for new tokens; --max-new-tokens 0 only "
                      "scores")
    if lead:
      for p, score in zip(prompts, scores):
        print(json_line(p, Output([], [], "length", 0, []), "" if tok is not None else None, prompt_scores=score))
    return
  n = args.num_samples  # prompt i's sample j is generated as prompt i * n + j (its own random stream)
  each = lambda xs: [x for x in xs for _ in range(n)]  # noqa: E731
  printer = Printer(tok, stops[0]) if lead and len(prompts) * n == 1 and not args.json and tok is not None else None

  def report(k: int, out: Output) -> None:  # prompt i's sample j, ended
    i, j = divmod(k, n)
    text = text_of(tok, out.ids, stops[i])
    if args.json:
      print(json_line(prompts[i], out, text, args.logprobs, scores[i] if scores else None,
                      sample=j if n > 1 else None), flush=True)
    elif not printer:
      print(f"--- [{i + 1}{f'.{j + 1}' if n > 1 else ''}] ---")
      print(text if text is not None else ",".join(map(str, out.ids)), flush=True)

  progress = tqdm(total=len(prompts) * n, unit="prompt", file=sys.stderr,
                  disable=not lead or printer is not None or not sys.stderr.isatty())
  in_order = InOrder(report)

  def on_done(k: int, out: Output) -> None:
    progress.update()
    in_order(k, out)

  result = generator.generate(each(prompts), each(limits), each([r.sampling for r in requests]), args.seed,
                              stop_ids(cfg, tok, gen), printer,
                              stop_when=stop_when(each(stops)), on_done=on_done if lead else None)
  progress.close()
  if printer:
    printer.close()
  logits = prompt_logits(model, prompts[0], mesh) if args.dump_logits else None  # every process computes it
  if not lead:
    return
  if args.dump_logits:
    np.save(args.dump_logits, logits)
  shared = f" ({result.shared_tokens} copied from other prompts' rows)" if result.shared_tokens else ""
  print(f"prompt tokens: {result.prompt_tokens}{shared}, generated tokens: {result.generated_tokens}, "
        f"prefill {result.prefill_seconds:.3f} s, decode {result.decode_tokens_per_s:.1f} tokens/s "
        f"({len(prompts)} prompt(s), compile {result.compile_seconds:.1f} s)", file=sys.stderr)


class InOrder:
  """Calls `write(k, ...)` for results that arrive in any order, in the order of k (0, 1, ...), each as soon as
  it and every one before it have arrived: a long run's outputs appear as they complete, in input order."""

  def __init__(self, write):
    self.write = write
    self.waiting: dict[int, tuple] = {}
    self.next = 0

  def __call__(self, k: int, *result) -> None:
    self.waiting[k] = result
    while self.next in self.waiting:
      self.write(self.next, *self.waiting.pop(self.next))
      self.next += 1


def stop_when(stops: list[StopStrings | None]):
  """The generate callback that ends each prompt at its stop strings (None when no prompt has any)."""
  if not any(stops):
    return None
  return lambda i, ids, new: stops[i].end(ids, new) if stops[i] else None


class Printer:
  """The generate callback that writes one prompt's text to stdout as tokens arrive (`TextStream`)."""

  def __init__(self, tok, stops: StopStrings | None):
    self.stream = TextStream(tok, stops)

  def __call__(self, row: int, piece: Piece) -> None:
    _write(self.stream.push(piece.ids))

  def close(self) -> None:
    _write(self.stream.close())
    print(flush=True)


def _write(text: str) -> None:
  sys.stdout.write(text)
  sys.stdout.flush()


def json_line(prompt: list[int], output: Output, text: str | None, logprobs: bool = False,
              prompt_scores: PromptScores | None = None, sample: int | None = None) -> str:
  """One --json object: {"input_ids", "output_ids", "text", "finish_reason"}, and "output_logprobs" (`logprobs`) /
  "output_top_logprobs" (when the prompt asked for them) / "prompt_logprobs" and "prompt_ranks" / "sample" (of
  --num-samples) when given."""
  obj = {"input_ids": prompt, "output_ids": output.ids, "text": text, "finish_reason": output.reason}
  if sample is not None:
    obj["sample"] = sample
  if logprobs:
    obj["output_logprobs"] = output.logprobs
  if output.top:
    obj["output_top_logprobs"] = output.top
  if prompt_scores is not None:
    obj["prompt_logprobs"], obj["prompt_ranks"] = prompt_scores.logprobs, prompt_scores.ranks
  return json.dumps(obj, ensure_ascii=False)


def serve(args, generator: Generator, folder: Path, tok, sampling: Sampling, eos: list[int],
          grammars: Grammars, adapters: dict[str, dict]) -> None:
  """Answers OpenAI API requests over HTTP until interrupted (qwen_moe_jax/server.py), building the requests'
  grammars with `grammars` (its limits: --grammar-limits), serving `adapters` (--lora-modules) besides the model."""
  host, _, port = args.serve.rpartition(":")
  if not port.isdigit():
    raise UserError(f"--serve takes [HOST:]PORT, got {args.serve!r}")
  slots, name = engine_shape(args, generator, folder)
  if jax.process_index() > 0:  # process 0 serves HTTP; this one runs the same engine, as process 0's tells it
    return follow_first(generator, tok, name, slots, eos, grammars, adapters)
  pool = f", {generator.prefix_pool} prefix pool rows besides" if generator.prefix_pool else ""
  print(f"compiling the decode program for {generator.batch_size} rows x {slots} slots{pool}", file=sys.stderr,
        flush=True)
  try:
    server = make_server(generator, tok, name=name, host=host or "127.0.0.1", port=int(port),
                         rows=generator.batch_size, slots=slots, stop_ids=eos, sampling=sampling, seed=args.seed,
                         api_key=args.api_key, shutdown_timeout=args.shutdown_timeout, grammars=grammars,
                         origins=args.allowed_origins, adapters=adapters)
  except OSError as e:
    raise UserError(f"--serve {args.serve}: cannot listen ({e.strerror or e})") from None
  prepare_json_object(grammars)
  address, bound = server.server_address[:2]
  processes = f" over {jax.process_count()} processes" if jax.process_count() > 1 else ""
  print(f"serving {name} on http://{address}:{bound} (/v1/completions, /v1/chat/completions, /v1/responses, "
        f"/v1/models): {generator.batch_size} rows x {slots} slots{processes}; the first requests of other shapes "
        "compile",
        file=sys.stderr, flush=True)
  signals = itertools.count()

  def stop(signum, frame) -> None:  # SIGTERM or Ctrl-C: drain, then stop (the engine and any follower end with it)
    if next(signals) or not args.shutdown_timeout:  # a second signal: at once
      raise KeyboardInterrupt
    threading.Thread(target=server.stop, args=(args.shutdown_timeout,), daemon=True, name="drain").start()

  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, stop)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()


def engine_shape(args, generator: Generator, folder: Path) -> tuple[int, str]:
  """(--max-model-len: slots per row, --served-model-name: the model's name in replies) of --serve or --batch-file."""
  context = generator.config.context_length
  slots = args.max_model_len or min(context, SERVE_SLOTS)
  if slots > context:
    raise UserError(f"--max-model-len {slots} is past the model's context of {context} positions")
  named = args.checkpoint and Path(args.checkpoint) != folder  # a repo id in the Hugging Face cache: its name
  name = args.served_model_name or (args.checkpoint if named else folder.resolve().name)
  if name in args.lora_modules:
    raise UserError(f"--lora-modules {name}=...: that is the served model's name (give the adapter another, or "
                    "--served-model-name)")
  return slots, name


def follow_first(generator: Generator, tok, name: str, slots: int, eos: list[int], grammars: Grammars,
                 adapters: dict[str, dict]) -> None:
  """A process past the first under --serve or --batch-file: runs the same engine as process 0's tells it, building
  the grammars of the requests process 0 took however long they take here."""
  unbounded = Grammars(tok, seconds=None, memory=grammars.memory, store=grammars.store)
  follow(generator, tok, name=name, rows=generator.batch_size, slots=slots, stop_ids=eos, grammars=unbounded,
         adapters=adapters)


def run_batch(args, requests: list[openai_batch.Request], generator: Generator, folder: Path, tok,
              sampling: Sampling, eos: list[int], grammars: Grammars, adapters: dict[str, dict]) -> None:
  """Runs an OpenAI Batch API file's requests through the engine (openai_batch.py), --batch-size rows at once,
  serving `adapters` (--lora-modules) besides the model."""
  slots, name = engine_shape(args, generator, folder)
  if jax.process_index() > 0:
    return follow_first(generator, tok, name, slots, eos, grammars, adapters)
  output = Path(args.batch_output)
  engine = Engine(generator, generator.batch_size, slots, eos, Metrics(name),
                  Link() if jax.process_count() > 1 else None, adapters=adapters)
  try:
    api = Api(engine, tok, name, sampling, args.seed, slots, grammars)
    counts = openai_batch.run(api, requests, output, window=4 * generator.batch_size)
  finally:
    engine.close()  # (and the other processes' with it)
  refused = ", ".join(f"{n} with status {code}" for code, n in sorted(counts.items()) if code != 200)
  print(f"{len(requests)} requests: {counts[200]} answered{', ' + refused if refused else ''}; results in {output}",
        file=sys.stderr)


def chat(args, generator: Generator, tok, sampling: Sampling, eos: list[int]) -> None:
  """Reads user messages from stdin and answers each with the conversation so far as the prompt (streamed, or
  one --json object per turn), keeping the KV cache between turns, so a turn prefills only the tokens the
  conversation gained. A turn that does not fit the context is reported; /reset makes room."""
  system = [{"role": "system", "content": args.system}] if args.system else []
  stops = stop_strings(tok, args.stop, "--stop")
  messages = list(system)
  tty = sys.stdin.isatty()
  while True:
    if tty:
      print("> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    text = line.strip()
    if not line or text == "/exit":
      return
    if text == "/reset":
      messages = list(system)
      print("(conversation reset)", file=sys.stderr)
      continue
    if not text:
      continue
    prompt = tok.apply_chat_template(messages + [{"role": "user", "content": text}], add_generation_prompt=True)
    printer = None if args.json else Printer(tok, stops)
    try:  # keep: the next turn runs only its new tokens over this cache
      result = generator.generate([prompt], args.max_new_tokens, sampling, args.seed, eos, printer, keep=True,
                                  stop_when=stop_when([stops]))
    except UserError as e:
      print(f"error: {e}; /reset starts a new conversation", file=sys.stderr)
      continue
    out = result.outputs[0]
    reply = text_of(tok, out.ids, stops)
    if args.json:
      print(json_line(prompt, out, reply, args.logprobs), flush=True)
    else:
      printer.close()
    messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]


if __name__ == "__main__":
  main()
