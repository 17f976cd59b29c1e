"""A training run folder: side files, Orbax step checkpoints, metrics.jsonl and the loss plot.

RUN_DIR/
  config.json, tokenizer files     copied from the source checkpoint (so infer.py / export take RUN_DIR)
  train_config.json                the hyper-parameters and data the run started with
  lora.json                        a LoRA run's adapter settings and its base checkpoint (checkpoint.LORA_FILE)
  reference.json                   the checkpoint a full fine-tune's GRPO KL penalty compares with (REFERENCE)
  checkpoints/<step>/              params (unpadded; a LoRA run: adapters), opt_state (unpadded); Orbax renames a step
                                   into place only when complete, so a killed save is never the latest
  tokens/<fingerprint>-<L>.npz     the tokenized training (and eval) data, read again on resume (data.read_cached)
  metrics.jsonl                    one object per logged step
  loss.png                         the loss curve, written at the end
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from jax.experimental import multihost_utils

from qwen_moe_jax import checkpoint, hf_io
from qwen_moe_jax.errors import UserError

TRAIN_CONFIG = "train_config.json"
METRICS = "metrics.jsonl"
PLOT = "loss.png"
OBJECTIVES = {"ce": "cross-entropy", "dpo_loss": "DPO loss", "simpo_loss": "SimPO loss", "orpo_loss": "ORPO loss",
              "kto_loss": "KTO loss",
              "grpo_loss": "GRPO loss"}  # the objective's metric (TrainConfig.objective) and its name in the plot
OPT_STATE = "opt_state"  # checkpointable name of the optimizer state in a step
TOKENS_DIR = "tokens"
REFERENCE = "reference.json"
WRITTEN = {"config.json", TRAIN_CONFIG, checkpoint.LORA_FILE, REFERENCE, METRICS, PLOT, TOKENS_DIR, *hf_io.SIDE_FILES}


class RunDir:
  def __init__(self, folder: str | Path, keep: int = 3):
    self.folder = Path(folder).absolute()  # Orbax takes absolute paths only
    if self.folder.exists() and not self.folder.is_dir():
      raise UserError(f"{self.folder}: exists and is not a directory")
    self.folder.mkdir(parents=True, exist_ok=True)
    policy = ocp.training.preservation_policies.LatestN(keep)
    self._ckpt = ocp.training.Checkpointer(self.folder / checkpoint.RUN_CHECKPOINTS_DIR, preservation_policy=policy,
                                           cleanup_tmp_directories=True)
    self._pending = None

  @property
  def latest_step(self) -> int | None:
    latest = self._ckpt.latest
    return None if latest is None else int(latest.step)

  def start(self, source: Path, train_config: dict[str, Any], lora: dict[str, Any] | None = None,
            reference: checkpoint.Location | None = None) -> None:
    """A new run: copy config.json and tokenizer files from the source checkpoint; record the settings (and a
    LoRA run's lora.json; with `reference`, the located source, whose weights a full fine-tune's KL penalty reads
    again on every start). A run folder that saved no checkpoint (killed or failed before its first save) starts
    over, with any flags: what its earlier start wrote is removed first."""
    leftovers = [p for p in self.folder.iterdir() if p.name != checkpoint.RUN_CHECKPOINTS_DIR]
    unsaved = (self.folder / TRAIN_CONFIG).is_file() and all(p.name in WRITTEN for p in leftovers)
    if leftovers and not unsaved:
      raise UserError(f"{self.folder}: not a run folder of train.py and not empty ({leftovers[0].name}); "
                      f"choose a new --out")
    multihost_utils.sync_global_devices("run folder checked")  # every process looked before process 0 writes
    if jax.process_index() == 0:
      if leftovers:
        print(f"{self.folder}: a run that saved no checkpoint; starting it over", file=sys.stderr)
      for path in leftovers:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
      shutil.copyfile(hf_io.inside(source, "config.json", str(source)), self.folder / "config.json")
      hf_io.copy_side_files(source, self.folder)
      (self.folder / TRAIN_CONFIG).write_text(json.dumps(train_config, indent=2, sort_keys=True) + "\n")
      if lora is not None:
        (self.folder / checkpoint.LORA_FILE).write_text(json.dumps(lora, indent=2) + "\n")
      if reference is not None:
        record = {"checkpoint": str(source.resolve()), "peft": reference.peft and str(reference.peft),
                  "reads": checkpoint.reads(reference)}
        (self.folder / REFERENCE).write_text(json.dumps(record, indent=2) + "\n")
    multihost_utils.sync_global_devices("run folder written")

  def reference(self) -> checkpoint.Location:
    """The starting weights, as reference.json recorded them: the same files, or one line saying what changed."""
    path = self.folder / REFERENCE
    try:
      d = json.loads(path.read_text())
      source, peft, then = Path(d["checkpoint"]), d.get("peft"), d["reads"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise UserError(f"{path}: unreadable or incomplete ({type(e).__name__}: {e})") from None
    try:
      loc = checkpoint.locate(source, peft)
    except UserError as e:
      raise UserError(f"{path}: the KL penalty's reference, the run's starting weights: {e}") from None
    now = checkpoint.reads(loc)
    if now != then:
      now, then = next(((a, b) for a, b in zip(now, then) if a != b), (now, then))
      raise UserError(f"{path}: the KL penalty's reference {source} now reads {now}, not {then} as when this run "
                      f"started; put those weights back, or start over in a new --out")
    return loc

  def recorded_config(self) -> dict[str, Any]:
    return json.loads((self.folder / TRAIN_CONFIG).read_text())

  def save(self, step: int, params: dict, opt_state: Any, item: str = checkpoint.PARAMS_ITEM) -> None:
    """Starts an async save of step `step` (`params` under `item`); an error of the previous save surfaces here
    (or in wait())."""
    self.wait()
    self._pending = self._ckpt.save_checkpointables_async(step, {item: params, OPT_STATE: opt_state})

  def wait(self) -> None:
    if self._pending is not None:
      pending, self._pending = self._pending, None
      pending.result()

  def load(self, step: int, item: str, wanted: Any, num_experts: int) -> Any:
    """Item `item` of a saved step into `wanted` (ShapeDtypeStructs with shardings; experts padded)."""
    return checkpoint.load_padded(
      lambda request: self._ckpt.load_checkpointables(step, {item: request})[item], wanted, num_experts)

  def close(self) -> None:
    self.wait()
    self._ckpt.close()

  # metrics
  def truncate_metrics(self, step: int) -> None:
    """Drops metrics logged after `step` (they belong to work a resume redoes)."""
    path = self.folder / METRICS
    if path.exists() and jax.process_index() == 0:
      kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
      path.write_text("".join(line + "\n" for line in kept))

  def log(self, record: dict[str, Any]) -> None:
    if jax.process_index() == 0:
      with open(self.folder / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")

  def plot(self) -> Path | None:
    path = self.folder / METRICS
    if jax.process_index() != 0 or not path.exists():
      return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    steps = np.array([r["step"] for r in records])
    key, name = next((k, n) for k, n in OBJECTIVES.items() if k in records[0])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], label=f"loss ({key} + coef x aux)")
    ax.plot(steps, [r[key] for r in records], label=name, alpha=0.7)
    if "reward" in records[0]:  # GRPO's
      ax.plot(steps, [r["reward"] for r in records], label="mean reward")
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if evals:
      ax.plot(*zip(*evals), "o-", label=f"held-out {name}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(self.folder.name)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(self.folder / PLOT, dpi=100)
    plt.close(fig)
    return self.folder / PLOT
