"""Issue 6's table from one run on one accelerator: this project and transformers, same weights, same prompts.

Stages, in order (A2.7B config, random bf16 weights):
  machine      versions, copy bandwidth (read + write), bf16 matmul rate
  probe        the GPU kernels (tokamax grouped GEMM, cuDNN attention) forward and backward on small inputs
               against the references; one that fails or disagrees is replaced by the XLA path for the run
  hf_train     transformers' fine-tuning step, A2.7B widths with 8 layers (its own random weights; run first,
               before JAX holds the memory)
  hf_*         transformers decode ms/step (batch 1 / ctx 128, batch 64 / ctx 1000), prefill 16 x 1024, and a
               throughput estimate from those (a full 1000 + 1000 run of it takes minutes)
  decode       ours, the same decode rows
  throughput   ours: 1000-token prompts, exactly 1000 new tokens each, as many at once as the memory holds
               (prompt + generated tokens per second; prefill in groups of 16 rows)
  prefill      ours, 16 x 1024 tokens
  grammar      the decode rows with every row under a grammar the size of a 5-field JSON schema's over Qwen2's
               vocabulary (370 states x 278 classes, random): what structured output costs a step
  parity       our kernels vs the reference kernels, and ours vs transformers: logits on 2 prompts (after the
               timed rows, as it compiles two more programs)
  train        ours, the same fine-tuning shape as hf_train (bf16 parameters and moments, no remat)
  fit          full 24-layer fine-tuning on one device with frozen experts: memory held and step temporaries
  lora         full 24-layer LoRA fine-tuning (rank 16 on every target group) on one device: the same figures
  pallas_decode  the Pallas decode-attention kernel (reads only each row's live cache slots) checked against the
               einsum, then the decode rows and the throughput row through it
  kernels      each routed-expert path at 1 to 16384 tokens, and attention at the training shape, timed alone
  int8_cache   the decode rows and the throughput row again with an int8 KV cache (twice the rows fit)
  int8_experts the same with int8 routed experts (a random model's: the speed, not the accuracy)
  qlora        the lora stage over int8 routed experts (train.py --lora-rank 16 --expert-dtype int8)
  qlora_big    the same for Qwen2-57B-A14B on the one device (65.6 GB of int8 experts: does its LoRA step fit?);
               last, so the time budget usually skips it: run it alone with --only qlora_big
  profile      the kernels that take the time in a batch-1 decode and a train step (with --trace)

Each result is one JSON object per line on stdout (and appended to --out). A stage that fails prints its error
and the run goes on; once --budget-s has passed, the remaining stages are skipped.

  python benchmarks/gpu_table.py --out benchmarks/results/gpu_table-h200-DATE.jsonl --trace /tmp/trace
  python benchmarks/gpu_table.py --preset tiny     # float32 smoke run on CPU (tests/test_benchmarks.py)
  python benchmarks/gpu_table.py --only train,fit  # some stages (e.g. to split the run over two calls)
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # transformers shares the device
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from qwen_moe_jax import checkpoint, data, decode_attention, hf_layout, layers, moe, sharding, training  # noqa: E402
from qwen_moe_jax.automaton import STOP, Grammar  # noqa: E402
from qwen_moe_jax.config import PRESETS, QwenMoeConfig  # noqa: E402
from qwen_moe_jax.demo import demo_config  # noqa: E402
from qwen_moe_jax.generate import Generator, cache_bucket  # noqa: E402
from qwen_moe_jax.kernels import Kernels, default_kernels  # noqa: E402
from qwen_moe_jax.kv_cache import KVCache  # noqa: E402
from qwen_moe_jax.lora import LoraConfig  # noqa: E402
from qwen_moe_jax.model import abstract_model, create_model  # noqa: E402
from qwen_moe_jax.sampling import Sampling  # noqa: E402
from qwen_moe_jax.scoring import prompt_logits  # noqa: E402

GB = 1e9
STAGES = ("machine", "hf_train", "parity", "hf_inference", "decode", "throughput", "prefill", "grammar", "profile",
          "train", "fit", "lora", "pallas_decode", "kernels", "int8_cache", "int8_experts", "qlora", "qlora_big")


@dataclasses.dataclass(frozen=True)
class Plan:
  cfg: QwenMoeConfig
  dtype: str
  copy_bytes: int
  decode: tuple[tuple[int, int, int], ...]  # (batch, prompt, new tokens)
  throughput: tuple[int, int, int]  # (prompt, new tokens, prefill rows per call); the batch is what fits
  throughput_batch: int  # used where the device reports no memory limit (CPU)
  prefill: tuple[int, int]  # (batch, prompt)
  train: tuple[int, int, int]  # (layers, batch, seq)
  fit: tuple[int, int]  # (batch, seq) for the full model
  big: QwenMoeConfig  # the qlora_big stage's model


PLANS = {
  "qwen1.5-moe-a2.7b": Plan(PRESETS["qwen1.5-moe-a2.7b"], "bfloat16", 8 << 30, ((1, 128, 64), (64, 1000, 48)),
                            (1000, 1000, 16), 256, (16, 1024), (8, 4, 4096), (1, 4096), PRESETS["qwen2-57b-a14b"]),
  # tiny: the second decode row (100 + 20 tokens) gets a 128-slot cache, the Pallas decode kernel's smallest
  "tiny": Plan(demo_config(vocab_size=512), "float32", 64 << 20, ((1, 16, 20), (4, 100, 20)), (24, 24, 4), 8,
               (4, 32), (2, 2, 64), (1, 64), demo_config(vocab_size=512)),
}


class Run:
  """Emits results and keeps the time budget."""

  def __init__(self, out: str | None, budget_s: float, only: set[str] | None):
    self.out, self.budget_s, self.only, self.start = out, budget_s, only, time.perf_counter()

  def wants(self, name: str) -> bool:
    """Stages outside STAGES (loading transformers' model) run whenever a stage that needs them does."""
    return self.only is None or name in self.only or name not in STAGES

  def emit(self, **record) -> None:
    record["t_s"] = round(time.perf_counter() - self.start, 1)
    line = json.dumps(record)
    print(line, flush=True)
    if self.out:
      with open(self.out, "a") as f:
        f.write(line + "\n")

  def stage(self, name: str, fn, *args, **kwargs):
    """Runs one stage unless left out or the budget is spent; an exception becomes an error record."""
    if not self.wants(name):
      return None
    if time.perf_counter() - self.start > self.budget_s:
      self.emit(stage=name, skipped="time budget spent")
      return None
    try:
      return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001  (a failed stage is a result; the rest still run)
      self.emit(stage=name, error=f"{type(e).__name__}: {e}"[:800])
      return None
    finally:
      gc.collect()


def timed(fn, *args, repeats: int = 5) -> float:
  """Best wall time of fn(*args) (after one warm-up call), outputs awaited."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def machine(run: Run, plan: Plan) -> float:
  """Versions, copy bandwidth and the bf16 matmul rate (returned: the peak for MFU)."""
  import flax
  run.emit(stage="machine", device=jax.devices()[0].device_kind, backend=jax.default_backend(), jax=jax.__version__,
           flax=flax.__version__, platform=platform.platform())
  x = jnp.ones((plan.copy_bytes // 2,), jnp.bfloat16)
  seconds = timed(jax.jit(lambda x: x + jnp.bfloat16(1)), x)
  del x
  n = 8192 if jax.default_backend() == "gpu" else 512
  a = jnp.ones((n, n), jnp.bfloat16)
  rate = 2 * n ** 3 / timed(jax.jit(lambda a: a @ a), a)
  run.emit(stage="machine", copy_TBps=round(2 * plan.copy_bytes / seconds / 1e12, 3),
           matmul_bf16_TFLOPs=round(rate / 1e12, 1))
  return rate


def probe(run: Run, plan: Plan, wanted: Kernels) -> Kernels:
  """Each wanted GPU kernel, forward and backward at the model's widths, against its reference; a kernel that
  raises or disagrees is replaced by the XLA path (and the record says why)."""
  cfg, dtype, rng = plan.cfg, jnp.dtype(plan.dtype), np.random.default_rng(1)
  tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4

  def normal(*shape, scale=1.0):
    return jnp.asarray(rng.normal(0, scale, shape), dtype)

  def check(name: str, fast, reference, args) -> bool:
    try:
      grad = jax.jit(jax.grad(lambda *a: jnp.sum(fast(*a).astype(jnp.float32) ** 2), argnums=tuple(range(len(args)))))
      ref_grad = jax.grad(lambda *a: jnp.sum(reference(*a).astype(jnp.float32) ** 2), argnums=tuple(range(len(args))))
      out, ref = jax.jit(fast)(*args), jax.jit(reference)(*args)
      err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref.astype(jnp.float32))))
      gerr = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r)) / jnp.max(jnp.abs(r.astype(jnp.float32))))
                 for g, r in zip(grad(*args), ref_grad(*args)))
      ok = err < tol and gerr < 5 * tol
      run.emit(stage="probe", kernel=name, ok=ok, out_err_over_scale=err, grad_err_over_scale=gerr)
      return ok
    except Exception as e:  # noqa: BLE001
      run.emit(stage="probe", kernel=name, ok=False, error=f"{type(e).__name__}: {e}"[:800])
      return False

  experts, attention = wanted.experts, wanted.attention
  if experts == "tokamax":
    n, k, e, d, f = 512, cfg.num_experts_per_tok, cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    ids = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(n)]), jnp.int32)
    w = jnp.asarray(rng.random((n, k)), dtype)
    args = (normal(n, d), normal(e, d, 2, f, scale=d ** -0.5), normal(e, f, d, scale=f ** -0.5))
    if not check("tokamax", lambda x, wi, wo: moe.routed_experts(x, ids, w, wi, wo, 0, "tokamax"),
                 lambda x, wi, wo: moe.experts_dense(x.astype(jnp.float32), ids, w.astype(jnp.float32),
                                                 wi.astype(jnp.float32), wo.astype(jnp.float32), 0), args):
      experts = "ragged"
  if attention == "cudnn":
    b, t, nh, kh, hd = 2, 256, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_per_head
    segments = jnp.asarray(np.repeat([[1, 2, 3, 0]], t // 4, axis=1).reshape(1, t).repeat(b, 0), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    args = (normal(b, t, nh, hd), normal(b, t, kh, hd), normal(b, t, kh, hd))
    packed = layers.Mask.self_attention(positions, segments)  # training's packed rows: the mask is passed
    unpacked = layers.Mask.self_attention(positions, jnp.ones_like(segments), packed=False)  # prefill: no mask
    for name, mask in (("cudnn", packed), ("cudnn unpacked", unpacked)):
      if not check(name, lambda q, k, v, mask=mask: layers.attend_fused(q, k, v, mask),
                   lambda q, k, v, mask=mask: layers.attend(*(a.astype(jnp.float32) for a in (q, k, v)), mask),
                   args):
        attention = "xla"
  kernels = Kernels(experts, attention)
  run.emit(stage="probe", wanted=dataclasses.asdict(wanted), using=dataclasses.asdict(kernels))
  return kernels


def flops_per_token(cfg: QwenMoeConfig, seq: int) -> float:
  """Training FLOPs per token: 6 x active matmul parameters + causal attention (the usual MFU convention)."""
  d, hd = cfg.hidden_size, cfg.dim_per_head
  attn = d * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd + cfg.num_attention_heads * hd * d
  active = cfg.vocab_size * d
  for i in range(cfg.num_hidden_layers):
    if cfg.is_moe_layer(i):
      mlp = (3 * d * (cfg.num_experts_per_tok * cfg.moe_intermediate_size + cfg.shared_expert_intermediate_size)
             + d * cfg.num_experts)
    else:
      mlp = 3 * d * cfg.intermediate_size
    active += attn + mlp
  return 6 * active + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * hd * seq / 2


def mfu(tokens_per_s: float, cfg: QwenMoeConfig, seq: int, peak: float | None) -> float | None:
  """Model FLOPs utilisation against the matmul rate measured in this run (None without it)."""
  return round(tokens_per_s * flops_per_token(cfg, seq) / peak, 4) if peak else None


# ---------------------------------------------------------------------------------------------------- transformers

def torch_device():
  import torch
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def hf_model(cfg: QwenMoeConfig, dtype: str, flat: dict[str, jax.Array] | None = None, router_logits: bool = False):
  """transformers' Qwen2MoeForCausalLM on the torch device; with `flat` (our parameters), the same weights.
  `router_logits`: its forward returns them and adds the aux loss to the loss, as our training step does."""
  import torch
  import transformers
  hf_cfg = transformers.Qwen2MoeConfig(**cfg.to_hf_dict(), output_router_logits=router_logits)
  torch_dtype = getattr(torch, dtype)
  default = torch.get_default_dtype()
  torch.set_default_dtype(torch_dtype)
  try:
    with torch.device(torch_device()):
      model = transformers.Qwen2MoeForCausalLM(hf_cfg)
  finally:
    torch.set_default_dtype(default)
  if flat is not None:
    shapes = {k: tuple(v.shape) for k, v in flat.items()}
    host: dict[str, np.ndarray] = {}
    with torch.no_grad():
      for name, p in model.named_parameters():
        b = hf_layout.bind(name, shapes)
        if b.path not in host:
          host.clear()  # one parameter (e.g. one layer's experts) on the host at a time
          host[b.path] = np.asarray(jax.device_get(flat[b.path]))
        value = np.ascontiguousarray(hf_layout.hf_tensor(cfg, b, host[b.path]))
        src = torch.from_numpy(value.view(np.uint16)).view(torch.bfloat16) if value.dtype.name == "bfloat16" \
            else torch.from_numpy(value)
        p.copy_(src.to(p.device, p.dtype))
  return model.eval()


def hf_sync():
  import torch
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def hf_free():
  import torch
  gc.collect()
  if torch.cuda.is_available():
    torch.cuda.empty_cache()


def hf_train(run: Run, plan: Plan, peak: float | None) -> None:
  import torch
  layers, batch, seq = plan.train
  cfg = dataclasses.replace(plan.cfg, num_hidden_layers=layers)
  model = hf_model(cfg, plan.dtype, router_logits=True).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=torch.cuda.is_available())
  ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=torch_device())
  for i in range(5):
    if i == 2:
      hf_sync()
      t = time.perf_counter()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
  hf_sync()
  tps = batch * seq * 3 / (time.perf_counter() - t)
  memory = torch.cuda.max_memory_allocated() / GB if torch.cuda.is_available() else None
  run.emit(stage="hf_train", impl="transformers", layers=layers, batch=batch, seq=seq, remat=False,
           tokens_per_s=round(tps, 1), mfu=mfu(tps, cfg, seq, peak), peak_memory_gb=memory,
           aux_loss=float(out.aux_loss.detach()) if getattr(out, "aux_loss", None) is not None else None,
           experts_implementation=getattr(model.config, "_experts_implementation", None))
  del model, opt, out
  hf_free()


def hf_inference(run: Run, plan: Plan, model, prompts: dict) -> None:
  """transformers' decode rows (per-step time from two generate lengths, as in DESIGN.md) and prefill."""
  import torch
  dev = torch_device()
  steps = {}
  for batch, prompt, _ in plan.decode:
    ids = torch.tensor(prompts[(batch, prompt)], device=dev)
    times = {}
    with torch.no_grad():
      for n in (4, 8, 40):  # 4: warm-up
        hf_sync()
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False)
        hf_sync()
        times[n] = time.perf_counter() - t
        assert out.shape[1] == prompt + n, out.shape
    steps[(batch, prompt)] = (times[40] - times[8]) / 32
    run.emit(stage="hf_decode", impl="transformers", batch=batch, ctx=prompt,
             ms_per_step=round(1e3 * steps[(batch, prompt)], 2))
  batch, prompt = plan.prefill
  ids = torch.tensor(prompts[(batch, prompt)], device=dev)
  with torch.no_grad():
    model(ids, logits_to_keep=1)
    hf_sync()
    t = time.perf_counter()
    for _ in range(3):
      model(ids, logits_to_keep=1)
    hf_sync()
  prefill_tps = batch * prompt * 3 / (time.perf_counter() - t)
  run.emit(stage="hf_prefill", impl="transformers", batch=batch, prompt=prompt, tokens_per_s=round(prefill_tps, 1))
  big = plan.decode[-1]
  prompt_len, new, _ = plan.throughput
  seconds = big[0] * prompt_len / prefill_tps + new * steps[big[:2]]
  run.emit(stage="hf_throughput", impl="transformers", estimate=True, batch=big[0],
           tokens_per_s=round(big[0] * (prompt_len + new) / seconds, 1),
           how=f"batch {big[0]}: prefill at the measured rate + {new} steps at the batch-{big[0]} ctx-{big[1]} step")


# ---------------------------------------------------------------------------------------------------- this project

def hf_logits(hf, prompts: list[list[int]]) -> np.ndarray:
  """transformers' fp32 logits [P, T, V] at every position of each prompt."""
  import torch
  with torch.no_grad():
    return np.stack([hf(torch.tensor([p], device=torch_device())).logits[0].float().cpu().numpy() for p in prompts])


def parity(run: Run, plan: Plan, kernels: Kernels, model, theirs: np.ndarray | None, prompts: list[list[int]]) -> None:
  """Logits of our kernels vs the reference kernels, and vs transformers' (`theirs`), on the same prompts."""
  ours = np.stack([prompt_logits(model, p) for p in prompts])
  reference_kernels = Kernels(experts="dense" if jax.default_backend() == "cpu" else "ragged", attention="xla")
  graphdef, _ = abstract_model(plan.cfg, jnp.dtype(plan.dtype), 1, reference_kernels)
  reference = nnx.merge(graphdef, nnx.state(model))  # the same arrays, run by the reference kernels
  ref = np.stack([prompt_logits(reference, p) for p in prompts])

  def compare(a, b):
    return {"max_abs_diff_over_scale": float(np.abs(a - b).max() / np.abs(b).max()),
            "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).mean())}

  run.emit(stage="parity", what="our kernels vs reference kernels", kernels=dataclasses.asdict(kernels),
           reference=dataclasses.asdict(reference_kernels), **compare(ours, ref))
  if theirs is not None:
    run.emit(stage="parity", what="ours vs transformers, same weights", dtype=plan.dtype, **compare(ours, theirs))


def our_decode(run: Run, plan: Plan, gen: Generator, prompts: dict, stage: str = "decode") -> None:
  for batch, prompt, new in plan.decode:
    ids = prompts[(batch, prompt)]
    first = gen.generate(ids, new)
    r = gen.generate(ids, new)
    assert all(len(o) == new for o in r.output_ids)
    run.emit(stage=stage, impl="ours", batch=batch, ctx=prompt, new_tokens=new,
             ms_per_step=round(1e3 * r.decode_seconds / (new - 1), 3), cache_len=cache_bucket(prompt + new),
             kv_cache_dtype=str(gen.cache_dtype), compile_s=round(first.compile_seconds, 1))


def grammar_decode(run: Run, plan: Plan, gen: Generator, prompts: dict) -> None:
  """The decode rows with every row following a random grammar of a JSON schema's size (370 states x 278 classes,
  about 70% of the classes allowed in each state, none accepting: the rows run all their steps), against
  `decode`'s: the per-step cost of the mask and the state update (a [rows, V] gather)."""
  r = np.random.default_rng(3)
  states, classes = 370, 278
  table = np.where(r.random((states, classes)) < 0.7, r.integers(0, states, (states, classes)), -1).astype(np.int32)
  table[:, :STOP + 1] = -1
  grammar = Grammar(r.integers(STOP + 1, classes, plan.cfg.vocab_size).astype(np.int32), table, 0, "random")
  for batch, prompt, new in plan.decode:
    ids, settings = prompts[(batch, prompt)], Sampling(grammar=grammar)
    first = gen.generate(ids, new, settings, stop_ids=[0])
    got = gen.generate(ids, new, settings, stop_ids=[0])
    assert all(len(o) == new for o in got.output_ids)
    run.emit(stage="grammar", impl="ours", batch=batch, ctx=prompt, new_tokens=new,
             ms_per_step=round(1e3 * got.decode_seconds / (new - 1), 3), grammar_cells=grammar.cells,
             compile_s=round(first.compile_seconds, 1))


def fitting_batch(plan: Plan, flat: dict, step: int, cache_dtype: jnp.dtype) -> int:
  """Rows of (prompt + new) cache that fit in what the device has left after the weights, a multiple of `step`."""
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" not in stats:
    return plan.throughput_batch
  prompt, new, _ = plan.throughput
  per_row = KVCache.nbytes(plan.cfg, 1, cache_bucket(prompt + new), cache_dtype)
  weights = sum(x.nbytes for x in flat.values())
  free = stats["bytes_limit"] * 0.95 - weights  # 5%: prefill and sampling temporaries
  return max(step, int(free // per_row) // step * step)


def our_throughput(run: Run, plan: Plan, model, flat: dict, rng, kv_cache_dtype: str = "auto",
                   stage: str = "throughput") -> None:
  prompt, new, rows = plan.throughput
  gen = Generator(model, prefill_rows=rows, kv_cache_dtype=kv_cache_dtype)
  batch = fitting_batch(plan, flat, rows, gen.cache_dtype)
  while True:
    ids = rng.integers(0, plan.cfg.vocab_size, (batch, prompt)).tolist()
    try:
      r = gen.generate(ids, new)
      break
    except Exception as e:  # out of device memory: record it and try half the rows
      if batch <= rows or not any(m in str(e) for m in ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory")):
        raise
      run.emit(stage=stage, batch=batch, error=f"{type(e).__name__}: {e}"[:300], retry_batch=batch // 2)
      batch //= 2
  assert all(len(o) == new for o in r.output_ids)
  seconds = r.prefill_seconds + r.decode_seconds
  run.emit(stage=stage, impl="ours", batch=batch, prompt=prompt, new_tokens=new, kv_cache_dtype=str(gen.cache_dtype),
           tokens_per_s=round(batch * (prompt + new) / seconds, 1), seconds=round(seconds, 2),
           prefill_s=round(r.prefill_seconds, 2), prefill_tokens_per_s=round(batch * prompt / r.prefill_seconds, 1),
           decode_ms_per_step=round(1e3 * r.decode_seconds / (new - 1), 2), compile_s=round(r.compile_seconds, 1),
           kv_cache_gb=round(KVCache.nbytes(plan.cfg, batch, cache_bucket(prompt + new), gen.cache_dtype) / GB, 1))


def our_prefill(run: Run, plan: Plan, gen: Generator, prompts: dict) -> None:
  batch, prompt = plan.prefill
  ids = prompts[(batch, prompt)]
  first = gen.generate(ids, 1)
  best = min(gen.generate(ids, 1).prefill_seconds for _ in range(3))
  run.emit(stage="prefill", impl="ours", batch=batch, prompt=prompt, tokens_per_s=round(batch * prompt / best, 1),
           compile_s=round(first.compile_seconds, 1))


def synthetic_batch(cfg: QwenMoeConfig, batch: int, seq: int, rng) -> dict[str, np.ndarray]:
  """Packed rows of random documents (1/8 to 1 of seq long), as train.py builds them: arrays [1, B, T]."""
  docs = []
  while sum(len(d.tokens) for d in docs) < 2 * batch * seq:
    n = int(rng.integers(seq // 8, seq + 1))
    docs.append(data.Document(tuple(rng.integers(0, cfg.vocab_size, n).tolist()), (0,) + (1,) * (n - 1)))
  rows = data.BatchStream(data.Documents.of(docs), seq, batch, seed=0).batch(0)
  return {k: rows[k][None] for k in data.FIELDS}


def our_train(run: Run, plan: Plan, kernels: Kernels, peak: float | None, stage: str, layers: int, batch: int, seq: int,
              tc: training.TrainConfig, rng, trace: str | None = None) -> None:
  """Fine-tuning steps on a random model: tokens/s, MFU, memory held and the step's temporaries."""
  cfg = dataclasses.replace(plan.cfg, num_hidden_layers=layers)
  mesh = sharding.make_mesh({}, jax.devices()[:1])
  tc = dataclasses.replace(tc, batch_size=batch, seq_len=seq, compute_dtype=plan.dtype).validate()
  pdtype = jnp.dtype(tc.param_dtype)
  if tc.lora is None:
    model = create_model(cfg, mesh, pdtype, kernels)
  else:  # frozen weights in the compute dtype, new adapters in the parameter dtype
    model = training.with_adapters(create_model(cfg, mesh, jnp.dtype(plan.dtype), kernels), None, tc.lora, mesh,
                                   pdtype, kernels)
  trainable, frozen = training.split_params(model, tc)
  del model
  graphdef, abstract = abstract_model(cfg, pdtype, 1, kernels, tc.lora)
  tx = training.make_optimizer(tc)
  with jax.set_mesh(mesh):
    opt_state = training.compile_init(tx, trainable)(trainable)
    host = synthetic_batch(cfg, batch, seq, rng)
    t = time.perf_counter()
    step = training.compile_step(training.make_train_step(graphdef, abstract, tc, tx, cfg.router_aux_loss_coef),
                                 trainable, frozen, opt_state, training.batch_spec(mesh, host["tokens"].shape))
    compile_s = time.perf_counter() - t
    device_batch = training.device_batch(host, mesh)
    held = sum(x.nbytes for x in jax.tree.leaves((trainable, frozen, opt_state)))
    times = []
    for _ in range(4):
      t = time.perf_counter()
      trainable, opt_state, m = step(trainable, frozen, opt_state, device_batch)
      jax.block_until_ready(m.loss)
      times.append(time.perf_counter() - t)
    if trace:
      with jax.profiler.trace(trace, create_perfetto_trace=True):
        trainable, opt_state, m = step(trainable, frozen, opt_state, device_batch)
        jax.block_until_ready(m.loss)
  seconds = min(times[1:])
  tps = float(m.tokens) / seconds
  run.emit(stage=stage, impl="ours", layers=layers, batch=batch, seq=seq, param_dtype=tc.param_dtype,
           optimizer=tc.optimizer, remat=tc.remat, train_only=sorted(tc.train_only) if tc.train_only else None,
           freeze=sorted(tc.freeze) if tc.freeze else None, lora=tc.lora and tc.lora.to_dict(),
           tokens_per_s=round(tps, 1),
           mfu=mfu(tps, cfg, seq, peak), loss=round(float(m.loss), 4),
           held_gb=round(held / GB, 2), step_temp_gb=round(step.memory_analysis().temp_size_in_bytes / GB, 2),
           compile_s=round(compile_s, 1), kernels=dataclasses.asdict(kernels))


def kernel_times(run: Run, plan: Plan, kernels: Kernels) -> None:
  """The routed-expert kernels at decode to training row counts, and attention at the training shape (forward +
  backward), each timed alone: which one to pick where (e.g. the gathered path's row threshold on this device)."""
  cfg, dtype, rng = plan.cfg, jnp.dtype(plan.dtype), np.random.default_rng(2)
  k, e, d, f = cfg.num_experts_per_tok, cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
  wi = jnp.asarray(rng.normal(0, d ** -0.5, (e, d, 2, f)), dtype)
  wo = jnp.asarray(rng.normal(0, f ** -0.5, (e, f, d)), dtype)
  grouped = moe.tokamax_ragged_dot() if kernels.experts == "tokamax" else jax.lax.ragged_dot
  paths = {"gathered": moe.experts_gathered, kernels.experts: functools.partial(moe.experts_sorted, ragged_dot=grouped),
           "dense": moe.experts_dense}
  on_gpu = jax.default_backend() == "gpu"
  for n in (1, 16, 64, 256, 4096, 16384) if on_gpu else (1, 16, 64):
    x = jnp.asarray(rng.normal(size=(n, d)), dtype)
    ids = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(n)]), jnp.int32)
    w = jnp.asarray(rng.random((n, k)), dtype)
    for name, fn in paths.items():
      if (name == "gathered" and n > 256) or (name == "dense" and n > 64):
        continue
      seconds = timed(jax.jit(lambda x, ids, w, wi, wo, fn=fn: fn(x, ids, w, wi, wo, 0)), x, ids, w, wi, wo)
      touched = len(np.unique(np.asarray(ids)))
      touched_bytes = touched * (wi.nbytes + wo.nbytes) / e
      run.emit(stage="kernels", what="routed experts", path=name, tokens=n, ms=round(1e3 * seconds, 4),
               touched_experts=touched, touched_weight_GBps=round(touched_bytes / seconds / GB, 1),
               TFLOPs=round(2 * 3 * n * k * d * f / seconds / 1e12, 2))
  b, t = plan.train[1:]
  q, kk, v = (jnp.asarray(rng.normal(size=(b, t, heads, cfg.dim_per_head)), dtype)
              for heads in (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_key_value_heads))
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  segments = jnp.ones((b, t), jnp.int32)
  mask = layers.Mask.self_attention(positions, segments)
  for name, fn in {"xla": layers.attend, "cudnn": layers.attend_fused}.items():
    if name == "cudnn" and kernels.attention != "cudnn":
      continue
    step = jax.jit(jax.grad(lambda q, kk, v, fn=fn: jnp.sum(fn(q, kk, v, mask).astype(jnp.float32)), argnums=(0, 1, 2)))
    seconds = timed(step, q, kk, v, repeats=3)
    flops = 3 * 4 * b * cfg.num_attention_heads * t * t * cfg.dim_per_head / 2  # causal, forward + backward
    run.emit(stage="kernels", what="attention forward + backward", path=name, batch=b, seq=t,
             ms=round(1e3 * seconds, 3), TFLOPs=round(flops / seconds / 1e12, 1))


def top_ops(run: Run, what: str, folder: str, n: int = 20) -> None:
  """The ops that took the most time in the perfetto trace under `folder`, with the trace line (thread) they ran
  on: on a GPU its kernels (stream lines) and XLA ops; on a CPU the XLA ops (the Python thread is left out)."""
  found = sorted(glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True))
  if not found:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {folder}")
  with gzip.open(found[-1]) as f:
    events = json.load(f)
  events = events.get("traceEvents", events) if isinstance(events, dict) else events
  processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  devices = {pid for pid, name in processes.items() if "/device:" in name}
  total: dict[tuple[str, str], float] = defaultdict(float)
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    thread = threads.get((e["pid"], e.get("tid")), "?")
    if (e["pid"] in devices) if devices else thread != "python":
      total[(thread, str(e.get("name")))] += float(e["dur"])
  top = sorted(total.items(), key=lambda kv: -kv[1])[:n]
  run.emit(stage="profile", what=what, top_ops_ms=[[thread[:40], name[:120], round(us / 1e3, 3)]
                                                   for (thread, name), us in top])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="qwen1.5-moe-a2.7b", choices=sorted(PLANS))
  ap.add_argument("--out", help="also append the JSON lines to this file")
  ap.add_argument("--budget-s", type=float, default=480, help="skip the stages that would start after this")
  ap.add_argument("--trace", help="folder for profiler traces (a batch-1 decode and one train step)")
  ap.add_argument("--only", help=f"comma-separated stages to run (of {', '.join(STAGES)})")
  ap.add_argument("--experts", help="expert kernel to probe and use (default: the backend's best)")
  ap.add_argument("--attention", help="attention kernel to probe and use (default: the backend's best)")
  args = ap.parse_args()
  only = set(args.only.split(",")) if args.only else None
  if only and only - set(STAGES):
    ap.error(f"--only: unknown stage(s) {sorted(only - set(STAGES))}")
  plan = PLANS[args.preset]
  run = Run(args.out, args.budget_s, only)
  rng = np.random.default_rng(0)
  peak = run.stage("machine", machine, run, plan)  # None when not run: no MFU
  kernels = probe(run, plan, default_kernels(args.experts, args.attention))
  run.stage("hf_train", hf_train, run, plan, peak)

  if any(run.wants(s) for s in ("parity", "hf_inference", "decode", "throughput", "prefill", "grammar", "profile")):
    mesh = sharding.make_mesh({}, jax.devices()[:1])
    model = create_model(plan.cfg, mesh, jnp.dtype(plan.dtype), kernels, seed=0)
    flat = checkpoint.flatten(nnx.state(model, nnx.Param))
    prompts = {(b, p): rng.integers(0, plan.cfg.vocab_size, (b, p)).tolist()
               for b, p in [d[:2] for d in plan.decode] + [plan.prefill]}
    parity_prompts = [p[:64] for p in prompts[plan.decode[-1][:2]][:2]]
    hf, theirs = None, None
    if run.wants("parity") or run.wants("hf_inference"):
      hf = run.stage("hf_load", hf_model, plan.cfg, plan.dtype, flat)
    if hf is not None:
      theirs = run.stage("parity", hf_logits, hf, parity_prompts)
      run.stage("hf_inference", hf_inference, run, plan, hf, prompts)
      del hf
      hf_free()
    gen = Generator(model)
    run.stage("decode", our_decode, run, plan, gen, prompts)
    run.stage("throughput", our_throughput, run, plan, model, flat, rng)
    run.stage("prefill", our_prefill, run, plan, gen, prompts)
    run.stage("grammar", grammar_decode, run, plan, gen, prompts)
    run.stage("parity", parity, run, plan, kernels, model, theirs, parity_prompts)  # two more compiles: after the rows
    if args.trace:
      run.stage("profile", trace_decode, run, gen, prompts[plan.decode[0][:2]], args.trace)
    del gen, model, flat
    gc.collect()

  layers, batch, seq = plan.train
  lean = training.TrainConfig(param_dtype="bfloat16", moments_dtype="bfloat16", remat="none")
  train_trace = os.path.join(args.trace, "train") if args.trace and run.wants("profile") else None
  run.stage("train", our_train, run, plan, kernels, peak, "train", layers, batch, seq, lean, rng, train_trace)
  if train_trace and run.wants("train"):
    run.stage("profile", top_ops, run, "train step", train_trace)
  frozen_experts = training.TrainConfig(freeze=frozenset({"experts"}), remat="full")
  run.stage("fit", our_train, run, plan, kernels, peak, "fit", plan.cfg.num_hidden_layers, *plan.fit,
            frozen_experts, rng)
  run.stage("lora", our_train, run, plan, kernels, peak, "lora", plan.cfg.num_hidden_layers, *plan.fit,
            training.TrainConfig(lora=LoraConfig(16, 32.0), remat="full"), rng)
  run.stage("pallas_decode", pallas_decode, run, plan, kernels, rng)
  run.stage("kernels", kernel_times, run, plan, kernels)
  run.stage("int8_cache", variant, run, plan, kernels, rng, "int8_cache", "int8")
  int8 = dataclasses.replace(kernels, expert_dtype="int8")
  run.stage("int8_experts", variant, run, plan, int8, rng, "int8_experts")
  qlora = training.TrainConfig(lora=LoraConfig(16, 32.0, int8_experts=True), remat="full")
  run.stage("qlora", our_train, run, plan, int8, peak, "qlora", plan.cfg.num_hidden_layers, *plan.fit, qlora, rng)
  big = dataclasses.replace(plan, cfg=plan.big)
  run.stage("qlora_big", our_train, run, big, int8, peak, "qlora_big", big.cfg.num_hidden_layers, *plan.fit, qlora,
            rng)
  run.emit(stage="done")


def variant(run: Run, plan: Plan, kernels: Kernels, rng, stage: str, kv_cache_dtype: str = "auto") -> None:
  """The decode rows and the throughput row again with other kernels or cache (after the table's rows, which
  they are compared with)."""
  model = create_model(plan.cfg, sharding.make_mesh({}, jax.devices()[:1]), jnp.dtype(plan.dtype), kernels, seed=0)
  prompts = {(b, p): rng.integers(0, plan.cfg.vocab_size, (b, p)).tolist() for b, p, _ in plan.decode}
  our_decode(run, plan, Generator(model, kv_cache_dtype=kv_cache_dtype), prompts, stage=stage)
  flat = checkpoint.flatten(nnx.state(model, nnx.Param))
  our_throughput(run, plan, model, flat, rng, kv_cache_dtype, stage=stage)


def pallas_decode(run: Run, plan: Plan, kernels: Kernels, rng) -> None:
  """The decode kernel against the einsum on one cache (rows at 1 to all slots), then, if it agrees, the decode
  rows and the throughput row through it (after the table's rows: it compares with `decode` / `throughput`)."""
  cfg, dtype = plan.cfg, jnp.dtype(plan.dtype)
  slots, r = 1024, np.random.default_rng(2)
  q = jnp.asarray(r.normal(size=(4, cfg.num_attention_heads, cfg.dim_per_head)), dtype)
  k, v = (jnp.asarray(r.normal(size=(4, cfg.num_key_value_heads, slots, cfg.dim_per_head)), dtype) for _ in "kv")
  positions = jnp.asarray([0, 100, 700, slots - 1], jnp.int32)
  got = jax.jit(decode_attention.attend)(q, k, v, positions + 1).astype(jnp.float32)
  mask = layers.Mask.over_cache(positions[:, None], slots)
  want = layers.attend(*(x.astype(jnp.float32) for x in (q[:, None], k, v)), mask, kv_layout="BKSH")[:, 0]
  err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
  ok = err < (2e-2 if dtype == jnp.bfloat16 else 1e-4)
  run.emit(stage="probe", kernel="pallas decode", ok=ok, out_err_over_scale=err)
  if not ok:
    return
  variant(run, plan, dataclasses.replace(kernels, decode="pallas"), rng, "pallas_decode")


def trace_decode(run: Run, gen: Generator, prompt: list[list[int]], folder: str) -> None:
  folder = os.path.join(folder, "decode")
  gen.generate(prompt, 33)  # compiled already for this shape; warm
  with jax.profiler.trace(folder, create_perfetto_trace=True):
    gen.generate(prompt, 33)
  top_ops(run, "batch-1 decode, 32 steps", folder)


if __name__ == "__main__":
  main()
