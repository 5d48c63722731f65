"""What keeps a long run safe on a machine that can fail or be shared: one trainer per output folder,
Ctrl-C (or a scheduler's SIGTERM) that saves before it exits, and a run that stops at the first loss
that is not finite.

    lock = OutputDirLock(output_dir)
    lock.acquire()      # TrainingStopped if a live run holds the folder; a dead run's lock is taken over
    with InterruptRequests() as interrupts:
        ...                              # the loop checks interrupts.requested at each step boundary
    lock.release()

Every early end is a :class:`TrainingStopped`: one message for people and the exit status.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import socket
import sys
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_NAME = ".moslora-train.lock"
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM: a job scheduler's (Slurm, Kubernetes) polite stop
INTERRUPTED_EXIT_CODES = (EXIT_INTERRUPTED, EXIT_TERMINATED)


class TrainingStopped(Exception):
    """The run ended early: ``str(err)`` says why and what to do; ``exit_code`` is the process's status."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


# --------------------------------------------------------------------------------------------------
# One trainer per output folder


class OutputDirLock:
    """``output_dir/.moslora-train.lock``: which process (pid, host, start time) trains into the folder.

    Created with O_EXCL, so of two trainers started together exactly one gets it. A lock whose process is
    gone (same host, pid dead or reused) is stale, left by a killed run: it is taken over with a warning.
    A lock from another host cannot be checked, so it is never taken over.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_NAME
        self.record = {
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "process_start": _process_start_time(os.getpid()),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "token": uuid.uuid4().hex,
        }
        self.held = False
        self.created_folder = False

    def acquire(self) -> None:
        self.created_folder = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a takeover races at most one other trainer
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._clear_stale_lock()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.record, indent=2) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return
        raise TrainingStopped(
            f"could not lock --output_dir '{self.path.parent}': another trainer keeps creating {self.path}"
        )

    def _clear_stale_lock(self) -> None:
        holder = _read_json(self.path)
        folder = self.path.parent
        if holder is not None:
            pid, host = holder.get("pid"), holder.get("hostname")
            who = f"pid {pid} on {host}, started {holder.get('started', '?')}"
            if host != socket.gethostname():
                raise TrainingStopped(
                    f"--output_dir '{folder}' is locked by a run on another machine ({who}); if that run is over, "
                    f"delete {self.path}, or choose another --output_dir"
                )
            if _process_alive(pid, holder.get("process_start")):
                raise TrainingStopped(
                    f"--output_dir '{folder}' is in use by another training run ({who}); wait for it to finish or "
                    "choose another --output_dir (two runs in one folder would overwrite each other's checkpoints)"
                )
            logger.warning(
                "Taking over --output_dir '%s' from a run that is no longer running (%s): its lock was stale",
                folder,
                who,
            )
        else:
            logger.warning("Taking over --output_dir '%s': its lock file %s was unreadable", folder, self.path)
        # Moved aside first, so that of two trainers taking over at once only one removes it.
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{self.record['token']}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return  # the other trainer took it first; the next O_EXCL create decides
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock if it is still ours (and the folder, if this run made it and left it empty)."""
        if self.held and (_read_json(self.path) or {}).get("token") == self.record["token"]:
            self.path.unlink(missing_ok=True)
            if self.created_folder and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()  # a run that failed before writing anything leaves no empty folder
        self.held = False


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc), to tell a reused pid apart."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def _proc_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # the fields after "pid (comm) "; state first


def _process_alive(pid, process_start) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    fields = _proc_stat(pid)
    if fields is None:
        return True  # no /proc (not Linux): the pid exists
    if fields[0] in ("Z", "X"):
        return False  # killed, not yet reaped
    return process_start is None or int(fields[19]) == process_start


# --------------------------------------------------------------------------------------------------
# Ctrl-C


class InterruptRequests:
    """While active, the first Ctrl-C (SIGINT) or SIGTERM only sets ``requested``: the loop finishes the step
    it is on, saves a checkpoint and exits with ``exit_code`` (130 for SIGINT, 143 for SIGTERM, as a shell
    reports them). SIGTERM is how Slurm, Kubernetes and systemd stop a job before they kill it, so a
    preempted run keeps its last step. A second signal stops at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.exit_code = EXIT_INTERRUPTED
        self._previous: dict = {}

    def __enter__(self) -> InterruptRequests:
        if _in_main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.exit_code = 128 + signum
        what = "Interrupted" if signum == signal.SIGINT else f"{signal.Signals(signum).name} received"
        print(
            f"{what}: finishing this step and saving a checkpoint (Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# --------------------------------------------------------------------------------------------------
# Messages


def divergence_message(
    step: int,
    what: str,
    *,
    learning_rate: float,
    text_encoder_lr: float | None,
    mixed_precision: str | None,
    last_checkpoint: Path | None,
) -> str:
    """Why the run stopped at a non-finite loss or weight, its likely causes, and what is left.

    ``text_encoder_lr``: None when no text encoder is trained.
    """
    rates = f"--learning_rate {learning_rate:g}"
    if text_encoder_lr is not None:
        rates += f", --text_encoder_lr {text_encoder_lr:g}"
    if mixed_precision == "fp16":
        precision = "fp16 overflow (--mixed_precision fp16: bf16 or no avoids it)"
    else:
        precision = "fp16 overflow, had the run used --mixed_precision fp16"
    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved before it"
    return (
        f"{what} at step {step}; training stopped there. Likely causes: a learning rate too high ({rates}), or "
        f"{precision}. No adapter was written and {kept}."
    )


def refuse_earlier_run_outputs(output_dir: str | os.PathLike) -> None:
    """A ValueError naming what an earlier run left in ``output_dir`` (its adapter files, its checkpoints),
    which a new run would replace: a user who forgot to change the folder must not lose that result."""
    from ..formats import WEIGHT_NAMES
    from .checkpoints import list_checkpoints

    folder = Path(output_dir)
    adapters = [name for name in WEIGHT_NAMES.values() if (folder / name).is_file()]
    earlier = adapters + [p.name for p in list_checkpoints(folder)]
    if earlier:
        raise ValueError(
            f"--output_dir '{output_dir}' already holds an earlier run's {', '.join(earlier[:4])}"
            f"{', ...' if len(earlier) > 4 else ''}; choose another --output_dir, continue that run with "
            "--resume_from_checkpoint latest, or replace it with --overwrite_output_dir"
        )
