"""Masked loss: masks from alpha or a folder, placed like their image, at latent size; the weighted loss."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image

from moslora_diffusion.datasets.buckets import BucketChoice, place
from moslora_diffusion.datasets.images import load_image
from moslora_diffusion.datasets.masks import (
    MaskError,
    find_masks,
    load_mask,
    mask_weights,
    masked_mse_per_sample,
    unmasked_weights,
)


def test_masked_mse_equals_a_hand_computed_weighted_loss():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])  # (2, 1, 2, 2)
    target = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    weights = torch.tensor([[[1.0, 0.5], [0.0, 0.25]], [[1.0, 1.0], [1.0, 1.0]]])  # (2, 2, 2)
    # sample 0: (1*1 + 0.5*4 + 0*9 + 0.25*16) / 4 = 7 / 4; sample 1 (unmasked): 4 * 1 / 4 = 1.
    assert masked_mse_per_sample(pred, target, weights).tolist() == [1.75, 1.0]
    channels = torch.randn(2, 4, 3, 3)
    ones = torch.ones(2, 1, 3, 3)
    torch.testing.assert_close(masked_mse_per_sample(channels, 0 * channels, ones), (channels**2).mean(dim=(1, 2, 3)))
    with pytest.raises(
        ValueError, match=r"loss weights of shape \(2, 1, 2, 2\) do not fit predictions of shape \(2, 4, 3, 3\)"
    ):
        masked_mse_per_sample(channels, channels, torch.ones(2, 1, 2, 2))


def test_mask_follows_its_image_through_resize_crop_and_flip_then_averages_per_vae_cell():
    # A 32x16 image whose left 8 px are masked in; bucket 16x16 after no resize: the crop keeps x in [8, 24).
    mask = Image.fromarray(np.where(np.arange(32)[None, :].repeat(16, 0) < 12, 255, 0).astype(np.uint8))
    choice = BucketChoice(bucket=(16, 16), resized_size=(32, 16))
    placement = place((32, 16), choice, random_crop=False, flip=False, rng=random.Random(0))
    weights = mask_weights(mask, placement, vae_scale_factor=8)
    assert weights.shape == (1, 2, 2)
    # Crop starts at x = 8: masked columns 8..11 are half of the first 8-px cell; the second cell is empty.
    torch.testing.assert_close(weights, torch.tensor([[[0.5, 0.0], [0.5, 0.0]]]))
    flipped = place((32, 16), choice, random_crop=False, flip=True, rng=random.Random(0))
    torch.testing.assert_close(mask_weights(mask, flipped, 8), torch.tensor([[[0.0, 0.5], [0.0, 0.5]]]))
    assert unmasked_weights(placement, 8).tolist() == [[[1.0, 1.0], [1.0, 1.0]]]


def test_alpha_channel_is_the_mask(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, :8, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    _, alpha = load_image(tmp_path / "a.png")
    placement = place((16, 16), BucketChoice((16, 16), (16, 16)), random_crop=False, flip=False, rng=random.Random(0))
    torch.testing.assert_close(mask_weights(alpha, placement, 8), torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]))


def test_mask_folder_pairs_by_stem_and_warns_for_images_without_one(tmp_path, caplog):
    (tmp_path / "img").mkdir()
    (tmp_path / "masks").mkdir()
    images = [tmp_path / "img" / name for name in ("a.jpg", "b.png", "c.png")]
    Image.new("L", (4, 4), 255).save(tmp_path / "masks" / "a.png")
    Image.new("L", (4, 4), 255).save(tmp_path / "masks" / "c.webp")
    (tmp_path / "masks" / "b.txt").write_text("not a mask")
    with caplog.at_level(logging.WARNING):
        masks = find_masks(images, tmp_path / "masks")
    assert masks == [tmp_path / "masks" / "a.png", None, tmp_path / "masks" / "c.webp"]
    assert "1 of 3 images (b.png)" in caplog.text


def test_mask_of_another_size_is_one_error_naming_both_files(tmp_path):
    Image.new("RGB", (8, 6), 255).save(tmp_path / "m.png")
    assert load_mask(tmp_path / "m.png", tmp_path / "i.png", (8, 6)).mode == "L"
    with pytest.raises(MaskError, match=r"mask .*m.png is 8x6 px but its image .*i.png is 6x8 px"):
        load_mask(tmp_path / "m.png", tmp_path / "i.png", (6, 8))
