"""Peak memory of convert/hf_to_orbax.py on a multi-GB checkpoint: one group at a time, not the whole model.

Builds a synthetic Hugging Face folder with Qwen1.5-MoE-A2.7B widths (random bfloat16 values, one
safetensors shard per decoder layer plus one for the embeddings / norm / head) but only --layers layers,
converts it in a child process and prints one JSON object: the child's peak RSS and wall time, the
checkpoint size on disk, the sizes of the largest layer, group and tensor, and the peak RSS of a child that
only imports the converter. The converter holds one group (a decoder layer, or the embeddings + norm +
lm_head) plus the tensor being copied into it, so expect peak ~ baseline + largest group + largest tensor,
whatever --layers is.

python benchmarks/convert_memory.py [--layers 4] [--workdir DIR] [--seed 0]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

REPO = Path(__file__).resolve().parents[1]
BF16 = np.dtype(ml_dtypes.bfloat16)
CHUNK = 1 << 24  # values generated at a time (64 MiB of float32)
CONFIG = {  # Qwen/Qwen1.5-MoE-A2.7B, transformers v4 style
  "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_act": "silu",
  "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 16,
  "num_key_value_heads": 16, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
  "rope_scaling": None, "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
  "shared_expert_intermediate_size": 5632, "decoder_sparse_step": 1, "mlp_only_layers": [],
  "norm_topk_prob": False, "tie_word_embeddings": False, "use_sliding_window": False, "attention_dropout": 0.0,
  "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "bfloat16",
}


def top_shapes(c: dict) -> dict[str, tuple[int, ...]]:
  return {
    "model.embed_tokens.weight": (c["vocab_size"], c["hidden_size"]),
    "model.norm.weight": (c["hidden_size"],),
    "lm_head.weight": (c["vocab_size"], c["hidden_size"]),
  }


def layer_shapes(c: dict, i: int) -> dict[str, tuple[int, ...]]:
  """Hub-layout tensor shapes of one sparse decoder layer (PyTorch Linear weights are [out, in])."""
  d, f, s, e = c["hidden_size"], c["moe_intermediate_size"], c["shared_expert_intermediate_size"], c["num_experts"]
  kv = c["num_key_value_heads"] * d // c["num_attention_heads"]
  p = f"model.layers.{i}."
  shapes = {
    p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
    p + "self_attn.q_proj.weight": (d, d), p + "self_attn.q_proj.bias": (d,),
    p + "self_attn.k_proj.weight": (kv, d), p + "self_attn.k_proj.bias": (kv,),
    p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.v_proj.bias": (kv,),
    p + "self_attn.o_proj.weight": (d, d),
    p + "mlp.gate.weight": (e, d), p + "mlp.shared_expert_gate.weight": (1, d),
    p + "mlp.shared_expert.gate_proj.weight": (s, d), p + "mlp.shared_expert.up_proj.weight": (s, d),
    p + "mlp.shared_expert.down_proj.weight": (d, s),
  }
  for x in range(e):
    shapes |= {p + f"mlp.experts.{x}.gate_proj.weight": (f, d), p + f"mlp.experts.{x}.up_proj.weight": (f, d),
               p + f"mlp.experts.{x}.down_proj.weight": (d, f)}
  return shapes


def random_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
  """bfloat16 values, generated a chunk at a time so no float32 copy of the whole tensor exists."""
  if name.endswith("norm.weight"):
    return np.ones(shape, BF16)
  out = np.empty(shape, BF16)
  flat = out.reshape(-1)
  for start in range(0, flat.size, CHUNK):
    stop = min(start + CHUNK, flat.size)
    flat[start:stop] = rng.standard_normal(stop - start, dtype=np.float32) * 0.02
  return out


def nbytes(shapes: dict[str, tuple[int, ...]]) -> int:
  return sum(int(np.prod(s)) * BF16.itemsize for s in shapes.values())


def build(folder: Path, layers: int, seed: int) -> dict[str, int]:
  """Writes the synthetic HF folder; returns the sizes of its largest layer, group and tensor."""
  folder.mkdir(parents=True)
  config = dict(CONFIG, num_hidden_layers=layers)
  (folder / "config.json").write_text(json.dumps(config, indent=2))
  rng = np.random.default_rng(seed)
  groups = [top_shapes(config)] + [layer_shapes(config, i) for i in range(layers)]
  weight_map, total = {}, 0
  for n, shapes in enumerate(groups):
    shard = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
    save_file({k: random_tensor(rng, k, s) for k, s in shapes.items()}, str(folder / shard), metadata={"format": "pt"})
    weight_map |= dict.fromkeys(shapes, shard)
    total += nbytes(shapes)
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
  sizes = [nbytes(s) for s in groups]
  return {"largest_layer_bytes": max(sizes[1:]), "largest_group_bytes": max(sizes),
          "largest_tensor_bytes": max(nbytes({k: s}) for g in groups for k, s in g.items())}


def measured(cmd: list[str]) -> tuple[float, int]:
  """Runs cmd in the repository; returns its wall seconds and its own peak RSS in bytes.

  os.wait4 gives this child's rusage alone: getrusage(RUSAGE_CHILDREN) would be the maximum over every child
  waited for, the process that built the input included. The parent stays small, because a child's peak
  counts the memory of the parent it was forked from.
  """
  start = time.perf_counter()
  child = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL)
  _, status, usage = os.wait4(child.pid, 0)
  seconds = time.perf_counter() - start
  child.returncode = os.waitstatus_to_exitcode(status)
  if child.returncode:
    raise subprocess.CalledProcessError(child.returncode, cmd)
  return seconds, usage.ru_maxrss * 1024  # Linux reports KiB


def disk_bytes(folder: Path) -> int:
  return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def machine() -> dict:
  return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
          "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
          **{name: metadata.version(name) for name in ("jax", "orbax-checkpoint", "numpy", "safetensors")}}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--layers", type=int, default=4, help="decoder layers (each ~1.1 GB at bfloat16)")
  ap.add_argument("--workdir", help="where to make the temporary folder for the HF input and the checkpoint")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  if args.workdir:
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
  work = Path(tempfile.mkdtemp(prefix="convert_memory-", dir=args.workdir))
  try:
    hf_dir, out_dir = work / "hf", work / "ckpt"
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # keeps the generator's memory out of this process
      sizes = pool.apply(build, (hf_dir, args.layers, args.seed))
    seconds, peak = measured([sys.executable, "convert/hf_to_orbax.py", str(hf_dir), str(out_dir)])
    _, baseline = measured([sys.executable, "-c", "import jax, qwen_moe_jax.convert; jax.devices('cpu')"])
    print(json.dumps({
      "benchmark": "convert_memory", "layers": args.layers, "checkpoint_bytes": disk_bytes(out_dir),
      "hf_bytes": disk_bytes(hf_dir), **sizes, "peak_rss_bytes": peak, "baseline_rss_bytes": baseline,
      "seconds": round(seconds, 2), "machine": machine(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }))
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
