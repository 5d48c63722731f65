"""The pieces that stop every process of a run together (moslora_diffusion.training.processes), without processes."""

from __future__ import annotations

import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from moslora_diffusion.training.config import UsageError, parse_run_config
from moslora_diffusion.training.processes import (
    describe_processes,
    failed_processes,
    is_collective_failure,
    lost_process_message,
    process_group_kwargs,
)

GLOO_RESET = RuntimeError(
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:8601: Connection reset by peer. "
    "This is typically caused by a remote worker hanging or bugs in the application. GLHF!"
)


@pytest.mark.parametrize(
    "err, processes, expected",
    [
        (GLOO_RESET, 2, True),
        (RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 60000ms for recv"), 2, True),
        (torch.distributed.DistBackendError("NCCL communicator was aborted"), 8, True),
        (GLOO_RESET, 1, False),  # one process: no collective to fail
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), 2, False),  # a bug, not a lost process
        (OSError(28, "No space left on device"), 2, False),
    ],
)
def test_collective_failures_are_told_apart_from_other_errors(err, processes, expected):
    assert is_collective_failure(err, processes) is expected


def test_a_lost_process_is_one_line_with_the_step_and_the_checkpoint_to_resume_from():
    assert lost_process_message(GLOO_RESET, 2, 350, Path("out/checkpoint-350")) == (
        "another process of this run (of 2) stopped, lost its connection or did not answer within --ddp_timeout "
        "during a collective at step 350 (Read error [127.0.0.1]:8601: Connection reset by peer); the last "
        "complete checkpoint is out/checkpoint-350: resume with --resume_from_checkpoint latest"
    )
    early = lost_process_message(GLOO_RESET, 2, 0, None)
    assert "before the first step" in early and early.endswith("no checkpoint was saved: start the run again")


@pytest.mark.parametrize(
    "indices, text",
    [([0], "the main process"), ([3], "process 3"), ([0, 2], "the main process and process 2"),
     ([1, 2, 3], "process 1, process 2 and process 3")],
)  # fmt: skip
def test_describe_processes(indices, text):
    assert describe_processes(indices) == text


def test_one_process_needs_no_collective_to_agree_on_a_failure():
    accelerator = SimpleNamespace(num_processes=1, process_index=0)
    assert failed_processes(accelerator, True) == [0]
    assert failed_processes(accelerator, False) == []


def test_ddp_timeout_flag_sets_the_process_group_timeout_in_minutes():
    required = ["--pretrained_model_name_or_path", "tiny:sd15", "--instance_data_dir", "x", "--instance_prompt", "p"]
    assert process_group_kwargs(parse_run_config(required).ddp_timeout) == []  # torch's default
    (handler,) = process_group_kwargs(parse_run_config([*required, "--ddp_timeout", "5"]).ddp_timeout)
    assert handler.timeout == datetime.timedelta(minutes=5)
    with pytest.raises(UsageError, match="--ddp_timeout must be positive"):
        parse_run_config([*required, "--ddp_timeout", "0"])
