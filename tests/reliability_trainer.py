"""The DreamBooth script with test-only fault hooks, for tests/test_reliability_training.py and
tests/test_lost_process.py.

    python tests/reliability_trainer.py --stall_checkpoint N --ready FILE --release FILE -- <trainer flags>
    python tests/reliability_trainer.py --fail_checkpoint_on_main N -- <trainer flags>

--stall_checkpoint: while checkpoint-N is being written (its adapter file written, the rest not), create FILE
(--ready) and wait until the --release file exists: the test kills or interrupts the process right there.
--fail_checkpoint_on_main: the main process (RANK 0) meets a full disk (ENOSPC) when it writes the adapter
file of checkpoint-N; the other processes write their parts. Nothing of this is in the library; without a
hook it is the plain script.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moslora_diffusion.training import checkpoints  # noqa: E402
from moslora_diffusion.training.entry import main  # noqa: E402


def stall_while_writing(step: int, ready: Path, release: Path) -> None:
    write = checkpoints.save_safetensors

    def stalling_write(tensors, path, metadata=None):
        result = write(tensors, path, metadata)
        if Path(path).parent.name == f".{checkpoints.CHECKPOINT_PREFIX}{step}.tmp":
            ready.touch()
            deadline = time.monotonic() + 300
            while not release.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return result

    checkpoints.save_safetensors = stalling_write


def fail_on_main_while_writing(step: int) -> None:
    write = checkpoints.save_safetensors

    def failing_write(tensors, path, metadata=None):
        if Path(path).parent.name == f".{checkpoints.CHECKPOINT_PREFIX}{step}.tmp" and os.environ.get("RANK") == "0":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write(tensors, path, metadata)

    checkpoints.save_safetensors = failing_write


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--stall_checkpoint", type=int)
    parser.add_argument("--ready", type=Path)
    parser.add_argument("--release", type=Path)
    parser.add_argument("--fail_checkpoint_on_main", type=int)
    split = sys.argv.index("--")
    hook = parser.parse_args(sys.argv[1:split])
    if hook.stall_checkpoint is not None:
        stall_while_writing(hook.stall_checkpoint, hook.ready, hook.release)
    if hook.fail_checkpoint_on_main is not None:
        fail_on_main_while_writing(hook.fail_checkpoint_on_main)
    sys.exit(main(sys.argv[split + 1 :]))
