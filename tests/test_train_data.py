"""DreamBooth data and objectives: image modes, transforms, the resumable sampler, and the targets."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from moslora_diffusion.training.data import DreamBoothDataset, EpochBatchSampler, collate_dreambooth, load_rgb, transform_image
from moslora_diffusion.training.objectives import FlowMatching, NoisePrediction, combine_instance_and_prior_losses


# ---------------------------------------------------------------------------------------------- images


def _save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_rgba_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    rgb = load_rgb(_save(image, tmp_path / "a.png"))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 0, 0) and rgb.getpixel((5, 5)) == (255, 255, 255)


def test_palette_with_transparency_and_greyscale_with_alpha(tmp_path):
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 1), 1)
    rgb = load_rgb(_save(palette, tmp_path / "p.png", transparency=0))
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 1)) == (0, 255, 0)
    la = Image.new("LA", (4, 4), (0, 0))
    assert load_rgb(_save(la, tmp_path / "la.png")).getpixel((0, 0)) == (255, 255, 255)


def test_greyscale_8_and_16_bit(tmp_path):
    assert load_rgb(_save(Image.new("L", (4, 4), 100), tmp_path / "l.png")).getpixel((0, 0)) == (100, 100, 100)
    ramp = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369)  # 0 .. 65535
    sixteen = Image.fromarray(ramp)
    assert sixteen.mode == "I;16"
    rgb = load_rgb(_save(sixteen, tmp_path / "16.png"))
    assert rgb.getpixel((0, 0)) == (0, 0, 0) and rgb.getpixel((3, 3)) == (255, 255, 255)
    assert rgb.getpixel((3, 1))[0] == 119  # 7 * 4369 / 257: scaled, not clipped to white


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rgb = load_rgb(_save(image, tmp_path / "r.jpg", exif=exif.tobytes()))
    assert rgb.size == (20, 40)


def test_transform_resizes_short_side_and_crops(tmp_path):
    image = Image.new("RGB", (64, 48), "white")
    centre = transform_image(image, 32, center_crop=True, flip=False, rng=random.Random(0))
    assert centre.pixels.shape == (3, 32, 32)
    assert centre.original_size == (48, 64) and centre.crop_top_left == (0, 6)  # resized to 43 x 32, (43 - 32) / 2 rounds to 6
    assert centre.pixels.min() >= -1 and centre.pixels.max() <= 1
    tops_lefts = {transform_image(image, 32, False, False, random.Random(s)).crop_top_left for s in range(20)}
    assert len(tops_lefts) > 1 and all(top == 0 and 0 <= left <= 11 for top, left in tops_lefts)


def test_dataset_augmentations_are_keyed_by_epoch_not_global_state(tmp_path):
    paths = [_save(Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8)), tmp_path / f"{i}.png") for i in range(3)]
    dataset = DreamBoothDataset(paths, resolution=32, random_flip=True, seed=1)
    first = [dataset[i]["instance"]["pixel_values"] for i in range(3)]
    torch.manual_seed(123), random.seed(123)
    assert all(torch.equal(a, dataset[i]["instance"]["pixel_values"]) for i, a in enumerate(first))
    dataset.set_epoch(1)
    assert any(not torch.equal(a, dataset[i]["instance"]["pixel_values"]) for i, a in enumerate(first))


def test_collate_puts_instance_examples_before_class_examples(tmp_path):
    inst = [_save(Image.new("RGB", (32, 32), "red"), tmp_path / "i.png")]
    cls = [_save(Image.new("RGB", (32, 32), "blue"), tmp_path / f"c{i}.png") for i in range(2)]
    dataset = DreamBoothDataset(inst, cls, resolution=32)
    batch = collate_dreambooth([dataset[0], dataset[1]], resolution=32)
    assert len(dataset) == 2 and batch["num_instance"] == 2
    red, blue = batch["pixel_values"][:, 0, 0, 0], batch["pixel_values"][:, 2, 0, 0]
    assert red.tolist() == [1.0, 1.0, -1.0, -1.0] and blue.tolist() == [-1.0, -1.0, 1.0, 1.0]
    assert batch["target_sizes"].tolist() == [[32.0, 32.0]] * 4


# ---------------------------------------------------------------------------------------------- sampler


def test_sampler_shards_every_global_batch_and_covers_the_epoch():
    ranks = [EpochBatchSampler(7, 2, seed=3, num_replicas=2, rank=r) for r in range(2)]
    assert len(ranks[0]) == 2  # ceil(7 / 4)
    batches = [list(s) for s in ranks]
    assert all(len(b) == 2 for bs in batches for b in bs)
    seen = [i for step in zip(*batches) for b in step for i in b]
    assert set(seen) == set(range(7))  # padded by wrapping around: one index twice
    for s in ranks:
        s.set_epoch(1)
    assert [list(s) for s in ranks] != batches


def test_sampler_resumes_mid_epoch_with_the_same_batches():
    sampler = EpochBatchSampler(10, 3, seed=0)
    sampler.set_epoch(4)
    whole = list(sampler)
    sampler.set_epoch(4, skip_batches=2)
    assert list(sampler) == whole[2:]


# ---------------------------------------------------------------------------------------------- objectives

SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noise_prediction_targets_and_min_snr_weights(prediction_type):
    objective = NoisePrediction(dict(SD_SCHEDULER, prediction_type=prediction_type), snr_gamma=5.0)
    latents = torch.randn(4, 4, 8, 8)
    torch.manual_seed(0)
    noisy = objective.add_noise(latents)
    torch.manual_seed(0)
    noise = torch.randn(latents.shape)
    t = noisy.timesteps
    alpha_bar = objective.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy.model_input, alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise)
    expected = noise if prediction_type == "epsilon" else alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    torch.testing.assert_close(noisy.target, expected)
    snr = (alpha_bar / (1 - alpha_bar)).flatten()
    weight = torch.clamp(snr, max=5.0) / (snr if prediction_type == "epsilon" else snr + 1)
    torch.testing.assert_close(noisy.weights, weight)
    assert objective.loss_per_sample(noisy.target, noisy).abs().max() == 0


def test_flow_matching_interpolates_and_targets_the_velocity():
    objective = FlowMatching(dict(num_train_timesteps=1000, shift=3.0), weighting_scheme="logit_normal")
    latents = torch.randn(3, 16, 4, 4)
    torch.manual_seed(0)
    noisy = objective.add_noise(latents)
    torch.manual_seed(0)
    noise = torch.randn(latents.shape)
    s = noisy.sigmas
    torch.testing.assert_close(noisy.model_input, (1 - s) * latents + s * noise)
    torch.testing.assert_close(noisy.target, noise - latents)
    torch.testing.assert_close(noisy.timesteps.float(), s.flatten() * 1000)
    preconditioned = FlowMatching(dict(num_train_timesteps=1000, shift=3.0), precondition_outputs=True)
    torch.manual_seed(0)
    noisy = preconditioned.add_noise(latents)
    velocity = noise - latents  # the exact velocity gives x_0 back: zero loss
    assert preconditioned.loss_per_sample(velocity, noisy).max() < 1e-10


def test_prior_loss_is_weighted_mean_of_the_class_half():
    per_sample = torch.tensor([1.0, 3.0, 10.0, 20.0])
    assert combine_instance_and_prior_losses(per_sample, 2, 0.5).item() == 2.0 + 0.5 * 15.0
    assert combine_instance_and_prior_losses(per_sample, 4, 0.5).item() == per_sample.mean().item()


@pytest.mark.parametrize("family,expected", [("sd15", 32), ("sd3", 32), ("flux", 1024)])
def test_native_resolution_is_sample_size_times_vae_stride(family, expected):
    from moslora_diffusion.families import get_family
    from moslora_diffusion.testing import make_tiny_pipeline

    # Flux's transformer has no sample_size: the family default (1024) applies.
    assert get_family(family).native_resolution(make_tiny_pipeline(family).components) == expected
