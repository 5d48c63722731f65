"""Reading training images: listing, every image mode a camera or editor writes, EXIF rotation, bad files."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from moslora_diffusion.datasets.images import ImageReadError, list_images, load_image, upright_size


def _png_rgb16(path, pixels: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), written chunk by chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def _palette_with_transparency(path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((1, 1), 1)
    image.save(path, transparency=0)


# (name, writer, pixel (x, y), expected RGB there, expected alpha there or None)
MODES = [
    ("rgb.png", lambda p: Image.new("RGB", (4, 4), (10, 20, 30)).save(p), (0, 0), (10, 20, 30), None),
    ("rgba.png", lambda p: Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(p), (0, 0), (255, 255, 255), 0),
    ("la.png", lambda p: Image.new("LA", (4, 4), (0, 128)).save(p), (0, 0), (127, 127, 127), 128),
    ("palette.png", _palette_with_transparency, (1, 1), (0, 255, 0), 255),
    ("cmyk.jpg", lambda p: Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(p, quality=100), (0, 0), (255, 0, 0), None),
    ("grey16.png", lambda p: Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(p), (0, 0), (255, 255, 255), None),
    (  # 16-bit greyscale ramp: scaled to 8 bits (7 * 4369 / 257 = 119), not clipped to white
        "grey16ramp.png",
        lambda p: Image.fromarray(np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369).save(p),
        (3, 1),
        (119, 119, 119),
        None,
    ),
    (
        "rgb16.png",
        lambda p: _png_rgb16(p, np.full((4, 4, 3), [65535, 32896, 0], np.uint16)),
        (0, 0),
        (255, 128, 0),
        None,
    ),
]


@pytest.mark.parametrize("name, write, xy, rgb, alpha", MODES, ids=[m[0] for m in MODES])
def test_every_image_mode_becomes_8_bit_rgb_with_its_alpha_apart(tmp_path, name, write, xy, rgb, alpha):
    path = tmp_path / name
    write(path)
    image, alpha_channel = load_image(path)
    assert image.mode == "RGB"
    assert all(abs(a - b) <= 2 for a, b in zip(image.getpixel(xy), rgb)), image.getpixel(xy)
    assert (alpha_channel is None) == (alpha is None)
    if alpha is not None:
        assert alpha_channel.mode == "L" and alpha_channel.getpixel(xy) == alpha


def test_exif_rotated_photo_is_upright_in_size_and_pixels(tmp_path):
    image = Image.new("RGB", (6, 4), (0, 0, 0))
    image.putpixel((5, 0), (255, 0, 0))  # top-right as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    image.save(tmp_path / "r.png", exif=exif)
    assert upright_size(tmp_path / "r.png") == (4, 6)
    upright, _ = load_image(tmp_path / "r.png")
    assert upright.size == (4, 6)
    assert upright.getpixel((3, 5)) == (255, 0, 0)  # stored top-right lands bottom-right after turning clockwise


def test_list_images_takes_image_extensions_only_sorted(tmp_path):
    for name in ("b.PNG", "a.jpg", "a.txt", "metadata.jsonl", ".hidden.png"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path, "--instance_data_dir")] == ["a.jpg", "b.PNG"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing", "does not exist"),
        (lambda d: (d / "f.png").write_bytes(b"x") and d / "f.png", "is a file, expected a folder"),
        (lambda d: (d / "notes.txt").write_text("hi") and d, "holds no images"),
    ],
    ids=["missing", "file", "no-images"],
)
def test_bad_image_folder_is_one_error_naming_source_and_folder(tmp_path, make, message):
    folder = make(tmp_path)
    with pytest.raises(ImageReadError, match=message) as err:
        list_images(folder, "datasets[0].subsets[1]")
    assert "datasets[0].subsets[1]" in str(err.value) and str(folder) in str(err.value)


@pytest.mark.parametrize(
    "content",
    [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20],
    ids=["garbage", "png-header-only"],
)
def test_unreadable_image_is_one_error_naming_it(tmp_path, content):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match="bad.png"):
        load_image(path)


def test_truncated_image_fails_when_decoded_naming_it(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="t.png"):
        load_image(tmp_path / "t.png")


@pytest.mark.parametrize("limit", [40, 100], ids=["past-the-error-limit", "past-the-warning-limit"])
def test_decompression_bomb_is_refused_by_name(tmp_path, monkeypatch, limit):
    Image.new("RGB", (10, 10)).save(tmp_path / "bomb.png")  # 100 pixels: > 2x40 (PIL error), > 60 (warning)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit if limit == 40 else 60)
    for read in (load_image, upright_size):
        with pytest.raises(ImageReadError, match="bomb.png.*decompression bomb"):
            read(tmp_path / "bomb.png")
