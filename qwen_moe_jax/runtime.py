"""Command-line runtime options shared by infer.py and train.py: dtype, mesh, kernels, compile cache, multi-host."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from qwen_moe_jax import sharding
from qwen_moe_jax.cache_home import cache_home
from qwen_moe_jax.errors import UserError
from qwen_moe_jax.kernels import (
  ATTENTION_BACKENDS,
  DECODE_BACKENDS,
  EXPERT_BACKENDS,
  EXPERT_DTYPES,
  Kernels,
  default_kernels,
  has_tokamax,
)

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}
CACHE_MAX_BYTES = 4 << 30  # the compile cache drops its least recently used programs past this size


def add_args(ap: argparse.ArgumentParser, default_dtype: str = "bfloat16", decoding: bool = False) -> None:
  """The shared flags; `decoding` adds the decode-attention kernel (infer.py)."""
  ap.add_argument("--dtype", default=default_dtype, choices=sorted(DTYPES),
                  help=f"compute and parameter dtype (default {default_dtype}; float32 is the parity setting)")
  ap.add_argument("--mesh", help="axis=size pairs over data, fsdp, expert, tensor, e.g. data=2,expert=4 "
                                 "(default: every device on the expert axis)")
  ap.add_argument("--expert-backend", default=None, choices=EXPERT_BACKENDS,
                  help="routed-expert kernel (default: tokamax on GPU when installed, else ragged)")
  ap.add_argument("--attention", default=None, choices=ATTENTION_BACKENDS,
                  help="self-attention kernel for prefill and training (default: cudnn on GPU, else xla; splash: "
                  "the Pallas TPU kernel)")
  if decoding:
    ap.add_argument("--decode-attention", default="xla", choices=DECODE_BACKENDS,
                    help="attention kernel of the decode steps: xla (an einsum over every cache slot) or pallas (a "
                    "Triton kernel reading only each row's live slots; GPU; opt-in, not yet measured)")
  ap.add_argument("--expert-dtype", choices=EXPERT_DTYPES,
                  help="the routed experts' weights: auto (--dtype) or int8 (one float32 scale per expert and output "
                  "channel, quantized as the checkpoint is read: about 0.57x the bytes of a bf16 model; training: "
                  "frozen under LoRA adapters, which then train against the int8 experts). Default: auto, or for "
                  "a LoRA run trained over int8 experts int8, its adapters unmerged (the model it trained)")
  ap.add_argument("--compile-cache", metavar="DIR|off",
                  help="persistent XLA compilation cache: a later run with the same shapes loads its programs "
                       "instead of compiling them (default: $JAX_COMPILATION_CACHE_DIR, else "
                       "~/.cache/qwen-moe-jax/xla, which is capped at 4 GiB)")
  multi = ap.add_argument_group(
    "multi-host (or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables)")
  multi.add_argument("--coordinator", help="host:port of process 0")
  multi.add_argument("--num-processes", type=int)
  multi.add_argument("--process-id", type=int)


def init_distributed(args: argparse.Namespace) -> None:
  """jax.distributed.initialize when a coordinator is given by flag or environment (before any device use)."""
  coordinator = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not coordinator:
    return
  num = args.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
  pid = args.process_id if args.process_id is not None else int(os.environ.get("JAX_PROCESS_ID", "-1"))
  if num < 1 or not 0 <= pid < num:
    raise UserError("multi-host: --coordinator needs --num-processes N and --process-id in [0, N)")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU devices
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)


class Preemption:
  """Whether a SIGTERM came (a scheduler's notice before it kills the process: a preemption, a job's end). On one
  process, a SIGTERM handler here notes it; on several, jax's preemption service (its SIGTERM handler in each) makes
  `seen` True on every process from the same step on, the first all of them reach after a notice to any. Made on
  the main thread."""

  def __init__(self):
    self.noticed = False
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, self._notice)

  def _notice(self, signum, frame) -> None:
    self.noticed = True

  def seen(self, step: int) -> bool:
    """Asked after every training step `step` by every process (jax wants consecutive ids, and Orbax asks it too
    when it saves, with the same step)."""
    if jax.process_count() > 1 and not self.noticed:
      self.noticed = multihost_utils.reached_preemption_sync_point(step)
    return self.noticed


def enable_compile_cache(folder: str | None) -> None:
  """Points jax's persistent compilation cache at `folder` (None: the default; "off": no cache).

  Call before the first compilation. Only our own default folder is capped (least recently used entries go):
  jax's capped cache needs every entry to have been written capped, which a folder shared with other programs
  does not promise. An explicit folder that cannot be created is an error; the default one is skipped with a
  note, so a read-only home does not stop a run.
  """
  if folder == "off":
    return
  own = cache_home("xla")
  chosen = Path(folder or os.environ.get("JAX_COMPILATION_CACHE_DIR") or own)
  try:
    chosen.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    if folder:
      raise UserError(f"--compile-cache {folder}: cannot create the folder ({e.strerror})") from None
    print(f"note: no compilation cache ({chosen}: {e.strerror})", file=sys.stderr)
    return
  jax.config.update("jax_compilation_cache_dir", str(chosen))
  if chosen.resolve() == own.resolve():
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)


def setup(args: argparse.Namespace) -> tuple[jax.sharding.Mesh, jnp.dtype, Kernels]:
  """Initialises multi-host if asked and the compile cache, then returns (mesh over all devices, dtype,
  kernels)."""
  enable_compile_cache(args.compile_cache)
  init_distributed(args)
  mesh = sharding.make_mesh(args.mesh)
  kernels = default_kernels(args.expert_backend, args.attention, getattr(args, "decode_attention", "xla"),
                            args.expert_dtype or "auto")
  for attention, platform in (("cudnn", "gpu"), ("splash", "tpu")):
    if kernels.attention == attention and jax.default_backend() != platform:
      raise UserError(f"--attention {attention} needs a {platform.upper()} (jax's backend here is "
                      f"{jax.default_backend()}); use xla")
  if kernels.decode == "pallas" and jax.default_backend() != "gpu":
    raise UserError(f"--decode-attention pallas needs a GPU (jax's backend here is {jax.default_backend()}); use xla")
  if kernels.experts == "tokamax" and not has_tokamax():
    raise UserError("--expert-backend tokamax needs tokamax: pip install 'qwen-moe-jax[gpu]' (Python >= 3.12)")
  return mesh, DTYPES[args.dtype], kernels
