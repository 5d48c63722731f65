"""Masked loss: per-latent-pixel loss weights from an image's alpha channel or a mask file.

A mask (white = train here, black = ignore) takes exactly its image's geometry (the same
:class:`~moslora_diffusion.datasets.buckets.Placement`: resize, crop, flip), then is averaged over each
VAE cell (area downsampling) into weights in [0, 1] at latent size. Prior-preservation (``is_reg``)
images are never masked. The loss follows kohya: the squared error times the weight, averaged over all
latent pixels and channels, so a masked-out pixel adds nothing and the mean keeps its usual scale.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .buckets import Placement, Size, apply_placement
from .images import IMAGE_EXTENSIONS, load_image, names

logger = logging.getLogger(__name__)


class MaskError(ValueError):
    """A mask that does not fit its image; the message names both files."""


def find_masks(images: Sequence[Path], mask_dir: Path, source: str = "mask_dir") -> list[Path | None]:
    """Each image's mask in ``mask_dir`` (same stem, any image extension), or None (trained unmasked, warned)."""
    by_stem: dict[str, Path] = {}
    for path in sorted(Path(mask_dir).iterdir()):
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            by_stem.setdefault(path.stem, path)
    masks = [by_stem.get(image.stem) for image in images]
    missing = [image for image, mask in zip(images, masks) if mask is None]
    if missing:
        logger.warning(
            "%s '%s' has no mask for %d of %d images (%s); they are trained unmasked",
            source, mask_dir, len(missing), len(images), names(missing),
        )  # fmt: skip
    return masks


def load_mask(mask_path: Path, image_path: Path, image_size: Size) -> Image.Image:
    """The mask as mode "L", upright; a size other than its image's upright ``image_size`` is a MaskError."""
    mask, _ = load_image(mask_path)
    if mask.size != tuple(image_size):
        raise MaskError(
            f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} px but its image {image_path} is "
            f"{image_size[0]}x{image_size[1]} px; a mask must have its image's size"
        )
    return mask.convert("L")


def mask_weights(mask: Image.Image, placement: Placement, vae_scale_factor: int) -> torch.Tensor:
    """(1, h, w) loss weights in [0, 1]: the mask placed like its image, averaged over each VAE cell."""
    placed = apply_placement(mask, placement, resample=Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(placed, dtype=np.float32) / 255.0)[None, None]
    latent_size = (placement.bucket[1] // vae_scale_factor, placement.bucket[0] // vae_scale_factor)
    return F.interpolate(pixels, size=latent_size, mode="area")[0]


def unmasked_weights(placement: Placement, vae_scale_factor: int) -> torch.Tensor:
    """(1, h, w) ones: the weights of an image without a mask, and of every prior-preservation image."""
    return torch.ones(1, placement.bucket[1] // vae_scale_factor, placement.bucket[0] // vae_scale_factor)


def masked_mse_per_sample(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B,) losses: mean over channels and pixels of ``weights * (pred - target)^2`` (computed in fp32).

    ``pred`` and ``target`` are (B, C, h, w); ``weights`` is (B, 1, h, w) or (B, h, w).
    """
    if weights.dim() == pred.dim() - 1:
        weights = weights.unsqueeze(1)
    if (
        weights.shape[0] != pred.shape[0]
        or weights.shape[2:] != pred.shape[2:]
        or weights.shape[1] not in (1, pred.shape[1])
    ):
        raise ValueError(
            f"loss weights of shape {tuple(weights.shape)} do not fit predictions of shape {tuple(pred.shape)}"
        )
    squared = (pred.float() - target.float()) ** 2 * weights.float()
    return squared.mean(dim=tuple(range(1, pred.dim())))
