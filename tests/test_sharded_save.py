"""The trainer's adapter save under sharding: a tiny SD 1.5 UNet with a MoSLoRA adapter wrapped in torch's
FSDP1 and FSDP2 over gloo (2 CPU processes), gathered and written by the functions the trainer's checkpoint
hook and final save use (tests/sharded_save_worker.py). accelerate never enables FSDP on a machine without
GPUs, so the wrappers are torch's own; DeepSpeed ZeRO-3 cannot run here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_support import PROMPT, REPO

from moslora_diffusion.loaders import load_moslora_weights
from moslora_diffusion.testing import make_tiny_pipeline


@pytest.mark.parametrize("how", ["fsdp1", "fsdp2"])
def test_sharded_adapter_is_gathered_whole_and_written_files_load(tmp_path, how):
    out = tmp_path / how
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "tests" / "sharded_save_worker.py"), how, str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    local, total = (int(n) for n in result.stdout.split("local adapter elements: ")[1].split()[::2])
    assert local < total  # really sharded: the main process's module holds only part of the adapter

    reference, gathered = load_file(out / "reference.safetensors"), load_file(out / "gathered.safetensors")
    assert sorted(gathered) == sorted(reference) and len(reference) == 96  # A, M, B of 32 attention projections
    assert all(torch.equal(gathered[k], reference[k]) for k in reference)

    pipe = make_tiny_pipeline("sd15")
    assert load_moslora_weights(pipe, out / "files", trainable=True) == "native"
    loaded = {n: p for n, p in pipe.unet.named_parameters() if "lora_" in n}
    assert sorted(loaded) == sorted(reference)
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)

    stock = make_tiny_pipeline("sd15")  # the folded file, read by stock diffusers
    call = dict(height=32, width=32, num_inference_steps=2, output_type="np")
    base = stock(PROMPT, generator=torch.Generator().manual_seed(0), **call).images
    stock.load_lora_weights(str(out / "files"))
    adapted = stock(PROMPT, generator=torch.Generator().manual_seed(0), **call).images
    assert np.abs(adapted - base).max() > 1e-3
