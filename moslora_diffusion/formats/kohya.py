"""The kohya / webui layout (A1111, Forge, ComfyUI, LyCORIS), and kohya key renaming.

    <prefix>_<module, dots as _>.lora_down.weight = A, .lora_up.weight = (s r / alpha) B M, .alpha = alpha
    metadata: the ss_* / modelspec.* fields webui shows on a LoRA card, plus ``moslora.*`` provenance

alpha is one value per component (its most common s r), written on every module: diffusers' kohya reader
applies a text-encoder alpha unlike the most common one to no module, and clients disagree on what a
missing alpha means. A module whose s r differs carries the ratio in lora_up, so delta W is unchanged.

The prefix names the component (lora_unet, lora_te, lora_te1, lora_transformer, ...: ``Family.kohya_prefixes``).
For SD3 and Flux these names are OneTrainer's (diffusers module names under ``lora_transformer_``); the
kohya file of those families uses sd-scripts' original-model names instead (:mod:`.sd_scripts`).
Dots are lost in a stem, so a kohya file read on its own has unresolved module names until
:func:`moslora_diffusion.loaders.resolve_kohya_names` matches them against a model.
"""

from __future__ import annotations

from collections import Counter

import torch

from ..families import FAMILIES, Family, get_family
from ..version import __version__
from .checks import checked_family, require_finite
from .names import FACTOR_SUFFIXES, group_modules, provenance_metadata
from .state import AdapterState, ComponentAdapter, LayerFactors, infer_component_config, most_common_alpha, scaled


def kohya_prefix(family: type[Family], component: str) -> str:
    """The kohya/webui key prefix of ``component`` (lora_unet, lora_te, lora_te1, lora_transformer, ...)."""
    return family.kohya_prefixes[component]


def kohya_stem(prefix: str, path: str) -> str:
    """The kohya module name: prefix, then the module path with dots as underscores."""
    return f"{prefix}_{path.replace('.', '_')}"


def _component_of_prefix() -> dict[str, str]:
    return {prefix: component for family in FAMILIES.values() for component, prefix in family.kohya_prefixes.items()}


def split_kohya_stem(stem: str) -> tuple[str, str] | None:
    """(component, rest) of a kohya module name, or None if no known prefix starts it."""
    table = _component_of_prefix()
    for prefix in sorted(table, key=len, reverse=True):
        if stem.startswith(prefix + "_"):
            return table[prefix], stem[len(prefix) + 1 :]
    return None


def kohya_state_dict(
    state: AdapterState, title: str | None = None, prefixes: dict[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of the kohya/webui layout: lora_down = A, lora_up = (s r / alpha) B M, one
    alpha per component. ``prefixes``: component -> kohya prefix (default: the family's ``kohya_prefixes``)."""
    family = _family_of(state)
    prefixes = prefixes or family.kohya_prefixes
    suffix = FACTOR_SUFFIXES["kohya"]
    tensors: dict[str, torch.Tensor] = {}
    for component, adapter in state.components.items():
        if component not in prefixes:
            where = state.source_path or "adapter"
            raise ValueError(f"{where}: {family.name} files have no kohya prefix for {component!r}")
        alpha = most_common_alpha(adapter.layers.values())
        for path, layer in adapter.layers.items():
            stem = kohya_stem(prefixes[component], path)
            if f"{stem}{suffix['A']}" in tensors:
                raise ValueError(f"{component}.{path}: two modules share the kohya name {stem!r}")
            tensors[f"{stem}{suffix['A']}"] = layer.lora_A
            tensors[f"{stem}{suffix['B']}"] = scaled(layer.folded_lora_b(), layer.scale * layer.rank / alpha)
            tensors[f"{stem}{suffix['alpha']}"] = torch.tensor(alpha, dtype=torch.float32)
    require_finite(tensors, state.source_path)
    return tensors, kohya_metadata(state, family, title)


def _family_of(state: AdapterState) -> type[Family]:
    if state.family is None:
        raise ValueError(
            f"{state.source_path or 'adapter'}: the model family is unknown, so the kohya key prefixes are too"
        )
    return get_family(state.family)


def kohya_metadata(state: AdapterState, family: type[Family], title: str | None) -> dict[str, str]:
    """The LoRA-card fields webui (A1111/Forge) and ComfyUI show, plus where the adapter came from."""
    denoiser = state.components.get(family.denoiser) or next(iter(state.components.values()))
    rank = Counter(layer.rank for layer in denoiser.layers.values()).most_common(1)[0][0]
    kind = "MoSLoRA (mixture-of-subspaces LoRA, Wu et al. 2024)" if state.has_mixer else "LoRA"
    metadata = {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(most_common_alpha(denoiser.layers.values()))),
        "ss_base_model_version": family.ss_base_model_version,
        "ss_v2": str(family.ss_v2),
        "ss_sd_model_name": str(state.base_model or ""),
        "ss_output_name": title or "",
        "ss_training_comment": (
            f"Trained as {kind} with moslora-diffusion {__version__}; the r x r mixer is folded into lora_up "
            "(B' = B M), so this is an exact plain LoRA."
            if state.has_mixer
            else f"Plain LoRA written by moslora-diffusion {__version__}."
        ),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.title": title or "",
    }
    metadata.update(provenance_metadata(state.family, state.base_model, state.has_mixer))
    return metadata


def parse_kohya(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path) -> AdapterState:
    """The AdapterState of a kohya file, module names still stems (``resolved`` False)."""
    layers_by_component: dict[str, dict[str, LayerFactors]] = {}
    for stem, factors in group_modules(tensors, "kohya", path).items():
        key_a = factors["A"][0]
        split = split_kohya_stem(stem)
        if split is None:
            known = ", ".join(f"{p}_" for p in sorted(_component_of_prefix()))
            raise ValueError(f"{path}: {key_a!r} has no known kohya prefix ({known})")
        component, rest = split
        down, up = factors["A"][1], factors["B"][1]
        # A missing alpha means alpha = rank (scale 1) in diffusers, ComfyUI and webui.
        alpha = float(factors["alpha"][1].item()) if "alpha" in factors else float(down.shape[0])
        layers_by_component.setdefault(component, {})[rest] = LayerFactors(down, up, None, alpha / down.shape[0], key_a)
    components = {
        c: ComponentAdapter(infer_component_config(layers), layers, resolved=False)
        for c, layers in layers_by_component.items()
    }
    family = checked_family(metadata.get("moslora.family"), path)
    if family is None:
        by_version = {f.ss_base_model_version: name for name, f in FAMILIES.items()}
        family = by_version.get(metadata.get("ss_base_model_version", ""))
    base_model = metadata.get("moslora.base_model") or metadata.get("ss_sd_model_name") or None
    return AdapterState(components, family, base_model)
