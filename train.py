"""Fine-tune a qwen2_moe checkpoint on JSONL data, sharded over a mesh, checkpointed with Orbax.

  python train.py --checkpoint CKPT_DIR --data train.jsonl --out runs/sft [--steps 100] [--batch-size 8]
                  [--seq-len 512] [--lr 1e-5] [--save-every 50] [--seed 0] [--mesh data=2,expert=4]
                  [--eval-data held_out.jsonl] [--eval-every 50]

Data lines: {"messages": [...]} (loss on assistant tokens only), {"prompt": ..., "completion": ...} (loss on the
completion only), {"text": "..."} or {"input_ids": [...]}; with
--dpo-beta, preference pairs {"prompt": ..., "chosen": ..., "rejected": ...} (DPO against the starting model, or
SimPO / ORPO with --dpo-loss, reference-free), or with --dpo-loss kto unpaired examples {"prompt": ...,
"completion": ..., "label": true / false} (KTO); with --grpo-reward, prompts {"prompt": ..., ...} (GRPO).
Running the same command on the same --out resumes from the latest complete checkpoint and continues exactly
as if never stopped. RUN_DIR/metrics.jsonl gets one object per step; RUN_DIR/loss.png at the end.
`infer.py --checkpoint RUN_DIR` and `convert/orbax_to_hf.py RUN_DIR OUT` use the latest weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from qwen_moe_jax import checkpoint, data, grpo, hf_io, runtime, sharding, training
from qwen_moe_jax import lora as lora_lib
from qwen_moe_jax.checkpoint import PARAMS_ITEM
from qwen_moe_jax.errors import UserError, cli_main
from qwen_moe_jax.kernels import Kernels
from qwen_moe_jax.losses import DPO_LOSSES, GRPO_LOSS_TYPES, IMPORTANCE_LEVELS
from qwen_moe_jax.model import REMAT_POLICIES, abstract_model
from qwen_moe_jax.run_dir import OPT_STATE, TOKENS_DIR, RunDir
from qwen_moe_jax.tokenizer import load_tokenizer, stop_ids


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--checkpoint", required=True, help="checkpoint, run or Hugging Face model folder (or a repo id in "
                  "the Hugging Face cache) to start from (ignored when resuming)")
  ap.add_argument("--data", required=True, help="training data, JSONL")
  ap.add_argument("--out", required=True, help="run folder (created, or resumed if it holds checkpoints)")
  d = training.TrainConfig()
  ap.add_argument("--steps", type=int, default=d.steps, help="optimizer steps in total")
  ap.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per micro-batch")
  ap.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per row (documents are packed)")
  ap.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
  ap.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
  ap.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="default: 10%% of steps, at most 100")
  ap.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final lr / peak lr (cosine, linear, wsd)")
  ap.add_argument("--lr-schedule", default=d.lr_schedule, choices=training.SCHEDULES,
                  help="after the warmup: cosine or linear decay to lr x --min-lr-ratio at the last step, constant "
                  "lr, or wsd (warmup-stable-decay): lr, then linear decay to lr x --min-lr-ratio over the last "
                  "--decay-steps")
  ap.add_argument("--decay-steps", type=int, default=d.decay_steps, help="wsd's decay (default: 20%% of steps)")
  ap.add_argument("--weight-decay", type=float, default=d.weight_decay)
  ap.add_argument("--clip-norm", type=float, default=d.clip_norm, help="global gradient-norm clip")
  ap.add_argument("--optimizer", default=d.optimizer, choices=training.OPTIMIZERS)
  ap.add_argument("--moments-dtype", default=d.moments_dtype, choices=["float32", "bfloat16"],
                  help="AdamW first-moment dtype (bfloat16: leaner)")
  ap.add_argument("--param-dtype", default=d.param_dtype, choices=sorted(runtime.DTYPES),
                  help="master weights (and AdamW second moment) dtype")
  ap.add_argument("--remat", default=d.remat, choices=sorted(REMAT_POLICIES), help="decoder-layer rematerialisation")
  groups = ", ".join(training.PARAM_GROUPS)
  ap.add_argument("--train-only", help=f"comma-separated groups to train, the rest frozen ({groups})")
  ap.add_argument("--freeze", help="comma-separated groups to freeze, the rest trained")
  ap.add_argument("--peft", metavar="ADAPTER_DIR",
                  help="a peft LoRA adapter folder (or repo id in the Hugging Face cache) merged into the weights of "
                  "the Hugging Face folder --checkpoint names as they are read: the run starts from the merged model")
  ap.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank instead of the weights, which stay "
                  "frozen (in --dtype); checkpoints hold only the adapters")
  ap.add_argument("--lora-alpha", type=float, help="LoRA scale numerator: updates are (alpha / rank) A B "
                  "(default: 2 x rank)")
  ap.add_argument("--lora-targets", help=f"comma-separated groups whose weights get adapters (default: all of "
                  f"{', '.join(lora_lib.TARGETS)})")
  ap.add_argument("--dpo-beta", type=float, help="DPO (direct preference optimization) on preference-pair lines, "
                  "with this beta (TRL's default: 0.1), the starting model as the reference")
  ap.add_argument("--dpo-loss", choices=DPO_LOSSES, default="sigmoid",
                  help="with --dpo-beta, TRL's loss types: sigmoid (DPO), hinge (SLiC), ipo (IPO: log-probabilities "
                  "averaged over each answer's tokens); or reference-free, no reference pass: simpo (SimPO; the "
                  "paper's beta: 2 to 2.5) or orpo (ORPO: the chosen answers' NLL plus beta, ORPO's lambda (TRL: "
                  "0.1), times the odds ratio's loss); or kto (KTO, on unpaired lines {\"prompt\", \"completion\", "
                  "\"label\": true/false}; TRL's beta 0.1)")
  ap.add_argument("--dpo-label-smoothing", type=float, default=0.0,
                  help="with --dpo-loss sigmoid or simpo: the chance a pair's labels are flipped (cDPO; 0 to 0.5)")
  ap.add_argument("--kto-desirable-weight", type=float, default=1.0,
                  help="with --dpo-loss kto: the weight of a desirable completion's loss (TRL's desirable_weight)")
  ap.add_argument("--kto-undesirable-weight", type=float, default=1.0,
                  help="with --dpo-loss kto: an undesirable one's (KTO's paper: keep w_d n_d / (w_u n_u) in [1, 4/3])")
  ap.add_argument("--simpo-gamma", type=float, default=training.TrainConfig.simpo_gamma,
                  help="with --dpo-loss simpo: the target reward margin (TRL's default: 0.5)")
  ap.add_argument("--grpo-reward", action="append", default=[], metavar="FILE.py:FUNCTION",
                  help="GRPO (reinforcement learning) on prompt lines {\"prompt\": ..., other keys}, scored by this "
                  "function (TRL's reward functions: f(prompts, completions, completion_ids, **other keys) -> a "
                  "number per completion); repeat to add several (their sum is the reward)")
  ap.add_argument("--grpo-reward-weights", type=float_list, default=(),
                  help="comma-separated weights of the --grpo-reward functions, in their order (TRL's reward_weights; "
                  "default: 1 each)")
  ap.add_argument("--grpo-group", type=int, default=d.grpo_group,
                  help="completions sampled per prompt (--batch-size x --grad-accum rows a step, one per completion)")
  ap.add_argument("--grpo-max-new", type=int, default=d.grpo_max_new, help="the most tokens a completion has")
  ap.add_argument("--grpo-temperature", type=float, default=d.grpo_temperature,
                  help="the completions' sampling temperature")
  ap.add_argument("--grpo-top-k", type=int, default=d.grpo_top_k, help="and top-k (0: off)")
  ap.add_argument("--grpo-top-p", type=float, default=d.grpo_top_p, help="and top-p (1: off)")
  ap.add_argument("--grpo-min-p", type=float, default=d.grpo_min_p, help="and min-p (0: off)")
  ap.add_argument("--grpo-repetition-penalty", type=float, default=d.grpo_repetition_penalty,
                  help="and repetition penalty (1: off; TRL's generation settings)")
  ap.add_argument("--grpo-beta", type=float, default=d.grpo_beta,
                  help="the KL penalty's weight (TRL's beta; DeepSeekMath's 0.04), against the starting weights (a "
                  "LoRA run's: its base; a full fine-tune holds a copy of them in --dtype)")
  ap.add_argument("--grpo-scale-rewards", choices=training.GRPO_SCALES, default=d.grpo_scale_rewards,
                  help="what divides GRPO's advantages (r - the group's mean): the group's reward std, the step's, or "
                  "nothing (Dr. GRPO)")
  ap.add_argument("--grpo-mask-truncated", action="store_true",
                  help="no loss on completions cut at --grpo-max-new (DAPO)")
  ap.add_argument("--grpo-generation-steps", type=int, default=d.grpo_generation_steps,
                  help="optimizer steps one generation serves: it samples their prompts' completions at once, and "
                  "each step trains on its own share (TRL's steps_per_generation = this x --grad-accum)")
  ap.add_argument("--grpo-iterations", type=int, default=d.grpo_iterations,
                  help="times each generation is trained on (TRL's num_iterations, the paper's mu)")
  ap.add_argument("--grpo-epsilon", type=float, default=d.grpo_epsilon,
                  help="the ratio pi / pi_old is clipped to [1 - this, 1 + --grpo-epsilon-high] (TRL's epsilon; "
                  "it acts once the policy has moved: with --grpo-generation-steps or --grpo-iterations > 1)")
  ap.add_argument("--grpo-epsilon-high", type=float,
                  help="the clipping range above 1 (default: --grpo-epsilon; DAPO's clip-higher: 0.28)")
  ap.add_argument("--grpo-importance", choices=IMPORTANCE_LEVELS, default=d.grpo_importance,
                  help="the ratio per token (GRPO) or per completion, the geometric mean of its tokens' (GSPO, the "
                  "Qwen team's for MoE models: with --grpo-loss-type grpo and --grpo-epsilon 3e-4 "
                  "--grpo-epsilon-high 4e-4)")
  ap.add_argument("--grpo-loss-type", choices=GRPO_LOSS_TYPES, default=d.grpo_loss_type,
                  help="how the loss averages: over the step's completion tokens (dapo), over each completion's "
                  "tokens then the completions (grpo), over each micro-batch's tokens then the micro-batches "
                  "(bnpo), over the completions' --grpo-max-new slots (dr_grpo); or weighs the tokens otherwise: "
                  "cispo (MiniMax-M1: the policy gradient weighed by the ratio cut at --grpo-epsilon-high, "
                  f"default {training.CISPO_EPSILON_HIGH} for it; averaged as dapo), sapo (the Qwen team's soft "
                  "gate instead of the clip; averaged as grpo)")
  ap.add_argument("--grpo-sapo-temperature-pos", type=float, default=d.grpo_sapo_temperature_pos,
                  help="sapo's gate temperature where the advantage is > 0 (TRL's sapo_temperature_pos)")
  ap.add_argument("--grpo-sapo-temperature-neg", type=float, default=d.grpo_sapo_temperature_neg,
                  help="and where it is <= 0 (TRL's sapo_temperature_neg)")
  ap.add_argument("--grpo-top-entropy-quantile", type=float, default=d.grpo_top_entropy_quantile,
                  help="the share of each micro-batch's completion tokens, those of highest entropy, whose policy "
                  "term counts (TRL's top_entropy_quantile; 'Beyond the 80/20 Rule' trains on 0.2; default 1: all)")
  ap.add_argument("--grpo-entropy-coef", type=float, default=d.grpo_entropy_coef,
                  help="an entropy bonus: minus this x the mean entropy of each micro-batch's completion tokens (those "
                  "the policy term counts at) joins the loss, against the policy collapsing (TRL's entropy_coef; "
                  "default 0: none)")
  ap.add_argument("--no-pack", action="store_true", help="one document (or pair) per row instead of packing")
  ap.add_argument("--save-every", type=int, default=50, help="checkpoint every K steps (and at the end)")
  ap.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
  ap.add_argument("--eval-data", help="held-out JSONL (same formats): its mean loss-token cross-entropy is logged "
                  "as eval_loss every --eval-every steps and at the end")
  ap.add_argument("--eval-every", type=int, help="steps between evaluations (default: --save-every)")
  ap.add_argument("--expert-load-every", type=int, default=10, help="log per-expert load fractions every K steps")
  ap.add_argument("--seed", type=int, default=d.seed, help="data order")
  runtime.add_args(ap)
  return ap.parse_args(argv)


def float_list(value: str) -> tuple[float, ...]:
  try:
    return tuple(float(x) for x in value.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None


def train_config(args: argparse.Namespace) -> training.TrainConfig:
  train_only = training.parse_groups(args.train_only, "--train-only")
  freeze = training.parse_groups(args.freeze, "--freeze")
  lora = None
  if args.lora_rank is not None:
    targets = tuple(t.strip() for t in (args.lora_targets or ",".join(lora_lib.TARGETS)).split(",") if t.strip())
    alpha = 2.0 * args.lora_rank if args.lora_alpha is None else args.lora_alpha
    lora = lora_lib.LoraConfig(args.lora_rank, alpha, targets, int8_experts=args.expert_dtype == "int8")
  elif args.lora_alpha is not None or args.lora_targets is not None:
    raise UserError("--lora-alpha / --lora-targets need --lora-rank")
  elif args.expert_dtype == "int8":
    raise UserError("--expert-dtype int8 holds the routed experts frozen as int8, which only a LoRA run's checkpoints "
                    "can leave out: add --lora-rank (or drop --expert-dtype)")
  return training.TrainConfig(
    steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, grad_accum=args.grad_accum, lr=args.lr,
    warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio, lr_schedule=args.lr_schedule,
    decay_steps=args.decay_steps, weight_decay=args.weight_decay,
    clip_norm=args.clip_norm, optimizer=args.optimizer, moments_dtype=args.moments_dtype,
    compute_dtype=args.dtype, param_dtype=args.param_dtype, remat=args.remat,
    train_only=frozenset(train_only) if train_only else None, freeze=frozenset(freeze) if freeze else None,
    seed=args.seed, pack=not args.no_pack, lora=lora, dpo_beta=args.dpo_beta,
    dpo_loss=args.dpo_loss, dpo_label_smoothing=args.dpo_label_smoothing, simpo_gamma=args.simpo_gamma,
    kto_weights=(args.kto_desirable_weight, args.kto_undesirable_weight),
    grpo_rewards=tuple(args.grpo_reward), grpo_reward_weights=args.grpo_reward_weights,
    grpo_group=args.grpo_group, grpo_max_new=args.grpo_max_new,
    grpo_temperature=args.grpo_temperature, grpo_top_k=args.grpo_top_k, grpo_top_p=args.grpo_top_p,
    grpo_min_p=args.grpo_min_p, grpo_repetition_penalty=args.grpo_repetition_penalty, grpo_beta=args.grpo_beta,
    grpo_scale_rewards=args.grpo_scale_rewards,
    grpo_mask_truncated=args.grpo_mask_truncated, grpo_generation_steps=args.grpo_generation_steps,
    grpo_iterations=args.grpo_iterations, grpo_epsilon=args.grpo_epsilon, grpo_epsilon_high=args.grpo_epsilon_high,
    grpo_importance=args.grpo_importance, grpo_loss_type=args.grpo_loss_type,
    grpo_sapo_temperature_pos=args.grpo_sapo_temperature_pos,
    grpo_sapo_temperature_neg=args.grpo_sapo_temperature_neg,
    grpo_top_entropy_quantile=args.grpo_top_entropy_quantile, grpo_entropy_coef=args.grpo_entropy_coef).validate()


def recordable(tc: training.TrainConfig, data_path: str) -> dict:
  d = dataclasses.asdict(tc)
  d["train_only"] = sorted(tc.train_only) if tc.train_only else None
  d["freeze"] = sorted(tc.freeze) if tc.freeze else None
  d["lora"] = tc.lora.to_dict() if tc.lora else None
  d["grpo_rewards"] = list(tc.grpo_rewards)
  d["grpo_reward_weights"] = list(tc.grpo_reward_weights)
  d["kto_weights"] = list(tc.kto_weights)
  return {**d, "data": str(data_path), "data_fingerprint": data.fingerprint(data_path)}


@cli_main
def main() -> int | None:
  args = parse_args()
  tc = train_config(args)
  if args.save_every < 1:
    raise UserError(f"--save-every must be >= 1, got {args.save_every}")
  if args.eval_every is not None and args.eval_every < 1:
    raise UserError(f"--eval-every must be >= 1, got {args.eval_every}")
  if tc.grpo and args.save_every % tc.grpo_cycle:  # a resume starts at a generation
    raise UserError(f"--save-every ({args.save_every}) must be a multiple of --grpo-generation-steps x "
                    f"--grpo-iterations ({tc.grpo_cycle}): a run resumes where a generation starts")
  mesh, _, kernels = runtime.setup(args)
  run = RunDir(args.out, keep=args.keep)
  try:
    return train(args, tc, mesh, kernels, run)
  finally:
    run.close()


def train(args, tc: training.TrainConfig, mesh, kernels: Kernels, run: RunDir) -> int | None:
  """Trains to tc.steps; on a SIGTERM, saves after the step under way (on every process alike: the first step all
  reach after it; a GRPO run's, where a generation starts) and returns 143, as a process ended by SIGTERM."""
  preemption = runtime.Preemption()
  settings = recordable(tc, args.data)
  start = run.latest_step
  if start is None:
    source = hf_io.model_folder(args.checkpoint)
    base = checkpoint.locate(source, args.peft and hf_io.model_folder(args.peft))  # fail early on a bad folder
    if tc.lora is not None and base.adapters is not None:
      raise UserError(f"{source}: a LoRA run; LoRA on top of it needs its merged weights: export them "
                      f"(convert/orbax_to_hf.py) and import them (convert/hf_to_orbax.py), or train from its base")
    run.start(source, settings, checkpoint.lora_record(base, tc.lora) if tc.lora else None,
              base if tc.grpo_reference_copy else None)
    weights: Path | checkpoint.Location = base
  else:
    weights = run.folder
    changed = [k for k, v in run.recorded_config().items() if settings.get(k) != v and k != "data"]
    if changed:
      raise UserError(f"{run.folder}: resuming with different settings ({', '.join(changed)}); "
                      f"use the original flags or a new --out")
    print(f"resuming {run.folder} from step {start}", file=sys.stderr)
  kl_source = run.reference() if tc.grpo_reference_copy else None  # the starting weights
  cfg = checkpoint.load_config(run.folder)
  tok = load_tokenizer(run.folder) if (run.folder / "tokenizer.json").is_file() else None
  eos = tok.token_to_id("<|endoftext|>") if tok is not None else None
  tokens = run.folder / TOKENS_DIR
  write = jax.process_index() == 0
  pairs = tc.dpo_beta is not None
  files = [(args.data, settings["data_fingerprint"])] + ([(args.eval_data, data.fingerprint(args.eval_data))]
                                                         if args.eval_data else [])
  if tc.grpo:  # prompts instead of documents
    prompts = [grpo.read_prompts(path, tok, tc.seq_len - tc.grpo_max_new) for path, _ in files]
    rewards = grpo.load_rewards(tc.grpo_rewards)
  else:
    documents = [data.read_cached(path, tok, tc.seq_len, eos, tokens, write, digest, pairs, tc.kto)
                 for path, digest in files]
  eval_every = args.eval_every or args.save_every

  param_dtype = runtime.DTYPES[tc.param_dtype]
  if tc.lora is None:
    model = checkpoint.restore(weights, mesh, param_dtype, kernels, cfg)
  else:  # the frozen base straight in the compute dtype; the adapters new, or restored
    model = checkpoint.restore(checkpoint.lora_base(run.folder), mesh, runtime.DTYPES[tc.compute_dtype], kernels, cfg)
    adapters = None
    if start is not None:
      wanted = checkpoint.wanted_adapters(cfg, tc.lora, mesh, param_dtype, kernels)
      adapters = checkpoint.flatten(run.load(start, checkpoint.ADAPTERS_ITEM, checkpoint.unflatten(wanted),
                                             cfg.num_experts))
    model = training.with_adapters(model, adapters, tc.lora, mesh, param_dtype, kernels, tc.seed)
  trainable, frozen = training.split_params(model, tc)
  del model
  graphdef, abstract = abstract_model(cfg, param_dtype, sharding.expert_shards(mesh), kernels, tc.lora)
  tx = training.make_optimizer(tc)
  with jax.set_mesh(mesh):
    init = training.compile_init(tx, trainable)
    if start is None:
      opt_state = init(trainable)
    else:
      wanted = sharding.with_shardings(jax.eval_shape(tx.init, trainable), init.output_shardings)
      opt_state = run.load(start, OPT_STATE, wanted, cfg.num_experts)
    def logprob_program(params):  # for these parameters' dtypes and shardings; its output on every process
      return jax.jit(training.make_logprob_step(graphdef, abstract, tc),
                     out_shardings=NamedSharding(mesh, PartitionSpec())).lower(
        params, frozen, training.batch_spec(mesh, (1, tc.batch_size, tc.seq_len))).compile()

    logprob_fn = functools.cache(lambda: logprob_program(trainable))  # compiled when needed
    references = [None] * len(files)
    if tc.reference and not tc.grpo:  # every token's log-probability under the starting model, before step 1
      references = [reference(path, digest, docs, tc, run, start,
                              lambda s, n: training.reference_logprobs(logprob_fn(), trainable, frozen, s, n, mesh))
                    for (path, digest), docs in zip(files, documents)]
    if tc.grpo:
      reference_params, reference_fn = None, None  # the KL penalty's reference and its log-probability program
      if tc.grpo_reference_copy:  # the starting weights, read again, held in the compute dtype
        reference_params = training.split_params(
          checkpoint.restore(kl_source, mesh, runtime.DTYPES[tc.compute_dtype], kernels, cfg), tc)[0]
        reference_fn = logprob_program(reference_params)
      elif tc.reference:  # LoRA's base: the adapters at zero
        reference_params = jax.tree.map(lambda v: jax.device_put(np.zeros(v.shape, v.dtype), v.sharding), trainable)
        reference_fn = logprob_fn()
      stream = grpo.Rollouts(prompts[0], rewards, tok, tc, stop_ids(cfg, tok, chat_end=True), mesh)
    else:
      stream = data.BatchStream(documents[0], tc.seq_len, tc.batch_size * tc.grad_accum, tc.seed, tc.pack, pairs,
                                references[0])
    held_out = None if len(files) == 1 or tc.grpo else data.BatchStream(documents[1], tc.seq_len, tc.batch_size, seed=0,
                                                             pack=tc.pack, pairs=pairs, reference=references[1])
    step_fn = training.make_train_step(graphdef, abstract, tc, tx, cfg.router_aux_loss_coef)
    shape = (tc.grad_accum, tc.batch_size, tc.seq_len)
    spec = training.batch_spec(mesh, shape, tc.floats)
    compiled = training.compile_step(step_fn, trainable, frozen, opt_state, spec)
    if held_out is not None:
      eval_fn = jax.jit(training.make_eval_step(graphdef, abstract, tc)).lower(
        trainable, frozen, training.batch_spec(mesh, (1, tc.batch_size, tc.seq_len), tc.floats)).compile()
    first = start or 0
    generation = None  # GRPO's: the rows and metrics of the steps its latest generation serves
    run.truncate_metrics(first)
    lr = training.schedule(tc)
    bar = tqdm(range(first, tc.steps), initial=first, total=tc.steps, desc="training", unit="step",
               disable=jax.process_index() != 0 or None)
    for step in bar:
      tick = time.perf_counter()
      if tc.grpo:
        fresh = step % tc.grpo_cycle == 0 or generation is None
        if fresh:  # completions of the model as it is
          generation = stream.generation(step, training.model_of(graphdef, abstract, tc, trainable, frozen))
          for rows, _ in generation:
            if tc.grpo_old_logp:  # the ratio's denominator: the sampling policy's log-probabilities
              rows[data.OLD_LOGP] = training.row_logprobs(logprob_fn(), trainable, frozen, rows, tc.batch_size, mesh)
            if tc.reference:  # the KL penalty's: the reference's log-probabilities
              rows[data.REFERENCE] = training.row_logprobs(reference_fn, reference_params, frozen, rows, tc.batch_size,
                                                           mesh)
        rows, rollout = generation[step % tc.grpo_cycle % tc.grpo_generation_steps]
        rollout = rollout | {"rollout_s": time.perf_counter() - tick if fresh else 0.0}
      else:
        rows, rollout = stream.batch(step), {}
      host = {k: v.reshape(shape) for k, v in rows.items()}
      trainable, opt_state, m = compiled(trainable, frozen, opt_state, training.device_batch(host, mesh))
      m = jax.device_get(m)
      seconds = time.perf_counter() - tick
      done = step + 1
      record = {"step": done, "epoch": stream.epoch_of(step), "loss": float(m.loss),
                tc.objective: float(m.value), **{k: float(v) for k, v in m.stats.items()},
                "aux_loss": float(m.aux_loss), "lr": float(lr(step)), "grad_norm": float(m.grad_norm),
                "tokens": int(m.tokens), "tokens_per_s": float(m.tokens) / seconds, "skipped_steps": int(m.skipped),
                **rollout}
      if len(files) > 1 and (done % eval_every == 0 or done == tc.steps):
        record.update(stream.evaluate(prompts[1], training.model_of(graphdef, abstract, tc, trainable, frozen))
                      if tc.grpo else evaluate(eval_fn, trainable, frozen, held_out, mesh, pairs))
      if args.expert_load_every and done % args.expert_load_every == 0 and cfg.moe_layers:
        record["expert_load"] = np.round(np.asarray(m.expert_load, np.float64), 5).tolist()
      run.log(record)
      bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
      noticed = preemption.seen(done)  # (asked at every step, on every process)
      stop = noticed and done < tc.steps and (not tc.grpo or done % tc.grpo_cycle == 0)
      if done % args.save_every == 0 or done == tc.steps or stop:
        params, item = trainable, checkpoint.ADAPTERS_ITEM  # a LoRA run saves its adapters
        if tc.lora is None:
          params, item = checkpoint.unflatten(checkpoint.flatten(trainable) | checkpoint.flatten(frozen)), PARAMS_ITEM
        run.save(done, checkpoint.unpadded(cfg, params), checkpoint.unpadded(cfg, opt_state), item)
      if stop:
        run.wait()
        print(f"stopped by SIGTERM: step {done} saved; the same command resumes from it", file=sys.stderr)
        return 143
  run.wait()
  plot = run.plot()
  print(f"trained to step {tc.steps}; run folder {run.folder}" + (f", loss curve {plot}" if plot else ""),
        file=sys.stderr)


def evaluate(eval_fn, trainable, frozen, held_out: data.BatchStream, mesh, pairs: bool) -> dict:
  """The objective's mean over the held-out data (summed over batches, then divided): cross-entropy over every
  loss token, or the preference loss over every pair."""
  total, count = 0.0, 0.0
  for rows in held_out.one_pass():
    s, n = jax.device_get(eval_fn(trainable, frozen, training.device_batch({k: v[None] for k, v in rows.items()},
                                                                           mesh)))
    total, count = total + float(s), count + float(n)
  return {"eval_loss": total / max(count, 1.0), "eval_pairs" if pairs else "eval_tokens": int(count)}


def reference(path: str, digest: str, documents: data.Documents, tc: training.TrainConfig, run: RunDir,
              start: int | None, compute) -> np.ndarray:
  """DPO's reference log-probabilities of a data file's tokens (`digest`: its fingerprint): computed with the model
  as it starts (before the first step; compute(stream, total): training.reference_logprobs), kept next to the
  file's tokens in the run folder, read back on resume."""
  file = data.cached_file(path, tc.seq_len, run.folder / TOKENS_DIR, digest, pairs=True).with_suffix(".reference.npz")
  saved = data.load_npz(file, "logprobs")
  if saved is not None:
    return saved[0]
  if start is not None:
    raise UserError(f"{file}: DPO's reference log-probabilities for {path} are missing or unreadable, and the "
                    "starting model that gives them has been trained since: start a new run (a new --out)")
  print(f"{path}: computing the reference log-probabilities (the starting model's)", file=sys.stderr)
  logprobs = compute(data.BatchStream(documents, tc.seq_len, tc.batch_size, seed=0, pairs=True), len(documents.tokens))
  if jax.process_index() == 0:
    data.save_npz(file, logprobs=logprobs)
  return logprobs


if __name__ == "__main__":
  main()
