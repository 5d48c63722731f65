"""The trainer's one data path, from the run's flags to batches: every run goes through here.

    specs, records = read_training_images(config)          # before any model loads: bad data exits 2 at once
    specs, records = with_class_images(specs, records, ...) # prior preservation: generated class images as reg
    data = build_training_data(specs, records, ...)         # buckets, repeats, the sharded resumable sampler

The flag route (``--instance_data_dir`` and friends, or ``--dataset_name``: a Hugging Face dataset's rows, see
:mod:`~moslora_diffusion.datasets.hf_dataset`) becomes one dataset spec
(:func:`~moslora_diffusion.datasets.dataset.dataset_spec_from_folders`), a kohya file (``--dataset_config``)
its own (:func:`~moslora_diffusion.datasets.kohya_config.load_dataset_config`, the flags filling in what the
file leaves out, as kohya does); both are read, bucketed and batched alike. Without --enable_bucket every
image goes to the one square bucket of --resolution (centre or random crop).

Prior preservation follows kohya: class images are samples of their own (``is_reg``), repeated to match the
training samples and mixed into the batches; each weighs ``--prior_loss_weight`` in the batch's mean loss.
On the flag route the instance images are repeated so that an epoch shows every class image once, as in
diffusers' scripts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..datasets.buckets import BucketError, BucketOptions, check_bucket_sides
from ..datasets.cache import TensorCache, latent_cache_key, weights_fingerprint
from ..datasets.captions import CaptionError, CaptionOptions, process_caption
from ..datasets.dataset import (
    BucketedImageDataset,
    ImageRecord,
    bucket_groups,
    collate_bucketed,
    dataset_spec_from_folders,
    expand_repeats,
    read_datasets,
    select_buckets,
)
from ..datasets.hf_dataset import DEFAULT_CAPTION_COLUMN, HFDatasetError, load_rows
from ..datasets.images import ImageReadError
from ..datasets.kohya_config import DatasetConfigError, DatasetSpec, load_dataset_config
from ..datasets.masks import MaskError
from ..datasets.sampler import BucketBatchSampler, BucketGroup, format_bucket_table
from .config import RunConfig, UsageError

logger = logging.getLogger(__name__)

# Every error of the data layer is one line for the user (exit status 2).
DATA_ERRORS = (ImageReadError, CaptionError, DatasetConfigError, BucketError, MaskError, HFDatasetError)


def cache_root() -> Path:
    """Where disk caches live: $MOSLORA_CACHE_DIR, else $XDG_CACHE_HOME/moslora, else ~/.cache/moslora.

    Keys are hashes of everything that determines an entry, so runs with other outputs share it safely."""
    if os.environ.get("MOSLORA_CACHE_DIR"):
        return Path(os.environ["MOSLORA_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moslora"


def bucket_options(config: RunConfig) -> BucketOptions:
    return BucketOptions(
        enable_bucket=config.enable_bucket,
        min_bucket_reso=config.min_bucket_reso,
        max_bucket_reso=config.max_bucket_reso,
        bucket_reso_steps=config.bucket_reso_steps,
        bucket_no_upscale=config.bucket_no_upscale,
    )


def dataset_specs(config: RunConfig) -> tuple[DatasetSpec, ...]:
    """The run's datasets: the kohya file, or one built from the flags (resolution None: the base's default)."""
    if config.dataset_config is not None:
        fallbacks = {
            "resolution": config.resolution,
            "batch_size": config.train_batch_size,
            "caption_extension": config.caption_extension,
            "shuffle_caption": config.shuffle_caption,
            "keep_tokens": config.keep_tokens,
            "caption_dropout_rate": config.caption_dropout_rate,
            "flip_aug": config.random_flip,
            "alpha_mask": config.alpha_mask,
            **dataclasses.asdict(bucket_options(config)),
        }
        return load_dataset_config(config.dataset_config, fallbacks)
    rows = None
    if config.dataset_name is not None:
        rows = load_rows(
            config.dataset_name, image_column=config.image_column, caption_column=config.caption_column,
            config_name=config.dataset_config_name, cache_dir=config.cache_dir,
            images_dir=cache_root() / "dataset_images",
        )  # fmt: skip
        if not config.instance_prompt and all(row.caption is None for row in rows):
            raise UsageError(
                f"--dataset_name '{config.dataset_name}' has no caption column '{config.caption_column or 'text'}': "
                "name it with --caption_column, or give --instance_prompt for every image"
            )
    spec = dataset_spec_from_folders(
        config.instance_data_dir or config.dataset_name,
        instance_rows=rows,
        source="--dataset_name" if rows is not None else "--instance_data_dir",
        resolution=config.resolution,
        instance_prompt=config.instance_prompt,
        batch_size=config.train_batch_size,
        buckets=bucket_options(config),
        caption_extension=config.caption_extension or ".txt",
        caption=CaptionOptions(
            shuffle_caption=config.shuffle_caption,
            keep_tokens=config.keep_tokens,
            caption_dropout_rate=config.caption_dropout_rate,
        ),
        random_flip=config.random_flip,
        random_crop=not config.center_crop,
        alpha_mask=config.alpha_mask,
        mask_data_dir=config.mask_data_dir,
    )
    return (spec,)


def read_training_images(config: RunConfig, family) -> tuple[tuple[DatasetSpec, ...], list[ImageRecord]]:
    """The run's dataset specs and image records (captions, sizes, masks), checked against ``family``.

    Raises :class:`UsageError` (one line) for every data problem that can be found without the models."""
    try:
        specs = dataset_specs(config)
        for spec in specs:
            if spec.resolution is not None or spec.buckets.enable_bucket:
                check_bucket_sides(spec.resolution, spec.buckets, family.resolution_multiple, family.name)
        records = read_datasets(specs, config.caption_column or DEFAULT_CAPTION_COLUMN)
    except DATA_ERRORS as err:
        raise UsageError(str(err)) from None
    subsets = [subset for spec in specs for subset in spec.subsets]
    if config.cache_text_encoder_outputs and any(subset.caption.shuffle_caption for subset in subsets):
        raise UsageError(
            "--cache_text_encoder_outputs encodes each caption once; a subset of --dataset_config shuffles its "
            "captions (shuffle_caption = true): drop one"
        )
    if config.masked_loss and not any(subset.alpha_mask or subset.mask_dir for subset in subsets):
        raise UsageError(f"--masked_loss needs masks: no subset of {config.dataset_config} sets alpha_mask or mask_dir")
    if not config.masked_loss and any(subset.alpha_mask or subset.mask_dir for subset in subsets):
        logger.warning("Masks (alpha_mask, mask_dir, --mask_data_dir) are ignored without --masked_loss")
    return specs, records


def with_class_images(
    specs: tuple[DatasetSpec, ...],
    records: list[ImageRecord],
    class_data_dir: str,
    class_prompt: str,
    num_class_images: int,
    caption_column: str | None,
) -> tuple[tuple[DatasetSpec, ...], list[ImageRecord]]:
    """The flag route's dataset with --class_data_dir's first ``num_class_images`` images as reg samples.

    The instance images are repeated ceil(class / instance) times: an epoch shows every class image once."""
    (spec,) = specs
    instance = spec.subsets[0]
    class_subset = dataclasses.replace(
        instance, image_dir=Path(class_data_dir), is_reg=True, class_tokens=class_prompt, alpha_mask=False,
        mask_dir=None, caption=CaptionOptions(), source="--class_data_dir", rows=None,
    )  # fmt: skip
    try:
        class_spec = dataclasses.replace(spec, subsets=(class_subset,))
        class_records = read_datasets((class_spec,), caption_column or DEFAULT_CAPTION_COLUMN)
    except DATA_ERRORS as err:
        raise UsageError(str(err)) from None
    class_records = class_records[:num_class_images]
    repeats = max(1, math.ceil(len(class_records) / len(records)))
    instance = dataclasses.replace(instance, num_repeats=repeats)
    records = [dataclasses.replace(record, subset=instance) for record in records]
    spec = dataclasses.replace(spec, subsets=(instance, class_subset))
    return (spec,), records + class_records


def with_default_resolution(specs: tuple[DatasetSpec, ...], resolution: int) -> tuple[DatasetSpec, ...]:
    """Specs whose resolution was left to the base get ``resolution`` (square)."""
    return tuple(
        spec if spec.resolution is not None else dataclasses.replace(spec, resolution=(resolution, resolution))
        for spec in specs
    )


def possible_captions(records: Sequence[ImageRecord]) -> list[str] | None:
    """Every caption training can use (the empty one too, with caption dropout), or None when captions are
    shuffled (too many to list)."""
    captions = set()
    for record in records:
        options = record.subset.caption
        if options.shuffle_caption:
            return None
        captions.add(process_caption(record.caption, dataclasses.replace(options, caption_dropout_rate=0.0), None))
        if options.caption_dropout_rate > 0:
            captions.add("")
    return sorted(captions)


@dataclass
class TrainingData:
    dataset: BucketedImageDataset
    sampler: BucketBatchSampler
    loader: DataLoader
    groups: list[BucketGroup]

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def bucket_table(self) -> str:
        return format_bucket_table(self.groups, self.sampler.num_replicas)


def build_training_data(
    specs: tuple[DatasetSpec, ...],
    records: list[ImageRecord],
    *,
    seed: int,
    num_replicas: int,
    rank: int,
    masked_loss: bool,
    vae_scale_factor: int,
    fixed_crops: bool,
    num_workers: int,
) -> TrainingData:
    """Buckets, kohya's repeats, the dataset and its sampler (sharded by rank, resumable with set_epoch)."""
    try:
        records = select_buckets(records, specs)
    except BucketError as err:
        raise UsageError(str(err)) from None
    samples = expand_repeats(records)
    groups = bucket_groups(records, samples, specs)
    dataset = BucketedImageDataset(
        records, samples, seed=seed, masked_loss=masked_loss, vae_scale_factor=vae_scale_factor,
        fixed_crops=fixed_crops,
    )  # fmt: skip
    sampler = BucketBatchSampler(groups, seed=seed, num_replicas=num_replicas, rank=rank)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_bucketed,
        generator=torch.Generator().manual_seed(seed),  # worker seeds from here, not from the global RNG
    )
    return TrainingData(dataset, sampler, loader, groups)


@torch.no_grad()
def cache_latents(
    dataset: BucketedImageDataset,
    encode: Callable[[torch.Tensor], torch.Tensor],
    vae: torch.nn.Module,
    folder: Path | None,
    progress: Callable = lambda items, **kwargs: items,
    *,
    rank: int = 0,
    num_processes: int = 1,
    wait_for_everyone: Callable[[], None] = lambda: None,
) -> TensorCache:
    """Encode every (image, flip) placement once and hand the dataset the VAE posteriors (``encode``'s output).

    With ``folder``, entries are read from and written to the disk cache there, keyed by the image's bytes,
    the VAE's weights and dtype, and the placement; a later run encodes only what changed. Several processes
    share the disk cache: process ``rank`` fills every ``num_processes``-th entry, then (after
    ``wait_for_everyone``) reads the others' (an entry another process failed to write is encoded here)."""
    cache = TensorCache(folder, "latent")
    fingerprint = weights_fingerprint(vae) if folder is not None else ""
    dtype = str(next(vae.parameters()).dtype)
    placements = dataset.cached_placements()
    shared = folder is not None and num_processes > 1
    own = placements[rank::num_processes] if shared else placements
    latents = {}

    def fill(items):
        for record_index, placement in items:
            record = dataset.records[record_index]

            def compute(record=record, placement=placement):
                return {"latent_parameters": encode(dataset.pixels(record, placement)[0][None])[0]}

            entry = cache.get_or_compute(latent_cache_key(record.path, fingerprint, placement, extra=dtype), compute)
            latents[(record_index, placement.flip)] = entry["latent_parameters"].cpu()

    fill(progress(own, desc="Caching latents"))
    if shared:
        wait_for_everyone()  # every process has written its share
        fill(item for i, item in enumerate(placements) if i % num_processes != rank)
    dataset.latents = latents
    return cache
