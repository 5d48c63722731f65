#!/usr/bin/env python
"""The one thing MoSLoRA allows that LoRA cannot: re-target an adapter by training only its r x r mixers.

A first adapter learns subject 1 (the sample subject: a red cross, "a photo of sks shape"). Its A and B are
then frozen (``--init_lora FIRST --train_mixer_only``: B' = B M folded, a fresh M = I trains) on subject 2, a
yellow triangle bound to the same prompt. Against it: a full adapter trained on subject 2 from scratch with
the same recipe, and the first adapter unchanged. Every adapter is loaded by stock diffusers from its folded
file and scored by the world's evaluator:

  subject 2       "a photo of sks shape" images that are a yellow triangle
  subject 1 left  the same images that are still a red cross
  prior           class prompts right in shape and colour (the base's figure printed beside it)
  trainable       adapter parameters trained; mixer-only ships r^2 per layer on top of the first adapter

    python benchmarks/mixer_only.py --threads 2        # 3 seeds x 4 runs, ~25 min on 2 CPU cores
    python benchmarks/mixer_only.py --quick            # a few steps: a smoke test
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.quality import class_prompts, generate, load_base, mean_spread, repo_relative, run_trainer  # noqa: E402
from moslora_diffusion import world  # noqa: E402

SUBJECT_2 = ("triangle", "yellow", "white")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=str(REPO / "samples" / "tiny-base"))
    p.add_argument("--subject", default=str(REPO / "samples" / "subject"), help="subject 1 (the first adapter's)")
    p.add_argument("--output_dir", default=str(REPO / "benchmarks" / "results" / "mixer_only"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--learning_rate", type=float, default=1e-3, help="of the first and the full adapters")
    p.add_argument("--mixer_learning_rates", default="1e-3,1e-2", help="comma-separated LRs of the mixer-only runs")
    p.add_argument("--images", type=int, default=16, help="images scored per prompt")
    p.add_argument("--sampling_steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="one seed, 4 steps, 4 images (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.images, args.sampling_steps = 1, 4, 4, 4
    args.mixer_learning_rates = [float(x) for x in args.mixer_learning_rates.split(",")]
    return args


def make_subject_2(folder: Path, count: int = 5) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(2)
    for i in range(count):
        world.render(*SUBJECT_2, rng=rng).save(folder / f"subject2_{i}.png")


def train(args, subject: Path, run_dir: Path, seed: int, *extra: str) -> None:
    argv = [
        "--pretrained_model_name_or_path", args.base,
        "--instance_data_dir", str(subject),
        "--instance_prompt", world.subject_prompt(),
        "--output_dir", str(run_dir),
        "--overwrite_output_dir",
        "--max_train_steps", str(args.steps),
        "--train_batch_size", "4",
        "--random_flip",
        "--cache_latents",
        "--seed", str(seed),
        "--target_modules", "attention+ff",
        "--num_validation_images", "0",
        "--validation_steps", str(args.steps + 1),
        "--checkpointing_steps", str(args.steps + 1),
        "--report_to", "none",
        *extra,
    ]  # fmt: skip
    run_trainer(argv, f"training {run_dir.name}")


def score(pipe, seed: int, args) -> dict[str, float]:
    images = generate(pipe, [world.subject_prompt()] * args.images, seed, args)
    prompts = class_prompts()
    quarter = max(1, args.images // 4)
    classes = generate(pipe, [p for p, _, _ in prompts for _ in range(quarter)], seed + 3, args)
    class_ok = [
        world.evaluate(im).matches(s, c) for (_, s, c), im in zip([q for q in prompts for _ in range(quarter)], classes)
    ]
    return dict(
        subject_2=world.accuracy(images, SUBJECT_2[0], SUBJECT_2[1]),
        subject_1_left=world.accuracy(images, world.SUBJECT_SHAPE, world.SUBJECT_COLOUR),
        prior=sum(class_ok) / len(class_ok),
    )


def scored(args, run_dir: Path, seed: int) -> dict[str, float]:
    pipe = load_base(args.base)
    pipe.load_lora_weights(str(run_dir), adapter_name="run")
    figures = score(pipe, 1000 + seed, args)
    from moslora_diffusion.fileio import load_safetensors

    native, _ = load_safetensors(run_dir / "moslora_weights.safetensors")
    figures["mixer_parameters"] = sum(t.numel() for k, t in native.items() if "lora_mixer" in k)
    figures["factor_parameters"] = sum(t.numel() for k, t in native.items() if "lora_mixer" not in k)
    figures["diffusers_file_bytes"] = (run_dir / "pytorch_lora_weights.safetensors").stat().st_size
    return figures


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    runs = out / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    subject_2 = out / "subject2"
    shutil.rmtree(subject_2, ignore_errors=True)
    make_subject_2(subject_2)
    started = time.perf_counter()
    base = score(load_base(args.base), 0, args)
    print(f"base: {base}", flush=True)

    results: dict[str, list[dict]] = {}

    def record(method: str, seed: int, figures: dict) -> None:
        results.setdefault(method, []).append(dict(seed=seed, **figures))
        print(f"{method} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()), flush=True)

    rank = ["--rank", str(args.rank), "--learning_rate", str(args.learning_rate)]
    for seed in range(args.seeds):
        first = runs / f"first-seed{seed}"
        train(args, Path(args.subject), first, seed, *rank)
        record("first adapter (subject 1), unchanged", seed, scored(args, first, seed))
        full = runs / f"full-seed{seed}"
        train(args, subject_2, full, seed, *rank)
        record("full adapter on subject 2", seed, scored(args, full, seed))
        for lr in args.mixer_learning_rates:
            mixer = runs / f"mixer-lr{lr:g}-seed{seed}"
            init = ["--init_lora", str(first / "moslora_weights.safetensors"), "--train_mixer_only"]
            train(args, subject_2, mixer, seed, *init, "--learning_rate", str(lr))
            record(f"mixer only on subject 2, lr {lr:g}", seed, scored(args, mixer, seed))

    minutes = (time.perf_counter() - started) / 60
    lines = [
        f"Mixer-only re-targeting on {Path(args.base).name}: rank {args.rank}, {args.steps} steps, batch 4, "
        f"attention+ff, {args.seeds} seed(s), {args.images} images per prompt, {args.sampling_steps} DDIM steps; "
        f"{minutes:.1f} min",
        "",
        f"| adapter | subject 2 (yellow triangle) | subject 1 left (red cross) | prior (base {base['prior']:.2f}) "
        "| parameters trained | diffusers file |",
        "|---|---|---|---|---|---|",
    ]
    for method, rows in results.items():
        cells = [mean_spread([r[k] for r in rows]) for k in ("subject_2", "subject_1_left", "prior")]
        trained = rows[0]["mixer_parameters"] if method.startswith("mixer") else rows[0]["factor_parameters"]
        if method.startswith("full") or method.startswith("first"):
            trained += rows[0]["mixer_parameters"]
        lines.append(
            f"| {method} | " + " | ".join(f"{m:.2f} ± {s:.2f}" for m, s in cells) + f" | {trained:,} | "
            f"{rows[0]['diffusers_file_bytes'] / 1024:.0f} KiB |"
        )
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(
        json.dumps(dict(args={k: repo_relative(v) for k, v in vars(args).items()}, base=base, runs=results), indent=1)
        + "\n"
    )
    if not args.quick:
        shutil.rmtree(runs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
