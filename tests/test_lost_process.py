"""Two processes started the way Slurm starts them (each on its own, with RANK / WORLD_SIZE / MASTER_ADDR; no
torchrun agent to stop the others): one dies, or the main process fails while it writes a checkpoint. The
others exit within a minute, not after the 30-minute collective timeout, non-zero, with one line; the last
checkpoint is complete and the output folder's lock is released.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from train_support import REPO, tiny_run_argv

from moslora_diffusion.training.checkpoints import STATE_FILE, latest_checkpoint, read_training_state
from moslora_diffusion.training.guards import LOCK_NAME

PROG = "train_dreambooth_moslora.py"
WORLD_SIZE = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(out: Path, *hooks: str) -> list[subprocess.Popen]:
    """Process 0 and 1 of a long tiny run (checkpoint every 2 steps), each started on its own like srun does."""
    argv = tiny_run_argv("sd15", out, "--max_train_steps", "2000", "--checkpointing_steps", "2",
                         "--num_validation_images", "0")  # fmt: skip
    port = free_port()
    processes = []
    for rank in range(WORLD_SIZE):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD_SIZE),
               "LOCAL_WORLD_SIZE": str(WORLD_SIZE), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}  # fmt: skip
        command = [sys.executable, str(REPO / "tests" / "reliability_trainer.py"), *hooks, "--", *argv]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        processes.append(subprocess.Popen(command, env=env, text=True, **pipes))
    return processes


def wait_for(condition, processes: list[subprocess.Popen], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if any(p.poll() is not None for p in processes) or time.monotonic() > deadline:
            for p in processes:
                p.kill()
            outputs = [p.communicate()[1][-2000:] for p in processes]
            pytest.fail(f"the run ended or stalled before the fault was injected: {outputs}")
        time.sleep(0.1)


def last_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    return stderr.strip().splitlines()[-1]


def assert_complete(checkpoint: Path) -> None:
    assert read_training_state(checkpoint)["step"] == int(checkpoint.name.split("-")[1])
    assert load_file(checkpoint / "adapter_unet.safetensors")
    assert (checkpoint / "optimizer.bin").is_file()
    rng_states = sorted(p.name for p in checkpoint.glob("random_states_*.pkl"))
    assert rng_states == ["random_states_0.pkl", "random_states_1.pkl"]


@pytest.fixture
def cleanup():
    processes: list[subprocess.Popen] = []
    yield processes
    for p in processes:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_a_killed_process_stops_the_other_at_once_with_one_line(tmp_path, cleanup):
    out = tmp_path / "out"
    cleanup += start_processes(out)
    main, other = cleanup
    wait_for(lambda: (out / "checkpoint-4" / STATE_FILE).is_file(), cleanup)
    other.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, err = main.communicate(timeout=120)
    waited = time.monotonic() - killed

    assert main.returncode == 1, err[-3000:]
    assert waited < 60
    line = last_line(err)
    assert line.startswith(f"{PROG}: error: another process of this run (of 2) stopped, lost its connection"), line
    latest = latest_checkpoint(out)
    assert latest is not None
    assert line.endswith(f"the last complete checkpoint is {latest}: resume with --resume_from_checkpoint latest")
    assert_complete(latest)
    assert not (out / LOCK_NAME).exists()
    assert not list(out.glob(".checkpoint-*"))


def test_the_main_process_failing_while_it_writes_a_checkpoint_stops_the_others(tmp_path, cleanup):
    out = tmp_path / "out"
    cleanup += start_processes(out, "--fail_checkpoint_on_main", "6")
    main, other = cleanup
    wait_for(lambda: (out / "checkpoint-4" / STATE_FILE).is_file(), cleanup)
    _, main_err = main.communicate(timeout=120)
    failed = time.monotonic()
    _, other_err = other.communicate(timeout=120)

    assert (main.returncode, other.returncode) == (1, 1), (main_err[-2000:], other_err[-2000:])
    assert time.monotonic() - failed < 60
    intact = f"the earlier checkpoints are intact (latest: {out / 'checkpoint-4'})"
    no_space = f"{PROG}: error: could not write checkpoint-6 in '{out}' ([Errno 28] No space left on device"
    assert last_line(main_err).startswith(no_space)
    assert last_line(main_err).endswith(f"{intact}: make room, then rerun with --resume_from_checkpoint latest")
    assert last_line(other_err) == (
        f"{PROG}: error: could not write checkpoint-6 in '{out}' (the main process could not write its part: "
        f"see its message); {intact}: make room, then rerun with --resume_from_checkpoint latest"
    )
    assert latest_checkpoint(out) == out / "checkpoint-4"
    assert_complete(out / "checkpoint-4")
    assert not (out / LOCK_NAME).exists()
    assert not list(out.glob(".checkpoint-*"))
