"""What the benchmarks share: interleaved timing, robust summaries, and taking PEFT layers out of a model.

Timing is interleaved round by round (forward order on even rounds, reverse on odd ones), so a burst of
load on a shared machine, or a cache warmed by the previous method, falls on every method alike. The
ratio to the reference is the median of per-round ratios (each method against the reference in the same
round), which is less sensitive to slow drift than the ratio of the two medians.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


def _nothing() -> None:
    return None


@dataclass
class Method:
    """One contender: ``run`` is timed; ``enter`` / ``exit`` (untimed) make it the model's active method."""

    name: str
    run: Callable[[], object]
    enter: Callable[[], None] = _nothing
    exit: Callable[[], None] = _nothing
    notes: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.exit()


def time_interleaved(
    methods: list[Method], rounds: int, warmup: int = 1
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process CPU seconds per ``run`` call, ``rounds`` calls per method, interleaved;
    ``warmup`` untimed calls first. CPU time (all threads of this process) is the cross-check on a shared
    machine: other processes stretch the wall clock, much less the work this process does."""
    for method in methods:
        with method.active():
            for _ in range(warmup):
                method.run()
    wall: dict[str, list[float]] = {m.name: [] for m in methods}
    cpu: dict[str, list[float]] = {m.name: [] for m in methods}
    for r in range(rounds):
        for method in methods if r % 2 == 0 else methods[::-1]:
            with method.active():
                gc.collect()
                start_cpu, start = time.process_time(), time.perf_counter()
                method.run()
                wall[method.name].append(time.perf_counter() - start)
                cpu[method.name].append(time.process_time() - start_cpu)
    return wall, cpu


def summarize(times: dict[str, list[float]], reference: str) -> dict[str, dict[str, float]]:
    """min / median / max seconds and the median per-round ratio to ``reference`` for every method."""
    ref = times[reference]
    out = {}
    for name, ts in times.items():
        out[name] = {
            "min": min(ts),
            "median": statistics.median(ts),
            "max": max(ts),
            "ratio": statistics.median(t / r for t, r in zip(ts, ref)),
        }
    return out


def peft_wrapped_layers(model: nn.Module) -> list[tuple[nn.Module, str, BaseTunerLayer]]:
    """(parent, attribute, PEFT layer) for every PEFT tuner layer in ``model``."""
    found = []
    for parent in model.modules():
        for attr, child in parent.named_children():
            if isinstance(child, BaseTunerLayer):
                found.append((parent, attr, child))
    return found


@contextlib.contextmanager
def peft_layers_removed(model: nn.Module) -> Iterator[None]:
    """Put each PEFT layer's own base layer back in its place for the duration: the model as it was
    before any adapter was added (or, after ``fuse_lora``, as ``unload_lora`` would leave it), with the
    adapters kept aside so that they can come back at no cost."""
    wrapped = peft_wrapped_layers(model)
    for parent, attr, layer in wrapped:
        setattr(parent, attr, layer.get_base_layer())
    try:
        yield
    finally:
        for parent, attr, layer in wrapped:
            setattr(parent, attr, layer)


def markdown_header(columns: list[str]) -> str:
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)


def markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"
