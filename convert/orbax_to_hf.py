"""Orbax checkpoint folder (or a train.py run folder: its latest step) -> Hugging Face safetensors folder.

python convert/orbax_to_hf.py CKPT_DIR OUT_DIR [--dtype bfloat16|float32|float16] [--force] [--peft]

Writes the hub layout (per-expert tensors), sharded one decoder layer per file, which transformers loads; a
LoRA run's adapters are merged into its base weights. With --peft, a LoRA run's adapters alone, as a peft
adapter folder for the base model in transformers' layout (`PeftModel.from_pretrained(base, OUT_DIR)`).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_moe_jax.convert import export_hf  # noqa: E402
from qwen_moe_jax.errors import cli_main  # noqa: E402
from qwen_moe_jax.peft_export import export_peft  # noqa: E402


@cli_main
def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("ckpt_dir", help="checkpoint folder from hf_to_orbax.py, or a train.py run folder")
  ap.add_argument("out_dir", help="Hugging Face folder to write")
  ap.add_argument("--dtype", help="tensor dtype to write (default: the stored one)")
  ap.add_argument("--force", action="store_true", help="replace the contents of a non-empty OUT_DIR")
  ap.add_argument("--peft", action="store_true", help="a LoRA run's adapters only, in peft's adapter format")
  args = ap.parse_args()
  if args.peft:
    export_peft(args.ckpt_dir, args.out_dir, args.dtype, args.force)
  else:
    export_hf(args.ckpt_dir, args.out_dir, args.dtype, args.force, progress=sys.stderr.isatty())
  print(f"wrote {args.out_dir}", file=sys.stderr)


if __name__ == "__main__":
  main()
