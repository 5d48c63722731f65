"""Diffusers names -> the original single-file layout of each family: the inverse of diffusers' converters.

A single-file checkpoint (what A1111, Forge and ComfyUI load, and what diffusers' ``from_single_file``
reads) keeps the names of the code each model was released with:

    sd15   LDM:  model.diffusion_model.* (UNet), first_stage_model.* (VAE), cond_stage_model.transformer.* (CLIP)
    sd2    LDM:  as sd15, with the OpenCLIP text encoder under cond_stage_model.model.* (fused q/k/v)
    sdxl   SGM:  model.diffusion_model.*, first_stage_model.*, conditioner.embedders.0.transformer.* (CLIP-L),
                 conditioner.embedders.1.model.* (OpenCLIP bigG)
    sd3    MMDiT: model.diffusion_model.* (fused q/k/v) and first_stage_model.*, as sd3_medium.safetensors
    flux   BFL:  bare double_blocks.* / single_blocks.* names, as flux1-dev.safetensors (transformer only)
    chroma BFL:  Flux's blocks without modulation, plus distilled_guidance_layer.*, as Chroma1-HD.safetensors
    flux2, flux2_klein  BFL:  double_blocks.* (fused qkv), single_blocks.*.linear1/2, shared *_modulation.lin,
                 as BFL's flux2-dev.safetensors and [klein] files (transformer only)
    zimage Tongyi: layers.* / noise_refiner.* / context_refiner.* with fused attention.qkv, as ComfyUI's
                 z_image_turbo_bf16.safetensors (transformer only)
    qwenimage    diffusers' own names, as ComfyUI's qwen_image_*.safetensors (transformer only)

diffusers' ``loaders.single_file_utils`` converts each of these into diffusers names; this module is that
conversion's inverse, written as a plan: every tensor of the single file is named together with the
diffusers tensors it is built from and how (renamed; q/k/v concatenated; 1x1 convs; transposed; the
shift/scale halves swapped). A merge can then produce the file one tensor at a time. Round trips through
diffusers' converters are exact (tests/test_merge_single_file.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from .clip_names import with_clip_root
from .families import FAMILIES

Transform = Callable[[torch.Tensor], torch.Tensor]


def _conv1x1(weight: torch.Tensor) -> torch.Tensor:
    """LDM's VAE attention uses 1x1 convs where diffusers uses linears."""
    return weight[:, :, None, None] if weight.dim() == 2 else weight


def _transpose(weight: torch.Tensor) -> torch.Tensor:
    """OpenCLIP stores text_projection as (hidden, projection), the transpose of a linear weight."""
    return weight.T.contiguous()


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """Original AdaLN layers emit (shift, scale); diffusers' emit (scale, shift). Its own inverse."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


@dataclass(frozen=True)
class OriginalTensor:
    """One tensor of the single file: its name, the (component, diffusers key) tensors it is built from
    (concatenated along dim 0 when there are several), and an optional transform applied afterwards."""

    name: str
    sources: tuple[tuple[str, str], ...]
    transform: Transform | None = None

    def build(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        tensor = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
        return self.transform(tensor) if self.transform is not None else tensor


# A rule: (regex over the diffusers key, target template or function of the match, part, transform).
# ``part`` places the key among the tensors concatenated into one target: (index, count), or a function of
# the match giving it. The first rule whose regex matches the whole key wins.
Rule = tuple


def _qkv(group: int, order: tuple[str, ...] = ("q", "k", "v")):
    return lambda m: (order.index(m.group(group)), len(order))


# ---------------------------------------------------------------------------------------------------
# UNet (LDM / SGM): the inverse of convert_ldm_unet_checkpoint

_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's pooled-text + time-ids embedding
    "add_embedding.linear_2": "label_emb.0.2",
}


def _resnet(prefix: str, rest: str) -> str:
    layer, _, param = rest.partition(".")
    return f"{prefix}.{_RESNET_TO_LDM[layer]}.{param}"


def _unet_rules(keys: list[str], config: Mapping) -> list[Rule]:
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ValueError(f"UNets with per-block layers_per_block ({per_block}) have no LDM layout")
    up_with_attention = {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    step = per_block + 1  # LDM counts the down/upsampler as a layer of its block

    def upsampler(m):
        block = int(m.group(1))
        index = 2 if block in up_with_attention else 1
        return f"output_blocks.{block * step + per_block}.{index}.conv.{m.group(2)}"

    top = "|".join(re.escape(k) for k in _UNET_TOP)
    resnet = "|".join(_RESNET_TO_LDM)
    return [
        (rf"({top})\.(weight|bias)", lambda m: f"{_UNET_TOP[m.group(1)]}.{m.group(2)}"),
        (
            rf"down_blocks\.(\d+)\.resnets\.(\d+)\.((?:{resnet})\..+)",
            lambda m: _resnet(f"input_blocks.{1 + int(m.group(1)) * step + int(m.group(2))}.0", m.group(3)),
        ),
        (
            r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
            lambda m: f"input_blocks.{1 + int(m.group(1)) * step + int(m.group(2))}.1.{m.group(3)}",
        ),
        (
            r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
            lambda m: f"input_blocks.{1 + int(m.group(1)) * step + per_block}.0.op.{m.group(2)}",
        ),
        (
            rf"mid_block\.resnets\.(\d+)\.((?:{resnet})\..+)",
            lambda m: _resnet(f"middle_block.{2 * int(m.group(1))}", m.group(2)),
        ),
        (r"mid_block\.attentions\.(\d+)\.(.+)", lambda m: f"middle_block.{2 * int(m.group(1)) + 1}.{m.group(2)}"),
        (
            rf"up_blocks\.(\d+)\.resnets\.(\d+)\.((?:{resnet})\..+)",
            lambda m: _resnet(f"output_blocks.{int(m.group(1)) * step + int(m.group(2))}.0", m.group(3)),
        ),
        (
            r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
            lambda m: f"output_blocks.{int(m.group(1)) * step + int(m.group(2))}.1.{m.group(3)}",
        ),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", upsampler),
    ]


# ---------------------------------------------------------------------------------------------------
# VAE (LDM): the inverse of convert_ldm_vae_checkpoint


def _vae_rules(keys: list[str], config: Mapping) -> list[Rule]:
    num_up = len(config["up_block_types"])

    def vae_resnet(rest: str) -> str:
        return rest.replace("conv_shortcut", "nin_shortcut", 1)

    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    return [
        (r"(encoder|decoder)\.(conv_in|conv_out)\.(.+)", r"\1.\2.\3"),
        (r"(encoder|decoder)\.conv_norm_out\.(.+)", r"\1.norm_out.\2"),
        (r"(quant_conv|post_quant_conv)\.(.+)", r"\1.\2"),
        (
            r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
            lambda m: f"encoder.down.{m.group(1)}.block.{m.group(2)}.{vae_resnet(m.group(3))}",
        ),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", r"encoder.down.\1.downsample.conv.\2"),
        (
            r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)",
            lambda m: f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{vae_resnet(m.group(3))}",
        ),
        (
            r"(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight",
            lambda m: f"{m.group(1)}.mid.attn_1.{attention[m.group(2)]}.weight",
            None,
            _conv1x1,
        ),
        (
            r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)",
            lambda m: f"{m.group(1)}.mid.attn_1.{attention[m.group(2)]}.{m.group(3)}",
        ),
        (
            r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
            lambda m: f"decoder.up.{num_up - 1 - int(m.group(1))}.block.{m.group(2)}.{vae_resnet(m.group(3))}",
        ),
        (
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
            lambda m: f"decoder.up.{num_up - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}",
        ),
    ]


# ---------------------------------------------------------------------------------------------------
# Text encoders: CLIP in transformers' names (kept as they are) and OpenCLIP (inverse of convert_open_clip_checkpoint)


def _clip_rules(keys: list[str], config: Mapping) -> list[Rule]:
    # transformers >= 5.6 saves CLIPTextModel without its ``text_model.`` level; single files keep it.
    return [(r"(?:text_model\.)?(.+)", lambda m: with_clip_root(m.group(0)))]


def _open_clip_rules(keys: list[str], config: Mapping) -> list[Rule]:
    layer = r"(?:text_model\.)?encoder\.layers\.(\d+)"
    return [
        (r"(?:text_model\.)?embeddings\.position_embedding\.weight", "positional_embedding"),
        (r"(?:text_model\.)?embeddings\.token_embedding\.weight", "token_embedding.weight"),
        (r"(?:text_model\.)?final_layer_norm\.(weight|bias)", r"ln_final.\1"),
        (r"text_projection\.weight", "text_projection", None, _transpose),
        (rf"{layer}\.self_attn\.([qkv])_proj\.(weight|bias)", r"transformer.resblocks.\1.attn.in_proj_\3", _qkv(2)),
        (rf"{layer}\.self_attn\.out_proj\.(weight|bias)", r"transformer.resblocks.\1.attn.out_proj.\2"),
        (rf"{layer}\.layer_norm([12])\.(weight|bias)", r"transformer.resblocks.\1.ln_\2.\3"),
        (rf"{layer}\.mlp\.fc1\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_fc.\2"),
        (rf"{layer}\.mlp\.fc2\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_proj.\2"),
    ]


# ---------------------------------------------------------------------------------------------------
# SD3 MMDiT: the inverse of convert_sd3_transformer_checkpoint_to_diffusers


def _sd3_rules(keys: list[str], config: Mapping) -> list[Rule]:
    last = max(int(m.group(1)) for k in keys if (m := re.match(r"transformer_blocks\.(\d+)\.", k)))
    block = r"transformer_blocks\.(\d+)"
    return [
        (r"pos_embed\.pos_embed", "pos_embed"),
        (r"pos_embed\.proj\.(.+)", r"x_embedder.proj.\1"),
        (r"time_text_embed\.timestep_embedder\.linear_1\.(.+)", r"t_embedder.mlp.0.\1"),
        (r"time_text_embed\.timestep_embedder\.linear_2\.(.+)", r"t_embedder.mlp.2.\1"),
        (r"time_text_embed\.text_embedder\.linear_1\.(.+)", r"y_embedder.mlp.0.\1"),
        (r"time_text_embed\.text_embedder\.linear_2\.(.+)", r"y_embedder.mlp.2.\1"),
        (r"context_embedder\.(.+)", r"context_embedder.\1"),
        (r"proj_out\.(.+)", r"final_layer.linear.\1"),
        (r"norm_out\.linear\.(.+)", r"final_layer.adaLN_modulation.1.\1", None, _swap_halves),
        (rf"{block}\.attn\.to_([qkv])\.(.+)", r"joint_blocks.\1.x_block.attn.qkv.\3", _qkv(2)),
        (rf"{block}\.attn\.add_([qkv])_proj\.(.+)", r"joint_blocks.\1.context_block.attn.qkv.\3", _qkv(2)),
        (rf"{block}\.attn\.norm_([qk])\.(.+)", r"joint_blocks.\1.x_block.attn.ln_\2.\3"),
        (rf"{block}\.attn\.norm_added_([qk])\.(.+)", r"joint_blocks.\1.context_block.attn.ln_\2.\3"),
        (rf"{block}\.attn\.to_out\.0\.(.+)", r"joint_blocks.\1.x_block.attn.proj.\2"),
        (rf"{block}\.attn\.to_add_out\.(.+)", r"joint_blocks.\1.context_block.attn.proj.\2"),
        (rf"{block}\.attn2\.to_([qkv])\.(.+)", r"joint_blocks.\1.x_block.attn2.qkv.\3", _qkv(2)),
        (rf"{block}\.attn2\.norm_([qk])\.(.+)", r"joint_blocks.\1.x_block.attn2.ln_\2.\3"),
        (rf"{block}\.attn2\.to_out\.0\.(.+)", r"joint_blocks.\1.x_block.attn2.proj.\2"),
        (rf"{block}\.norm1\.linear\.(.+)", r"joint_blocks.\1.x_block.adaLN_modulation.1.\2"),
        # The last block's context stream only conditions (context_pre_only): an AdaLN-continuous norm.
        (
            rf"transformer_blocks\.({last})\.norm1_context\.linear\.(.+)",
            r"joint_blocks.\1.context_block.adaLN_modulation.1.\2",
            None,
            _swap_halves,
        ),
        (rf"{block}\.norm1_context\.linear\.(.+)", r"joint_blocks.\1.context_block.adaLN_modulation.1.\2"),
        (rf"{block}\.ff\.net\.0\.proj\.(.+)", r"joint_blocks.\1.x_block.mlp.fc1.\2"),
        (rf"{block}\.ff\.net\.2\.(.+)", r"joint_blocks.\1.x_block.mlp.fc2.\2"),
        (rf"{block}\.ff_context\.net\.0\.proj\.(.+)", r"joint_blocks.\1.context_block.mlp.fc1.\2"),
        (rf"{block}\.ff_context\.net\.2\.(.+)", r"joint_blocks.\1.context_block.mlp.fc2.\2"),
    ]


# ---------------------------------------------------------------------------------------------------
# Flux: the inverse of convert_flux_transformer_checkpoint_to_diffusers


def _flux_rules(keys: list[str], config: Mapping) -> list[Rule]:
    double = r"transformer_blocks\.(\d+)"
    single = r"single_transformer_blocks\.(\d+)"
    return [
        (r"time_text_embed\.timestep_embedder\.linear_1\.(.+)", r"time_in.in_layer.\1"),
        (r"time_text_embed\.timestep_embedder\.linear_2\.(.+)", r"time_in.out_layer.\1"),
        (r"time_text_embed\.text_embedder\.linear_1\.(.+)", r"vector_in.in_layer.\1"),
        (r"time_text_embed\.text_embedder\.linear_2\.(.+)", r"vector_in.out_layer.\1"),
        (r"time_text_embed\.guidance_embedder\.linear_1\.(.+)", r"guidance_in.in_layer.\1"),
        (r"time_text_embed\.guidance_embedder\.linear_2\.(.+)", r"guidance_in.out_layer.\1"),
        (r"context_embedder\.(.+)", r"txt_in.\1"),
        (r"x_embedder\.(.+)", r"img_in.\1"),
        (r"proj_out\.(.+)", r"final_layer.linear.\1"),
        (r"norm_out\.linear\.(.+)", r"final_layer.adaLN_modulation.1.\1", None, _swap_halves),
        *_flux_block_rules(double, single),
    ]


def _flux_block_rules(double: str, single: str) -> list[Rule]:
    """Flux's double and single blocks in BFL names (Chroma's too, which lack the modulation layers)."""
    return [
        (rf"{double}\.norm1\.linear\.(.+)", r"double_blocks.\1.img_mod.lin.\2"),
        (rf"{double}\.norm1_context\.linear\.(.+)", r"double_blocks.\1.txt_mod.lin.\2"),
        (rf"{double}\.attn\.to_([qkv])\.(.+)", r"double_blocks.\1.img_attn.qkv.\3", _qkv(2)),
        (rf"{double}\.attn\.add_([qkv])_proj\.(.+)", r"double_blocks.\1.txt_attn.qkv.\3", _qkv(2)),
        (rf"{double}\.attn\.norm_q\.weight", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
        (rf"{double}\.attn\.norm_k\.weight", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
        (rf"{double}\.attn\.norm_added_q\.weight", r"double_blocks.\1.txt_attn.norm.query_norm.scale"),
        (rf"{double}\.attn\.norm_added_k\.weight", r"double_blocks.\1.txt_attn.norm.key_norm.scale"),
        (rf"{double}\.attn\.to_out\.0\.(.+)", r"double_blocks.\1.img_attn.proj.\2"),
        (rf"{double}\.attn\.to_add_out\.(.+)", r"double_blocks.\1.txt_attn.proj.\2"),
        (rf"{double}\.ff\.net\.0\.proj\.(.+)", r"double_blocks.\1.img_mlp.0.\2"),
        (rf"{double}\.ff\.net\.2\.(.+)", r"double_blocks.\1.img_mlp.2.\2"),
        (rf"{double}\.ff_context\.net\.0\.proj\.(.+)", r"double_blocks.\1.txt_mlp.0.\2"),
        (rf"{double}\.ff_context\.net\.2\.(.+)", r"double_blocks.\1.txt_mlp.2.\2"),
        (rf"{single}\.norm\.linear\.(.+)", r"single_blocks.\1.modulation.lin.\2"),
        # linear1 fuses q, k, v and the MLP's input projection, in that order.
        (rf"{single}\.attn\.to_([qkv])\.(.+)", r"single_blocks.\1.linear1.\3", _qkv(2, ("q", "k", "v", "mlp"))),
        (rf"{single}\.proj_mlp\.(.+)", r"single_blocks.\1.linear1.\2", (3, 4)),
        (rf"{single}\.attn\.norm_q\.weight", r"single_blocks.\1.norm.query_norm.scale"),
        (rf"{single}\.attn\.norm_k\.weight", r"single_blocks.\1.norm.key_norm.scale"),
        (rf"{single}\.proj_out\.(.+)", r"single_blocks.\1.linear2.\2"),
    ]


# ---------------------------------------------------------------------------------------------------
# Chroma: the inverse of convert_chroma_transformer_checkpoint_to_diffusers (Flux's blocks without their
# modulation layers, which Chroma's distilled guidance layer replaces)


def _chroma_rules(keys: list[str], config: Mapping) -> list[Rule]:
    approximator = r"distilled_guidance_layer"
    return [
        (rf"{approximator}\.(in_proj|out_proj)\.(.+)", r"distilled_guidance_layer.\1.\2"),
        (rf"{approximator}\.layers\.(\d+)\.linear_1\.(.+)", r"distilled_guidance_layer.layers.\1.in_layer.\2"),
        (rf"{approximator}\.layers\.(\d+)\.linear_2\.(.+)", r"distilled_guidance_layer.layers.\1.out_layer.\2"),
        (rf"{approximator}\.norms\.(\d+)\.weight", r"distilled_guidance_layer.norms.\1.scale"),
        (r"context_embedder\.(.+)", r"txt_in.\1"),
        (r"x_embedder\.(.+)", r"img_in.\1"),
        (r"proj_out\.(.+)", r"final_layer.linear.\1"),
        *_flux_block_rules(r"transformer_blocks\.(\d+)", r"single_transformer_blocks\.(\d+)"),
    ]


# ---------------------------------------------------------------------------------------------------
# Flux.2 ([dev] and [klein]): the inverse of convert_flux2_transformer_checkpoint_to_diffusers. One
# modulation serves all blocks, and diffusers keeps the single blocks' fused linear1 whole.

_QK_NORMS = {"q": "query_norm", "k": "key_norm"}


def _flux2_rules(keys: list[str], config: Mapping) -> list[Rule]:
    double = r"transformer_blocks\.(\d+)"
    single = r"single_transformer_blocks\.(\d+)"
    embedders = {"timestep": "time_in", "guidance": "guidance_in"}
    layers = {"1": "in_layer", "2": "out_layer"}
    modulations = r"(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)"
    return [
        (r"x_embedder\.(.+)", r"img_in.\1"),
        (r"context_embedder\.(.+)", r"txt_in.\1"),
        (
            r"time_guidance_embed\.(timestep|guidance)_embedder\.linear_([12])\.(.+)",
            lambda m: f"{embedders[m.group(1)]}.{layers[m.group(2)]}.{m.group(3)}",
        ),
        (rf"{modulations}\.linear\.(.+)", r"\1.lin.\2"),
        (r"proj_out\.(.+)", r"final_layer.linear.\1"),
        (r"norm_out\.linear\.weight", "final_layer.adaLN_modulation.1.weight", None, _swap_halves),
        (rf"{double}\.attn\.to_([qkv])\.(.+)", r"double_blocks.\1.img_attn.qkv.\3", _qkv(2)),
        (rf"{double}\.attn\.add_([qkv])_proj\.(.+)", r"double_blocks.\1.txt_attn.qkv.\3", _qkv(2)),
        (
            rf"{double}\.attn\.norm_([qk])\.weight",
            lambda m: f"double_blocks.{m.group(1)}.img_attn.norm.{_QK_NORMS[m.group(2)]}.scale",
        ),
        (
            rf"{double}\.attn\.norm_added_([qk])\.weight",
            lambda m: f"double_blocks.{m.group(1)}.txt_attn.norm.{_QK_NORMS[m.group(2)]}.scale",
        ),
        (rf"{double}\.attn\.to_out\.0\.(.+)", r"double_blocks.\1.img_attn.proj.\2"),
        (rf"{double}\.attn\.to_add_out\.(.+)", r"double_blocks.\1.txt_attn.proj.\2"),
        (rf"{double}\.ff\.linear_in\.(.+)", r"double_blocks.\1.img_mlp.0.\2"),
        (rf"{double}\.ff\.linear_out\.(.+)", r"double_blocks.\1.img_mlp.2.\2"),
        (rf"{double}\.ff_context\.linear_in\.(.+)", r"double_blocks.\1.txt_mlp.0.\2"),
        (rf"{double}\.ff_context\.linear_out\.(.+)", r"double_blocks.\1.txt_mlp.2.\2"),
        (rf"{single}\.attn\.to_qkv_mlp_proj\.(.+)", r"single_blocks.\1.linear1.\2"),
        (rf"{single}\.attn\.to_out\.(.+)", r"single_blocks.\1.linear2.\2"),
        (
            rf"{single}\.attn\.norm_([qk])\.weight",
            lambda m: f"single_blocks.{m.group(1)}.norm.{_QK_NORMS[m.group(2)]}.scale",
        ),
    ]


# ---------------------------------------------------------------------------------------------------
# Z-Image (Tongyi's names): the inverse of convert_z_image_transformer_checkpoint_to_diffusers, which reads
# only the embedder and final layer of Z-Image's own patch sizes (2x2 pixels, one frame: "2-1")


def _zimage_rules(keys: list[str], config: Mapping) -> list[Rule]:
    attention = r"(.+)\.attention"
    return [
        (r"all_x_embedder\.2-1\.(.+)", r"x_embedder.\1"),
        (r"all_final_layer\.2-1\.(.+)", r"final_layer.\1"),
        (rf"{attention}\.to_([qkv])\.weight", r"\1.attention.qkv.weight", _qkv(2)),
        (rf"{attention}\.to_out\.0\.(.+)", r"\1.attention.out.\2"),
        (rf"{attention}\.norm_([qk])\.weight", r"\1.attention.\2_norm.weight"),
        (r"(?!all_)(.+)", r"\1"),  # every other name is Tongyi's already
    ]


# ---------------------------------------------------------------------------------------------------
# Qwen-Image: the released transformer uses diffusers' names (diffusers reads the file as it is; ComfyUI
# maps the same names)


def _qwenimage_rules(keys: list[str], config: Mapping) -> list[Rule]:
    return [(r"(.+)", r"\1")]


# ---------------------------------------------------------------------------------------------------
# The layouts, per family: (component, rules, key prefix in the single file)

_RULES = {
    "unet": _unet_rules,
    "vae": _vae_rules,
    "clip": _clip_rules,
    "open_clip": _open_clip_rules,
    "sd3": _sd3_rules,
    "flux": _flux_rules,
    "chroma": _chroma_rules,
    "flux2": _flux2_rules,
    "zimage": _zimage_rules,
    "qwenimage": _qwenimage_rules,
}
# The rules of a denoiser transformer: a file of its family always holds it, bare-named or prefixed.
TRANSFORMER_RULES = ("sd3", "flux", "chroma", "flux2", "zimage", "qwenimage")

# family name -> (component, rules, key prefix in the single file); each family declares its own.
SINGLE_FILE_LAYOUTS: dict[str, tuple[tuple[str, str, str], ...]] = {
    name: family.single_file_layout for name, family in FAMILIES.items()
}


def single_file_components(family: str) -> tuple[str, ...]:
    """The pipeline components a single file of ``family`` holds."""
    if family not in SINGLE_FILE_LAYOUTS:
        raise ValueError(f"No single-file layout for family {family!r}; known: {', '.join(SINGLE_FILE_LAYOUTS)}")
    if not SINGLE_FILE_LAYOUTS[family]:
        raise ValueError(
            f"a {family} model cannot be merged into one single file: diffusers has no single-file converter for "
            "it, so nothing could read the file back; merge to a folder (--output DIR)"
        )
    return tuple(component for component, _, _ in SINGLE_FILE_LAYOUTS[family])


def original_layout(
    family: str, keys: Mapping[str, Iterable[str]], configs: Mapping[str, Mapping]
) -> list[OriginalTensor]:
    """The plan of ``family``'s single file: every tensor, built from the diffusers tensors ``keys``.

    ``keys`` maps each component of :func:`single_file_components` to its diffusers tensor names (as
    saved in the component's weight files); ``configs`` maps it to its ``config.json`` (the UNet's block
    layout and the VAE's block count decide names). Every diffusers tensor lands in exactly one tensor of
    the plan; a name without a rule is an error, never silently dropped.
    """
    single_file_components(family)
    plan: list[OriginalTensor] = []
    for component, kind, prefix in SINGLE_FILE_LAYOUTS[family]:
        if component not in keys:
            raise ValueError(f"A {family} single file needs the {component!r} component, which the model lacks")
        component_keys = sorted(keys[component])
        rules = [(re.compile(r[0]), *r[1:]) for r in _RULES[kind](component_keys, configs.get(component, {}))]
        parts: dict[str, dict[int, str]] = {}
        counts: dict[str, int] = {}
        transforms: dict[str, Transform | None] = {}
        for key in component_keys:
            target, part, transform = _apply_rules(rules, key, component)
            name = prefix + target
            index, count = part if part is not None else (0, 1)
            if index in parts.setdefault(name, {}) or counts.setdefault(name, count) != count:
                raise ValueError(f"{component}: {key!r} and {parts[name].get(index)!r} both map to {name!r}")
            parts[name][index] = key
            transforms[name] = transform
        for name in sorted(parts):
            if len(parts[name]) != counts[name]:
                raise ValueError(
                    f"{component}: {name!r} needs {counts[name]} tensors, found {sorted(parts[name].values())}"
                )
            sources = tuple((component, parts[name][i]) for i in range(counts[name]))
            plan.append(OriginalTensor(name, sources, transforms[name]))
    return plan


def _apply_rules(rules, key: str, component: str):
    for pattern, target, *rest in rules:
        match = pattern.fullmatch(key)
        if match is None:
            continue
        part = rest[0] if rest else None
        transform = rest[1] if len(rest) > 1 else None
        name = target(match) if callable(target) else match.expand(target)
        if callable(part):
            part = part(match)
        return name, part, transform
    raise ValueError(f"{component}: no single-file name for tensor {key!r}")


def to_original_state_dict(
    family: str, state_dicts: Mapping[str, Mapping[str, torch.Tensor]], configs: Mapping[str, Mapping]
) -> dict[str, torch.Tensor]:
    """In memory: the single-file state dict of ``family`` from per-component diffusers state dicts."""
    plan = original_layout(family, {c: list(sd) for c, sd in state_dicts.items()}, configs)
    return {t.name: t.build([state_dicts[c][k] for c, k in t.sources]) for t in plan}
