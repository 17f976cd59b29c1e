"""Hugging Face qwen2_moe safetensors folder -> self-contained Orbax checkpoint folder.

python convert/hf_to_orbax.py HF_DIR OUT_DIR [--dtype bfloat16|float32|float16] [--force] [--peft ADAPTER_DIR]

--peft merges a peft LoRA adapter (adapter_config.json + adapter_model.safetensors, trained on this base model
in PyTorch) into the weights as they convert: W + (lora_alpha / r) B A, one layer at a time.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_moe_jax.convert import import_hf  # noqa: E402
from qwen_moe_jax.errors import cli_main  # noqa: E402
from qwen_moe_jax.hf_io import model_folder  # noqa: E402


@cli_main
def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("hf_dir", help="folder with config.json and model.safetensors (or an index and shards), or the "
                  "repo id of one in the Hugging Face cache (Qwen/Qwen1.5-MoE-A2.7B-Chat)")
  ap.add_argument("out_dir", help="checkpoint folder to write (params/, config.json, tokenizer files)")
  ap.add_argument("--dtype", help="parameter dtype to store (default: the checkpoint's own)")
  ap.add_argument("--force", action="store_true", help="replace the contents of a non-empty OUT_DIR")
  ap.add_argument("--peft", metavar="ADAPTER_DIR",
                  help="a peft LoRA adapter folder (or repo id in the Hugging Face cache) to merge into the weights")
  args = ap.parse_args()
  cfg = import_hf(model_folder(args.hf_dir), args.out_dir, args.dtype, args.force, progress=sys.stderr.isatty(),
                  peft=args.peft and model_folder(args.peft))
  print(f"wrote {args.out_dir} ({cfg.num_hidden_layers} layers, {cfg.num_experts} experts)", file=sys.stderr)


if __name__ == "__main__":
  main()
