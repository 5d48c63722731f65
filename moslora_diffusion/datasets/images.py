"""Finding and reading training images: one clear error naming the file for anything that cannot be read.

Images are upright (EXIF orientation applied) 8-bit RGB; transparency is composited on white (its alpha
is kept apart for masked loss); CMYK, palette, greyscale-with-alpha and 16-bit images are converted so
that their colours survive. A decompression bomb (an image past PIL's pixel limit) is refused by name.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

# kohya's glob_images takes these (and their upper-case forms); captions and metadata beside them are not images.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_LISTED_NAMES = 5  # how many file names an error message shows
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")


class ImageReadError(ValueError):
    """An image (or image folder) that cannot be trained on; the message names the file and what to do."""


def list_images(folder: str | Path, source: str) -> list[Path]:
    """The image files directly in ``folder`` (by extension, sorted by name); ``source`` names the folder's
    origin in errors (a flag such as ``--instance_data_dir`` or a table such as ``datasets[0].subsets[1]``).

    Raises :class:`ImageReadError` for a missing folder, a file, or a folder without images.
    """
    folder = Path(folder)
    if not folder.exists():
        raise ImageReadError(f"{source} '{folder}' does not exist")
    if not folder.is_dir():
        raise ImageReadError(f"{source}: '{folder}' is a file, expected a folder of images")
    files = _files(folder)
    if not files:
        raise ImageReadError(f"{source} '{folder}' is empty: put the training images there")
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        raise ImageReadError(
            f"{source}: '{folder}' holds no images ({', '.join(IMAGE_EXTENSIONS)}); found {len(files)} other files"
            + (f": {names(files)}" if files else "")
        )
    return images


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def usable_images(folder: str | Path, source: str) -> list[Path]:
    """:func:`list_images`, without the images that cannot be decoded: they are skipped with one warning naming
    them and the folder's stray files (a file sharing an image's stem, such as its caption, or a metadata
    file belongs to the images and is not named). Raises :class:`ImageReadError` when no image is readable.
    """
    images = list_images(folder, source)
    readable = [path for path in images if _decodes(path)]
    files = _files(Path(folder))
    if not readable:
        raise ImageReadError(f"{source} '{folder}' holds no readable images (found {len(files)} files: {names(files)})")
    stems = {path.stem for path in readable}
    companions = [path for path in files if path.stem in stems or path.name in ("metadata.jsonl", "metadata.csv")]
    skipped = [path for path in files if path not in readable and (path in images or path not in companions)]
    if skipped:
        logger.warning("Skipping %d unreadable file(s) in %s '%s': %s", len(skipped), source, folder, names(skipped))
    return readable


def readable_files(paths: Sequence[Path], source: str) -> list[Path]:
    """``paths`` (image files listed by a dataset) without those that cannot be decoded: skipped with one warning
    naming them. Raises :class:`ImageReadError` when none is readable."""
    readable = [path for path in paths if _decodes(path)]
    if not readable:
        raise ImageReadError(f"{source}: none of its {len(paths)} images is readable ({names(list(paths))})")
    if len(readable) < len(paths):
        skipped = [path for path in paths if path not in set(readable)]
        logger.warning("Skipping %d unreadable image(s) of %s: %s", len(skipped), source, names(skipped))
    return readable


def _decodes(path: Path) -> bool:
    """Whether the image decodes fully (a truncated file opens, then fails here rather than mid-training)."""
    try:
        with _open(path) as image:
            image.load()
        return True
    except (ImageReadError, OSError, ValueError, SyntaxError):
        return False


def _open(path: Path) -> Image.Image:
    """PIL's lazy open, with every failure (and a decompression bomb) as one ImageReadError naming ``path``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageReadError(
            f"{path}: refused as a possible decompression bomb ({err}); resize the image below "
            f"{Image.MAX_IMAGE_PIXELS} pixels or remove it"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ImageReadError(f"{path}: cannot read this image ({err}); replace or remove the file") from None


def upright_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as the image is shown, EXIF rotation included, read from the header alone (fast)."""
    path = Path(path)
    with _open(path) as image:
        width, height = image.size
        try:
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        except (OSError, ValueError, SyntaxError):  # a broken EXIF block: the pixels may still be fine
            orientation = 1
    return (height, width) if orientation in _TRANSPOSED_ORIENTATIONS else (width, height)


def load_image(path: str | Path) -> tuple[Image.Image, Image.Image | None]:
    """(RGB image, alpha channel as mode "L" or None): upright, 8-bit, transparency composited on white."""
    path = Path(path)
    with _open(path) as image:
        try:
            image.load()  # decodes fully: truncated files fail here, not in the middle of training
            image = ImageOps.exif_transpose(image)
            return to_rgb_and_alpha(image)
        except (OSError, ValueError, SyntaxError) as err:
            raise ImageReadError(f"{path}: cannot decode this image ({err}); replace or remove the file") from None


def to_rgb_and_alpha(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """8-bit RGB on white, plus the alpha channel where the image has one."""
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _scale_to_8_bit(image, 255.0 / 65535.0)
    elif image.mode in ("I", "F"):
        # 32-bit modes carry no bit depth: values past 255 mean a 16-bit source (PIL's convert("L") clips).
        values = np.asarray(image, dtype=np.float64)
        image = _scale_to_8_bit(image, 255.0 / 65535.0 if values.max(initial=0) > 255 else 1.0)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in _ALPHA_MODES:
        image = image.convert("RGBA")
        alpha = image.getchannel("A")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB"), alpha
    return image.convert("RGB"), None


def _scale_to_8_bit(image: Image.Image, scale: float) -> Image.Image:
    values = np.asarray(image, dtype=np.float64) * scale
    return Image.fromarray(np.clip(values, 0, 255).round().astype(np.uint8), mode="L")


def names(paths: Sequence[Path]) -> str:
    """A few file names for a message: 'a.png, b.png, ...'."""
    shown = ", ".join(p.name for p in paths[:_LISTED_NAMES])
    return shown + (", ..." if len(paths) > _LISTED_NAMES else "")
