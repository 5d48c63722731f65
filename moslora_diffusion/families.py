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


def model_index_classes(model_index: dict) -> dict[str, type | None]:
    """Each component a pipeline's model_index.json names, as its class: None for the components a LoRA never
    needs (:data:`UNUSED_COMPONENTS`) and for empty entries; settings (non-pair values) are left out."""
    classes: dict[str, type | None] = {}
    for name, spec in model_index.items():
        if name.startswith("_") or not isinstance(spec, (list, tuple)) or len(spec) != 2:
            continue
        library, class_name = spec
        if name in UNUSED_COMPONENTS or library is None or class_name is None:
            classes[name] = None
        else:
            classes[name] = getattr(importlib.import_module(library), class_name)
    return classes


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _config_of(model: torch.nn.Module):
    """The diffusers/transformers config of ``model``, also through a DDP or compile wrapper."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model.config


def _tokenize(tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids


def _clip_hidden_and_pooled(tokenizer, text_encoder, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate hidden states and pooled output of a CLIP encoder, as SDXL and SD3 pipelines use them."""
    ids = _tokenize(tokenizer, prompts, tokenizer.model_max_length).to(_device_of(text_encoder))
    out = text_encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def _pack_2x2_patches(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flux-style tokens: 2x2 latent patches (B, h/2 * w/2, 4C) and their (0, row, col) position ids.

    Positions are fp32 whatever the weights' precision (RoPE is computed from them in high precision).
    """
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    packed = FluxPipeline._pack_latents(latents, b, c, h, w)
    image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, torch.float32)
    return packed, image_ids


def _unpack_2x2_patches(tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`_pack_2x2_patches`: (B, h/2 * w/2, 4C) tokens back to latents of ``shape``."""
    b, c, h, w = shape
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class Family:
    """Base class; subclasses fill in the class attributes and the denoiser-specific methods."""

    name: ClassVar[str]
    pipeline_class: ClassVar[str]
    denoiser: ClassVar[str]  # "unet" or "transformer"
    text_encoders: ClassVar[tuple[str, ...]]
    t5_text_encoder: ClassVar[str | None] = None  # the one text encoder that is not a CLIP model
    # An LLM text encoder (Qwen, Mistral) and its tokenizer, if the family has one
    llm_text_encoder: ClassVar[str | None] = None
    llm_tokenizer: ClassVar[str | None] = None
    # kohya / webui prefix of each adapted component
    kohya_prefixes: ClassVar[dict[str, str]]
    # what webui's LoRA card shows (ss_base_model_version) and the modelspec architecture
    ss_base_model_version: ClassVar[str]
    ss_v2: ClassVar[bool] = False  # webui's "SD 2.x" flag on the LoRA card
    modelspec_architecture: ClassVar[str]
    # The original single-file layout: (component, naming rules in single_file.py, key prefix in the file).
    single_file_layout: ClassVar[tuple[tuple[str, str, str], ...]]
    # The Hub pipeline whose configs and tokenizers complete a single-file checkpoint (--base_config default).
    reference_repository: ClassVar[str]
    # The denoiser can be a .gguf file (diffusers' GGUF loader: linear layers only, so transformers, not UNets).
    gguf_denoiser: ClassVar[bool] = False

    # --- files for each client (docs/adapter-files.md) ------------------------------------------
    # pytorch_lora_weights.safetensors: "kohya" (lora_unet_/lora_te keys, one alpha per component: stock
    # diffusers, ComfyUI and LyCORIS read them alike) or "peft_folded" (diffusers keys with s folded into
    # lora_B, alpha = r; T5 under ComfyUI's text_encoders.t5xxl.transformer., which diffusers never loads).
    diffusers_file_layout: ClassVar[str] = "kohya"
    # pytorch_lora_weights_kohya.safetensors: "kohya" (diffusers module names under kohya_prefixes, as
    # sd-scripts' SD1/SD2 UNet names them), "kohya_sgm" (the UNet under Stability's original block names,
    # input_blocks_4_1_..., as sd-scripts' SDXL UNet names them) or "sd_scripts" (the original model's
    # module names, q/k/v fused, as sd-scripts, Forge and ComfyUI read).
    kohya_file_layout: ClassVar[str] = "kohya"
    # sd-scripts' prefix of each component in that layout (networks/lora_flux.py, lora_sd3.py LORA_PREFIX_*)
    sd_scripts_prefixes: ClassVar[dict[str, str]] = {}
    # the original block names that mark a file in that layout (lora_unet_<block>_N_...)
    sd_scripts_blocks: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def sd_scripts_modules(cls, denoiser_config: dict) -> list:
        """The original model's Linears (``formats.sd_scripts.FusedModule``) for a denoiser config."""
        raise ValueError(f"{cls.name} files have no original-model (sd-scripts) layout apart from the kohya one")

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
        return tuple(c for c in cls.text_encoders if c not in (cls.t5_text_encoder, cls.llm_text_encoder))

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
        for name, component_cls in model_index_classes(model_index).items():
            if component_cls is None:
                components[name] = None
                continue
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
        """Prompt length (T5 or LLM tokens): the request, else the family default capped at the tokenizer's limit."""
        if cls.default_max_sequence_length is None:
            return None
        if requested is not None:
            return requested
        prompt_tokenizer = components.get(cls.t5_tokenizer() or cls.llm_tokenizer)
        limit = getattr(prompt_tokenizer, "model_max_length", None) or cls.default_max_sequence_length
        return min(cls.default_max_sequence_length, limit)

    @classmethod
    def t5_tokenizer(cls) -> str | None:
        return None

    @classmethod
    def vae_input(cls, pixels: torch.Tensor) -> torch.Tensor:
        """What the VAE encodes for a batch of images (B, 3, H, W): the images themselves, for image VAEs."""
        return pixels

    @classmethod
    def latents_from_vae_sample(cls, vae_config, sample: torch.Tensor) -> torch.Tensor:
        """The denoiser's latents from a VAE posterior sample: (x - shift) * scale."""
        shift = getattr(vae_config, "shift_factor", None) or 0.0
        return (sample - shift) * vae_config.scaling_factor

    @classmethod
    def vae_scale_factor(cls, vae) -> int:
        """Pixels per latent pixel of ``vae``, as the family's pipeline computes its ``vae_scale_factor``."""
        return 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def latents_from_vae(cls, vae, sample: torch.Tensor) -> torch.Tensor:
        """The denoiser's latents from a posterior sample of ``vae``: :meth:`latents_from_vae_sample` of its config
        (Flux.2 overrides this: its normalisation statistics are VAE buffers, not config values)."""
        return cls.latents_from_vae_sample(vae.config, sample)

    @classmethod
    def micro_conditioning(cls, batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        """The batch's :attr:`micro_conditioning_keys` on ``device``, as :meth:`predict` reads them."""
        return {key: batch[key].to(device) for key in cls.micro_conditioning_keys}

    @classmethod
    def encode_prompt(
        cls, components: dict[str, Any], prompts: list[str], max_sequence_length: int | None
    ) -> dict[str, torch.Tensor]:
        """Conditioning tensors for ``prompts`` (batch first), named as :meth:`predict` reads them.

        Runs the text encoders found in ``components`` (possibly wrapped for DDP) under whatever grad
        mode the caller chose: inside ``torch.no_grad()`` for cached embeddings, with grads when
        text encoders are trained.
        """
        raise NotImplementedError

    @classmethod
    def predict(
        cls,
        denoiser,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        batch: dict[str, Any],
        guidance_scale: float = 1.0,
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
    reference_repository = "stable-diffusion-v1-5/stable-diffusion-v1-5"
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
        return denoiser(
            noisy_latents, timesteps, encoder_hidden_states=conditioning["prompt_embeds"], return_dict=False
        )[0]


class SD2(SD15):
    name = "sd2"
    ss_base_model_version = "sd_v2"
    ss_v2 = True
    single_file_layout = (
        ("unet", "unet", "model.diffusion_model."),
        ("vae", "vae", "first_stage_model."),
        ("text_encoder", "open_clip", "cond_stage_model.model."),
    )
    reference_repository = "stabilityai/stable-diffusion-2-1"
    modelspec_architecture = "stable-diffusion-v2/lora"
    default_resolution = 768
    license = "openrail++"


class SDXL(Family):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    denoiser = "unet"
    text_encoders = ("text_encoder", "text_encoder_2")
    kohya_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    # sd-scripts' SDXL merge and resume read only these (its inference loader also converts diffusers names).
    kohya_file_layout = "kohya_sgm"
    ss_base_model_version = "sdxl_base_v1-0"
    single_file_layout = (
        ("unet", "unet", "model.diffusion_model."),
        ("vae", "vae", "first_stage_model."),
        ("text_encoder", "clip", "conditioner.embedders.0.transformer."),
        ("text_encoder_2", "open_clip", "conditioner.embedders.1.model."),
    )
    reference_repository = "stabilityai/stable-diffusion-xl-base-1.0"
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
        return denoiser(
            noisy_latents, timesteps, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added, return_dict=False
        )[0]


class SD3(Family):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    t5_text_encoder = "text_encoder_3"
    # kohya_prefixes: OneTrainer's layout (diffusers module names under lora_transformer_), which ComfyUI
    # reads too; the kohya file uses sd-scripts' original MMDiT names (fused qkv) instead.
    kohya_prefixes = {
        "transformer": "lora_transformer",
        "text_encoder": "lora_te1",
        "text_encoder_2": "lora_te2",
        "text_encoder_3": "lora_te3",
    }
    diffusers_file_layout = "peft_folded"
    kohya_file_layout = "sd_scripts"
    sd_scripts_prefixes = {
        "transformer": "lora_unet",
        "text_encoder": "lora_te1",
        "text_encoder_2": "lora_te2",
        "text_encoder_3": "lora_te3",
    }
    sd_scripts_blocks = ("joint_blocks",)
    ss_base_model_version = "sd3"
    # As sd3_medium.safetensors: the text encoders (CLIP-L/G, T5) are loaded separately.
    single_file_layout = (("transformer", "sd3", "model.diffusion_model."), ("vae", "vae", "first_stage_model."))
    reference_repository = "stabilityai/stable-diffusion-3-medium-diffusers"
    gguf_denoiser = True  # city96's SD3.5 GGUF conversions
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
    def sd_scripts_modules(cls, denoiser_config):
        from .formats.sd_scripts import sd3_modules

        return sd3_modules(denoiser_config)

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
    # As SD3: OneTrainer's lora_transformer_ layout; the kohya file uses sd-scripts' BFL names.
    kohya_prefixes = {"transformer": "lora_transformer", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    diffusers_file_layout = "peft_folded"
    kohya_file_layout = "sd_scripts"
    sd_scripts_prefixes = {"transformer": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te3"}
    sd_scripts_blocks = ("double_blocks", "single_blocks")
    ss_base_model_version = "flux1"
    # As flux1-dev.safetensors: the transformer alone, with bare names.
    single_file_layout = (("transformer", "flux", ""),)
    reference_repository = "black-forest-labs/FLUX.1-dev"
    gguf_denoiser = True  # city96's FLUX.1 GGUF conversions
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
    def sd_scripts_modules(cls, denoiser_config):
        from .formats.sd_scripts import flux_modules

        return flux_modules(denoiser_config)

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
        b = noisy_latents.shape[0]
        prompt_embeds = conditioning["prompt_embeds"]
        packed, image_ids = _pack_2x2_patches(noisy_latents)
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
        return _unpack_2x2_patches(packed_pred, noisy_latents.shape)


class Chroma(Family):
    """Chroma: a Flux.1-schnell derivative with T5 alone (attention-masked), no pooled text, no guidance input."""

    name = "chroma"
    pipeline_class = "ChromaPipeline"
    denoiser = "transformer"
    gguf_denoiser = True  # city96's Chroma GGUF conversions
    text_encoders = ("text_encoder",)
    t5_text_encoder = "text_encoder"
    # ComfyUI's Chroma subclasses its Flux model, whose LoRA map reads OneTrainer's lora_transformer_ names;
    # with no CLIP present it maps T5 under lora_te1_.
    kohya_prefixes = {"transformer": "lora_transformer", "text_encoder": "lora_te1"}
    diffusers_file_layout = "peft_folded"  # PEFT keys, scale folded: what diffusers and ComfyUI both read
    ss_base_model_version = "chroma"
    # As Chroma1-HD.safetensors: the transformer alone, BFL names (Flux's, with the distilled guidance layer).
    single_file_layout = (("transformer", "chroma", ""),)
    reference_repository = "lodestones/Chroma1-HD"
    modelspec_architecture = "chroma/lora"
    objective = "flow_matching"
    default_resolution = 1024
    resolution_multiple = 16
    trainable_text_encoders = ()  # T5 stays frozen, as in diffusers' Flux scripts
    default_max_sequence_length = 512
    default_weighting_scheme = "none"
    license = "apache-2.0"
    hub_tags = ("chroma", "chroma-diffusers")

    @classmethod
    def t5_tokenizer(cls):
        return "tokenizer"

    @classmethod
    def encode_prompt(cls, components, prompts, max_sequence_length=None):
        tokenizer, t5 = components["tokenizer"], components["text_encoder"]
        tokens = tokenizer(
            prompts, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
        )
        mask = tokens.attention_mask.to(_device_of(t5))
        embeds = t5(tokens.input_ids.to(mask.device), attention_mask=mask, output_hidden_states=False)[0]
        # As ChromaPipeline: the transformer sees the prompt and its first padding token, nothing after.
        lengths = mask.sum(dim=1, keepdim=True)
        positions = torch.arange(mask.shape[1], device=mask.device)[None, :]
        return {"prompt_embeds": embeds, "prompt_attention_mask": (positions <= lengths).to(embeds.dtype)}

    @classmethod
    def predict(cls, denoiser, noisy_latents, timesteps, conditioning, batch, guidance_scale=1.0):
        prompt_embeds, text_mask = conditioning["prompt_embeds"], conditioning["prompt_attention_mask"]
        packed, image_ids = _pack_2x2_patches(noisy_latents)
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=noisy_latents.device, dtype=torch.float32)
        image_mask = text_mask.new_ones(packed.shape[0], packed.shape[1])
        packed_pred = denoiser(
            hidden_states=packed,
            timestep=timesteps / 1000,
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            attention_mask=torch.cat([text_mask, image_mask], dim=1),
            return_dict=False,
        )[0]
        return _unpack_2x2_patches(packed_pred, noisy_latents.shape)


def _chat_prompts(tokenizer, prompts: list[str], **template_kwargs) -> list[str]:
    """Each prompt as one user turn of the tokenizer's chat template, ready for the assistant's answer."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, **template_kwargs
        )
        for p in prompts
    ]


def _llm_hidden_states(tokenizer, encoder, texts: list[str], max_length: int, layer: int) -> dict[str, torch.Tensor]:
    """Hidden states of ``layer`` for ``texts`` padded to ``max_length``, and the token mask (1 = text)."""
    tokens = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    device = _device_of(encoder)
    mask = tokens.attention_mask.to(device)
    out = encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
    hidden = out.hidden_states[layer]
    return {"prompt_embeds": hidden, "prompt_attention_mask": mask.to(hidden.dtype)}


class ZImage(Family):
    """Z-Image: a single-stream DiT over Qwen3's second-to-last hidden states, one prompt per chat turn."""

    name = "zimage"
    pipeline_class = "ZImagePipeline"
    denoiser = "transformer"
    gguf_denoiser = True  # Z-Image GGUF conversions
    text_encoders = ("text_encoder",)
    llm_text_encoder = "text_encoder"
    llm_tokenizer = "tokenizer"
    # Current ComfyUI maps Z-Image LoRA keys through z_image_to_diffusers: diffusers module names under
    # transformer. / diffusion_model., or with dots as _ under SimpleTuner's lycoris_ (not lora_transformer_).
    kohya_prefixes = {"transformer": "lycoris", "text_encoder": "lora_te"}
    diffusers_file_layout = "peft_folded"  # PEFT keys, scale folded: what diffusers and ComfyUI both read
    ss_base_model_version = "z_image"
    # As ComfyUI's z_image_turbo_bf16.safetensors: the transformer alone, Tongyi's names (fused attention.qkv).
    single_file_layout = (("transformer", "zimage", ""),)
    reference_repository = "Tongyi-MAI/Z-Image-Turbo"
    modelspec_architecture = "z-image/lora"
    objective = "flow_matching"
    default_resolution = 1024
    resolution_multiple = 16
    trainable_text_encoders = ()  # the LLM stays frozen, as in diffusers' Z-Image script
    default_max_sequence_length = 512
    default_weighting_scheme = "none"
    license = "apache-2.0"
    hub_tags = ("z-image", "z-image-diffusers")

    @classmethod
    def encode_prompt(cls, components, prompts, max_sequence_length=None):
        tokenizer = components["tokenizer"]
        texts = _chat_prompts(tokenizer, prompts, enable_thinking=True)  # as ZImagePipeline
        return _llm_hidden_states(tokenizer, components["text_encoder"], texts, max_sequence_length, layer=-2)

    @classmethod
    def predict(cls, denoiser, noisy_latents, timesteps, conditioning, batch, guidance_scale=1.0):
        # The transformer takes lists: per sample, its (C, frames=1, h, w) latents and its unpadded prompt tokens.
        prompt_embeds, mask = conditioning["prompt_embeds"], conditioning["prompt_attention_mask"]
        captions = [embeds[keep > 0] for embeds, keep in zip(prompt_embeds, mask)]
        latents = list(noisy_latents.unsqueeze(2).unbind(dim=0))
        # Z-Image's time runs the other way (1 = clean) and it predicts x_0 - noise: both flipped here.
        out = denoiser(latents, (1000 - timesteps) / 1000, captions, return_dict=False)[0]
        return -torch.stack(out, dim=0).squeeze(2)


class QwenImage(Family):
    """Qwen-Image: an MMDiT over Qwen2.5-VL's last hidden states, with a video VAE (one frame) and 2x2 packing."""

    name = "qwenimage"
    pipeline_class = "QwenImagePipeline"
    denoiser = "transformer"
    gguf_denoiser = True  # city96's Qwen-Image GGUF conversions
    text_encoders = ("text_encoder",)
    llm_text_encoder = "text_encoder"
    llm_tokenizer = "tokenizer"
    # ComfyUI's Qwen-Image model keeps diffusers' module names; its LoRA map reads them bare, under
    # transformer., or with dots as _ under SimpleTuner's lycoris_ (not lora_transformer_).
    kohya_prefixes = {"transformer": "lycoris", "text_encoder": "lora_te"}
    diffusers_file_layout = "peft_folded"  # PEFT keys, scale folded: what diffusers and ComfyUI both read
    ss_base_model_version = "qwen_image"
    # As ComfyUI's qwen_image_*.safetensors: the transformer alone, in diffusers' names.
    single_file_layout = (("transformer", "qwenimage", ""),)
    reference_repository = "Qwen/Qwen-Image"
    modelspec_architecture = "qwen-image/lora"
    objective = "flow_matching"
    default_resolution = 1024
    resolution_multiple = 16
    trainable_text_encoders = ()  # the LLM stays frozen, as in diffusers' Qwen-Image script
    default_max_sequence_length = 512
    default_weighting_scheme = "none"
    license = "apache-2.0"
    hub_tags = ("qwen-image", "qwen-image-diffusers")

    @classmethod
    def encode_prompt(cls, components, prompts, max_sequence_length=None):
        tokenizer, encoder = components["tokenizer"], components["text_encoder"]
        template, dropped = _QWEN_IMAGE_TEMPLATE, _QWEN_IMAGE_TEMPLATE_TOKENS
        tokens = tokenizer(
            [template.format(p) for p in prompts],
            padding=True,
            truncation=True,
            max_length=_QWEN_IMAGE_TOKENIZER_LIMIT + dropped,
            return_tensors="pt",
        )
        device = _device_of(encoder)
        mask = tokens.attention_mask.to(device)
        out = encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        # Drop the template's leading tokens, then fix the length: the prompt's tokens first, zeros after.
        hidden, mask = hidden[:, dropped:], mask[:, dropped:]
        hidden = F.pad(hidden, (0, 0, 0, max(0, max_sequence_length - hidden.shape[1])))[:, :max_sequence_length]
        mask = F.pad(mask, (0, max(0, max_sequence_length - mask.shape[1])))[:, :max_sequence_length]
        mask = mask.to(hidden.dtype)
        return {"prompt_embeds": hidden * mask[..., None], "prompt_attention_mask": mask}

    @classmethod
    def vae_input(cls, pixels):
        return pixels.unsqueeze(2)  # a video VAE: one frame

    @classmethod
    def vae_scale_factor(cls, vae) -> int:
        return 2 ** len(vae.temperal_downsample)  # a video VAE: diffusers' QwenImagePipeline reads it so

    @classmethod
    def latents_from_vae_sample(cls, vae_config, sample):
        """Per-channel normalisation, (z - mean) / std, of the single frame."""
        shape = (1, vae_config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae_config.latents_mean, device=sample.device, dtype=sample.dtype).view(shape)
        std = torch.tensor(vae_config.latents_std, device=sample.device, dtype=sample.dtype).view(shape)
        return ((sample - mean) / std).squeeze(2)

    @classmethod
    def predict(cls, denoiser, noisy_latents, timesteps, conditioning, batch, guidance_scale=1.0):
        b, _, h, w = noisy_latents.shape
        packed, _ = _pack_2x2_patches(noisy_latents)
        packed_pred = denoiser(
            hidden_states=packed,
            encoder_hidden_states=conditioning["prompt_embeds"],
            encoder_hidden_states_mask=conditioning["prompt_attention_mask"],
            timestep=timesteps / 1000,
            img_shapes=[(1, h // 2, w // 2)] * b,
            return_dict=False,
        )[0]
        return _unpack_2x2_patches(packed_pred, noisy_latents.shape)


# QwenImagePipeline's prompt template, how many of its leading tokens (system turn) it drops, and its token limit.
_QWEN_IMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
_QWEN_IMAGE_TEMPLATE_TOKENS = 34
_QWEN_IMAGE_TOKENIZER_LIMIT = 1024


def _stacked_hidden_states(hidden_states: tuple[torch.Tensor, ...], layers: tuple[int, ...]) -> torch.Tensor:
    """Flux.2's prompt embedding: per token, the hidden states of ``layers`` side by side, (B, L, len(layers) * D)."""
    stacked = torch.stack([hidden_states[k] for k in layers], dim=1)  # (B, n, L, D)
    b, n, length, width = stacked.shape
    return stacked.permute(0, 2, 1, 3).reshape(b, length, n * width)


class _Flux2Base(Family):
    """What Flux.2 [dev] and [klein] share: one transformer over 2x2-patchified, batch-norm-normalised latents.

    Latents: the VAE sample's 2x2 patches as channels (B, 4C, h/2, w/2), then (z - running_mean) /
    sqrt(running_var + eps) with the VAE's BatchNorm statistics; tokens are its pixels in row order with
    (t, row, col, layer) = (0, i, j, 0) position ids, text tokens (0, 0, 0, k), as the pipelines build them.
    """

    denoiser = "transformer"
    gguf_denoiser = True  # Flux.2 GGUF conversions
    text_encoders = ("text_encoder",)
    llm_text_encoder = "text_encoder"
    llm_tokenizer = "tokenizer"
    # Current ComfyUI's Flux2 model is a Flux subclass: flux_to_diffusers maps the diffusers names (single
    # blocks' attn.to_qkv_mlp_proj -> linear1, attn.to_out -> linear2) under lora_transformer_ (OneTrainer's).
    kohya_prefixes = {"transformer": "lora_transformer", "text_encoder": "lora_te"}
    diffusers_file_layout = "peft_folded"  # PEFT keys, scale folded: what diffusers and ComfyUI both read
    # As BFL's flux2-dev.safetensors and [klein] files: the transformer alone, BFL names.
    single_file_layout = (("transformer", "flux2", ""),)
    objective = "flow_matching"
    default_resolution = 1024
    resolution_multiple = 16  # the VAE's stride 8 times the 2x2 patches
    trainable_text_encoders = ()  # the LLM stays frozen, as in diffusers' Flux.2 scripts
    default_max_sequence_length = 512
    default_weighting_scheme = "none"
    # The LLM layers whose hidden states make the prompt embedding (the pipeline's text_encoder_out_layers default).
    text_encoder_out_layers: ClassVar[tuple[int, ...]]

    @classmethod
    def latents_from_vae(cls, vae, sample):
        from diffusers import Flux2KleinPipeline

        patches = Flux2KleinPipeline._patchify_latents(sample)
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        return (patches - mean.to(patches)) / std.to(patches)

    @classmethod
    def predict(cls, denoiser, noisy_latents, timesteps, conditioning, batch, guidance_scale=1.0):
        from diffusers import Flux2KleinPipeline  # its id and packing helpers are Flux2Pipeline's too

        b, c, h, w = noisy_latents.shape
        prompt_embeds = conditioning["prompt_embeds"]
        device = noisy_latents.device
        guidance = None
        if _config_of(denoiser).guidance_embeds:  # [dev] distils classifier-free guidance into an input
            guidance = torch.full((b,), guidance_scale, device=device, dtype=torch.float32)
        tokens = denoiser(
            hidden_states=Flux2KleinPipeline._pack_latents(noisy_latents),
            timestep=timesteps / 1000,  # the transformer takes sigmas in [0, 1]
            guidance=guidance,
            encoder_hidden_states=prompt_embeds,
            txt_ids=Flux2KleinPipeline._prepare_text_ids(prompt_embeds).to(device),
            img_ids=Flux2KleinPipeline._prepare_latent_ids(noisy_latents).to(device),
            return_dict=False,
        )[0]
        return tokens.transpose(1, 2).reshape(b, c, h, w)  # inverse of _pack_latents (tokens in row order)


class Flux2Klein(_Flux2Base):
    """FLUX.2 [klein]: Qwen3 prompts (chat template, thinking off), hidden states of layers 9, 18 and 27 stacked."""

    name = "flux2_klein"
    pipeline_class = "Flux2KleinPipeline"
    ss_base_model_version = "flux2_klein"
    reference_repository = "black-forest-labs/FLUX.2-klein-4B"  # the 9B needs its own --base_config
    modelspec_architecture = "Flux.2-klein/lora"  # musubi-tuner's names: Flux.2-klein-4b / -9b
    license = "other"  # 4B: apache-2.0, 9B: FLUX non-commercial; the card cannot tell which
    hub_tags = ("flux2", "flux2-klein", "flux-diffusers")
    text_encoder_out_layers = (9, 18, 27)

    @classmethod
    def encode_prompt(cls, components, prompts, max_sequence_length=None):
        tokenizer, encoder = components["tokenizer"], components["text_encoder"]
        texts = _chat_prompts(tokenizer, prompts, enable_thinking=False)  # as Flux2KleinPipeline
        tokens = tokenizer(
            texts, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
        )
        device = _device_of(encoder)
        out = encoder(
            input_ids=tokens.input_ids.to(device),
            attention_mask=tokens.attention_mask.to(device),
            output_hidden_states=True,
            use_cache=False,
        )
        return {"prompt_embeds": _stacked_hidden_states(out.hidden_states, cls.text_encoder_out_layers)}


class Flux2(_Flux2Base):
    """FLUX.2 [dev]: Mistral Small 3.1 prompts (BFL's system message, the processor's chat template), hidden states
    of layers 10, 20 and 30 side by side; guidance-distilled, so the transformer takes the guidance value."""

    name = "flux2"
    pipeline_class = "Flux2Pipeline"
    ss_base_model_version = "flux2_dev"
    reference_repository = "black-forest-labs/FLUX.2-dev"
    modelspec_architecture = "Flux.2-dev/lora"  # musubi-tuner's name
    license = "other"  # the FLUX [dev] non-commercial licence
    hub_tags = ("flux2", "flux2-dev", "flux-diffusers")
    text_encoder_out_layers = (10, 20, 30)

    @classmethod
    def encode_prompt(cls, components, prompts, max_sequence_length=None):
        from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE, format_input

        tokenizer, encoder = components["tokenizer"], components["text_encoder"]
        # As Flux2Pipeline: a system turn and a user turn per prompt, through the processor's chat template.
        tokens = tokenizer.apply_chat_template(
            format_input(prompts=prompts, system_message=SYSTEM_MESSAGE),
            add_generation_prompt=False,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=max_sequence_length,
        )
        device = _device_of(encoder)
        out = encoder(
            input_ids=tokens["input_ids"].to(device),
            attention_mask=tokens["attention_mask"].to(device),
            output_hidden_states=True,
            use_cache=False,
        )
        return {"prompt_embeds": _stacked_hidden_states(out.hidden_states, cls.text_encoder_out_layers)}


FAMILIES: dict[str, type[Family]] = {
    f.name: f for f in (SD15, SD2, SDXL, SD3, Flux, Chroma, ZImage, QwenImage, Flux2Klein, Flux2)
}


# Every component name an adapter file may carry, over all families (denoisers first).
ADAPTER_COMPONENTS: tuple[str, ...] = tuple(
    dict.fromkeys([*(f.denoiser for f in FAMILIES.values()), *(c for f in FAMILIES.values() for c in f.text_encoders)])
)


def get_family(name: str) -> type[Family]:
    if name not in FAMILIES:
        raise ValueError(f"Unknown model family {name!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def _family_from_class_and_unet(pipeline_class: str, use_linear_projection: bool | None) -> type[Family]:
    for family in FAMILIES.values():
        if family.denoiser == "transformer" and pipeline_class == family.pipeline_class:
            return family
    for family in (SDXL, SD3, Flux):  # and their img2img, inpaint, ... variants
        if pipeline_class.startswith(family.pipeline_class):
            return family
    if pipeline_class.startswith("StableDiffusion"):
        # SD 2.x UNets project with Linear layers; SD 1.x with 1x1 convs.
        return SD2 if use_linear_projection else SD15
    raise ValueError(
        f"Unsupported pipeline {pipeline_class!r}: supported are StableDiffusion (1.x, 2.x), StableDiffusionXL, "
        + ", ".join(f.pipeline_class for f in FAMILIES.values() if f.denoiser == "transformer")
    )


def family_of_model_index(model_index: dict, unet_config: dict | None = None) -> type[Family]:
    """The family described by a parsed model_index.json (and the UNet's config.json, if it has one)."""
    use_linear = None if unet_config is None else bool(unet_config.get("use_linear_projection", False))
    return _family_from_class_and_unet(model_index["_class_name"], use_linear)


def family_of_pipeline(pipe) -> type[Family]:
    """The family of a loaded diffusers pipeline."""
    unet = getattr(pipe, "unet", None)
    use_linear = (
        bool(getattr(getattr(unet, "config", None), "use_linear_projection", False)) if unet is not None else None
    )
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
