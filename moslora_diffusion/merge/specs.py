"""Adapters to merge, on the command line and in Python: ``PATH[:WEIGHT]``."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """An adapter to merge: a file or folder, and the weight w its delta is scaled by."""

    path: Path
    weight: float = 1.0


def parse_adapter_spec(text: str) -> AdapterSpec:
    """``PATH[:WEIGHT]``. The part after the last ':' is a weight only if it parses as a float and the
    whole string is not an existing path, so paths that contain ':' still work. The weight defaults to 1.

    Never a guess: if both ``PATH:WEIGHT`` and ``PATH`` exist, or nothing follows a final ':' of a path that
    does not exist, it is a ValueError saying how to write it.
    """
    head, sep, tail = text.rpartition(":")
    if sep and head and not tail and not os.path.exists(text):
        raise ValueError(
            f"--adapter {text!r}: nothing after the last ':'; write PATH:WEIGHT (e.g. {head}:0.8) or just PATH"
        )
    try:
        weight = float(tail) if sep and head else None
    except ValueError:
        weight = None
    if weight is None:
        return AdapterSpec(Path(text), 1.0)
    if os.path.exists(text):
        if os.path.exists(head):
            raise ValueError(
                f"--adapter {text!r} is ambiguous: both {text!r} and {head!r} exist; write {text}:1 for the first, "
                "or rename one of them"
            )
        return AdapterSpec(Path(text), 1.0)
    if not math.isfinite(weight):
        raise ValueError(f"--adapter {text!r}: the weight must be a finite number, got {tail!r}")
    return AdapterSpec(Path(head), weight)


def as_specs(adapters: Iterable) -> list[AdapterSpec]:
    specs = []
    for item in adapters:
        if isinstance(item, AdapterSpec):
            specs.append(item)
        elif isinstance(item, (str, os.PathLike)):
            specs.append(AdapterSpec(Path(item)))
        else:
            path, weight = item
            specs.append(AdapterSpec(Path(path), float(weight)))
    if not specs:
        raise ValueError("no adapters given: pass at least one --adapter PATH[:WEIGHT]")
    return specs
