"""DreamBooth data: finding and reading images, PIL transforms, the dataset, its sampler and latent caching.

No torchvision: images are resized, cropped and flipped with PIL and turned into tensors with numpy.
Every random choice (shuffle order, crop, flip) comes from a generator keyed by (seed, epoch, index),
never from global state, so a run resumed mid-epoch sees exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

logger = logging.getLogger(__name__)

_LISTED_NAMES = 5  # how many file names an error message shows


class ImageFolderError(ValueError):
    """A data folder that cannot be trained on; the message names the flag and the folder."""


def _names(paths: Sequence[Path]) -> str:
    shown = ", ".join(p.name for p in paths[:_LISTED_NAMES])
    return shown + (", ..." if len(paths) > _LISTED_NAMES else "")


def image_files(folder: str | Path, flag: str) -> list[Path]:
    """The readable images in ``folder`` (sorted by name); unreadable files are skipped with one warning.

    Raises :class:`ImageFolderError` for a missing or empty folder, or one with no readable image.
    """
    folder = Path(folder)
    if not folder.exists():
        raise ImageFolderError(f"{flag} '{folder}' does not exist")
    if not folder.is_dir():
        raise ImageFolderError(f"{flag} '{folder}' is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ImageFolderError(f"{flag} '{folder}' is empty: put the training images there")
    readable, skipped = [], []
    for path in files:
        (readable if _is_readable_image(path) else skipped).append(path)
    if not readable:
        raise ImageFolderError(f"{flag} '{folder}' holds no readable images (found {len(files)} files: {_names(files)})")
    if skipped:
        logger.warning("Skipping %d unreadable file(s) in %s '%s': %s", len(skipped), flag, folder, _names(skipped))
    return readable


def _is_readable_image(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.load()  # decodes fully: catches truncated files that Image.open alone accepts
        return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def load_rgb(path: str | Path) -> Image.Image:
    """An image as 8-bit RGB, upright: EXIF rotation applied, transparency on white, 16-bit scaled down."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit (or 32-bit) greyscale: PIL's convert("L") clips instead of scaling.
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if values.max(initial=0) > 255 else 1.0
        image = Image.fromarray(np.clip(values * scale, 0, 255).round().astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


@dataclass
class TransformedImage:
    pixels: torch.Tensor  # (3, H, W) in [-1, 1]
    original_size: tuple[int, int]  # (h, w) before resizing: SDXL micro-conditioning
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image


def transform_image(image: Image.Image, resolution: int, center_crop: bool, flip: bool, rng: random.Random) -> TransformedImage:
    """Resize the short side to ``resolution``, optionally flip, crop a square (centre or random)."""
    original_size = (image.height, image.width)
    scale = resolution / min(image.width, image.height)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, resample=Image.Resampling.BILINEAR, reducing_gap=None)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if center_crop:
        top = int(round((image.height - resolution) / 2.0))
        left = int(round((image.width - resolution) / 2.0))
    else:
        top = rng.randint(0, image.height - resolution)
        left = rng.randint(0, image.width - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1.0
    return TransformedImage(pixels, original_size, (top, left))


class DreamBoothDataset(Dataset):
    """Instance images (and class images for prior preservation), one pair per item.

    Item ``i`` holds instance image ``i % n_instance`` and, with class images, class image ``i % n_class``;
    the length is the larger count, as in diffusers' DreamBooth scripts. After :meth:`cache_latents`, items
    carry the VAE posterior's parameters instead of pixels, and a fresh latent is sampled at every step.
    """

    def __init__(
        self,
        instance_images: Sequence[Path],
        class_images: Sequence[Path] = (),
        *,
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = False,
        seed: int = 0,
    ):
        self.images = {"instance": list(instance_images), "class": list(class_images)}
        self.resolution, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed
        self.epoch = 0
        self.latent_cache: dict[str, list[dict]] | None = None

    @property
    def with_class_images(self) -> bool:
        return bool(self.images["class"])

    def __len__(self) -> int:
        return max(len(self.images["instance"]), len(self.images["class"]))

    def set_epoch(self, epoch: int) -> None:
        """Augmentations are keyed by epoch; call before iterating each epoch."""
        self.epoch = epoch

    def _example(self, kind: str, index: int, epoch: int) -> dict:
        images = self.images[kind]
        image_index = index % len(images)
        if self.latent_cache is not None:
            return self.latent_cache[kind][image_index]
        rng = random.Random(f"{self.seed}/{epoch}/{kind}/{index}")
        flip = self.random_flip and rng.random() < 0.5
        transformed = transform_image(load_rgb(images[image_index]), self.resolution, self.center_crop, flip, rng)
        return {
            "pixel_values": transformed.pixels,
            "original_size": transformed.original_size,
            "crop_top_left": transformed.crop_top_left,
        }

    def __getitem__(self, index: int) -> dict:
        item = {"instance": self._example("instance", index, self.epoch)}
        if self.with_class_images:
            item["class"] = self._example("class", index, self.epoch)
        return item

    @torch.no_grad()
    def cache_latents(self, encode: Callable[[torch.Tensor], torch.Tensor], progress: Callable = lambda it, **kw: it) -> None:
        """Encode every image once (with epoch-0 augmentations) and keep ``encode``'s output per image.

        ``encode`` maps a (1, 3, H, W) pixel batch to the VAE posterior's parameters (mean and log-variance
        stacked, diffusers' ``latent_dist.parameters``), so that sampling still happens per step.
        """
        cache: dict[str, list[dict]] = {}
        todo = [(kind, i) for kind, paths in self.images.items() for i in range(len(paths))]
        for kind in self.images:
            cache[kind] = [None] * len(self.images[kind])
        for kind, i in progress(todo, desc="Caching latents"):
            example = self._example(kind, i, epoch=0)
            parameters = encode(example["pixel_values"][None])[0].cpu()
            cache[kind][i] = {"latent_parameters": parameters, "original_size": example["original_size"], "crop_top_left": example["crop_top_left"]}
        self.latent_cache = cache


def collate_dreambooth(items: list[dict], resolution: int) -> dict:
    """One batch: instance examples first, then class examples; ``num_instance`` says where they split."""
    examples = [item["instance"] for item in items] + [item["class"] for item in items if "class" in item]
    key = "latent_parameters" if "latent_parameters" in examples[0] else "pixel_values"
    return {
        key: torch.stack([e[key] for e in examples]),
        "original_sizes": torch.tensor([e["original_size"] for e in examples], dtype=torch.float32),
        "crop_top_lefts": torch.tensor([e["crop_top_left"] for e in examples], dtype=torch.float32),
        "target_sizes": torch.tensor([(resolution, resolution)] * len(examples), dtype=torch.float32),
        "num_instance": len(items),
    }


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled batches for one process, reproducible from (seed, epoch), resumable mid-epoch.

    Every epoch is a permutation of the dataset drawn from ``seed + epoch``, padded by wrapping around so
    that each of ``num_replicas`` processes gets the same number of full batches; process ``rank`` takes
    its slice of every global batch. :meth:`set_epoch` chooses the epoch and how many batches to skip.
    """

    def __init__(self, dataset_size: int, batch_size: int, *, seed: int, num_replicas: int = 1, rank: int = 0):
        self.dataset_size, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.skip_batches = 0, 0

    def __len__(self) -> int:
        """Batches per epoch for this process (before skipping)."""
        return math.ceil(self.dataset_size / (self.batch_size * self.num_replicas))

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.dataset_size, generator=generator).tolist()
        global_batch = self.batch_size * self.num_replicas
        total = len(self) * global_batch
        order = (order * math.ceil(total / len(order)))[:total]
        for b in range(self.skip_batches, len(self)):
            start = b * global_batch + self.rank * self.batch_size
            yield order[start : start + self.batch_size]
