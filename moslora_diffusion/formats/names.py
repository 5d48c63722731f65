"""Names in adapter files: the one key-renaming table (each factor's suffix per layout) and metadata keys.

A file key is ``<module><suffix>``; the suffix says which factor (A: down, B: up, M: mixer, kohya's alpha)
and which layout. Module names are checkpoint names (see :mod:`moslora_diffusion.clip_names`); kohya
flattens them further into stems (:mod:`.kohya`).
"""

from __future__ import annotations

import torch

from ..version import __version__

FORMATS = ("native", "diffusers", "kohya")  # the files save_moslora_weights writes
# Every layout a file can be written in (``moslora export --layout``): OneTrainer's is SD3/Flux modules under
# their diffusers names (lora_transformer_), the kohya file of SD1/SD2/SDXL.
LAYOUTS = (*FORMATS, "onetrainer")

NATIVE_HEADER_KEY = "moslora"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
# ComfyUI's generic text-encoder LoRA key for T5: "text_encoders.t5xxl." + its own state-dict name of the weight.
COMFYUI_T5_PREFIX = "text_encoders.t5xxl.transformer."
# ComfyUI's own LoRA keys for the denoiser: "diffusion_model." + the original model's module name (SGM UNet, BFL Flux).
COMFYUI_DENOISER_PREFIX = "diffusion_model."

# The one key-renaming table: the suffix of each factor in each layout (A: down, B: up, M: mixer).
FACTOR_SUFFIXES: dict[str, dict[str, str]] = {
    "native": {"A": ".lora_A.weight", "M": ".lora_mixer.weight", "B": ".lora_B.weight"},
    # alpha: some trainers write "<module>.alpha" beside PEFT keys (scale alpha / r, as diffusers reads it).
    "diffusers": {"A": ".lora_A.weight", "B": ".lora_B.weight", "alpha": ".alpha"},
    "kohya": {"A": ".lora_down.weight", "B": ".lora_up.weight", "alpha": ".alpha"},
}
# Longest first, so ".lora_mixer.weight" is never mistaken for a shorter suffix.
_ALL_SUFFIXES = sorted(
    {(s, f) for table in FACTOR_SUFFIXES.values() for f, s in table.items()}, key=lambda sf: -len(sf[0])
)


def split_factor(key: str) -> tuple[str | None, str, str]:
    """(factor A/B/M/alpha, module name, suffix) of a file key; factor None if unrecognised."""
    for suffix, factor in _ALL_SUFFIXES:
        if key.endswith(suffix):
            return factor, key[: -len(suffix)], suffix
    return None, key, ""


Factors = dict[str, tuple[str, torch.Tensor]]  # factor (A, B, M, alpha) -> (file key, tensor)


def group_modules(tensors: dict[str, torch.Tensor], layout: str, path) -> dict[str, Factors]:
    """module -> factor -> (key, tensor) for a file of ``layout``; one ValueError naming ``path`` otherwise."""
    suffixes = FACTOR_SUFFIXES[layout]
    modules: dict[str, Factors] = {}
    for key in sorted(tensors):
        for factor, suffix in suffixes.items():
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[factor] = (key, tensors[key])
                break
        else:
            raise ValueError(f"{path}: {key!r} is not a {layout} adapter key")
    return modules


def split_component(module: str, key: str, path, components) -> tuple[str, str]:
    """(component, module path) of ``<component>.<module path>``; ``components`` are those allowed."""
    component, _, rest = module.partition(".")
    if component not in components or not rest:
        raise ValueError(
            f"{path}: {key!r} does not start with a component of this adapter "
            f"({', '.join(c + '.' for c in components)})"
        )
    return component, rest


def provenance_metadata(family: str | None, base_model, folded: bool) -> dict[str, str]:
    """The ``moslora.*`` metadata of the folded layouts: where the adapter came from."""
    info = {"moslora.version": __version__, "moslora.folded": "true" if folded else "false"}
    if family:
        info["moslora.family"] = family
    if base_model:
        info["moslora.base_model"] = str(base_model)
    return info
