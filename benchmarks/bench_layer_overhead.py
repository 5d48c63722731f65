"""Host-side cost of one adapted layer: MoSLoRA against PEFT LoRA where the arithmetic is negligible.

On a GPU at batch 1 a diffusion model's training step or forward is partly bound by the host: Python,
the dispatcher and one kernel launch per operator. An adapter's share of that is its per-layer
overhead, which this benchmark isolates on the CPU: a stack of small linears (in = out = ``--width``,
``--tokens`` tokens) carrying each method's adapter, where the matmuls cost next to nothing, so the
time per step is the operators' fixed cost. One thread; interleaved rounds; microseconds per layer.

    python benchmarks/bench_layer_overhead.py
    python benchmarks/bench_layer_overhead.py --tokens 256 --width 128   # the folded orders

On a machine whose speed drifts (shared cores), short timed calls and many rounds (``--steps 5 --rounds 60``)
interleave finely; the ratio columns are medians of per-round ratios, of wall and of CPU time, and the
ratio of the fastest calls (noise only ever adds time).

Methods are those of bench_train_step.py that live on PEFT layers (peft_lora, moslora, moslora_fold,
moslora_naive); each step is forward + backward (training) or a no_grad forward (inference).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_train_step import add_peft_method
from benchmarks.common import Method, markdown_header, markdown_row, summarize, time_interleaved

METHODS = ("peft_lora", "moslora", "moslora_v1", "moslora_fold", "moslora_naive")


class LinearStack(nn.Module):
    def __init__(self, layers: int, width: int):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"to_q": nn.Linear(width, width)}) for _ in range(layers))

    def forward(self, x):
        for block in self.blocks:
            x = block["to_q"](x)
        return x


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=4, help="per-token mixing below --width, folding from it")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50, help="steps per timed call")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    torch.manual_seed(0)
    model = LinearStack(args.layers, args.width).requires_grad_(False)
    for method in METHODS:
        add_peft_method(model, method, args.rank, ["to_q"])
    x = torch.randn(1, args.tokens, args.width, requires_grad=True)

    def set_adapter(name):
        for block in model.blocks:
            block["to_q"].set_adapter(name)

    def training_steps():
        for _ in range(args.steps):
            model(x).sum().backward()

    def inference_steps():
        with torch.no_grad():
            for _ in range(args.steps):
                model(x)

    print(
        f"torch {torch.__version__}, 1 thread; {args.layers} linears {args.width} -> {args.width}, {args.tokens} "
        f"tokens, r={args.rank}; {args.rounds} interleaved rounds of {args.steps} steps\n"
    )
    print(
        markdown_header(
            [
                "step",
                "method",
                "us per layer (median)",
                "min",
                "max",
                "x PEFT LoRA",
                "extra us per layer",
                "CPU time x PEFT LoRA",
                "min x PEFT LoRA's min",
            ]
        )
    )
    for label, run in (("forward + backward", training_steps), ("no_grad forward", inference_steps)):
        methods = [Method(m, run, lambda m=m: set_adapter(m)) for m in METHODS]
        wall, cpu = time_interleaved(methods, args.rounds, warmup=2)
        per_layer = {m: [t / args.steps / args.layers * 1e6 for t in ts] for m, ts in wall.items()}
        stats, cpu_stats = summarize(per_layer, "peft_lora"), summarize(cpu, "peft_lora")
        for m in METHODS:
            s = stats[m]
            print(
                markdown_row(
                    [
                        label,
                        m,
                        f"{s['median']:.1f}",
                        f"{s['min']:.1f}",
                        f"{s['max']:.1f}",
                        f"{s['ratio']:.3f}",
                        f"{s['median'] - stats['peft_lora']['median']:+.1f}",
                        f"{cpu_stats[m]['ratio']:.3f}",
                        f"{s['min'] / stats['peft_lora']['min']:.3f}",
                    ]
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
