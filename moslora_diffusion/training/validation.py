"""Validation images: each prompt with its own fixed seed, saved as one labelled PNG grid per validation step.

Prompt i is sampled from a generator seeded with ``seed + i``, so each prompt's images are comparable
across steps (and the first prompt's are those of a one-prompt run). The grid has a row per prompt, the
prompt written above it, and a caption file beside it (``step_000100.txt``: one "row N: prompt" line each).

Generation runs inside ``torch.random.fork_rng`` with its own generators, so validating (or not) never
changes the training run's random streams: a resumed run stays bit-exact whatever --validation_steps is.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..fileio import atomic_path

_LABEL_HEIGHT = 14  # PIL's default bitmap font is about 11 px tall


def labelled_grid(rows: list[tuple[str, list[Image.Image]]]) -> Image.Image:
    """One row of images per (prompt, images), the prompt written in a strip above its row (clipped to the width)."""
    width, height = rows[0][1][0].size
    cols = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (cols * width, len(rows) * (_LABEL_HEIGHT + height)), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for r, (prompt, images) in enumerate(rows):
        top = r * (_LABEL_HEIGHT + height)
        draw.text((2, top + 1), prompt, fill="black", font=font)
        for c, image in enumerate(images):
            grid.paste(image.convert("RGB"), (c * width, top + _LABEL_HEIGHT))
    return grid


def save_png(image: Image.Image, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def read_prompts_file(path: str | Path) -> tuple[str, ...]:
    """The prompts of a text file, one a line (blank lines skipped); ValueError naming the file otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"--validation_prompts_file '{path}' does not exist") from None
    except UnicodeDecodeError as err:
        raise ValueError(
            f"--validation_prompts_file '{path}' is not UTF-8 text (byte {err.start}); save it as UTF-8"
        ) from None
    except OSError as err:
        raise ValueError(f"--validation_prompts_file '{path}' cannot be read ({err.strerror or err})") from None
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not prompts:
        raise ValueError(f"--validation_prompts_file '{path}' holds no prompt (one a line expected)")
    return prompts


@contextlib.contextmanager
def model_cpu_offload(pipeline, enabled: bool, device: torch.device):
    """diffusers' ``enable_model_cpu_offload`` for the block (CUDA only), then every model back where it was."""
    if not enabled or device.type != "cuda":
        yield
        return
    places = {
        name: (component, next(component.parameters()).device)
        for name, component in pipeline.components.items()
        if isinstance(component, torch.nn.Module) and any(True for _ in component.parameters())
    }
    pipeline.enable_model_cpu_offload(device=device)
    try:
        yield
    finally:
        pipeline.remove_all_hooks()
        for component, place in places.values():
            torch.nn.Module.to(component, device=place)


def generate_validation_images(
    pipeline,
    prompts: tuple[str, ...] | list[str],
    num_images: int,
    seed: int,
    call_kwargs: dict,
    models: list[torch.nn.Module],
    autocast=contextlib.nullcontext,
    negative_prompt: str | None = None,
    cpu_offload: bool = False,
) -> list[tuple[str, list[Image.Image]]]:
    """``num_images`` images of each prompt, prompt i from a generator seeded with ``seed + i``: (prompt, images)
    per prompt, models in eval mode meanwhile. Empty when ``num_images`` is 0.

    ``autocast`` (e.g. ``accelerator.autocast``) lets fp32 adapters run inside a half-precision base;
    ``cpu_offload`` runs the pipeline under diffusers' model CPU offload (on CUDA; ignored elsewhere).
    """
    if num_images == 0:
        return []
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    device = pipeline.device  # where the models live; under offload they move, the generators stay here
    extra = {"negative_prompt": negative_prompt} if negative_prompt else {}
    try:
        devices = [device] if device.type == "cuda" else []
        with (
            torch.no_grad(),
            torch.random.fork_rng(devices=devices),
            autocast(),
            model_cpu_offload(pipeline, cpu_offload, device),
        ):
            rows = []
            for i, prompt in enumerate(prompts):
                generator = torch.Generator(device=device).manual_seed(seed + i)
                images = [
                    pipeline(prompt=prompt, generator=generator, output_type="pil", **extra, **call_kwargs).images[0]
                    for _ in range(num_images)
                ]
                rows.append((prompt, images))
            return rows
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)


def log_validation(
    accelerator, rows: list[tuple[str, list[Image.Image]]], path: str | Path, step: int, tag: str = "validation"
) -> Path:
    """Save the labelled grid of ``rows`` to ``path`` with its caption file (``path`` with .txt), and send the
    images to TensorBoard when it is a tracker."""
    saved = save_png(labelled_grid(rows), path)
    with atomic_path(Path(path).with_suffix(".txt")) as tmp:
        tmp.write_text("".join(f"row {r}: {prompt}\n" for r, (prompt, _) in enumerate(rows, start=1)), encoding="utf-8")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for r, (_, images) in enumerate(rows):
                stacked = np.stack([np.asarray(image.convert("RGB")) for image in images])
                tracker.writer.add_images(tag if len(rows) == 1 else f"{tag}/{r}", stacked, step, dataformats="NHWC")
    return saved
