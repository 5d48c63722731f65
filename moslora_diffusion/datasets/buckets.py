"""Aspect-ratio buckets, kohya's algorithm and names (library/model_util.py, library/train_util.py).

Buckets are (width, height) pairs of about ``resolution`` area (w * h <= W * H), sides multiples of
``bucket_reso_steps`` within [min_bucket_reso, max_bucket_reso]. An image goes to the bucket of nearest
aspect ratio, is resized so that it covers the bucket and cropped to it (centre, or random with
``random_crop``). With ``bucket_no_upscale`` an image no larger than the area keeps its size, each side
rounded down to the steps (a larger one is first scaled down to the area). Without ``enable_bucket``
there is one bucket, the resolution itself. A :class:`Placement` records where the crop fell, for SDXL's
micro-conditioning and so that a mask can follow its image exactly.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image

Size = tuple[int, int]  # (width, height), as kohya writes bucket sizes


class BucketError(ValueError):
    """An image or a bucket setting that cannot be trained on; the message names the file or the setting."""


@dataclass(frozen=True)
class BucketOptions:
    """kohya's bucket settings, names and defaults."""

    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False


def make_bucket_resolutions(
    max_reso: Size, min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[Size]:
    """kohya's make_bucket_resolutions: the square of the area, then for each width from ``min_size`` in
    ``divisible`` steps the tallest height (also a multiple, at most ``max_size``) within the area, both ways."""
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // divisible) * divisible
    resolutions = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resolutions.add((width, height))
            resolutions.add((height, width))
        width += divisible
    return sorted(resolutions)


@dataclass(frozen=True)
class BucketChoice:
    bucket: Size  # the size trained at
    resized_size: Size  # the image's size after resizing, covering the bucket


class BucketSelector:
    """Chooses each image's bucket for one dataset (its resolution and bucket options)."""

    def __init__(self, resolution: Size, options: BucketOptions):
        self.resolution, self.options = resolution, options
        if not options.enable_bucket:
            self.resolutions: list[Size] | None = [resolution]
        elif options.bucket_no_upscale:
            self.resolutions = None  # every image makes its own bucket
        else:
            self.resolutions = make_bucket_resolutions(
                resolution, options.min_bucket_reso, options.max_bucket_reso, options.bucket_reso_steps
            )

    def select(self, image_size: Size, name: str = "image") -> BucketChoice:
        """kohya's BucketManager.select_bucket; ``name`` (the file) is named if the image is too small."""
        width, height = image_size
        aspect = width / height
        if self.resolutions is None:
            return self._no_upscale(width, height, aspect, name)
        if image_size in self.resolutions:
            bucket = image_size
        else:
            bucket = min(self.resolutions, key=lambda size: abs(size[0] / size[1] - aspect))
        scale = bucket[1] / height if aspect > bucket[0] / bucket[1] else bucket[0] / width
        return BucketChoice(bucket, (int(width * scale + 0.5), int(height * scale + 0.5)))

    def _no_upscale(self, width: int, height: int, aspect: float, name: str) -> BucketChoice:
        steps, max_area = self.options.bucket_reso_steps, self.resolution[0] * self.resolution[1]
        resized = (width, height)
        if width * height > max_area:
            # Shrink to the area, rounding whichever side keeps the aspect ratio closer (kohya's rule).
            scaled_width = math.sqrt(max_area * aspect)
            scaled_height = max_area / scaled_width
            width_rounded = _round_to_steps(scaled_width, steps)
            height_for_width = _round_to_steps(width_rounded / aspect, steps)
            height_rounded = _round_to_steps(scaled_height, steps)
            width_for_height = _round_to_steps(height_rounded * aspect, steps)
            error_w = abs(width_rounded / max(height_for_width, 1) - aspect)
            error_h = abs(width_for_height / max(height_rounded, 1) - aspect)
            if error_w < error_h:
                resized = (width_rounded, int(width_rounded / aspect + 0.5))
            else:
                resized = (int(height_rounded * aspect + 0.5), height_rounded)
        bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
        if min(bucket) == 0:
            raise BucketError(
                f"{name}: {width}x{height} px is smaller than bucket_reso_steps ({steps}) on one side with "
                "bucket_no_upscale; enlarge or remove the image, or drop bucket_no_upscale"
            )
        return BucketChoice(bucket, resized)


def _round_to_steps(value: float, steps: int) -> int:
    value = int(value + 0.5)
    return value - value % steps


def bucket_step_multiple(vae_scale_factor: int, latent_multiple: int = 1) -> int:
    """The pixel multiple every bucket side needs: the VAE's downsampling times what the model needs of a
    latent side (Flux packs 2x2 latent patches: 8 * 2 = 16; SD, SDXL, SD3: 8 * 1 = 8)."""
    return vae_scale_factor * latent_multiple


def check_bucket_sides(resolution: Size, options: BucketOptions, multiple: int, family: str) -> None:
    """Raise BucketError unless every bucket side is a multiple of ``multiple`` (see :func:`bucket_step_multiple`)."""
    if options.enable_bucket:
        if options.bucket_reso_steps % multiple:
            raise BucketError(
                f"bucket_reso_steps = {options.bucket_reso_steps} does not suit {family}: bucket sides must be "
                f"multiples of {multiple} px; use a multiple of {multiple} such as 64"
            )
        if not options.bucket_no_upscale and options.min_bucket_reso % options.bucket_reso_steps:
            raise BucketError(
                f"min_bucket_reso = {options.min_bucket_reso} is not a multiple of bucket_reso_steps = "
                f"{options.bucket_reso_steps}: buckets would have other sides; make it a multiple"
            )
    elif resolution[0] % multiple or resolution[1] % multiple:
        raise BucketError(
            f"resolution {resolution[0]}x{resolution[1]} does not suit {family}: both sides must be multiples of "
            f"{multiple} px"
        )


@dataclass(frozen=True)
class Placement:
    """Where an image lands in its bucket: resize to ``resized_size``, crop at (crop_left, crop_top), then
    flip. ``crop_top_left`` is in the flipped resized image, as if flipped before cropping (diffusers' SDXL)."""

    original_size: tuple[int, int]  # (height, width) of the upright image: SDXL's original_size
    resized_size: Size
    bucket: Size
    crop_left: int
    crop_top: int
    flip: bool

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """(top, left): SDXL's crops_coords_top_left."""
        left = self.resized_size[0] - self.bucket[0] - self.crop_left if self.flip else self.crop_left
        return (self.crop_top, left)

    @property
    def target_size(self) -> tuple[int, int]:
        """(height, width) trained at: SDXL's target_size."""
        return (self.bucket[1], self.bucket[0])


def place(image_size: Size, choice: BucketChoice, *, random_crop: bool, flip: bool, rng: random.Random) -> Placement:
    """The crop for ``choice``: centred (kohya: overhang // 2) or uniform over the overhang with ``random_crop``."""
    overhang_x = choice.resized_size[0] - choice.bucket[0]
    overhang_y = choice.resized_size[1] - choice.bucket[1]
    left = rng.randint(0, overhang_x) if random_crop else overhang_x // 2
    top = rng.randint(0, overhang_y) if random_crop else overhang_y // 2
    return Placement((image_size[1], image_size[0]), choice.resized_size, choice.bucket, left, top, flip)


def apply_placement(
    image: Image.Image, placement: Placement, resample: Image.Resampling = Image.Resampling.LANCZOS
) -> Image.Image:
    """Resize, crop and flip ``image`` (an image or its mask: the same geometry for both)."""
    if image.size != placement.resized_size:
        image = image.resize(placement.resized_size, resample=resample)
    width, height = placement.bucket
    image = image.crop(
        (placement.crop_left, placement.crop_top, placement.crop_left + width, placement.crop_top + height)
    )
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if placement.flip else image
