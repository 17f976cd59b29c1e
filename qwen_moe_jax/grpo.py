"""GRPO (Shao et al. 2024, DeepSeekMath; TRL's GRPOTrainer): reinforcement learning from reward functions.

Each step takes P prompts from the data, in an order drawn per epoch from the seed (as BatchStream's), samples G
completions of each with the model as it is (generate.Generator: the KV-cache decode engine, on the training
mesh), scores every completion with the reward functions (their weighted sum), and turns the scores into
advantages within each prompt's group, A = (r - mean) / (std + 1e-4) (`advantages`). The rows (prompt +
completion, loss on the completion) go to losses.policy_gradient_loss. A generation can serve several steps
(TrainConfig.grpo_cycle): it samples the next K steps' prompts at once, and steps train on their share of it, over
I iterations. Completion j of step s draws from the stream (seed, s R + j), so a resumed run (which starts at a
generation) generates, and trains on, exactly what an uninterrupted one would.

Data lines: {"prompt": "text" or [messages], ...}; messages are rendered by the chat template with its generation
prompt. The other keys (an answer to check, say) go to the reward functions, as TRL gives a dataset's columns.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from qwen_moe_jax import data
from qwen_moe_jax.errors import UserError
from qwen_moe_jax.generate import Generator, Stream
from qwen_moe_jax.model import QwenMoeForCausalLM
from qwen_moe_jax.sampling import Sampling
from qwen_moe_jax.tokenizer import Tokenizer
from qwen_moe_jax.training import TrainConfig

STD_EPS = 1e-4  # TRL's, in (r - mean) / (std + eps)
Reward = Callable[..., Sequence[float]]
RESERVED = {"prompts", "completions", "completion_ids"}  # a reward function's arguments besides the lines' keys


@dataclasses.dataclass(frozen=True)
class Prompt:
  ids: tuple[int, ...]  # the prompt's tokens, as generation continues them
  prompt: Any  # the line's "prompt" (text, or messages), as reward functions get it
  columns: dict[str, Any]  # the line's other keys


def read_prompts(path: str | Path, tok: Tokenizer | None, room: int) -> list[Prompt]:
  """Every line of a JSONL file as a Prompt; `room`: the most tokens a prompt may have (--seq-len less the new
  tokens). The first bad line is a UserError naming `path:line`."""
  if tok is None:
    raise UserError(f"{path}: GRPO's prompts need a tokenizer (tokenizer.json in the checkpoint), and none was given")
  prompts = []
  for where, raw in data.lines(path):
    record = data.parse_object(raw, where)
    if "prompt" not in record:
      raise UserError(f"{where}: expected a 'prompt' (a string or a list of messages), got the keys "
                      f"{', '.join(repr(k) for k in record) or 'none'}")
    taken = sorted(RESERVED & set(record))
    if taken:
      raise UserError(f"{where}: the key {taken[0]!r} is a reward function's own argument; rename it")
    ids = _prompt_ids(record["prompt"], tok, where)
    if not 0 < len(ids) <= room:
      raise UserError(f"{where}: the prompt has {len(ids)} tokens; 1 to {room} leave room for --grpo-max-new "
                      "tokens in --seq-len")
    prompts.append(Prompt(tuple(ids), record["prompt"], {k: v for k, v in record.items() if k != "prompt"}))
  if not prompts:
    raise UserError(f"{path}: no prompts (empty or blank file); expected JSON lines with a 'prompt'")
  return prompts


def _prompt_ids(prompt: Any, tok: Tokenizer, where: str) -> list[int]:
  if isinstance(prompt, str):
    return tok.encode(prompt)
  if not isinstance(prompt, list) or not prompt:
    raise UserError(f"{where}: 'prompt' must be a string or a non-empty list of messages")
  data.check_messages(prompt, where)
  if prompt[-1]["role"] == "assistant":
    raise UserError(f"{where}: 'prompt' ends with an assistant message; the completions are its reply")
  return tok.encode(data.render(tok, prompt, True, where))


def load_rewards(specs: Sequence[str]) -> list[tuple[str, Reward]]:
  """Each `FILE.py:FUNCTION` as (FUNCTION, the function): TRL's reward functions, called with the step's
  completions as f(prompts=[...], completions=[...], completion_ids=[...], **columns) -> a number per completion.
  Completions are texts, or a list of one assistant message where the prompt is messages (as TRL gives them)."""
  rewards = []
  for i, spec in enumerate(specs):
    file, _, name = spec.rpartition(":")
    if not file.endswith(".py") or not name.isidentifier():
      raise UserError(f"--grpo-reward takes FILE.py:FUNCTION, got {spec!r}")
    if not Path(file).is_file():
      raise UserError(f"{file}: no such reward file (--grpo-reward {spec})")
    module_spec = importlib.util.spec_from_file_location(f"grpo_reward_{i}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
      module_spec.loader.exec_module(module)
    except Exception as e:  # the user's module: its failure in one line
      raise UserError(f"{file}: importing it failed ({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
      raise UserError(f"{file}: no function {name!r} (--grpo-reward {spec})")
    rewards.append((name, fn))
  return rewards


def advantages(rewards: np.ndarray, group: int, scale: str = "group") -> np.ndarray:
  """rewards [R] (R = P x group, a prompt's completions adjacent) -> [R] r - its group's mean, divided by (the std +
  STD_EPS) of its group's rewards (`scale` "group"), of the step's ("batch") or not at all ("none": Dr. GRPO's),
  as TRL's scale_rewards; the std with Bessel's correction (torch.std's, as TRL)."""
  r = rewards.reshape(-1, group)
  centered = r - r.mean(1, keepdims=True)
  if scale == "none":
    return centered.reshape(-1)
  std = r.std(1, ddof=1, keepdims=True) if scale == "group" else rewards.std(ddof=1)
  return (centered / (std + STD_EPS)).reshape(-1)


def rows(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], advantage: np.ndarray,
         seq_len: int, learned: Sequence[bool] | None = None) -> dict[str, np.ndarray]:
  """Each completion a row [seq_len] of data.FIELDS (int32) and data.ADVANTAGE (fp32): its prompt's tokens then
  its own, the targets after the prompt's last token learned (unless `learned` says not), each with the
  completion's advantage; padding is segment 0."""
  shape = (len(completions), seq_len)
  out = {k: np.zeros(shape, np.int32) for k in data.FIELDS} | {data.ADVANTAGE: np.zeros(shape, np.float32)}
  for j, (p, c) in enumerate(zip(prompts, completions, strict=True)):
    ids, start = [*p, *c], len(p) - 1  # target `start` is the completion's first token
    t = len(ids)
    out["tokens"][j, :t] = ids
    out["targets"][j, :t - 1] = ids[1:]
    out["loss_mask"][j, start:t - 1] = learned is None or learned[j]
    out["positions"][j, :t] = np.arange(t)
    out["segment_ids"][j, :t] = 1
    out[data.ADVANTAGE][j, start:t - 1] = advantage[j]
  return out


class Rollouts:
  """Step s's training rows: its prompts' completions by the model as it is, scored (see the module's docstring)."""

  def __init__(self, prompts: list[Prompt], rewards: list[tuple[str, Reward]], tok: Tokenizer, tc: TrainConfig,
               stop_ids: Sequence[int], mesh):
    self.prompts, self.rewards, self.tok, self.tc = prompts, rewards, tok, tc
    self.group, self.per_step = tc.grpo_group, tc.batch_size * tc.grad_accum // tc.grpo_group
    self.steps = tc.grpo_generation_steps  # the steps one generation samples for
    self.sampling = tc.grpo_sampling
    self.stop_ids, self.mesh = list(stop_ids), mesh
    self._generator: Generator | None = None
    self._orders: dict[int, np.ndarray] = {}  # epoch -> its order of the prompts

  def order(self, step: int, steps: int = 1) -> list[int]:
    """The indices of the prompts of steps `step` to `step + steps - 1`: epoch e visits them in the order
    default_rng([seed, e]).permutation."""
    n = len(self.prompts)
    return [int(self._permutation(at // n)[at % n])
            for at in range(step * self.per_step, (step + steps) * self.per_step)]

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}  # a run only moves forward
      self._orders[epoch] = np.random.default_rng([self.tc.seed, epoch]).permutation(len(self.prompts))
    return self._orders[epoch]

  def epoch_of(self, step: int) -> int:
    return step * self.per_step // len(self.prompts)

  def generation(self, step: int, model: QwenMoeForCausalLM) -> list[tuple[dict[str, np.ndarray], dict[str, float]]]:
    """Steps step to step + K - 1's (K: --grpo-generation-steps) (rows [P G, seq_len], metrics: their mean reward
    (and each function's), the groups' mean std, completion tokens, the share cut at --grpo-max-new), sampled at
    once; the advantages' "batch" scale is the generation's."""
    self._load(model)
    asked = [self.prompts[i] for i in self.order(step, self.steps) for _ in range(self.group)]
    each = len(asked) // self.steps  # a step's rows
    result = self._generator.generate([p.ids for p in asked], self.tc.grpo_max_new, self.sampling,
                                      [Stream(self.tc.seed, step * each + j) for j in range(len(asked))], self.stop_ids)
    self._generator.drop_weights()  # a full fine-tune's compute-dtype copy, not held through the step
    completions, truncated = result.output_ids, np.array([r == "length" for r in result.finish_reasons])
    scores = self.score(asked, completions)  # [F, K R]
    reward = self.total(scores)
    learned = ~truncated if self.tc.grpo_mask_truncated else None  # DAPO's: completions cut at --grpo-max-new
    # teach nothing
    out = rows([p.ids for p in asked], completions, advantages(reward, self.group, self.tc.grpo_scale_rewards),
               self.tc.seq_len, learned)
    steps = []
    for share in np.split(np.arange(len(asked)), self.steps):
      r = reward[share]
      steps.append(({k: v[share] for k, v in out.items()},
                    {**self._means(scores[:, share], "reward"),
                     "reward_std": float(r.reshape(-1, self.group).std(axis=1, ddof=1).mean()),
                     "completion_tokens": float(np.mean([len(completions[j]) for j in share])),
                     "clipped_ratio": float(truncated[share].mean())}))
    return steps

  def evaluate(self, prompts: list[Prompt], model: QwenMoeForCausalLM) -> dict[str, float]:
    """The mean reward (and each function's, with several) of the greedy completions of held-out prompts, one
    each, as many at once as a step's completions."""
    self._load(model)
    result = self._generator.generate([p.ids for p in prompts], self.tc.grpo_max_new, Sampling(), 0, self.stop_ids)
    self._generator.drop_weights()
    scores = self.score(prompts, result.output_ids)
    return {**self._means(scores, "eval_reward"), "eval_prompts": len(prompts)}

  def total(self, scores: np.ndarray) -> np.ndarray:
    """scores [F, R] -> [R] the reward: the functions' scores weighted by --grpo-reward-weights and summed, a
    function's None left out (TRL's nansum)."""
    return np.nansum(scores * np.asarray(self.tc.grpo_weights)[:, None], axis=0)

  def _means(self, scores: np.ndarray, key: str) -> dict[str, float | None]:
    """scores [F, R] -> {key: the mean reward} and, with several functions, {key_NAME: the mean of each one's
    scores (unweighted; None where it gave none)}."""
    out = {key: float(self.total(scores).mean())}
    if len(self.rewards) > 1:
      out |= {f"{key}_{name}": float(np.nanmean(s)) if not np.isnan(s).all() else None
              for (name, _), s in zip(self.rewards, scores)}
    return out

  def _load(self, model: QwenMoeForCausalLM) -> None:
    if self._generator is None:
      self._generator = Generator(model, self.mesh, batch_size=self.steps * self.per_step * self.group)
    else:
      self._generator.load(model)

  def score(self, asked: list[Prompt], completions: list[list[int]]) -> np.ndarray:
    """[F, R]: each reward function's number for each completion, NaN where it gave None (TRL's way for a function
    to pass over a completion it does not judge, another task's, say). Every process has every completion; each
    scores its share (TRL's way: a completion is judged once, however many processes, so a judge that is slow, or
    not deterministic, runs once per completion), and the shares are gathered. A process whose reward functions fail
    raises their error; the others, one line naming it (rather than wait for its share)."""
    n, processes, me = len(asked), jax.process_count(), jax.process_index()
    share = -(-n // processes)
    mine = slice(me * share, (me + 1) * share)
    local, error = np.full((len(self.rewards), share), np.nan), None
    try:
      if asked[mine]:
        got = self._score(asked[mine], completions[mine])
        local[:, :got.shape[1]] = got
    except Exception as e:  # noqa: BLE001  (raised below, once every process knows)
      error = e
    if processes == 1:
      if error is not None:
        raise error
      return local
    failed = multihost_utils.process_allgather(np.bool_(error is not None))  # [P]
    if error is not None:
      raise error
    if failed.any():
      raise UserError(f"the reward functions failed on process {int(np.argmax(failed))} (its output has the error)")
    gathered = multihost_utils.process_allgather(local.view(np.uint32)).view(np.float64)  # exact: jax's are float32
    return np.concatenate(list(gathered), axis=1)[:, :n]  # [P, F, share] -> [F, R]

  def _score(self, asked: list[Prompt], completions: list[list[int]]) -> np.ndarray:
    """[F, len(asked)]: `score` on one process's share."""
    texts = [self.tok.decode(c, skip_special_tokens=True) for c in completions]
    given = [[{"role": "assistant", "content": t}] if isinstance(p.prompt, list) else t for p, t in zip(asked, texts)]
    keys = sorted({k for p in asked for k in p.columns})
    columns = {k: [p.columns.get(k) for p in asked] for k in keys}
    out = []
    for name, fn in self.rewards:
      values = fn(prompts=[p.prompt for p in asked], completions=given, completion_ids=completions, **columns)
      try:
        values = np.asarray([np.nan if v is None else v for v in values], np.float64)
      except (TypeError, ValueError):
        values = None
      if values is None or values.shape != (len(asked),) or np.isinf(values).any():
        raise UserError(f"reward function {name!r}: expected a finite number (or None) for each of the "
                        f"{len(asked)} completions")
      out.append(values)
    return np.stack(out)
