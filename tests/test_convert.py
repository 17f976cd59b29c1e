"""The converters (convert/hf_to_orbax.py, convert/orbax_to_hf.py) and the mapping under them.

Round trips are bit-exact in the source dtype; bad inputs end in one `error:` line and exit 2 with nothing
written outside OUT_DIR and no checkpoint left half-made. Command-line behaviour runs the real scripts: most
cases in this process (runpy, same argv / exit code / stderr), the ones where a fresh process matters with
subprocess. The HF checkpoints are built once per module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Qwen2MoeForCausalLM

from hf_models import hub_cache, make_model, peft_adapter, save
from qwen_moe_jax import checkpoint, hf_io, sharding
from qwen_moe_jax.config import QwenMoeConfig
from qwen_moe_jax.convert import export_hf, import_hf
from qwen_moe_jax.errors import UserError
from qwen_moe_jax.hf_layout import HfWeights
from qwen_moe_jax.scoring import prompt_logits

ROOT = Path(__file__).resolve().parents[1]
HF_TO_ORBAX = "convert/hf_to_orbax.py"
ORBAX_TO_HF = "convert/orbax_to_hf.py"
SEED = 7
SIDE_FILES = {  # dummy tokenizer / generation files: copied byte for byte
  "tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}\n',
  "tokenizer_config.json": '{"model_max_length": 256}\n',
  "generation_config.json": '{"eos_token_id": [100, 99]}\n',
}


# ---------------------------------------------------------------------------------------------- helpers

def tensors(folder: Path) -> dict[str, torch.Tensor]:
  """Every tensor of every safetensors file in folder."""
  out = {}
  for path in sorted(folder.glob("*.safetensors")):
    with safe_open(path, framework="pt") as f:
      out |= {k: f.get_tensor(k) for k in f.keys()}
  return out


def per_expert(fused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
  """transformers v5 fused experts -> the hub's per-expert tensors (gate rows first in gate_up_proj)."""
  out = {}
  for name, t in fused.items():
    prefix = name.rsplit("experts.", 1)[0] + "experts."
    if name.endswith("experts.gate_up_proj"):
      gate, up = t.chunk(2, dim=1)
      for e in range(t.shape[0]):
        out[f"{prefix}{e}.gate_proj.weight"], out[f"{prefix}{e}.up_proj.weight"] = gate[e], up[e]
    elif name.endswith("experts.down_proj"):
      out |= {f"{prefix}{e}.down_proj.weight": t[e] for e in range(t.shape[0])}
    else:
      out[name] = t
  return out


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
  assert sorted(got) == sorted(want)
  for name, t in want.items():
    assert got[name].dtype == t.dtype, name
    assert torch.equal(got[name], t), name


def snapshot(folder: Path, skip: Path | None = None) -> dict[str, tuple]:
  """Every entry under folder (symlinks not followed) with its size and mtime, except under `skip`."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(folder):
    for name in dirnames + filenames:
      path = Path(dirpath) / name
      if skip is not None and (path == skip or skip in path.parents):
        continue
      st = path.lstat()
      out[str(path.relative_to(folder))] = (st.st_size, st.st_mtime_ns, path.is_symlink())
  return out


def cli(script: str, *args, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
  """The real command in a fresh process (`env`: variables set for it)."""
  return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, capture_output=True,
                        text=True, timeout=300, env={**os.environ, **(env or {})})


def cli_here(capfd, monkeypatch, script: str, *args: str) -> tuple[int, str]:
  """The same script run as __main__ in this process (no interpreter start-up): (exit code, stderr)."""
  monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
  monkeypatch.setattr(sys, "path", list(sys.path))
  monkeypatch.chdir(ROOT)
  capfd.readouterr()
  with pytest.raises(SystemExit) as exit_:
    runpy.run_path(script, run_name="__main__")
  return exit_.value.code, capfd.readouterr().err


def assert_one_error(code: int, stderr: str, *fragments: str) -> None:
  assert "Traceback" not in stderr, stderr
  lines = stderr.strip().splitlines()
  assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, stderr)
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])


def restores_to(ckpt: Path, hf_dir: Path) -> None:
  """The checkpoint restores onto the model and holds hf_dir's weights (embedding and a router)."""
  model = checkpoint.restore(ckpt, dtype=np.float32)
  want = tensors(hf_dir)
  np.testing.assert_array_equal(np.asarray(model.embed[...]), want["model.embed_tokens.weight"].float().numpy())
  np.testing.assert_array_equal(np.asarray(model.layers[2].mlp.router[...]),
                                want["model.layers.2.mlp.gate.weight"].float().numpy().T)


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def model() -> Qwen2MoeForCausalLM:
  return make_model(seed=SEED)


@pytest.fixture(scope="module")
def hf(tmp_path_factory, model) -> dict[str, Path]:
  """The same random model saved in every supported way (plus a bfloat16 copy)."""
  root = tmp_path_factory.mktemp("hf")
  dirs = {
    "hub": save(model, root / "hub"),
    "fused": save(model, root / "fused", layout="fused"),
    "sharded": save(model, root / "sharded", shard=True),
    "v4": save(model, root / "v4", style="v4"),
    "bf16": save(make_model(seed=SEED).to(torch.bfloat16), root / "bf16"),
  }
  for name, text in SIDE_FILES.items():
    (dirs["hub"] / name).write_text(text)
  assert len(list(dirs["sharded"].glob("*.safetensors"))) > 3
  return dirs


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, hf) -> dict[str, Path]:
  """Each HF folder converted once in this process, in its own dtype."""
  root = tmp_path_factory.mktemp("ckpt")
  for name, folder in hf.items():
    import_hf(folder, root / name, progress=False)
  return {name: root / name for name in hf}


@pytest.fixture(scope="module", autouse=True)
def repo_untouched():
  """No test leaves anything in the repository (the CLIs run there)."""
  before = set(os.listdir(ROOT))
  yield
  assert set(os.listdir(ROOT)) - {".pytest_cache"} == before - {".pytest_cache"}


# ---------------------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("source", ["fused", "sharded", "bf16", "v4"])
def test_round_trip_is_bit_exact(source, hf, ckpts, tmp_path):
  """Exports are always the hub layout with the source's dtype; fused experts compare after splitting."""
  export_hf(ckpts[source], tmp_path / "back", progress=False)
  got = tensors(tmp_path / "back")
  want = tensors(hf[source])
  assert_same_tensors(got, per_expert(want) if source == "fused" else want)
  assert sorted(got) == sorted(tensors(hf["hub"]))
  index = json.loads((tmp_path / "back" / hf_io.INDEX_FILE).read_text())
  assert sorted(index["weight_map"]) == sorted(got)
  # shards are as readable as the index file next to them (safetensors alone writes them 0600)
  modes = {p.stat().st_mode & 0o777 for p in (tmp_path / "back").iterdir()}
  assert len(modes) == 1 and modes.pop() & 0o044 == 0o044


@pytest.mark.parametrize("source,import_dtype,export_dtype,want_dtype", [
  ("bf16", "float32", None, torch.float32),
  ("hub", "bfloat16", None, torch.bfloat16),
  ("hub", None, "bfloat16", torch.bfloat16),
  ("bf16", None, "float16", torch.float16),
])
def test_dtype_conversion_matches_torch(source, import_dtype, export_dtype, want_dtype, hf, ckpts, tmp_path):
  """--dtype on either side gives exactly torch's .to(dtype) of the source tensors (round to nearest even)."""
  ckpt = ckpts[source]
  if import_dtype:
    ckpt = tmp_path / "ckpt"
    import_hf(hf[source], ckpt, dtype=import_dtype, progress=False)
    assert json.loads((ckpt / "config.json").read_text())["dtype"] == import_dtype
  export_hf(ckpt, tmp_path / "back", dtype=export_dtype, progress=False)
  want = {k: t.to(want_dtype) for k, t in tensors(hf[source]).items()}
  assert_same_tensors(tensors(tmp_path / "back"), want)
  assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == str(want_dtype).split(".")[1]


def test_checkpoint_folder_is_self_contained(hf, ckpts):
  ckpt = ckpts["hub"]
  assert sorted(p.name for p in ckpt.iterdir()) == sorted(["config.json", checkpoint.PARAMS_DIR, *SIDE_FILES])
  for name, text in SIDE_FILES.items():
    assert (ckpt / name).read_text() == text
  assert ocp.is_orbax_checkpoint(ckpt / checkpoint.PARAMS_DIR)
  assert QwenMoeConfig.from_file(ckpt / "config.json") == QwenMoeConfig.from_file(hf["hub"] / "config.json")
  restores_to(ckpt, hf["hub"])


# ---------------------------------------------------------------------------------------------- config parsing

def test_v4_and_v5_configs_parse_the_same(hf):
  v4 = json.loads((hf["v4"] / "config.json").read_text())
  v5 = json.loads((hf["hub"] / "config.json").read_text())
  assert "rope_theta" in v4 and "rope_parameters" not in v4 and "torch_dtype" in v4
  assert "rope_parameters" in v5 and "rope_theta" not in v5 and "dtype" in v5
  assert QwenMoeConfig.from_hf_dict(v4) == QwenMoeConfig.from_hf_dict(v5)


def test_rope_scaling_parses_in_both_styles_and_round_trips(hf):
  """Qwen2's model cards add `"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings":
  32768}` (v4 style); transformers v5 writes the same under rope_parameters. Both give one config, which
  to_hf_dict writes back; the context grows to original x factor."""
  v4 = json.loads((hf["v4"] / "config.json").read_text())
  v5 = json.loads((hf["hub"] / "config.json").read_text())
  yarn = {"factor": 4.0, "original_max_position_embeddings": 256}
  a = QwenMoeConfig.from_hf_dict(dict(v4, rope_scaling={"type": "yarn", **yarn}))
  b = QwenMoeConfig.from_hf_dict(dict(v5, rope_parameters={**v5["rope_parameters"], "rope_type": "yarn", **yarn}))
  assert a == b and a.rope_scaling.rope_type == "yarn" and a.context_length == 1024
  assert a.rope_scaling.attention_factor == pytest.approx(0.1 * np.log(4.0) + 1)
  assert QwenMoeConfig.from_hf_dict(a.to_hf_dict()) == a
  linear = QwenMoeConfig.from_hf_dict(dict(v4, rope_scaling={"rope_type": "linear", "factor": 2}))
  assert linear.context_length == 2 * linear.max_position_embeddings
  assert QwenMoeConfig.from_hf_dict(linear.to_hf_dict()) == linear
  assert QwenMoeConfig.from_hf_dict(v4).rope_scaling is None


def test_config_head_dim_and_eos(hf):
  base = json.loads((hf["hub"] / "config.json").read_text())
  assert QwenMoeConfig.from_hf_dict(base).dim_per_head == 8
  assert QwenMoeConfig.from_hf_dict(dict(base, head_dim=16)).dim_per_head == 16
  assert QwenMoeConfig.from_hf_dict(dict(base, eos_token_id=[151643, 151645])).eos_token_ids == (151643, 151645)
  assert QwenMoeConfig.from_hf_dict(dict(base, eos_token_id=151643)).eos_token_ids == (151643,)
  assert QwenMoeConfig.from_hf_dict(dict(base, eos_token_id=None)).eos_token_ids == ()


@pytest.mark.parametrize("edit,key", [
  (dict(rope_parameters={"rope_type": "default", "rope_theta": "big"}), "rope_parameters.rope_theta"),
  (dict(attention_dropout="0.1"), "attention_dropout"),
  (dict(mlp_only_layers=["a"]), "mlp_only_layers"),
  (dict(mlp_only_layers=[7]), "mlp_only_layers"),
  (dict(eos_token_id="x"), "eos_token_id"),
  (dict(num_experts_per_tok=9), "num_experts_per_tok"),
  (dict(num_key_value_heads=4), "num_key_value_heads"),
  (dict(hidden_size=True), "hidden_size"),
  (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}), "rope_parameters.factor"),
  (dict(rope_parameters={"rope_type": "yarn", "factor": "4", "rope_theta": 1e4}), "rope_parameters.factor"),
  (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "low_freq_factor": 1.0}),
   "rope_parameters.low_freq_factor"),
  (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0}),
   "rope_parameters.original_max_position_embeddings"),
  (dict(rope_parameters="yarn"), "rope_parameters"),
  (dict(rope_parameters=None, rope_scaling=[4.0]), "rope_scaling"),
])
def test_bad_config_values_name_file_and_key(hf, edit, key):
  base = json.loads((hf["hub"] / "config.json").read_text())
  with pytest.raises(UserError, match=rf"^my/config\.json: {re.escape(key)} "):
    QwenMoeConfig.from_hf_dict(dict(base, **edit), source="my/config.json")


def test_explicit_head_dim_converts(tmp_path):
  """head_dim != hidden_size / heads: the head splits follow head_dim."""
  model = make_model(seed=3, head_dim=12)
  assert model.model.layers[0].self_attn.q_proj.weight.shape == (6 * 12, 48)
  save(model, tmp_path / "hf")
  import_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
  export_hf(tmp_path / "ckpt", tmp_path / "back", progress=False)
  assert_same_tensors(tensors(tmp_path / "back"), tensors(tmp_path / "hf"))


# ---------------------------------------------------------------------------------------------- bad inputs
# Each case builds a broken HF folder under its case folder from the good checkpoints and returns HF_DIR;
# OUT_DIR is case/out unless said otherwise. The one error line must contain every fragment ({case}: the folder).

def _hub(case: Path, hf: dict[str, Path], edit=None) -> Path:
  """A copy of the hub checkpoint, its tensors passed through edit(dict) and saved with save_file."""
  folder = case / "hf"
  shutil.copytree(hf["hub"], folder)
  if edit:
    state = tensors(folder)
    edit(state)
    save_file(state, folder / hf_io.SINGLE_FILE, metadata={"format": "pt"})
  return folder


def _sharded(case: Path, hf: dict[str, Path], edit_index=None, outside: str | None = None) -> Path:
  """A copy of the sharded checkpoint, its index passed through edit_index(weight_map, first shard)."""
  folder = case / "hf"
  shutil.copytree(hf["sharded"], folder)
  first = sorted(folder.glob("*.safetensors"))[0].name
  if outside:
    shutil.copyfile(folder / first, case / outside)
  if edit_index:
    index = json.loads((folder / hf_io.INDEX_FILE).read_text())
    edit_index(index["weight_map"], first)
    (folder / hf_io.INDEX_FILE).write_text(json.dumps(index))
  return folder


def _config(case: Path, hf: dict[str, Path], source: str = "hub", **changes) -> Path:
  folder = _hub(case, {"hub": hf[source]})
  config = json.loads((folder / "config.json").read_text())
  for key, value in changes.items():
    parent = config
    *parents, last = key.split(".")
    for p in parents:
      parent = parent[p]
    parent[last] = value
  (folder / "config.json").write_text(json.dumps(config))
  return folder


def _pickle_only(case, hf):
  folder = case / "hf"
  folder.mkdir()
  shutil.copyfile(hf["hub"] / "config.json", folder / "config.json")
  torch.save(tensors(hf["hub"]), folder / "pytorch_model.bin")
  return folder


def _redirect_first_shard(target: str):
  def edit(weight_map, first):
    for name, shard in weight_map.items():
      if shard == first:
        weight_map[name] = target
  return edit


def _symlink_out(case, hf):
  folder = _sharded(case, hf, outside="outside.safetensors")
  first = sorted(folder.glob("*.safetensors"))[0]
  first.unlink()
  first.symlink_to(case / "outside.safetensors")
  return folder


def _side_file_out(case, hf):
  folder = _hub(case, hf)
  (case / "outside.json").write_text("{}")
  (folder / "tokenizer.json").unlink()
  (folder / "tokenizer.json").symlink_to(case / "outside.json")
  return folder


def _cut(case, hf, keep: float = 0.5):
  folder = _hub(case, hf)
  path = folder / hf_io.SINGLE_FILE
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep)])
  return folder


def _garbage(case, hf):
  folder = _hub(case, hf)
  (folder / hf_io.SINGLE_FILE).write_bytes(np.random.default_rng(0).bytes(4096))
  return folder


def _without_config(case, hf):
  folder = _hub(case, hf)
  (folder / "config.json").unlink()
  return folder


def _bad_json(case, hf):
  folder = _hub(case, hf)
  (folder / "config.json").write_text('{"model_type": "qwen2_moe",')
  return folder


def _not_empty(case, hf):
  (case / "out").mkdir()
  (case / "out" / "keep.txt").write_text("mine")
  return _hub(case, hf)


MISSING = "model.layers.1.mlp.experts.3.up_proj.weight"
MISSHAPEN = "model.layers.2.self_attn.q_proj.weight"
BAD_CASES = {  # id -> (build(case, hf) -> HF_DIR, extra args, fragments)
  "pickle_only": (_pickle_only, (), ["pytorch_model.bin", "safetensors"]),
  "index_parent_path": (lambda c, h: _sharded(c, h, _redirect_first_shard("../outside.safetensors"),
                                               outside="outside.safetensors"), (), ["../outside.safetensors"]),
  "index_absolute_path": (lambda c, h: _sharded(c, h, _redirect_first_shard(str(c / "outside.safetensors")),
                                                 outside="outside.safetensors"), (), ["{case}/outside.safetensors"]),
  "symlink_out": (_symlink_out, (), ["model-00001-of-", "outside"]),
  "side_file_symlink_out": (_side_file_out, (), ["tokenizer.json", "outside"]),
  "truncated_shard": (_cut, (), [hf_io.SINGLE_FILE]),
  "truncated_header": (lambda c, h: _cut(c, h, 0.001), (), [hf_io.SINGLE_FILE]),
  "garbage_shard": (_garbage, (), [hf_io.SINGLE_FILE]),
  "missing_tensor": (lambda c, h: _hub(c, h, lambda s: s.pop(MISSING)), (), [MISSING, "missing"]),
  "unknown_tensor": (lambda c, h: _hub(c, h, lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.ones(3)})),
                     (), ["model.layers.0.mlp.extra.weight"]),
  "integer_tensor": (lambda c, h: _hub(c, h, lambda s: s.update({MISSHAPEN: s[MISSHAPEN].to(torch.int32)})), (),
                     [MISSHAPEN, "I32"]),
  "misshapen_tensor": (lambda c, h: _hub(c, h, lambda s: s.update({MISSHAPEN: torch.ones(48, 47)})), (),
                       [MISSHAPEN, "(48, 47)", "(48, 48)"]),
  "expert_out_of_range": (lambda c, h: _hub(c, h, lambda s: s.update(
    {"model.layers.0.mlp.experts.7.gate_proj.weight": torch.ones(20, 48)})), (),
    ["model.layers.0.mlp.experts.7.gate_proj.weight", "num_experts=7"]),
  "layer_out_of_range": (lambda c, h: _hub(c, h, lambda s: s.update(
    {"model.layers.3.input_layernorm.weight": torch.ones(48)})), (), ["model.layers.3.input_layernorm.weight"]),
  "fused_and_per_expert": (lambda c, h: _hub(c, h, lambda s: s.update(
    {"model.layers.1.mlp.experts.gate_up_proj": torch.ones(7, 40, 48)})), (),
    ["model.layers.1.mlp.experts.gate_up_proj", "both fill"]),
  "index_lists_absent_tensor": (lambda c, h: _sharded(c, h, lambda m, first: m.update(
    {"model.layers.0.mlp.phantom.weight": first})), (), ["model.layers.0.mlp.phantom.weight", "missing"]),
  "shard_holds_unindexed_tensor": (lambda c, h: _sharded(c, h, lambda m, first: m.pop("lm_head.weight")), (),
                                   ["lm_head.weight", hf_io.INDEX_FILE]),
  "model_type": (lambda c, h: _config(c, h, model_type="qwen2"), (), ["model_type", "qwen2"]),
  "rope_scaling_v4": (lambda c, h: _config(c, h, "v4", rope_scaling={"type": "dynamic", "factor": 2}), (),
                      ["rope_scaling.rope_type", "dynamic"]),
  "rope_type_v5": (lambda c, h: _config(c, h, **{"rope_parameters.rope_type": "longrope",
                                                 "rope_parameters.factor": 2}), (),
                   ["rope_parameters.rope_type", "longrope"]),
  "sliding_window": (lambda c, h: _config(c, h, use_sliding_window=True), (), ["use_sliding_window"]),
  "gptq": (lambda c, h: _config(c, h, quantization_config={"quant_method": "gptq", "bits": 4}), (),
           ["quantization_config", "gptq", "unquantized release"]),
  "experts_per_token": (lambda c, h: _config(c, h, num_experts_per_tok=8), (), ["num_experts_per_tok", "8"]),
  "config_dtype": (lambda c, h: _config(c, h, dtype="int8"), (), ["config.json: dtype", "int8"]),
  "invalid_json": (_bad_json, (), ["config.json", "JSON"]),
  "missing_config": (_without_config, (), ["config.json", "not found"]),
  "out_not_empty": (_not_empty, (), ["not empty", "--force"]),
  "bogus_dtype": (_hub, ("--dtype", "bogus"), ["--dtype", "bogus"]),
}
OUT_IS_INPUT = {"out_is_hf_dir": "hf", "out_contains_hf_dir": "."}  # id -> OUT_DIR relative to the case


@dataclasses.dataclass
class Case:
  """A broken input under `root`, with the state of everything around it before the command ran."""
  root: Path
  folder: Path  # HF_DIR
  out: Path  # OUT_DIR
  args: tuple = ()
  fragments: tuple = ()

  def __post_init__(self):
    self.before, self.out_before = snapshot(self.root, skip=self.out), self.out_state()

  def out_state(self) -> dict:
    return snapshot(self.out) if self.out.exists() else {}

  def check_failed(self, code: int, stderr: str) -> None:
    assert_one_error(code, stderr, *[f.replace("{case}", str(self.root)) for f in self.fragments])
    assert snapshot(self.root, skip=self.out) == self.before  # nothing written (or changed) outside OUT_DIR
    assert self.out_state() == self.out_before  # OUT_DIR as it was: absent, empty, or the old checkpoint
    assert not list(self.out.glob(".staging-*"))


def bad_case(name: str, root: Path, hf: dict[str, Path]) -> Case:
  root.mkdir(parents=True)
  if name in OUT_IS_INPUT:
    return Case(root, _hub(root, hf), root / OUT_IS_INPUT[name], fragments=("input folder",))
  build, args, fragments = BAD_CASES[name]
  return Case(root, build(root, hf), root / "out", args, tuple(fragments))


def last_layer_case(root: Path, hf: dict[str, Path], ckpts: dict[str, Path]) -> Case:
  """--force over a good checkpoint, with a misshapen tensor in the last layer."""
  name = "model.layers.2.mlp.experts.6.down_proj.weight"
  folder = _hub(root, hf, lambda s: s.update({name: torch.ones(48, 21)}))
  shutil.copytree(ckpts["hub"], root / "out")
  return Case(root, folder, root / "out", ("--force",), (name, "(48, 21)", "(48, 20)"))


@pytest.mark.parametrize("name", sorted(BAD_CASES) + sorted(OUT_IS_INPUT))
def test_bad_input(name, hf, tmp_path, capfd, monkeypatch):
  case = bad_case(name, tmp_path / "case", hf)
  case.check_failed(*cli_here(capfd, monkeypatch, HF_TO_ORBAX, case.folder, case.out, *case.args))


@pytest.fixture
def old_checkpoint(hf, ckpts, tmp_path) -> Path:
  """OUT_DIR already holding a good checkpoint (the hub conversion)."""
  out = tmp_path / "out"
  shutil.copytree(ckpts["hub"], out)
  return out


def test_force_replaces_old_checkpoint(hf, old_checkpoint):
  (old_checkpoint / "stale.txt").write_text("old")
  import_hf(hf["bf16"], old_checkpoint, force=True, progress=False)
  assert not (old_checkpoint / "stale.txt").exists()
  assert not list(old_checkpoint.glob(".staging-*"))
  assert json.loads((old_checkpoint / "config.json").read_text())["dtype"] == "bfloat16"
  restores_to(old_checkpoint, hf["bf16"])


def test_failure_mid_conversion_keeps_old_checkpoint(hf, old_checkpoint, tmp_path, capfd, monkeypatch):
  """A read failing in the last layer, after earlier groups were written: the old checkpoint is untouched."""
  case = Case(tmp_path, hf["hub"], old_checkpoint, ("--force",), ("model.layers.2.", "simulated"))
  read = hf_io.SafetensorsReader.read
  staged = []

  def failing_read(self, name, rows=None):
    if name.startswith("model.layers.2."):
      staged.extend(old_checkpoint.glob(".staging-*/params*"))
      raise UserError(f"{self.where[name]}: cannot read tensor '{name}' (simulated I/O error)")
    return read(self, name, rows)

  monkeypatch.setattr(hf_io.SafetensorsReader, "read", failing_read)
  case.check_failed(*cli_here(capfd, monkeypatch, HF_TO_ORBAX, case.folder, case.out, *case.args))
  assert staged, "the failure should come after the first groups were written to staging"
  restores_to(old_checkpoint, hf["hub"])


def test_interrupt_mid_conversion_keeps_old_checkpoint(hf, old_checkpoint, capfd, monkeypatch):
  def interrupted(self, name, rows=None):
    raise KeyboardInterrupt

  monkeypatch.setattr(hf_io.SafetensorsReader, "read", interrupted)
  before = snapshot(old_checkpoint)
  code, err = cli_here(capfd, monkeypatch, HF_TO_ORBAX, hf["bf16"], old_checkpoint, "--force")
  assert code == 130 and err.strip() == "error: interrupted"
  assert snapshot(old_checkpoint) == before and not list(old_checkpoint.glob(".staging-*"))


def test_export_refuses_bad_dtype_and_own_folder(ckpts, tmp_path, capfd, monkeypatch):
  code, err = cli_here(capfd, monkeypatch, ORBAX_TO_HF, ckpts["hub"], tmp_path / "out", "--dtype", "int8")
  assert_one_error(code, err, "--dtype", "int8")
  before = snapshot(ckpts["hub"])
  code, err = cli_here(capfd, monkeypatch, ORBAX_TO_HF, ckpts["hub"], ckpts["hub"], "--force")
  assert_one_error(code, err, "input folder")
  assert snapshot(ckpts["hub"]) == before and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- HF folders in place

def params(model) -> dict:
  return checkpoint.flatten(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("source", ["fused", "sharded", "bf16"])
def test_hf_folder_reads_in_place_as_converted(source, hf, ckpts):
  """An HF folder restores without converting: the arrays, dtypes and shardings of its conversion, on one device and
  on a mesh whose expert axis pads the 7 experts to 8."""
  for mesh in (None, sharding.make_mesh({"expert": 2, "data": 4})):
    for dtype in (jnp.float32, jnp.bfloat16):
      got, want = params(checkpoint.restore(hf[source], mesh, dtype)), params(checkpoint.restore(ckpts[source], mesh,
                                                                                                   dtype))
      assert sorted(got) == sorted(want)
      for k, x in want.items():
        assert got[k].dtype == x.dtype and got[k].sharding == x.sharding, k
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(x), err_msg=k)
  assert checkpoint.locate(hf[source]) == checkpoint.Location(hf[source], None, hf=True)


@pytest.mark.parametrize("layout", ["hub", "fused"])
def test_hf_folder_reads_only_the_experts_asked(hf, layout):
  """A process reads of each layer's expert tensors only the experts its devices hold (the rest of those rows stay
  0), and everything else whole; one host holds and reads them all. Per-expert tensors (the hub layout): those
  experts' tensors; transformers v5's fused ones: those experts' rows, a run of consecutive experts in one read."""
  cfg = checkpoint.load_config(hf[layout])
  weights = HfWeights(hf[layout], cfg, checkpoint.param_shapes(cfg))
  full = weights.read("layers.1")
  read, real = [], weights.reader.read
  weights.reader.read = lambda name, rows=None: read.append((name, rows)) or real(name, rows)
  part = weights.read("layers.1", experts={1, 4, 5, 9})  # 9: a padding row past the 7 experts
  experts_read = [(n, rows) for n, rows in read if ".experts." in n]
  if layout == "hub":
    assert sorted({n.split(".")[5] for n, rows in experts_read}) == ["1", "4", "5"]
    assert all(rows is None for n, rows in experts_read)
  else:
    assert sorted(experts_read) == [(f"model.layers.1.mlp.experts.{name}", rows)
                                    for name in ("down_proj", "gate_up_proj") for rows in ((1, 2), (4, 6))]
  assert {(n, rows) for n, rows in read if ".experts." not in n} == {
    (b.hf, None) for b in weights.by_group["layers.1"] if ".experts." not in b.hf}
  for k, x in full.items():
    if "experts_" in k:
      np.testing.assert_array_equal(part[k][[1, 4, 5]], x[[1, 4, 5]], err_msg=k)
      assert not part[k][[0, 2, 3, 6]].any()
    else:
      np.testing.assert_array_equal(part[k], x, err_msg=k)


def test_hf_folder_checked_once_per_read(hf, tmp_path, monkeypatch):
  """Restoring an HF folder in place, or exporting it, binds and checks its tensors once (the Location that
  `checked` returns keeps them), not again for the read or once per group: 0.24 s of headers and bindings for
  A2.7B's 4,659 tensors each time."""
  made, real = [], HfWeights.__init__
  monkeypatch.setattr(HfWeights, "__init__", lambda self, *a, **k: made.append(a[0]) or real(self, *a, **k))
  checkpoint.restore(hf["fused"], dtype=jnp.float32)
  assert len(made) == 1
  export_hf(hf["fused"], tmp_path / "out", progress=False)
  assert made == [hf["fused"].absolute(), hf["fused"].absolute()]


def test_hf_folders_in_place_and_from_the_cache(hf, ckpts, model, tmp_path):
  """infer.py reads an HF folder in place, here named by its repo id in a Hugging Face cache (the snapshot's files
  link into blobs/): it generates what it generates from the conversion, and what transformers does greedily. The
  converter takes the repo id too; one the cache lacks is one line. The exporter turns transformers v5's fused
  experts into the hub's per-expert layout with no Orbax step."""
  hub_cache(tmp_path / "cache", "Qwen/Tiny-MoE", hf["sharded"])
  env = {"HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
  ids = [5, 17, 99, 3, 42]
  args = ["--input-ids", ",".join(map(str, ids)), "--temperature", "0", "--max-new-tokens", "6", "--json"]
  outputs = []
  for name in ("Qwen/Tiny-MoE", ckpts["sharded"]):
    r = cli("infer.py", "--checkpoint", name, *args, "--dtype", "float32", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    outputs.append(json.loads(r.stdout)["output_ids"])
  with torch.no_grad():
    want = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
  assert outputs == [want, want]
  r = cli(HF_TO_ORBAX, "Qwen/Tiny-MoE", tmp_path / "ckpt", cwd=tmp_path, env=env)
  assert r.returncode == 0, r.stderr
  restores_to(tmp_path / "ckpt", hf["sharded"])
  r = cli("infer.py", "--checkpoint", "Qwen/Absent", *args, cwd=tmp_path, env=env)
  assert_one_error(r.returncode, r.stderr, "Qwen/Absent: no such folder", str(tmp_path / "cache"), "hf download")
  r = cli("infer.py", "--checkpoint", "runs/a--b", *args, cwd=tmp_path, env=env)  # no repo id: a missing path
  assert_one_error(r.returncode, r.stderr, "runs/a--b", "not found")
  hub_cache(tmp_path / "cache", "Qwen/Escape", hf["bf16"])  # a snapshot linking outside its repo's blobs/
  shutil.copyfile(hf["bf16"] / hf_io.SINGLE_FILE, tmp_path / "outside.safetensors")
  link = next((tmp_path / "cache" / "models--Qwen--Escape" / "snapshots").iterdir()) / hf_io.SINGLE_FILE
  link.unlink()
  link.symlink_to(Path("../../../../outside.safetensors"))
  r = cli("infer.py", "--checkpoint", "Qwen/Escape", *args, cwd=tmp_path, env=env)
  assert_one_error(r.returncode, r.stderr, hf_io.SINGLE_FILE, f"resolves to {tmp_path / 'outside.safetensors'}")

  r = cli(ORBAX_TO_HF, hf["fused"], tmp_path / "hub")
  assert r.returncode == 0, r.stderr
  assert_same_tensors(tensors(tmp_path / "hub"), per_expert(tensors(hf["fused"])))


IN_PLACE_BAD = sorted(set(BAD_CASES) - {"out_not_empty", "bogus_dtype", "config_dtype",  # the converter's own
                                        "side_file_symlink_out"})  # infer.py reads no tokenizer here


@pytest.mark.parametrize("name", IN_PLACE_BAD)
def test_bad_hf_folder_read_in_place(name, hf, tmp_path, capfd, monkeypatch):
  """The converter's bad inputs, given to infer.py to read in place: the same one line, nothing written."""
  root = tmp_path / "case"
  root.mkdir()
  build, _, fragments = BAD_CASES[name]
  folder = build(root, hf)
  (folder / "tokenizer.json").unlink(missing_ok=True)  # the dummy one (its prompt is given as ids)
  case = Case(root, folder, root / "out", fragments=tuple(fragments))
  case.check_failed(*cli_here(capfd, monkeypatch, "infer.py", "--checkpoint", case.folder, "--input-ids", "1,2,3"))


# ---------------------------------------------------------------------------------------------- fresh processes
# The real CLIs in fresh interpreters (about three seconds each, so only where a fresh process adds something:
# the success path, and stderr holding nothing but the error line).

def test_cli_round_trip_loads_in_transformers(hf, model, tmp_path):
  """hub layout -> Orbax -> hub layout with the real CLIs, given paths relative to the working directory (Orbax takes
  absolute ones only); transformers loads it and gives the same logits."""
  for r in [cli(HF_TO_ORBAX, hf["hub"], "ckpt", cwd=tmp_path), cli(ORBAX_TO_HF, "ckpt", "back", cwd=tmp_path)]:
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
  assert_same_tensors(tensors(tmp_path / "back"), tensors(hf["hub"]))
  for name, text in SIDE_FILES.items():
    assert (tmp_path / "back" / name).read_text() == text
  assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "float32"

  # Loaded the same way (transformers picks its grouped expert kernel on load), the logits are identical.
  ids = torch.tensor([[5, 17, 99, 3, 42, 8, 64, 1, 77, 23, 50]])
  with torch.no_grad():
    logits = Qwen2MoeForCausalLM.from_pretrained(tmp_path / "back").eval()(ids).logits
    assert torch.equal(logits, Qwen2MoeForCausalLM.from_pretrained(hf["hub"]).eval()(ids).logits)
    torch.testing.assert_close(logits, model(ids).logits, rtol=0, atol=1e-5)


def test_pickle_only_fresh_process(hf, tmp_path):
  case = bad_case("pickle_only", tmp_path / "case", hf)
  r = cli(HF_TO_ORBAX, case.folder, case.out)
  case.check_failed(r.returncode, r.stderr)


def test_bad_last_layer_with_force_keeps_old_checkpoint(hf, ckpts, tmp_path):
  """--force over a good checkpoint: the misshapen last layer is refused before anything is written."""
  case = last_layer_case(tmp_path / "case", hf, ckpts)
  r = cli(HF_TO_ORBAX, case.folder, case.out, *case.args)
  case.check_failed(r.returncode, r.stderr)
  restores_to(case.out, hf["hub"])


def test_export_refuses_non_checkpoint(hf, tmp_path, capfd, monkeypatch):
  unfinished = tmp_path / "unfinished"  # config.json and a params/ that Orbax never finalised
  unfinished.mkdir()
  shutil.copyfile(hf["hub"] / "config.json", unfinished / "config.json")
  (unfinished / checkpoint.PARAMS_DIR).mkdir()
  r = cli(ORBAX_TO_HF, unfinished, tmp_path / "out")
  assert_one_error(r.returncode, r.stderr, str(unfinished / checkpoint.PARAMS_DIR),
                   "not a finished parameter checkpoint")
  (tmp_path / "empty").mkdir()
  code, err = cli_here(capfd, monkeypatch, ORBAX_TO_HF, tmp_path / "empty", tmp_path / "out")
  assert_one_error(code, err, "config.json")
  code, err = cli_here(capfd, monkeypatch, ORBAX_TO_HF, tmp_path / "absent", tmp_path / "out")
  assert_one_error(code, err, "absent")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "unfinished"]


# ---------------------------------------------------------------------------------------------- peft adapters

PATTERNS = {"rank_pattern": {"q_proj": 5, "experts.down_proj": 2}, "alpha_pattern": {"q_proj": 2, "embed_tokens": 1,
                                                                                    "experts.down_proj": 9}}


@pytest.mark.parametrize("base,config", [("hub", {}), ("fused", {"use_rslora": True}), ("hub", PATTERNS)],
                         ids=["hub", "fused-rslora", "hub-patterns"])
def test_peft_adapter_merges_while_converting(base, config, model, hf, tmp_path):
  """hf_to_orbax.py --peft: an adapter trained with peft on the base is merged into the weights as they convert,
  giving the logits of peft's model in transformers: Linear modules, embeddings, the fused experts (through
  target_parameters) into a per-expert or a fused base, a modules_to_save copy; rsLoRA's scale, and per-module
  ranks and alphas (rank_pattern, alpha_pattern: peft >= 0.22 writes them for gate_up_proj itself) too."""
  peft_model = peft_adapter(model, tmp_path / "adapter", **config)
  r = cli(HF_TO_ORBAX, hf[base], tmp_path / "ckpt", "--peft", tmp_path / "adapter")
  assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
  ids = [5, 17, 99, 3, 42, 8, 64, 1, 77, 23, 50]
  with torch.no_grad():
    want = peft_model(torch.tensor([ids])).logits[0].numpy()
    with peft_model.disable_adapter():
      plain = peft_model(torch.tensor([ids])).logits[0].numpy()
  got = prompt_logits(checkpoint.restore(tmp_path / "ckpt", dtype=jnp.float32), ids)
  assert np.abs(want - plain).max() > 0.1  # the adapter matters
  np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())


def test_peft_adapter_merges_as_a_hf_folder_is_read(model, hf, tmp_path):
  """infer.py --peft: the adapter merges into the HF folder's weights as they are read in place, exactly as when
  converting (per-expert and fused bases); an Orbax checkpoint with --peft, and a bad adapter, are one line."""
  peft_adapter(model, tmp_path / "adapter")
  for base in ("hub", "fused"):
    import_hf(hf[base], tmp_path / base, peft=tmp_path / "adapter", progress=False)
    got = params(checkpoint.restore(checkpoint.locate(hf[base], tmp_path / "adapter"), dtype=jnp.float32,
                                    cfg=checkpoint.load_config(hf[base])))
    want = params(checkpoint.restore(tmp_path / base, dtype=jnp.float32))
    for k, x in want.items():
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(x), err_msg=f"{base}: {k}")
  args = ["--input-ids", "5,17,99,3", "--temperature", "0", "--max-new-tokens", "5", "--json", "--dtype", "float32"]
  outputs = [cli("infer.py", "--checkpoint", hf["sharded"], "--peft", tmp_path / "adapter", *args),
             cli("infer.py", "--checkpoint", tmp_path / "fused", *args)]
  assert [r.returncode for r in outputs] == [0, 0], outputs[1].stderr
  assert json.loads(outputs[0].stdout)["output_ids"] == json.loads(outputs[1].stdout)["output_ids"]
  r = cli("infer.py", "--checkpoint", tmp_path / "fused", "--peft", tmp_path / "adapter", *args)
  assert_one_error(r.returncode, r.stderr, "--peft", "Orbax checkpoint or run", "hf_to_orbax.py --peft")
  (tmp_path / "adapter" / "adapter_config.json").unlink()
  r = cli("infer.py", "--checkpoint", hf["sharded"], "--peft", tmp_path / "adapter", *args)
  assert_one_error(r.returncode, r.stderr, "adapter_config.json", "not found")


def test_peft_adapter_on_per_expert_modules(hf, tmp_path):
  """Under transformers 4 the experts and the router were Linear modules, so peft adapters trained there name
  each expert (`mlp.experts.N.gate_proj`) and `mlp.gate`: merged, every weight equals W + (alpha / r) B A
  computed in torch (and the others are untouched)."""
  rank, alpha = 2, 6
  g = torch.Generator().manual_seed(0)
  modules = {"model.layers.0.mlp.experts.2.gate_proj": (20, 48), "model.layers.2.mlp.experts.6.down_proj": (48, 20),
             "model.layers.1.mlp.gate": (7, 48)}
  adapter, want = {}, tensors(hf["hub"])
  for module, (out, fan_in) in modules.items():
    a, b = torch.randn(rank, fan_in, generator=g), torch.randn(out, rank, generator=g)
    adapter |= {f"base_model.model.{module}.lora_A.weight": a, f"base_model.model.{module}.lora_B.weight": b}
    want[module + ".weight"] = want[module + ".weight"] + alpha / rank * b @ a
  _write_adapter(tmp_path / "adapter", adapter, {"peft_type": "LORA", "r": rank, "lora_alpha": alpha})
  import_hf(hf["hub"], tmp_path / "ckpt", progress=False, peft=tmp_path / "adapter")
  export_hf(tmp_path / "ckpt", tmp_path / "back", progress=False)
  got = tensors(tmp_path / "back")
  assert got.keys() == want.keys()
  for name in want:
    torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-5)  # float32 rounding of B A


def _write_adapter(folder: Path, weights: dict[str, torch.Tensor], config: dict | None) -> Path:
  folder.mkdir(parents=True)
  save_file(weights, folder / "adapter_model.safetensors")
  if config is not None:
    (folder / "adapter_config.json").write_text(json.dumps(config))
  return folder


Q = "base_model.model.model.layers.0.self_attn.q_proj"
EXPERTS = "base_model.model.model.layers.0.mlp.experts"
PEFT_BAD = {  # id -> (change to a good q_proj adapter's tensors, its config's, error fragments)
  "peft_missing_config": (None, None, ["adapter_config.json", "not found"]),
  "peft_not_lora": (None, {"peft_type": "IA3"}, ["peft_type", "IA3"]),
  "peft_dora": (None, {"use_dora": True}, ["use_dora", "DoRA"]),
  "peft_bad_alpha": (None, {"lora_alpha": "high"}, ["lora_alpha", "'high'"]),
  "peft_bad_alpha_pattern": (None, {"alpha_pattern": {"q_proj": 0}}, ["alpha_pattern['q_proj']", "positive", "0"]),
  "peft_bad_pattern": (None, {"alpha_pattern": {"q_proj[": 2}}, ["alpha_pattern key 'q_proj['",
                                                                 "not a regular expression"]),
  "peft_without_b": (lambda t: t.pop(Q + ".lora_B.weight"), {}, [Q + ".lora_A.weight", "no B matrix"]),
  "peft_rank_mismatch": (lambda t: t.update({Q + ".lora_B.weight": torch.ones(48, 3)}), {},
                         ["(48, 3)", "not a LoRA pair"]),
  "peft_misshapen": (lambda t: t.update({Q + ".lora_A.weight": torch.ones(2, 47)}), {}, ["(2, 47)", "do not fit",
                                                                                            "(48, 48)"]),
  "peft_unknown_layer": (lambda t: t.update({Q.replace("layers.0", "layers.5") + ".lora_A.weight": torch.ones(2, 48),
                                             Q.replace("layers.0", "layers.5") + ".lora_B.weight": torch.ones(48, 2)}),
                         {}, ["layers.5.self_attn.q_proj", "num_hidden_layers"]),
  "peft_not_peft_keys": (lambda t: t.update({"model.norm.weight": torch.ones(48)}), {},
                         ["model.norm.weight", "base_model.model."]),
  "peft_untargeted_experts": (lambda t: t.update({EXPERTS + ".lora_A.weight": torch.ones(14, 48),
                                                  EXPERTS + ".lora_B.weight": torch.ones(40, 14)}), {},
                              [EXPERTS + ".lora_A.weight", "target_parameters"]),
  "peft_two_full_weights": (lambda t: t.update({"base_model.model.model.embed_tokens.weight": torch.ones(101, 48),
                                                "base_model.model.model.embed_tokens.base_layer.weight":
                                                torch.ones(101, 48)}), {},
                            ["embed_tokens.base_layer.weight", "both replace 'model.embed_tokens.weight'"]),
  "peft_pickle_only": ("pickle", {}, ["adapter_model.bin", "pickle"]),
}


@pytest.mark.parametrize("name", sorted(PEFT_BAD))
def test_bad_peft_adapter(name, hf, tmp_path, capfd, monkeypatch):
  """A bad adapter is one error line naming its file and tensor or key; nothing is written."""
  edit, config, fragments = PEFT_BAD[name]
  weights = {Q + ".lora_A.weight": torch.ones(2, 48), Q + ".lora_B.weight": torch.ones(48, 2)}
  if callable(edit):
    edit(weights)
  folder = _write_adapter(tmp_path / "case" / "adapter", weights,
                          None if config is None else {"peft_type": "LORA", "r": 2, "lora_alpha": 4} | config)
  if edit == "pickle":
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
  case = Case(tmp_path / "case", hf["hub"], tmp_path / "case" / "out", ("--peft", folder), tuple(fragments))
  code, err = cli_here(capfd, monkeypatch, HF_TO_ORBAX, case.folder, case.out, *case.args)
  case.check_failed(code, err)
