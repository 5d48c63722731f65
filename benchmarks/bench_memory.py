"""Peak memory and step time of a MoSLoRA training step with the frozen base in fp32 / bf16 and quantized
(torchao int8, optimum-quanto fp8, GGUF Q4_0 / Q8_0 blocks as a .gguf base loads, and on CUDA bitsandbytes
int8 / nf4), on SDXL- and Flux-shaped models at full width and reduced depth, projected to full depth and
1024 px: what fits in 12, 16 and 24 GB. Each run also records its losses and whether the adapter stayed finite.

Each (model, base, depth) runs in a fresh subprocess (``--worker``):

1. build the model at full width and the given depth (random weights, built directly in the base dtype),
   quantize its linear layers in place, release freed memory to the OS (malloc_trim);
   weights = resident size after - before (CPU: psutil RSS; CUDA: allocated bytes).
2. add MoSLoRA r = 16 on the attention projections, gradient checkpointing on, AdamW over the adapter;
   reset the resident high-water mark (/proc/self/clear_refs; CUDA: reset_peak_memory_stats), run two
   steps (the first creates AdamW's state; --steps), time the last; step peak = high-water mark - weights.
   Embeddings are random tensors of the cached shapes: no text encoder or VAE is loaded (cached embeddings).

Projection (stated in the output): three runs per (model, base): two depths at the measured resolution,
and the smaller depth at twice that resolution. Weights and the step's fixed part (adapter, gradients,
AdamW state, per-block temporaries) are linear in the number of repeated blocks: full depth = measured +
slope x (blocks missing). Activations under gradient checkpointing grow with the tokens: the step peak's
growth per token (from the two resolutions) x the tokens at 1024 px, plus the block inputs that
checkpointing keeps for every block (tokens x width x 2 bytes x blocks, computed: Flux 1.6 GB at 1024 px).
Linear in tokens holds on CUDA (memory-efficient attention keeps no tokens^2 matrix). The CUDA context
(~0.5 GB, added in the fit columns) and allocator fragmentation are not in the CPU figures.

    python benchmarks/bench_memory.py --resolution 64 --steps 1   # the first rows of results/memory_cpu.md (~15 min)
    python benchmarks/bench_memory.py --resolution 64 --steps 1 --cache benchmarks/results/memory_cpu_runs.json \
        --bases bf16 int8-torchao fp8-quanto int8-quanto q8_0-gguf q4_0-gguf q8_0-gguf_stock q4_0-gguf_stock
    python benchmarks/bench_memory.py --device cuda --resolution 1024 --bases bf16 int8-bnb nf4-bnb
    python benchmarks/bench_memory.py --device cuda --models flux --resolution 512 --bases bf16 nf4-bnb q4_0-gguf

Writes benchmarks/results/memory_<device>.md and .json.

``--encoders`` measures instead what leaves the accelerator once every caption's embedding and every latent is
cached (moslora_diffusion/training/offload.py): the full-size frozen text encoders and VAE of SDXL (CLIP-L,
CLIP-bigG in bf16, the VAE in fp32) and Flux (CLIP-L, T5-XXL in bf16, the VAE in bf16), built from their
configs in a fresh process per family (on 'meta', then materialised, tied weights tied again, and every weight
written, so each page is resident; the values do not change the memory). Measured: the resident size each component adds, and what
moving them all off (to 'meta') gives back; projected: parameters x bytes per parameter. A family is skipped
with a note when the machine has too little free memory.

    python benchmarks/bench_memory.py --encoders   # 2 min; writes benchmarks/results/memory_encoders_cpu.md, .json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
RANK = 16
GB = 1024**3
# GGUF: "-gguf" as the trainer loads a .gguf base (dequantized again in the backward, nothing kept),
# "-gguf_stock" diffusers' GGUFLinear unchanged (autograd keeps every layer's dequantized weight for the backward).
BASES = ("fp32", "bf16", "int8-torchao", "fp8-quanto", "int8-quanto", "int8-bnb", "nf4-bnb", "q4_0-gguf", "q8_0-gguf",
         "q4_0-gguf_stock", "q8_0-gguf_stock")  # fmt: skip
CPU_BASES = ("fp32", "bf16", "int8-torchao", "fp8-quanto")


@dataclass(frozen=True)
class Shape:
    """A model family at full width: how its depth is reduced and what the real depth is."""

    depths: tuple[int, int]  # the two measured depths, in repeated units
    full_depth: int  # the real model's units
    unit: str  # what one unit is
    text_tokens: int  # cached text embedding length (real model)
    patch: int  # latent pixels per image token side (x 8 VAE)
    kept_per_token: int  # bytes gradient checkpointing keeps per token at full depth: blocks x width x 2 (bf16)


SHAPES = {
    # SDXL: transformer layers per block at the 1280 level (real: 10); widths, heads, the rest as released.
    # (SDXL's checkpointed inputs: its 1280-level layers see 1/16 of the latent's tokens: < 0.2 GB, left out.)
    "sdxl": Shape((1, 2), 10, "transformer layer per 1280-level block (5 blocks)", 77, 1, 0),
    # Flux: 1 double-stream + 2 single-stream blocks (real: 19 + 38).
    "flux": Shape((1, 2), 19, "1 double-stream + 2 single-stream blocks", 512, 2, 57 * 3072 * 2),
}


def build(model: str, units: int) -> torch.nn.Module:
    if model == "sdxl":
        from benchmarks.bench_train_step import sdxl_unet

        return sdxl_unet(2, units)
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=units, num_single_layers=2 * units, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )  # fmt: skip


def inputs(model: str, resolution: int, text_tokens: int, dtype, device) -> tuple[dict, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    latent = resolution // 8
    if model == "sdxl":
        from benchmarks.bench_train_step import sdxl_inputs

        kwargs = sdxl_inputs(1, latent, gen)
        target = torch.randn(1, 4, latent, latent, generator=gen)
    else:
        img = (latent // 2) ** 2
        kwargs = {
            "hidden_states": torch.randn(1, img, 64, generator=gen),
            "encoder_hidden_states": torch.randn(1, text_tokens, 4096, generator=gen),
            "pooled_projections": torch.randn(1, 768, generator=gen),
            "timestep": torch.rand(1, generator=gen),
            "img_ids": torch.zeros(img, 3),
            "txt_ids": torch.zeros(text_tokens, 3),
            "guidance": torch.full((1,), 3.5),
        }
        target = torch.randn(1, img, 64, generator=gen)

    def move(x):
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        return x.to(device, dtype if x.is_floating_point() else x.dtype)

    return move(kwargs), target.to(device, dtype)


def quantize(model: torch.nn.Module, base: str) -> None:
    kind, _, backend = base.partition("-")
    if backend == "torchao":
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig())
    elif backend == "quanto":
        from optimum import quanto

        quanto.quantize(model, weights=quanto.qint8 if kind == "int8" else quanto.qfloat8)
        quanto.freeze(model)
        from moslora_diffusion.training.quantization import contiguous_quanto_inputs

        contiguous_quanto_inputs(model)  # as the trainer does: quanto's bf16 int8 CPU kernel needs them
    elif backend == "bnb":
        _replace_with_bnb(model, kind)
    elif backend in ("gguf", "gguf_stock"):
        _replace_with_gguf(model, kind)
        if backend == "gguf":
            from moslora_diffusion.gguf_bases import dequantize_again_in_backward

            dequantize_again_in_backward(model)  # as the trainer loads a .gguf base


def _replace_with_bnb(model: torch.nn.Module, kind: str) -> None:
    """Every nn.Linear as a bitsandbytes layer on the GPU (moving it there quantizes it)."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            if kind == "int8":
                layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, child.bias is not None,
                                            has_fp16_weights=False)  # fmt: skip
            else:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, child.bias is not None,
                                          compute_dtype=torch.bfloat16, quant_type="nf4")  # fmt: skip
            layer.load_state_dict(child.state_dict())
            setattr(module, child_name, layer.to("cuda"))


def _replace_with_gguf(model: torch.nn.Module, kind: str) -> None:
    """Every nn.Linear as diffusers' GGUFLinear over llama.cpp blocks (gguf's own quantizer, on the CPU), as
    ``from_single_file(FILE.gguf, quantization_config=GGUFQuantizationConfig(compute_dtype=bf16))`` builds it."""
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    qtype = gguf.GGMLQuantizationType[kind.upper()]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear or child.in_features % block:
                continue
            layer = GGUFLinear(child.in_features, child.out_features, child.bias is not None,
                               compute_dtype=torch.bfloat16, device="meta")  # fmt: skip
            blocks = gguf.quants.quantize(child.weight.detach().float().numpy(), qtype)
            layer.weight = GGUFParameter(torch.from_numpy(blocks), quant_type=qtype)
            layer.bias = child.bias
            layer.requires_grad_(False)
            setattr(module, child_name, layer)


class Memory:
    """Resident bytes (CPU) or allocated bytes (CUDA), and the high-water mark since :meth:`reset_peak`."""

    def __init__(self, device: str):
        self.device = device

    def trim(self) -> None:
        import gc

        gc.collect()
        if self.device == "cpu":
            ctypes.CDLL("libc.so.6").malloc_trim(0)

    def now(self) -> int:
        if self.device == "cuda":
            return torch.cuda.memory_allocated()
        import psutil

        return psutil.Process().memory_info().rss

    def reset_peak(self) -> None:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated()
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc/self/status")


def worker(model_name: str, base: str, units: int, resolution: int, text_tokens: int, device: str, steps: int) -> dict:
    from moslora_diffusion import MoSLoRAConfig, add_moslora

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    memory = Memory(device)
    memory.trim()
    before = memory.now()
    dtype = torch.float32 if base == "fp32" else torch.bfloat16
    torch.set_default_dtype(dtype)
    # bitsandbytes quantizes on the move to the GPU; gguf's quantizer is numpy
    with torch.device("cpu" if base.endswith(("-bnb", "-gguf", "-gguf_stock")) else device):
        model = build(model_name, units)
    torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    parameters = sum(p.numel() for p in model.parameters())
    quantize(model, base)
    model.to(device)
    memory.trim()
    weights = memory.now() - before

    add_moslora(model, MoSLoRAConfig(r=RANK, lora_alpha=RANK))
    adapter = [p for p in model.parameters() if p.requires_grad]
    for p in adapter:
        p.data = p.data.float()  # adapters train in fp32
    model.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(adapter, lr=1e-4)
    kwargs, target = inputs(model_name, resolution, text_tokens, dtype, device)
    memory.trim()
    after_setup = memory.now()
    memory.reset_peak()
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        out = model(**kwargs, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out.float(), target.float())
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    adapter_parameters = sum(p.numel() for p in adapter)
    return {
        "model": model_name, "base": base, "units": units, "resolution": resolution, "text_tokens": text_tokens,
        "device": device, "parameters": parameters, "adapter_parameters": adapter_parameters,
        "weights_bytes": weights, "setup_bytes": after_setup - before, "peak_bytes": memory.peak() - before,
        "step_seconds": times[-1], "steps": steps,
        "losses": losses, "adapter_finite": all(bool(torch.isfinite(p).all()) for p in adapter),
    }  # fmt: skip


# family -> [(component, dtype)]: what the trainer moves off the accelerator (SDXL's VAE stays fp32: it overflows in
# half precision; Flux's VAE runs in bf16).
ENCODERS = {
    "sdxl": [("text_encoder (CLIP-L)", "bf16"), ("text_encoder_2 (CLIP-bigG)", "bf16"), ("vae", "fp32")],
    "flux": [("text_encoder (CLIP-L)", "bf16"), ("text_encoder_2 (T5-XXL)", "bf16"), ("vae", "bf16")],
}
NOTES_PROJECTION_GIB = {"sdxl": 1.8, "flux": 9.5}  # the issue notes' figures, from parameter counts


def build_encoder(family: str, component: str) -> torch.nn.Module:
    """A full-size frozen component of ``family`` from its released config (weights as the constructor leaves them)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if component.startswith("text_encoder ("):  # CLIP-L (openai/clip-vit-large-patch14's text tower)
        return CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu"))  # fmt: skip
    if "bigG" in component:
        return CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                          num_attention_heads=20, projection_dim=1280, hidden_act="gelu"))  # fmt: skip
    if "T5" in component:  # google/t5-v1_1-xxl's encoder
        return T5EncoderModel(T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
                                       feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False))  # fmt: skip
    flux = family == "flux"
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16 if flux else 4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
        sample_size=1024, use_quant_conv=not flux, use_post_quant_conv=not flux,
    )  # fmt: skip


def encoder_parameter_bytes(family: str) -> list[tuple[str, str, int, int]]:
    """(component, dtype, parameters, bytes) of each component, counted on 'meta' (nothing allocated)."""
    rows = []
    for component, dtype in ENCODERS[family]:
        model = build_on_meta(family, component, dtype)
        count = sum(p.numel() for p in model.parameters())  # tied weights (T5's embedding) once
        rows.append((component, dtype, count, count * (4 if dtype == "fp32" else 2)))
    return rows


def build_on_meta(family: str, component: str, dtype: str) -> torch.nn.Module:
    """The component with no memory behind it, its parameters already in ``dtype`` (to_empty allocates that)."""
    torch.set_default_dtype(torch.float32 if dtype == "fp32" else torch.bfloat16)
    try:
        with torch.device("meta"):
            return build_encoder(family, component)
    finally:
        torch.set_default_dtype(torch.float32)


def encoders_worker(family: str) -> dict:
    """Resident bytes each component adds once materialised and written, and what moving all to 'meta' frees."""
    warnings.filterwarnings("ignore")
    memory = Memory("cpu")
    for component, dtype in ENCODERS[family]:  # imports and first-use set-up, outside the measurement
        build_on_meta(family, component, dtype)
    memory.trim()
    start = memory.now()
    models, components = [], []
    for component, dtype in ENCODERS[family]:
        before = memory.now()
        model = build_on_meta(family, component, dtype).to_empty(device="cpu")
        if hasattr(model, "tie_weights"):
            model.tie_weights()  # to_empty unties T5's embedding from its input embedding: one copy, as loaded
        with torch.no_grad():
            for tensor in model.state_dict().values():
                tensor.fill_(0.01)  # writes every page (to_empty's memory is not resident until written)
        memory.trim()
        models.append(model)
        components.append({"component": component, "dtype": dtype, "resident_bytes": memory.now() - before})
    loaded = memory.now()
    for model in models:
        model.to("meta")  # off the device: what OffloadedComponents.offload does to the accelerator's memory
    memory.trim()
    return {"family": family, "components": components, "loaded_bytes": loaded - start,
            "freed_bytes": loaded - memory.now()}  # fmt: skip


def run_encoders(args) -> list[dict]:
    import psutil

    rows = []
    for family in args.models:
        counted = encoder_parameter_bytes(family)
        projected = sum(b for *_, b in counted)
        available = psutil.virtual_memory().available
        row = {"family": family, "counted": counted, "projected_bytes": projected, "available_bytes": available}
        if available < 1.3 * projected:
            row["skipped"] = f"needs ~{1.3 * projected / GB:.1f} GiB free, {available / GB:.1f} GiB available"
        else:
            cmd = [sys.executable, __file__, "--encoders-worker", family]
            result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=args.timeout)
            lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
            if result.returncode != 0 or not lines:
                row["skipped"] = f"worker failed: {result.stderr.strip().splitlines()[-1:]}"
            else:
                row["measured"] = json.loads(lines[-1])
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def encoders_markdown(rows: list[dict]) -> str:
    out = ["# Memory freed by offloading the text encoders and VAE (cpu)", "",
           "Full-size components built from their configs (every weight written; values do not change memory), one "
           "process per family: resident memory (RSS, after malloc_trim) each adds, and what moving them all off "
           "gives back; projected = parameters x bytes per parameter. See `benchmarks/bench_memory.py --encoders`. Not measured on an "
           "accelerator (none here); there the allocator should hold the parameter bytes, rounded to its blocks.", "",
           "| family | component | dtype | parameters | projected GiB | measured GiB |", "|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        measured = {c["component"]: c["resident_bytes"] for c in row.get("measured", {}).get("components", [])}
        for component, dtype, count, size in row["counted"]:
            value = f"{measured[component] / GB:.3f}" if component in measured else "not measured"
            out.append(f"| {row['family']} | {component} | {dtype} | {count / 1e6:.0f} M | {size / GB:.3f} | {value} |")
    out += ["", "| family | projected GiB (GB) | notes' projection | measured: loaded GiB | measured: freed GiB |",
            "|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        m = row.get("measured")
        loaded = f"{m['loaded_bytes'] / GB:.2f}" if m else row["skipped"]
        freed = f"{m['freed_bytes'] / GB:.2f}" if m else "-"
        out.append(f"| {row['family']} | {row['projected_bytes'] / GB:.2f} ({row['projected_bytes'] / 1e9:.2f}) | "
                   f"~{NOTES_PROJECTION_GIB[row['family']]} GiB | {loaded} | {freed} |")  # fmt: skip
    return "\n".join(out) + "\n"


def tokens(model: str, resolution: int, text_tokens: int) -> int:
    latent = resolution // 8
    return (latent // SHAPES[model].patch) ** 2 + (text_tokens if model == "flux" else 0)


def flux_text_tokens(resolution: int) -> int:
    """Flux's T5 length scaled with the image (512 at 1024 px), so both resolutions keep the text's share."""
    return max(16, SHAPES["flux"].text_tokens * resolution // 1024)


def project(low: dict, high: dict, wide: dict, shape: Shape) -> dict:
    """Full depth (linear in units: ``low``, ``high``) and 1024 px (linear in tokens: ``low``, ``wide``).

    step(units, tokens) = fixed(units) + tokens x per_token, per_token from two resolutions at the low depth.
    """
    missing = shape.full_depth - high["units"]
    span = high["units"] - low["units"]

    def step(m):
        return m["peak_bytes"] - m["weights_bytes"]

    def full(value_low, value_high):
        return value_high + (value_high - value_low) / span * missing

    model = low["model"]
    tokens_low = tokens(model, low["resolution"], low["text_tokens"])
    tokens_wide = tokens(model, wide["resolution"], wide["text_tokens"])
    per_token = max(step(wide) - step(low), 0) / (tokens_wide - tokens_low)
    fixed = full(step(low), step(high)) - per_token * tokens_low
    weights = full(low["weights_bytes"], high["weights_bytes"])
    # one block's recomputed activations (measured) + every block's kept input (analytic)
    activations = (per_token + shape.kept_per_token) * tokens(model, 1024, shape.text_tokens)
    return {
        "weights_gb": weights / GB,
        "step_fixed_gb": fixed / GB,  # adapter, gradients, AdamW state, per-block temporaries
        "activations_gb": activations / GB,
        "peak_gb": (weights + fixed + activations) / GB,
    }


FAILURES: dict[str, str] = {}  # run key -> the last line of its error, this invocation


def measure(model: str, base: str, units: int, resolution: int, text_tokens: int, args, cache: dict) -> dict | None:
    key = f"{model}|{base}|{units}|{resolution}|{text_tokens}|{args.device}|{args.steps}"
    if key not in cache:
        cmd = [sys.executable, __file__, "--worker", model, base, str(units), str(resolution), str(text_tokens),
               args.device, str(args.steps)]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=args.timeout)
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode != 0 or not lines:
            reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"{key}: failed: {reason}", flush=True)
            FAILURES[key] = reason  # listed under the tables: a row missing says why
            return None
        cache[key] = json.loads(lines[-1])
        if args.cache:
            Path(args.cache).write_text(json.dumps(cache, indent=1))
    m = cache[key]
    step_peak = (m["peak_bytes"] - m["weights_bytes"]) / GB
    print(f"{key}: weights {m['weights_bytes'] / GB:.2f} GB, step peak {step_peak:.2f} GB, "
          f"step {m['step_seconds']:.1f} s, losses {m.get('losses')}, adapter finite {m.get('adapter_finite')}",
          flush=True)  # fmt: skip
    return m


def run_all(args) -> list[dict]:
    cache = json.loads(Path(args.cache).read_text()) if args.cache and Path(args.cache).is_file() else {}
    rows = []
    for model in args.models:
        shape = SHAPES[model]
        resolution = args.resolution or {"sdxl": 256, "flux": 128}[model]
        for base in args.bases:
            if "-gguf" in base and model == "sdxl":
                continue  # a .gguf base is a transformer's (diffusers reads GGUF linear layers only)
            runs = [(units, resolution) for units in shape.depths] + [(shape.depths[0], 2 * resolution)]
            measured = []
            for units, px in runs:
                text_tokens = flux_text_tokens(px) if model == "flux" else shape.text_tokens
                m = measure(model, base, units, px, text_tokens, args, cache)
                if m is None:
                    break
                measured.append(m)
            if len(measured) == 3:
                rows.append({"measured": measured, "projected": project(*measured, shape)})
    return rows


def _last_loss(m: dict) -> str:
    return f"{m['losses'][-1]:.4g}" if m.get("losses") else "-"  # runs cached before losses were recorded: -


def _finite(m: dict) -> str:
    return {True: "yes", False: "NO"}.get(m.get("adapter_finite"), "-")


def markdown(rows: list[dict], device: str) -> str:
    out = [f"# MoSLoRA training-step memory ({device})", "",
           f"r = {RANK} on the attention projections, gradient checkpointing, batch 1, AdamW, cached embeddings "
           "(no text encoder or VAE loaded). See benchmarks/bench_memory.py for the method.", "",
           "## Measured (full width, reduced depth)", "",
           f"Step time: the last of {rows[0]['measured'][0]['steps'] if rows else '?'} step(s) per run "
           "(with 1, it includes AdamW's set-up); on a shared CPU. Rows reused from --cache may have run on another "
           "day under another load (rows without a last loss predate its recording): compare step times only "
           "between rows of one model and base.", "",
           "| model | base | units | px | parameters | weights GB | step peak over weights GB | step s | last loss | adapter finite |",
           "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        for m in row["measured"]:
            step_peak = (m["peak_bytes"] - m["weights_bytes"]) / GB
            out.append(
                f"| {m['model']} | {m['base']} | {m['units']} | {m['resolution']} | {m['parameters'] / 1e9:.2f} B | "
                f"{m['weights_bytes'] / GB:.2f} | {step_peak:.2f} | {m['step_seconds']:.1f} | {_last_loss(m)} | "
                f"{_finite(m)} |"
            )
    out += ["", "## Projected to full depth at 1024 px (what fits)", "",
            "Projected, not measured: weights and the step's fixed part extrapolated linearly in blocks from the "
            "two depths above; activations = the step peak's growth per token (two resolutions at the smaller "
            "depth) x the tokens at 1024 px, plus the inputs checkpointing keeps per block (computed). "
            "Fits: peak + 0.5 GB of CUDA context within the budget.", "",
            "| model | base | weights GB | step, fixed GB | activations GB | peak GB | 12 GB | 16 GB | 24 GB |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        p, m = row["projected"], row["measured"][0]
        fits = ["yes" if p["peak_gb"] + 0.5 <= budget else "no" for budget in (12, 16, 24)]
        out.append(
            f"| {m['model']} | {m['base']} | {p['weights_gb']:.1f} | {p['step_fixed_gb']:.2f} | "
            f"{p['activations_gb']:.1f} | {p['peak_gb']:.1f} | {' | '.join(fits)} |"
        )
    units = "; ".join(f"{name}: {shape.full_depth} x {shape.unit}" for name, shape in SHAPES.items())
    out += ["", f"Full depth: {units}."]
    if device == "cpu" and any("-gguf" in row["measured"][0]["base"] for row in rows):
        out += ["", "GGUF rows on the CPU: diffusers' GGUFLinear dequantizes each weight to bf16 in every forward "
                "(and again in checkpointing's recompute), and the resident high-water mark counts such transient "
                "copies; the step's fixed part grows with depth several times faster than for the other bases (why, "
                "exactly, was not established), so its projection is likely an upper bound. The weights column is "
                "the solid part. The CUDA figure is what benchmarks/device/gpu_benchmarks.sh measures."]  # fmt: skip
    if FAILURES:
        out += ["", "Runs that failed (their rows are missing):", ""]
        out += [f"- `{key}`: {reason}" for key, reason in FAILURES.items()]
    if device == "cpu":
        out += ["", "bitsandbytes int8 / nf4 need CUDA and are not measured here (`--device cuda`). torchao quantizes "
                "linear layers only (SDXL's convolutions stay bf16); optimum-quanto quantizes convolutions too."]  # fmt: skip
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        model, base, units, resolution, text_tokens, device, steps = argv[1:8]
        print(json.dumps(worker(model, base, int(units), int(resolution), int(text_tokens), device, int(steps))))
        return 0
    if argv and argv[0] == "--encoders-worker":
        print(json.dumps(encoders_worker(argv[1])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--bases", nargs="+", default=None, choices=BASES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=None, help="measured px (default: sdxl 256, flux 128 on CPU)")
    parser.add_argument("--cache", default=None, help="JSON file of finished runs, reused and extended (reruns)")
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--steps", type=int, default=2, help="steps per run, the last timed (1: with AdamW's set-up)")
    parser.add_argument("--out", default=None, help="path without suffix (default: benchmarks/results/memory_<device>)")
    parser.add_argument(
        "--encoders", action="store_true", help="measure the text encoders and VAE that offloading frees (CPU)"
    )
    args = parser.parse_args(argv)
    if args.encoders:
        rows = run_encoders(args)
        text = encoders_markdown(rows)
        print(text)
        out = Path(args.out or REPO / "benchmarks" / "results" / "memory_encoders_cpu")
        out.with_suffix(".md").write_text(text)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
        return 0
    args.bases = args.bases or (CPU_BASES if args.device == "cpu" else ("bf16", "int8-torchao", "int8-bnb", "nf4-bnb"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows = run_all(args)
    text = markdown(rows, args.device)
    print(text)
    out = Path(args.out or REPO / "benchmarks" / "results" / f"memory_{args.device}")
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
