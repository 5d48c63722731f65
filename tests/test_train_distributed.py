"""Two processes on CPU (gloo) through torchrun: the same script trains with DDP and writes one valid adapter."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch
from train_support import PROMPT, REPO, tiny_run_argv

from moslora_diffusion.testing import make_tiny_pipeline


def test_torchrun_two_processes_write_one_adapter_that_stock_diffusers_loads(tmp_path):
    out = tmp_path / "out"
    argv = tiny_run_argv("sd15", out, "--checkpointing_steps", "1", "--train_batch_size", "2")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(REPO / "train_scripts" / "train_dreambooth_moslora.py"),
        *argv,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [line for line in result.stdout.splitlines() if line.startswith("Trained ")]
    assert len(summaries) == 1 and "on 2 process(es)" in summaries[0], result.stdout  # one line, from the main process
    assert sorted(p.name for p in (out / "checkpoint-2").glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]

    pipe = make_tiny_pipeline("sd15")
    call = dict(height=32, width=32, num_inference_steps=2, output_type="np")
    base = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **call).images
    pipe.load_lora_weights(str(out))
    adapted = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **call).images
    assert np.abs(adapted - base).max() > 1e-3
