"""Which modules to adapt: named presets per model kind, in one table.

A preset name (``"attention"``, the default, or ``"attention+ff"``, which adds the feed-forward
layers) resolves to PEFT ``target_modules`` for the model it is applied to. Anything else given as
``target_modules`` (a list of module-name suffixes or a regex string) is passed to PEFT unchanged.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: this module stays importable without torch (fast --help)
    from torch import nn

_UNET_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
_JOINT_ATTN = _UNET_ATTN + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
_CLIP_ATTN = ["q_proj", "k_proj", "v_proj", "out_proj"]
_T5_ATTN = ["q", "k", "v", "o"]
_LLM_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]  # Qwen, Mistral (Llama-style decoders)
_FLUX2_SINGLE = ["to_qkv_mlp_proj", "single_transformer_blocks.*.attn.to_out"]

# model kind -> preset -> module-name suffixes; a "*" stands for one block index and is expanded against
# the model's own module names (PEFT matches list entries as whole names or suffixes, never patterns).
PRESETS: dict[str, dict[str, list[str]]] = {
    "unet": {
        "attention": _UNET_ATTN,
        "attention+ff": _UNET_ATTN + ["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"],
    },
    "sd3_transformer": {
        "attention": _JOINT_ATTN,
        "attention+ff": _JOINT_ATTN + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
    },
    "flux_transformer": {
        "attention": _JOINT_ATTN,
        # Single blocks: proj_mlp feeds the MLP; their proj_out maps back. Not the model's final proj_out:
        # sd-scripts has no such module, and diffusers' reader of sd-scripts files fails on it.
        "attention+ff": _JOINT_ATTN
        + [
            "ff.net.0.proj",
            "ff.net.2",
            "ff_context.net.0.proj",
            "ff_context.net.2",
            "proj_mlp",
            "single_transformer_blocks.*.proj_out",
        ],
    },
    "zimage_transformer": {
        "attention": _UNET_ATTN,  # the layers' and both refiners' attention, as diffusers' Z-Image script
        "attention+ff": _UNET_ATTN + ["feed_forward.w1", "feed_forward.w2", "feed_forward.w3"],
    },
    "qwenimage_transformer": {
        "attention": _JOINT_ATTN,  # image and text streams; diffusers' script defaults to the image stream's four
        "attention+ff": _JOINT_ATTN + ["img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"],
    },
    "flux2_transformer": {
        # Double blocks' joint attention; single blocks' fused qkv+MLP-in projection and their fused output
        # projection, as diffusers' Flux.2 scripts. That one is named per block: the double blocks' attn.to_out
        # is a ModuleList, which PEFT refuses.
        "attention": _JOINT_ATTN + _FLUX2_SINGLE,
        "attention+ff": _JOINT_ATTN
        + _FLUX2_SINGLE
        + ["ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"],
    },
    "llm_text": {"attention": _LLM_ATTN, "attention+ff": _LLM_ATTN + ["gate_proj", "up_proj", "down_proj"]},
    "clip_text": {"attention": _CLIP_ATTN, "attention+ff": _CLIP_ATTN + ["fc1", "fc2"]},
    "t5_text": {"attention": _T5_ATTN, "attention+ff": _T5_ATTN + ["wi_0", "wi_1", "wo"]},
}
PRESET_NAMES = ("attention", "attention+ff")
DEFAULT_PRESET = "attention"

_KIND_BY_CLASS = {
    "UNet2DConditionModel": "unet",
    "SD3Transformer2DModel": "sd3_transformer",
    "FluxTransformer2DModel": "flux_transformer",
    "ChromaTransformer2DModel": "flux_transformer",  # Flux's blocks with the same module names
    "CLIPTextModel": "clip_text",
    "CLIPTextModelWithProjection": "clip_text",
    "T5EncoderModel": "t5_text",
    "ZImageTransformer2DModel": "zimage_transformer",
    "QwenImageTransformer2DModel": "qwenimage_transformer",
    "Flux2Transformer2DModel": "flux2_transformer",
    "Qwen3Model": "llm_text",
    "Qwen3ForCausalLM": "llm_text",
    "Qwen2_5_VLForConditionalGeneration": "llm_text",
    "Mistral3ForConditionalGeneration": "llm_text",
}


def model_kind(model: nn.Module) -> str:
    """The preset table's key for ``model`` (by class, subclasses included)."""
    for cls in type(model).__mro__:
        if cls.__name__ in _KIND_BY_CLASS:
            return _KIND_BY_CLASS[cls.__name__]
    raise ValueError(
        f"No MoSLoRA target preset for {type(model).__name__}; supported: {sorted(_KIND_BY_CLASS)}. "
        "Pass target_modules explicitly to adapt another model."
    )


def check_preset_name(name: str) -> str:
    if name not in PRESET_NAMES:
        raise ValueError(f"Unknown target preset {name!r}; presets are {list(PRESET_NAMES)} (or give module names)")
    return name


def preset_union(name: str) -> list[str]:
    """Every kind's modules for preset ``name``: a model-agnostic value for ``LoraConfig.target_modules``.

    Names that a model lacks simply match nothing; ``add_moslora`` narrows this to the model's own list.
    """
    check_preset_name(name)
    return sorted({m for kind in PRESETS.values() for m in kind[name]})


def resolve_target_modules(model: nn.Module, preset_or_modules: str | list[str] | None) -> list[str] | str:
    """Turn a preset name (or None) into ``model``'s module list; pass explicit modules through."""
    if preset_or_modules is None:
        preset_or_modules = DEFAULT_PRESET
    if isinstance(preset_or_modules, str) and preset_or_modules in PRESET_NAMES:
        return _expand_block_indices(model, PRESETS[model_kind(model)][preset_or_modules])
    return preset_or_modules


def _expand_block_indices(model: nn.Module, names: list[str]) -> list[str]:
    """``names`` with each "*" entry replaced by the model's module names it matches (one index each)."""
    plain = [n for n in names if "*" not in n]
    patterns = [re.compile(r"(.*\.)?" + re.escape(n).replace(r"\*", r"\d+")) for n in names if "*" in n]
    found = sorted(name for name, _ in model.named_modules() if any(p.fullmatch(name) for p in patterns))
    return plain + found


def parse_target_modules(value: str) -> str | list[str]:
    """Command-line form: a preset name, or a comma-separated list of module names."""
    value = value.strip()
    if value in PRESET_NAMES:
        return value
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise ValueError(f"--target_modules {value!r}: give a preset ({', '.join(PRESET_NAMES)}) or module names")
    if len(names) == 1 and not any(c in names[0] for c in ".*_") and names[0] not in {"q", "k", "v", "o"}:
        # A lone word that is neither a preset nor looks like a module name is almost surely a typo.
        raise ValueError(f"Unknown target preset {names[0]!r}; presets are {list(PRESET_NAMES)} (or give module names)")
    return names
