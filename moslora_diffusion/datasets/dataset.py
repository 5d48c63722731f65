"""The training set built from dataset specs: image records, kohya's repeats, bucket groups, the items.

:func:`scan_datasets` reads every subset once (images, captions, upright sizes, masks: :func:`read_datasets`)
and chooses each image's bucket (:func:`select_buckets`, which needs the resolution);
:func:`expand_repeats` lists the samples of an epoch (kohya: an image ``num_repeats`` times; reg images
cycled until there are as many as training samples); :func:`bucket_groups` feeds
:class:`~moslora_diffusion.datasets.sampler.BucketBatchSampler`; :class:`BucketedImageDataset` turns a
sample into pixels, caption and SDXL sizes, every random choice keyed by (seed, epoch, sample index).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .buckets import BucketChoice, BucketOptions, BucketSelector, Placement, Size, apply_placement, place
from .captions import CaptionOptions, caption_rng, captions_or_fallback, process_caption, read_captions
from .hf_dataset import DatasetRow
from .images import load_image, names, readable_files, upright_size, usable_images
from .kohya_config import DatasetSpec, SubsetSpec
from .masks import MaskError, find_masks, load_mask, mask_weights, unmasked_weights
from .sampler import BucketGroup

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    caption: str  # before kohya's per-step operations (shuffle, dropout)
    size: Size  # upright (width, height)
    choice: BucketChoice | None  # None until :func:`select_buckets`
    dataset_index: int
    subset: SubsetSpec
    mask: Path | None = None


def dataset_spec_from_folders(
    instance_data_dir: str | Path,
    *,
    resolution: int | Size | None,
    instance_prompt: str | None = None,
    class_data_dir: str | Path | None = None,
    class_prompt: str | None = None,
    batch_size: int = 1,
    buckets: BucketOptions | None = None,
    caption_extension: str = ".txt",
    caption: CaptionOptions | None = None,
    random_flip: bool = False,
    random_crop: bool = False,
    alpha_mask: bool = False,
    mask_data_dir: str | Path | None = None,
    instance_rows: Sequence[DatasetRow] | None = None,
    source: str = "--instance_data_dir",
) -> DatasetSpec:
    """The flag route (--instance_data_dir and friends) as one dataset: instance subset, optional reg subset.

    ``resolution`` None: not known yet (the base's default); set it before :func:`select_buckets`.
    ``instance_rows``: the instance images are a dataset's rows (--dataset_name), not the folder's files."""
    size = (
        None if resolution is None else (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    )
    shared = {"caption_extension": caption_extension, "flip_aug": random_flip, "random_crop": random_crop}
    mask_dir = Path(mask_data_dir) if mask_data_dir else None
    options = caption or CaptionOptions()
    rows = None if instance_rows is None else tuple(instance_rows)
    subsets = [SubsetSpec(Path(instance_data_dir), class_tokens=instance_prompt, caption=options, alpha_mask=alpha_mask,
                          mask_dir=mask_dir, source=source, rows=rows, **shared)]  # fmt: skip
    if class_data_dir is not None:
        subsets.append(
            SubsetSpec(
                Path(class_data_dir), is_reg=True, class_tokens=class_prompt, source="--class_data_dir", **shared
            )
        )
    return DatasetSpec(tuple(subsets), size, batch_size, buckets or BucketOptions())


def scan_datasets(specs: Sequence[DatasetSpec], caption_column: str = "text") -> list[ImageRecord]:
    """Every image of every subset, with its caption (fallback: the subset's class_tokens) and bucket."""
    return select_buckets(read_datasets(specs, caption_column), specs)


def read_datasets(specs: Sequence[DatasetSpec], caption_column: str = "text") -> list[ImageRecord]:
    """Every readable image of every subset with its caption, upright size and mask; buckets not chosen yet.

    Unreadable images are skipped with a warning naming them; bad folders, metadata and masks raise."""
    records = []
    for d, spec in enumerate(specs):
        for s, subset in enumerate(spec.subsets):
            source = subset.source or f"datasets[{d}].subsets[{s}]"
            images, captions = _images_and_captions(subset, source, caption_column)
            masks = (
                find_masks(images, subset.mask_dir, f"{source}.mask_dir") if subset.mask_dir else [None] * len(images)
            )
            sizes = [upright_size(path) for path in images]
            _check_mask_sizes(images, sizes, masks)
            _warn_small(images, sizes, spec.buckets, source)
            for path, caption, size, mask in zip(images, captions, sizes, masks):
                records.append(ImageRecord(path, caption, size, None, d, subset, None if subset.is_reg else mask))
    return records


def _images_and_captions(subset: SubsetSpec, source: str, caption_column: str) -> tuple[list[Path], list[str]]:
    """A subset's readable images and their captions: a dataset's rows, or image_dir's files."""
    if subset.rows is not None:
        readable = set(readable_files([row.image for row in subset.rows], source))
        rows = [row for row in subset.rows if row.image in readable]
        images = [row.image for row in rows]
        return images, captions_or_fallback([row.caption for row in rows], images, subset.class_tokens, source)
    images = usable_images(subset.image_dir, source)
    captions = read_captions(
        images, caption_extension=subset.caption_extension, caption_column=caption_column,
        fallback=subset.class_tokens, source=source,
    )  # fmt: skip
    return images, captions


def select_buckets(records: Sequence[ImageRecord], specs: Sequence[DatasetSpec]) -> list[ImageRecord]:
    """``records`` with each image's bucket for its dataset's resolution and bucket options (BucketError for an
    image too small for bucket_no_upscale)."""
    selectors = [BucketSelector(spec.resolution, spec.buckets) for spec in specs]
    return [
        dataclasses.replace(record, choice=selectors[record.dataset_index].select(record.size, str(record.path)))
        for record in records
    ]


def _check_mask_sizes(images: list[Path], sizes: list[Size], masks: list[Path | None]) -> None:
    """A mask must have its image's size: checked from the headers at start-up, not mid-training."""
    for image, size, mask in zip(images, sizes, masks):
        if mask is not None and upright_size(mask) != size:
            width, height = upright_size(mask)
            raise MaskError(
                f"mask {mask} is {width}x{height} px but its image {image} is {size[0]}x{size[1]} px; "
                "a mask must have its image's size"
            )


def _warn_small(images: list[Path], sizes: list[Size], options: BucketOptions, source: str) -> None:
    if not options.enable_bucket or options.bucket_no_upscale:
        return
    small = [path for path, size in zip(images, sizes) if min(size) < options.min_bucket_reso]
    if small:
        logger.warning(
            "%s: %d image(s) smaller than min_bucket_reso = %d px are upscaled: %s",
            source, len(small), options.min_bucket_reso, names(small),
        )  # fmt: skip


def expand_repeats(records: Sequence[ImageRecord]) -> list[int]:
    """The record index of every sample of an epoch, kohya's way (per dataset): each training image
    ``num_repeats`` times; reg images (each first with its repeats, then one more round by round) until
    they number as many as the training samples, so prior preservation weighs half of every epoch."""
    samples: list[int] = []
    by_dataset: dict[int, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        by_dataset[record.dataset_index].append(i)
    for indices in by_dataset.values():
        train = [i for i in indices if not records[i].subset.is_reg]
        reg = [i for i in indices if records[i].subset.is_reg]
        for i in train:
            samples += [i] * records[i].subset.num_repeats
        samples += _reg_samples(records, reg, wanted=sum(records[i].subset.num_repeats for i in train))
    return samples


def _reg_samples(records: Sequence[ImageRecord], reg: list[int], wanted: int) -> list[int]:
    """kohya's loop: register reg images in order (with their repeats), then add one repeat each per round."""
    counts: dict[int, int] = defaultdict(int)
    total, first_round = 0, True
    while reg and total < wanted:
        for i in reg:
            added = records[i].subset.num_repeats if first_round else 1
            counts[i] += added
            total += added
            if total >= wanted:
                break
        first_round = False
    return [i for i in reg for _ in range(counts[i])]


def bucket_groups(
    records: Sequence[ImageRecord], samples: Sequence[int], specs: Sequence[DatasetSpec]
) -> list[BucketGroup]:
    """The sampler's groups: samples by (dataset, bucket), each with its dataset's batch size."""
    grouped: dict[tuple[int, Size], list[int]] = defaultdict(list)
    for sample, record_index in enumerate(samples):
        record = records[record_index]
        grouped[(record.dataset_index, record.choice.bucket)].append(sample)
    return [
        BucketGroup(bucket, tuple(indices), specs[d].batch_size) for (d, bucket), indices in sorted(grouped.items())
    ]


class BucketedImageDataset(Dataset):
    """Sample ``i`` of the epoch: its image placed in its bucket, its caption after kohya's operations, the
    SDXL sizes, ``is_reg`` and (with ``masked_loss``) per-latent-pixel loss weights.

    ``fixed_crops``: each image's random crop is drawn once (keyed by the image, not the epoch), so that cached
    latents cover every placement: one per image and flip. Once :attr:`latents` holds an entry per (record
    index, flip), items carry ``latent_parameters`` (the VAE posterior) instead of pixels.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        samples: Sequence[int],
        *,
        seed: int,
        masked_loss: bool = False,
        vae_scale_factor: int = 8,
        fixed_crops: bool = False,
    ):
        self.records, self.samples = list(records), list(samples)
        self.seed, self.masked_loss, self.vae_scale_factor = seed, masked_loss, vae_scale_factor
        self.fixed_crops = fixed_crops
        self.latents: dict[tuple[int, bool], torch.Tensor] | None = None
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Augmentations and caption operations are keyed by epoch; call before iterating each epoch."""
        self.epoch = epoch

    def placement(self, index: int, epoch: int | None = None) -> tuple[ImageRecord, Placement]:
        """Sample ``index``'s record and placement (flip and crop), without reading pixels (for cache keys)."""
        record = self.records[self.samples[index]]
        rng = random.Random(f"{self.seed}/{self.epoch if epoch is None else epoch}/image/{index}")
        flip = record.subset.flip_aug and rng.random() < 0.5
        return record, self.record_placement(self.samples[index], flip, rng)

    def record_placement(self, record_index: int, flip: bool, rng: random.Random | None = None) -> Placement:
        """Record ``record_index``'s placement with ``flip``; its crop from ``rng``, or its own with fixed crops."""
        record = self.records[record_index]
        if self.fixed_crops or rng is None:
            rng = random.Random(f"{self.seed}/crop/{record_index}")
        return place(record.size, record.choice, random_crop=record.subset.random_crop, flip=flip, rng=rng)

    def cached_placements(self) -> list[tuple[int, Placement]]:
        """(record index, placement) of every latent that training can ask for (with fixed crops)."""
        used = sorted(set(self.samples))
        flips = {i: (False, True) if self.records[i].subset.flip_aug else (False,) for i in used}
        return [(i, self.record_placement(i, flip)) for i in used for flip in flips[i]]

    def pixels(self, record: ImageRecord, placement: Placement) -> tuple[torch.Tensor, Image.Image | None]:
        """(3, h, w) pixels in [-1, 1] of ``record`` placed, and its alpha channel (None without one)."""
        image, alpha = load_image(record.path)
        placed = np.array(apply_placement(image, placement), dtype=np.uint8)
        return torch.from_numpy(placed).permute(2, 0, 1).float() / 127.5 - 1.0, alpha

    def __getitem__(self, index: int) -> dict:
        record, placement = self.placement(index)
        alpha = None
        if self.latents is not None:
            item = {"latent_parameters": self.latents[(self.samples[index], placement.flip)]}
            if self.masked_loss and record.subset.alpha_mask and not record.subset.is_reg:
                _, alpha = load_image(record.path)
        else:
            pixels, alpha = self.pixels(record, placement)
            item = {"pixel_values": pixels}
        item.update({
            "caption": process_caption(
                record.caption, record.subset.caption, caption_rng(self.seed, self.epoch, index)
            ),
            "original_size": placement.original_size,
            "crop_top_left": placement.crop_top_left,
            "target_size": placement.target_size,
            "is_reg": record.subset.is_reg,
        })  # fmt: skip
        if self.masked_loss:
            item["loss_weights"] = self._weights(record, placement, alpha)
        return item

    def _weights(self, record: ImageRecord, placement: Placement, alpha) -> torch.Tensor:
        if record.subset.is_reg:
            return unmasked_weights(placement, self.vae_scale_factor)
        if record.mask is not None:
            mask = load_mask(record.mask, record.path, record.size)
        elif record.subset.alpha_mask and alpha is not None:
            mask = alpha
        else:
            return unmasked_weights(placement, self.vae_scale_factor)
        return mask_weights(mask, placement, self.vae_scale_factor)


def collate_bucketed(items: list[dict]) -> dict:
    """One batch (all items from one bucket): stacked pixels (or cached latent posteriors), the captions, SDXL
    sizes, reg flags, weights."""
    key = "latent_parameters" if "latent_parameters" in items[0] else "pixel_values"
    batch = {
        key: torch.stack([item[key] for item in items]),
        "captions": [item["caption"] for item in items],
        "original_sizes": torch.tensor([item["original_size"] for item in items], dtype=torch.float32),
        "crop_top_lefts": torch.tensor([item["crop_top_left"] for item in items], dtype=torch.float32),
        "target_sizes": torch.tensor([item["target_size"] for item in items], dtype=torch.float32),
        "is_reg": torch.tensor([item["is_reg"] for item in items], dtype=torch.bool),
    }
    if "loss_weights" in items[0]:
        batch["loss_weights"] = torch.stack([item["loss_weights"] for item in items])
    return batch
