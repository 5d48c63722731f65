"""Tiny random pipelines of every supported family, built fully offline.

For tests, docs and smoke runs, and the trainer's ``tiny:<family>`` bases: nothing here touches the hub.
(:mod:`moslora_diffusion.testing` is the public name of the same functions.) Every model is built from a small
config (sizes like those of diffusers' own tests), every tokenizer is built in memory (a character-level
CLIP BPE tokenizer and a character-level T5 unigram tokenizer), and the weights are default-initialised
random tensors seeded from ``seed``, so the same seed always gives the same pipeline.

The pipelines keep the *structure* of the real models (module names, prediction type, number of
text encoders, latent channels, patchification, scheduler kind), which is what LoRA targeting,
folding and saving depend on, while staying small enough to run a few inference or training steps on
a CPU in about a second. SD3 keeps its third (T5) text encoder, as the released checkpoints do:
diffusers 0.42 saves ``text_encoder_3=None`` but then refuses to load that folder without an explicit
``text_encoder_3=None, tokenizer_3=None``. ``pipe.text_encoder_3 = pipe.tokenizer_3 = None`` is
enough to exercise the T5-less path in memory.

    >>> pipe = make_tiny_pipeline("sdxl")
    >>> images = pipe("a photo", generator=torch.Generator().manual_seed(0),
    ...               **tiny_pipeline_kwargs("sdxl")).images   # (1, 32, 32, 3) float array

``save_tiny_pipeline`` writes one to disk so that ``DiffusionPipeline.from_pretrained(path)`` loads
it back offline, and ``make_test_images`` writes a few small PNGs to train on.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .families import FAMILIES as _FAMILY_CLASSES

__all__ = [
    "FAMILIES",
    "make_tiny_pipeline",
    "save_tiny_pipeline",
    "make_test_images",
    "default_tiny_resolution",
    "tiny_pipeline_kwargs",
    "make_clip_tokenizer",
    "make_t5_tokenizer",
]

FAMILIES: tuple[str, ...] = tuple(_FAMILY_CLASSES)  # every family of moslora_diffusion.families has a tiny pipeline

# Shared sizes. CLIP_MAX_LENGTH is the tokenizer's model_max_length (the pipelines pad to it) and the
# text encoders' max_position_embeddings.
TEXT_HIDDEN = 32
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 32  # sd3/flux pad T5 prompts to max_sequence_length; tiny_pipeline_kwargs passes this
RESOLUTION = 32  # pixels; the VAE halves it once, so latents are 16x16

_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)

_UNET_BASE = dict(
    sample_size=RESOLUTION // 2,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=32,
)

_VAE_BASE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=32,
    sample_size=RESOLUTION,
)

# Flux.2: a transformer over 2x2 patches of an 8-channel VAE (32 in the real one), reading the hidden states of
# three LLM layers side by side; both pipelines pick layers up to 30, so the tiny LLMs are that deep.
_FLUX2_LATENT_CHANNELS = 8
_FLUX2_TRANSFORMER = dict(
    patch_size=1,
    in_channels=4 * _FLUX2_LATENT_CHANNELS,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=3 * TEXT_HIDDEN,
    timestep_guidance_channels=256,  # fixed in the original model
    axes_dims_rope=(4, 4, 4, 4),  # (t, row, col, layer); sums to attention_head_dim
)
_FLUX2_VAE = dict(_VAE_BASE, latent_channels=_FLUX2_LATENT_CHANNELS, use_quant_conv=False, use_post_quant_conv=False)
# Non-trivial latent statistics, so the normalisation is exercised (the BatchNorm is never trained).
_FLUX2_VAE_BATCH_NORM = {
    "bn.running_mean": [0.05 * ((i % 7) - 3) for i in range(4 * _FLUX2_LATENT_CHANNELS)],
    "bn.running_var": [0.5 + 0.1 * (i % 11) for i in range(4 * _FLUX2_LATENT_CHANNELS)],
}
_FLUX2_SCHEDULER = (
    "FlowMatchEulerDiscreteScheduler",
    dict(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ),
)

# One table: for each family, the pipeline class, the denoiser (component name, class, config), the VAE
# overrides, the scheduler, the text encoders in pipeline order ("clip" = CLIPTextModel, "clip_proj" =
# CLIPTextModelWithProjection, "t5" = T5EncoderModel, d_model = the denoiser's joint_attention_dim) and
# the extra call kwargs for tiny_pipeline_kwargs.
_FAMILY_SPECS: dict[str, dict[str, Any]] = {
    "sd15": dict(
        pipeline="StableDiffusionPipeline",
        denoiser=(
            "unet",
            "UNet2DConditionModel",
            dict(_UNET_BASE, cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8),
        ),
        vae=dict(latent_channels=4, scaling_factor=0.18215),
        scheduler=("DDIMScheduler", dict(_SD_BETAS, clip_sample=False, set_alpha_to_one=False)),
        text_encoders=("clip",),
        call=dict(guidance_scale=5.0),
    ),
    "sd2": dict(
        pipeline="StableDiffusionPipeline",
        denoiser=(
            "unet",
            "UNet2DConditionModel",
            # SD2: linear proj_in/proj_out, per-block head counts (diffusers calls them attention_head_dim).
            dict(_UNET_BASE, cross_attention_dim=TEXT_HIDDEN, attention_head_dim=(2, 4), use_linear_projection=True),
        ),
        vae=dict(latent_channels=4, scaling_factor=0.18215),
        scheduler=(
            "DDIMScheduler",
            dict(_SD_BETAS, clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction"),
        ),
        text_encoders=("clip",),
        call=dict(guidance_scale=5.0),
    ),
    "sdxl": dict(
        pipeline="StableDiffusionXLPipeline",
        denoiser=(
            "unet",
            "UNet2DConditionModel",
            dict(
                _UNET_BASE,
                layers_per_block=2,
                attention_head_dim=(2, 4),
                use_linear_projection=True,
                transformer_layers_per_block=(1, 2),
                cross_attention_dim=2 * TEXT_HIDDEN,  # both encoders' hidden states, concatenated
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                # 6 micro-conditioning values * addition_time_embed_dim + pooled text_encoder_2 projection
                projection_class_embeddings_input_dim=6 * 8 + TEXT_HIDDEN,
            ),
        ),
        vae=dict(latent_channels=4, scaling_factor=0.13025),
        scheduler=("EulerDiscreteScheduler", dict(_SD_BETAS, timestep_spacing="leading")),
        text_encoders=("clip", "clip_proj"),
        call=dict(guidance_scale=5.0),
    ),
    "sd3": dict(
        pipeline="StableDiffusion3Pipeline",
        denoiser=(
            "transformer",
            "SD3Transformer2DModel",
            dict(
                sample_size=RESOLUTION // 2,
                patch_size=2,
                in_channels=16,
                out_channels=16,
                num_layers=2,
                attention_head_dim=8,
                num_attention_heads=4,
                caption_projection_dim=32,
                joint_attention_dim=2 * TEXT_HIDDEN,  # T5 width; the concatenated CLIP states are padded to it
                pooled_projection_dim=2 * TEXT_HIDDEN,  # concatenated CLIP projections
            ),
        ),
        vae=dict(
            latent_channels=16,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        scheduler=("FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
        text_encoders=("clip_proj", "clip_proj", "t5"),
        call=dict(guidance_scale=5.0, max_sequence_length=T5_MAX_LENGTH),
    ),
    "flux": dict(
        pipeline="FluxPipeline",
        denoiser=(
            "transformer",
            "FluxTransformer2DModel",
            dict(
                patch_size=1,
                in_channels=64,  # 16 latent channels packed 2x2
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=TEXT_HIDDEN,  # T5 d_model
                pooled_projection_dim=TEXT_HIDDEN,  # CLIP pooled output
                guidance_embeds=True,  # FLUX.1-dev style
                axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
            ),
        ),
        vae=dict(
            latent_channels=16,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        scheduler=(
            "FlowMatchEulerDiscreteScheduler",
            dict(
                shift=3.0,
                use_dynamic_shifting=True,
                base_shift=0.5,
                max_shift=1.15,
                base_image_seq_len=256,
                max_image_seq_len=4096,
            ),
        ),
        text_encoders=("clip", "t5"),
        call=dict(guidance_scale=3.5, max_sequence_length=T5_MAX_LENGTH),
    ),
    "chroma": dict(
        pipeline="ChromaPipeline",
        denoiser=(
            "transformer",
            "ChromaTransformer2DModel",
            dict(
                patch_size=1,
                in_channels=64,  # 16 latent channels packed 2x2
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=TEXT_HIDDEN,  # T5 d_model
                axes_dims_rope=(4, 6, 6),
                approximator_hidden_dim=32,  # the distilled guidance network that makes the AdaLN inputs
                approximator_layers=1,
                approximator_num_channels=16,
            ),
        ),
        vae=dict(
            latent_channels=16,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        scheduler=(
            "FlowMatchEulerDiscreteScheduler",
            dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
        ),
        text_encoders=("t5",),
        call=dict(guidance_scale=3.0, max_sequence_length=T5_MAX_LENGTH),
    ),
    "zimage": dict(
        pipeline="ZImagePipeline",
        denoiser=(
            "transformer",
            "ZImageTransformer2DModel",
            dict(
                all_patch_size=(2,),
                all_f_patch_size=(1,),
                in_channels=16,
                dim=32,
                n_layers=2,
                n_refiner_layers=1,
                n_heads=2,
                n_kv_heads=2,
                norm_eps=1e-5,
                qk_norm=True,
                cap_feat_dim=TEXT_HIDDEN,  # Qwen3's hidden size
                rope_theta=256.0,
                t_scale=1000.0,
                axes_dims=(8, 4, 4),
                axes_lens=(256, 32, 32),
            ),
        ),
        # Padding embeddings the model creates with torch.empty: fixed so the weights are a function of the seed.
        fill_with_ones=("x_pad_token", "cap_pad_token"),
        vae=dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
        scheduler=("FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
        text_encoders=("qwen3",),
        call=dict(guidance_scale=4.0, max_sequence_length=T5_MAX_LENGTH),
    ),
    "qwenimage": dict(
        pipeline="QwenImagePipeline",
        denoiser=(
            "transformer",
            "QwenImageTransformer2DModel",
            dict(
                patch_size=2,
                in_channels=16,  # 4 latent channels packed 2x2
                out_channels=4,
                num_layers=2,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=TEXT_HIDDEN,  # Qwen2.5-VL's hidden size
                guidance_embeds=False,
                axes_dims_rope=(8, 4, 4),
            ),
        ),
        # Qwen-Image's video VAE (one frame per image), 4 latent channels, spatial stride 4.
        vae_model=(
            "AutoencoderKLQwenImage",
            dict(
                base_dim=24,
                z_dim=4,
                dim_mult=[1, 2, 4],
                num_res_blocks=1,
                temperal_downsample=[False, True],
                latents_mean=[0.1, -0.2, 0.0, 0.3],
                latents_std=[1.5, 0.8, 1.0, 1.2],
            ),
        ),
        scheduler=(
            "FlowMatchEulerDiscreteScheduler",
            dict(
                shift=1.0,
                use_dynamic_shifting=True,
                base_shift=0.5,
                max_shift=0.9,
                base_image_seq_len=256,
                max_image_seq_len=8192,
                shift_terminal=0.02,
                time_shift_type="exponential",
            ),
        ),
        text_encoders=("qwen2_5_vl",),
        call=dict(true_cfg_scale=1.0, max_sequence_length=T5_MAX_LENGTH),
    ),
    "flux2_klein": dict(
        pipeline="Flux2KleinPipeline",
        denoiser=("transformer", "Flux2Transformer2DModel", dict(_FLUX2_TRANSFORMER, guidance_embeds=False)),
        vae_model=("AutoencoderKLFlux2", _FLUX2_VAE),
        vae_buffers=_FLUX2_VAE_BATCH_NORM,
        scheduler=_FLUX2_SCHEDULER,
        text_encoders=("qwen3_causal",),
        text_width=TEXT_HIDDEN,  # the transformer reads three of its layers side by side
        call=dict(guidance_scale=4.0, max_sequence_length=T5_MAX_LENGTH),
    ),
    "flux2": dict(
        pipeline="Flux2Pipeline",
        denoiser=("transformer", "Flux2Transformer2DModel", dict(_FLUX2_TRANSFORMER, guidance_embeds=True)),
        vae_model=("AutoencoderKLFlux2", _FLUX2_VAE),
        vae_buffers=_FLUX2_VAE_BATCH_NORM,
        scheduler=_FLUX2_SCHEDULER,
        text_encoders=("mistral3",),
        text_width=TEXT_HIDDEN,
        call=dict(guidance_scale=4.0, max_sequence_length=T5_MAX_LENGTH),
    ),
}


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    return family


# --------------------------------------------------------------------------------------------------
# Tokenizers


def make_clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH, merges: Sequence[tuple[str, str]] = ()):
    """CLIP tokenizer over every byte-level character, alone and as a word end; character-level unless
    ``merges`` are given (their merged tokens join the vocabulary, before the two special tokens)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    known = set(tokens)
    tokens += list(dict.fromkeys(a + b for a, b in merges if a + b not in known))
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=model_max_length)


def make_t5_tokenizer(model_max_length: int = T5_MAX_LENGTH):
    """Character-level T5 (unigram) tokenizer over printable ASCII, no sentinel tokens."""
    from transformers import T5Tokenizer

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    printable = [chr(i) for i in range(33, 127)]
    vocab = specials + [("▁", -2.0)] + [(c, -5.0) for c in printable] + [("▁" + c, -6.0) for c in printable]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


# Qwen2.5-VL's image markers (its config names their ids; no tiny prompt holds an image).
_QWEN_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")

# A Qwen-style chat template: Qwen3's, including its switch for the empty thinking block.
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def make_qwen_tokenizer(model_max_length: int = T5_MAX_LENGTH):
    """Byte-level Qwen2 tokenizer (no merges: one token per byte) with Qwen's chat special tokens and template."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_QWEN_VISION_TOKENS]
    vocab = {tok: i for i, tok in enumerate([*bytes_to_unicode().values(), *specials])}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], model_max_length=model_max_length, chat_template=_QWEN_CHAT_TEMPLATE
    )
    tokenizer.add_tokens(specials[1:], special_tokens=True)
    return tokenizer


# Mistral's chat markers, and a template like Mistral Small 3.1's for system and user turns (content as a string
# or as a list of {"type": "text"} parts, as Flux2Pipeline sends it).
_MISTRAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]")
_MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}{% else %}"
    "{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]{% else %}{{ text }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def make_mistral_tokenizer(model_max_length: int = T5_MAX_LENGTH):
    """Byte-level BPE tokenizer (no merges) with Mistral's chat markers and template, in place of FLUX.2 [dev]'s
    Pixtral processor (which needs torchvision). Flux2Pipeline's system message is one token here (a real BPE
    makes it about 40), so the tiny's 32-token prompts still hold the user's words."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {tok: i for i, tok in enumerate([*_MISTRAL_TOKENS, *bytes_to_unicode().values()])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=model_max_length,
        chat_template=_MISTRAL_CHAT_TEMPLATE,
    )
    tokenizer.add_tokens([*_MISTRAL_TOKENS[4:], SYSTEM_MESSAGE], special_tokens=True)
    return tokenizer


# --------------------------------------------------------------------------------------------------
# Text encoders


def _clip_config(tokenizer, **overrides):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )


def _make_text_encoder(kind: str, tokenizer, t5_width: int):
    import transformers

    if kind == "clip":
        return transformers.CLIPTextModel(_clip_config(tokenizer))
    if kind == "clip_proj":
        return transformers.CLIPTextModelWithProjection(_clip_config(tokenizer, projection_dim=TEXT_HIDDEN))
    if kind == "t5":
        config = transformers.T5Config(
            vocab_size=len(tokenizer),
            d_model=t5_width,
            d_kv=t5_width // 4,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
        return transformers.T5EncoderModel(config)
    if kind == "qwen3":
        config = transformers.Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=t5_width,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=t5_width // 2,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
        )
        return transformers.Qwen3Model(config)
    if kind == "qwen3_causal":  # Flux.2 [klein]'s Qwen3 with its LM head, 27 layers deep like the pipeline's picks
        config = transformers.Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=t5_width,
            intermediate_size=37,
            num_hidden_layers=27,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=t5_width // 2,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
        )
        return transformers.Qwen3ForCausalLM(config)
    if kind == "mistral3":  # FLUX.2 [dev]'s Mistral Small 3.1 with a tiny Pixtral vision tower, 30 layers deep
        config = transformers.Mistral3Config(
            text_config=dict(
                model_type="mistral",
                vocab_size=len(tokenizer),
                hidden_size=t5_width,
                intermediate_size=37,
                max_position_embeddings=512,
                num_attention_heads=2,
                num_hidden_layers=30,
                num_key_value_heads=2,
                head_dim=t5_width // 2,
                sliding_window=None,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            ),
            vision_config=dict(
                model_type="pixtral",
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=37,
                image_size=30,
                patch_size=6,
                num_channels=3,
            ),
            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
            image_seq_length=4,
            vision_feature_layer=-1,
        )
        return transformers.Mistral3ForConditionalGeneration(config)
    if kind == "qwen2_5_vl":
        vision_start, vision_end, image_pad = tokenizer.convert_tokens_to_ids(list(_QWEN_VISION_TOKENS))
        config = transformers.Qwen2_5_VLConfig(
            text_config=dict(
                hidden_size=t5_width,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                vocab_size=len(tokenizer),
                rope_scaling={"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"},
                rope_theta=1000000.0,
            ),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=t5_width),
            vocab_size=len(tokenizer),
            vision_start_token_id=vision_start,
            vision_end_token_id=vision_end,
            image_token_id=image_pad,
            vision_token_id=image_pad,
        )
        return transformers.Qwen2_5_VLForConditionalGeneration(config)
    raise ValueError(f"unknown text encoder kind {kind!r}")


_TOKENIZER_FACTORIES: dict[str, Callable[[], Any]] = {
    "clip": make_clip_tokenizer,
    "clip_proj": make_clip_tokenizer,
    "t5": make_t5_tokenizer,
    "qwen3": make_qwen_tokenizer,
    "qwen2_5_vl": make_qwen_tokenizer,
    "qwen3_causal": make_qwen_tokenizer,
    "mistral3": make_mistral_tokenizer,
}


# --------------------------------------------------------------------------------------------------
# Public API


def default_tiny_resolution(family: str) -> int:
    """Image side in pixels that the tiny pipeline of ``family`` handles (divisible by every stride)."""
    _check_family(family)
    return RESOLUTION


def tiny_pipeline_kwargs(family: str) -> dict[str, Any]:
    """Call kwargs for a fast, deterministic inference of the tiny pipeline (pass your own generator)."""
    _check_family(family)
    res = default_tiny_resolution(family)
    return dict(num_inference_steps=2, height=res, width=res, output_type="np", **_FAMILY_SPECS[family]["call"])


def make_tiny_pipeline(family: str, seed: int = 0, torch_dtype: torch.dtype = torch.float32):
    """A tiny random diffusers pipeline of ``family`` (one of ``FAMILIES``), built in memory.

    Each model is built right after ``torch.manual_seed(seed)``, so equal seeds give identical weights;
    the caller's global RNG state is left untouched.
    """
    import diffusers

    spec = _FAMILY_SPECS[_check_family(family)]
    denoiser_name, denoiser_cls, denoiser_cfg = spec["denoiser"]
    scheduler_cls, scheduler_cfg = spec["scheduler"]
    components: dict[str, Any] = {"scheduler": getattr(diffusers, scheduler_cls)(**scheduler_cfg)}

    def seeded(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = build().eval()
        # Plain nn.Module.to: diffusers' ModelMixin.to warns about fp32 modules on every dtype cast.
        return torch.nn.Module.to(model, torch_dtype) if torch_dtype != torch.float32 else model

    with torch.random.fork_rng(devices=[]):
        components[denoiser_name] = seeded(lambda: getattr(diffusers, denoiser_cls)(**denoiser_cfg))
        with torch.no_grad():
            for name in spec.get("fill_with_ones", ()):
                getattr(components[denoiser_name], name).fill_(1.0)
        if "vae_model" in spec:  # a VAE other than the image AutoencoderKL
            vae_cls, vae_cfg = spec["vae_model"]
            components["vae"] = seeded(lambda: getattr(diffusers, vae_cls)(**vae_cfg))
        else:
            components["vae"] = seeded(lambda: diffusers.AutoencoderKL(**_VAE_BASE, **spec["vae"]))
        for name, values in spec.get("vae_buffers", {}).items():
            components["vae"].get_buffer(name).copy_(torch.tensor(values))
        for i, kind in enumerate(spec["text_encoders"]):
            suffix = "" if i == 0 else f"_{i + 1}"
            tokenizer = _TOKENIZER_FACTORIES[kind]()
            components[f"tokenizer{suffix}"] = tokenizer
            # T5's width is the denoiser's joint_attention_dim, as in the real SD3 / Flux models.
            width = spec.get("text_width", denoiser_cfg.get("joint_attention_dim", TEXT_HIDDEN))
            components[f"text_encoder{suffix}"] = seeded(lambda: _make_text_encoder(kind, tokenizer, width))

    pipeline_cls = getattr(diffusers, spec["pipeline"])
    if spec["pipeline"] == "StableDiffusionPipeline":
        components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipeline_cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(family: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny pipeline to ``path`` (safetensors) so ``DiffusionPipeline.from_pretrained`` loads it."""
    path = Path(path)
    pipe = make_tiny_pipeline(family, seed=seed)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def make_test_images(folder: str | os.PathLike, n: int = 4, size: int = 64, seed: int = 0) -> list[Path]:
    """Write ``n`` small RGB PNGs (a coloured shape on a coloured background, varying per image)."""
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        background = tuple(rng.randrange(256) for _ in range(3))
        colour = tuple(255 - c for c in background)
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        x0, y0 = rng.randrange(size // 2), rng.randrange(size // 2)
        x1, y1 = x0 + size // 4 + rng.randrange(size // 4), y0 + size // 4 + rng.randrange(size // 4)
        shape = ("ellipse", "rectangle", "triangle")[i % 3]
        if shape == "triangle":
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=colour)
        else:
            getattr(draw, shape)([x0, y0, x1, y1], fill=colour)
        out = folder / f"image_{i:03d}.png"
        image.save(out)
        paths.append(out)
    return paths
