"""A small random qwen2_moe checkpoint in the Hugging Face layout, with a real byte-level BPE tokenizer.

`infer.py --demo` builds one, converts it with the converter and generates from it through the same path
a downloaded checkpoint takes. The weights are random: the text is gibberish; the point is the pipeline
and its speed on whatever machine this is.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from qwen_moe_jax import checkpoint, convert, hf_layout, sharding
from qwen_moe_jax.config import QwenMoeConfig
from qwen_moe_jax.model import QwenMoeForCausalLM, create_model
from qwen_moe_jax.tokenizer import CHATML_TEMPLATE

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CORPUS = """\
Qwen1.5-MoE-A2.7B is a mixture-of-experts language model: each token is routed to four of sixty
experts and one shared expert, so only 2.7 billion of its 14.3 billion parameters run per token.
Expert parallelism places the experts on different devices; the router decides where each token goes.
def route(x, router, k):\n\treturn top_k(softmax(x @ router), k)\n
안녕하세요. 你好，世界。 Hello, world! 🙂 The quick brown fox jumps over the lazy dog 0123456789.
"""


def build_tokenizer(vocab_size: int = 512) -> Tokenizer:
  """Byte-level BPE (Qwen2's kind of tokenizer) trained on a few sentences, with Qwen's special tokens."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator([CORPUS] * 4, trainer)
  return tok


def demo_config(vocab_size: int) -> QwenMoeConfig:
  return QwenMoeConfig(
    vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=4, max_position_embeddings=2048, rope_theta=1e6, num_experts=16, num_experts_per_tok=4,
    moe_intermediate_size=128, shared_expert_intermediate_size=512, eos_token_ids=(), torch_dtype="float32",
  ).validate()


def demo_model(dtype: str = "float32") -> tuple[QwenMoeConfig, jax.sharding.Mesh, QwenMoeForCausalLM]:
  """The demo config (vocabulary 512) with random weights on one device: what the CPU benchmarks time."""
  cfg = demo_config(vocab_size=512)
  mesh = sharding.make_mesh({}, jax.devices()[:1])
  return cfg, mesh, create_model(cfg, mesh, jnp.dtype(dtype), seed=0)


def write_hf_demo(folder: str | Path, seed: int = 0) -> QwenMoeConfig:
  """Writes config.json, tokenizer files and random model-*.safetensors shards into `folder`."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  tok = build_tokenizer()
  tok.save(str(folder / "tokenizer.json"))
  ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
  vocab = -(-tok.get_vocab_size() // 64) * 64  # embedding rows padded to a multiple of 64, as Qwen does
  cfg = dataclasses.replace(demo_config(vocab), eos_token_ids=(ids["<|im_end|>"], ids["<|endoftext|>"]),
                            bos_token_id=ids["<|endoftext|>"])
  (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
  (folder / "tokenizer_config.json").write_text(json.dumps({
    "chat_template": CHATML_TEMPLATE, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
    "bos_token": None, "model_max_length": cfg.max_position_embeddings,
  }, indent=2) + "\n")
  rng = np.random.default_rng(seed)
  shapes = checkpoint.param_shapes(cfg)

  def tensors(group: str, bindings: list[hf_layout.Binding]) -> dict[str, np.ndarray]:
    made = {}
    for b in bindings:
      shape = b.hf_shape(cfg, shapes)
      norm = b.hf.endswith("norm.weight")
      made[b.hf] = np.ones(shape, np.float32) if norm else rng.normal(0, 0.02, shape).astype(np.float32)
    return made

  convert.write_hub_shards(folder, cfg, tensors)
  return cfg
