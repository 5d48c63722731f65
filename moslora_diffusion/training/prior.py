"""Prior preservation: make sure --class_data_dir holds --num_class_images images of the class.

Missing images are generated with the base pipeline (before any adapter is added), in batches of
--sample_batch_size, split across processes, and written one PNG at a time (atomically) so that an
interrupted run keeps what it made and the next run only generates the rest. Image ``i`` always comes
from the seed (seed, i), so the set does not depend on how many processes made it.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..datasets.images import ImageReadError, usable_images
from ..fileio import atomic_path

logger = logging.getLogger(__name__)


def existing_class_images(class_data_dir: str | Path) -> list[Path]:
    """The readable images already in ``class_data_dir`` (none if it is missing or empty)."""
    try:
        return usable_images(class_data_dir, "--class_data_dir")
    except ImageReadError:
        return []


def generate_class_images(
    accelerator,
    pipeline,
    class_data_dir: str | Path,
    class_prompt: str,
    num_class_images: int,
    *,
    sample_batch_size: int,
    seed: int,
    call_kwargs: dict,
    autocast=contextlib.nullcontext,
) -> int:
    """Generate the missing class images with ``pipeline``; returns how many were made (by all processes).

    ``autocast`` (e.g. ``accelerator.autocast``) covers bases whose parts differ in precision (SDXL's fp32 VAE).
    """
    class_data_dir = Path(class_data_dir)
    missing = num_class_images - len(existing_class_images(class_data_dir))
    if missing <= 0:
        return 0
    # Names not taken yet, numbered on from the images already there.
    names, index = [], 0
    while len(names) < missing:
        if not (class_data_dir / f"class_{index:05d}.png").exists():
            names.append(index)
        index += 1
    mine = names[accelerator.process_index :: accelerator.num_processes]
    logger.info("Generating %d class images for prior preservation into %s", missing, class_data_dir)
    device = pipeline.device
    batches = [mine[i : i + sample_batch_size] for i in range(0, len(mine), sample_batch_size)]
    with torch.no_grad(), torch.random.fork_rng(devices=[]), autocast():
        for batch in tqdm(batches, desc="Generating class images", disable=not accelerator.is_local_main_process):
            generators = [torch.Generator(device=device).manual_seed(seed * 100_003 + i) for i in batch]
            images = pipeline(
                prompt=[class_prompt] * len(batch), generator=generators, output_type="pil", **call_kwargs
            ).images
            for i, image in zip(batch, images):
                with atomic_path(class_data_dir / f"class_{i:05d}.png") as tmp:
                    image.save(tmp, format="PNG")
    accelerator.wait_for_everyone()
    return missing
