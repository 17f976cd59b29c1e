"""Training losses: next-token cross-entropy (chunked over tokens), a preference loss over pairs of answers (DPO
and its kin), or GRPO's policy-gradient loss over sampled completions, plus the router load-balancing loss.

Neither materialises fp32 logits for all tokens at once: tokens go through the LM head in chunks under
`jax.checkpoint`, so the backward pass recomputes one chunk's [C, V] logits at a time.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from qwen_moe_jax.layers import F32
from qwen_moe_jax.model import QwenMoeForCausalLM
from qwen_moe_jax.moe import load_balancing_loss

LOSS_CHUNK = 1024  # tokens per LM-head chunk


def token_scores(hidden: jax.Array, lm_head: jax.Array, targets: jax.Array, chunk: int = LOSS_CHUNK,
                 temperature: float = 1.0) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
  """hidden [N, D], lm_head [D, V], targets [N] -> (fp32 NLL of each target [N], its rank [N]: 1 + the ids with a
  higher logit, 1 for the greedy choice; the greedy choice [N] and its fp32 log-probability [N]; the fp32 entropy
  of the distribution [N], in nats), the LM head run `chunk` tokens at a time; under `temperature`, of the fp32
  logits divided by it."""
  n = hidden.shape[0]
  chunk = min(chunk, n)
  pad = -n % chunk
  hidden, targets = jnp.pad(hidden, ((0, pad), (0, 0))), jnp.pad(targets, (0, pad))

  @jax.checkpoint
  def score(args):
    h, t = args  # [C, D], [C]
    logits = jnp.einsum("CD,DV->CV", h, lm_head, preferred_element_type=F32)
    if temperature != 1.0:
      logits = logits / temperature
    target = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]  # [C]
    lse = jax.nn.logsumexp(logits, axis=-1)
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    entropy = lse - jnp.sum(jnp.exp(logits - lse[:, None]) * logits, axis=-1)  # -sum p log p
    return (lse - target, 1 + jnp.sum(logits > target[:, None], axis=-1, dtype=jnp.int32), best,
            jnp.take_along_axis(logits, best[:, None], axis=-1)[:, 0] - lse, entropy)

  out = jax.lax.map(score, (hidden.reshape(-1, chunk, hidden.shape[-1]), targets.reshape(-1, chunk)))
  return tuple(x.reshape(-1)[:n] for x in out)


def token_nll(hidden: jax.Array, lm_head: jax.Array, targets: jax.Array, chunk: int = LOSS_CHUNK,
              temperature: float = 1.0) -> jax.Array:
  """The NLL of `token_scores` (XLA drops the unused ranks, greedy choices and entropies: the compiled program is the
  same)."""
  return token_scores(hidden, lm_head, targets, chunk, temperature)[0]


def chunked_cross_entropy(hidden: jax.Array, lm_head: jax.Array, targets: jax.Array, mask: jax.Array,
                          chunk: int = LOSS_CHUNK) -> tuple[jax.Array, jax.Array]:
  """hidden [N, D], lm_head [D, V], targets / mask [N] -> (sum of masked NLL, number of masked tokens)."""
  mask = mask.astype(F32)
  return jnp.sum(token_nll(hidden, lm_head, targets, chunk) * mask), jnp.sum(mask)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LossParts:
  total: jax.Array  # value + router_aux_loss_coef * aux + bonus
  value: jax.Array  # the objective's mean over `count`: next-token NLL per loss token, or a preference loss per pair
  aux: jax.Array  # load-balancing loss (0 without sparse layers)
  count: jax.Array  # number of loss tokens, or of pairs
  expert_load: jax.Array | None  # [L, E] fraction of routed slots per expert and sparse layer
  stats: dict[str, jax.Array] = dataclasses.field(default_factory=dict)  # sums over `count` to log as means
  # (preference_stats)
  bonus: jax.Array = 0.0  # a term averaged per micro-batch as aux is, not over `count`: GRPO's entropy bonus


def causal_lm_loss(model: QwenMoeForCausalLM, tokens: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                   positions: jax.Array, segment_ids: jax.Array, remat: str = "none", packed: bool = True) -> LossParts:
  """tokens / targets / loss_mask / positions / segment_ids [B, T]; segment 0 is padding; `packed` False: one
  document per row (see layers.Mask)."""
  out = model(tokens, positions, segment_ids, remat=remat, packed=packed)
  b, t, d = out.hidden.shape
  nll_sum, count = chunked_cross_entropy(out.hidden.reshape(b * t, d), model.lm_head[...],
                                         targets.reshape(-1), loss_mask.reshape(-1))
  return _with_router_loss(model, out, segment_ids, nll_sum / jnp.maximum(count, 1.0), count)


IMPORTANCE_LEVELS = ("token", "sequence")  # PolicyGradient.importance's (TRL's importance_sampling_level)
GRPO_LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo")  # PolicyGradient.loss_type's (TRL's names)


@dataclasses.dataclass(frozen=True)
class PolicyGradient:
  """GRPO's loss settings, as TRL's GRPOConfig names them."""
  beta: float = 0.0  # the KL penalty's weight
  epsilon: float = 0.2  # ratios below 1 - epsilon are clipped where the advantage is negative
  epsilon_high: float = 0.2  # above 1 + epsilon_high where it is positive (DAPO's clip-higher: a larger one)
  importance: str = "token"  # the ratio per token, or per completion ("sequence": GSPO's)
  loss_type: str = "dapo"  # per_token's mean over the step's tokens (dapo, cispo), over each completion then the
  # completions (grpo, sapo), over each micro-batch's tokens then the micro-batches (bnpo), or its sum over the
  # completions' max_new slots (dr_grpo); cispo and sapo weigh the tokens their own way (policy_gradient_loss)
  sapo_temperature_pos: float = 1.0  # SAPO's gate temperature where the advantage is > 0
  sapo_temperature_neg: float = 1.05  # and where it is <= 0
  max_new: int = 256  # the most tokens a completion has (max_completion_length)
  top_entropy_quantile: float = 1.0  # the share of a micro-batch's loss tokens, those of highest entropy, whose
  # policy term counts (TRL's, the "80/20" paper's rho; 1: all)
  entropy_coef: float = 0.0  # the weight of the entropy bonus: minus the mean entropy of the loss tokens the policy
  # term counts at, per micro-batch (TRL's entropy_coef)
  temperature: float = 1.0  # the completions' sampling temperature: log pi is of the logits divided by it, the
  # distribution they were drawn from (TRL's, and the old and reference log-probabilities' too)

  @property
  def clips(self) -> bool:
    """Whether some ratios are clipped (counted in stats' clip_ratio): all but SAPO's soft gate."""
    return self.loss_type != "sapo"


def policy_gradient_count(loss_mask: jax.Array, pg: PolicyGradient) -> jax.Array:
  """What GRPO's loss averages over in rows loss_mask [..., B, T] (a completion each): their loss tokens (dapo,
  cispo), their completions (grpo, sapo), their completions' max_new slots (dr_grpo) or their micro-batches (bnpo:
  each [B, T] counts once, its mean over its own loss tokens)."""
  if pg.loss_type in ("dapo", "cispo"):
    return jnp.sum(loss_mask.astype(F32))
  if pg.loss_type == "bnpo":
    return jnp.asarray(math.prod(loss_mask.shape[:-2]), F32)
  return jnp.asarray(math.prod(loss_mask.shape[:-1]) * (pg.max_new if pg.loss_type == "dr_grpo" else 1), F32)


def policy_gradient_loss(model: QwenMoeForCausalLM, tokens: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                         positions: jax.Array, segment_ids: jax.Array, advantage: jax.Array,
                         old_logp: jax.Array | None = None, ref_logp: jax.Array | None = None,
                         pg: PolicyGradient = PolicyGradient(), remat: str = "none") -> LossParts:
  """GRPO's loss as TRL's GRPOTrainer computes it: each completion token's -min(w A, clip(w, 1 - epsilon, 1 +
  epsilon_high) A) + beta KL, averaged as pg.loss_type says (policy_gradient_count); CISPO (MiniMax-M1) instead
  weighs the policy gradient by the ratio cut at epsilon_high and held constant, -sg(min(w, epsilon_high)) A log pi,
  and SAPO (the Qwen team's) gates the ratio softly, -sigmoid(tau (w - 1)) 4 / tau A, tau its temperature for A > 0
  or A <= 0 (as TRL's loss types). w = pi / pi_old: the token's
  ratio exp(log pi - log pi_old), or with pg.importance "sequence" (GSPO) its completion's exp(mean over its tokens
  of log pi - log pi_old). pi_old: old_logp [B, T] fp32, the log-probabilities of the policy that sampled them
  (when it has since been updated: several steps per generation); without it, stop_gradient(log pi), so w = 1 and
  the loss's gradient is the policy gradient -A grad log pi (averaged). KL: the estimate exp(r) - r - 1 of r =
  log ref - log pi (Schulman's k3), ref_logp [B, T] fp32 the reference model's (with pg.beta > 0). `stats` sum over
  the loss tokens their KL ("kl") and with old_logp whether their ratio was clipped ("clip_ratio", as TRL's
  clip_ratio/region_mean) and their entropy ("entropy"). With pg.top_entropy_quantile < 1, the policy term counts
  only at the loss tokens whose entropy is at least that quantile's from the top of the micro-batch's (TRL's
  top_entropy_quantile); the KL term and the averaging are unchanged. With pg.entropy_coef, `bonus` is -entropy_coef
  x the mean entropy of the tokens where the policy term counts (TRL's entropy bonus). Arrays [B, T] as
  causal_lm_loss's, one completion per row (grpo.rows); advantage [B, T] fp32: each target's. log pi and the entropy
  are the tempered distribution's (pg.temperature), as the completions were sampled."""
  out = model(tokens, positions, segment_ids, remat=remat, packed=False)
  b, t, d = out.hidden.shape
  nll, *_, entropy = token_scores(out.hidden.reshape(b * t, d), model.lm_head[...], targets.reshape(-1),
                                  temperature=pg.temperature)
  logp, entropy = -nll.reshape(b, t), entropy.reshape(b, t)
  if not pg.entropy_coef:  # (its gradient is the bonus's alone)
    entropy = jax.lax.stop_gradient(entropy)
  mask = loss_mask.astype(F32)
  log_ratio = logp - (jax.lax.stop_gradient(logp) if old_logp is None else old_logp)
  if pg.importance == "sequence":  # [B, 1]: each completion's mean log-ratio weighs all its tokens
    log_ratio = jnp.sum(log_ratio * mask, -1, keepdims=True) / jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1.0)
  ratio = jnp.exp(log_ratio)
  if pg.loss_type == "cispo":
    per_token = -jax.lax.stop_gradient(jnp.minimum(ratio, pg.epsilon_high)) * advantage * logp
    clipped = (ratio > pg.epsilon_high) & (advantage > 0)
  elif pg.loss_type == "sapo":
    tau = jnp.where(advantage > 0, pg.sapo_temperature_pos, pg.sapo_temperature_neg)
    per_token = -jax.nn.sigmoid(tau * (ratio - 1)) * 4 / tau * advantage
  else:
    per_token = -jnp.minimum(ratio * advantage, jnp.clip(ratio, 1 - pg.epsilon, 1 + pg.epsilon_high) * advantage)
    clipped = ((ratio < 1 - pg.epsilon) & (advantage < 0)) | ((ratio > 1 + pg.epsilon_high) & (advantage > 0))
  learned = mask  # where the policy term counts
  if pg.top_entropy_quantile < 1:
    threshold = jnp.nanquantile(jnp.where(mask > 0, entropy, jnp.nan), 1 - pg.top_entropy_quantile)  # (torch's
    learned = mask * (entropy >= threshold)  # linear interpolation; no loss tokens: nan, nothing counts)
    per_token = per_token * learned
  bonus = -pg.entropy_coef * jnp.sum(entropy * learned) / jnp.maximum(jnp.sum(learned), 1.0)
  stats = {"entropy": jnp.sum(entropy * mask)}
  if old_logp is not None and pg.clips:
    stats["clip_ratio"] = jnp.sum(clipped * mask)
  if ref_logp is not None:
    r = ref_logp - logp
    kl = jnp.exp(r) - r - 1
    per_token = per_token + pg.beta * kl
    stats["kl"] = jnp.sum(kl * mask)
  if pg.loss_type in ("grpo", "sapo"):  # each completion's mean, summed
    summed = jnp.sum(jnp.sum(per_token * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0))
  else:
    summed = jnp.sum(per_token * mask)
  count = policy_gradient_count(loss_mask, pg)
  per = jnp.sum(mask) if pg.loss_type == "bnpo" else count  # bnpo: the micro-batch's mean, which counts once
  return _with_router_loss(model, out, segment_ids, summed / jnp.maximum(per, 1.0), count, stats, bonus)


DPO_LOSSES = ("sigmoid", "hinge", "ipo", "simpo", "orpo", "kto")  # preference_loss's kinds (TRL's loss_type names)
REFERENCE_FREE = ("simpo", "orpo")  # the kinds without a reference model
PREFERENCE_STATS = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")  # preference_loss's
ORPO_STATS = ("nll_loss", "log_odds_ratio")  # and ORPO's, as TRL's ORPOTrainer logs them
KTO_STATS = ("reward_accuracy", "kl")  # KTO's instead


def preference_stats(kind: str) -> tuple[str, ...]:
  """The stats preference_loss of this kind sums."""
  if kind == "kto":
    return KTO_STATS
  return PREFERENCE_STATS + (ORPO_STATS if kind == "orpo" else ())


def preference_pairs(segment_ids: jax.Array) -> jax.Array:
  """segment_ids [..., B, T] of rows holding preference pairs (chosen, rejected as segments 2k + 1, 2k + 2) -> the
  number of pairs."""
  return jnp.sum(jnp.max(segment_ids, axis=-1) // 2).astype(F32)


def preference_loss(model: QwenMoeForCausalLM, tokens: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                    positions: jax.Array, segment_ids: jax.Array, ref_logp: jax.Array | None, beta: float,
                    remat: str = "none", kind: str = "sigmoid", label_smoothing: float = 0.0,
                    gamma: float = 0.0, label: jax.Array | None = None,
                    kto_weights: tuple[float, float] = (1.0, 1.0)) -> LossParts:
  """A preference loss averaged over pairs, as TRL computes it (`kind`). DPO's (Rafailov et al. 2023) are losses of
  the margin m = beta ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))): "sigmoid",
  DPO's -log sigmoid(m), with `label_smoothing` e (cDPO: the labels flipped with probability e) -(1 - e)
  log sigmoid(m) - e log sigmoid(-m); "hinge" (SLiC) relu(1 - m); "ipo" (Azar et al. 2023)
  (m / beta - 1 / (2 beta))^2, its log-probabilities averaged over the answer's tokens instead of summed.
  The reference-free kinds (ref_logp None) take each answer's mean token log-probability lp: "simpo" (Meng et al.
  2024; TRL's CPOTrainer) is the sigmoid loss of beta (lp(chosen) - lp(rejected)) - `gamma`, label smoothing too;
  "orpo" (Hong et al. 2024; `beta` its lambda) -lp(chosen) - beta log sigmoid(log odds(chosen) - log odds(rejected)),
  odds(y) = p / (1 - p) of p = exp lp(y): the chosen answer's NLL plus the odds ratio's loss, per pair (the paper's
  mean; TRL's ORPOTrainer averages the NLL over the batch's chosen tokens instead).
  "kto" (Ethayarajh et al. 2024; TRL's KTOTrainer): a unit is a line's completion z (its log-ratio log pi - log ref)
  and, in place of the rejected answer, the line's prompt with another line's completion, whose log-ratios' mean
  over the batch, at least 0 and without gradient, estimates the KL term; the loss of a desirable completion
  (`label` [B, T] fp32 1 on its unit) is w_d (1 - sigmoid(beta (z - KL))), of an undesirable one w_u (1 -
  sigmoid(beta (KL - z))), `kto_weights` (w_d, w_u); its stats (KTO_STATS) the units ranked right (z above KL for
  desirable completions, below for undesirable ones) and the KL estimate (times the units).
  Arrays [B, T] as causal_lm_loss's, each row holding whole pairs (the chosen answer's document, then the rejected
  one's, as segments 2k + 1 and 2k + 2); ref_logp [B, T] fp32: the reference model's log-probability of each
  target. A sequence's log-probability sums its loss tokens' (the answer's). `stats` sums each pair's reward
  accuracy (chosen above rejected), margin and rewards (beta times the log-ratios, or SimPO's and ORPO's beta times
  the mean log-probabilities), and ORPO's NLL and log odds ratio, as TRL logs them. The two documents of a pair
  always share a row: the segments' mask."""
  out = model(tokens, positions, segment_ids, remat=remat, packed=True)
  b, t, d = out.hidden.shape
  logp = -token_nll(out.hidden.reshape(b * t, d), model.lm_head[...], targets.reshape(-1))  # [B T]
  if ref_logp is not None:
    logp = logp - ref_logp.reshape(-1)
  mask = loss_mask.reshape(-1).astype(F32)
  rows = jnp.broadcast_to(jnp.arange(b)[:, None] * (t + 1), (b, t))
  segments = (rows + segment_ids).reshape(-1)
  per_segment = jax.ops.segment_sum(logp * mask, segments, num_segments=b * (t + 1)).reshape(b, t + 1)  # [B, S]:
  # segment s of row b
  if kind in ("ipo",) + REFERENCE_FREE:  # each answer's mean
    per_segment = per_segment / jnp.maximum(jax.ops.segment_sum(mask, segments, b * (t + 1)).reshape(b, t + 1), 1.0)
  pairs = t // 2
  chosen_lp, rejected_lp = per_segment[:, 1:2 * pairs:2], per_segment[:, 2:2 * pairs + 1:2]  # [B, P]
  chosen, rejected = beta * chosen_lp, beta * rejected_lp
  real = (jnp.arange(pairs)[None] < (jnp.max(segment_ids, axis=-1) // 2)[:, None]).astype(F32)  # [B, P]
  margin = chosen - rejected
  count = jnp.sum(real)
  stats = dict(zip(PREFERENCE_STATS, (jnp.sum(x * real) for x in (margin > 0, margin, chosen, rejected))))
  if kind in ("sigmoid", "simpo"):
    z = margin - (gamma if kind == "simpo" else 0.0)
    losses = -(1 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
  elif kind == "hinge":
    losses = jax.nn.relu(1 - margin)
  elif kind == "ipo":
    losses = (margin / beta - 1 / (2 * beta)) ** 2
  elif kind == "kto":
    desirable = jax.ops.segment_sum(label.reshape(-1), segments, b * (t + 1)).reshape(b, t + 1)[:, 1:2 * pairs:2] > 0
    kl = jax.lax.stop_gradient(jnp.maximum(jnp.sum(rejected_lp * real) / jnp.maximum(count, 1.0), 0.0))
    z = chosen_lp - kl
    losses = jnp.where(desirable, kto_weights[0] * (1 - jax.nn.sigmoid(beta * z)),
                       kto_weights[1] * (1 - jax.nn.sigmoid(-beta * z)))
    stats = {"reward_accuracy": jnp.sum(jnp.where(desirable, z > 0, z < 0) * real), "kl": kl * count}
  else:
    assert kind == "orpo", kind
    ratio = _log_odds(chosen_lp) - _log_odds(rejected_lp)
    losses = -chosen_lp - beta * jax.nn.log_sigmoid(ratio)
    stats |= {"nll_loss": jnp.sum(-chosen_lp * real), "log_odds_ratio": jnp.sum(ratio * real)}
  value = jnp.sum(losses * real) / jnp.maximum(count, 1.0)
  return _with_router_loss(model, out, segment_ids, value, count, stats)


def _log_odds(lp: jax.Array) -> jax.Array:
  """log(p / (1 - p)) of p = exp(lp), p held below 1 (an answer of certain tokens would give inf)."""
  lp = jnp.minimum(lp, -1e-6)
  return lp - jnp.log(-jnp.expm1(lp))


def _with_router_loss(model: QwenMoeForCausalLM, out, segment_ids: jax.Array, value: jax.Array, count: jax.Array,
                      stats: dict[str, jax.Array] | None = None, bonus: jax.Array = 0.0) -> LossParts:
  """LossParts of an objective's value, with the load-balancing loss over every non-padding token (transformers
  masks padding the same way) and the experts' load."""
  cfg = model.config
  aux, load = jnp.zeros((), F32), None
  if out.router_logits is not None:
    real = (segment_ids.reshape(-1) > 0).astype(F32)
    aux = load_balancing_loss(out.router_logits, cfg.num_experts_per_tok, real)
    chosen = jax.lax.top_k(out.router_logits.astype(F32), cfg.num_experts_per_tok)[1]  # [L, N, K]
    hits = jnp.einsum("LNKE,N->LE", jax.nn.one_hot(chosen, cfg.num_experts, dtype=F32), real)
    load = hits / jnp.maximum(jnp.sum(hits, axis=-1, keepdims=True), 1.0)
  return LossParts(value + cfg.router_aux_loss_coef * aux + bonus, value, aux, count, load, stats or {},
                   jnp.asarray(bonus, F32))
