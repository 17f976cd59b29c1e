"""Safe reading and writing of Hugging Face model folders (config, safetensors shards, tokenizer files).

Reading refuses pickle checkpoints, shard paths that leave the folder (`../`, absolute paths, symlinks out, save
the Hugging Face cache's links from a snapshot into its own repo's blobs), tensors listed in the index but missing
from their shard (or the reverse), and truncated or corrupt files. A folder may be named by its repo id once the
Hugging Face cache holds it (`model_folder`).
Writing goes to a staging folder inside the output folder, moved into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from qwen_moe_jax.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype tags of the floating-point tensors a checkpoint may hold
DTYPES = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
          "F64": np.dtype(np.float64)}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Copied beside the weights so a checkpoint folder is self-contained.
SIDE_FILES = (
  "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
  "special_tokens_map.json", "added_tokens.json",
)
REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")  # "Qwen/Qwen1.5-MoE-A2.7B-Chat"


def model_folder(name: str) -> Path:
  """The folder `name` names: a path, or a Hugging Face repo id whose snapshot the local Hugging Face cache holds
  (`hf download REPO` puts it there; nothing is downloaded here)."""
  path = Path(name)
  if path.exists() or not REPO_ID.fullmatch(name):
    return path
  try:
    return Path(snapshot_download(name, local_files_only=True))
  except HFValidationError:  # not a valid repo id ("runs/a--b"): a path, which does not exist
    return path
  except LocalEntryNotFoundError:
    raise UserError(f"{name}: no such folder, nor a snapshot of that Hugging Face repo in the cache "
                    f"{constants.HF_HUB_CACHE}; download it (`hf download {name}`) or give its folder") from None


def inside(folder: Path, name: str, what: str) -> Path:
  """folder / name, refusing absolute names, `..` and symlinks that resolve outside `folder`, save the Hugging Face
  cache's: a file of <repo>/snapshots/<revision>/ links to <repo>/blobs/<hash>."""
  if not name or os.path.isabs(name) or ".." in Path(name).parts:
    raise UserError(f"{what}: path '{name}' must be a plain relative path inside {folder}")
  path = folder / name
  target, root = path.resolve(), folder.resolve()
  cached = root.parent.name == "snapshots" and target.parent == root.parent.parent / "blobs"
  if not (target.is_relative_to(root) or cached):
    raise UserError(f"{what}: '{name}' resolves to {target}, outside {folder}")
  return path


class SafetensorsReader:
  """Every tensor of an HF folder, read one at a time. `names()` lists them; `read(name)` loads one. The
  folder holds `index` and the shards it lists, or the one file `single` (a peft adapter: no index)."""

  def __init__(self, folder: str | Path, single: str = SINGLE_FILE, index: str | None = INDEX_FILE):
    self.folder = Path(folder)
    if not self.folder.is_dir():
      raise UserError(f"{self.folder}: not a directory (expected a Hugging Face model folder)")
    self.where: dict[str, Path] = {}  # tensor name -> shard file
    self.info: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}  # tensor name -> dtype, shape, file offset
    if index and (self.folder / index).exists():
      self._read_index(self.folder / index)
    elif (self.folder / single).exists():
      shard = inside(self.folder, single, str(self.folder))
      for name in self._keys(shard):
        self.where[name] = shard
    else:
      pickles = sorted(p.name for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
      if pickles:
        raise UserError(
          f"{self.folder}: only pickle checkpoints found ({', '.join(pickles)}); pickle files can run code "
          f"when loaded and are refused. Save it as safetensors "
          f"(transformers' and peft's save_pretrained(dir) write them) and convert that")
      raise UserError(f"{self.folder}: no {' or '.join(filter(None, (single, index)))}")
    if not self.where:
      raise UserError(f"{self.folder}: the checkpoint holds no tensors")

  def _read_index(self, index: Path) -> None:
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
      assert isinstance(weight_map, dict)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError):
      raise UserError(f"{index}: expected JSON with a 'weight_map' object of tensor name -> shard file") from None
    shards: dict[str, Path] = {}
    for name, shard_name in weight_map.items():
      if not isinstance(shard_name, str):
        raise UserError(f"{index}: shard for '{name}' must be a file name, got {shard_name!r}")
      if shard_name not in shards:
        shards[shard_name] = inside(self.folder, shard_name, str(index))
      self.where[name] = shards[shard_name]
    for shard_name, shard in shards.items():
      listed = {n for n, s in self.where.items() if s == shard}
      present = set(self._keys(shard))
      if present - listed:
        raise UserError(f"{shard}: tensor '{sorted(present - listed)[0]}' is not in {index.name} for this shard")
      if listed - present:
        missing = sorted(listed - present)[0]
        raise UserError(f"{index.name}: tensor '{missing}' is listed in {shard_name} but missing there")

  def _keys(self, shard: Path) -> list[str]:
    """Validates a shard with the safetensors library, then records where each tensor's bytes are."""
    if not shard.is_file():
      raise UserError(f"{shard}: shard file not found")
    try:
      with safe_open(shard, framework="numpy") as f:
        names = list(f.keys())
      with open(shard, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    except (SafetensorError, OSError, ValueError) as e:
      raise UserError(f"{shard}: not a readable safetensors file ({e})") from None
    for name in names:
      dtype, shape, (begin, _) = header[name]["dtype"], tuple(header[name]["shape"]), header[name]["data_offsets"]
      if dtype not in DTYPES:
        raise UserError(f"{shard}: tensor '{name}' has dtype {dtype}; expected one of {', '.join(DTYPES)}")
      self.info[name] = (DTYPES[dtype], shape, 8 + size + begin)
    return names

  def names(self) -> list[str]:
    return list(self.where)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.info[name][1]

  def dtype(self, name: str) -> np.dtype:
    return self.info[name][0]

  def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
    """One tensor as a fresh host numpy array (bfloat16 via ml_dtypes), read straight from the file; with
    `rows` (start, stop), only those rows of its leading axis (contiguous in the file)."""
    dtype, shape, offset = self.info[name]
    if rows:
      offset += rows[0] * int(np.prod(shape[1:])) * dtype.itemsize
      shape = (rows[1] - rows[0], *shape[1:])
    count = int(np.prod(shape))
    try:
      x = np.fromfile(self.where[name], dtype, count, offset=offset)
    except (OSError, ValueError) as e:
      raise UserError(f"{self.where[name]}: cannot read tensor '{name}' ({e})") from None
    if x.size != count:
      raise UserError(f"{self.where[name]}: tensor '{name}' is truncated ({x.size} of {count} values)")
    return x.reshape(shape)


def read_config(folder: str | Path) -> dict:
  path = Path(folder) / "config.json"
  try:
    d = json.loads(inside(Path(folder), "config.json", str(folder)).read_text())
  except (FileNotFoundError, NotADirectoryError):
    raise UserError(f"{path}: not found (a Hugging Face model folder needs config.json)") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: not valid JSON ({e})") from None
  except OSError as e:
    raise UserError(f"{path}: cannot read ({e.strerror})") from None
  if not isinstance(d, dict):
    raise UserError(f"{path}: expected a JSON object")
  return d


def copy_side_files(src: Path, dst: Path) -> list[str]:
  """Copies tokenizer / generation files that exist in src (regular files inside src only)."""
  copied = []
  for name in SIDE_FILES:
    path = src / name
    if path.is_file():
      shutil.copyfile(inside(src, name, str(src)), dst / name)
      copied.append(name)
  return copied


@contextlib.contextmanager
def staged_output(out_dir: str | Path, force: bool, protect: tuple[Path, ...] = ()) -> Iterator[Path]:
  """Yields an empty staging folder inside out_dir; on success its contents replace out_dir's.

  A non-empty out_dir needs `force`. If the body fails, out_dir keeps what it had (or is removed again if this
  call created it) and staging is removed. `protect`: input folders that out_dir must not be or contain
  (replacing it would delete them).
  """
  out = Path(out_dir)
  for p in protect:
    if out.resolve() == p.resolve() or p.resolve().is_relative_to(out.resolve()):
      raise UserError(f"{out}: output folder must not be (or contain) the input folder {p}")
  if out.exists() and not out.is_dir():
    raise UserError(f"{out}: exists and is not a directory")
  if out.is_dir() and any(out.iterdir()) and not force:
    raise UserError(f"{out}: exists and is not empty (pass --force to replace its contents)")
  created = not out.exists()
  out.mkdir(parents=True, exist_ok=True)
  staging = out / f".staging-{os.getpid()}"
  shutil.rmtree(staging, ignore_errors=True)
  staging.mkdir()
  try:
    yield staging
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    if created:
      out.rmdir()
    raise
  for old in out.iterdir():
    if old != staging:
      shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
  for new in staging.iterdir():
    new.rename(out / new.name)
  staging.rmdir()


def write_shard(path: Path, tensors: dict[str, np.ndarray]) -> None:
  """One safetensors shard with the metadata transformers expects of PyTorch checkpoints, readable like any file
  this process writes (safetensors leaves it 0600, which a server running as another user cannot read)."""
  save_file(tensors, str(path), metadata={"format": "pt"})
  umask = os.umask(0)
  os.umask(umask)
  path.chmod(0o666 & ~umask)


def write_index(folder: Path, weight_map: dict[str, str], total_bytes: int) -> None:
  index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
  (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
