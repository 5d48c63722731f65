"""One small class per model family: its components, names in other tools, and how to recognise it.

Everything that differs between SD 1.x, SD 2.x, SDXL, SD3 and Flux is a class attribute or method
here, so the trainer, the file writers and the merger never branch on the family themselves. For
training, a family knows which components to load, how to encode prompts (with or without text-encoder
gradients), how VAE samples become latents, and how to call its denoiser (SDXL's time ids, Flux's
latent packing and guidance embedding); the diffusion objective itself lives in
:mod:`moslora_diffusion.training.objectives`, named by ``Family.objective``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

# Pipeline components a text-to-image LoRA never needs (None is passed to the pipeline instead).
UNUSED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _config_of(model: torch.nn.Module):
    """The diffusers/transformers config of ``model``, also through a DDP or compile wrapper."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model.config


def _tokenize(tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids


def _clip_hidden_and_pooled(tokenizer, text_encoder, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate hidden states and pooled output of a CLIP encoder, as SDXL and SD3 pipelines use them."""
    ids = _tokenize(tokenizer, prompts, tokenizer.model_max_length).to(_device_of(text_encoder))
    out = text_encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


class Family:
    """Base class; subclasses fill in the class attributes and the denoiser-specific methods."""

    name: ClassVar[str]
    pipeline_class: ClassVar[str]
    denoiser: ClassVar[str]  # "unet" or "transformer"
    text_encoders: ClassVar[tuple[str, ...]]
    t5_text_encoder: ClassVar[str | None] = None  # the one text encoder that is not a CLIP model
    # kohya / webui prefix of each adapted component
    kohya_prefixes: ClassVar[dict[str, str]]
    # what webui's LoRA card shows (ss_base_model_version) and the modelspec architecture
    ss_base_model_version: ClassVar[str]
    ss_v2: ClassVar[bool] = False  # webui's "SD 2.x" flag on the LoRA card
    modelspec_architecture: ClassVar[str]
    # The original single-file layout: (component, naming rules in single_file.py, key prefix in the file).
    single_file_layout: ClassVar[tuple[tuple[str, str, str], ...]]

    # --- training -------------------------------------------------------------------------------
    objective: ClassVar[str]  # "noise_prediction" (epsilon / v from the scheduler) or "flow_matching"
    default_resolution: ClassVar[int]
    resolution_multiple: ClassVar[int] = 8  # the VAE's stride (times the patch size for transformers)
    # the text encoders --train_text_encoder adapts (diffusers' scripts leave T5 frozen)
    trainable_text_encoders: ClassVar[tuple[str, ...]]
    vae_in_fp32: ClassVar[bool] = False  # SDXL's VAE overflows in fp16
    default_weighting_scheme: ClassVar[str | None] = None  # flow matching: diffusers' script default
    default_max_sequence_length: ClassVar[int | None] = None  # T5 prompt length; None: no T5
    # batch entries the denoiser reads besides latents and prompts (SDXL's size and crop conditioning)
    micro_conditioning_keys: ClassVar[tuple[str, ...]] = ()
    # model card: the base's licence and the hub tags of its family
    license: ClassVar[str]
    hub_tags: ClassVar[tuple[str, ...]]
    pipeline_kwargs: ClassVar[dict[str, Any]] = {}

    @classmethod
    def adapter_components(cls) -> tuple[str, ...]:
        """Components that can carry an adapter, denoiser first."""
        return (cls.denoiser, *cls.text_encoders)

    @classmethod
    def clip_text_encoders(cls) -> tuple[str, ...]:
        """The CLIP text encoders, whose module names in files keep CLIP's ``text_model.`` root."""
        return tuple(c for c in cls.text_encoders if c != cls.t5_text_encoder)

    @classmethod
    def load_components(
        cls,
        source: str,
        model_index: dict,
        *,
        revision: str | None = None,
        variant: str | None = None,
        vae_source: str | None = None,
        component_kwargs: dict[str, dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Every pipeline component training needs, loaded one by one from ``source`` (a folder or hub id).

        Components in :data:`UNUSED_COMPONENTS` (safety checker, image encoder, ...) are not loaded: they
        are None. ``vae_source`` replaces the pipeline's VAE with a standalone one (e.g. SDXL's fp16 fix).
        ``component_kwargs[name]`` goes to that component's ``from_pretrained`` (e.g. a quantization config).
        """
        components: dict[str, Any] = {}
        for name, spec in model_index.items():
            if name.startswith("_") or not isinstance(spec, (list, tuple)) or len(spec) != 2:
                continue
            library, class_name = spec
            if name in UNUSED_COMPONENTS or library is None or class_name is None:
                components[name] = None
                continue
            component_cls = getattr(importlib.import_module(library), class_name)
            location, subfolder = (vae_source, None) if name == "vae" and vae_source else (source, name)
            kwargs: dict[str, Any] = {"subfolder": subfolder, "revision": revision}
            if issubclass(component_cls, torch.nn.Module):
                # Weights from elsewhere are read from safetensors only: a pickled .bin can run code.
                kwargs["use_safetensors"] = True
                if variant is not None:
                    kwargs["variant"] = variant
            kwargs.update((component_kwargs or {}).get(name, {}))
            components[name] = component_cls.from_pretrained(location, **kwargs)
        return components

    @classmethod
    def build_pipeline(cls, components: dict[str, Any], model_index: dict | None = None):
        """A pipeline around already-loaded components; missing optional components are None.

        Settings kept in model_index.json (e.g. SDXL's ``force_zeros_for_empty_prompt``) are passed on.
        """
        import diffusers

        pipeline_cls = getattr(diffusers, cls.pipeline_class)
        parameters = inspect.signature(pipeline_cls.__init__).parameters
        kwargs = {k: v for k, v in (model_index or {}).items() if k in parameters and not isinstance(v, (list, tuple))}
        kwargs.update({k: v for k, v in components.items() if k in parameters})
        kwargs.update({k: v for k, v in cls.pipeline_kwargs.items() if k in parameters})
        for name, param in parameters.items():
            if name != "self" and name not in kwargs and param.default is inspect.Parameter.empty:
                kwargs[name] = None
        pipe = pipeline_cls(**kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @classmethod
    def native_resolution(cls, components: dict[str, Any]) -> int:
        """The image size the base was trained at: the denoiser's sample size times the VAE's stride."""
        sample_size = getattr(_config_of(components[cls.denoiser]), "sample_size", None)
        vae = components.get("vae")
        if not isinstance(sample_size, int) or vae is None:
            return cls.default_resolution
        return sample_size * 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def pipeline_call_kwargs(cls, max_sequence_length: int | None) -> dict[str, Any]:
        """Extra keyword arguments of the pipeline's ``__call__`` that training settings fix."""
        return {"max_sequence_length": max_sequence_length} if cls.default_max_sequence_length else {}

    @classmethod
    def resolve_max_sequence_length(cls, components: dict[str, Any], requested: int | None) -> int | None:
        """T5 prompt length: the request, else the family default capped at the tokenizer's own limit."""
        if cls.default_max_sequence_length is None:
            return None
        if requested is not None:
            return requested
        t5_tokenizer = components.get(cls.t5_tokenizer())
        limit = getattr(t5_tokenizer, "model_max_length", None) or cls.default_max_sequence_length
        return min(cls.default_max_sequence_length, limit)

    @classmethod
    def t5_tokenizer(cls) -> str | None:
        return None

    @classmethod
    def latents_from_vae_sample(cls, vae_config, sample: torch.Tensor) -> torch.Tensor:
        """The denoiser's latents from a VAE posterior sample: (x - shift) * scale."""
        shift = getattr(vae_config, "shift_factor", None) or 0.0
        return (sample - shift) * vae_config.scaling_factor

    @classmethod
    def micro_conditioning(cls, batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        """The batch's :attr:`micro_conditioning_keys` on ``device``, as :meth:`predict` reads them."""
        return {key: batch[key].to(device) for key in cls.micro_conditioning_keys}

    @classmethod
    def encode_prompt(cls, components: dict[str, Any], prompts: list[str], max_sequence_length: int | None) -> dict[str, torch.Tensor]:
        """Conditioning tensors for ``prompts`` (batch first), named as :meth:`predict` reads them.

        Runs the text encoders found in ``components`` (possibly wrapped for DDP) under whatever grad
        mode the caller chose: inside ``torch.no_grad()`` for cached embeddings, with grads when
        text encoders are trained.
        """
        raise NotImplementedError

    @classmethod
    def predict(
        cls, denoiser, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict[str, torch.Tensor],
        batch: dict[str, Any], guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """The denoiser's output for ``noisy_latents`` (B, C, h, w), shaped like them."""
        raise NotImplementedError


class SD15(Family):
    name = "sd15"
    pipeline_class = "StableDiffusionPipeline"
    denoiser = "unet"
    text_encoders = ("text_encoder",)
    kohya_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te"}
    ss_base_model_version = "sd_v1"
    single_file_layout = (
        ("unet", "unet", "model.diffusion_model."),
        ("vae", "vae", "first_stage_model."),
        ("text_encoder", "clip", "cond_stage_model.transformer."),
    )
    modelspec_architecture = "stable-diffusion-v1/lora"
    objective = "noise_prediction"
    default_resolution = 512
    trainable_text_encoders = ("text_encoder",)
    license = "creativeml-openrail-m"
    hub_tags = ("stable-diffusion", "stable-diffusion-diffusers")
    pipeline_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    @classmethod
    def encode_prompt(cls, components, prompts, max_sequence_length=None):
        tokenizer, text_encoder = components["tokenizer"], components["text_encoder"]
        ids = _tokenize(tokenizer, prompts, tokenizer.model_max_length).to(_device_of(text_encoder))
        return {"prompt_embeds": text_encoder(ids)[0]}

    @classmethod
    def predict(cls, denoiser, noisy_latents, timesteps, conditioning, batch, guidance_scale=1.0):
        return denoiser(noisy_latents, timesteps, encoder_hidden_states=conditioning["prompt_embeds"], return_dict=False)[0]


class SD2(SD15):
    name = "sd2"
    ss_base_model_version = "sd_v2"
    ss_v2 = True
    single_file_layout = (
        ("unet", "unet", "model.diffusion_model."),
        ("vae", "vae", "first_stage_model."),
        ("text_encoder", "open_clip", "cond_stage_model.model."),
    )
    modelspec_architecture = "stable-diffusion-v2/lora"
    default_resolution = 768
    license = "openrail++"


class SDXL(Family):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    denoiser = "unet"
    text_encoders = ("text_encoder", "text_encoder_2")
    kohya_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    ss_base_model_version = "sdxl_base_v1-0"
    single_file_layout = (
        ("unet", "unet", "model.diffusion_model."),
        ("vae", "vae", "first_stage_model."),
        ("text_encoder", "clip", "conditioner.embedders.0.transformer."),
        ("text_encoder_2", "open_clip", "conditioner.embedders.1.model."),
    )
    modelspec_architecture = "stable-diffusion-xl-v1-base/lora"
    objective = "noise_prediction"
    default_resolution = 1024
    trainable_text_encoders = ("text_encoder", "text_encoder_2")
    vae_in_fp32 = True
    micro_conditioning_keys = ("original_sizes", "crop_top_lefts", "target_sizes")  # (h, w) each, per sample
    license = "openrail++"
    hub_tags = ("stable-diffusion-xl", "stable-diffusion-xl-diffusers")

    @classmethod
    def encode_prompt(cls, components, prompts, max_sequence_length=None):
        hidden_1, _ = _clip_hidden_and_pooled(components["tokenizer"], components["text_encoder"], prompts)
        hidden_2, pooled_2 = _clip_hidden_and_pooled(components["tokenizer_2"], components["text_encoder_2"], prompts)
        return {"prompt_embeds": torch.cat([hidden_1, hidden_2], dim=-1), "pooled_prompt_embeds": pooled_2}

    @classmethod
    def predict(cls, denoiser, noisy_latents, timesteps, conditioning, batch, guidance_scale=1.0):
        prompt_embeds = conditioning["prompt_embeds"]
        # Micro-conditioning: (original h, w, crop top, left, target h, w), one row per sample.
        time_ids = torch.cat([batch[key] for key in cls.micro_conditioning_keys], dim=1)
        added = {"time_ids": time_ids.to(prompt_embeds), "text_embeds": conditioning["pooled_prompt_embeds"]}
        return denoiser(noisy_latents, timesteps, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added, return_dict=False)[0]


class SD3(Family):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    t5_text_encoder = "text_encoder_3"
    # sd-scripts' lora_unet_ names are the original MMDiT modules (fused qkv), which a per-projection
    # LoRA does not have; ComfyUI reads diffusers module names under OneTrainer's lora_transformer_.
    kohya_prefixes = {"transformer": "lora_transformer", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2", "text_encoder_3": "lora_te3"}
    ss_base_model_version = "sd3"
    # As sd3_medium.safetensors: the text encoders (CLIP-L/G, T5) are loaded separately.
    single_file_layout = (("transformer", "sd3", "model.diffusion_model."), ("vae", "vae", "first_stage_model."))
    modelspec_architecture = "stable-diffusion-3-medium/lora"
    objective = "flow_matching"
    default_resolution = 1024
    resolution_multiple = 16
    trainable_text_encoders = ("text_encoder", "text_encoder_2")
    default_max_sequence_length = 77
    default_weighting_scheme = "logit_normal"
    license = "other"
    hub_tags = ("sd3", "sd3-diffusers")

    @classmethod
    def t5_tokenizer(cls):
        return "tokenizer_3"

    @classmethod
    def encode_prompt(cls, components, prompts, max_sequence_length=None):
        hidden_1, pooled_1 = _clip_hidden_and_pooled(components["tokenizer"], components["text_encoder"], prompts)
        hidden_2, pooled_2 = _clip_hidden_and_pooled(components["tokenizer_2"], components["text_encoder_2"], prompts)
        t5 = components.get("text_encoder_3")
        if t5 is None:
            # As the pipeline does without T5: zeros in its place.
            width = _config_of(components["transformer"]).joint_attention_dim
            t5_embeds = hidden_1.new_zeros(len(prompts), max_sequence_length, width)
        else:
            ids = _tokenize(components["tokenizer_3"], prompts, max_sequence_length).to(_device_of(t5))
            t5_embeds = t5(ids)[0]
        clip_embeds = torch.cat([hidden_1, hidden_2], dim=-1)
        clip_embeds = F.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
        return {
            "prompt_embeds": torch.cat([clip_embeds, t5_embeds.to(clip_embeds.dtype)], dim=-2),
            "pooled_prompt_embeds": torch.cat([pooled_1, pooled_2], dim=-1),
        }

    @classmethod
    def predict(cls, denoiser, noisy_latents, timesteps, conditioning, batch, guidance_scale=1.0):
        return denoiser(
            hidden_states=noisy_latents,
            timestep=timesteps,
            encoder_hidden_states=conditioning["prompt_embeds"],
            pooled_projections=conditioning["pooled_prompt_embeds"],
            return_dict=False,
        )[0]


class Flux(Family):
    name = "flux"
    pipeline_class = "FluxPipeline"
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2")
    t5_text_encoder = "text_encoder_2"
    # As SD3: ComfyUI and diffusers read diffusers module names under lora_transformer_.
    kohya_prefixes = {"transformer": "lora_transformer", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    ss_base_model_version = "flux1"
    # As flux1-dev.safetensors: the transformer alone, with bare names.
    single_file_layout = (("transformer", "flux", ""),)
    modelspec_architecture = "flux-1-dev/lora"
    objective = "flow_matching"
    default_resolution = 1024
    resolution_multiple = 16
    trainable_text_encoders = ("text_encoder",)
    default_max_sequence_length = 512
    default_weighting_scheme = "none"
    license = "other"
    hub_tags = ("flux", "flux-diffusers")

    @classmethod
    def t5_tokenizer(cls):
        return "tokenizer_2"

    @classmethod
    def encode_prompt(cls, components, prompts, max_sequence_length=None):
        clip_tokenizer, clip = components["tokenizer"], components["text_encoder"]
        ids = _tokenize(clip_tokenizer, prompts, clip_tokenizer.model_max_length).to(_device_of(clip))
        pooled = clip(ids, output_hidden_states=False).pooler_output
        t5 = components["text_encoder_2"]
        ids = _tokenize(components["tokenizer_2"], prompts, max_sequence_length).to(_device_of(t5))
        return {"prompt_embeds": t5(ids, output_hidden_states=False)[0], "pooled_prompt_embeds": pooled}

    @classmethod
    def predict(cls, denoiser, noisy_latents, timesteps, conditioning, batch, guidance_scale=1.0):
        from diffusers import FluxPipeline

        b, c, h, w = noisy_latents.shape
        prompt_embeds = conditioning["prompt_embeds"]
        # Flux sees 2x2 latent patches as tokens, with (0, row, col) position ids; text tokens get zeros.
        packed = FluxPipeline._pack_latents(noisy_latents, b, c, h, w)
        # Positions in fp32 whatever the weights' precision (RoPE is computed from them in high precision).
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy_latents.device, torch.float32)
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=noisy_latents.device, dtype=torch.float32)
        guidance = None
        if _config_of(denoiser).guidance_embeds:  # FLUX.1-dev distils classifier-free guidance into an input
            guidance = torch.full((b,), guidance_scale, device=noisy_latents.device, dtype=torch.float32)
        packed_pred = denoiser(
            hidden_states=packed,
            timestep=timesteps / 1000,  # the transformer takes sigmas in [0, 1]
            guidance=guidance,
            pooled_projections=conditioning["pooled_prompt_embeds"],
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return packed_pred.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


FAMILIES: dict[str, type[Family]] = {f.name: f for f in (SD15, SD2, SDXL, SD3, Flux)}


# Every component name an adapter file may carry, over all families (denoisers first).
ADAPTER_COMPONENTS: tuple[str, ...] = tuple(
    dict.fromkeys([*(f.denoiser for f in FAMILIES.values()), *(c for f in FAMILIES.values() for c in f.text_encoders)])
)


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


def family_of_model_index(model_index: dict, unet_config: dict | None = None) -> type[Family]:
    """The family described by a parsed model_index.json (and the UNet's config.json, if it has one)."""
    use_linear = None if unet_config is None else bool(unet_config.get("use_linear_projection", False))
    return _family_from_class_and_unet(model_index["_class_name"], use_linear)


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
