"""Several processes of one run (DDP, FSDP, DeepSpeed; torchrun, accelerate or Slurm started): they stop together.

Two ways a process can leave the others behind, and what each process does about it:

* it fails with a message of its own (a full disk while it writes its part of a checkpoint): every process
  learns which processes failed from one all-reduce (:func:`failed_processes`) and stops with a line;
* it dies (SIGKILL, out of memory, a lost node): the next collective of the others fails (gloo at once,
  NCCL after ``--ddp_timeout``), and :func:`lost_process_message` turns that error into one line.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import torch

# What torch's process groups say when a peer is gone or silent, besides raising DistError (gloo names its
# source file: "[.../gloo/transport/tcp/pair.cc:537] Read error ...: Connection reset by peer", "Timed out ...").
_TRANSPORT_WORDS = ("gloo", "nccl", "c10d", "processgroup", "connection reset by peer", "connection closed by peer")


@dataclass
class RunPosition:
    """The last optimizer step this process finished (0: none yet), for the line a lost process gets."""

    step: int = 0


def process_group_kwargs(ddp_timeout_minutes: int | None) -> list:
    """accelerate's handler that sets the collectives' timeout (--ddp_timeout), or nothing for torch's default."""
    if ddp_timeout_minutes is None:
        return []
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=ddp_timeout_minutes))]


def is_collective_failure(err: BaseException, num_processes: int) -> bool:
    """True when ``err`` is a collective that failed because another process is gone or did not answer."""
    if num_processes <= 1 or not isinstance(err, RuntimeError):
        return False
    if isinstance(err, torch.distributed.DistError):
        return True
    text = str(err).lower()
    return any(word in text for word in _TRANSPORT_WORDS)


def lost_process_message(err: BaseException, num_processes: int, step: int, last_checkpoint: Path | None) -> str:
    """One line for a collective that failed: what happened, at which step, and what is intact."""
    lines = str(err).strip().splitlines()
    # gloo: "[.../pair.cc:537] Read error [127.0.0.1]:8601: Connection reset by peer. This is typically ... GLHF!"
    reason = lines[-1].split("] ", 1)[-1].split(". ")[0] if lines else type(err).__name__
    when = f"at step {step}" if step else "before the first step"
    kept = (
        f"the last complete checkpoint is {last_checkpoint}: resume with --resume_from_checkpoint latest"
        if last_checkpoint
        else "no checkpoint was saved: start the run again"
    )
    return (
        f"another process of this run (of {num_processes}) stopped, lost its connection or did not answer within "
        f"--ddp_timeout during a collective {when} ({reason}); {kept}"
    )


def failed_processes(accelerator, failed: bool) -> list[int]:
    """The indices of the processes where ``failed`` is True, known on every process (one all-reduce).

    Every process must call it at the same point: it is how one process's failure (a full disk on the main
    process while the others wait to rename a checkpoint) stops the others at once instead of leaving them
    in a barrier until the collective timeout.
    """
    if accelerator.num_processes == 1:
        return [0] if failed else []
    flags = torch.zeros(accelerator.num_processes, device=accelerator.device)
    flags[accelerator.process_index] = float(failed)
    flags = accelerator.reduce(flags, reduction="sum")
    return [index for index, flag in enumerate(flags.tolist()) if flag > 0]


def describe_processes(indices: list[int]) -> str:
    """ "the main process", "process 1", "the main process and process 2"."""
    names = ["the main process" if i == 0 else f"process {i}" for i in indices]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
