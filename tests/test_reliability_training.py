"""Faults injected into DreamBooth runs on a tiny SD 1.5 base: SIGKILL after a checkpoint and while one is
being written, Ctrl-C, a second trainer on the same folder, a full disk, a NaN or infinite loss, pickled
base weights. Nothing is lost (a resumed run ends with the uninterrupted run's adapter, bit for bit),
nothing half-written is ever picked up, and every failure is one line and a non-zero exit status.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from train_support import REPO, native_adapter, run_main, tiny_run_argv

from moslora_diffusion.formats import WEIGHT_NAMES
from moslora_diffusion.testing import save_tiny_pipeline
from moslora_diffusion.training import checkpoints, dreambooth
from moslora_diffusion.training.checkpoints import STATE_FILE, read_training_state, resolve_resume_checkpoint
from moslora_diffusion.training.guards import LOCK_NAME, OutputDirLock, TrainingStopped, _process_start_time
from moslora_diffusion.training.train_log import read_train_log

STEPS = 24
PROG = "train_dreambooth_moslora.py"
ADAPTER_FILES = tuple(WEIGHT_NAMES.values())


pytestmark = pytest.mark.usefixtures("one_thread")


def argv(out: Path, *extra: str) -> list[str]:
    """A 24-step run with randomness everywhere (dropout, flips), a checkpoint every 4 steps."""
    return tiny_run_argv(
        "sd15", out, "--max_train_steps", str(STEPS), "--checkpointing_steps", "4", "--num_validation_images", "0",
        "--lora_dropout", "0.1", "--random_flip", *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    assert run_main(argv(out)) == 0
    return native_adapter(out)


def resume(out: Path, *extra: str) -> int:
    return run_main(argv(out, "--resume_from_checkpoint", "latest", *extra))


def assert_same_adapter(out: Path, expected: dict[str, torch.Tensor]) -> None:
    resumed = native_adapter(out)
    assert resumed.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(expected[k], resumed[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run's, first {different[0]}"


def assert_complete(checkpoint: Path, step: int) -> None:
    assert read_training_state(checkpoint)["step"] == step
    assert load_file(checkpoint / "adapter_unet.safetensors")
    assert (checkpoint / "optimizer.bin").is_file() and (checkpoint / "random_states_0.pkl").is_file()


def error_line(err: str) -> str:
    """The recipe's last stderr line, after checking that no traceback came before it."""
    assert "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


# --------------------------------------------------------------------------------------------------
# Killed and interrupted runs (subprocesses)


def start_trainer(out: Path, log: Path, *hook: str) -> subprocess.Popen:
    command = [sys.executable, str(REPO / "tests" / "reliability_trainer.py"), *hook, "--", *argv(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with open(log, "w") as f:
        return subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env)


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(
                f"the trainer ended (status {proc.returncode}) before the fault could be injected:\n{log.read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for the trainer:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def test_sigkill_at_a_random_step_after_a_checkpoint_loses_nothing(tmp_path, uninterrupted, caplog):
    out, log = tmp_path / "out", tmp_path / "log"
    proc = start_trainer(out, log)
    wait_for(lambda: (out / "checkpoint-4").is_dir(), proc, log)
    time.sleep(random.uniform(0, 0.5))
    proc.kill()
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"

    latest = resolve_resume_checkpoint(out, "latest")
    step = read_training_state(latest)["step"]
    assert step >= 4 and step < STEPS
    for checkpoint in out.glob("checkpoint-*"):
        assert_complete(checkpoint, int(checkpoint.name.split("-")[1]))
    assert not any((out / name).exists() for name in ADAPTER_FILES)
    assert (out / LOCK_NAME).is_file(), "the killed run's lock is left behind"

    with caplog.at_level(logging.WARNING, logger="moslora_diffusion"):
        assert resume(out) == 0
    assert any("no longer running" in r.getMessage() and f"pid {proc.pid}" in r.getMessage() for r in caplog.records)
    assert_same_adapter(out, uninterrupted)
    assert not (out / LOCK_NAME).exists()


def test_sigkill_while_a_checkpoint_is_written_never_resumes_from_it(tmp_path, uninterrupted):
    out, log, ready = tmp_path / "out", tmp_path / "log", tmp_path / "ready"
    proc = start_trainer(
        out, log, "--stall_checkpoint", "8", "--ready", str(ready), "--release", str(tmp_path / "never")
    )
    wait_for(ready.exists, proc, log)
    proc.kill()
    proc.wait()

    half = out / ".checkpoint-8.tmp"
    assert (half / "adapter_unet.safetensors").is_file() and not (half / STATE_FILE).exists()
    assert not (out / "checkpoint-8").exists()
    assert resolve_resume_checkpoint(out, "latest") == out / "checkpoint-4"
    assert resume(out) == 0
    assert not half.exists(), "the half-written checkpoint was not cleaned up"
    assert_same_adapter(out, uninterrupted)


def test_ctrl_c_saves_the_current_step_and_a_second_trainer_is_refused_meanwhile(tmp_path, uninterrupted, capsys):
    out, log, ready, release = tmp_path / "out", tmp_path / "log", tmp_path / "ready", tmp_path / "release"
    proc = start_trainer(out, log, "--stall_checkpoint", "8", "--ready", str(ready), "--release", str(release))
    wait_for(ready.exists, proc, log)  # the first run is writing checkpoint-8

    started = time.monotonic()
    assert run_main(argv(out)) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith(
        f"{PROG}: error: --output_dir '{out}' is in use by another training run (pid {proc.pid} on {socket.gethostname()}"
    )
    assert time.monotonic() - started < 60, "the second trainer did not refuse at once"

    proc.send_signal(signal.SIGINT)
    release.touch()
    assert proc.wait(timeout=300) == 130, log.read_text()[-3000:]
    last = log.read_text().strip().splitlines()[-1]
    assert (
        last
        == f"{PROG}: interrupted: at step 9; saved {out / 'checkpoint-9'}: continue with --resume_from_checkpoint latest"
    )
    assert_complete(out / "checkpoint-8", 8)
    assert_complete(out / "checkpoint-9", 9)
    assert not any((out / name).exists() for name in ADAPTER_FILES)
    assert not (out / LOCK_NAME).exists(), "an interrupted run must release its lock"

    assert resume(out) == 0
    assert_same_adapter(out, uninterrupted)


# --------------------------------------------------------------------------------------------------
# Two trainers, one folder: the lock


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _write_lock(out: Path, pid: int, hostname: str, process_start) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    path.write_text(
        json.dumps(
            {"pid": pid, "hostname": hostname, "process_start": process_start, "started": "earlier", "token": "x"}
        )
    )
    return path


def test_a_live_trainers_lock_refuses_a_second_one_before_it_loads_anything(tmp_path, capsys):
    holder = _sleeper()
    try:
        out = tmp_path / "out"
        lock = _write_lock(out, holder.pid, socket.gethostname(), _process_start_time(holder.pid))
        assert run_main(argv(out)) == 1
        line = error_line(capsys.readouterr().err)
        assert f"is in use by another training run (pid {holder.pid}" in line and "choose another --output_dir" in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
        assert json.loads(lock.read_text())["pid"] == holder.pid, "the refused run touched the lock"
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_from_another_machine_is_never_taken_over(tmp_path):
    _write_lock(tmp_path, 1, "another-machine", None)
    with pytest.raises(TrainingStopped, match="locked by a run on another machine"):
        OutputDirLock(tmp_path).acquire()


@pytest.mark.parametrize("case", ["dead pid", "reused pid", "unreadable"])
def test_a_stale_lock_is_taken_over_with_a_warning(case, tmp_path, caplog):
    if case == "dead pid":
        finished = subprocess.Popen([sys.executable, "-c", "pass"])
        finished.wait()
        _write_lock(tmp_path, finished.pid, socket.gethostname(), None)
    elif case == "reused pid":  # our own pid, but started at another time: the locking process is gone
        _write_lock(tmp_path, os.getpid(), socket.gethostname(), (_process_start_time(os.getpid()) or 0) + 1)
    else:
        (tmp_path / LOCK_NAME).write_text("")
    lock = OutputDirLock(tmp_path)
    with caplog.at_level(logging.WARNING, logger="moslora_diffusion"):
        lock.acquire()
    assert any("Taking over --output_dir" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.record["token"]
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# A full disk


def _checkpoint_adapter_write_fails(step: int):
    write = checkpoints.save_safetensors

    def failing(tensors, path, metadata=None):
        if Path(path).parent.name == f".checkpoint-{step}.tmp":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write(tensors, path, metadata)

    return checkpoints, "save_safetensors", failing


def _checkpoint_optimizer_write_fails(step: int):
    import accelerate.checkpointing

    save = accelerate.checkpointing.save

    def failing(obj, path, *args, **kwargs):
        if Path(path).parent.name == f".checkpoint-{step}.tmp":
            # What torch.save raises when the disk fills.
            raise RuntimeError(
                "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file write failed"
            )
        return save(obj, path, *args, **kwargs)

    return accelerate.checkpointing, "save", failing


@pytest.mark.parametrize("fault", [_checkpoint_adapter_write_fails, _checkpoint_optimizer_write_fails])
def test_a_full_disk_during_a_checkpoint(fault, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(*fault(4))
    assert run_main(argv(out, "--checkpointing_steps", "2", "--max_train_steps", "6")) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"{PROG}: error: could not write checkpoint-4 in '{out}' (")
    assert (
        f"the earlier checkpoints are intact (latest: {out / 'checkpoint-2'})" in line
        and "--resume_from_checkpoint latest" in line
    )
    assert "No space left on device" in line or "file write failed" in line
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "logs"], (
        "a half-written checkpoint, an adapter or the lock was left"
    )
    assert_complete(out / "checkpoint-2", 2)


def test_a_full_disk_during_the_final_save_keeps_the_previous_files(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert run_main(argv(out, "--max_train_steps", "2", "--checkpointing_steps", "2")) == 0
    before = {name: (out / name).read_bytes() for name in (*ADAPTER_FILES, "README.md")}

    import moslora_diffusion.fileio as fileio

    save_file = fileio.save_file

    def full_disk_in_output_dir(tensors, filename, metadata=None):
        if Path(filename).parent == out:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(fileio, "save_file", full_disk_in_output_dir)
    assert resume(out, "--max_train_steps", "4", "--checkpointing_steps", "2") == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"{PROG}: error: could not write the adapter files to '{out}' (")
    assert "No space left on device" in line and f"(latest: {out / 'checkpoint-4'})" in line
    assert {name: (out / name).read_bytes() for name in before} == before, "the previous adapter files changed"
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, "checkpoint-2", "checkpoint-4", "logs"]), (
        "temporary files were left"
    )
    assert_complete(out / "checkpoint-4", 4)


# --------------------------------------------------------------------------------------------------
# A loss that is not finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nan_or_inf_loss_stops_at_that_step_and_writes_no_adapter(bad, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    batch_loss, calls = dreambooth.batch_loss, []

    def diverging(*args, **kwargs):
        calls.append(1)
        loss = batch_loss(*args, **kwargs)
        return loss * bad if len(calls) == 3 else loss

    monkeypatch.setattr(dreambooth, "batch_loss", diverging)
    assert run_main(argv(out, "--checkpointing_steps", "2", "--max_train_steps", "6")) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"{PROG}: error: the loss became NaN or infinite at step 3; training stopped there.")
    assert "a learning rate too high (--learning_rate 0.01)" in line and "fp16 overflow" in line
    assert f"No adapter was written and the last good checkpoint is {out / 'checkpoint-2'}." in line
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "logs"]
    assert [row["step"] for row in read_train_log(out / "logs" / "train_log.jsonl")] == [
        1,
        2,
        3,
    ]  # the diverged step logged
    assert all(
        bool(torch.isfinite(t).all()) for t in load_file(out / "checkpoint-2" / "adapter_unet.safetensors").values()
    )


# --------------------------------------------------------------------------------------------------
# Base weights from elsewhere: safetensors only


class _TouchOnUnpickle:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_training_never_unpickles_base_weights(tmp_path, capsys):
    marker = tmp_path / "pickle-was-executed"
    base = save_tiny_pipeline("sd15", tmp_path / "base")
    (base / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"conv_in.weight": _TouchOnUnpickle(marker)}, base / "unet" / "diffusion_pytorch_model.bin")
    out = tmp_path / "out"
    assert run_main(argv(out, "--pretrained_model_name_or_path", str(base))) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"{PROG}: error: cannot load the base model '{base}'") and "never from pickle files" in line
    assert not marker.exists()
    assert not out.exists(), "a run refused before training left its folder behind"
    shutil.rmtree(base)


def test_a_tampered_checkpoint_pickle_is_never_executed_and_stops_the_resume(tmp_path, capsys):
    """Checkpoints are the one pickle we read (accelerate's optimizer and RNG files, torch.load with
    weights_only=True). accelerate itself skips an unreadable RNG file with an info log, which would make
    the resumed run quietly differ: the trainer checks it first and stops."""
    marker = tmp_path / "pickle-was-executed"
    out = tmp_path / "out"
    assert run_main(argv(out, "--max_train_steps", "2", "--checkpointing_steps", "2")) == 0
    capsys.readouterr()
    torch.save({"random_state": _TouchOnUnpickle(marker)}, out / "checkpoint-2" / "random_states_0.pkl")
    assert resume(out, "--max_train_steps", "4") == 1
    line = error_line(capsys.readouterr().err)
    assert line == (
        f"{PROG}: error: {out / 'checkpoint-2' / 'random_states_0.pkl'} holds objects other than RNG states "
        "(refused unexecuted: weights_only loading); this checkpoint cannot continue the run exactly"
    )
    assert not marker.exists()


def test_sigterm_from_a_scheduler_saves_the_current_step_and_exits_143(tmp_path):
    """Slurm / Kubernetes stop a job with SIGTERM before SIGKILL: the run saves as for Ctrl-C."""
    out, log, ready, release = tmp_path / "out", tmp_path / "log", tmp_path / "ready", tmp_path / "release"
    proc = start_trainer(out, log, "--stall_checkpoint", "8", "--ready", str(ready), "--release", str(release))
    wait_for(ready.exists, proc, log)
    proc.send_signal(signal.SIGTERM)
    release.touch()
    assert proc.wait(timeout=300) == 143, log.read_text()[-3000:]
    text = log.read_text()
    assert "SIGTERM received: finishing this step and saving a checkpoint" in text, text[-3000:]
    lines = text.strip().splitlines()
    assert (
        lines[-1]
        == f"{PROG}: interrupted: at step 9; saved {out / 'checkpoint-9'}: continue with --resume_from_checkpoint latest"
    )
    assert_complete(out / "checkpoint-9", 9)
    assert not any((out / name).exists() for name in ADAPTER_FILES)
    assert not (out / LOCK_NAME).exists(), "a terminated run must release its lock"
