"""Numerical parity with transformers' Qwen2MoeForCausalLM (fp32 and bf16), built in the test."""

from __future__ import annotations

import dataclasses
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

from hf_models import make_model, save
from qwen_moe_jax import checkpoint, convert, data, grpo, hf_layout, layers, quantize, sharding
from qwen_moe_jax import lora as lora_lib
from qwen_moe_jax import model as model_module
from qwen_moe_jax.config import PRESETS
from qwen_moe_jax.demo import demo_config
from qwen_moe_jax.kernels import Kernels
from qwen_moe_jax.losses import (
  PolicyGradient,
  causal_lm_loss,
  policy_gradient_loss,
  preference_loss,
  preference_stats,
)
from qwen_moe_jax.model import QwenMoeForCausalLM, create_model, param_count
from qwen_moe_jax.moe import (
  ExpertLora,
  ExpertScales,
  experts_dense,
  experts_gathered,
  experts_sorted,
  load_balancing_loss,
  route,
  routed_experts,
)

CONFIGS = {
  "gqa": dict(),
  "mha_norm_topk": dict(num_key_value_heads=6, norm_topk_prob=True),
  "sparse_step2": dict(num_hidden_layers=4, decoder_sparse_step=2),
  "mlp_only_layers": dict(num_hidden_layers=4, mlp_only_layers=[0, 2]),
  "many_experts": dict(num_experts=24, num_experts_per_tok=6, norm_topk_prob=True),
  "top1_no_bias": dict(num_experts_per_tok=1, qkv_bias=False),
  "rope_linear": dict(rope={"rope_type": "linear", "factor": 2.5}),
  "rope_yarn": dict(max_position_embeddings=64, rope={"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 16}),
}


def convert_and_restore(hf_model, tmp_path, dtype=jnp.float32, kernels=Kernels(), **save_kwargs):
  save(hf_model, tmp_path / "hf", **save_kwargs)
  convert.import_hf(tmp_path / "hf", tmp_path / "ckpt", progress=False)
  return checkpoint.restore(tmp_path / "ckpt", dtype=dtype, kernels=kernels)


def hf_router_outputs(hf_model):
  """Forward hooks on every router: (top-k weights, top-k indices) per sparse layer."""
  captured = []
  hooks = [m.register_forward_hook(lambda mod, inp, out: captured.append((out[1], out[2])))
           for name, m in hf_model.named_modules() if name.endswith("mlp.gate")]
  return captured, hooks


def run_both(hf_model, model, ids):
  captured, hooks = hf_router_outputs(hf_model)
  with torch.no_grad():
    ref = hf_model(torch.tensor(ids), output_hidden_states=True, output_router_logits=True)
  for h in hooks:
    h.remove()
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  out = model(jnp.asarray(ids), positions, return_layer_outputs=True)
  return ref, captured, out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fp32_parity(name, tmp_path):
  hf_model = make_model(seed=sorted(CONFIGS).index(name), **CONFIGS[name])
  model = convert_and_restore(hf_model, tmp_path)
  ids = np.random.default_rng(1).integers(0, hf_model.config.vocab_size, (3, 17))
  ref, captured, out = run_both(hf_model, model, ids)

  logits = np.asarray(model.logits(out.hidden))
  ref_logits = ref.logits.numpy()
  scale = np.abs(ref_logits).max()
  assert scale > 1.0, "test weights too small to tell routers apart"
  np.testing.assert_allclose(logits, ref_logits, atol=2e-5 * scale, rtol=0)
  assert (logits.argmax(-1) == ref_logits.argmax(-1)).all()

  # per-layer hidden states: transformers gives the embeddings, then each layer's output (the last normed)
  ours = [np.asarray(h) for h in out.layer_outputs[:-1]] + [np.asarray(out.hidden)]
  for i, (a, b) in enumerate(zip(ours, ref.hidden_states[1:], strict=True)):
    np.testing.assert_allclose(a, b.numpy(), atol=2e-5 * np.abs(b.numpy()).max(), err_msg=f"layer {i}")

  # router: logits, top-k experts and weights of every sparse layer
  assert out.router_logits.shape[0] == len(captured) == len(ref.router_logits)
  for layer, ((w_ref, i_ref), logits_ref) in enumerate(zip(captured, ref.router_logits)):
    np.testing.assert_allclose(np.asarray(out.router_logits[layer]), logits_ref.numpy(), atol=1e-5)
    cfg = model.config
    _, w, idx = route_from_logits(out.router_logits[layer], cfg.num_experts_per_tok, cfg.norm_topk_prob)
    np.testing.assert_array_equal(np.asarray(idx), i_ref.numpy())
    np.testing.assert_allclose(np.asarray(w), w_ref.numpy(), atol=1e-6)

  aux = load_balancing_loss(out.router_logits, model.config.num_experts_per_tok)
  np.testing.assert_allclose(float(aux), float(ref.aux_loss), rtol=1e-6)


def route_from_logits(logits, k, normalize):
  """route() applied to given logits: identity router on a one-hot basis."""
  e = logits.shape[-1]
  return route(logits, jnp.eye(e, dtype=logits.dtype), k, normalize)


def test_aux_loss_with_padding_mask_matches_transformers():
  rng = np.random.default_rng(0)
  layers, n, e, k = 3, 40, 9, 3
  logits = rng.normal(size=(layers, n, e)).astype(np.float32) * 2
  mask = (rng.random((4, 10)) > 0.3).astype(np.float32)
  ref = load_balancing_loss_func(tuple(torch.tensor(x) for x in logits), e, k, torch.tensor(mask))
  ours = load_balancing_loss(jnp.asarray(logits), k, jnp.asarray(mask.reshape(-1)))
  np.testing.assert_allclose(float(ours), float(ref), rtol=1e-6)
  unmasked = load_balancing_loss_func(tuple(torch.tensor(x) for x in logits), e, k)
  np.testing.assert_allclose(float(load_balancing_loss(jnp.asarray(logits), k)), float(unmasked), rtol=1e-6)
  assert abs(float(ours) - float(unmasked)) > 1e-4  # the mask matters


def test_gradients_match_torch_autograd(tmp_path):
  hf_model = make_model(seed=5, num_hidden_layers=4, decoder_sparse_step=2, router_aux_loss_coef=0.3)
  model = convert_and_restore(hf_model, tmp_path)
  ids = np.random.default_rng(2).integers(0, hf_model.config.vocab_size, (2, 12))

  hf_model.train()
  out = hf_model(torch.tensor(ids), labels=torch.tensor(ids), output_router_logits=True)
  out.loss.backward()
  torch_grads = {n: p.grad.numpy() for n, p in hf_model.named_parameters() if p.grad is not None}

  tokens = jnp.asarray(ids)
  targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
  mask = jnp.ones_like(tokens).at[:, -1].set(0)
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  graphdef, params = nnx.split(model)

  def loss_fn(params):
    parts = causal_lm_loss(nnx.merge(graphdef, params), tokens, targets, mask, positions, jnp.ones_like(tokens))
    return parts.total, parts

  (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  np.testing.assert_allclose(float(loss), float(out.loss.detach()), rtol=1e-5)
  np.testing.assert_allclose(float(parts.aux), float(out.aux_loss.detach()), rtol=1e-5)

  assert_grads_match(model, grads, torch_grads, (
    "embed_tokens", "layers.1.self_attn.q_proj", "layers.1.mlp.gate.", "experts.3.", "shared_expert_gate",
    "layers.0.mlp.up_proj", "lm_head", "layers.3.input_layernorm", "self_attn.k_proj.bias"), least=12)


def assert_grads_match(model, grads, torch_grads: dict, names: tuple[str, ...], least: int) -> None:
  """Our gradients (nested, as nnx.split's params) of the HF parameters whose names contain one of `names` equal
  torch's (in its layout); at least `least` of them are checked."""
  flat = checkpoint.flatten(grads)
  checked = 0
  for b in hf_layout.hub_bindings(model.config, checkpoint.param_shapes(model.config)):
    if b.hf not in torch_grads or not any(s in b.hf for s in names):
      continue
    ours = np.asarray(b.row.transform[1](np.asarray(flat[b.path])[b.part], b.heads(model.config)))
    ref = torch_grads[b.hf]
    np.testing.assert_allclose(ours, ref, atol=1e-5 * max(1e-3, np.abs(ref).max()), err_msg=b.hf)
    checked += 1
  assert checked >= least


def _three_units(tmp_path):
  """transformers' tiny model, ours converted from it, the rng that drew them, and six Documents, each a prompt
  then an answer (its loss tokens): three units of two (DPO's pairs, KTO's completion and mismatched one)."""
  hf_model = make_model(seed=6, num_hidden_layers=2, router_aux_loss_coef=0.0)
  model = convert_and_restore(hf_model, tmp_path)
  rng = np.random.default_rng(4)
  docs = []
  for n in (9, 7, 8, 11, 10, 6):
    tokens = rng.integers(0, hf_model.config.vocab_size, n)
    docs.append(data.Document(tuple(tokens.tolist()), tuple(int(j >= n // 2) for j in range(n))))
  return hf_model, model, rng, data.Documents.of(docs)


def _torch_answer_logps(hf_model, documents: data.Documents, reference: np.ndarray | None,
                        mean: bool = False) -> list[torch.Tensor]:
  """Each document alone through transformers (train mode, autograd on): its answer tokens' log-probabilities,
  less the reference's (`reference` [total], as Documents.tokens; None: no reference), summed (or averaged)."""
  hf_model.train()
  out = []
  for i, start in enumerate(documents.offsets[:-1]):
    doc = documents[i]
    ids = torch.tensor([doc.tokens])
    lp = torch.log_softmax(hf_model(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
    mask = torch.tensor(doc.loss_mask[1:], dtype=torch.float32)
    ratio = ((lp - (0 if reference is None else torch.tensor(reference[start + 1:start + len(doc.tokens)])))
             * mask).sum()
    out.append(ratio / mask.sum() if mean else ratio)
  return out


@pytest.mark.parametrize("kind,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0),
                                             ("simpo", 0.0), ("simpo", 0.1), ("orpo", 0.0)])
def test_dpo_loss_and_gradients_match_torch(tmp_path, kind, smoothing):
  """preference_loss over packed rows (two pairs in a row, one in another, padding) equals DPO computed in torch
  pair by pair, each sequence alone through transformers (its answer tokens' log-probabilities summed, minus the
  reference's; averaged for IPO, and without a reference for SimPO and ORPO), and so do its gradients (autograd);
  its stats are the pairs' rewards (and ORPO's NLL and log odds ratio). Each of TRL's loss types we take, by TRL's
  formulas: sigmoid (with cDPO's label smoothing), hinge, ipo, CPOTrainer's simpo (with label smoothing) and
  ORPOTrainer's odds ratio (its NLL the paper's, per pair)."""
  hf_model, model, rng, documents = _three_units(tmp_path)
  free = kind in ("simpo", "orpo")
  reference = None if free else rng.uniform(-4, -1, len(documents.tokens)).astype(np.float32)
  batch = data.BatchStream(documents, 36, batch_size=2, seed=1, pairs=True, reference=reference).batch(0)
  assert sorted(int(s.max()) for s in batch["segment_ids"]) == [2, 4] and (data.REFERENCE in batch) != free
  beta, gamma = 0.3, 0.4

  logp = _torch_answer_logps(hf_model, documents, reference, mean=kind in ("ipo", "simpo", "orpo"))
  lc, lr = torch.stack(logp[0::2]), torch.stack(logp[1::2])
  m = beta * (lc - lr)
  z = m - gamma if kind == "simpo" else m
  log_odds = (lc - lr) - (torch.log1p(-torch.exp(lc)) - torch.log1p(-torch.exp(lr)))
  loss = {"sigmoid": -(1 - smoothing) * F.logsigmoid(z) - smoothing * F.logsigmoid(-z), "hinge": torch.relu(1 - m),
          "ipo": (m / beta - 1 / (2 * beta)) ** 2, "orpo": -lc - beta * F.logsigmoid(log_odds)}[
    "sigmoid" if kind == "simpo" else kind].mean()
  loss.backward()
  torch_grads = {n: p.grad.numpy() for n, p in hf_model.named_parameters() if p.grad is not None}

  graphdef, params = nnx.split(model)

  def loss_fn(params):
    parts = preference_loss(nnx.merge(graphdef, params), *(jnp.asarray(batch[k]) for k in (
      "tokens", "targets", "loss_mask", "positions", "segment_ids")), batch.get(data.REFERENCE), beta, kind=kind,
      label_smoothing=smoothing, gamma=gamma)
    return parts.total, parts

  (total, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  np.testing.assert_allclose(float(total), float(loss.detach()), rtol=1e-5)
  assert float(parts.count) == 3
  margin = m.detach().numpy()
  np.testing.assert_allclose(float(parts.stats["reward_margin"]), margin.sum(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(parts.stats["chosen_reward"]), beta * lc.sum().item(), rtol=1e-4, atol=1e-6)
  assert float(parts.stats["reward_accuracy"]) == (margin > 0).sum()
  assert set(parts.stats) == set(preference_stats(kind))
  if kind == "orpo":
    np.testing.assert_allclose(float(parts.stats["nll_loss"]), -lc.sum().item(), rtol=1e-5)
    np.testing.assert_allclose(float(parts.stats["log_odds_ratio"]), log_odds.sum().item(), rtol=1e-4, atol=1e-6)
  assert_grads_match(model, grads, torch_grads, (
    "embed_tokens", "layers.1.self_attn.q_proj", "layers.1.mlp.gate.", "experts.3.", "lm_head"), least=5)


@pytest.mark.parametrize("kl_above_zero", [True, False])
def test_kto_loss_and_gradients_match_torch(tmp_path, kl_above_zero):
  """KTO (preference_loss "kto") over packed units (a line's completion, then its prompt with another line's
  completion) equals TRL's KTO loss computed in torch sequence by sequence through transformers: the KL estimate
  the mean log-ratio of the mismatched sequences, at least 0, without gradient; desirable completions' loss w_d (1 -
  sigmoid(beta (z - KL))), undesirable ones' w_u (1 - sigmoid(beta (KL - z))), averaged; so do its gradients; its
  stats count the units ranked right and the KL."""
  hf_model, model, rng, documents = _three_units(tmp_path)
  documents = dataclasses.replace(documents, labels=np.array([1, 0, 1], np.uint8))
  low = -7.0 if kl_above_zero else -3.0  # the reference's log-probabilities, below the model's or above
  reference = rng.uniform(low, low + 2, len(documents.tokens)).astype(np.float32)
  batch = data.BatchStream(documents, 36, batch_size=2, seed=1, pairs=True, reference=reference).batch(0)
  assert sorted(int(s.max()) for s in batch["segment_ids"]) == [2, 4]
  beta, weights = 0.3, (1.0, 1.5)

  ratios = _torch_answer_logps(hf_model, documents, reference)
  z, mismatched = torch.stack(ratios[0::2]), torch.stack(ratios[1::2])
  kl = mismatched.mean().clamp(min=0).detach()
  assert (kl > 0) == kl_above_zero
  desirable = torch.tensor([True, False, True])
  losses = torch.where(desirable, weights[0] * (1 - torch.sigmoid(beta * (z - kl))),
                       weights[1] * (1 - torch.sigmoid(beta * (kl - z))))
  loss = losses.mean()
  loss.backward()
  torch_grads = {n: p.grad.numpy() for n, p in hf_model.named_parameters() if p.grad is not None}

  graphdef, params = nnx.split(model)

  def loss_fn(params):
    parts = preference_loss(nnx.merge(graphdef, params), *(jnp.asarray(batch[k]) for k in (
      "tokens", "targets", "loss_mask", "positions", "segment_ids")), jnp.asarray(batch[data.REFERENCE]), beta,
      kind="kto", label=jnp.asarray(batch[data.LABEL]), kto_weights=weights)
    return parts.total, parts

  (total, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  np.testing.assert_allclose(float(total), float(loss.detach()), rtol=1e-5)
  assert float(parts.count) == 3 and set(parts.stats) == set(preference_stats("kto"))
  np.testing.assert_allclose(float(parts.stats["kl"]), 3 * kl.item(), rtol=1e-4, atol=1e-6)
  right = torch.where(desirable, z > kl, z < kl).sum().item()
  assert float(parts.stats["reward_accuracy"]) == right
  assert_grads_match(model, grads, torch_grads, (
    "embed_tokens", "layers.1.self_attn.q_proj", "layers.1.mlp.gate.", "experts.3.", "lm_head"), least=5)


GRPO_CASES = {  # (beta, old log-probabilities, PolicyGradient's importance, loss_type and temperature)
  "on_policy": (0.0, False, "token", "dapo", 1.0),
  "kl": (0.3, False, "token", "dapo", 1.0),
  "clipped": (0.0, True, "token", "dapo", 1.0),
  "gspo": (0.3, True, "sequence", "grpo", 1.0),
  "gspo_on_policy": (0.0, False, "sequence", "grpo", 1.0),
  "dr_grpo": (0.0, True, "token", "dr_grpo", 1.0),
  "tempered": (0.3, True, "token", "dapo", 0.7),
  "bnpo": (0.0, True, "token", "bnpo", 1.0),
  "cispo": (0.3, True, "token", "cispo", 1.0),
  "cispo_on_policy": (0.0, False, "token", "cispo", 1.0),
  "sapo": (0.3, True, "token", "sapo", 1.0),
  "entropy_mask": (0.3, True, "token", "dapo", 0.7),
  "entropy_mask_grpo": (0.0, True, "token", "grpo", 1.0),
  "entropy_bonus": (0.0, True, "token", "dapo", 0.7),
  "entropy_bonus_masked": (0.3, True, "token", "grpo", 1.0),
}
TOP_ENTROPY = {"entropy_mask": 0.2, "entropy_mask_grpo": 0.5, "entropy_bonus_masked": 0.3}  # (else 1)
ENTROPY_COEF = {"entropy_bonus": 0.05, "entropy_bonus_masked": 0.1}  # PolicyGradient.entropy_coef (else 0)


@pytest.mark.parametrize("case", GRPO_CASES)
def test_grpo_loss_and_gradients_match_torch(tmp_path, case):
  """GRPO: the advantages are TRL's ((r - the group's mean) / (its torch.std + 1e-4), or the step's std, or
  none: scale_rewards); a completion not learned has no loss tokens; policy_gradient_loss over
  grpo.rows (a completion per row, padding) equals TRL's loss computed in torch through transformers on each
  sequence alone: -min(w A, clip(w, 1 - eps, 1 + eps_high) A) + beta (exp(ref - lp) - (ref - lp) - 1) with w =
  exp(lp - old) per token, or per completion exp(mean(lp - old)) (GSPO), old = lp.detach() (one update per
  generation) or given (the policy has moved: some tokens clipped), averaged over every completion token (dapo),
  per completion (grpo) or over the completions' max_new slots (dr_grpo), or over the micro-batch's tokens as one
  (bnpo); CISPO's -min(w, eps_high).detach() A lp (averaged as dapo) and SAPO's -sigmoid(tau (w - 1)) 4 / tau A,
  tau 1 or 1.05 as A > 0 or not (averaged as grpo); lp of the logits divided by the sampling temperature (TRL's);
  with top_entropy_quantile q, the policy term only at the tokens whose entropy is at least torch.quantile(all
  the completion tokens' entropies, 1 - q) (TRL's get_high_entropy_mask; the KL term everywhere); with
  entropy_coef c, minus c x the mean entropy of those tokens (TRL's entropy bonus); so do its gradients (the policy
  gradient, the KL penalty's, the entropy's); its stats sum the tokens' entropy, KL and clipped ratios (none for
  SAPO's soft gate)."""
  beta, moved, importance, loss_type, temperature = GRPO_CASES[case]
  high = 1.15 if loss_type == "cispo" else 0.15  # cispo's is the largest ratio itself
  quantile = TOP_ENTROPY.get(case, 1.0)
  coef = ENTROPY_COEF.get(case, 0.0)
  pg = PolicyGradient(beta, 0.1, high, importance, loss_type, max_new=12, top_entropy_quantile=quantile,
                      entropy_coef=coef, temperature=temperature)
  hf_model = make_model(seed=9, num_hidden_layers=2, router_aux_loss_coef=0.0)
  model = convert_and_restore(hf_model, tmp_path)
  rng = np.random.default_rng(5)
  prompts = [rng.integers(0, hf_model.config.vocab_size, n).tolist() for n in (5, 5, 5, 7, 7, 7)]
  completions = [rng.integers(0, hf_model.config.vocab_size, n).tolist() for n in (4, 9, 1, 6, 3, 8)]
  rewards = rng.normal(size=6)
  advantage = grpo.advantages(rewards, group=3)
  r = torch.tensor(rewards).reshape(2, 3)
  want = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).reshape(-1).numpy()
  np.testing.assert_allclose(advantage, want, rtol=1e-6)
  centered = (r - r.mean(1, keepdim=True)).reshape(-1)
  np.testing.assert_allclose(grpo.advantages(rewards, 3, "none"), centered.numpy(), rtol=1e-6)
  np.testing.assert_allclose(grpo.advantages(rewards, 3, "batch"), (centered / (r.std() + 1e-4)).numpy(), rtol=1e-6)
  masked = grpo.rows(prompts, completions, advantage, 20, learned=[True, False, True, True, True, True])
  assert masked["loss_mask"][1].sum() == 0 and masked["loss_mask"][0].sum() == len(completions[0])
  batch = grpo.rows(prompts, completions, advantage, seq_len=20)
  reference = rng.uniform(-6, -3, batch["tokens"].shape).astype(np.float32)
  old = np.zeros_like(reference)

  hf_model.train()
  policy, kls, entropies, clipped = [], [], [], 0
  for j, (p, c, a) in enumerate(zip(prompts, completions, advantage)):
    ids, at = torch.tensor([p + c]), slice(len(p) - 1, len(p) + len(c) - 1)
    logits = hf_model(ids).logits[0, :-1].float() / temperature
    lp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0][len(p) - 1:]
    logp_all = torch.log_softmax(logits[len(p) - 1:], -1)
    entropies.append(-(logp_all.exp() * logp_all).sum(-1))
    old[j, at] = lp.detach().numpy() + rng.normal(0, 0.3, len(c)) * moved
    log_ratio = lp - torch.tensor(old[j, at]) if moved else lp - lp.detach()
    w = torch.exp(log_ratio.mean() if importance == "sequence" else log_ratio)
    r = torch.tensor(reference[j, at]) - lp
    kls.append(torch.exp(r) - r - 1)
    if loss_type == "cispo":
      term, cut = -torch.clamp(w, max=1.15).detach() * a * lp, (w > 1.15) & bool(a > 0)
    elif loss_type == "sapo":
      tau = 1.0 if a > 0 else 1.05
      term, cut = -torch.sigmoid(tau * (w - 1)) * 4 / tau * a, torch.zeros(())
    else:
      term = -torch.min(w * a, torch.clamp(w, 1 - 0.1, 1 + 0.15) * a)
      cut = (w < 0.9) & bool(a < 0) | (w > 1.15) & bool(a > 0)
    policy.append(term)
    clipped += int(torch.broadcast_to(cut, lp.shape).sum())
  threshold = torch.quantile(torch.cat(entropies).detach(), 1 - quantile)
  kept = [e >= threshold for e in entropies]
  terms = [term * k + beta * kl for term, k, kl in zip(policy, kept, kls)]
  assert quantile == 1 or 0 < sum(int(k.sum()) for k in kept) < len(torch.cat(entropies)) * (quantile + 0.1)
  tokens = sum(len(c) for c in completions)
  loss = {"dapo": torch.cat(terms).sum() / tokens, "bnpo": torch.cat(terms).sum() / tokens,
          "cispo": torch.cat(terms).sum() / tokens, "grpo": torch.stack([t.mean() for t in terms]).mean(),
          "sapo": torch.stack([t.mean() for t in terms]).mean(),
          "dr_grpo": torch.cat(terms).sum() / (len(completions) * 12)}[loss_type]
  loss = loss - coef * torch.cat([e[k] for e, k in zip(entropies, kept)]).mean()
  loss.backward()
  torch_grads = {n: p.grad.numpy() for n, p in hf_model.named_parameters() if p.grad is not None}

  graphdef, params = nnx.split(model)

  def loss_fn(params):
    parts = policy_gradient_loss(nnx.merge(graphdef, params), *(jnp.asarray(batch[k]) for k in (
      "tokens", "targets", "loss_mask", "positions", "segment_ids", data.ADVANTAGE)),
      jnp.asarray(old) if moved else None, jnp.asarray(reference) if beta else None, pg)
    return parts.total, parts

  (total, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  np.testing.assert_allclose(float(total), float(loss.detach()), rtol=1e-5, atol=1e-7)
  counts = {"dapo": tokens, "cispo": tokens, "grpo": 6, "sapo": 6, "dr_grpo": 72, "bnpo": 1}
  assert float(parts.count) == counts[loss_type]
  assert set(parts.stats) == {"entropy"} | {k for k, on in (("kl", beta), ("clip_ratio", moved and pg.clips)) if on}
  np.testing.assert_allclose(float(parts.stats["entropy"]), torch.cat(entropies).sum().item(), rtol=1e-5)
  assert (float(parts.bonus) < 0) == (coef > 0)
  if beta:
    np.testing.assert_allclose(float(parts.stats["kl"]), torch.cat(kls).sum().item(), rtol=1e-5)
  if moved and pg.clips:
    assert float(parts.stats["clip_ratio"]) == clipped
    assert importance == "sequence" or 0 < clipped < tokens / 2  # some clipped, most not
  assert_grads_match(model, grads, torch_grads, (
    "embed_tokens", "layers.1.self_attn.q_proj", "layers.1.mlp.gate.", "experts.3.", "lm_head"), least=5)


def test_bf16_stays_close_to_fp32(tmp_path):
  hf_model = make_model(seed=7)
  ids = np.random.default_rng(3).integers(0, hf_model.config.vocab_size, (2, 16))
  with torch.no_grad():
    ref = hf_model(torch.tensor(ids)).logits.float()
  save(hf_model, tmp_path / "hf")
  convert.import_hf(tmp_path / "hf", tmp_path / "ckpt", dtype="bfloat16", progress=False)
  model = checkpoint.restore(tmp_path / "ckpt", dtype=jnp.bfloat16)
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  logits = torch.tensor(np.asarray(model.logits(model(jnp.asarray(ids), positions).hidden)))
  kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref, -1), log_target=True, reduction="none").sum(-1)
  print(f"bf16 vs fp32 reference: mean KL {kl.mean():.2e}, max KL {kl.max():.2e}")
  assert kl.mean() < 5e-3 and kl.max() < 5e-2
  agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean()
  assert agree > 0.9


def test_expert_backends_agree(tmp_path):
  hf_model = make_model(seed=11, num_experts=16, num_experts_per_tok=4)
  ids = np.random.default_rng(4).integers(0, 101, (2, 9))
  positions = jnp.broadcast_to(jnp.arange(9), ids.shape)
  outs = {}
  for backend in ("dense", "ragged"):
    model = convert_and_restore(hf_model, tmp_path / backend, kernels=Kernels(experts=backend))
    outs[backend] = np.asarray(model.logits(model(jnp.asarray(ids), positions).hidden))
  np.testing.assert_allclose(outs["dense"], outs["ragged"], atol=1e-5)


def test_fused_attention_matches_the_einsum(monkeypatch):
  """attend_fused hands jax.nn.dot_product_attention a mask equal to ours (GQA, packed segments, padding).

  On CPU the cuDNN call is imitated by the same function's XLA implementation.
  """
  monkeypatch.setattr(layers, "FUSED_IMPLEMENTATION", "xla")
  rng = np.random.default_rng(5)
  b, t, n, kv, h = 2, 11, 6, 2, 8
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, heads, h)), jnp.float32) for heads in (n, kv, kv))
  segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0], [1] * 7 + [0] * 4], jnp.int32)
  positions = jnp.asarray([[0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 1], list(range(t))], jnp.int32)
  mask = layers.Mask.self_attention(positions, segments)
  np.testing.assert_allclose(layers.attend_fused(q, k, v, mask), layers.attend(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_fused_attention_without_a_mask_for_unpacked_rows(monkeypatch):
  """One sequence per row, right-padded (prefill, --no-pack): the fused call gets no mask, and the real tokens'
  outputs equal the masked einsum's."""
  masks = []
  fused = jax.nn.dot_product_attention
  monkeypatch.setattr(layers, "FUSED_IMPLEMENTATION", "xla")
  monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, mask, **kw: masks.append(mask) or fused(
    *a, mask=mask, **kw))
  rng = np.random.default_rng(6)
  b, t, n, kv, h = 3, 9, 4, 2, 8
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, heads, h)), jnp.float32) for heads in (n, kv, kv))
  lengths = np.array([9, 5, 1])
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  segments = jnp.asarray(np.arange(t)[None] < lengths[:, None], jnp.int32)
  mask = layers.Mask.self_attention(positions, segments, packed=False)
  out, ref = layers.attend_fused(q, k, v, mask), layers.attend(q, k, v, mask)
  assert masks == [None]
  for row, n_real in enumerate(lengths):
    np.testing.assert_allclose(out[row, :n_real], ref[row, :n_real], rtol=1e-5, atol=1e-5)


def test_splash_attention_matches_the_einsum():
  """attend_splash (the Pallas TPU kernel, interpreted on CPU) gives our masked einsum's outputs and gradients:
  GQA, packed documents with their own positions, padding."""
  rng = np.random.default_rng(8)
  b, t, n, kv, h = 2, 256, 4, 2, 16
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, heads, h)), jnp.float32) for heads in (n, kv, kv))
  lengths = [[100, 90, 40], [200]]  # documents per row, then padding
  segments = np.zeros((b, t), np.int32)
  positions = np.zeros((b, t), np.int32)
  for row, docs in enumerate(lengths):
    start = 0
    for i, n_doc in enumerate(docs):
      segments[row, start:start + n_doc], positions[row, start:start + n_doc] = i + 1, np.arange(n_doc)
      start += n_doc
    positions[row, start:] = np.arange(t - start)
  mask = layers.Mask.self_attention(jnp.asarray(positions), jnp.asarray(segments))
  weights = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
  np.testing.assert_allclose(layers.attend_splash(q, k, v, mask), layers.attend(q, k, v, mask), rtol=1e-5, atol=1e-5)
  grads = [jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, mask) * weights), (0, 1, 2))(q, k, v)
           for fn in (layers.attend_splash, layers.attend)]
  for a, e in zip(*grads, strict=True):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4)


def test_splash_attention_lowers_for_tpu(monkeypatch):
  """The model's gradient with Kernels(attention="splash") as a TPU gets it: lowered for TPU on this CPU with the
  kernel not interpreted (Pallas's Mosaic lowering, which checks block shapes and ops): splash's forward, dq and
  dkv kernels over packed segments, 128-wide heads, 2 query heads per kv head, routed experts by ragged_dot."""
  kernel = layers._splash_kernel
  monkeypatch.setattr(layers, "_splash_kernel", lambda t, heads, interpret: kernel(t, heads, False))
  cfg = dataclasses.replace(demo_config(vocab_size=512), num_attention_heads=2, num_key_value_heads=1).validate()
  model = create_model(cfg, sharding.make_mesh({}, jax.devices()[:1]), jnp.bfloat16, Kernels(attention="splash"))
  graphdef, params = nnx.split(model)

  def loss(params, tokens, positions, segments):
    m = nnx.merge(graphdef, params)
    return m.logits(m(tokens, positions, segments).hidden).astype(jnp.float32).mean()

  ids = jax.ShapeDtypeStruct((2, 256), jnp.int32)
  hlo = jax.export.export(jax.jit(jax.grad(loss)), platforms=["tpu"])(
    jax.eval_shape(lambda: params), ids, ids, ids).mlir_module()
  assert cfg.dim_per_head == 128
  assert set(re.findall(r'kernel_name = "([^"]+)"', hlo)) == {
    "splash_mha_fwd_segmented_residuals", "splash_mha_dq_segmented_no_residuals",
    "splash_mha_dkv_segmented_no_residuals"}


def test_splash_attention_backend_in_the_model(tmp_path):
  """Kernels(attention="splash") runs self-attention over 128 positions through the kernel (a batch of one
  sequence, and packed rows) with the einsum path's logits; other lengths keep the einsum."""
  hf_model = make_model(seed=13)
  model = convert_and_restore(hf_model, tmp_path / "splash", jnp.float32, Kernels(attention="splash"))
  reference = convert_and_restore(hf_model, tmp_path / "xla", jnp.float32)
  ids = jnp.asarray(np.random.default_rng(7).integers(0, 101, (2, 128)))
  positions = jnp.asarray(np.concatenate([np.arange(128)[None], np.r_[np.arange(70), np.arange(58)][None]]))
  segments = jnp.asarray(np.concatenate([np.ones((1, 128)), np.r_[np.ones(70), np.full(58, 2)][None]]), jnp.int32)
  calls = []
  splash = layers.attend_splash
  with pytest.MonkeyPatch.context() as m:
    m.setattr(layers, "attend_splash", lambda *a: calls.append(a[0].shape) or splash(*a))
    got = model.logits(model(ids, positions, segments).hidden)
    model(ids[:, :100], positions[:, :100])  # 100 positions: the einsum
  want = reference.logits(reference(ids, positions, segments).hidden)
  assert calls == [(2, 128, 6, 8)] * hf_model.config.num_hidden_layers
  np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("block", [4, 5, 12])
def test_attention_in_query_blocks_equals_one_block(block):
  """Blocks of queries (the last one padded when `block` does not divide T) give the single-block outputs and
  gradients, with GQA, packed segments and padding; over a cache (decoding several tokens) too."""
  rng = np.random.default_rng(block)
  b, t, n, kv, h = 2, 13, 6, 2, 8
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, heads, h)), jnp.float32) for heads in (n, kv, kv))
  segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 0, 0], [1] * 9 + [0] * 4], jnp.int32)
  positions = jnp.asarray([[0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1], list(range(t))], jnp.int32)
  mask = layers.Mask.self_attention(positions, segments)
  weights = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)

  def loss(q, k, v, block):
    return jnp.sum(layers.attend(q, k, v, mask, block) * weights)

  one = layers.attend(q, k, v, mask, block=t)
  np.testing.assert_allclose(layers.attend(q, k, v, mask, block), one, rtol=1e-6, atol=1e-6)
  assert not np.allclose(one[0, 3], layers.attend(q, k, v, layers.Mask.self_attention(positions, segments * 0 + 1),
                                                  block)[0, 3])  # the segments matter
  for a, e in zip(jax.grad(loss, (0, 1, 2))(q, k, v, block), jax.grad(loss, (0, 1, 2))(q, k, v, t), strict=True):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)
  over = layers.Mask.over_cache(positions[:, 4:], t)  # 9 queries at positions 4.. over a 13-slot cache
  np.testing.assert_allclose(layers.attend(q[:, 4:], k, v, over, block), layers.attend(q[:, 4:], k, v, over, 9),
                             rtol=1e-6, atol=1e-6)


def test_mlp_in_token_blocks_equals_one_block(monkeypatch):
  """The MLP half of each layer over blocks of positions (5 tokens per device: blocks of 2 positions for 2 rows,
  the last padded) gives the one-block hidden states, router logits, losses and gradients, dense and MoE layers."""
  cfg = dataclasses.replace(demo_config(97), num_hidden_layers=2, decoder_sparse_step=2, router_aux_loss_coef=0.1)
  model = QwenMoeForCausalLM(cfg, rngs=nnx.Rngs(3), dtype=jnp.float32)
  graphdef, params = nnx.split(model)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 13)))
  positions = jnp.broadcast_to(jnp.arange(13), tokens.shape)

  def loss_fn(params):
    m = nnx.merge(graphdef, params)
    parts = causal_lm_loss(m, tokens, jnp.roll(tokens, -1, 1), jnp.ones_like(tokens), positions, jnp.ones_like(tokens))
    out = m(tokens, positions)
    return parts.total, (parts, out.hidden, out.router_logits)

  (_, (parts, hidden, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  monkeypatch.setattr(model_module, "MLP_TOKENS", 5)
  (_, (b_parts, b_hidden, b_logits)), b_grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  np.testing.assert_allclose(b_hidden, hidden, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(b_logits, logits, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(b_parts.aux, parts.aux, rtol=1e-6)
  np.testing.assert_allclose(b_parts.value, parts.value, rtol=1e-6)
  for a, e in zip(jax.tree.leaves(b_grads), jax.tree.leaves(grads), strict=True):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-7)
  blocked = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(tokens, positions).hidden)(params)
  assert str(blocked).count("scan[") == cfg.num_hidden_layers  # it did run in blocks (lax.map is a scan)


def test_query_block_sizes():
  assert layers.query_block(512, 512) == 512  # short: one block
  assert layers.query_block(4096, 4096) == 512
  assert layers.query_block(32768, 32768) == 128  # block x keys <= 2^22
  assert layers.query_block(1 << 20, 1 << 20) == 16


def test_fused_attention_backend_in_the_model(tmp_path, monkeypatch):
  """Kernels(attention="cudnn") runs bf16 self-attention through attend_fused and agrees with the einsum path."""
  calls = []
  fused = layers.attend_fused
  monkeypatch.setattr(layers, "FUSED_IMPLEMENTATION", "xla")
  monkeypatch.setattr(layers, "attend_fused", lambda *a: calls.append(a[0].shape) or fused(*a))
  hf_model = make_model(seed=12)
  ids = np.random.default_rng(6).integers(0, 101, (2, 10))
  positions = jnp.broadcast_to(jnp.arange(10), ids.shape)
  logits = {}
  for attention in ("xla", "cudnn"):
    model = convert_and_restore(hf_model, tmp_path / attention, jnp.bfloat16, Kernels(attention=attention))
    logits[attention] = np.asarray(model.logits(model(jnp.asarray(ids), positions).hidden))
  assert len(calls) == hf_model.config.num_hidden_layers
  scale = np.abs(logits["xla"]).max()
  assert np.abs(logits["cudnn"] - logits["xla"]).max() < 0.02 * scale
  assert (logits["cudnn"].argmax(-1) == logits["xla"].argmax(-1)).mean() > 0.95


@pytest.mark.parametrize("first_expert", [0, 3, 8])
def test_expert_kernels_agree_on_a_shard_of_experts(first_expert):
  """dense, sorted (ragged_dot) and gathered compute the same; ids outside the shard contribute nothing."""
  rng = np.random.default_rng(first_expert)
  n, k, d, f, e_total, e_local = 13, 3, 8, 6, 12, 4
  x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  ids = jnp.asarray(np.stack([rng.choice(e_total, k, replace=False) for _ in range(n)]), jnp.int32)
  w = jnp.asarray(rng.random((n, k)), jnp.float32)
  wi = jnp.asarray(rng.normal(size=(e_local, d, 2, f)), jnp.float32)
  wo = jnp.asarray(rng.normal(size=(e_local, f, d)), jnp.float32)
  dense = experts_dense(x, ids, w, wi, wo, first_expert)
  np.testing.assert_allclose(experts_sorted(x, ids, w, wi, wo, first_expert), dense, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(experts_gathered(x, ids, w, wi, wo, first_expert), dense, rtol=1e-5, atol=1e-5)
  # a token routed only to other shards' experts gets exactly zero
  outside = ~np.any((np.asarray(ids) >= first_expert) & (np.asarray(ids) < first_expert + e_local), axis=1)
  assert np.all(np.asarray(dense)[outside] == 0)
  # one expert by hand
  t = 0
  ref = sum(float(w[t, j]) * (jax.nn.silu(x[t] @ wi[i, :, 0]) * (x[t] @ wi[i, :, 1])) @ wo[i]
            for j, i in ((j, int(ids[t, j]) - first_expert) for j in range(k)) if 0 <= i < e_local)
  np.testing.assert_allclose(dense[t], ref if not isinstance(ref, int) else np.zeros(d), rtol=1e-5, atol=1e-5)


def expert_inputs(seed: int):
  """13 tokens routed to 3 of 12 experts, 4 of them local (d 8, f 6), and rank-3 adapters for those 4:
  x [N, D], weights and ids [N, K], wi, wo, lora."""
  rng = np.random.default_rng(seed)
  n, k, d, f, r, e_total, e_local = 13, 3, 8, 6, 3, 12, 4
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  x, w = normal(n, d), jnp.asarray(rng.random((n, k)), jnp.float32)
  ids = jnp.asarray(np.stack([rng.choice(e_total, k, replace=False) for _ in range(n)]), jnp.int32)
  lora = ExpertLora(normal(e_local, d, r), normal(e_local, r, 2, f), normal(e_local, f, r), normal(e_local, r, d))
  return x, w, ids, normal(e_local, d, 2, f), normal(e_local, f, d), lora


@pytest.mark.parametrize("first_expert", [0, 3])
def test_expert_kernels_with_lora_equal_merged_weights(first_expert):
  """Each backend applies expert adapters on the activations ((x A) B per expert) as merging them into the
  weights (W + A B) would."""
  x, w, ids, wi, wo, lora = expert_inputs(first_expert + 10)
  ref = experts_dense(x, ids, w, lora_lib.merge(wi, lora.wi_a, lora.wi_b, 1.0, True),
                      lora_lib.merge(wo, lora.wo_a, lora.wo_b, 1.0, True), first_expert)
  assert np.abs(ref - experts_dense(x, ids, w, wi, wo, first_expert)).max() > 1.0  # the adapters matter
  for kernel in (experts_dense, experts_sorted, experts_gathered):
    np.testing.assert_allclose(kernel(x, ids, w, wi, wo, first_expert, lora=lora), ref, rtol=1e-4, atol=1e-4,
                               err_msg=kernel.__name__)


@pytest.mark.parametrize("first_expert", [0, 3])
def test_expert_kernels_on_int8_weights(first_expert):
  """int8 expert weights with a scale per expert and output channel (quantize.py): within half a scale of the
  weights, and each backend, with and without adapters, computes what the float reference computes on the
  dequantized weights (int8 x scale)."""
  x, w, ids, wi, wo, lora = expert_inputs(first_expert + 20)
  (qi, si), (qo, so) = quantize.quantize(wi), quantize.quantize(wo)
  assert qi.dtype == qo.dtype == jnp.int8 and si.shape == (4, 2, 6) and so.shape == (4, 8)
  wi_back, wo_back = qi * si[:, None], qo * so[:, None]  # [E, D, C, F], [E, F, D]
  assert np.all(np.abs(wi_back - wi) <= si[:, None] / 2 + 1e-6)
  assert np.all(np.abs(wo_back - wo) <= so[:, None] / 2 + 1e-6)
  for adapters in (None, lora):
    ref = experts_dense(x, ids, w, wi_back, wo_back, first_expert, lora=adapters)
    for kernel in (experts_dense, experts_sorted, experts_gathered):
      got = kernel(x, ids, w, qi, qo, first_expert, lora=adapters, scales=ExpertScales(si, so))
      np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4, err_msg=kernel.__name__)


@pytest.mark.parametrize("backend", ["dense", "ragged"])
def test_lora_model_equals_merged_weights(backend):
  """A model with adapters on every target group (attention, shared expert, routed experts, a dense-MLP layer)
  gives the logits of the same model with the adapters merged into its weights, in prefill and at decode size
  (the gathered expert path); fresh adapters (B = 0) leave the model as it was."""
  cfg = dataclasses.replace(demo_config(97), num_hidden_layers=3, mlp_only_layers=(1,))
  lora = lora_lib.LoraConfig(rank=4, alpha=8.0)
  kernels = Kernels(experts=backend)
  adapted = QwenMoeForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32, kernels=kernels, lora=lora)
  graphdef, state = nnx.split(adapted)
  flat = checkpoint.flatten(nnx.state(adapted, nnx.Param))
  adapters = {k: v for k, v in flat.items() if lora_lib.is_adapter(k)}
  assert len(adapters) == 2 * (3 * 4 + 2 * 2 + 2 * 2 + 1 * 2)  # 4 attention, 2 shared + 2 expert, 2 dense MLP
  base_graph, base_state = nnx.split(QwenMoeForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32, kernels=kernels))
  weights = {k: v for k, v in flat.items() if not lora_lib.is_adapter(k)}
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, 97, (2, 11)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(11), tokens.shape)

  def logits(graph, state, values, rows=2, t=11):
    m = nnx.merge(graph, checkpoint.unflatten_state(state, values))
    return np.asarray(m.logits(m(tokens[:rows, :t], positions[:rows, :t]).hidden))

  base = logits(base_graph, base_state, weights)
  np.testing.assert_array_equal(logits(graphdef, state, flat), base)  # B = 0
  trained = {k: jnp.asarray(rng.normal(0, 0.05, v.shape), jnp.float32) if k.endswith("_lora_b") else v
             for k, v in flat.items()}
  merged = lora_lib.merge_into(weights, adapters | {k: trained[k] for k in adapters}, lora.scale)
  for rows, t in ((2, 11), (1, 1)):  # 1 token x 4 routed rows < half the 16 experts: experts_gathered
    got, ref = logits(graphdef, state, trained, rows, t), logits(base_graph, base_state, merged, rows, t)
    assert np.abs(ref - base[:rows, :t]).max() > 0.05  # the adapters matter
    np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max())


def test_tokamax_backend_dispatch(monkeypatch):
  """The tokamax backend hands tokamax.ragged_dot the same arguments as jax.lax.ragged_dot (imitated on CPU)."""
  calls = []

  def fake_ragged_dot(lhs, rhs, group_sizes):
    calls.append((lhs.shape, rhs.shape, group_sizes.shape))
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)

  monkeypatch.setitem(sys.modules, "tokamax", types.SimpleNamespace(ragged_dot=fake_ragged_dot))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(20, 8)), jnp.float32)
  ids = jnp.asarray(np.stack([rng.choice(6, 2, replace=False) for _ in range(20)]), jnp.int32)
  w = jnp.asarray(rng.random((20, 2)), jnp.float32)
  wi = jnp.asarray(rng.normal(size=(6, 8, 2, 5)), jnp.float32)
  wo = jnp.asarray(rng.normal(size=(6, 5, 8)), jnp.float32)
  out = routed_experts(x, ids, w, wi, wo, 0, "tokamax")
  assert calls == [((40, 8), (6, 8, 10), (6,)), ((40, 5), (6, 5, 8), (6,))]
  np.testing.assert_allclose(out, experts_dense(x, ids, w, wi, wo, 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset,total,active", [
  ("qwen1.5-moe-a2.7b", 14.3e9, 2.7e9),
  ("qwen2-57b-a14b", 57.4e9, 14.2e9),
])
def test_full_size_models_build_abstractly(preset, total, active):
  cfg = PRESETS[preset]
  model = nnx.eval_shape(lambda: QwenMoeForCausalLM(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)
  count = param_count(state)
  per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
  inactive = cfg.num_hidden_layers * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert
  print(f"{preset}: {count / 1e9:.2f}B parameters, {(count - inactive) / 1e9:.2f}B active per token")
  assert abs(count - total) / total < 0.01
  assert abs((count - inactive) - active) / active < 0.03
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))


def test_default_kernels_warn_without_tokamax_on_gpu(monkeypatch):
  """On a GPU without tokamax the experts fall back to XLA's ragged_dot, with a warning (it is dense there)."""
  from qwen_moe_jax import kernels
  assert kernels.default_kernels() == Kernels("ragged", "xla")  # this CPU
  monkeypatch.setattr(kernels.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: None)
  with pytest.warns(UserWarning, match="tokamax is not installed"):
    assert kernels.default_kernels() == Kernels("ragged", "cudnn")
  assert kernels.default_kernels("dense", "xla") == Kernels("dense", "xla")  # asked for: no warning needed
