"""Merging into a loaded pipeline's own weights: W += w * s * B M A, in fp32, cast to each weight's dtype."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch

from ..families import family_of_pipeline
from ..quantized import quantization_backend
from .deltas import AdapterDeltas, select_components
from .hollow import hollow_pipeline_like
from .specs import as_specs

logger = logging.getLogger(__name__)


def refuse_quantized_parameter(param: torch.Tensor, name: str) -> None:
    """ValueError for a quantized weight: adding to a quantized copy would silently change nothing."""
    backend = quantization_backend(param)
    if backend is not None:
        raise ValueError(
            f"cannot merge into {name}: it is quantized by {backend}; merge into the full-precision base "
            "(moslora merge --base <folder>), or load the adapter and call fuse_lora(), which requantizes"
        )


def merge_adapters(pipe, adapters: Iterable, components: Sequence[str] | None = None):
    """Fuse ``adapters`` ([(path, weight), ...], paths or :class:`AdapterSpec`) into ``pipe``'s weights.

    W += w * s * B M A for every adapted layer, computed in fp32 and cast to each weight's dtype; no adapter
    layer is ever added to ``pipe`` (the adapters live in a hollow copy). ``components`` limits the merge
    (default: every adaptable component). Returns ``pipe``.
    """
    family = family_of_pipeline(pipe)
    specs = as_specs(adapters)
    present = [c for c in family.adapter_components() if getattr(pipe, c, None) is not None]
    components = select_components(family, components, present)
    deltas = AdapterDeltas(hollow_pipeline_like(pipe), family, specs, components)
    with torch.no_grad():
        for component, targets in deltas.targets.items():
            params = dict(getattr(pipe, component).named_parameters())
            for key in targets:
                module, _, leaf = key.rpartition(".")
                param = params.get(key, params.get(f"{module}.base_layer.{leaf}"))
                if param is None:
                    raise ValueError(f"{component} has no parameter {key!r} to merge into")
                refuse_quantized_parameter(param, f"{component}.{key}")
                delta = deltas.delta(component, key).to(param.device)
                param.copy_((param.float() + delta).to(param.dtype))
    logger.info(
        "Merged %d adapter(s) into %d tensors of %s", len(specs), deltas.count(), ", ".join(deltas.targets) or "nothing"
    )
    return pipe
