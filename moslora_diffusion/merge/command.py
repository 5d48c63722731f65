"""``moslora merge``: parsed arguments in, a merge and a one-line summary out."""

from __future__ import annotations

import sys

from .deltas import first_line
from .plan import merge_checkpoint
from .specs import parse_adapter_spec


def run_merge(args) -> int:
    """``moslora merge`` on parsed arguments (see ``moslora_diffusion.cli``): merge, print a one-line summary.

    Bad input raises ValueError before anything is written; a failure while writing (disk full,
    permissions) also becomes one ValueError line, the output left as it was.
    """
    components = None
    if args.components is not None:
        components = [c.strip() for c in args.components.split(",") if c.strip()]
        if not components:
            raise ValueError("--components: give at least one component name")
    try:
        result = merge_checkpoint(
            args.base,
            [parse_adapter_spec(a) for a in args.adapter],
            args.output,
            base_config=getattr(args, "base_config", None),
            dtype=args.dtype,
            components=components,
            overwrite=args.overwrite,
            progress=sys.stderr.isatty(),
        )
    except (OSError, MemoryError) as err:
        raise ValueError(
            f"merge into {args.output} failed, nothing was written: {first_line(err) or type(err).__name__}"
        ) from None
    print(result.summary())
    return 0
