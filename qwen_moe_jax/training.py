"""Fine-tuning: parameter groups to train or freeze, the optax optimizer, the jitted train step, run state.

The train step is one `jax.jit` with explicit shardings (pjit style): parameters and optimizer state keep
the layout the sharding rules give them, the batch [K, B, T] is split over the batch axes, and K
micro-batches accumulate gradients in a `lax.scan` before one optimizer update. Frozen parameters are
passed in but never differentiated, so they cost no gradient or optimizer memory.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qwen_moe_jax import checkpoint, data, quantize, sharding
from qwen_moe_jax.errors import UserError
from qwen_moe_jax.kernels import Kernels
from qwen_moe_jax.layers import F32
from qwen_moe_jax.lora import LoraConfig, is_adapter
from qwen_moe_jax.losses import (
  DPO_LOSSES,
  GRPO_LOSS_TYPES,
  IMPORTANCE_LEVELS,
  REFERENCE_FREE,
  PolicyGradient,
  causal_lm_loss,
  policy_gradient_count,
  policy_gradient_loss,
  preference_loss,
  preference_pairs,
  preference_stats,
  token_nll,
)
from qwen_moe_jax.model import QwenMoeForCausalLM, abstract_model
from qwen_moe_jax.sampling import Sampling

PARAM_GROUPS: dict[str, Callable[[str], bool]] = {
  "embed": lambda p: p == "embed",
  "lm_head": lambda p: p == "lm_head",
  "norms": lambda p: p.endswith("norm.scale"),
  "attention": lambda p: ".attn." in p,
  "router": lambda p: p.endswith(".mlp.router"),
  "shared_expert": lambda p: ".mlp.shared_expert." in p or p.endswith(".mlp.shared_gate"),
  "experts": lambda p: ".mlp.experts_" in p,
  "mlp": lambda p: p.endswith((".mlp.wi", ".mlp.wo")),  # dense-MLP layers
}
OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("cosine", "linear", "constant", "wsd")  # the learning rate after the warmup (`schedule`)
GRPO_SETTINGS = ("grpo_group", "grpo_max_new", "grpo_temperature", "grpo_top_k", "grpo_top_p", "grpo_min_p",
                 "grpo_repetition_penalty", "grpo_beta", "grpo_scale_rewards",
                 "grpo_mask_truncated", "grpo_iterations", "grpo_generation_steps", "grpo_epsilon",
                 "grpo_epsilon_high", "grpo_importance", "grpo_loss_type", "grpo_sapo_temperature_pos",
                 "grpo_sapo_temperature_neg", "grpo_top_entropy_quantile", "grpo_entropy_coef",
                 "grpo_reward_weights")  # TrainConfig's, besides the rewards
GRPO_SCALES = ("group", "batch", "none")  # grpo.advantages' scales
CISPO_EPSILON_HIGH = 5.0  # the cispo loss's largest ratio unless given (ScaleRL's; TRL's default, --grpo-epsilon, would
# shrink every token's gradient)


def param_group(path: str) -> str:
  return next(g for g, match in PARAM_GROUPS.items() if match(path))


def parse_groups(value: str | None, flag: str) -> set[str] | None:
  if not value:
    return None
  groups = {g.strip() for g in value.split(",") if g.strip()}
  unknown = sorted(groups - set(PARAM_GROUPS))
  if unknown:
    raise UserError(f"{flag}: unknown group '{unknown[0]}' (groups: {', '.join(PARAM_GROUPS)})")
  return groups


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 100
  batch_size: int = 8
  seq_len: int = 512
  grad_accum: int = 1
  lr: float = 1e-5
  warmup_steps: int = -1  # -1: 10% of steps (at most 100)
  min_lr_ratio: float = 0.1
  lr_schedule: str = "cosine"  # after the warmup (SCHEDULES, `schedule`)
  decay_steps: int = -1  # wsd's decay at the end; -1: 20% of steps
  weight_decay: float = 0.0
  clip_norm: float = 1.0
  optimizer: str = "adamw"
  moments_dtype: str = "float32"  # adamw first moment; "bfloat16" halves its memory
  compute_dtype: str = "bfloat16"
  param_dtype: str = "float32"
  remat: str = "full"
  train_only: frozenset[str] | None = None
  freeze: frozenset[str] | None = None
  seed: int = 0
  pack: bool = True
  lora: LoraConfig | None = None  # train LoRA adapters only, the rest frozen
  dpo_beta: float | None = None  # DPO (or a kin) on preference pairs (losses.preference_loss) instead of next-token CE
  dpo_loss: str = "sigmoid"  # its kind (losses.DPO_LOSSES)
  dpo_label_smoothing: float = 0.0  # cDPO's, for the sigmoid and simpo kinds
  simpo_gamma: float = 0.5  # SimPO's target margin (TRL's default)
  kto_weights: tuple[float, float] = (1.0, 1.0)  # KTO's desirable and undesirable losses' weights (TRL's)
  grpo_rewards: tuple[str, ...] = ()  # GRPO (grpo.py) with these reward functions (FILE.py:FUNCTION) instead
  grpo_reward_weights: tuple[float, ...] = ()  # one per reward function (TRL's reward_weights; none: all 1)
  grpo_group: int = 8  # completions per prompt (TRL's num_generations)
  grpo_max_new: int = 256  # the most tokens a completion has (TRL's max_completion_length)
  grpo_temperature: float = 1.0  # the completions' sampling temperature (TRL's)
  grpo_top_k: int = 0  # and TRL's other generation settings (0, 1, 0, 1: off); the log-probabilities are the
  grpo_top_p: float = 1.0  # tempered distribution's, not the one these cut (as TRL's)
  grpo_min_p: float = 0.0
  grpo_repetition_penalty: float = 1.0
  grpo_beta: float = 0.0  # the KL penalty's weight against the starting weights (TRL's default 0)
  grpo_scale_rewards: str = "group"  # what divides the advantages (grpo.advantages; TRL's scale_rewards)
  grpo_mask_truncated: bool = False  # no loss on completions cut at grpo_max_new (DAPO's; TRL's option)
  grpo_generation_steps: int = 1  # optimizer steps one generation serves, each on its share of the completions
  grpo_iterations: int = 1  # times each generation is trained on (TRL's num_iterations, the paper's mu)
  grpo_epsilon: float = 0.2  # the ratio's clipping range below 1 (TRL's epsilon)
  grpo_epsilon_high: float | None = None  # and above 1 (None: grpo_epsilon; DAPO's clip-higher: larger); cispo:
  # the largest ratio itself (None: CISPO_EPSILON_HIGH)
  grpo_importance: str = "token"  # the ratio per token or per completion ("sequence": GSPO; losses.PolicyGradient)
  grpo_loss_type: str = "dapo"  # how the loss weighs and averages the tokens (losses.GRPO_LOSS_TYPES)
  grpo_sapo_temperature_pos: float = 1.0  # SAPO's gate temperatures (TRL's defaults)
  grpo_sapo_temperature_neg: float = 1.05
  grpo_top_entropy_quantile: float = 1.0  # the share of loss tokens, the highest-entropy, the policy term keeps
  grpo_entropy_coef: float = 0.0  # the entropy bonus's weight (losses.PolicyGradient)

  @property
  def reference(self) -> bool:
    """Whether the objective reads a reference model's log-probabilities (DPO's kinds but the reference-free, and
    GRPO with a KL penalty)."""
    return (self.dpo_beta is not None and self.dpo_loss not in REFERENCE_FREE) or self.grpo_beta > 0

  @property
  def grpo(self) -> bool:
    return bool(self.grpo_rewards)

  @property
  def kto(self) -> bool:
    return self.dpo_beta is not None and self.dpo_loss == "kto"

  @property
  def grpo_weights(self) -> tuple[float, ...]:
    return self.grpo_reward_weights or (1.0,) * len(self.grpo_rewards)

  @property
  def grpo_cycle(self) -> int:
    """Optimizer steps between two generations: each of their grpo_generation_steps shares, grpo_iterations times."""
    return self.grpo_generation_steps * self.grpo_iterations

  @property
  def grpo_old_logp(self) -> bool:
    """Whether GRPO's rows carry the sampling policy's log-probabilities (the ratio's denominator): when the
    policy moves before a generation's last step."""
    return self.grpo and self.grpo_cycle > 1

  @property
  def grpo_sampling(self) -> Sampling:
    """How GRPO samples its completions."""
    return Sampling(temperature=self.grpo_temperature, top_k=self.grpo_top_k, top_p=self.grpo_top_p,
                    min_p=self.grpo_min_p, repetition_penalty=self.grpo_repetition_penalty)

  @property
  def grpo_reference_copy(self) -> bool:
    """Whether GRPO's KL penalty holds a copy of the starting weights (a full or partial fine-tune; LoRA's
    reference is its base: the adapters at zero)."""
    return self.grpo and self.reference and self.lora is None

  @property
  def policy(self) -> PolicyGradient:
    high = self.grpo_epsilon_high
    if high is None:
      high = CISPO_EPSILON_HIGH if self.grpo_loss_type == "cispo" else self.grpo_epsilon
    return PolicyGradient(self.grpo_beta, self.grpo_epsilon, high, self.grpo_importance, self.grpo_loss_type,
                          sapo_temperature_pos=self.grpo_sapo_temperature_pos,
                          sapo_temperature_neg=self.grpo_sapo_temperature_neg, max_new=self.grpo_max_new,
                          top_entropy_quantile=self.grpo_top_entropy_quantile,
                          entropy_coef=self.grpo_entropy_coef, temperature=self.grpo_temperature)

  @property
  def floats(self) -> tuple[str, ...]:
    """The fp32 [B, T] batch arrays the objective reads besides data.FIELDS (GRPO's old log-probabilities when a
    generation serves more than one step)."""
    return ((data.REFERENCE,) * self.reference + (data.ADVANTAGE,) * self.grpo
            + (data.OLD_LOGP,) * self.grpo_old_logp + (data.LABEL,) * self.kto)

  @property
  def objective(self) -> str:
    """The objective's name in metrics.jsonl."""
    if self.grpo:
      return "grpo_loss"
    if self.dpo_beta is None:
      return "ce"
    return f"{self.dpo_loss}_loss" if self.dpo_loss in REFERENCE_FREE + ("kto",) else "dpo_loss"

  @property
  def warmup(self) -> int:
    return self.warmup_steps if self.warmup_steps >= 0 else min(100, self.steps // 10)

  @property
  def decay(self) -> int:
    return self.decay_steps if self.decay_steps >= 0 else max(1, self.steps // 5)

  def validate(self) -> "TrainConfig":
    for name, least in (("steps", 1), ("batch_size", 1), ("seq_len", 2), ("grad_accum", 1)):  # a row of 1: no target
      if getattr(self, name) < least:
        raise UserError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(self, name)}")
    if not self.lr > 0:
      raise UserError(f"--lr must be > 0, got {self.lr}")
    if self.train_only and self.freeze:
      raise UserError("give --train-only or --freeze, not both")
    if self.optimizer not in OPTIMIZERS:
      raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got '{self.optimizer}'")
    if self.lr_schedule not in SCHEDULES:
      raise UserError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got '{self.lr_schedule}'")
    if self.decay_steps != -1 and self.lr_schedule != "wsd":
      raise UserError("--decay-steps is the wsd schedule's decay: give --lr-schedule wsd too")
    if self.lr_schedule == "wsd" and not 1 <= self.decay <= self.steps - self.warmup:
      raise UserError(f"--decay-steps must be in [1, {self.steps - self.warmup}] (the steps after the "
                      f"{self.warmup} of warmup), got {self.decay}")
    if self.dpo_beta is not None and not self.dpo_beta > 0:
      raise UserError(f"--dpo-beta must be > 0, got {self.dpo_beta}")
    if self.dpo_beta is None and (self.dpo_loss != "sigmoid" or self.dpo_label_smoothing):
      raise UserError("--dpo-loss and --dpo-label-smoothing shape DPO's loss: give --dpo-beta too")
    if self.dpo_loss not in DPO_LOSSES:
      raise UserError(f"--dpo-loss must be one of {', '.join(DPO_LOSSES)}, got '{self.dpo_loss}'")
    smoothed = self.dpo_loss in ("sigmoid", "simpo")  # the kinds with label smoothing
    if not 0 <= self.dpo_label_smoothing < 0.5 or (self.dpo_label_smoothing and not smoothed):
      raise UserError(f"--dpo-label-smoothing must be in [0, 0.5), with --dpo-loss sigmoid or simpo, got "
                      f"{self.dpo_label_smoothing} with {self.dpo_loss}")
    if self.simpo_gamma != TrainConfig.simpo_gamma and (self.dpo_beta is None or self.dpo_loss != "simpo"):
      raise UserError("--simpo-gamma is SimPO's margin: give --dpo-beta and --dpo-loss simpo too")
    if not self.simpo_gamma >= 0:
      raise UserError(f"--simpo-gamma must be >= 0, got {self.simpo_gamma}")
    if self.kto_weights != TrainConfig.kto_weights and not self.kto:
      raise UserError("--kto-desirable-weight / --kto-undesirable-weight weigh KTO's losses: give --dpo-beta and "
                      "--dpo-loss kto too")
    if not all(w > 0 for w in self.kto_weights):
      raise UserError(f"--kto-desirable-weight and --kto-undesirable-weight must be > 0, got {self.kto_weights}")
    if self.grpo:
      self._validate_grpo()
    elif any(getattr(self, k) != getattr(TrainConfig, k) for k in GRPO_SETTINGS):
      raise UserError("the --grpo-* options shape GRPO: give --grpo-reward too")
    if self.lora is not None:
      self.lora.validate()
      if self.train_only or self.freeze:
        raise UserError("--lora-rank trains the adapters and freezes every weight; drop --train-only / --freeze")
    return self

  def _validate_grpo(self) -> None:
    if self.dpo_beta is not None:
      raise UserError("give --grpo-reward or --dpo-beta, not both")
    if self.grpo_reward_weights and (len(self.grpo_reward_weights) != len(self.grpo_rewards)
                                     or not all(math.isfinite(w) for w in self.grpo_reward_weights)):
      raise UserError(f"--grpo-reward-weights: expected a finite number per --grpo-reward ({len(self.grpo_rewards)}), "
                      f"got {', '.join(map(str, self.grpo_reward_weights))}")
    if self.grpo_group < 2:
      raise UserError(f"--grpo-group must be >= 2 (advantages compare a prompt's completions), got {self.grpo_group}")
    rows = self.batch_size * self.grad_accum
    if rows % self.grpo_group:
      raise UserError(f"--batch-size x --grad-accum ({rows} rows, a completion each) must be a multiple of "
                      f"--grpo-group ({self.grpo_group})")
    if not 1 <= self.grpo_max_new < self.seq_len:
      raise UserError(f"--grpo-max-new must be in [1, --seq-len), got {self.grpo_max_new} with --seq-len "
                      f"{self.seq_len}")
    if not self.grpo_temperature > 0:
      raise UserError(f"--grpo-temperature must be > 0 (completions are sampled), got {self.grpo_temperature}")
    self.grpo_sampling.validate(flags="grpo-")
    if self.grpo_scale_rewards not in GRPO_SCALES:
      raise UserError(f"--grpo-scale-rewards must be one of {', '.join(GRPO_SCALES)}, got '{self.grpo_scale_rewards}'")
    if not self.grpo_beta >= 0:
      raise UserError(f"--grpo-beta must be >= 0, got {self.grpo_beta}")
    for name in ("grpo_generation_steps", "grpo_iterations"):
      if getattr(self, name) < 1:
        raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
    if not 0 <= self.grpo_epsilon < 1 or not (self.grpo_epsilon_high or 0) >= 0:
      raise UserError(f"--grpo-epsilon must be in [0, 1) and --grpo-epsilon-high >= 0, got {self.grpo_epsilon} and "
                      f"{self.grpo_epsilon_high}")
    if self.grpo_importance not in IMPORTANCE_LEVELS:
      raise UserError(f"--grpo-importance must be one of {', '.join(IMPORTANCE_LEVELS)}, got '{self.grpo_importance}'")
    if self.grpo_loss_type not in GRPO_LOSS_TYPES:
      raise UserError(f"--grpo-loss-type must be one of {', '.join(GRPO_LOSS_TYPES)}, got '{self.grpo_loss_type}'")
    if self.grpo_loss_type == "cispo" and self.grpo_epsilon_high is not None and not self.grpo_epsilon_high >= 1:
      raise UserError(f"--grpo-loss-type cispo cuts the ratio itself at --grpo-epsilon-high (ScaleRL's "
                      f"{CISPO_EPSILON_HIGH}), which must be >= 1 (below, every token's gradient shrinks), got "
                      f"{self.grpo_epsilon_high}")
    for name in ("grpo_sapo_temperature_pos", "grpo_sapo_temperature_neg"):
      if not getattr(self, name) > 0:
        raise UserError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
    if not 0 <= self.grpo_top_entropy_quantile <= 1:
      raise UserError(f"--grpo-top-entropy-quantile must be in [0, 1], got {self.grpo_top_entropy_quantile}")
    if not self.grpo_entropy_coef >= 0:
      raise UserError(f"--grpo-entropy-coef must be >= 0, got {self.grpo_entropy_coef}")

  def trainable(self, path: str) -> bool:
    if self.lora is not None:
      return is_adapter(path)
    group = param_group(path)
    if self.train_only is not None:
      return group in self.train_only
    return self.freeze is None or group not in self.freeze


def schedule(tc: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0 to lr, then (lr_schedule) cosine or linear decay to lr * min_lr_ratio at the last step,
  or lr to the end ("constant"), or "wsd" (warmup-stable-decay, MiniCPM's): lr, then linear decay to lr *
  min_lr_ratio over the last `decay` steps (a run's stable-phase checkpoints can be continued or cooled down)."""
  low, rest = tc.lr * tc.min_lr_ratio, max(tc.steps - tc.warmup, 1)
  if tc.lr_schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup, max(tc.steps, tc.warmup + 1), low)
  if tc.lr_schedule == "linear":
    decay = optax.linear_schedule(tc.lr, low, rest)
  elif tc.lr_schedule == "constant":
    decay = optax.constant_schedule(tc.lr)
  else:  # wsd
    decay = optax.join_schedules([optax.constant_schedule(tc.lr), optax.linear_schedule(tc.lr, low, tc.decay)],
                                 [rest - tc.decay])
  return optax.join_schedules([optax.linear_schedule(0.0, tc.lr, tc.warmup), decay], [tc.warmup]) if tc.warmup \
    else decay


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
  """Clipped AdamW (or Adafactor); weight decay on matrices only; non-finite updates skipped and counted."""
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
  if tc.optimizer == "adamw":
    inner = optax.adamw(schedule(tc), b1=0.9, b2=0.95, eps=1e-8, weight_decay=tc.weight_decay, mask=decay_mask,
                        mu_dtype=jnp.dtype(tc.moments_dtype))
  else:
    inner = optax.adafactor(schedule(tc), weight_decay_rate=tc.weight_decay or None, weight_decay_mask=decay_mask)
  return optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(tc.clip_norm), inner),
                               max_consecutive_errors=1_000_000)


def split_params(model: nnx.Module, tc: TrainConfig) -> tuple[dict, dict]:
  """(trainable, frozen) nested dicts of the model's parameters, by TrainConfig.train_only / freeze.

  Frozen parameters are only ever read in the compute dtype, so they are held in it (half the memory of
  float32 master weights for bfloat16 compute: frozen experts of A2.7B take 26 GB instead of 52); int8 experts
  and their float32 scales are held as they are.
  """
  flat = checkpoint.flatten(nnx.state(model, nnx.Param))
  trainable = {k: v for k, v in flat.items() if tc.trainable(k)}
  if not trainable:
    raise UserError("--train-only / --freeze leave no parameter to train")
  compute = jnp.dtype(tc.compute_dtype)
  frozen = {k: v if held_as_is(k, v.dtype) else cast(v, compute) for k, v in flat.items() if k not in trainable}
  return checkpoint.unflatten(trainable), checkpoint.unflatten(frozen)


def held_as_is(key: str, dtype: jnp.dtype) -> bool:
  """A frozen parameter kept in its own dtype rather than the compute dtype: int8 experts and their scales."""
  return dtype == jnp.int8 or key.endswith(quantize.SCALES)


def with_adapters(model: QwenMoeForCausalLM, adapters: dict[str, jax.Array] | None, lora: LoraConfig,
                  mesh: jax.sharding.Mesh, dtype: jnp.dtype, kernels: Kernels, seed: int = 0) -> QwenMoeForCausalLM:
  """`model` with LoRA adapters: `adapters` (flat, e.g. restored), or new ones (A random, B zeros) of `dtype`
  created in their shardings on `mesh`."""
  cfg, shards = model.config, sharding.expert_shards(mesh)
  graphdef, abstract = abstract_model(cfg, dtype, shards, kernels, lora)
  if adapters is None:
    wanted = checkpoint.wanted_adapters(cfg, lora, mesh, dtype, kernels)

    @functools.partial(jax.jit, out_shardings={k: v.sharding for k, v in wanted.items()})
    def init():  # the base weights it also draws are unused outputs, which XLA drops
      flat = checkpoint.flatten(nnx.state(QwenMoeForCausalLM(
        cfg, rngs=nnx.Rngs(seed), dtype=dtype, expert_shards=shards, kernels=kernels, lora=lora)))
      return {k: flat[k] for k in wanted}

    adapters = init()
  flat = checkpoint.flatten(nnx.state(model, nnx.Param)) | adapters
  return nnx.merge(graphdef, checkpoint.unflatten_state(abstract, flat))


@functools.partial(jax.jit, static_argnums=1, donate_argnums=0)
def cast(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
  return x.astype(dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepMetrics:
  loss: jax.Array
  value: jax.Array  # the objective (cross-entropy per loss token, or a preference loss per pair)
  aux_loss: jax.Array
  grad_norm: jax.Array
  tokens: jax.Array  # non-padding tokens in the step
  count: jax.Array  # loss tokens, or pairs
  skipped: jax.Array  # steps skipped so far for a non-finite loss or gradient
  expert_load: jax.Array  # [L, E] fraction of routed slots per expert (zeros without sparse layers)
  stats: dict[str, jax.Array]  # LossParts.stats as means over `count` (GRPO's: over loss tokens)


def make_train_step(graphdef: nnx.GraphDef, abstract: nnx.State, tc: TrainConfig,
                    tx: optax.GradientTransformation, aux_coef: float):
  """step(trainable, frozen, opt_state, batch) -> (trainable, opt_state, StepMetrics); batch arrays [K, B, T]."""
  def micro_loss(trainable, frozen, micro, total):
    parts = _loss(graphdef, abstract, tc, trainable, frozen, micro, tc.remat)
    # the objective summed over loss tokens (or pairs) / all those of the step (exact over micro-batches); aux
    # and the bonus averaged per micro-batch
    per_micro = (aux_coef * parts.aux + parts.bonus) / tc.grad_accum
    objective = parts.value * parts.count / jnp.maximum(total, 1.0) + per_micro
    return objective, parts

  def step(trainable, frozen, opt_state, batch):
    total = _count(tc, batch)

    def accumulate(carry, micro):
      grads, sums = carry
      (_, parts), g = jax.value_and_grad(micro_loss, has_aux=True)(trainable, frozen, micro, total)
      load = parts.expert_load if parts.expert_load is not None else jnp.zeros((1, 1), F32)
      sums = jax.tree.map(jnp.add, sums, (parts.value * parts.count, parts.aux, parts.bonus, load,
                                          jnp.sum((micro["segment_ids"] > 0).astype(F32)), parts.stats))
      return (jax.tree.map(jnp.add, grads, g), sums), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    init_sums = (jnp.zeros((), F32), jnp.zeros((), F32), jnp.zeros((), F32), _zero_load(abstract), jnp.zeros((), F32),
                 {k: jnp.zeros((), F32) for k in _stat_names(tc)})
    (grads, (summed, aux, bonus, load, tokens, stats)), _ = jax.lax.scan(accumulate, (zeros, init_sums), batch)
    value, aux, bonus = summed / jnp.maximum(total, 1.0), aux / tc.grad_accum, bonus / tc.grad_accum
    load = load / tc.grad_accum
    per = jnp.sum(batch["loss_mask"].astype(F32)) if tc.grpo else total  # GRPO's stats: means per loss token
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = StepMetrics(loss=value + aux_coef * aux + bonus, value=value, aux_loss=aux,
                          grad_norm=optax.tree.norm(grads), tokens=tokens, count=total,
                          skipped=opt_state.total_notfinite, expert_load=load,
                          stats={k: v / jnp.maximum(per, 1.0) for k, v in stats.items()})
    return trainable, opt_state, metrics

  return step


def make_eval_step(graphdef: nnx.GraphDef, abstract: nnx.State, tc: TrainConfig):
  """eval(trainable, frozen, batch) -> (the objective summed over loss tokens, or pairs; their number); batch
  arrays [1, B, T]."""

  def step(trainable, frozen, batch):
    parts = _loss(graphdef, abstract, tc, trainable, frozen, {k: v[0] for k, v in batch.items()}, "none")
    return parts.value * parts.count, parts.count

  return step


def make_logprob_step(graphdef: nnx.GraphDef, abstract: nnx.State, tc: TrainConfig):
  """logprobs(trainable, frozen, batch) -> each target's log-probability [B, T] fp32 (DPO's reference: the model
  before training; GRPO's: the starting weights, and the policy that sampled the completions); batch arrays [1, B, T].
  GRPO's rows (a completion each) take the loss's unpacked attention and its temperature, so the ratio starts at 1
  up to rounding."""

  def step(trainable, frozen, batch):
    micro = {k: v[0] for k, v in batch.items()}
    model = model_of(graphdef, abstract, tc, trainable, frozen)
    out = model(micro["tokens"], micro["positions"], micro["segment_ids"], packed=not tc.grpo)
    b, t, d = out.hidden.shape
    return -token_nll(out.hidden.reshape(b * t, d), model.lm_head[...], micro["targets"].reshape(-1),
                      temperature=tc.grpo_temperature if tc.grpo else 1.0).reshape(b, t)

  return step


def row_logprobs(logprob_fn, trainable, frozen, rows: dict[str, np.ndarray], batch_size: int,
                 mesh: jax.sharding.Mesh) -> np.ndarray:
  """Each target's log-probability [R, T] fp32 in rows [R, T] (R a multiple of batch_size), under the model these
  parameters make, batch_size rows per call (`logprob_fn`: make_logprob_step's, compiled)."""
  out = []
  for i in range(0, len(rows["tokens"]), batch_size):
    micro = {k: rows[k][None, i:i + batch_size] for k in data.FIELDS}
    out.append(np.asarray(jax.device_get(logprob_fn(trainable, frozen, device_batch(micro, mesh)))))
  return np.concatenate(out)


def reference_logprobs(logprob_fn, trainable, frozen, stream: data.BatchStream, total: int,
                       mesh: jax.sharding.Mesh) -> np.ndarray:
  """Each token's log-probability [total] fp32 under the model these parameters make (DPO's reference: the model
  before training), its data's units one per row (`logprob_fn`: make_logprob_step's, compiled)."""
  out = np.zeros(total, np.float32)
  for rows, units in stream.every_unit():
    logp = jax.device_get(logprob_fn(trainable, frozen, device_batch({k: rows[k][None] for k in data.FIELDS}, mesh)))
    stream.put_back(out, np.asarray(logp), units)
  return out


def model_of(graphdef, abstract, tc: TrainConfig, trainable, frozen) -> QwenMoeForCausalLM:
  """The model made of these parameters, in the compute dtype."""
  flat = checkpoint.flatten(trainable) | checkpoint.flatten(frozen)
  flat = {k: v.astype(tc.compute_dtype) for k, v in flat.items()}
  return nnx.merge(graphdef, checkpoint.unflatten_state(abstract, flat))


def _loss(graphdef, abstract, tc: TrainConfig, trainable, frozen, micro, remat: str):
  """The objective (causal_lm_loss, preference_loss with tc.dpo_beta, policy_gradient_loss with tc.grpo) of the
  model made of these parameters;
  micro arrays [B, T]."""
  model = model_of(graphdef, abstract, tc, trainable, frozen)
  args = (micro["tokens"], micro["targets"], micro["loss_mask"], micro["positions"], micro["segment_ids"])
  if tc.grpo:
    return policy_gradient_loss(model, *args, micro[data.ADVANTAGE], micro.get(data.OLD_LOGP),
                                micro.get(data.REFERENCE), tc.policy, remat)
  if tc.dpo_beta is not None:
    return preference_loss(model, *args, micro.get(data.REFERENCE), tc.dpo_beta, remat, tc.dpo_loss,
                           tc.dpo_label_smoothing, tc.simpo_gamma, micro.get(data.LABEL), tc.kto_weights)
  return causal_lm_loss(model, *args, remat, tc.pack)


def _count(tc: TrainConfig, batch) -> jax.Array:
  """What the objective averages over in a batch [K, B, T]: loss tokens, or pairs (GRPO: see policy_gradient_count)."""
  if tc.dpo_beta is not None:
    return preference_pairs(batch["segment_ids"])
  if tc.grpo:
    return policy_gradient_count(batch["loss_mask"], tc.policy)
  return jnp.sum(batch["loss_mask"].astype(F32))


def _stat_names(tc: TrainConfig) -> tuple[str, ...]:
  if tc.grpo:
    return ("entropy",) + ("clip_ratio",) * (tc.grpo_old_logp and tc.policy.clips) + ("kl",) * tc.reference
  return preference_stats(tc.dpo_loss) if tc.dpo_beta is not None else ()


def _zero_load(abstract: nnx.State) -> jax.Array:
  """[L, E] zeros: one row per sparse layer (a [1, 1] placeholder without any)."""
  flat = checkpoint.flatten(abstract)
  routers = [v for k, v in flat.items() if k.endswith(".mlp.router")]
  return jnp.zeros((len(routers), routers[0].shape[-1]) if routers else (1, 1), F32)


def compile_init(tx: optax.GradientTransformation, trainable):
  """tx.init compiled for `trainable` (arrays or ShapeDtypeStructs with shardings), its outputs placed by
  `opt_state_shardings` (left to jit, AdamW's moments came out replicated on every device)."""
  abstract = jax.eval_shape(tx.init, trainable)
  return jax.jit(tx.init, out_shardings=opt_state_shardings(abstract, trainable)).lower(trainable).compile()


def opt_state_shardings(opt_state, trainable):
  """A leaf of the optimizer state at a parameter's path with the parameter's shape (AdamW's moments, Adafactor's
  unfactored second moment) gets the parameter's sharding; the rest (step counts, Adafactor's row and column
  factors, which are small) is replicated."""
  params = {jax.tree_util.keystr(path): x for path, x in jax.tree_util.tree_leaves_with_path(trainable)}
  mesh = next(iter(params.values())).sharding.mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def place(path, leaf):
    for start in range(len(path)):  # the longest path suffix that names a parameter
      param = params.get(jax.tree_util.keystr(path[start:]))
      if param is not None:
        return param.sharding if param.shape == leaf.shape else replicated
    return replicated

  return jax.tree_util.tree_map_with_path(place, opt_state)


def compile_step(step_fn, trainable, frozen, opt_state, batch_shape: dict[str, jax.ShapeDtypeStruct]):
  """jit with the inputs' shardings as the outputs' too, donating params and optimizer state."""
  def shardings(tree):
    return jax.tree.map(lambda x: x.sharding, tree)
  jitted = jax.jit(step_fn, donate_argnums=(0, 2),
                   out_shardings=(shardings(trainable), shardings(opt_state), None))
  return jitted.lower(trainable, frozen, opt_state, batch_shape).compile()


def batch_sharding(mesh: jax.sharding.Mesh, shape: tuple[int, int, int]) -> jax.sharding.NamedSharding:
  """[K, B, T]: rows over the batch axes."""
  return jax.sharding.NamedSharding(mesh, sharding.spec_for((None, "batch", None), shape, mesh, "batch"))


def batch_spec(mesh: jax.sharding.Mesh, shape: tuple[int, int, int],
               floats: tuple[str, ...] = ()) -> dict[str, jax.ShapeDtypeStruct]:
  """The abstract batch (every data.FIELDS array int32 [K, B, T], and the `floats` fp32 (TrainConfig.floats), rows
  over the batch axes) to compile a step for."""
  fields = {k: jnp.int32 for k in data.FIELDS} | {k: jnp.float32 for k in floats}
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, shape)) for k, dtype in fields.items()}


def device_batch(arrays: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Host arrays [K, B, T] (the same on every process) -> global arrays split over the batch axes."""
  out = {}
  for name, a in arrays.items():
    s = batch_sharding(mesh, a.shape)
    out[name] = jax.make_array_from_callback(a.shape, s, lambda idx, a=a: a[idx])
  return out
