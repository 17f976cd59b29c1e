"""Peak memory of convert/hf_to_orbax.py on a multi-GB checkpoint (one group at a time, not the whole model), and
the time and memory of restoring the model from the converted checkpoint and from the HF folder read in place.

Builds a synthetic Hugging Face folder with Qwen1.5-MoE-A2.7B widths (random bfloat16 values, one
safetensors shard per decoder layer plus one for the embeddings / norm / head) but only --layers layers,
converts it in a child process and prints one JSON object: the child's peak RSS and wall time, the
checkpoint size on disk, the sizes of the largest layer, group and tensor, and the peak RSS of a child that
only imports the converter. The converter holds one group (a decoder layer, or the embeddings + norm +
lm_head) plus the tensor being copied into it, so expect peak ~ baseline + largest group + largest tensor,
whatever --layers is. The restores (`checkpoint.restore` in bfloat16 onto the CPU, so the restored model itself is
in the peak) each run in a fresh child, --restores times each, alternating, both folders as warm in the page cache
as the writes and the earlier restores left them.

python benchmarks/convert_memory.py [--layers 4] [--workdir DIR] [--seed 0] [--restores 2]
"""

from __future__ import annotations

import argparse
import dataclasses
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

REPO = Path(__file__).resolve().parents[1]
BF16 = np.dtype(ml_dtypes.bfloat16)
CHUNK = 1 << 24  # values generated at a time (64 MiB of float32)


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


def build(folder: Path, layers: int, seed: int) -> dict[str, int]:
  """Writes the synthetic HF folder through the converter's own table; returns its largest layer, group, tensor."""
  from qwen_moe_jax import checkpoint, convert
  from qwen_moe_jax.config import PRESETS

  folder.mkdir(parents=True)
  cfg = dataclasses.replace(PRESETS["qwen1.5-moe-a2.7b"], num_hidden_layers=layers)
  (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
  rng = np.random.default_rng(seed)
  shapes = checkpoint.param_shapes(cfg)
  sizes: dict[str, list[int]] = {}  # group -> tensor sizes in bytes

  def tensors(group: str, bindings: list) -> dict[str, np.ndarray]:
    made = {b.hf: random_tensor(rng, b.hf, b.hf_shape(cfg, shapes)) for b in bindings}
    sizes[group] = [t.nbytes for t in made.values()]
    return made

  convert.write_hub_shards(folder, cfg, tensors)
  layer_sizes = [sum(v) for g, v in sizes.items() if g != "top"]
  return {"largest_layer_bytes": max(layer_sizes), "largest_group_bytes": max(sum(v) for v in sizes.values()),
          "largest_tensor_bytes": max(max(v) for v in sizes.values())}


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
  ap.add_argument("--restores", type=int, default=2, help="times each restore runs (alternating)")
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
    restore = "import sys; from qwen_moe_jax import checkpoint; checkpoint.restore(sys.argv[1])"
    runs: dict[str, list[tuple[float, int]]] = {"orbax": [], "hf_in_place": []}
    for _ in range(args.restores):  # alternating, so neither is always the one the page cache favours
      for name, folder in (("orbax", out_dir), ("hf_in_place", hf_dir)):
        runs[name].append(measured([sys.executable, "-c", restore, str(folder)]))
    restores = {}
    for name, got in runs.items():
      restores |= {f"restore_{name}_seconds": [round(t, 2) for t, _ in got],
                   f"restore_{name}_peak_rss_bytes": max(peak for _, peak in got)}
    print(json.dumps({
      "benchmark": "convert_memory", "layers": args.layers, "checkpoint_bytes": disk_bytes(out_dir),
      "hf_bytes": disk_bytes(hf_dir), **sizes, "peak_rss_bytes": peak, "baseline_rss_bytes": baseline,
      "seconds": round(seconds, 2), **restores, "machine": machine(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }))
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
