"""The DreamBooth trainer end to end, on the configuration diffusers' train_dreambooth_lora.py was measured on.

The base is a tiny random SD 1.x pipeline sized as diffusers' own tests (UNet block_out_channels (32, 64),
2 layers per block, cross-attention 32, sample_size 32; VAE (32, 64); CLIP text encoder, hidden 32, 5
layers), saved with save_pretrained and loaded from that folder. Every run is a fresh process training at
64 px, batch 1, rank 4, fp32 on the CPU, on samples/subject (five 32 px images, resized to 64 px as the
peer resizes them). It measures:

- start-up: wall clock from just before the process is spawned to the start of the first step, and to
  the end of the imports;
- steps/s over the steps after the first ``--skip`` (a global torch.optim step hook), and CPU ms per step
  (the process's CPU time over the same steps: much less stretched than the wall clock by other jobs);
- class-image generation: 10 images, 50 sampling steps, batches of 4 (the default of ours and of
  diffusers' scripts), into an empty class folder;
- peak memory: the child's resident high-water mark (ru_maxrss from wait4).

Two trainers run, interleaved round by round:

- ``ours``: ``moslora train`` (the ``moslora`` command's main, in a child that records timestamps);
  configurations ``uncached``, ``cached`` (--cache_latents), ``cached_text`` (--cache_latents and
  --cache_text_encoder_outputs: neither VAE nor text encoder runs in a step), ``compiled`` (both caches and
  --compile: torch.compile's inductor on the denoiser; its first step holds the compile, outside the timed
  steps) and ``class_images`` (--with_prior_preservation).
- ``peer``: the code path of diffusers' examples/dreambooth/train_dreambooth_lora.py, re-enacted in
  :func:`peer_child`: its import block (less torchvision, which fails beside the CPU torch wheel, so the
  script itself cannot run here), its loading, PEFT LoRA injection, per-step text encoding, training loop
  and class-image loop, with torchvision's four transforms done by PIL and numpy. It has no latent
  caching. It exists to measure the peer's path under the same load as ours; the figures of the real
  script (measured earlier on this machine) are printed beside them.

    python benchmarks/bench_trainer.py --rounds 3 --threads 1 --json benchmarks/results/trainer_sd1_tiny_cpu.json

This module imports only the standard library at the top: its children run
``python benchmarks/bench_trainer.py --child ...``, and their heavy imports count in their start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUBJECT = REPO / "samples" / "subject"
PROMPT = "a photo of sks cross"
CLASS_PROMPT = "a photo of a cross"
NUM_CLASS_IMAGES, CLASS_SAMPLING_STEPS, SAMPLE_BATCH_SIZE = 10, 50, 4

# diffusers' examples/dreambooth/train_dreambooth_lora.py on this base, measured earlier on this machine.
PEER_FIGURES = {"startup_s": 5.1, "imports_s": 4.4, "steps_per_s": 16.0, "class_images_s": "10-11"}

# (trainer, configuration) pairs, in the order a round runs them.
RUNS = [
    ("ours", "uncached"),
    ("peer", "uncached"),
    ("ours", "cached"),
    ("ours", "cached_text"),
    ("ours", "compiled"),
    ("ours", "class_images"),
    ("peer", "class_images"),
]
OURS_FLAGS = {
    "uncached": [],
    "cached": ["--cache_latents"],
    "cached_text": ["--cache_latents", "--cache_text_encoder_outputs"],
    "compiled": ["--cache_latents", "--cache_text_encoder_outputs", "--compile"],
    "class_images": ["--with_prior_preservation", "--class_prompt", CLASS_PROMPT, "--num_class_images", str(NUM_CLASS_IMAGES),
                     "--num_inference_steps", str(CLASS_SAMPLING_STEPS), "--sample_batch_size", str(SAMPLE_BATCH_SIZE)],
}  # fmt: skip


# ------------------------------------------------------------------------------------------------ the base


def build_peer_base(path: Path) -> Path:
    """The tiny SD 1.x pipeline of diffusers' StableDiffusionPipeline tests, 64 px, saved to ``path``."""
    import torch
    import transformers
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from moslora_diffusion.testing import make_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )  # fmt: skip
    tokenizer = make_clip_tokenizer()  # character-level, built in memory: the hub's tiny tokenizer is out of reach
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length, layer_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(path, safe_serialization=True)
    return path


# ------------------------------------------------------------------------------------------------ the children


class Record:
    """What a child measures, written as JSON when it exits: (wall, CPU) times of events and of every optimizer step.

    CPU is this process's CPU time since it started (all threads), so CPU at the first step is start-up work
    that other jobs on the machine hardly stretch.
    """

    def __init__(self, path: str):
        import atexit

        self.path, self.data = Path(path), {"events": {}, "steps": []}
        atexit.register(lambda: self.path.write_text(json.dumps(self.data)))

    def event(self, name: str, at: float | None = None) -> None:
        self.data["events"].setdefault(name, (time.time() if at is None else at, time.process_time()))

    def hook_optimizer_steps(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(lambda *_: self.data["steps"].append((time.time(), time.process_time())))


def ours_child(record_path: str, train_argv: list[str]) -> int:
    """``moslora train`` in this process; its log lines mark the events."""
    import logging

    record = Record(record_path)
    marks = {"Generating ": "class_images_start", "Prior preservation: ": "class_images_end", "Training ": "first_step"}

    class Marker(logging.Handler):
        def emit(self, log_record):
            for prefix, name in marks.items():
                if log_record.name.startswith("moslora_diffusion") and log_record.getMessage().startswith(prefix):
                    record.event(name, log_record.created)

    # The recipe keeps the handlers it finds; this one turns its log lines into timestamps.
    logging.basicConfig(format="%(created).3f %(levelname)s %(name)s %(message)s")
    logging.getLogger().addHandler(Marker())
    import moslora_diffusion.cli  # what `moslora train` imports, the recipe included
    import moslora_diffusion.training.dreambooth  # noqa: F401

    record.event("imports_done")
    record.hook_optimizer_steps()
    return moslora_diffusion.cli.main(["train", *train_argv])


def peer_child(record_path: str, base: str, output_dir: str, steps: int, class_dir: str | None) -> int:
    """The path of diffusers' train_dreambooth_lora.py (its defaults; --rank 4, --resolution 64, --seed 0,
    --train_batch_size 1, fp32, no validation, no checkpoint before the end), re-enacted step for step."""
    record = Record(record_path)
    # The script's import block, less torchvision (see the module docstring).
    import copy  # noqa: F401
    import gc  # noqa: F401
    import logging
    import math

    import diffusers  # noqa: F401
    import numpy as np
    import torch
    import torch.nn.functional as F
    import torch.utils.checkpoint  # noqa: F401
    import transformers  # noqa: F401
    from accelerate import Accelerator
    from accelerate.logging import get_logger  # noqa: F401
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        DiffusionPipeline,
        UNet2DConditionModel,
    )  # noqa: F401
    from diffusers.loaders import StableDiffusionLoraLoaderMixin  # noqa: F401
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import _set_state_dict_into_text_encoder, cast_training_params  # noqa: F401
    from diffusers.utils import check_min_version, convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft  # noqa: F401
    from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card  # noqa: F401
    from diffusers.utils.import_utils import is_xformers_available  # noqa: F401
    from diffusers.utils.torch_utils import is_compiled_module  # noqa: F401
    from huggingface_hub import create_repo, upload_folder  # noqa: F401
    from huggingface_hub.utils import insecure_hashlib
    from packaging import version  # noqa: F401
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: F401
    from PIL import Image
    from PIL.ImageOps import exif_transpose
    from torch.utils.data import Dataset
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, PretrainedConfig

    record.event("imports_done")
    record.hook_optimizer_steps()
    resolution, seed, rank, with_prior = 64, 0, 4, class_dir is not None

    accelerator = Accelerator(
        project_config=ProjectConfiguration(project_dir=output_dir, logging_dir=str(Path(output_dir, "logs")))
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(seed)
    if with_prior:
        class_images_dir = Path(class_dir)
        class_images_dir.mkdir(parents=True, exist_ok=True)
        pipeline = DiffusionPipeline.from_pretrained(base, torch_dtype=torch.float32, safety_checker=None)
        pipeline.set_progress_bar_config(disable=True)
        sample_dataloader = accelerator.prepare(
            torch.utils.data.DataLoader([CLASS_PROMPT] * NUM_CLASS_IMAGES, batch_size=SAMPLE_BATCH_SIZE)
        )
        pipeline.to(accelerator.device)
        record.event("class_images_start")
        index = 0
        for prompts in tqdm(sample_dataloader, desc="Generating class images"):
            for image in pipeline(list(prompts)).images:  # 50 steps and guidance 7.5: the pipeline's defaults
                image.save(class_images_dir / f"{index}-{insecure_hashlib.sha1(image.tobytes()).hexdigest()}.jpg")
                index += 1
        record.event("class_images_end")
        del pipeline

    Path(output_dir).mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(base, subfolder="tokenizer", use_fast=False)
    architecture = PretrainedConfig.from_pretrained(base, subfolder="text_encoder").architectures[0]
    assert architecture == "CLIPTextModel", architecture
    from transformers import CLIPTextModel

    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    for model in (vae, text_encoder, unet):
        model.requires_grad_(False)
        model.to(accelerator.device, dtype=torch.float32)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]))  # fmt: skip
    params_to_optimize = list(filter(lambda p: p.requires_grad, unet.parameters()))
    optimizer = torch.optim.AdamW(params_to_optimize, lr=5e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    def transform(image):  # Resize(64, bilinear), RandomCrop(64), ToTensor(), Normalize([0.5], [0.5])
        scale = resolution / min(image.size)
        image = image.resize(
            (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))), Image.BILINEAR
        )
        top, left = (
            np.random.randint(0, image.height - resolution + 1),
            np.random.randint(0, image.width - resolution + 1),
        )
        image = image.crop((left, top, left + resolution, top + resolution))
        return (torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1) - 0.5) / 0.5

    class DreamBoothDataset(Dataset):
        def __init__(self):
            # The script lists every file of the folder: the .caption files beside the sample images would crash it.
            self.instance = sorted(p for p in SUBJECT.iterdir() if p.suffix == ".png")
            self.klass = sorted(Path(class_dir).iterdir()) if with_prior else []

        def __len__(self):
            return max(len(self.instance), len(self.klass))

        def _example(self, paths, index, prompt):
            image = exif_transpose(Image.open(paths[index % len(paths)]))
            image = image if image.mode == "RGB" else image.convert("RGB")
            text = tokenizer(
                prompt,
                truncation=True,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                return_tensors="pt",
            )
            return transform(image), text.input_ids

        def __getitem__(self, index):
            example = {"instance": self._example(self.instance, index, PROMPT)}
            if with_prior:
                example["class"] = self._example(self.klass, index, CLASS_PROMPT)
            return example

    def collate_fn(examples):
        kinds = ["instance", "class"] if with_prior else ["instance"]
        pairs = [example[kind] for kind in kinds for example in examples]
        return {
            "pixel_values": torch.stack([p for p, _ in pairs]).float(),
            "input_ids": torch.cat([ids for _, ids in pairs]),
        }

    train_dataset = DreamBoothDataset()
    train_dataloader = torch.utils.data.DataLoader(train_dataset, batch_size=1, shuffle=True, collate_fn=collate_fn)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=500, num_training_steps=steps)
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        unet, optimizer, train_dataloader, lr_scheduler
    )
    num_epochs = math.ceil(steps / len(train_dataloader))
    global_step = 0
    progress_bar = tqdm(range(0, steps), initial=0, desc="Steps")
    record.event("first_step")
    for _epoch in range(num_epochs):
        unet.train()
        for batch in train_dataloader:
            with accelerator.accumulate(unet):
                model_input = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(model_input)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (model_input.shape[0],)).long()
                noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
                encoder_hidden_states = text_encoder(
                    batch["input_ids"].to(text_encoder.device), attention_mask=None, return_dict=False
                )[0]
                model_pred = unet(
                    noisy_model_input, timesteps, encoder_hidden_states, class_labels=None, return_dict=False
                )[0]
                if with_prior:
                    model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
                    target, target_prior = torch.chunk(noise, 2, dim=0)
                    loss = F.mse_loss(model_pred.float(), target.float()) + F.mse_loss(
                        model_pred_prior.float(), target_prior.float()
                    )
                else:
                    loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params_to_optimize, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                progress_bar.update(1)
                global_step += 1
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
            progress_bar.set_postfix(**logs)
            accelerator.log(logs, step=global_step)
            if global_step >= steps:
                break
    accelerator.end_training()
    return 0


# ------------------------------------------------------------------------------------------------ the parent


def run_child(trainer: str, config: str, base: Path, work: Path, steps: int, round_index: int, env: dict) -> dict:
    tag = f"{trainer}-{config}-{round_index}"
    out, record_path = work / tag, work / f"{tag}.json"
    class_dir = str(out / "class") if config == "class_images" else None
    if trainer == "ours":
        argv = [
            "--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(SUBJECT), "--instance_prompt", PROMPT,
            "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "1", "--rank", "4", "--mixed_precision", "no",
            "--max_train_steps", str(steps), "--checkpointing_steps", str(10 * steps), "--num_validation_images", "0",
            "--report_to", "none", "--seed", "0", *OURS_FLAGS[config], *(["--class_data_dir", class_dir] if class_dir else []),
        ]  # fmt: skip
        command = [sys.executable, str(Path(__file__).resolve()), "--child", "ours", str(record_path), "--", *argv]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--child", "peer", str(record_path), "--",
                   str(base), str(out), str(steps), class_dir or ""]  # fmt: skip
    load_before = os.getloadavg()[0]
    with open(work / f"{tag}.log", "w") as log:
        started = time.time()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        ended = time.time()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{tag} failed with status {os.waitstatus_to_exitcode(status)}; see {work / f'{tag}.log'}")
    record = json.loads(record_path.read_text())
    events, step_times = record["events"], record["steps"]
    skip = min(5, len(step_times) - 2)
    timed = len(step_times) - 1 - skip
    result = {
        "wall_s": ended - started,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "load": (load_before + os.getloadavg()[0]) / 2,
        "imports_s": events["imports_done"][0] - started,
        "startup_s": events["first_step"][0] - started,
        "startup_cpu_s": events["first_step"][1],
        "first_step_s": step_times[0][0] - events["first_step"][0],
        "steps_per_s": timed / (step_times[-1][0] - step_times[skip][0]),
        "cpu_ms_per_step": 1000 * (step_times[-1][1] - step_times[skip][1]) / timed,
    }
    if config == "class_images":
        result["class_images_s"] = events["class_images_end"][0] - events["class_images_start"][0]
        result["class_images_cpu_s"] = events["class_images_end"][1] - events["class_images_start"][1]
    shutil.rmtree(out, ignore_errors=True)
    return result


def time_help(rounds: int, env: dict) -> list[float]:
    """Wall seconds of ``moslora train --help``: interpreter start, imports, parser."""
    moslora = shutil.which("moslora")
    command = [moslora] if moslora else [sys.executable, "-m", "moslora_diffusion"]
    times = []
    for _ in range(rounds):
        started = time.time()
        subprocess.run([*command, "train", "--help"], stdout=subprocess.DEVNULL, cwd=REPO, env=env, check=True)
        times.append(time.time() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of every configuration (medians reported)")
    parser.add_argument("--steps", type=int, default=150, help="training steps of the steps/s runs")
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS of the children (default: torch's, one per core)"
    )
    parser.add_argument(
        "--runs", nargs="+", default=[f"{t}:{c}" for t, c in RUNS], help="trainer:configuration pairs to run"
    )
    parser.add_argument(
        "--work_dir", default=None, help="base pipeline, logs and records (default: a temporary folder)"
    )
    parser.add_argument("--json", default=None, help="also write every run's numbers here")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    rest = rest[1:] if rest[:1] == ["--"] else rest
    if args.child:
        trainer, record_path = args.child
        if trainer == "ours":
            sys.exit(ours_child(record_path, rest))
        base, output_dir, steps, class_dir = rest
        sys.exit(peer_child(record_path, base, output_dir, int(steps), class_dir or None))

    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-trainer-"))
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base"
    if not (base / "model_index.json").is_file():
        sys.path.insert(0, str(REPO))
        build_peer_base(base)
    pairs = [tuple(pair.split(":")) for pair in args.runs]
    load_start = os.getloadavg()
    help_s = time_help(args.rounds, env)
    runs: dict[str, list[dict]] = {f"{t}:{c}": [] for t, c in pairs}
    for r in range(args.rounds):
        for trainer, config in pairs if r % 2 == 0 else pairs[::-1]:
            steps = 20 if config == "class_images" else args.steps
            runs[f"{trainer}:{config}"].append(run_child(trainer, config, base, work, steps, r, env))
            summary = ", ".join(f"{k} {v:.2f}" for k, v in runs[f"{trainer}:{config}"][-1].items())
            print(f"round {r} {trainer}:{config}: {summary}", file=sys.stderr, flush=True)
    load_end = os.getloadavg()
    report = {"threads": args.threads, "steps": args.steps, "rounds": args.rounds, "help_s": help_s, "runs": runs,
              "load_start": load_start, "load_end": load_end}  # fmt: skip
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


def markdown(report: dict) -> str:
    import torch

    runs = report["runs"]

    def cell(run: str, key: str, fmt: str = ".2f") -> str:
        values = [r[key] for r in runs.get(run, []) if key in r]
        if not values:
            return ""
        return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"

    def med(run: str, key: str) -> float:
        values = [r[key] for r in runs.get(run, []) if key in r]
        return statistics.median(values) if values else float("nan")

    def ratio(run: str, key: str, reference: str, reference_key: str | None = None) -> float:
        """Median over rounds of run / reference, each round's pair measured back to back (resists drift)."""
        pairs = [(a[key], b[reference_key or key]) for a, b in zip(runs.get(run, []), runs.get(reference, []))]
        return statistics.median(a / b for a, b in pairs) if pairs else float("nan")

    threads = report["threads"] or torch.get_num_threads()
    lines = [
        f"torch {torch.__version__}, {threads} thread(s) per process, {os.cpu_count()} CPUs; tiny SD 1.x (diffusers' test sizes), "
        f"64 px, batch 1, r=4, fp32; {report['steps']} steps per steps/s run, the first 5 not timed; {report['rounds']} rounds, "
        f"median (min-max); load average (1/5/15 min) {'/'.join(f'{x:.1f}' for x in report['load_start'])} at the start, "
        f"{'/'.join(f'{x:.1f}' for x in report['load_end'])} at the end, {statistics.median(r['load'] for rs in runs.values() for r in rs):.1f} "
        "median during runs",
        "",
        "| measurement | ours | peer's path, same load | peer script, earlier |",
        "|---|---|---|---|",
        f"| start-up to the first step (s) | {cell('ours:uncached', 'startup_s')} | {cell('peer:uncached', 'startup_s')} | {PEER_FIGURES['startup_s']} |",
        f"| of which imports (s) | {cell('ours:uncached', 'imports_s')} | {cell('peer:uncached', 'imports_s')} | {PEER_FIGURES['imports_s']} |",
        f"| CPU s to the first step | {cell('ours:uncached', 'startup_cpu_s')} | {cell('peer:uncached', 'startup_cpu_s')} | |",
        f"| first step (s) | {cell('ours:uncached', 'first_step_s')} | {cell('peer:uncached', 'first_step_s')} | |",
        f"| steps/s | {cell('ours:uncached', 'steps_per_s')} | {cell('peer:uncached', 'steps_per_s')} | ~{PEER_FIGURES['steps_per_s']:g} |",
        f"| CPU ms per step | {cell('ours:uncached', 'cpu_ms_per_step', '.0f')} | {cell('peer:uncached', 'cpu_ms_per_step', '.0f')} | |",
        f"| steps/s, --cache_latents | {cell('ours:cached', 'steps_per_s')} | (no such option) | |",
        f"| CPU ms per step, --cache_latents | {cell('ours:cached', 'cpu_ms_per_step', '.0f')} | | |",
        f"| cached / uncached steps/s (medians) | {med('ours:cached', 'steps_per_s') / med('ours:uncached', 'steps_per_s'):.2f} | | |",
        f"| steps/s, --cache_latents --cache_text_encoder_outputs | {cell('ours:cached_text', 'steps_per_s')} | (no such option) | |",
        f"| CPU ms per step, both caches | {cell('ours:cached_text', 'cpu_ms_per_step', '.0f')} | | |",
        f"| steps/s, both caches + --compile | {cell('ours:compiled', 'steps_per_s')} | (no such option) | |",
        f"| CPU ms per step, both caches + --compile | {cell('ours:compiled', 'cpu_ms_per_step', '.0f')} | | |",
        f"| first step with --compile: the compile (s) | {cell('ours:compiled', 'first_step_s', '.0f')} | | |",
        f"| --compile / eager steps/s, both caches | {ratio('ours:compiled', 'steps_per_s', 'ours:cached_text'):.2f} | | |",
        f"| steps/s x peer's path: uncached / --cache_latents / both caches / + --compile "
        "(target >= 1 / >= 1.3 / >= 1.3 / >= 1.3) | "
        f"{ratio('ours:uncached', 'steps_per_s', 'peer:uncached'):.2f} / "
        f"{ratio('ours:cached', 'steps_per_s', 'peer:uncached'):.2f} / "
        f"{ratio('ours:cached_text', 'steps_per_s', 'peer:uncached'):.2f} / "
        f"{ratio('ours:compiled', 'steps_per_s', 'peer:uncached'):.2f} | 1 | |",
        "| peer's CPU ms per step / ours: uncached / --cache_latents / both caches / + --compile | "
        + " / ".join(
            f"{ratio('peer:uncached', 'cpu_ms_per_step', f'ours:{config}'):.2f}"
            for config in ("uncached", "cached", "cached_text", "compiled")
        )
        + " | 1 | |",
        f"| start-up x peer's path (target <= 1) | {ratio('ours:uncached', 'startup_s', 'peer:uncached'):.2f} | 1 | |",
        f"| {NUM_CLASS_IMAGES} class images, {CLASS_SAMPLING_STEPS} steps, batch {SAMPLE_BATCH_SIZE} (s) | {cell('ours:class_images', 'class_images_s')} "
        f"| {cell('peer:class_images', 'class_images_s')} | {PEER_FIGURES['class_images_s']} |",
        f"| CPU s for the class images | {cell('ours:class_images', 'class_images_cpu_s')} | {cell('peer:class_images', 'class_images_cpu_s')} | |",
        f"| class images x peer's path (target <= 1) | {ratio('ours:class_images', 'class_images_s', 'peer:class_images'):.2f} | 1 | |",
    ]
    for config in ("uncached", "cached", "cached_text", "compiled", "class_images"):
        ours, peer = cell(f"ours:{config}", "peak_rss_mib", ".0f"), cell(f"peer:{config}", "peak_rss_mib", ".0f")
        if ours or peer:
            lines.append(f"| peak RSS, {config} run (MiB) | {ours} | {peer} | |")
    help_s = report["help_s"]
    lines.append(
        f"| `moslora train --help` (s) | {statistics.median(help_s):.2f} ({min(help_s):.2f}-{max(help_s):.2f}) | | |"
    )
    lines += [
        "",
        "Ratios \"x peer's path\" are medians over rounds of each round's ratio (the two runs of a round are back to back).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
