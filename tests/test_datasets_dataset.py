"""The assembled training set: records, kohya's repeats and reg balance, bucketed batches, items, collate."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from moslora_diffusion.datasets.buckets import BucketOptions
from moslora_diffusion.datasets.captions import CaptionOptions
from moslora_diffusion.datasets.dataset import (
    BucketedImageDataset,
    bucket_groups,
    collate_bucketed,
    dataset_spec_from_folders,
    expand_repeats,
    scan_datasets,
)
from moslora_diffusion.datasets.kohya_config import DatasetSpec, SubsetSpec, load_dataset_config
from moslora_diffusion.datasets.sampler import BucketBatchSampler

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def _folder(path: Path, sizes: list[tuple[int, int]], captions: dict[int, str] | None = None, mode="RGB") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        Image.new(mode, size, (200, 30, 30) if mode == "RGB" else (200, 30, 30, 255)).save(path / f"img{i}.png")
        if captions and i in captions:
            (path / f"img{i}.txt").write_text(captions[i])
    return path


def test_the_sample_dataset_file_gives_captioned_32px_batches():
    specs = load_dataset_config(SAMPLES / "dataset_tiny.toml")
    records = scan_datasets(specs)
    samples = expand_repeats(records)
    dataset = BucketedImageDataset(records, samples, seed=0)
    sampler = BucketBatchSampler(bucket_groups(records, samples, specs), seed=0)
    (batch, *rest) = list(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_bucketed))
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and len(rest) == 1
    assert set(batch["captions"]) == {"a photo of a red sks shape on a white background"}
    assert batch["target_sizes"].tolist() == [[32.0, 32.0]] * 4 and not batch["is_reg"].any()


def test_buckets_keep_portrait_and_landscape_whole_with_sdxl_sizes(tmp_path):
    _folder(tmp_path / "img", [(96, 64), (64, 96), (100, 66), (64, 64), (48, 100)])
    options = BucketOptions(enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)
    specs = (DatasetSpec((SubsetSpec(tmp_path / "img"),), (64, 64), batch_size=2, buckets=options),)
    records = scan_datasets(specs)
    assert [r.choice.bucket for r in records] == [(80, 48), (48, 80), (80, 48), (64, 64), (48, 80)]  # 0.48 -> 0.6
    samples = expand_repeats(records)
    dataset = BucketedImageDataset(records, samples, seed=0)
    for batch in DataLoader(dataset, batch_sampler=BucketBatchSampler(bucket_groups(records, samples, specs), seed=0),
                            collate_fn=collate_bucketed):  # fmt: skip
        height, width = batch["pixel_values"].shape[2:]
        assert batch["target_sizes"].tolist() == [[height, width]] * 2
    item = dataset[2]  # 100x66 covers 80x48 at 80x53: a centred vertical crop of (53 - 48) // 2 = 2
    assert item["original_size"] == (66, 100) and item["crop_top_left"] == (2, 0) and item["target_size"] == (48, 80)


# (train images, train repeats, reg images, reg repeats) -> samples per reg image, kohya's loop by hand
REPEATS = [
    (2, 3, 4, 1, [2, 2, 1, 1]),  # 6 training samples: one round of 4, then 1 + 1
    (3, 1, 10, 1, [1, 1, 1] + [0] * 7),  # more reg images than training samples: some unused
    (1, 5, 2, 2, [3, 2]),  # first round adds each image's repeats (2 + 2), then 1 more
    (2, 2, 0, 1, []),
]


@pytest.mark.parametrize("n_train, train_repeats, n_reg, reg_repeats, reg_counts", REPEATS)
def test_repeats_and_reg_images_balance_as_kohya(tmp_path, n_train, train_repeats, n_reg, reg_repeats, reg_counts):
    subsets = [SubsetSpec(_folder(tmp_path / "train", [(8, 8)] * n_train), num_repeats=train_repeats)]
    if n_reg:
        subsets.append(SubsetSpec(_folder(tmp_path / "reg", [(8, 8)] * n_reg), is_reg=True, num_repeats=reg_repeats))
    records = scan_datasets((DatasetSpec(tuple(subsets), (8, 8)),))
    counts = Counter(expand_repeats(records))
    assert [counts[i] for i in range(n_train)] == [train_repeats] * n_train
    assert [counts[n_train + i] for i in range(n_reg)] == reg_counts


def test_two_datasets_never_share_a_batch_and_keep_their_batch_sizes(tmp_path):
    a = DatasetSpec((SubsetSpec(_folder(tmp_path / "a", [(16, 16)] * 4)),), (16, 16), batch_size=2)
    b = DatasetSpec((SubsetSpec(_folder(tmp_path / "b", [(16, 16)] * 3)),), (16, 16), batch_size=3)
    records = scan_datasets((a, b))
    samples = expand_repeats(records)
    groups = bucket_groups(records, samples, (a, b))
    assert [(g.size, len(g.indices), g.batch_size) for g in groups] == [((16, 16), 4, 2), ((16, 16), 3, 3)]
    for batch in BucketBatchSampler(groups, seed=0):
        assert len({records[samples[i]].dataset_index for i in batch}) == 1


def test_items_are_the_same_for_the_same_seed_epoch_and_index(tmp_path):
    _folder(tmp_path / "img", [(40, 24)] * 3, {0: "sks, a, b, c, d, e", 1: "sks, f, g, h, i"})
    spec = dataset_spec_from_folders(
        tmp_path / "img", resolution=16, instance_prompt="sks shape", random_flip=True, random_crop=True,
        caption=CaptionOptions(shuffle_caption=True, keep_tokens=1),
    )  # fmt: skip
    records = scan_datasets((spec,))
    assert [r.caption for r in records] == ["sks, a, b, c, d, e", "sks, f, g, h, i", "sks shape"]

    def items(epoch):
        dataset = BucketedImageDataset(records, expand_repeats(records), seed=3)
        dataset.set_epoch(epoch)
        return [dataset[i] for i in range(3)]

    first, again, later = items(1), items(1), items(2)
    for x, y in zip(first, again):
        assert x["caption"] == y["caption"] and x["crop_top_left"] == y["crop_top_left"]
        assert torch.equal(x["pixel_values"], y["pixel_values"])
    assert [x["caption"] for x in first] != [x["caption"] for x in later] or [x["crop_top_left"] for x in first] != [
        x["crop_top_left"] for x in later
    ]
    assert all(x["caption"].startswith("sks, ") for x in first[:2])


def test_masked_loss_weights_from_mask_folder_and_alpha_and_never_for_reg(tmp_path):
    _folder(tmp_path / "img", [(16, 16)] * 2)
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, :8] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "img" / "img1.png")  # alpha: left half
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.tile((np.arange(16) >= 8).astype(np.uint8) * 255, (16, 1))).save(
        masks / "img0.png"
    )  # right half
    _folder(tmp_path / "reg", [(16, 16)])
    spec = dataset_spec_from_folders(
        tmp_path / "img",
        resolution=16,
        class_data_dir=tmp_path / "reg",
        alpha_mask=True,
        mask_data_dir=masks,
        batch_size=3,
    )
    records = scan_datasets((spec,))
    samples = expand_repeats(records)
    dataset = BucketedImageDataset(records, samples, seed=0, masked_loss=True)
    batch = collate_bucketed([dataset[i] for i in range(len(dataset))])
    assert batch["is_reg"].tolist() == [False, False, True, True]
    assert batch["loss_weights"].tolist() == [
        [[[0.0, 1.0], [0.0, 1.0]]],
        [[[1.0, 0.0], [1.0, 0.0]]],
        [[[1.0, 1.0], [1.0, 1.0]]],
        [[[1.0, 1.0], [1.0, 1.0]]],
    ]
