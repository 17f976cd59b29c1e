"""Capacity planning: will this config fit on this mesh? Nothing is allocated; every array is abstract.

For a preset (or a config.json) and a mesh over N devices, prints one JSON object with, per device:
parameter bytes and KV-cache bytes for a batch and context (exact), and XLA's memory analysis of the
compiled programs (`jax.jit(...).lower(...).compile().memory_analysis()`): a prefill of the prompt, one
decode step, a copy of the prompt's slots into other rows with --copy-rest of each prompt's own tokens run
over them (prompts sharing a prefix: as many rows per call as generate.COPY_SLOTS allows), and with --train
one optimizer step.

The programs are compiled for N stand-in CPU devices (set below, before jax is imported). XLA's CPU backend
computes bfloat16 matmuls in float32 and counts float32 copies of every weight as temporaries, which a GPU
program does not make; so the temporaries reported are those of the same program in float32 throughout (no
such copies; activations at 4 bytes, an upper bound for a bfloat16 program), and `peak_estimate_gb` adds
them to the exact parameter, cache and optimizer bytes of the requested dtypes.

python benchmarks/capacity.py --preset qwen2-57b-a14b --devices 8 --mesh expert=8 --batch 16 --context 4096
python benchmarks/capacity.py --preset qwen1.5-moe-a2.7b --devices 1 --train --seq-len 4096 --batch 1 \\
    --train-only attention,router,shared_expert
python benchmarks/capacity.py --preset qwen2-57b-a14b --devices 1 --train --seq-len 4096 --batch 1 --lora-rank 16 \\
    --expert-dtype int8
"""

import argparse
import datetime
import json
import math
import os
import sys


def parse_args() -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--preset", help="qwen1.5-moe-a2.7b or qwen2-57b-a14b")
  src.add_argument("--config", help="a Hugging Face config.json")
  ap.add_argument("--devices", type=int, default=8, help="devices in the mesh")
  ap.add_argument("--mesh", help="axis=size pairs (default: all devices on the expert axis)")
  ap.add_argument("--dtype", default="bfloat16", help="parameter / compute dtype for inference")
  ap.add_argument("--batch", type=int, default=16, help="sequences at once")
  ap.add_argument("--context", type=int, default=4096, help="KV-cache length (prompt + new tokens)")
  ap.add_argument("--prompt-len", type=int, default=1024, help="prefill length")
  ap.add_argument("--prefill-rows", type=int, help="prompts per prefill call (default: the whole batch at once)")
  ap.add_argument("--copy-rest", type=int, default=128, help="prompts sharing a prefix: tokens of their own")
  ap.add_argument("--kv-cache-dtype", choices=("auto", "int8"), default="auto",
                  help="auto: --dtype; int8: quantized (the programs then hold an int8 cache too)")
  ap.add_argument("--train", action="store_true", help="also analyse one train step")
  ap.add_argument("--seq-len", type=int, default=4096, help="train: tokens per row")
  ap.add_argument("--param-dtype", default="float32", help="train: master-weight dtype")
  ap.add_argument("--optimizer", default="adamw", help="train: adamw or adafactor")
  ap.add_argument("--remat", default="full", help="train: none, full or dots")
  ap.add_argument("--train-only", help="train: comma-separated parameter groups to train")
  ap.add_argument("--lora-rank", type=int, help="train: LoRA adapters of this rank on every target group instead")
  ap.add_argument("--expert-backend", default="ragged", help="dense, ragged or tokamax")
  ap.add_argument("--expert-dtype", default="auto", choices=("auto", "int8"),
                  help="the routed experts as int8 with float32 scales (--expert-dtype of infer.py, and of train.py "
                  "under LoRA adapters)")
  args = ap.parse_args()
  if args.train and args.expert_dtype == "int8" and args.lora_rank is None:
    ap.error("--train --expert-dtype int8 trains LoRA adapters over the int8 experts: add --lora-rank")
  if args.prefill_rows is not None and not (0 < args.prefill_rows and args.batch % args.prefill_rows == 0):
    ap.error(f"--prefill-rows must divide --batch {args.batch}, got {args.prefill_rows}")
  return args


ARGS = parse_args()
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from qwen_moe_jax import checkpoint, decoding, generate, sharding, training  # noqa: E402
from qwen_moe_jax.config import PRESETS, QwenMoeConfig  # noqa: E402
from qwen_moe_jax.errors import UserError  # noqa: E402
from qwen_moe_jax.kernels import Kernels  # noqa: E402
from qwen_moe_jax.kv_cache import KVCache  # noqa: E402
from qwen_moe_jax.lora import LoraConfig  # noqa: E402
from qwen_moe_jax.model import abstract_model  # noqa: E402
from qwen_moe_jax.sampling import RowSampling, Sampling, SamplingOps  # noqa: E402

KERNELS = Kernels(experts=ARGS.expert_backend, expert_dtype=ARGS.expert_dtype)
GB = 1e9


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def abstract_params(cfg: QwenMoeConfig, mesh, dtype, lora: LoraConfig | None = None) -> tuple[nnx.GraphDef, dict]:
  """(graphdef, {path: ShapeDtypeStruct with its sharding}) of the model (with `lora`'s adapters) on `mesh`."""
  graphdef, abstract = abstract_model(cfg, dtype, sharding.expert_shards(mesh), KERNELS, lora)
  flat = checkpoint.flatten(abstract)  # int8 experts and their scales keep their dtypes
  wanted = checkpoint.wanted_params(abstract, mesh, dtype)
  return graphdef, {k: v.update(dtype=flat[k].dtype) for k, v in wanted.items()}


def temp_gb(compiled) -> float:
  return round(compiled.memory_analysis().temp_size_in_bytes / GB, 3)


def main() -> None:
  cfg = PRESETS[ARGS.preset] if ARGS.preset else QwenMoeConfig.from_file(ARGS.config)
  mesh = sharding.make_mesh(ARGS.mesh or {"expert": ARGS.devices})
  dtype = jnp.dtype(ARGS.dtype)
  params_gb = per_device_bytes(abstract_params(cfg, mesh, dtype)[1]) / GB
  int8 = ARGS.kv_cache_dtype == "int8"
  cache_dtype = jnp.dtype(jnp.int8) if int8 else dtype
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
  with jax.set_mesh(mesh):
    keys = jax.eval_shape(lambda: decoding.prompt_keys(0, range(ARGS.batch)))

    def empty_state(dtype):  # compiled; its output: abstract arrays with their shardings
      empty = decoding.empty_state.lower(
        keys, i32(4), cfg=cfg, rows=ARGS.batch, cache_len=ARGS.context,
        max_new=generate.bucket(ARGS.context - ARGS.prompt_len), dtype=dtype).compile()
      return sharding.with_shardings(empty.out_info, empty.output_shardings)

    cached = empty_state(cache_dtype)
    kv_gb = per_device_bytes(cached.cache) / GB
  report = {
    "benchmark": "capacity", "config": ARGS.preset or ARGS.config, "devices": ARGS.devices,
    "mesh": dict(mesh.shape), "dtype": ARGS.dtype,
    "parameters": sum(math.prod(s) for s in checkpoint.param_shapes(cfg).values()),
    "param_gb_per_device": round(params_gb, 3),
    "kv_cache": {"batch": ARGS.batch, "context": ARGS.context, "dtype": str(cache_dtype),
                 "gb_per_device": round(kv_gb, 3),
                 "gb_total": round(KVCache.nbytes(cfg, ARGS.batch, ARGS.context, cache_dtype) / GB, 3)},
  }
  graphdef, flat = abstract_params(cfg, mesh, jnp.float32)  # the float32 program: see the module docstring
  abstract = abstract_model(cfg, jnp.float32, sharding.expert_shards(mesh), KERNELS)[1]
  params = nnx.State(checkpoint.unflatten_state(abstract, flat))
  ops = SamplingOps()  # greedy
  with jax.set_mesh(mesh):
    state = cached if int8 else empty_state(jnp.dtype(jnp.float32))  # the float32 program's cache
    rows = ARGS.prefill_rows or ARGS.batch
    targets = (None if rows == ARGS.batch else i32(rows), None)  # every row, or G distinct prompts into G rows
    prefill = decoding.prefill.lower(graphdef, params, state, i32(rows, ARGS.prompt_len), i32(rows), i32(rows),
                                     jax.eval_shape(lambda: decoding.prompt_keys(0, range(rows))),
                                     settings(rows), *targets, ops=ops).compile()
    state = sharding.with_shardings(state, prefill.output_shardings)
    decode = decoding.decode.lower(graphdef, params, state, jax.ShapeDtypeStruct((), bool), steps=1,
                                   ops=ops).compile()
    report["prefill"] = {"prompt_len": ARGS.prompt_len, "rows": rows, "temp_gb": temp_gb(prefill),
                         "peak_estimate_gb": round(params_gb + kv_gb + temp_gb(prefill), 3)}
    report["decode_step"] = {"temp_gb": temp_gb(decode),
                             "peak_estimate_gb": round(params_gb + kv_gb + temp_gb(decode), 3)}
    report["prefix_copy"] = copy_analysis(graphdef, params, state, rows, params_gb + kv_gb)
    if ARGS.train:
      report["train_step"] = train_analysis(cfg, mesh)
  report["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  print(json.dumps(report))


def settings(rows: int) -> RowSampling:
  """Each row's sampling settings, abstract."""
  return jax.eval_shape(lambda: RowSampling.of([Sampling()] * rows))


def copy_analysis(graphdef, params, state, rows: int, fixed_gb: float) -> dict:
  """The programs that copy a prompt's slots into R rows (prefix_slots, then fork): the copy exists twice until
  fork writes it into the cache."""
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
  r = generate.copy_rows(rows, ARGS.prompt_len)
  prompt = i32(r, ARGS.prompt_len)
  slots = decoding.prefix_slots.lower(graphdef, params, state.cache, i32(r), i32(r, ARGS.copy_rest), i32(r),
                                      prompt).compile()
  kv = sharding.with_shardings(slots.out_info, slots.output_shardings)
  fork = decoding.fork.lower(state, i32(r), kv, prompt, i32(r),
                             jax.eval_shape(lambda: decoding.prompt_keys(0, range(r))), settings(r)).compile()
  kv_gb = per_device_bytes(kv) / GB
  return {"rows": r, "slots": ARGS.prompt_len, "rest": ARGS.copy_rest, "copy_gb": round(kv_gb, 3),
          "temp_gb": max(temp_gb(slots), temp_gb(fork)),
          "peak_estimate_gb": round(fixed_gb + kv_gb + max(temp_gb(slots), temp_gb(fork)), 3)}


def train_analysis(cfg: QwenMoeConfig, mesh) -> dict:
  groups = training.parse_groups(ARGS.train_only, "--train-only")
  lora = None if ARGS.lora_rank is None else LoraConfig(ARGS.lora_rank, 2.0 * ARGS.lora_rank,
                                                        int8_experts=ARGS.expert_dtype == "int8")
  tc = training.TrainConfig(batch_size=ARGS.batch, seq_len=ARGS.seq_len, param_dtype=ARGS.param_dtype,
                            optimizer=ARGS.optimizer, remat=ARGS.remat, compute_dtype="float32",
                            train_only=frozenset(groups) if groups else None, lora=lora).validate()
  pdtype = jnp.dtype(tc.param_dtype)

  def split(flat):
    return (checkpoint.unflatten({k: v for k, v in flat.items() if tc.trainable(k)}),
            checkpoint.unflatten({k: v for k, v in flat.items() if not tc.trainable(k)}))

  def program(dtype):
    graphdef, flat = abstract_params(cfg, mesh, dtype, lora)
    trainable, frozen = split(flat)
    tx = training.make_optimizer(tc)
    init = training.compile_init(tx, trainable)
    opt_state = sharding.with_shardings(jax.eval_shape(tx.init, trainable), init.output_shardings)
    return graphdef, trainable, frozen, tx, opt_state

  _, trainable, frozen, _, opt_state = program(pdtype)
  frozen = checkpoint.unflatten({  # held in the compute dtype, int8 experts and their scales as they are (split_params)
    k: x if training.held_as_is(k, x.dtype) else x.update(dtype=jnp.dtype(ARGS.dtype))
    for k, x in checkpoint.flatten(frozen).items()})
  graphdef, trainable32, frozen32, tx, opt32 = program(jnp.float32)
  shape = (1, tc.batch_size, tc.seq_len)
  batch = training.batch_spec(mesh, shape)
  abstract = abstract_model(cfg, jnp.float32, sharding.expert_shards(mesh), KERNELS, lora)[1]
  step = training.make_train_step(graphdef, abstract, tc, tx, cfg.router_aux_loss_coef)
  temp = temp_gb(training.compile_step(step, trainable32, frozen32, opt32, batch))
  held = {"trainable_gb_per_device": per_device_bytes(trainable) / GB,
          "frozen_gb_per_device": per_device_bytes(frozen) / GB,
          "optimizer_state_gb_per_device": per_device_bytes(opt_state) / GB}
  return {"batch": tc.batch_size, "seq_len": tc.seq_len, "param_dtype": tc.param_dtype, "optimizer": tc.optimizer,
          "remat": tc.remat, "train_only": ARGS.train_only, "lora_rank": ARGS.lora_rank,
          "expert_dtype": ARGS.expert_dtype,
          **{k: round(v, 3) for k, v in held.items()},
          "temp_gb": temp, "peak_estimate_gb": round(sum(held.values()) + temp, 3)}


if __name__ == "__main__":
  try:
    main()
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
