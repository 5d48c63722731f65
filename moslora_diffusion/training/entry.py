"""The trainer's entry point: flags are parsed and checked with light imports, then the recipe loads.

``moslora train --help`` and bad flags answer in about a second, before torch, diffusers and accelerate
(several seconds) are imported; the recipe (:mod:`.dreambooth`) is imported only for a run.
"""

from __future__ import annotations

import gc
import sys

from .. import _warnings  # noqa: F401  (silences library notices that are not the user's concern)
from .config import DEFAULT_PROG, UsageError, parse_run_config
from .guards import INTERRUPTED_EXIT_CODES, TrainingStopped


def main(argv: list[str] | None = None, prog: str = DEFAULT_PROG) -> int:
    try:
        config = parse_run_config(argv, prog=prog)
        from .run_inputs import resolve_run_inputs  # reads the base's model_index.json, lists images

        config, inputs = resolve_run_inputs(config)
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    try:
        from .dreambooth import train  # torch, diffusers, accelerate: loaded once the flags are good

        train(config, inputs)
    except UsageError as err:  # found once the folder is locked or the base loaded (e.g. target modules it lacks)
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:  # another run holds --output_dir, a full disk, a diverged loss, Ctrl-C / SIGTERM
        stopped = (str(err), err.exit_code)
    else:
        return 0
    # Printed once the run's frames are gone, so that its progress bar is closed first: this is the last line
    # (collected, for frames an exception kept in a reference cycle).
    gc.collect()
    message, exit_code = stopped
    print(
        f"{prog}: {'interrupted' if exit_code in INTERRUPTED_EXIT_CODES else 'error'}: {message}",
        file=sys.stderr,
        flush=True,
    )
    return exit_code
