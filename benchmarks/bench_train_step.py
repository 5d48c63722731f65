"""Training-step cost of MoSLoRA against its peers, side by side: PEFT LoRA (diffusers' default route),
the naive three-matmul MoSLoRA and a LyCORIS LoCon network, all at the same rank on the same layers
(the attention projections: to_q, to_k, to_v, to_out.0, and on SD3 also add_q/k/v_proj, to_add_out).
Optional: ``moslora_fold`` (MoSLoRA's earlier forward, M folded into A on every call) and
``lycoris_locon_bypass`` (LoCon computing B(A x) instead of rebuilding the delta weight).

One process builds ONE model (random weights) and puts every contender on it: the PEFT LoRA and
MoSLoRA adapters live on the same layers under their own adapter names (one active at a time), and the
LyCORIS network wraps the bare linears while the PEFT layers are taken out. Full training steps
(forward, backward, AdamW step over the active method's parameters) are timed interleaved round by
round, so drift on a shared machine hits every method alike; wall-clock and process CPU time are kept.

Memory is measured twice: the bytes autograd saves for backward (in-process, exact: unique storages,
parameters excluded), and peak memory. On the CPU that is the resident high-water mark of a fresh
subprocess per method that builds the model with that method alone and runs two steps (reset after
the build); "over model" subtracts the built model's resident size. On a GPU it is the allocator's
peak over two steps, in-process.

    python benchmarks/bench_train_step.py --model sd15 --ranks 4 16 64
    python benchmarks/bench_train_step.py --model sdxl --ranks 4 16 64
    python benchmarks/bench_train_step.py --model sd3 --ranks 4 16 64
    python benchmarks/bench_train_step.py --model sd3 --depth 24 --resolution 1024 --device cuda --dtype bf16
    python benchmarks/bench_train_step.py --model flux2 --ranks 16 --methods peft_lora moslora

The newer families (chroma, zimage, qwenimage, flux2_klein, flux2) are small shapes of the real models: head
width 128 as released, fewer heads (``--heads``, default 8: width 1024) and blocks, the real text width, and
the step is the trainer's own (``Family.predict``: packing, ids, masks and time conventions as in training),
adapted with the family's "attention" preset.

Prints a markdown table: step time min / median / max, ratios to PEFT LoRA, and memory.
See docs/performance.md for the measured tables.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import (
    ChromaTransformer2DModel,
    Flux2Transformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    ZImageTransformer2DModel,
)
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import Method, markdown_header, markdown_row, peft_layers_removed, summarize, time_interleaved
from moslora_diffusion import MoSLoRAConfig, add_moslora, moslora_layers
from moslora_diffusion.families import get_family
from moslora_diffusion.layer import MoSLoRAVariant, fold_mixer_into_lora_a
from moslora_diffusion.targets import PRESETS, resolve_target_modules

REPO = Path(__file__).resolve().parents[1]
# Several adapters on one model is the point here.
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
METHODS = ("peft_lora", "moslora", "moslora_naive", "lycoris_locon")
OPTIONAL_METHODS = ("moslora_fold", "moslora_v1", "lycoris_locon_bypass")


class NaiveMoSLoRAVariant(MoSLoRAVariant):
    """The textbook formulation: B(M(A x)), an r x r matmul per token."""

    @staticmethod
    def forward(module, active_adapter, x, result, **kwargs):
        x = module.lora_dropout[active_adapter](x)
        mixed = module.lora_mixer[active_adapter](module.lora_A[active_adapter](x))
        return result + module.lora_B[active_adapter](mixed) * module.scaling[active_adapter]


class FoldingMoSLoRAVariant(MoSLoRAVariant):
    """The library's forward before it chose the cheaper order: M folded into A on every call."""

    @staticmethod
    def forward(module, active_adapter, x, result, **kwargs):
        lora_a = module.lora_A[active_adapter]
        folded_a = fold_mixer_into_lora_a(lora_a.weight, module.lora_mixer[active_adapter].weight)
        down = F.linear(module.lora_dropout[active_adapter](x), folded_a)
        return result + module.lora_B[active_adapter](down) * module.scaling[active_adapter]


class PerCallOrderMoSLoRAVariant(MoSLoRAVariant):
    """The library's forward of sessions 1-2 (2026-11-29/30), verbatim: the cheaper of per-token mixing and
    folding into A, then PEFT LoRA's tail (B as a module call, times s, plus the result): five operators."""

    @staticmethod
    def forward(module, active_adapter, x, result, **kwargs):
        lora_a = module.lora_A[active_adapter]
        mixer = module.lora_mixer[active_adapter].weight
        x = module.lora_dropout[active_adapter](x)
        if x.numel() < x.shape[-1] * lora_a.in_features:
            down = F.linear(F.linear(x, lora_a.weight), mixer)
        else:
            down = F.linear(x, mixer @ lora_a.weight)
        return result + module.lora_B[active_adapter](down) * module.scaling[active_adapter]


# MoSLoRA adapters whose forward is replaced by another formulation of the same maths.
VARIANTS = {
    "moslora_naive": NaiveMoSLoRAVariant,
    "moslora_fold": FoldingMoSLoRAVariant,
    "moslora_v1": PerCallOrderMoSLoRAVariant,
}

# ---------------------------------------------------------------------------------------------------
# Models: real widths, random weights; depth reduced where CPU time or memory demands (see `describe`).


def _sample(model: nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs).sample


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[..., nn.Module]  # (depth, transformer_depth[, heads]) -> model
    inputs: Callable[[int, int, torch.Generator], dict]  # (batch, latent side, generator) -> forward kwargs
    targets: list[str] | str  # module names, or a preset name resolved against the built model
    depth: int  # the default (reduced for CPU time); the real model's is in the builder's docstring
    transformer_depth: int | None
    resolution: int
    batch: int
    describe: Callable[..., str]  # (depth, transformer_depth[, heads]) -> str
    forward: Callable[[nn.Module, dict], torch.Tensor] = _sample  # (model, inputs) -> prediction
    heads: int | None = None  # attention heads, for the shapes that reduce them


def sd15_unet(depth: int, transformer_depth: int | None = None) -> UNet2DConditionModel:
    """SD1.5's UNet (cross-attention 768, 8 heads) with ``depth`` layers per block (SD1.5: 2, 860M parameters)."""
    return UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, layers_per_block=depth, sample_size=64)


def sd15_inputs(batch: int, latent: int, gen: torch.Generator) -> dict:
    return {
        "sample": torch.randn(batch, 4, latent, latent, generator=gen),
        "timestep": torch.randint(0, 1000, (batch,), generator=gen),
        "encoder_hidden_states": torch.randn(batch, 77, 768, generator=gen),
    }


def sdxl_unet(depth: int, transformer_depth: int | None = 10) -> UNet2DConditionModel:
    """SDXL's UNet config (widths 320/640/1280, heads of 64, cross-attention 2048, text-time embedding)
    with ``depth`` layers per block and ``transformer_depth`` transformer layers per block at the 1280
    level (SDXL: 2 and 10, 2.57B parameters)."""
    return UNet2DConditionModel(
        sample_size=128,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=depth,
        transformer_layers_per_block=(1, 2, transformer_depth),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


def sdxl_inputs(batch: int, latent: int, gen: torch.Generator) -> dict:
    return {
        "sample": torch.randn(batch, 4, latent, latent, generator=gen),
        "timestep": torch.randint(0, 1000, (batch,), generator=gen),
        "encoder_hidden_states": torch.randn(batch, 77, 2048, generator=gen),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, 1280, generator=gen),
            "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]).repeat(batch, 1),
        },
    }


def sd3_transformer(depth: int, transformer_depth: int | None = None) -> SD3Transformer2DModel:
    """SD3-medium's MMDiT widths (24 heads of 64, joint attention 4096 -> 1536, pooled 2048, patch 2)
    with ``depth`` joint blocks (SD3-medium: 24, 2.0B parameters)."""
    return SD3Transformer2DModel(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=depth,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=192,
    )


def sd3_inputs(batch: int, latent: int, gen: torch.Generator) -> dict:
    return {
        "hidden_states": torch.randn(batch, 16, latent, latent, generator=gen),
        "timestep": torch.rand(batch, generator=gen) * 1000,
        # 77 CLIP tokens + 256 T5 tokens, as SD3's pipeline feeds them
        "encoder_hidden_states": torch.randn(batch, 333, 4096, generator=gen),
        "pooled_projections": torch.randn(batch, 2048, generator=gen),
    }


def _reduced(actual: int, real: int) -> str:
    return "" if actual == real else f" (real: {real})"


# ---------------------------------------------------------------------------------------------------
# The newer families: their transformers at the released head width (128) with fewer heads and blocks, fed
# as the trainer feeds them (Family.predict) with random latents of the family's VAE and random text states.


def _family_forward(family: str, guidance_scale: float = 1.0):
    def forward(model: nn.Module, inputs: dict) -> torch.Tensor:
        return get_family(family).predict(
            model, inputs["latents"], inputs["timesteps"], inputs["conditioning"], {}, guidance_scale=guidance_scale
        )

    return forward


def _family_inputs(channels: int, text_width: int, text_tokens: int, mask: bool, patches: int = 1):
    """Latents (B, channels * patches^2, side / patches, side / patches), flow-matching timesteps, and
    ``text_tokens`` random text states of ``text_width`` (with an all-ones mask where the family reads one)."""

    def inputs(batch: int, latent: int, gen: torch.Generator) -> dict:
        conditioning = {"prompt_embeds": torch.randn(batch, text_tokens, text_width, generator=gen)}
        if mask:
            conditioning["prompt_attention_mask"] = torch.ones(batch, text_tokens)
        side = latent // patches
        return {
            "latents": torch.randn(batch, channels * patches * patches, side, side, generator=gen),
            "timesteps": torch.rand(batch, generator=gen) * 1000,
            "conditioning": conditioning,
        }

    return inputs


def chroma_transformer(depth: int, transformer_depth: int | None = 2, heads: int = 8) -> ChromaTransformer2DModel:
    """Chroma1-HD's transformer (T5 width 4096, 24 heads of 128, 19 double and 38 single blocks, a 5-layer
    guidance approximator 5120 wide) with ``heads`` heads, ``depth`` double and ``transformer_depth`` single
    blocks, and an approximator as wide as the model."""
    return ChromaTransformer2DModel(
        num_layers=depth,
        num_single_layers=transformer_depth,
        num_attention_heads=heads,
        approximator_hidden_dim=heads * 128,
    )


def zimage_transformer(depth: int, transformer_depth: int | None = 1, heads: int = 8) -> ZImageTransformer2DModel:
    """Z-Image's transformer (30 heads of 128, 30 layers, 2 noise and 2 context refiner layers, Qwen3-4B text
    width 2560) with ``heads`` heads, ``depth`` layers and ``transformer_depth`` refiner layers of each kind."""
    return ZImageTransformer2DModel(
        dim=heads * 128, n_heads=heads, n_kv_heads=heads, n_layers=depth, n_refiner_layers=transformer_depth
    )


def qwenimage_transformer(depth: int, transformer_depth: int | None = None, heads: int = 8):
    """Qwen-Image's MMDiT (24 heads of 128, 60 blocks, Qwen2.5-VL text width 3584) with ``heads`` heads and
    ``depth`` blocks."""
    return QwenImageTransformer2DModel(num_layers=depth, num_attention_heads=heads)


def flux2_transformer(depth: int, transformer_depth: int | None = 2, heads: int = 8, klein: bool = False):
    """FLUX.2 [dev]'s transformer (48 heads of 128, 8 double and 48 single blocks, Mistral text width 3 x 5120,
    a guidance input) with ``heads`` heads, ``depth`` double and ``transformer_depth`` single blocks; ``klein``:
    no guidance input and Qwen3-4B's text width (3 x 2560)."""
    return Flux2Transformer2DModel(
        num_layers=depth,
        num_single_layers=transformer_depth,
        num_attention_heads=heads,
        joint_attention_dim=3 * 2560 if klein else 3 * 5120,
        guidance_embeds=not klein,
    )


def _small(name: str, depth_words: str, real: str):
    def describe(depth: int, transformer_depth: int | None, heads: int) -> str:
        blocks = depth_words.format(depth=depth, transformer_depth=transformer_depth)
        return f"{name}-shaped transformer, {heads} heads of 128 ({heads * 128} wide), {blocks} (real: {real})"

    return describe


# Defaults are the CPU-sized configurations documented in docs/performance.md.
MODELS: dict[str, ModelSpec] = {
    "sd15": ModelSpec(
        sd15_unet,
        sd15_inputs,
        PRESETS["unet"]["attention"],
        1,
        None,
        128,
        1,
        lambda d, t: f"SD1.5-shaped UNet, layers_per_block={d}{_reduced(d, 2)}",
    ),
    "sdxl": ModelSpec(
        sdxl_unet,
        sdxl_inputs,
        PRESETS["unet"]["attention"],
        1,
        2,
        128,
        1,
        lambda d, t: (
            f"SDXL-shaped UNet, layers_per_block={d}{_reduced(d, 2)}, "
            f"transformer_layers_per_block=(1, 2, {t}){_reduced(t, 10)}"
        ),
    ),
    "sd3": ModelSpec(
        sd3_transformer,
        sd3_inputs,
        PRESETS["sd3_transformer"]["attention"],
        2,
        None,
        256,
        1,
        lambda d, t: f"SD3-medium-shaped transformer, {d} joint blocks{_reduced(d, 24)}",
    ),
    "chroma": ModelSpec(
        chroma_transformer,
        _family_inputs(16, 4096, 256, mask=True),
        "attention",
        1,
        2,
        256,
        1,
        _small("Chroma", "{depth} double + {transformer_depth} single blocks", "24 heads, 19 + 38 blocks"),
        _family_forward("chroma"),
        8,
    ),
    "zimage": ModelSpec(
        zimage_transformer,
        _family_inputs(16, 2560, 256, mask=True),
        "attention",
        2,
        1,
        256,
        1,
        _small("Z-Image", "{depth} layers + {transformer_depth} refiner layer(s) each", "30 heads, 30 + 2 layers"),
        _family_forward("zimage"),
        8,
    ),
    "qwenimage": ModelSpec(
        qwenimage_transformer,
        _family_inputs(16, 3584, 256, mask=True),
        "attention",
        2,
        None,
        256,
        1,
        _small("Qwen-Image", "{depth} blocks", "24 heads, 60 blocks"),
        _family_forward("qwenimage"),
        8,
    ),
    "flux2_klein": ModelSpec(
        lambda d, t=2, heads=8: flux2_transformer(d, t, heads, klein=True),
        _family_inputs(32, 3 * 2560, 256, mask=False, patches=2),
        "attention",
        1,
        2,
        256,
        1,
        _small("FLUX.2 [klein]", "{depth} double + {transformer_depth} single blocks", "4B: 24 heads, 5 + 20 blocks"),
        _family_forward("flux2_klein"),
        8,
    ),
    "flux2": ModelSpec(
        flux2_transformer,
        _family_inputs(32, 3 * 5120, 256, mask=False, patches=2),
        "attention",
        1,
        2,
        256,
        1,
        _small("FLUX.2 [dev]", "{depth} double + {transformer_depth} single blocks", "48 heads, 8 + 48 blocks"),
        _family_forward("flux2", guidance_scale=3.5),
        8,
    ),
}


@dataclass(frozen=True)
class Setup:
    """Everything that fixes the measured workload."""

    model: str
    depth: int
    transformer_depth: int | None
    batch: int
    resolution: int
    device: str = "cpu"
    dtype: str = "fp32"
    heads: int | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]

    @property
    def spec(self) -> ModelSpec:
        return MODELS[self.model]

    @property
    def shape(self) -> tuple:
        """The builder's and describer's arguments: depths, and heads where the shape reduces them."""
        return (self.depth, self.transformer_depth) + ((self.heads,) if self.heads is not None else ())

    def describe(self) -> str:
        return (
            f"{self.spec.describe(*self.shape)}, random weights; {self.resolution} px "
            f"({self.resolution // 8}^2 latents), batch {self.batch}, {self.dtype} on {self.device}"
        )


def build_model(setup: Setup, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with torch.device(setup.device):
        model = setup.spec.build(*setup.shape)
    model.requires_grad_(False)
    return model if setup.dtype == "fp32" else model.to(setup.torch_dtype)


def model_inputs(setup: Setup) -> tuple[dict, torch.Tensor]:
    """Forward kwargs and a regression target, on the setup's device and (floats) in its dtype."""
    gen = torch.Generator().manual_seed(1)
    inputs = setup.spec.inputs(setup.batch, setup.resolution // 8, gen)

    def move(x):
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        return x.to(setup.device, setup.torch_dtype if x.is_floating_point() else x.dtype)

    inputs = move(inputs)
    latents = inputs.get("sample", inputs.get("hidden_states", inputs.get("latents")))
    return inputs, torch.randn(latents.shape, generator=gen).to(latents)


def synchronize(setup: Setup) -> None:
    if setup.device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------
# Contenders


def add_peft_method(model: nn.Module, method: str, rank: int, targets: list[str]) -> None:
    """Add ``method``'s adapter to ``model`` under the adapter name ``method``."""
    common = dict(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights="gaussian")
    if method == "peft_lora":
        if hasattr(model, "add_adapter"):  # diffusers' route
            model.add_adapter(LoraConfig(**common), adapter_name=method)
        else:
            inject_adapter_in_model(LoraConfig(**common), model, adapter_name=method)
        return
    add_moslora(model, MoSLoRAConfig(**common), adapter_name=method)
    if method in VARIANTS:
        for _, layer in moslora_layers(model):
            if method in layer.lora_variant:
                layer.lora_variant[method] = VARIANTS[method]()


_LYCORIS_PRESET_KEYS = (
    "ENABLE_CONV",
    "TARGET_REPLACE_MODULE",
    "TARGET_REPLACE_NAME",
    "MODULE_ALGO_MAP",
    "NAME_ALGO_MAP",
    "USE_FNMATCH",
    "TARGET_EXCLUDE_NAME",
)


def lycoris_locon_network(model: nn.Module, rank: int, targets: list[str], bypass: bool = False):
    """A LyCORIS LoCon network (rank ``rank``, alpha = rank, as ours) on the linears named ``targets``.

    Built as ``lycoris.create_lycoris(model, 1.0, linear_dim=r, linear_alpha=r, algo="locon")`` builds it,
    except that the module selection is a name preset (LycorisNetwork.apply_preset's ``target_name``)
    instead of the "full" preset, so that LoCon adapts exactly the layers the other methods adapt.
    ``bypass=False`` is LyCORIS' default: each forward rebuilds the full-size delta weight (B A) and
    applies it; ``bypass=True`` computes B(A x) like LoRA.
    """
    from lycoris import LycorisNetwork

    logging.getLogger("LyCORIS").setLevel(logging.WARNING)  # it narrates every network it builds
    pattern = r"(.*\.)?(" + "|".join(re.escape(t) for t in targets) + r")$"
    saved = {k: getattr(LycorisNetwork, k) for k in _LYCORIS_PRESET_KEYS}
    LycorisNetwork.apply_preset(
        {
            "enable_conv": False,
            "target_module": [],
            "target_name": [pattern],
            "module_algo_map": {},
            "name_algo_map": {},
            "use_fnmatch": False,
            "exclude_name": [],
        }
    )
    try:
        network = LycorisNetwork(
            model,
            multiplier=1.0,
            lora_dim=rank,
            conv_lora_dim=0,
            alpha=rank,
            network_module="locon",
            bypass_mode=bypass,
            warn_on_unmatched=True,
        )
    finally:
        for k, v in saved.items():
            setattr(LycorisNetwork, k, v)
    wanted = sum(1 for name, m in model.named_modules() if isinstance(m, nn.Linear) and re.match(pattern, name))
    if len(network.loras) != wanted or wanted == 0:
        raise RuntimeError(f"LyCORIS adapted {len(network.loras)} modules, expected {wanted}")
    return network


def make_step(setup: Setup, model: nn.Module, params: list[nn.Parameter], inputs: dict, target: torch.Tensor):
    """One training step: forward, MSE loss, backward, AdamW step over ``params``."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = F.mse_loss(setup.spec.forward(model, inputs).float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(setup)

    return step


def add_method(setup: Setup, model: nn.Module, method: str, rank: int):
    """Put ``method`` on ``model``; returns its LyCORIS network (applied later) or None for PEFT methods."""
    targets = resolve_target_modules(model, setup.spec.targets)
    if method.startswith("lycoris"):
        network = lycoris_locon_network(model, rank, targets, bypass=method.endswith("bypass"))
        for lora in network.loras:  # in the model's dtype, as diffusers' add_adapter leaves PEFT's adapters
            lora.to(device=setup.device, dtype=setup.torch_dtype)
        return network
    add_peft_method(model, method, rank, targets)
    return None


def shared_model_methods(setup: Setup, methods: list[str], rank: int):
    """One model carrying every contender; returns (model, inputs, [Method]) whose ``run`` is a training step."""
    model = build_model(setup)
    inputs, target = model_inputs(setup)
    networks = {}
    for method in methods:
        with peft_layers_removed(model) if method.startswith("lycoris") else contextlib.nullcontext():
            networks[method] = add_method(setup, model, method, rank)  # LyCORIS wraps the bare linears
    model.train()
    contenders = []
    for method in methods:
        network = networks[method]
        if network is None:
            model.set_adapter(method)
            params = [p for p in model.parameters() if p.requires_grad]
            enter, exit_ = (lambda method=method: model.set_adapter(method)), (lambda: None)
        else:
            params = [p for lora in network.loras for p in lora.parameters()]  # registered on apply_to
            removed = []

            def enter(network=network, removed=removed):
                removed.append(peft_layers_removed(model))
                removed[-1].__enter__()
                network.apply_to()

            def exit_(network=network, removed=removed):
                network.restore()
                removed.pop().__exit__(None, None, None)

        step = make_step(setup, model, params, inputs, target)
        contenders.append(Method(method, step, enter, exit_, {"params": params}))
    return model, inputs, contenders


# ---------------------------------------------------------------------------------------------------
# Memory


def saved_activation_bytes(setup: Setup, model: nn.Module, inputs: dict, exclude: list[nn.Parameter]) -> int:
    """Bytes autograd keeps for backward in one forward: unique storages, parameters (the model's and
    the adapter's own) not counted, so what remains is activations and per-step intermediates."""
    excluded = {p.untyped_storage().data_ptr() for p in list(model.parameters()) + list(exclude)}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        setup.spec.forward(model, inputs).float().mean().backward()
    model.zero_grad(set_to_none=True)
    for p in exclude:
        p.grad = None
    return sum(seen.values())


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def rss_child(setup: Setup, method: str, rank: int) -> None:
    """Run in a fresh process: build the model with ``method`` alone and run two training steps.

    Prints the resident high-water mark of the steps (reset after the build, so that transients of
    model construction do not count) and the resident size of the built model, in MiB.
    """
    model = build_model(setup)
    network = add_method(setup, model, method, rank)
    if network is None:
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        network.apply_to()
        params = list(network.parameters())
    model.train()
    inputs, target = model_inputs(setup)
    step = make_step(setup, model, params, inputs, target)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark (Linux)
    model_kib = _status_kib("VmRSS")
    step()
    step()
    print(json.dumps({"peak": _status_kib("VmHWM") / 1024, "model": model_kib / 1024}))


def peak_rss_mib(setup: Setup, method: str, rank: int) -> dict:
    code = f"import benchmarks.bench_train_step as b; b.rss_child(b.{setup!r}, {method!r}, {rank})"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=REPO, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cuda_peak_mib(method: Method) -> dict:
    """On a GPU, in-process: the allocator's peak over two steps, and what was allocated before them."""
    with method.active():
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        method.run()
        method.run()
        return {"peak": torch.cuda.max_memory_allocated() / 2**20, "model": before / 2**20}


# ---------------------------------------------------------------------------------------------------


def _targets_text(targets: list[str] | str) -> str:
    return f"the family's {targets!r} preset" if isinstance(targets, str) else ", ".join(targets)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="sd15")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16])
    parser.add_argument(
        "--resolution", type=int, default=None, help="pixels; latents are resolution/8 (default per model)"
    )
    parser.add_argument("--batch", type=int, default=None, help="default per model")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument(
        "--depth",
        type=int,
        default=None,
        help="sd15, sdxl: layers per UNet block (real: 2; default 1); sd3: joint transformer blocks (SD3-medium: "
        "24; default 2); chroma, flux2, flux2_klein: double blocks (default 1); zimage: layers, qwenimage: blocks "
        "(default 2)",
    )
    parser.add_argument(
        "--transformer-depth",
        type=int,
        default=None,
        help="sdxl: transformer layers per block at the 1280 level (SDXL: 10; default 2); chroma, flux2, "
        "flux2_klein: single blocks (default 2); zimage: refiner layers of each kind (default 1)",
    )
    parser.add_argument(
        "--heads", type=int, default=None, help="the newer families: attention heads of 128 (default 8)"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=METHODS + OPTIONAL_METHODS,
        help="peft_lora is always measured (it is the reference)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="the base model's dtype")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); 1 avoids thread wake-ups on a crowded machine",
    )
    parser.add_argument(
        "--no-rss", action="store_true", help="skip the memory measurement (CPU: one subprocess per method)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write raw times and memory here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = MODELS[args.model]
    setup = Setup(
        model=args.model,
        depth=spec.depth if args.depth is None else args.depth,
        transformer_depth=spec.transformer_depth if args.transformer_depth is None else args.transformer_depth,
        batch=args.batch or spec.batch,
        resolution=args.resolution or spec.resolution,
        device=args.device,
        dtype=args.dtype,
        heads=args.heads or spec.heads,
    )
    methods = ["peft_lora"] + [m for m in args.methods if m != "peft_lora"]
    on_cuda = setup.device.startswith("cuda")
    memory_kind = "allocator peak (torch.cuda)" if on_cuda else "resident high-water mark of a fresh process"

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {setup.describe()}; {args.rounds} "
        f"interleaved rounds; adapted: {_targets_text(spec.targets)}; memory: {memory_kind}\n",
        flush=True,
    )
    header = [
        "r",
        "method",
        "step min (s)",
        "median (s)",
        "max (s)",
        "time x PEFT LoRA",
        "CPU time x PEFT LoRA",
        "saved act. (MiB)",
        "x PEFT LoRA",
        "peak mem. (MiB)",
        "x PEFT LoRA",
        "mem. over model (MiB)",
        "x PEFT LoRA",
    ]
    print(markdown_header(header), flush=True)
    raw = []
    for rank in args.ranks:
        model, inputs, contenders = shared_model_methods(setup, methods, rank)
        saved = {}
        for method in contenders:
            with method.active():
                saved[method.name] = saved_activation_bytes(setup, model, inputs, method.notes["params"]) / 2**20
        times, cpu_times = time_interleaved(contenders, args.rounds)
        memory = {m.name: cuda_peak_mib(m) for m in contenders} if on_cuda and not args.no_rss else {}
        del model, inputs, contenders
        gc.collect()
        if not on_cuda:
            memory = {
                m: ({"peak": float("nan"), "model": float("nan")} if args.no_rss else peak_rss_mib(setup, m, rank))
                for m in methods
            }
        elif args.no_rss:
            memory = {m: {"peak": float("nan"), "model": float("nan")} for m in methods}
        stats, cpu_stats = summarize(times, "peft_lora"), summarize(cpu_times, "peft_lora")
        ref = memory["peft_lora"]
        for m in methods:
            s, peak, grow = stats[m], memory[m]["peak"], memory[m]["peak"] - memory[m]["model"]
            print(
                markdown_row(
                    [
                        str(rank),
                        m,
                        f"{s['min']:.3f}",
                        f"{s['median']:.3f}",
                        f"{s['max']:.3f}",
                        f"{s['ratio']:.3f}",
                        f"{cpu_stats[m]['ratio']:.3f}",
                        f"{saved[m]:.1f}",
                        f"{saved[m] / saved['peft_lora']:.3f}",
                        f"{peak:.0f}",
                        f"{peak / ref['peak']:.3f}",
                        f"{grow:.0f}",
                        f"{grow / (ref['peak'] - ref['model']):.3f}",
                    ]
                ),
                flush=True,
            )
        raw.append({"rank": rank, "times": times, "cpu_times": cpu_times, "saved_mib": saved, "memory_mib": memory})
        if args.json:  # after every rank, so that an interrupted run keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(
                json.dumps(
                    {
                        "argv": sys.argv[1:],
                        "setup": setup.__dict__,
                        "torch": torch.__version__,
                        "threads": torch.get_num_threads(),
                        "runs": raw,
                    },
                    indent=1,
                )
            )


if __name__ == "__main__":
    main()
