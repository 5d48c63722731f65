"""One small class per model family: its components, names in other tools, and how to recognise it.

Everything that differs between SD 1.x, SD 2.x, SDXL, SD3 and Flux is a class attribute or method
here, so the trainer, the file writers and the merger never branch on the family themselves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import ClassVar


class Family:
    """Base class; subclasses fill in the class attributes."""

    name: ClassVar[str]
    pipeline_class: ClassVar[str]
    denoiser: ClassVar[str]  # "unet" or "transformer"
    text_encoders: ClassVar[tuple[str, ...]]
    # kohya / webui prefix of each adapted component
    kohya_prefixes: ClassVar[dict[str, str]]
    # what webui's LoRA card shows (ss_base_model_version) and the modelspec architecture
    ss_base_model_version: ClassVar[str]
    modelspec_architecture: ClassVar[str]

    @classmethod
    def adapter_components(cls) -> tuple[str, ...]:
        """Components that can carry an adapter, denoiser first."""
        return (cls.denoiser, *cls.text_encoders)


class SD15(Family):
    name = "sd15"
    pipeline_class = "StableDiffusionPipeline"
    denoiser = "unet"
    text_encoders = ("text_encoder",)
    kohya_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te"}
    ss_base_model_version = "sd_v1"
    modelspec_architecture = "stable-diffusion-v1/lora"


class SD2(SD15):
    name = "sd2"
    ss_base_model_version = "sd_v2"
    modelspec_architecture = "stable-diffusion-v2/lora"


class SDXL(Family):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    denoiser = "unet"
    text_encoders = ("text_encoder", "text_encoder_2")
    kohya_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    ss_base_model_version = "sdxl_base_v1-0"
    modelspec_architecture = "stable-diffusion-xl-v1-base/lora"


class SD3(Family):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    kohya_prefixes = {"transformer": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2", "text_encoder_3": "lora_te3"}
    ss_base_model_version = "sd3"
    modelspec_architecture = "stable-diffusion-3-medium/lora"


class Flux(Family):
    name = "flux"
    pipeline_class = "FluxPipeline"
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2")
    kohya_prefixes = {"transformer": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    ss_base_model_version = "flux1"
    modelspec_architecture = "flux-1-dev/lora"


FAMILIES: dict[str, type[Family]] = {f.name: f for f in (SD15, SD2, SDXL, SD3, Flux)}


def get_family(name: str) -> type[Family]:
    if name not in FAMILIES:
        raise ValueError(f"Unknown model family {name!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def _family_from_class_and_unet(pipeline_class: str, use_linear_projection: bool | None) -> type[Family]:
    for family in (SDXL, SD3, Flux):
        if pipeline_class.startswith(family.pipeline_class):
            return family
    if pipeline_class.startswith("StableDiffusion"):
        # SD 2.x UNets project with Linear layers; SD 1.x with 1x1 convs.
        return SD2 if use_linear_projection else SD15
    raise ValueError(
        f"Unsupported pipeline {pipeline_class!r}: supported are StableDiffusion (1.x, 2.x), "
        "StableDiffusionXL, StableDiffusion3 and Flux pipelines"
    )


def family_of_pipeline(pipe) -> type[Family]:
    """The family of a loaded diffusers pipeline."""
    unet = getattr(pipe, "unet", None)
    use_linear = bool(getattr(getattr(unet, "config", None), "use_linear_projection", False)) if unet is not None else None
    return _family_from_class_and_unet(type(pipe).__name__, use_linear)


def family_of_model_dir(path: str | os.PathLike) -> type[Family]:
    """The family of a diffusers pipeline folder, read from model_index.json without loading weights."""
    path = Path(path)
    index = path / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
    try:
        pipeline_class = json.loads(index.read_text())["_class_name"]
        use_linear = None
        unet_config = path / "unet" / "config.json"
        if unet_config.is_file():
            use_linear = bool(json.loads(unet_config.read_text()).get("use_linear_projection", False))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{index}: unreadable model_index.json ({err})") from None
    return _family_from_class_and_unet(pipeline_class, use_linear)
