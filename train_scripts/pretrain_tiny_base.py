#!/usr/bin/env python
"""Pretrain the bundled tiny base: a real StableDiffusionPipeline of the world in moslora_diffusion.world.

Three stages, all on CPU, deterministic given --seed and --threads:

1. a pool of rendered images (4 shapes x 4 colours x 2 backgrounds, jittered in place and size);
2. an AutoencoderKL (16, 32; no mid-block attention) -> 16x16x4 latents, trained on the pool (MSE + a small KL term); its
   scaling_factor is 1/std of the pool's latents, as in Stable Diffusion;
3. a UNet2DConditionModel (cross-attention at 8x8 and 4x4 only) and a CLIPTextModel (64 wide, 3 layers)
   trained jointly on epsilon prediction with min-SNR weighting, captions with parts left out (so "a
   photo of a shape" is a class prompt) and 10% dropped (so classifier-free guidance works), EMA weights.

It saves the pipeline (safetensors, DDIM scheduler) to --output_dir, scores it with the world's evaluator
on every class prompt ("a photo of a <colour> <shape>") and writes eval.json and a sample grid there:

    python train_scripts/pretrain_tiny_base.py --output_dir samples/tiny-base --stop_after 2000   # ~25 min, 2 CPU cores
    python train_scripts/pretrain_tiny_base.py --evaluate samples/tiny-base --eval_images 8      # score it again

samples/tiny-base is that run (seed 0, 2 threads): it passed the targets (>= 90% colour, >= 80% shape) at
the step-2000 evaluation of the 8000-step schedule, so it stops there.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

try:
    from moslora_diffusion import world
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from moslora_diffusion import world


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output_dir", default="samples/tiny-base")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (results are deterministic for a given count)")
    p.add_argument("--pool_size", type=int, default=8192, help="rendered training images")
    p.add_argument("--vae_steps", type=int, default=1000)
    p.add_argument("--unet_steps", type=int, default=8000)
    p.add_argument(
        "--stop_after",
        type=int,
        default=None,
        help="stop after this many steps of the --unet_steps schedule and save (samples/tiny-base: 2000)",
    )
    p.add_argument(
        "--evaluate",
        default=None,
        metavar="DIR",
        help="only score the pipeline in DIR on the class prompts and write DIR/eval.json and DIR/class_prompts.png",
    )
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--ema_decay", type=float, default=0.998)
    p.add_argument("--snr_gamma", type=float, default=5.0)
    p.add_argument("--eval_images", type=int, default=8, help="images per class prompt in the final evaluation")
    p.add_argument(
        "--eval_every",
        type=int,
        default=2000,
        help="also evaluate (4 images per prompt) and save a snapshot to <output_dir>.step-N every N UNet steps (0: never)",
    )
    p.add_argument("--log_every", type=int, default=100)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Models


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        mid_block_add_attention=False,
        sample_size=world.SIZE,
    )


def make_unet(cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=world.SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def make_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=64,
    )
    return CLIPTextModel(config)


def make_schedulers():
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    train = DDPMScheduler(**common, prediction_type="epsilon")
    sample = DDIMScheduler(
        **common, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon"
    )
    return train, sample


# --------------------------------------------------------------------------------------------------
# Stages


def render_pool(n: int, seed: int):
    rng = random.Random(seed)
    images, attrs = [], []
    for _ in range(n):
        shape, colour, bg = (
            rng.choice(world.BASE_SHAPES),
            rng.choice(list(world.COLOURS)),
            rng.choice(list(world.BACKGROUNDS)),
        )
        images.append(np.asarray(world.render(shape, colour, bg, rng=rng), dtype=np.float32))
        attrs.append((shape, colour, bg))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1.0
    return pixels.contiguous(), attrs


def train_vae(vae, pixels, args, gen):
    opt = torch.optim.AdamW(vae.parameters(), lr=args.learning_rate, weight_decay=0.0)
    vae.train()
    t0 = time.perf_counter()
    for step in range(1, args.vae_steps + 1):
        idx = torch.randint(0, len(pixels), (args.batch_size,), generator=gen)
        x = pixels[idx]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / (x[0].numel())
        loss = mse + 1e-4 * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == args.vae_steps:
            print(
                f"vae step {step}/{args.vae_steps} mse {mse.item():.5f} kl {kl.item():.4f} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    vae.eval()
    with torch.no_grad():
        stats = [vae.encode(pixels[i : i + 256]).latent_dist for i in range(0, len(pixels), 256)]
        means = torch.cat([d.mean for d in stats])
        stds = torch.cat([d.std for d in stats])
        recon = torch.cat([vae.decode(means[i : i + 256]).sample for i in range(0, min(len(means), 1024), 256)])
    err = (recon.clamp(-1, 1) - pixels[: len(recon)]).abs().mul(127.5).mean().item()
    print(f"vae: mean abs reconstruction error {err:.2f}/255 on {len(recon)} pool images", flush=True)
    return means, stds, err


def caption_batch(attrs, idx, rng: random.Random) -> list[str]:
    out = []
    for i in idx.tolist():
        shape, colour, bg = attrs[i]
        if rng.random() < 0.1:
            out.append("")  # caption dropout: the unconditional prompt for classifier-free guidance
            continue
        out.append(
            world.caption(
                shape if rng.random() > 0.15 else None,
                colour if rng.random() > 0.15 else None,
                bg if rng.random() > 0.3 else None,
            )
        )
    return out


def encode_prompts(tokenizer, text_encoder, prompts):
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids)[0]


def train_unet(unet, text_encoder, tokenizer, means, stds, attrs, scaling_factor, args, gen, rng, on_eval=None):
    from diffusers.training_utils import EMAModel, compute_snr

    train_sched, _ = make_schedulers()
    models = torch.nn.ModuleList([unet, text_encoder])
    params = [p for p in models.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=1e-2)
    warmup = 200

    def lr_at(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.unet_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema = EMAModel(models.parameters(), decay=args.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3)
    models.train()
    t0, losses = time.perf_counter(), []
    for step in range(1, args.unet_steps + 1):
        idx = torch.randint(0, len(means), (args.batch_size,), generator=gen)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = torch.randint(0, train_sched.config.num_train_timesteps, (args.batch_size,), generator=gen)
        noisy = train_sched.add_noise(latents, noise, timesteps)
        hidden = encode_prompts(tokenizer, text_encoder, caption_batch(attrs, idx, rng))
        pred = unet(noisy, timesteps, hidden).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        snr = compute_snr(train_sched, timesteps)
        weights = torch.clamp(snr, max=args.snr_gamma) / snr
        loss = (per_sample * weights).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema.step(models.parameters())
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.unet_steps:
            rate = step / (time.perf_counter() - t0)
            print(
                f"unet step {step}/{args.unet_steps} loss {np.mean(losses[-args.log_every :]):.4f} lr {sched.get_last_lr()[0]:.2e} ({rate:.2f} steps/s)",
                flush=True,
            )
        if args.stop_after and step >= args.stop_after:
            break
        if on_eval and args.eval_every and step % args.eval_every == 0 and step < args.unet_steps:
            ema.store(models.parameters())
            ema.copy_to(models.parameters())
            models.eval()
            on_eval(step)
            ema.restore(models.parameters())
            models.train()
    ema.copy_to(models.parameters())
    models.eval()
    return losses


# --------------------------------------------------------------------------------------------------
# Evaluation


def class_prompt_accuracy(pipe, images_per_prompt: int, seed: int, steps: int = 25, guidance: float = 4.0):
    """Colour, shape and joint accuracy on every "a photo of a <colour> <shape>" prompt (no object = fail)."""
    cells, grid_rows = {}, []
    for shape in world.BASE_SHAPES:
        row = []
        for colour in world.COLOURS:
            prompt = world.caption(shape, colour, None)
            gen = torch.Generator().manual_seed(seed)
            images = pipe(
                [prompt] * images_per_prompt, num_inference_steps=steps, guidance_scale=guidance, generator=gen
            ).images
            verdicts = [world.evaluate(im) for im in images]
            cells[prompt] = dict(
                colour=sum(v.matches(colour=colour) for v in verdicts) / len(verdicts),
                shape=sum(v.matches(shape=shape) for v in verdicts) / len(verdicts),
                both=sum(v.matches(shape=shape, colour=colour) for v in verdicts) / len(verdicts),
            )
            row.extend(images[:4])
        grid_rows.append(row)
    summary = {k: float(np.mean([c[k] for c in cells.values()])) for k in ("colour", "shape", "both")}
    return summary, cells, grid_rows


def save_grid(rows, path: Path, scale: int = 2):
    from PIL import Image

    h, w = len(rows), max(len(r) for r in rows)
    s = world.SIZE * scale
    grid = Image.new("RGB", (w * s, h * s), (128, 128, 128))
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(im.resize((s, s), Image.Resampling.NEAREST), (x * s, y * s))
    grid.save(path)


def build_pipeline(vae, text_encoder, tokenizer, unet):
    from diffusers import StableDiffusionPipeline

    _, sample_sched = make_schedulers()
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sample_sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def evaluate_only(args) -> int:
    from diffusers import StableDiffusionPipeline

    folder = Path(args.evaluate)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    summary, cells, rows = class_prompt_accuracy(pipe, args.eval_images, args.seed + 1)
    save_grid(rows, folder / "class_prompts.png")
    report = dict(accuracy=summary, images_per_prompt=args.eval_images, seed=args.seed + 1, per_prompt=cells)
    (folder / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"{folder}: class prompts {summary} ({args.eval_images} images per prompt, {time.perf_counter() - started:.0f} s)"
    )
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.evaluate:
        return evaluate_only(args)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed)
    out = Path(args.output_dir)
    started = time.perf_counter()

    pixels, attrs = render_pool(args.pool_size, args.seed)
    print(f"pool: {len(pixels)} images rendered ({time.perf_counter() - started:.0f} s)", flush=True)

    vae = make_vae()
    means, stds, vae_err = train_vae(vae, pixels, args, gen)
    scaling_factor = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    vae.requires_grad_(False)
    print(f"vae: latent std {means.std():.3f} -> scaling_factor {scaling_factor:.4f}", flush=True)

    tokenizer = world.make_tokenizer()
    text_encoder = make_text_encoder(tokenizer)
    unet = make_unet(text_encoder.config.hidden_size)
    n_params = sum(p.numel() for m in (vae, text_encoder, unet) for p in m.parameters())
    print(f"models: {n_params / 1e6:.2f} M parameters", flush=True)

    history = []

    def on_eval(step):
        pipe = build_pipeline(vae, text_encoder, tokenizer, unet)
        pipe.set_progress_bar_config(disable=True)
        summary, _, _ = class_prompt_accuracy(pipe, 4, args.seed)
        history.append(dict(step=step, **summary))
        from moslora_diffusion.fileio import atomic_directory

        with atomic_directory(f"{out}.step-{step}", overwrite=True) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
        print(f"eval at step {step}: {summary}", flush=True)

    losses = train_unet(unet, text_encoder, tokenizer, means, stds, attrs, scaling_factor, args, gen, rng, on_eval)
    train_seconds = time.perf_counter() - started

    pipe = build_pipeline(vae, text_encoder, tokenizer, unet)
    pipe.set_progress_bar_config(disable=True)
    from moslora_diffusion.fileio import atomic_directory

    summary, cells, rows = class_prompt_accuracy(pipe, args.eval_images, args.seed + 1)
    with atomic_directory(out, overwrite=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        size = sum(f.stat().st_size for f in tmp.rglob("*.safetensors"))
        save_grid(rows, tmp / "class_prompts.png")
        report = dict(
            seed=args.seed, threads=args.threads, train_seconds=round(train_seconds), vae_mean_abs_error=round(vae_err, 3),
            parameters=n_params, weights_bytes=size, final_loss=float(np.mean(losses[-100:])), accuracy=summary,
            per_prompt=cells, history=history, args=vars(args),
        )  # fmt: skip
        (tmp / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"saved {out} ({size / 1e6:.1f} MB) after {train_seconds / 60:.1f} min; class prompts: {summary}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
