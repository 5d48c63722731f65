"""Validation images: generated with a fixed seed, saved as a PNG grid, logged to TensorBoard.

Generation runs inside ``torch.random.fork_rng`` with its own generator, so validating (or not) never
changes the training run's random streams: a resumed run stays bit-exact whatever --validation_steps is.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..fileio import atomic_path


def image_grid(images: list[Image.Image]) -> Image.Image:
    """Images side by side in a near-square grid (all the size of the first)."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % cols) * width, (i // cols) * height))
    return grid


def save_png(image: Image.Image, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def generate_validation_images(
    pipeline, prompt: str, num_images: int, seed: int, call_kwargs: dict, models: list[torch.nn.Module],
    autocast=contextlib.nullcontext,
) -> list[Image.Image]:
    """``num_images`` images of ``prompt`` from one generator seeded with ``seed`` (models in eval mode meanwhile).

    ``autocast`` (e.g. ``accelerator.autocast``) lets fp32 adapters run inside a half-precision base.
    """
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        devices = [pipeline.device] if pipeline.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices), autocast():
            generator = torch.Generator(device=pipeline.device).manual_seed(seed)
            return [pipeline(prompt, generator=generator, output_type="pil", **call_kwargs).images[0] for _ in range(num_images)]
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)


def log_validation(accelerator, images: list[Image.Image], path: str | Path, step: int, tag: str = "validation") -> Path:
    """Save the grid of ``images`` to ``path`` and send them to TensorBoard when it is a tracker."""
    saved = save_png(image_grid(images), path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(image.convert("RGB")) for image in images])
            tracker.writer.add_images(tag, stacked, step, dataformats="NHWC")
    return saved
