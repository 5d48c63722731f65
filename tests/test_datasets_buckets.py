"""Aspect-ratio buckets (kohya's algorithm), the crop record SDXL needs, and the bucketed batch sampler."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from moslora_diffusion.datasets.buckets import (
    BucketChoice,
    BucketError,
    BucketOptions,
    BucketSelector,
    apply_placement,
    bucket_step_multiple,
    check_bucket_sides,
    make_bucket_resolutions,
    place,
)
from moslora_diffusion.datasets.sampler import BucketBatchSampler, BucketGroup, format_bucket_table


def test_bucket_resolutions_are_kohyas_for_512():
    # By hand from kohya's loop: for width 256..1024 step 64, height = min(1024, (512*512 // width) // 64 * 64).
    expected = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
                (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
                (1024, 256)]  # fmt: skip
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == expected


# (resolution, options, image size, expected bucket, expected resized size)
SELECTIONS = [
    ((512, 512), BucketOptions(), (1024, 768), (512, 512), (683, 512)),  # no buckets: cover the square
    ((512, 512), BucketOptions(), (300, 600), (512, 512), (512, 1024)),  # ... upscaling a small portrait
    ((512, 512), BucketOptions(enable_bucket=True), (1200, 800), (640, 384), (640, 427)),  # nearest aspect 5:3
    ((512, 512), BucketOptions(enable_bucket=True), (800, 1200), (384, 640), (427, 640)),
    ((512, 512), BucketOptions(enable_bucket=True), (448, 576), (448, 576), (448, 576)),  # already a bucket
    ((512, 512), BucketOptions(enable_bucket=True), (100, 100), (512, 512), (512, 512)),  # small: upscaled
    ((512, 512), BucketOptions(enable_bucket=True, bucket_no_upscale=True), (300, 200), (256, 192), (300, 200)),
    ((512, 512), BucketOptions(enable_bucket=True, bucket_no_upscale=True), (2048, 1024), (640, 320), (640, 320)),
    (
        (512, 512),
        BucketOptions(enable_bucket=True, bucket_no_upscale=True, bucket_reso_steps=16),
        (50, 70),
        (48, 64),
        (50, 70),
    ),
    (
        (32, 32),
        BucketOptions(enable_bucket=True, min_bucket_reso=16, max_bucket_reso=64, bucket_reso_steps=8),
        (48, 24),
        (40, 24),
        (48, 24),
    ),  # 48x24 is over the area
]


@pytest.mark.parametrize("resolution, options, size, bucket, resized", SELECTIONS)
def test_each_image_goes_to_the_bucket_of_nearest_aspect_covering_it(resolution, options, size, bucket, resized):
    choice = BucketSelector(resolution, options).select(size)
    assert choice == BucketChoice(bucket, resized)
    assert choice.resized_size[0] >= bucket[0] and choice.resized_size[1] >= bucket[1]  # covers: crop, never pad


def test_bucket_no_upscale_image_smaller_than_a_step_is_an_error_naming_it():
    selector = BucketSelector((512, 512), BucketOptions(enable_bucket=True, bucket_no_upscale=True))
    with pytest.raises(BucketError, match="tiny.png: 40x100 px is smaller than bucket_reso_steps"):
        selector.select((40, 100), "tiny.png")


@pytest.mark.parametrize(
    "resolution, options, multiple, message",
    [
        (
            (512, 512),
            BucketOptions(enable_bucket=True, bucket_reso_steps=8),
            16,
            "bucket_reso_steps = 8 does not suit flux",
        ),
        ((512, 512), BucketOptions(enable_bucket=True, min_bucket_reso=200), 16, "min_bucket_reso = 200"),
        ((520, 512), BucketOptions(), 16, "resolution 520x512 does not suit flux"),
        ((512, 512), BucketOptions(enable_bucket=True), 16, None),
        ((520, 512), BucketOptions(), 8, None),
    ],
)
def test_bucket_sides_must_suit_the_family(resolution, options, multiple, message):
    assert bucket_step_multiple(8, 2) == 16 and bucket_step_multiple(8) == 8
    if message is None:
        check_bucket_sides(resolution, options, multiple, "flux")
    else:
        with pytest.raises(BucketError, match=message):
            check_bucket_sides(resolution, options, multiple, "flux")


@pytest.mark.parametrize("random_crop", [False, True])
@pytest.mark.parametrize("flip", [False, True])
def test_placement_crops_and_flips_and_records_sdxl_conditioning(random_crop, flip):
    pixels = np.random.default_rng(0).integers(0, 255, (8, 12, 3), dtype=np.uint8)  # 12 wide, 8 high
    image = Image.fromarray(pixels)
    choice = BucketChoice(bucket=(8, 4), resized_size=(12, 8))  # no resize: the crop is exact to check
    for trial in range(6):
        placement = place(image.size, choice, random_crop=random_crop, flip=flip, rng=random.Random(trial))
        out = np.asarray(apply_placement(image, placement))
        assert out.shape == (4, 8, 3)
        assert placement.original_size == (8, 12) and placement.target_size == (4, 8)
        if not random_crop:
            assert (placement.crop_left, placement.crop_top) == (2, 2)  # kohya: overhang // 2
        # crop_top_left is where the crop lies in the flipped image (as if flipped, then cropped).
        source = pixels[:, ::-1] if flip else pixels
        top, left = placement.crop_top_left
        np.testing.assert_array_equal(out, source[top : top + 4, left : left + 8])
    seen = {
        place(image.size, choice, random_crop=random_crop, flip=flip, rng=random.Random(t)).crop_left for t in range(40)
    }
    assert seen == ({0, 1, 2, 3, 4} if random_crop else {2})


def test_placement_resizes_to_cover_then_crops():
    image = Image.new("RGB", (1200, 800), (255, 0, 0))
    choice = BucketSelector((512, 512), BucketOptions(enable_bucket=True)).select(image.size)
    placement = place(image.size, choice, random_crop=False, flip=False, rng=random.Random(0))
    assert apply_placement(image, placement).size == (640, 384)
    assert placement.crop_top_left == (21, 0) and placement.original_size == (800, 1200)


# ---------------------------------------------------------------------------------------------- sampler


def _groups():
    return [
        BucketGroup((64, 32), tuple(range(0, 7)), batch_size=3),  # 7 samples: 3 batches, the last wrapped
        BucketGroup((32, 64), tuple(range(7, 9)), batch_size=3),  # fewer samples than a batch
        BucketGroup((32, 32), tuple(range(9, 19)), batch_size=2),
    ]


def test_every_batch_is_full_and_from_one_bucket_and_an_epoch_covers_every_sample():
    groups = _groups()
    bucket_of = {i: g for g in groups for i in g.indices}
    batches = list(BucketBatchSampler(groups, seed=0))
    assert len(batches) == 3 + 1 + 5
    for batch in batches:
        assert len({bucket_of[i].size for i in batch}) == 1 and len(batch) == bucket_of[batch[0]].batch_size
    assert set().union(*batches) == set(range(19))


def test_batches_depend_only_on_seed_and_epoch():
    sampler = BucketBatchSampler(_groups(), seed=5)
    sampler.set_epoch(3)
    first = list(sampler)
    assert list(BucketBatchSampler(_groups(), seed=5).epoch_batches(3)) == first
    assert sampler.epoch_batches(4) != first and BucketBatchSampler(_groups(), seed=6).epoch_batches(3) != first


@pytest.mark.parametrize("num_replicas", [1, 2, 4])
def test_resume_and_sharding_see_exactly_the_uninterrupted_batches(num_replicas):
    ranks = [BucketBatchSampler(_groups(), seed=1, num_replicas=num_replicas, rank=r) for r in range(num_replicas)]
    global_batches = ranks[0].epoch_batches(2)
    per_rank = []
    for sampler in ranks:
        sampler.set_epoch(2)
        per_rank.append(list(sampler))
        assert len(per_rank[-1]) == len(sampler) == len(per_rank[0])  # every process steps equally often
    interleaved = [per_rank[r][b] for b in range(len(per_rank[0])) for r in range(num_replicas)]
    assert interleaved == global_batches
    for skip in range(len(per_rank[0]) + 1):
        for r, sampler in enumerate(ranks):
            sampler.set_epoch(2, skip_batches=skip)
            assert list(sampler) == per_rank[r][skip:]


def test_sampler_refuses_no_samples_and_bad_rank():
    with pytest.raises(ValueError, match="every bucket is empty"):
        BucketBatchSampler([BucketGroup((8, 8), (), 1)], seed=0)
    with pytest.raises(ValueError, match="rank 2 is outside 0..1"):
        BucketBatchSampler(_groups(), seed=0, num_replicas=2, rank=2)


def test_bucket_table_for_the_start_up_log():
    assert format_bucket_table(_groups(), num_replicas=2) == "\n".join(
        [
            "bucket (w x h)  images  batch size  batches/epoch",
            "       32 x 32      10           2              5",
            "       32 x 64       2           3              1",
            "       64 x 32       7           3              3",
            "         total      19                          9",
            "2 processes: 5 batches per process per epoch",
        ]
    )
