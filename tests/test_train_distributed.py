"""Two processes on CPU (gloo) through torchrun: the same script trains with DDP and writes one valid adapter."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import torch
from train_support import PROMPT, REPO, native_adapter, tiny_run_argv

from moslora_diffusion.testing import make_tiny_pipeline


def _torchrun(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    """The training script in two processes (gloo on CPU), successful."""
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
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **env}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_torchrun_two_processes_write_one_adapter_that_stock_diffusers_loads(tmp_path):
    out = tmp_path / "out"
    result = _torchrun(tiny_run_argv("sd15", out, "--checkpointing_steps", "1", "--train_batch_size", "2"))
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


def _latent_counts(result: subprocess.CompletedProcess) -> tuple[list[int], int]:
    """(images encoded by each process, entries read from the cache) from the run's 'Latents:' line."""
    (line,) = [line for line in result.stderr.splitlines() if "Latents: " in line]
    match = re.search(r"by process: ([\d, ]+)\), (\d+) read", line)
    assert match, line
    return [int(n) for n in match.group(1).split(",")], int(match.group(2))


def test_two_processes_fill_the_disk_latent_cache_once_and_train_as_with_the_memory_cache(tmp_path):
    flags = ["--random_flip", "--num_validation_images", "0", "--max_train_steps", "2"]
    memory = _torchrun(tiny_run_argv("sd15", tmp_path / "memory", *flags, "--cache_latents"))
    assert _latent_counts(memory) == ([10, 10], 0)  # 5 images x 2 flips, each process all of them
    disk = _torchrun(
        tiny_run_argv("sd15", tmp_path / "disk", *flags, "--cache_latents_to_disk"),
        MOSLORA_CACHE_DIR=str(tmp_path / "cache"),
    )
    assert _latent_counts(disk) == ([5, 5], 10)  # each its half, then the other's half from the disk
    assert len(list((tmp_path / "cache" / "latents").glob("*.safetensors"))) == 10
    expected = native_adapter(tmp_path / "memory")
    adapter = native_adapter(tmp_path / "disk")
    assert all(torch.equal(expected[k], adapter[k]) for k in expected)  # another process's latents, the same bits
