#!/usr/bin/env python
"""Does the mixer help? DreamBooth on the bundled tiny base, MoSLoRA against LoRA and its controls.

Every run is the real trainer (moslora_diffusion.training.dreambooth, in this process) on the bundled
base (samples/tiny-base) and the sample subject (samples/subject: a red cross, a shape the base never
saw), bound to "a photo of sks shape" with prior preservation on "a photo of a shape". Same steps,
learning rate, data and seeds for every method; only the adapter differs:

  lora            plain LoRA: identity mixer, frozen (rank r)
  moslora         MoSLoRA, kaiming mixer, trained (the paper's default)
  moslora_orth    MoSLoRA, orthogonal mixer, trained
  init_only       a kaiming mixer folded into A at initialisation, then frozen at identity (the PEFT
                  maintainers' control: MoSLoRA's initial A without a trainable mixer)
  lora_matched    plain LoRA at the smallest rank with at least MoSLoRA's parameter count (r(in+out)+r^2
                  per layer), so the mixer's extra parameters are not what decides

Each trained adapter is loaded into the base with stock diffusers (pipe.load_lora_weights on the folded
file) and scored with the world's evaluator (moslora_diffusion.world.evaluate):

  fidelity        "a photo of sks shape" images that are a red cross
  recolour        "a photo of a <green|blue|yellow> sks shape" images that are a cross of that colour
  background      "a photo of sks shape on a black background" images that are a cross on black
  prior           class prompts "a photo of a <colour> <shape>" right in shape and colour (the base's
                  own figure is printed beside it: prior preservation is how little it drops)
  final loss      mean training loss over the last 20% of steps (TensorBoard log of the run)

It prints a table of means and spreads and an exact two-sided rank-sum (Mann-Whitney) test of MoSLoRA
against each control, and writes results.json, results.md and quality.png (loss curves and a grid of
samples per method) to --output_dir:

    python benchmarks/quality.py --threads 1 --jobs 2  # 5 methods x 5 seeds, ~40 min on 2 CPU cores
    python benchmarks/quality.py --quick              # one seed, a few steps: a smoke test (in the suite)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from moslora_diffusion import world  # noqa: E402

METHODS: dict[str, list[str]] = {
    "lora": ["--mixer_init", "identity", "--freeze_mixer"],
    "moslora": ["--mixer_init", "kaiming"],
    "moslora_orth": ["--mixer_init", "orthogonal"],
    "init_only": ["--mixer_init", "kaiming_folded", "--freeze_mixer"],
    "lora_matched": ["--mixer_init", "identity", "--freeze_mixer"],  # at the parameter-matched rank
    # The sweep's settings (--sweep): each is compared with plain LoRA at the same rank.
    "lora_plus": ["--mixer_init", "identity", "--freeze_mixer", "--loraplus_lr_ratio", "16"],
    "moslora_identity": ["--mixer_init", "identity"],  # M = I at step 0, trained
    "moslora_mixer_lr_0.1": ["--mixer_init", "kaiming", "--mixer_lr", "{mixer_lr_0.1}"],
    "moslora_plus": ["--mixer_init", "kaiming", "--loraplus_lr_ratio", "16"],
}
SINGLE_RANK_METHODS = ("lora", "moslora", "moslora_orth", "init_only", "lora_matched")
SWEEP_METHODS = (
    "lora", "lora_plus", "moslora", "moslora_orth", "moslora_identity", "moslora_mixer_lr_0.1", "moslora_plus",
)  # fmt: skip
SWEEP_CONTROLS = ("init_only", "lora_matched")  # run at a rank where a MoSLoRA setting beats plain LoRA
REFERENCE = "moslora"
METRICS = ("fidelity", "recolour", "background", "prior", "final_loss")
RECOLOURS = ("green", "blue", "yellow")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base", default=str(REPO / "samples" / "tiny-base"), help="the bundled base (a diffusers folder)")
    p.add_argument("--subject", default=str(REPO / "samples" / "subject"))
    p.add_argument("--output_dir", default=str(REPO / "benchmarks" / "results" / "quality"))
    p.add_argument(
        "--methods", default=None, help="comma-separated subset of " + ", ".join(METHODS) + " (default: the five "
        "single-rank methods, or with --sweep the seven sweep settings)",
    )  # fmt: skip
    p.add_argument(
        "--sweep",
        action="store_true",
        help="every method at every --ranks, each against plain LoRA at the same rank (Holm-corrected p-values); "
        "then init_only and lora_matched where a MoSLoRA setting beats LoRA. Writes sweep.{md,json,png}",
    )
    p.add_argument("--ranks", default="2,4,8,16,32", help="ranks of the --sweep")
    p.add_argument(
        "--cells",
        default=None,
        help="--sweep: an explicit list of METHOD@RANK instead of every method at every rank (a fractional design; "
        "each rank given needs lora@RANK)",
    )
    p.add_argument(
        "--report_only", action="store_true", help="--sweep: tabulate the runs in sweep_runs.jsonl, train nothing"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="--sweep: keep the runs already in OUTPUT_DIR/sweep_runs.jsonl (written as each run ends) and run the rest",
    )
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--target_modules", default="attention+ff", help="preset or module names (the trainer's flag)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--learning_rate", type=float, default=1e-3, help="tuned once for plain LoRA, then fixed for all")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--num_class_images", type=int, default=64)
    p.add_argument("--no_prior_preservation", action="store_true", help="train on the subject alone (no class images)")
    p.add_argument(
        "--images", type=int, default=16, help="images per subject prompt (recolour/background: half, class: a quarter)"
    )
    p.add_argument("--sampling_steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument(
        "--jobs", type=int, default=1, help="runs in parallel (processes; use --threads 1 --jobs 2 on 2 cores)"
    )
    p.add_argument(
        "--captions",
        action="store_true",
        help="caption every subject image 'a photo of sks shape on a white background' (the caption names what "
        "is not the subject); default: the one instance prompt for all",
    )
    p.add_argument("--quick", action="store_true", help="one seed, 4 steps, 2 images per prompt (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.images, args.num_class_images, args.sampling_steps = 1, 4, 4, 4, 4
    default = SWEEP_METHODS if args.sweep else SINGLE_RANK_METHODS
    args.methods = args.methods.split(",") if args.methods else list(default)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if args.sweep and "lora" not in args.methods:
        p.error("--sweep compares every setting with plain LoRA at the same rank: --methods must include lora")
    try:
        args.ranks = [int(r) for r in args.ranks.split(",")]
        if args.cells:
            args.cells = [(m, int(r)) for m, r in (cell.split("@") for cell in args.cells.split(","))]
        else:
            args.cells = [(m, r) for r in args.ranks for m in args.methods]
    except ValueError:
        p.error(f"--ranks takes comma-separated integers and --cells METHOD@RANK pairs, not {args.ranks!r}")
    args.methods = list(dict.fromkeys(m for m, _ in args.cells)) if args.sweep else args.methods
    args.ranks = sorted({r for _, r in args.cells}) if args.sweep else args.ranks
    unknown = sorted({m for m, _ in args.cells} - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if args.sweep and any(("lora", r) not in args.cells for r in args.ranks):
        p.error("--sweep compares every setting with plain LoRA at the same rank: --cells needs lora@RANK at each rank")
    args.resume = args.resume or args.report_only
    log = Path(args.output_dir) / "sweep_runs.jsonl"
    if args.sweep and not args.resume and log.is_file() and log.stat().st_size:
        p.error(f"{log} holds an earlier sweep's runs: --resume continues it, --report_only tabulates it; "
                "give another --output_dir for a new sweep (or delete the file)")  # fmt: skip
    return args


# --------------------------------------------------------------------------------------------------
# Statistics


def repo_relative(value):
    """A path inside the repository as a relative one, so results read the same on every checkout."""
    if isinstance(value, str) and os.path.isabs(value):
        path = Path(value).resolve()
        if path == REPO or REPO in path.parents:
            return str(path.relative_to(REPO))
    return value


def rank_sum_test(x: list[float], y: list[float]) -> float:
    """Exact two-sided p-value of the Wilcoxon rank-sum (Mann-Whitney U) test, ties given mid-ranks.

    Every split of the pooled values into groups of len(x) and len(y) is enumerated (252 for 5 vs 5), so
    the p-value is exact for small samples, ties included: twice the smaller tail of x's rank sum, capped
    at 1 (scipy's convention for mannwhitneyu and permutation_test).
    """
    pooled = list(x) + list(y)
    order = sorted(range(len(pooled)), key=lambda i: pooled[i])
    ranks = [0.0] * len(pooled)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and pooled[order[j + 1]] == pooled[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    n = len(x)
    observed = sum(ranks[:n])
    sums = [sum(ranks[k] for k in split) for split in itertools.combinations(range(len(pooled)), n)]
    upper = sum(s >= observed - 1e-9 for s in sums) / len(sums)
    lower = sum(s <= observed + 1e-9 for s in sums) / len(sums)
    return min(1.0, 2 * min(upper, lower))


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down; each family's error rate held at the nominal level)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [1.0] * len(p_values)
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - k) * p_values[i]))
        adjusted[i] = running
    return adjusted


def mean_spread(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# --------------------------------------------------------------------------------------------------
# Training and scoring


def matched_rank(base: str, rank: int, target_modules: str) -> tuple[int, int, int]:
    """(smallest plain-LoRA rank with at least MoSLoRA's parameter count at ``rank``, MoSLoRA's count, its count)."""
    from diffusers import UNet2DConditionModel

    from moslora_diffusion import MoSLoRAConfig, add_moslora

    def count(r: int, train_mixer: bool) -> int:
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
        unet.requires_grad_(False)
        config = MoSLoRAConfig(
            r=r,
            lora_alpha=r,
            target_modules=target_modules,
            mixer_init="identity" if not train_mixer else "kaiming",
            train_mixer=train_mixer,
        )
        add_moslora(unet, config)
        return sum(p.numel() for p in unet.parameters() if p.requires_grad)

    moslora = count(rank, True)
    per_rank = count(1, False)
    matched = -(-moslora // per_rank)
    return matched, moslora, matched * per_rank


def method_flags(method: str, args) -> list[str]:
    """The trainer flags of a method, its placeholders filled from the run's settings."""
    values = {"{mixer_lr_0.1}": str(0.1 * args.learning_rate)}
    return [values.get(flag, flag) for flag in METHODS[method]]


def train_run(args, method: str, seed: int, rank: int, run_dir: Path, class_dir: Path) -> None:
    argv = [
        "--pretrained_model_name_or_path", args.base,
        "--instance_data_dir", args.train_subject,
        "--instance_prompt", world.subject_prompt(),
        # Without --captions no caption file matches: every image trains on the instance prompt.
        "--caption_extension", ".txt" if args.captions else ".no-caption",
        *([] if args.no_prior_preservation else [
            "--with_prior_preservation",
            "--class_prompt", world.caption(None, None, None),
            "--class_data_dir", str(class_dir),
            "--num_class_images", str(args.num_class_images),
        ]),
        "--output_dir", str(run_dir),
        "--overwrite_output_dir",  # a rerun of the benchmark replaces its earlier runs
        "--rank", str(rank),
        "--target_modules", args.target_modules,
        "--learning_rate", str(args.learning_rate),
        "--max_train_steps", str(args.steps),
        "--train_batch_size", str(args.batch_size),
        "--random_flip",
        "--cache_latents",
        "--seed", str(seed),
        "--num_validation_images", "0",
        "--validation_steps", str(args.steps + 1),
        "--checkpointing_steps", str(args.steps + 1),
        "--num_inference_steps", str(args.sampling_steps),
        "--report_to", "tensorboard",
        *method_flags(method, args),
    ]  # fmt: skip
    run_trainer(argv, f"training {method} (seed {seed})")


def run_trainer(argv: list[str], what: str) -> None:
    """The real trainer in this process (accelerate's singletons reset around it, so runs can follow each other)."""
    from accelerate.state import AcceleratorState, GradientState

    from moslora_diffusion.training.entry import main

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        code = main(argv, prog="quality.py")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    if code != 0:
        raise SystemExit(f"quality.py: {what} failed with exit code {code}")


def read_losses(run_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for folder in sorted((run_dir / "logs").rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(folder.parent), size_guidance={"scalars": 0})
        events.Reload()
        if "loss" in events.Tags().get("scalars", []):
            return [e.value for e in sorted(events.Scalars("loss"), key=lambda e: e.step)]
    return []


def load_base(base: str):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts: list[str], seed: int, args) -> list:
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        prompts, num_inference_steps=args.sampling_steps, guidance_scale=args.guidance_scale, generator=generator
    ).images


def class_prompts() -> list[tuple[str, str, str]]:
    return [(world.caption(s, c, None), s, c) for s in world.BASE_SHAPES for c in world.COLOURS]


def score(pipe, seed: int, args) -> tuple[dict[str, float], dict[str, list]]:
    """The evaluator's figures for one pipeline, and the images it scored (for the grid)."""
    n, half, quarter = args.images, max(1, args.images // 2), max(1, args.images // 4)
    subject = generate(pipe, [world.subject_prompt()] * n, seed, args)
    recolour = generate(pipe, [world.subject_prompt(colour=c) for c in RECOLOURS for _ in range(half)], seed + 1, args)
    background = generate(pipe, [world.subject_prompt(background="black")] * half, seed + 2, args)
    prompts = class_prompts()
    classes = generate(pipe, [p for p, _, _ in prompts for _ in range(quarter)], seed + 3, args)
    recolour_ok = [
        world.evaluate(im).matches(world.SUBJECT_SHAPE, colour)
        for colour, im in zip([c for c in RECOLOURS for _ in range(half)], recolour)
    ]
    class_ok = [
        world.evaluate(im).matches(s, c) for (_, s, c), im in zip([q for q in prompts for _ in range(quarter)], classes)
    ]
    figures = dict(
        fidelity=world.accuracy(subject, world.SUBJECT_SHAPE, world.SUBJECT_COLOUR),
        recolour=sum(recolour_ok) / len(recolour_ok),
        background=world.accuracy(background, world.SUBJECT_SHAPE, background="black"),
        prior=sum(class_ok) / len(class_ok),
    )
    return figures, dict(subject=subject[:4], recolour=recolour[::half][:3], background=background[:1])


# --------------------------------------------------------------------------------------------------
# Report


def table(results: dict[str, list[dict]], base_figures: dict[str, float], ranks: dict[str, int]) -> str:
    lines = [
        f"| method (rank) | fidelity | recolour | background | prior (base {base_figures['prior']:.2f}) | final loss | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, runs in results.items():
        cells = []
        for metric in METRICS:
            m, s = mean_spread([r[metric] for r in runs])
            cells.append(f"{m:.3f} ± {s:.3f}" if metric == "final_loss" else f"{m:.2f} ± {s:.2f}")
        lines.append(f"| {method} ({ranks[method]}) | " + " | ".join(cells) + f" | {len(runs)} |")
    lines.append("")
    if REFERENCE in results and len(results[REFERENCE]) > 1:
        lines += [f"Exact two-sided rank-sum p-values, {REFERENCE} against each control:", ""]
        lines += ["| control | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
        for method, runs in results.items():
            if method == REFERENCE:
                continue
            ps = [rank_sum_test([r[m] for r in results[REFERENCE]], [r[m] for r in runs]) for m in METRICS]
            lines.append(f"| {method} | " + " | ".join(f"{p:.3f}" for p in ps) + " |")
    return "\n".join(lines) + "\n"


def draw_report(
    path: Path, curves: dict[str, list[list[float]]], samples: dict[str, dict[str, list]], base_samples: dict[str, list]
) -> None:
    """Loss curves (mean over seeds, smoothed) on the left, a row of samples per method on the right."""
    from PIL import Image, ImageDraw

    palette = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (120, 120, 120)]
    W, H, pad = 420, 300, 40
    chart = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(chart)
    means = {}
    for method, runs in curves.items():
        runs = [r for r in runs if r]
        if not runs:
            continue
        length = min(len(r) for r in runs)
        mean = [statistics.fmean(r[i] for r in runs) for i in range(length)]
        k = max(1, length // 20)
        means[method] = [statistics.fmean(mean[max(0, i - k) : i + 1]) for i in range(length)]
    if means:
        lo = min(min(v) for v in means.values())
        hi = max(max(v) for v in means.values())
        hi = hi if hi > lo else lo + 1
        draw.rectangle((pad, 10, W - 10, H - pad), outline="black")
        draw.text((pad, H - pad + 5), "step", fill="black")
        draw.text((5, 10), f"{hi:.3f}", fill="black")
        draw.text((5, H - pad - 10), f"{lo:.3f}", fill="black")
        for j, (method, ys) in enumerate(means.items()):
            colour = palette[j % len(palette)]
            pts = [
                (pad + (W - 10 - pad) * i / max(1, len(ys) - 1), H - pad - (H - pad - 10) * (y - lo) / (hi - lo))
                for i, y in enumerate(ys)
            ]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
            draw.text((pad + 10, 15 + 12 * j), method, fill=colour)
    cell = world.SIZE * 2
    rows = {"base": base_samples, **samples}
    grid_w = 9 * cell + 110
    grid = Image.new("RGB", (grid_w, max(H, cell * len(rows) + 20)), "white")
    gdraw = ImageDraw.Draw(grid)
    gdraw.text((110, 2), "sks shape x4 | green, blue, yellow | on black", fill="black")
    for y, (method, images) in enumerate(rows.items()):
        gdraw.text((4, 20 + y * cell + cell // 2 - 6), method, fill="black")
        flat = images["subject"] + images["recolour"] + images["background"]
        for x, im in enumerate(flat[:9]):
            grid.paste(im.resize((cell, cell), Image.Resampling.NEAREST), (110 + x * cell, 20 + y * cell))
    canvas = Image.new("RGB", (W + grid_w, max(H, grid.height)), "white")
    canvas.paste(chart, (0, 0))
    canvas.paste(grid, (W, 0))
    canvas.save(path)


def ensure_class_images(pipe, class_dir: Path, args) -> None:
    """The prior-preservation images, made once by the base (so parallel runs never race to make them)."""
    class_dir.mkdir(parents=True, exist_ok=True)
    missing = args.num_class_images - len(list(class_dir.glob("*.png")))
    if missing > 0:
        prompt = world.caption(None, None, None)
        for i, image in enumerate(generate(pipe, [prompt] * missing, 12345, args)):
            image.save(class_dir / f"class_{args.num_class_images - missing + i:04d}.png")


def run_task(task) -> tuple[str, int, int, dict, list[float], dict]:
    """Train one (method, rank, seed) with the real trainer, load its folded file with stock diffusers, score it."""
    args, method, seed, rank, run_dir, class_dir = task
    t0 = time.perf_counter()
    train_run(args, method, seed, rank, run_dir, class_dir)
    train_s = time.perf_counter() - t0
    pipe = load_base(args.base)
    pipe.load_lora_weights(str(run_dir), adapter_name="run")
    figures, images = score(pipe, 1000 + seed, args)
    losses = read_losses(run_dir)
    tail = losses[-max(1, len(losses) // 5) :]
    figures["final_loss"] = statistics.fmean(tail) if tail else float("nan")
    figures["train_seconds"] = round(train_s, 1)
    if not args.quick:
        shutil.rmtree(run_dir / "logs", ignore_errors=True)
    return method, rank, seed, figures, losses, images


def run_tasks(tasks: list, args):
    """Yield run_task's outcome for each task, --jobs processes at a time (spawned: no state shared)."""
    if args.jobs > 1 and len(tasks) > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(
            args.jobs, initializer=torch.set_num_threads, initargs=(args.threads,)
        ) as pool:
            yield from pool.imap(run_task, tasks)
    else:
        yield from map(run_task, tasks)


def prepare_subject(args, out: Path) -> None:
    """args.train_subject: the subject folder itself, or with --captions a copy with a caption beside each image."""
    if not args.captions:
        args.train_subject = args.subject
        return
    captioned = out / "subject_captioned"
    shutil.rmtree(captioned, ignore_errors=True)
    captioned.mkdir(parents=True)
    for image in sorted(Path(args.subject).glob("*.png")):
        shutil.copy(image, captioned / image.name)
        # The subject's own traits (red, a cross) stay with "sks"; the caption names what may change.
        (captioned / f"{image.stem}.txt").write_text(world.subject_prompt(background=world.SUBJECT_BACKGROUND) + "\n")
    args.train_subject = str(captioned)


def target_modules_arg(args):
    return (
        args.target_modules if args.target_modules in ("attention", "attention+ff") else args.target_modules.split(",")
    )


def protocol(args, minutes: float) -> str:
    captions = "captioned subject" if args.captions else "one instance prompt"
    batch = "subject images, no prior preservation" if args.no_prior_preservation else "subject + class images"
    return (
        f"DreamBooth on {Path(args.base).name}, {captions}: {args.steps} steps, batch {args.batch_size} ({batch}), "
        f"lr {args.learning_rate}, {args.seeds} seed(s), {args.images} images per subject prompt, "
        f"{args.sampling_steps} DDIM steps, CFG {args.guidance_scale}; "
        + (
            "tabulated from the run log (--report_only)"
            if getattr(args, "report_only", False)
            else f"{minutes:.1f} min with {args.jobs} job(s) of {args.threads} thread(s)"
        )
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not (Path(args.base) / "model_index.json").is_file():
        print(f"quality.py: error: --base '{args.base}' is not a diffusers pipeline folder", file=sys.stderr)
        return 2
    out = Path(args.output_dir)
    runs_dir = out / "runs"
    if runs_dir.exists():
        shutil.rmtree(runs_dir)
    if not args.report_only:  # --report_only trains nothing: no run folders, no captioned copy
        runs_dir.mkdir(parents=True)
        prepare_subject(args, out)
    class_dir = out / "class_images"
    started = time.perf_counter()
    pipe = load_base(args.base)
    base_figures, base_samples = score(pipe, 0, args)
    print(f"base: {base_figures}", flush=True)
    if not args.no_prior_preservation:
        ensure_class_images(pipe, class_dir, args)
    del pipe
    if args.sweep:
        return sweep(args, out, runs_dir, class_dir, base_figures, started)
    return single_rank(args, out, runs_dir, class_dir, base_figures, base_samples, started)


def single_rank(args, out, runs_dir, class_dir, base_figures, base_samples, started) -> int:
    matched, moslora_params, matched_params = matched_rank(args.base, args.rank, target_modules_arg(args))
    ranks = {m: (matched if m == "lora_matched" else args.rank) for m in args.methods}
    print(
        f"MoSLoRA r={args.rank}: {moslora_params} trainable parameters; plain LoRA r={matched}: {matched_params}",
        flush=True,
    )
    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    curves: dict[str, list[list[float]]] = {m: [] for m in args.methods}
    samples: dict[str, dict] = {}
    tasks = [
        (args, method, seed, ranks[method], runs_dir / f"{method}-seed{seed}", class_dir)
        for seed in range(args.seeds)
        for method in args.methods
    ]
    for method, _, seed, figures, losses, images in run_tasks(tasks, args):
        results[method].append(dict(seed=seed, **figures))
        curves[method].append(losses)
        if seed == 0:
            samples[method] = images
        print(f"{method} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()), flush=True)
    samples = {m: samples[m] for m in args.methods if m in samples}

    report = table(results, base_figures, ranks)
    header = (
        f"{protocol(args, (time.perf_counter() - started) / 60)}. Rank {args.rank} (lora_matched {matched}: "
        f"{matched_params} vs MoSLoRA's {moslora_params} parameters)\n\n"
    )
    print(header + report, flush=True)
    (out / "results.md").write_text(header + report)
    (out / "results.json").write_text(
        json.dumps(
            dict(
                args={k: repo_relative(v) for k, v in vars(args).items()},
                base=base_figures,
                ranks=ranks,
                parameters=dict(moslora=moslora_params, lora_matched=matched_params),
                runs=results,
                losses=curves,
            ),
            indent=1,
        )
        + "\n"  # fmt: skip
    )
    draw_report(out / "quality.png", curves, samples, base_samples)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'quality.png'}")
    return 0


# --------------------------------------------------------------------------------------------------
# The sweep: every setting at every rank against plain LoRA at the same rank

SCORED = ("fidelity", "recolour", "background", "prior")  # higher is better; a "win" is on one of these


def compare(results: dict, reference: tuple[str, int], others: list[tuple[str, int]]) -> dict:
    """{metric: {(method, rank): (raw p, Holm p)}}: each of ``others`` against ``reference``, Holm over others."""
    table_ = {}
    for metric in METRICS:
        raw = [rank_sum_test([r[metric] for r in results[o]], [r[metric] for r in results[reference]]) for o in others]
        table_[metric] = {o: (p, q) for o, p, q in zip(others, raw, holm(raw))}
    return table_


def wins(results: dict, reference: tuple[str, int], comparisons: dict, alpha: float = 0.05) -> list[tuple]:
    """(setting, metric, its mean, the reference's mean, Holm p) where a MoSLoRA setting beats the reference."""
    found = []
    for metric in SCORED:
        for cell, (_, q) in comparisons[metric].items():
            mine = mean_spread([r[metric] for r in results[cell]])[0]
            theirs = mean_spread([r[metric] for r in results[reference]])[0]
            if cell[0].startswith("moslora") and q < alpha and mine > theirs:
                found.append((cell, metric, mine, theirs, q))
    return found


def sweep_table(results: dict, args, base_figures: dict, all_comparisons: dict) -> str:
    lines = [
        f"| rank | setting | fidelity | recolour | background | prior (base {base_figures['prior']:.2f}) | final loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for rank in args.ranks:
        for method in args.methods:
            cell = (method, rank)
            if cell not in args.cells or cell not in results:
                continue
            cells = []
            for metric in METRICS:
                m, sd = mean_spread([r[metric] for r in results[cell]])
                text = f"{m:.3f} ± {sd:.3f}" if metric == "final_loss" else f"{m:.2f} ± {sd:.2f}"
                p = all_comparisons.get(rank, {}).get(metric, {}).get(cell)
                if p is not None:
                    text += f" (p {p[0]:.3f}, Holm {p[1]:.2f})"
                cells.append(text)
            seeds = "" if len(results[cell]) == args.seeds else f" ({len(results[cell])} seeds)"
            lines.append(f"| {rank} | {method}{seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def draw_sweep(path: Path, results: dict, args) -> None:
    """One panel per metric: its mean over seeds against rank (log scale), a line per setting."""
    from PIL import Image, ImageDraw

    palette = [(120, 120, 120), (0, 0, 0), (214, 39, 40), (31, 119, 180), (44, 160, 44), (148, 103, 189),
               (255, 127, 14), (140, 86, 75), (227, 119, 194)]  # fmt: skip
    W, H, pad = 300, 240, 36
    legend_h = 16 * len(args.methods) + 10
    canvas = Image.new("RGB", (W * len(METRICS), H + legend_h), "white")
    draw = ImageDraw.Draw(canvas)
    xs = {r: i for i, r in enumerate(sorted(args.ranks))}
    for k, metric in enumerate(METRICS):
        x0 = k * W
        means = {
            m: [
                (q, mean_spread([r[metric] for r in results[(m, q)]])[0])
                for q in args.ranks
                if (m, q) in args.cells and (m, q) in results
            ]
            for m in args.methods
        }
        values = [v for ys in means.values() for _, v in ys if not math.isnan(v)]
        lo, hi = (0.0, 1.0) if metric != "final_loss" else (min(values, default=0), max(values, default=1))
        hi = hi if hi > lo else lo + 1
        draw.rectangle((x0 + pad, 20, x0 + W - 10, H - pad), outline="black")
        draw.text((x0 + pad, 4), metric, fill="black")
        draw.text((x0 + 2, 20), f"{hi:.2f}", fill="black")
        draw.text((x0 + 2, H - pad - 10), f"{lo:.2f}", fill="black")
        for rank, i in xs.items():
            x = x0 + pad + 8 + (W - 26 - pad) * i / max(1, len(xs) - 1)
            draw.text((x - 4, H - pad + 4), str(rank), fill="black")
        draw.text((x0 + W // 2 - 10, H - pad + 18), "rank", fill="black")
        for j, (method, ys) in enumerate(means.items()):
            colour = palette[j % len(palette)]
            pts = [
                (
                    x0 + pad + 8 + (W - 26 - pad) * xs[q] / max(1, len(xs) - 1),
                    H - pad - (H - pad - 20) * (y - lo) / (hi - lo),
                )
                for q, y in ys
            ]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=3 if method == "lora" else 2)
            for x, y in pts:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
    for j, method in enumerate(args.methods):
        draw.text((10, H + 4 + 16 * j), f"-- {method}", fill=palette[j % len(palette)])
    canvas.save(path)


def sweep(args, out, runs_dir, class_dir, base_figures, started) -> int:
    results: dict[tuple[str, int], list[dict]] = {}
    log = out / "sweep_runs.jsonl"  # one line per finished run: an interrupted sweep loses nothing (--resume)
    done = set()
    if args.resume and log.is_file():
        for line in log.read_text().splitlines():
            run_ = json.loads(line)
            results.setdefault((run_["method"], run_["rank"]), []).append(run_["figures"])
            done.add((run_["method"], run_["rank"], run_["figures"]["seed"]))
        print(f"--resume: {len(done)} run(s) already in {log}", flush=True)
    elif log.exists():
        log.unlink()  # empty: parse_args refused a non-empty one

    def run(cells: list[tuple[str, int, int]]) -> None:
        tasks = [
            (args, m, seed, train_rank, runs_dir / f"{m}-r{rank}-seed{seed}", class_dir)
            for seed in range(args.seeds)  # seeds outermost: a sweep cut short has every cell at about as many
            for m, rank, train_rank in cells
            if (m, rank, seed) not in done
        ]
        by_train_rank = {(m, train_rank): rank for m, rank, train_rank in cells}
        for method, train_rank, seed, figures, _, _ in run_tasks(tasks, args):
            rank = by_train_rank[(method, train_rank)]
            figures = dict(seed=seed, trained_rank=train_rank, **figures)
            results.setdefault((method, rank), []).append(figures)
            with log.open("a") as f:
                f.write(json.dumps(dict(method=method, rank=rank, figures=figures)) + "\n")
            print(f"{method} r{rank} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()), flush=True)
            shutil.rmtree(runs_dir / f"{method}-r{rank}-seed{seed}", ignore_errors=True)

    if not args.report_only:
        run([(m, r, r) for m, r in args.cells])
    comparisons = {
        r: compare(
            results, ("lora", r), [(m, q) for m, q in args.cells if q == r and m != "lora" and (m, q) in results]
        )
        for r in args.ranks
    }
    found = [w for r in args.ranks for w in wins(results, ("lora", r), comparisons[r])]
    # Where a MoSLoRA setting beats LoRA: is it the mixer, its initial A, or its r^2 extra parameters?
    control_ranks = sorted({cell[1] for cell, *_ in found})
    matched = {r: matched_rank(args.base, r, target_modules_arg(args))[0] for r in control_ranks}
    if not args.report_only:
        run([(m, r, matched[r] if m == "lora_matched" else r) for r in control_ranks for m in SWEEP_CONTROLS])
    control_comparisons = {
        (cell, control): compare(results, (control, cell[1]), [cell])
        for cell in sorted({cell for cell, *_ in found})
        for control in SWEEP_CONTROLS
        if (control, cell[1]) in results  # --report_only: controls not run yet
    }
    minutes = (time.perf_counter() - started) / 60
    trained = sum(x.get("train_seconds", 0.0) for runs in results.values() for x in runs) / 60
    header = protocol(args, minutes)
    if done and not args.report_only:
        header += f" for the runs not yet in {log.name}, {len(done)} taken from it (--resume)"
    header += f"; {sum(map(len, results.values()))} runs, {trained:.0f} min of training summed over them"

    lines = [header, ""]
    lines.append(
        "Each setting against plain LoRA (`lora`) at the same rank: exact two-sided rank-sum p-value, and Holm's "
        "correction over the settings compared at that rank (one family per rank and metric)."
    )
    lines += ["", sweep_table(results, args, base_figures, comparisons)]
    if found:
        lines += ["Where a MoSLoRA setting beats plain LoRA (Holm p < 0.05), against the controls at that rank:", ""]
        lines += ["| setting (rank) | metric | its mean | lora's | Holm p | vs init_only p | vs lora_matched p |"]
        lines += ["|---|---|---|---|---|---|---|"]
        for cell, metric, mine, theirs, q in found:
            ps = [control_comparisons.get((cell, c), {}).get(metric, {}).get(cell) for c in SWEEP_CONTROLS]
            lines.append(
                f"| {cell[0]} ({cell[1]}) | {metric} | {mine:.2f} | {theirs:.2f} | {q:.3f} | "
                + " | ".join("not run" if p is None else f"{p[0]:.3f}" for p in ps)
                + " |"
            )
        lines.append("")
        for r in control_ranks:
            for c in (c for c in SWEEP_CONTROLS if (c, r) in results):
                m = {k: mean_spread([x[k] for x in results[(c, r)]])[0] for k in METRICS}
                lines.append(f"- {c} at rank {r} (trained rank {results[(c, r)][0]['trained_rank']}): " + ", ".join(
                    f"{k} {v:.2f}" for k, v in m.items()))  # fmt: skip
    else:
        lines += ["No MoSLoRA setting beats plain LoRA at any rank on any metric (Holm p < 0.05): no controls run.", ""]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    (out / "sweep.md").write_text(text)
    (out / "sweep.json").write_text(
        json.dumps(
            dict(
                args={k: repo_relative(v) for k, v in vars(args).items()},
                base=base_figures,
                minutes=round(minutes, 1),
                runs=[
                    dict(method=m, rank=r, **x)
                    for (m, r), runs in results.items()
                    if (m, r) in args.cells
                    for x in runs
                ],
                comparisons=[
                    dict(rank=r, metric=metric, setting=cell[0], p=p, holm=q)
                    for r, by_metric in comparisons.items()
                    for metric, cells in by_metric.items()
                    for cell, (p, q) in cells.items()
                ],
                wins=[dict(setting=c[0], rank=c[1], metric=m, mean=a, lora=b, holm=q) for c, m, a, b, q in found],
            ),
            indent=1,
        )
        + "\n"  # fmt: skip
    )
    draw_sweep(out / "sweep.png", results, args)
    print(f"wrote {out / 'sweep.md'}, {out / 'sweep.json'} and {out / 'sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
