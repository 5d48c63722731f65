"""The DreamBooth script with one test-only fault hook, for tests/test_reliability_training.py.

    python tests/reliability_trainer.py --stall_checkpoint N --ready FILE --release FILE -- <trainer flags>

While checkpoint-N is being written (its adapter file written, the rest not), create FILE (--ready) and
wait until the --release file exists: the test kills or interrupts the process right there. Nothing of
this is in the library; without --stall_checkpoint it is the plain script.
"""

from __future__ import annotations

import argparse
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--stall_checkpoint", type=int)
    parser.add_argument("--ready", type=Path)
    parser.add_argument("--release", type=Path)
    split = sys.argv.index("--")
    hook = parser.parse_args(sys.argv[1:split])
    if hook.stall_checkpoint is not None:
        stall_while_writing(hook.stall_checkpoint, hook.ready, hook.release)
    sys.exit(main(sys.argv[split + 1 :]))
