"""Inference cost of a MoSLoRA adapter, side by side with the base model and a PEFT LoRA adapter.

One SD1.5-shaped UNet (random weights) carries a PEFT LoRA and a MoSLoRA adapter of the same rank on
the same layers (to_q, to_k, to_v, to_out.0); one UNet forward (eval, no_grad) is timed per method,
interleaved round by round:

    base            the model without adapters (PEFT layers taken out)
    peft_lora       PEFT LoRA, unmerged (diffusers' default after load_lora_weights)
    moslora         MoSLoRA, unmerged (the mixer folded into A on every call)
    moslora_fused   MoSLoRA after unet.fuse_lora(), adapter layers still in place (pipe.fuse_lora())
    moslora_merged  MoSLoRA fused and the adapter layers removed: what fuse_lora + unload_lora_weights
                    or `moslora merge` leave, plain modules with W0 + s B M A

Before timing, the fused and merged outputs are checked against the unmerged MoSLoRA output.

    python benchmarks/bench_inference.py --ranks 16 64
    python benchmarks/bench_inference.py --ranks 16 --profile   # where each method's time goes

Prints a markdown table of min / median / max forward time and the ratios to PEFT LoRA and to the base.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_train_step import MODELS, Setup, add_peft_method, build_model, model_inputs, synchronize
from benchmarks.common import Method, markdown_header, markdown_row, peft_layers_removed, summarize, time_interleaved

METHODS = ("base", "peft_lora", "moslora", "moslora_v1", "moslora_fused", "moslora_merged")


def randomize_adapters(model: torch.nn.Module, seed: int = 2) -> None:
    """Give B a small random value (it starts at zero), so that the adapters change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen).to(param) * 0.02)


def inference_methods(setup: Setup, rank: int) -> tuple[torch.nn.Module, list[Method]]:
    model = build_model(setup)
    for method in ("peft_lora", "moslora", "moslora_v1"):  # moslora_v1: the forward before 2026-11-30, for before/after
        add_peft_method(model, method, rank, setup.spec.targets)
    randomize_adapters(model)
    model.eval()
    inputs, _ = model_inputs(setup)

    def forward():
        with torch.no_grad():
            out = model(**inputs).sample
        synchronize(setup)
        return out

    removed = []

    def remove_layers():
        removed.append(peft_layers_removed(model))
        removed[-1].__enter__()

    def restore_layers():
        removed.pop().__exit__(None, None, None)

    def fuse():
        model.set_adapter("moslora")
        model.fuse_lora(adapter_names=["moslora"])

    def merge():
        fuse()
        remove_layers()

    def unmerge():
        restore_layers()
        model.unfuse_lora()

    methods = [
        Method("base", forward, remove_layers, restore_layers),
        Method("peft_lora", forward, lambda: model.set_adapter("peft_lora")),
        Method("moslora", forward, lambda: model.set_adapter("moslora")),
        Method("moslora_v1", forward, lambda: model.set_adapter("moslora_v1")),
        Method("moslora_fused", forward, fuse, model.unfuse_lora),
        Method("moslora_merged", forward, merge, unmerge),
    ]
    return model, methods


def check_outputs(methods: list[Method], tolerance: float) -> dict[str, float]:
    """Run each method once (the warm-up); fused and merged must reproduce unmerged MoSLoRA to
    ``tolerance`` (max abs difference over the output's max abs value)."""
    outputs = {}
    for method in methods:
        with method.active():
            outputs[method.name] = method.run()
    reference_dtype = outputs["moslora"].dtype
    outputs = {name: out.float() for name, out in outputs.items()}
    reference = outputs["moslora"]
    scale = reference.abs().max().item()
    errors = {
        name: (outputs[name] - reference).abs().max().item() / scale for name in ("moslora_fused", "moslora_merged")
    }
    for name, err in errors.items():
        if err > tolerance:
            # Half precision rounds the fused weights: worth seeing in the table, not worth losing the run.
            message = (
                f"{name} differs from unmerged MoSLoRA by {err:.2e} of the output scale (tolerance {tolerance:.0e})"
            )
            if reference_dtype == torch.float32:
                raise AssertionError(message)
            print(f"warning: {message}", file=sys.stderr)
    if (outputs["moslora"] - outputs["base"]).abs().max().item() / scale < 1e-4:
        raise AssertionError("the MoSLoRA adapter does not change the output: the comparison would be vacuous")
    return errors


def profile_methods(methods: list[Method], row_limit: int = 12) -> None:
    """torch.profiler over one call of each method: the top operators by self time."""
    from torch.profiler import profile

    for method in methods:
        with method.active():
            with profile() as prof:
                method.run()
        print(f"\n#### {method.name}\n", flush=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="sd15")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16])
    parser.add_argument("--resolution", type=int, default=512, help="pixels; latents are resolution/8")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--depth", type=int, default=2, help="as in bench_train_step.py (SD1.5: 2, the default)")
    parser.add_argument("--transformer-depth", type=int, default=None, help="sdxl only, as in bench_train_step.py")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--profile", action="store_true", help="also profile one forward of each method")
    parser.add_argument("--json", type=Path, default=None, help="also write raw times here")
    args = parser.parse_args(argv)
    spec = MODELS[args.model]
    setup = Setup(
        args.model,
        args.depth,
        args.transformer_depth or spec.transformer_depth,
        args.batch,
        args.resolution,
        args.device,
        args.dtype,
    )

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {setup.describe()}; one forward "
        f"(eval, no_grad) per call; {args.rounds} interleaved rounds; adapted: {', '.join(spec.targets)}\n",
        flush=True,
    )
    print(
        markdown_header(
            [
                "r",
                "method",
                "forward min (s)",
                "median (s)",
                "max (s)",
                "x PEFT LoRA",
                "x base",
                "CPU time x PEFT LoRA",
                "CPU time x base",
                "max diff. / output scale",
            ]
        ),
        flush=True,
    )
    raw = []
    for rank in args.ranks:
        model, methods = inference_methods(setup, rank)
        errors = check_outputs(methods, tolerance=1e-5 if args.dtype == "fp32" else 2e-2)
        times, cpu_times = time_interleaved(methods, args.rounds, warmup=0)
        to_lora, to_base = summarize(times, "peft_lora"), summarize(times, "base")
        cpu_to_lora, cpu_to_base = summarize(cpu_times, "peft_lora"), summarize(cpu_times, "base")
        for name in METHODS:
            s = to_lora[name]
            print(
                markdown_row(
                    [
                        str(rank),
                        name,
                        f"{s['min']:.3f}",
                        f"{s['median']:.3f}",
                        f"{s['max']:.3f}",
                        f"{s['ratio']:.3f}",
                        f"{to_base[name]['ratio']:.3f}",
                        f"{cpu_to_lora[name]['ratio']:.3f}",
                        f"{cpu_to_base[name]['ratio']:.3f}",
                        f"{errors[name]:.1e}" if name in errors else "",
                    ]
                ),
                flush=True,
            )
        if args.profile:
            profile_methods(methods)
        raw.append({"rank": rank, "times": times, "cpu_times": cpu_times, "errors": errors})
        del model, methods
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
