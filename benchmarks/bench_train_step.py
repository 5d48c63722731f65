"""Training-step cost of MoSLoRA against PEFT LoRA and the naive three-matmul MoSLoRA, side by side.

One process builds an SD1.5-shaped UNet (random weights) per method and times full training steps
(forward, backward, AdamW step) interleaved round by round, so drift on a shared machine hits every
method alike. Memory is measured twice: the bytes autograd saves for backward (exact, in-process),
and peak resident memory of a fresh subprocess per method (ru_maxrss).

    python benchmarks/bench_train_step.py --rounds 8 --ranks 16 --resolution 256
    python benchmarks/bench_train_step.py --rounds 8 --ranks 64 --resolution 512

Prints a markdown table of min / median / max step time and the ratio to PEFT LoRA's median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from peft import LoraConfig

from moslora_diffusion import MoSLoRAConfig, add_moslora, moslora_layers
from moslora_diffusion.layer import MoSLoRAVariant

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
METHODS = ("peft_lora", "moslora", "moslora_naive")


class NaiveMoSLoRAVariant(MoSLoRAVariant):
    """The textbook formulation: B(M(A x)), an r x r matmul per token."""

    @staticmethod
    def forward(module, active_adapter, x, result, **kwargs):
        x = module.lora_dropout[active_adapter](x)
        mixed = module.lora_mixer[active_adapter](module.lora_A[active_adapter](x))
        return result + module.lora_B[active_adapter](mixed) * module.scaling[active_adapter]


def sd15_unet(depth: int) -> UNet2DConditionModel:
    """SD1.5's UNet shape (cross-attention 768, 8 heads); ``depth`` layers per block (SD1.5: 2)."""
    return UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, layers_per_block=depth, sample_size=64)


def build(method: str, rank: int, depth: int, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = sd15_unet(depth)
    if method == "peft_lora":
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights="gaussian"))
    else:
        add_moslora(unet, MoSLoRAConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights="gaussian"))
        if method == "moslora_naive":
            for _, layer in moslora_layers(unet):
                layer.lora_variant["default"] = NaiveMoSLoRAVariant()
    unet.train()
    return unet


def make_step(unet, batch: int, latent: int):
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, latent, latent, generator=gen)
    ctx = torch.randn(batch, 77, 768, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    target = torch.randn(x.shape, generator=gen)

    def step():
        loss = F.mse_loss(unet(x, t, ctx).sample, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, (x, t, ctx)


def saved_activation_bytes(unet, inputs) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(*inputs).sample.mean().backward()
    unet.zero_grad(set_to_none=True)
    return total


def peak_rss_mb(method: str, args) -> float:
    """Peak RSS (MiB) of a fresh process that builds ``method`` and runs two training steps."""
    code = (
        "import resource, sys; sys.argv=['x']; import benchmarks.bench_train_step as b;"
        f"u=b.build({method!r},{args.rank},{args.depth}); s,_=b.make_step(u,{args.batch},{args.resolution // 8}); s(); s();"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16])
    parser.add_argument("--resolution", type=int, default=256, help="pixels; latents are resolution/8")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--depth", type=int, default=2, help="layers per UNet block (SD1.5: 2)")
    parser.add_argument("--no-rss", action="store_true", help="skip the per-method subprocess RSS measurement")
    args = parser.parse_args(argv)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SD1.5-shaped UNet (layers_per_block={args.depth}), "
          f"{args.resolution} px ({args.resolution // 8}^2 latents), batch {args.batch}, {args.rounds} interleaved rounds\n")
    print("| r | method | step min (s) | median (s) | max (s) | median / PEFT LoRA | saved activations (MiB) | act. ratio | peak RSS (MiB) | RSS ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rank in args.ranks:
        args.rank = rank
        models = {m: build(m, rank, args.depth) for m in METHODS}
        steps, saved = {}, {}
        for m, unet in models.items():
            steps[m], inputs = make_step(unet, args.batch, args.resolution // 8)
            saved[m] = saved_activation_bytes(unet, inputs) / 2**20
            steps[m]()  # warm-up
        times = {m: [] for m in METHODS}
        for r in range(args.rounds):
            order = METHODS if r % 2 == 0 else METHODS[::-1]
            for m in order:
                start = time.perf_counter()
                steps[m]()
                times[m].append(time.perf_counter() - start)
        del models, steps
        rss = {m: (float("nan") if args.no_rss else peak_rss_mb(m, args)) for m in METHODS}
        ref = statistics.median(times["peft_lora"])
        for m in METHODS:
            med = statistics.median(times[m])
            print(f"| {rank} | {m} | {min(times[m]):.3f} | {med:.3f} | {max(times[m]):.3f} | {med / ref:.3f}x | "
                  f"{saved[m]:.1f} | {saved[m] / saved['peft_lora']:.3f}x | {rss[m]:.1f} | {rss[m] / rss['peft_lora']:.3f}x |")
        sys.stdout.flush()
        print(json.dumps({"rank": rank, "times": times}), file=sys.stderr)


if __name__ == "__main__":
    main()
