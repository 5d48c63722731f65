"""Merge time and peak memory on an SD1.5-size UNet: streaming merge vs the naive load-fuse-save route.

    python benchmarks/bench_merge.py                  # fp16 base and output, rank-16 attention adapter
    python benchmarks/bench_merge.py --dtype fp32

The base is a tiny SD1.5 pipeline whose UNet is replaced by one of SD1.5's size (diffusers'
UNet2DConditionModel default config, 860M parameters, random weights), saved as a diffusers folder. The
adapter is a random rank-16 LoRA over every attention projection (to_q, to_k, to_v, to_out.0) in stock
diffusers format. Each route runs in a fresh Python process that reports its own wall time and peak
resident memory (ru_maxrss); ratios are to the base model's weights in the output dtype. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROUTES = {
    "imports only": "Python, torch, diffusers and moslora_diffusion imported, nothing else (the floor of every route)",
    "streaming -> folder": "moslora merge --output DIR (merge_checkpoint)",
    "streaming -> single file": "moslora merge --output OUT.safetensors (merge_checkpoint)",
    "naive": "from_pretrained, load_lora_weights, fuse_lora, unload_lora_weights, save_pretrained",
}


def build(workdir: Path, dtype_name: str, rank: int) -> tuple[Path, Path]:
    """The base folder (SD1.5-size UNet) and a rank-``rank`` attention LoRA file."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from moslora_diffusion.testing import make_tiny_pipeline

    dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    base, adapter = workdir / f"base_{dtype_name}", workdir / "adapter"
    if not (base / "model_index.json").is_file():
        torch.manual_seed(0)
        pipe = make_tiny_pipeline("sd15")
        with torch.no_grad():
            unet = UNet2DConditionModel()  # the default config is SD1.5's UNet
            unet.to(dtype)
        pipe.register_modules(unet=unet)
        pipe.save_pretrained(base, safe_serialization=True)
        del pipe, unet
    if not (adapter / "pytorch_lora_weights.safetensors").is_file():
        gen = torch.Generator().manual_seed(1)
        with init_empty_weights():
            shapes = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base / "unet"))
        targets = ("to_q", "to_k", "to_v", "to_out.0")
        layers = {}
        for name, module in shapes.named_modules():
            if name.endswith(targets) and isinstance(module, torch.nn.Linear):
                layers[f"{name}.lora_A.weight"] = (
                    torch.randn(rank, module.in_features, generator=gen) / module.in_features**0.5
                )
                layers[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.01
        metadata = {"r": rank, "lora_alpha": rank, "target_modules": list(targets)}
        StableDiffusionPipeline.save_lora_weights(adapter, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata)
    return base, adapter / "pytorch_lora_weights.safetensors"


def run_route(route: str, base: Path, adapter: Path, output: Path, dtype: str) -> dict:
    """Runs inside the child process: one route, then its time and peak RSS as JSON."""
    import torch
    from diffusers import DiffusionPipeline

    from moslora_diffusion.merge import merge_checkpoint

    start = time.perf_counter()
    if route.startswith("streaming"):
        merge_checkpoint(base, [(adapter, 1.0)], output, dtype=dtype)
    elif route == "naive":
        pipe = DiffusionPipeline.from_pretrained(
            base, torch_dtype={"fp16": torch.float16, "fp32": torch.float32}[dtype]
        )
        pipe.load_lora_weights(str(adapter.parent), weight_name=adapter.name, adapter_name="a")
        pipe.fuse_lora(components=["unet", "text_encoder"])
        pipe.unload_lora_weights()
        pipe.save_pretrained(output, safe_serialization=True)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_bytes": peak_rss_bytes()}


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM, which (unlike ru_maxrss) starts afresh at exec
    instead of inheriting the parent's high-water mark."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="Base and output dtype.")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="Keep the base and adapter here (default: a temp folder)."
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="Runs per route; the table shows the median time and the largest peak."
    )
    parser.add_argument("--child", nargs=4, metavar=("ROUTE", "BASE", "ADAPTER", "OUTPUT"), help=argparse.SUPPRESS)
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        route, base, adapter, output = args.child
        if route == "imports only":
            import diffusers  # noqa: F401
            import torch  # noqa: F401

            import moslora_diffusion.merge  # noqa: F401

            print(json.dumps({"seconds": 0.0, "peak_rss_bytes": peak_rss_bytes()}))
        else:
            print(json.dumps(run_route(route, Path(base), Path(adapter), Path(output), args.dtype)))
        return
    if args.build:
        base, adapter = build(args.build, args.dtype, args.rank)
        print(json.dumps([str(base), str(adapter)]))
        return

    with tempfile.TemporaryDirectory(prefix="bench_merge_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"building the base ({args.dtype}) and a rank-{args.rank} adapter in {workdir} ...", file=sys.stderr)
        # Built in a child too, so that no route starts from this process's memory.
        done = subprocess.run(
            [sys.executable, __file__, "--dtype", args.dtype, "--rank", str(args.rank), "--build", str(workdir)],
            check=True,
            capture_output=True,
            text=True,
        )
        base, adapter = (Path(p) for p in json.loads(done.stdout.strip().splitlines()[-1]))
        model_bytes = weights_bytes(base)
        results = {}
        for route in ROUTES:
            output = workdir / ("out.safetensors" if "single" in route else f"out_{route.split()[0]}")
            runs = []
            for repeat in range(args.repeats if route != "imports only" else 1):
                _remove(output)
                command = [
                    sys.executable,
                    __file__,
                    "--dtype",
                    args.dtype,
                    "--child",
                    route,
                    str(base),
                    str(adapter),
                    str(output),
                ]
                print(f"running {route} ({repeat + 1}/{args.repeats}) ...", file=sys.stderr)
                done = subprocess.run(command, check=True, capture_output=True, text=True)
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            results[route] = {
                "seconds": statistics.median(r["seconds"] for r in runs),
                "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
                "output_bytes": (output.stat().st_size if output.is_file() else weights_bytes(output))
                if output.exists()
                else 0,
            }
            _remove(output)

    gib = 2**30
    print(
        f"\nBase model weights: {model_bytes / gib:.2f} GiB ({args.dtype}); adapter rank {args.rank} on every attention projection; {os.cpu_count()} CPUs\n"
    )
    print(
        f"Median of {args.repeats} runs per route (each in a fresh process; imports not timed); peak RSS is the largest.\n"
    )
    print("| route | time (s) | peak RSS (GiB) | peak RSS / model size | output (GiB) |")
    print("|---|---:|---:|---:|---:|")
    for route, r in results.items():
        print(
            f"| {route} | {r['seconds']:.1f} | {r['peak_rss_bytes'] / gib:.2f} | {r['peak_rss_bytes'] / model_bytes:.2f}x | {r['output_bytes'] / gib:.2f} |"
        )
    print()
    for route, what in ROUTES.items():
        print(f"- {route}: {what}")


if __name__ == "__main__":
    main()
