"""The adapter in memory, independent of file layout: per module delta W = s * B M A.

:class:`AdapterState` holds every adapted module of every component (:class:`ComponentAdapter`) as
:class:`LayerFactors`, with the per-component settings a native header records (``CONFIG_FIELDS``).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from peft.utils.other import get_pattern_key

from ..clip_names import without_clip_root
from ..layer import fold_mixer_into_lora_b

# Per-component settings the native header records (PEFT LoraConfig fields plus MoSLoRA's own).
CONFIG_FIELDS = (
    "use_moslora", "r", "lora_alpha", "use_rslora", "mixer_init", "train_mixer",
    "target_modules", "lora_dropout", "rank_pattern", "alpha_pattern",
)  # fmt: skip


@dataclass
class LayerFactors:
    """One adapted module: delta W = scale * B M A (``mixer`` None means M = I, a plain LoRA layer)."""

    lora_A: torch.Tensor  # (r, in) or (r, in, kh, kw)
    lora_B: torch.Tensor  # (out, r) or (out, r, 1, 1)
    mixer: torch.Tensor | None  # (r, r)
    scale: float
    source_key: str = ""  # the key of A in the file it came from, for error messages

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def folded_lora_b(self) -> torch.Tensor:
        """B' = B M, computed in at least fp32 and returned in B's dtype."""
        if self.mixer is None:
            return self.lora_B
        compute = torch.promote_types(self.lora_B.dtype, torch.float32)
        return fold_mixer_into_lora_b(self.lora_B.to(compute), self.mixer.to(compute)).to(self.lora_B.dtype)

    def delta_weight(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """scale * B M A shaped like the base weight: (out, in) or (out, in, kh, kw)."""
        b = self.lora_B.to(dtype).flatten(1)
        if self.mixer is not None:
            b = b @ self.mixer.to(dtype)
        delta = b @ self.lora_A.to(dtype).flatten(1)
        return self.scale * delta.reshape(self.lora_B.shape[0], *self.lora_A.shape[1:])


@dataclass
class ComponentAdapter:
    """The adapter on one pipeline component (unet, transformer, text_encoder, ...)."""

    config: dict  # CONFIG_FIELDS
    layers: dict[str, LayerFactors]  # module path -> factors
    # False while the module names are kohya stems (dots lost) not yet matched against a model.
    resolved: bool = True


@dataclass
class AdapterState:
    """A whole adapter as read from a file or a pipeline, before it is written in some layout."""

    components: dict[str, ComponentAdapter]
    family: str | None = None
    base_model: str | None = None
    adapter_name: str = "default"
    source_format: str = "native"  # the layout it was read from ("live": a pipeline)
    source_path: Path | None = None

    @property
    def has_mixer(self) -> bool:
        return any(layer.mixer is not None for c in self.components.values() for layer in c.layers.values())

    def layer_items(self):
        """(component, path, LayerFactors) over the whole adapter."""
        for component, adapter in self.components.items():
            for path, layer in adapter.layers.items():
                yield component, path, layer

    def require_resolved(self, layout: str) -> None:
        """Kohya stems cannot be written in another layout until a pipeline has named their modules."""
        for component, adapter in self.components.items():
            if not adapter.resolved:
                raise ValueError(
                    f"{self.source_path or 'adapter'}: the {component} module names of a kohya file can only be "
                    f"matched against a pipeline; load it with load_moslora_weights to write the {layout} layout"
                )


def scaled(tensor: torch.Tensor, factor: float, what: str = "lora_B") -> torch.Tensor:
    """factor * tensor, computed in at least fp32 and returned in the tensor's dtype; refuses an overflow."""
    if math.isclose(factor, 1.0, rel_tol=1e-12):
        return tensor
    out = (tensor.to(torch.promote_types(tensor.dtype, torch.float32)) * factor).to(tensor.dtype)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"scaling {what} by {factor} overflows {tensor.dtype}; write the adapter in float32")
    return out


def most_common_alpha(layers) -> float:
    """The most common s * r over ``layers``: a component's one alpha in the kohya layouts."""
    products = Counter(layer.scale * layer.rank for layer in layers)
    return products.most_common(1)[0][0]


def config_rank(config: dict, path: str) -> int:
    """r for module ``path`` under ``config``, rank_pattern applied."""
    r = config["r"]
    if config.get("rank_pattern"):
        r = config["rank_pattern"].get(get_pattern_key(list(config["rank_pattern"]), path), r)
    return r


def config_scale(config: dict, path: str) -> float:
    """s for module ``path`` under ``config``: alpha / r (alpha / sqrt(r) with rsLoRA), patterns applied."""
    r, alpha = config_rank(config, path), config["lora_alpha"]
    if config.get("alpha_pattern"):
        alpha = config["alpha_pattern"].get(get_pattern_key(list(config["alpha_pattern"]), path), alpha)
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def component_config_from_peft(config) -> dict:
    """The native header's record of a MoSLoRAConfig or a plain peft LoraConfig."""
    targets = config.target_modules
    return {
        "use_moslora": bool(getattr(config, "use_moslora", False)),
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "use_rslora": bool(config.use_rslora),
        "mixer_init": getattr(config, "mixer_init", None),
        "train_mixer": getattr(config, "train_mixer", None),
        "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
        "lora_dropout": float(config.lora_dropout),
        "rank_pattern": dict(config.rank_pattern or {}),
        "alpha_pattern": dict(config.alpha_pattern or {}),
    }


def infer_component_config(layers: dict[str, LayerFactors], use_moslora: bool = False) -> dict:
    """A config for layers read without one (kohya files, headerless diffusers files).

    r is the most common rank, alpha gives the most common scale at that rank; other ranks go to
    rank_pattern. Scales that still differ are folded into B by the writers, so nothing is lost.
    """
    ranks = Counter(layer.rank for layer in layers.values())
    r = ranks.most_common(1)[0][0] if ranks else 1
    scales = Counter(layer.scale for layer in layers.values() if layer.rank == r)
    scale = scales.most_common(1)[0][0] if scales else 1.0
    alpha = scale * r
    return {
        "use_moslora": use_moslora,
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "use_rslora": False,
        "mixer_init": "identity" if use_moslora else None,
        "train_mixer": True if use_moslora else None,
        # Exact module names, written so that they match with or without CLIP's "text_model." root.
        "target_modules": sorted(without_clip_root(p) for p in layers),
        "lora_dropout": 0.0,
        "rank_pattern": {without_clip_root(p): layer.rank for p, layer in layers.items() if layer.rank != r},
        "alpha_pattern": {},
    }


def as_moslora_state(state: AdapterState) -> AdapterState:
    """Every component as a MoSLoRA adapter with one rank and one scale; per-layer scale differences
    (and missing mixers, M = I) go into the mixer, so delta W is unchanged. Used to resume training
    from a folded or kohya file."""
    state.require_resolved("native")
    components = {}
    for component, adapter in state.components.items():
        ranks = {layer.rank for layer in adapter.layers.values()}
        if len(ranks) != 1:
            raise ValueError(
                f"{state.source_path}: {component} has layers of ranks {sorted(ranks)}; "
                "a trainable MoSLoRA adapter needs one rank"
            )
        config = adapter.config
        if not config.get("use_moslora"):
            config = infer_component_config(adapter.layers, use_moslora=True)
        layers = {}
        for path, layer in adapter.layers.items():
            ratio = layer.scale / config_scale(config, path)
            mixer = layer.mixer if layer.mixer is not None else torch.eye(layer.rank, dtype=layer.lora_A.dtype)
            if not math.isclose(ratio, 1.0, rel_tol=1e-9):
                mixer = (mixer.double() * ratio).to(mixer.dtype)
            layers[path] = replace(layer, mixer=mixer, scale=config_scale(config, path))
        components[component] = ComponentAdapter(config, layers)
    return replace(state, components=components)
