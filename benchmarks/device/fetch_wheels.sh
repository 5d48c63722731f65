#!/usr/bin/env bash
# Run HERE (with the package registry), before a device run: downloads the wheels the GPU machine lacks
# into .wheels/ (git-ignored), to be named in the device tool's `carry`. The GPU image has torch,
# transformers, accelerate, safetensors, pillow, pyyaml, einops; not diffusers or lycoris-lora, and its
# peft is not the 0.21.x our layer needs.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .wheels
# bitsandbytes (43 MB, CUDA kernels inside) and gguf (pure Python) for the issue-15 memory parts; the
# whole folder stays under the device tool's 64 MiB carry.
python3 -m pip download --quiet --no-deps --dest .wheels diffusers==0.42.1 peft==0.21.2 lycoris-lora==4.1.3 toml \
  bitsandbytes==0.50.2 gguf==0.19.0
ls -la .wheels
