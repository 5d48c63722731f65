"""Training images from a Hugging Face dataset (``--dataset_name``, ``--image_column``, ``--caption_column``).

A dataset becomes :class:`DatasetRow`s (an image file and its caption, or None) that feed the same records,
buckets, caches and resume as an image folder. Where the dataset can be:

- a folder written by ``Dataset.save_to_disk`` (read with ``load_from_disk``);
- any other local folder or a Hub id (``load_dataset``; a folder of images with a metadata.jsonl/.csv is
  the ``imagefolder`` builder, read offline).

Images are never decoded here: an image the dataset keeps as a file is used where it is; one kept as bytes
inside the dataset (Parquet, Arrow, save_to_disk) is written once to ``images_dir`` under the SHA-256 of its
bytes, so the latent cache keys it like any file and a second run writes nothing. ``datasets`` is an
optional dependency: without it, one line says how to install it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..fileio import atomic_path
from .images import names

logger = logging.getLogger(__name__)

INSTALL_HINT = "--dataset_name needs the datasets package: pip install datasets"
DEFAULT_CAPTION_COLUMN = "text"  # diffusers' and imagefolder's name for the caption


class HFDatasetError(ValueError):
    """A dataset that cannot be trained on; one line naming the dataset, the column and what to do."""


@dataclass(frozen=True)
class DatasetRow:
    image: Path
    caption: str | None  # None: the row has no caption (the fallback prompt is used)


def load_rows(
    name: str,
    *,
    image_column: str = "image",
    caption_column: str | None = None,
    config_name: str | None = None,
    cache_dir: str | None = None,
    images_dir: Path,
) -> list[DatasetRow]:
    """The rows of dataset ``name``'s train split; ``caption_column`` None: "text" where the dataset has it,
    else no captions. Raises :class:`HFDatasetError`."""
    return dataset_rows(open_dataset(name, config_name, cache_dir), name, image_column, caption_column, images_dir)


def open_dataset(name: str, config_name: str | None = None, cache_dir: str | None = None):
    """The ``train`` split of a save_to_disk folder, local dataset folder or Hub dataset."""
    try:
        import datasets
    except ImportError:
        raise HFDatasetError(INSTALL_HINT) from None
    folder = Path(name).expanduser()
    if not folder.exists() and not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise HFDatasetError(f"--dataset_name '{name}': no such folder (and not a Hub id such as owner/name)")
    saved = folder.is_dir() and any((folder / f).is_file() for f in ("state.json", "dataset_dict.json"))
    try:
        if saved:
            loaded = datasets.load_from_disk(str(folder))
        else:
            loaded = datasets.load_dataset(name, config_name, cache_dir=cache_dir)
    except Exception as err:  # datasets raises a dozen kinds here (not found, offline, bad files, bad config)
        detail = " ".join(str(err).split())[:300]
        raise HFDatasetError(f"--dataset_name '{name}': cannot load it ({type(err).__name__}: {detail})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise HFDatasetError(f"--dataset_name '{name}' has no 'train' split; its splits: {', '.join(loaded)}")
        loaded = loaded["train"]
    return loaded


def dataset_rows(
    dataset, name: str, image_column: str, caption_column: str | None, images_dir: Path
) -> list[DatasetRow]:
    """``dataset``'s images (as files) and captions; rows without a usable image are skipped with one warning."""
    import datasets

    features = dataset.features
    columns = ", ".join(f"{column} ({_kind(feature)})" for column, feature in features.items())
    if image_column not in features:
        raise HFDatasetError(
            f"--image_column '{image_column}' is not a column of dataset '{name}'; its columns: {columns}"
        )
    if not isinstance(features[image_column], datasets.Image):
        raise HFDatasetError(
            f"--image_column '{image_column}' of dataset '{name}' holds {_kind(features[image_column])} values, not "
            f"images; choose the image column with --image_column (columns: {columns})"
        )
    if caption_column is None and DEFAULT_CAPTION_COLUMN in features:
        caption_column = DEFAULT_CAPTION_COLUMN
    if caption_column is not None:
        if caption_column not in features:
            raise HFDatasetError(
                f"--caption_column '{caption_column}' is not a column of dataset '{name}'; its columns: {columns}"
            )
        if _kind(features[caption_column]) not in ("string", "large_string"):
            raise HFDatasetError(
                f"--caption_column '{caption_column}' of dataset '{name}' holds {_kind(features[caption_column])} "
                f"values, not text; choose the caption column with --caption_column (columns: {columns})"
            )
    wanted = [image_column] + ([caption_column] if caption_column else [])
    table = dataset.select_columns(wanted).cast_column(image_column, datasets.Image(decode=False))
    rows, skipped = [], []
    for index, row in enumerate(table):
        image = _image_file(row[image_column], images_dir)
        if image is None:
            skipped.append(f"row {index}")
            continue
        rows.append(DatasetRow(image, row[caption_column] if caption_column else None))
    if skipped:
        logger.warning(
            "Skipping %d row(s) of dataset '%s' without a readable image in column '%s': %s",
            len(skipped), name, image_column, names([Path(s) for s in skipped]),
        )  # fmt: skip
    if not rows:
        raise HFDatasetError(f"dataset '{name}' has no rows with a readable image in column '{image_column}'")
    return rows


def _kind(feature) -> str:
    """A column's type in a word: Value's dtype ("string", "int64"), else the feature's class ("Image")."""
    return feature.dtype if type(feature).__name__ == "Value" else type(feature).__name__


def _image_file(value: dict | None, images_dir: Path) -> Path | None:
    """The file of one undecoded image value ({"bytes", "path"}): its bytes written by hash, else its path."""
    if not value:
        return None
    if value.get("bytes"):
        return _stored(value["bytes"], images_dir)
    path = Path(value["path"]) if value.get("path") else None
    return path if path is not None and path.is_file() else None


def _stored(data: bytes, images_dir: Path) -> Path | None:
    """``data`` as ``images_dir/<sha256>.<format>`` (written atomically, once); None when PIL cannot identify it."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            extension = (image.format or "img").lower()
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    path = images_dir / f"{hashlib.sha256(data).hexdigest()}.{extension}"
    if not path.is_file():
        try:
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
        except OSError as err:
            raise HFDatasetError(
                f"cannot write the dataset's images to {images_dir} ({err}); set MOSLORA_CACHE_DIR to a writable folder"
            ) from None
    return path
