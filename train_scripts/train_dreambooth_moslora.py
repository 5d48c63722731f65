#!/usr/bin/env python
"""DreamBooth training of a MoSLoRA adapter: SD 1.x, SD 2.x, SDXL, SD3 and Flux, one script, on accelerate.

Flags are named as in diffusers' examples/dreambooth/train_dreambooth_lora_sdxl.py, plus the adapter's
own (--rank, --lora_alpha, --mixer_init, --freeze_mixer, --target_modules, ...); --config FILE (TOML or
YAML) gives the same keys. The recipe itself lives in the library, in
moslora_diffusion/training/dreambooth.py (entered through training/entry.py, which answers --help and
bad flags before the heavy imports), so that `moslora train` runs exactly the same code:

    python train_scripts/train_dreambooth_moslora.py --config samples/dreambooth_tiny.toml --output_dir out
    accelerate launch train_scripts/train_dreambooth_moslora.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --instance_data_dir dog --instance_prompt "a photo of sks dog" --output_dir sks-dog --mixed_precision bf16
"""

import sys
from pathlib import Path

try:
    from moslora_diffusion.training.entry import main
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from moslora_diffusion.training.entry import main

if __name__ == "__main__":
    sys.exit(main(prog="train_dreambooth_moslora.py"))
