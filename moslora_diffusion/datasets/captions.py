"""Per-image captions, and kohya's caption operations (shuffle with kept tokens, dropout).

Where a caption comes from, first match wins:

1. a sidecar file ``<stem><caption_extension>`` beside the image (its first non-blank line, UTF-8);
2. the folder's ``metadata.jsonl`` or ``metadata.csv`` (Hugging Face imagefolder: a ``file_name`` column
   and a text column, ``caption_column``, default "text");
3. the fallback: the instance prompt (flags) or the subset's ``class_tokens`` (kohya), used only where a
   caption is missing, as kohya does. A caption file that is empty or not UTF-8 is a warning naming it, and
   the fallback is used.

Every random choice takes an explicit ``random.Random`` (see :func:`caption_rng`), so a resumed run
shuffles and drops the same captions as the uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .images import names

logger = logging.getLogger(__name__)

METADATA_FILES = ("metadata.jsonl", "metadata.csv")


class CaptionError(ValueError):
    """A metadata file that cannot be read; the message names the file (and line) and what to do."""


@dataclass(frozen=True)
class CaptionOptions:
    """kohya's per-subset caption operations, with kohya's names and defaults."""

    shuffle_caption: bool = False  # shuffle the separator-split tokens every time the caption is used
    keep_tokens: int = 0  # with shuffle_caption: the first N tokens stay in place
    caption_separator: str = ","  # what splits a caption into tokens
    caption_dropout_rate: float = 0.0  # probability of training on the empty prompt (for guidance)
    caption_prefix: str | None = None  # text put before every caption (before shuffling, as kohya does)
    caption_suffix: str | None = None  # text put after every caption


def caption_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator for sample ``index`` of ``epoch``: string seeds hash with SHA-512, stable across runs."""
    return random.Random(f"{seed}/{epoch}/caption/{index}")


def process_caption(caption: str, options: CaptionOptions, rng: random.Random) -> str:
    """kohya's process_caption: prefix/suffix, then dropout (-> ""), then shuffle all but the first
    ``keep_tokens`` tokens (split on ``caption_separator``, stripped, joined with ", ")."""
    if options.caption_prefix:
        caption = f"{options.caption_prefix} {caption}"
    if options.caption_suffix:
        caption = f"{caption} {options.caption_suffix}"
    if options.caption_dropout_rate > 0 and rng.random() < options.caption_dropout_rate:
        return ""
    if not options.shuffle_caption:
        return caption
    tokens = [token.strip() for token in caption.strip().split(options.caption_separator)]
    fixed, flexible = tokens[: options.keep_tokens], tokens[options.keep_tokens :]
    rng.shuffle(flexible)
    return ", ".join(fixed + flexible)


def read_captions(
    images: Sequence[Path],
    *,
    caption_extension: str = ".txt",
    caption_column: str = "text",
    fallback: str | None = None,
    source: str = "images",
) -> list[str]:
    """One caption per image (sidecar file, then folder metadata, then ``fallback``, else "").

    ``source`` names the images' origin in log lines. Raises :class:`CaptionError` for a metadata file that
    is malformed or lacks the needed columns.
    """
    metadata: dict[Path, dict[str, str]] = {}
    captions, missing = [], []
    for image in images:
        folder = image.parent
        if folder not in metadata:
            metadata[folder] = read_metadata(folder, caption_column)
        caption = _sidecar_caption(image.with_name(image.stem + caption_extension))
        if caption is None:
            caption = _metadata_caption(metadata[folder], image)
        if caption is None:
            missing.append(image)
        captions.append(caption if caption is not None else (fallback or ""))
    _report_missing(missing, len(images), fallback, f"{caption_extension} files or metadata", source)
    return captions


def captions_or_fallback(
    captions: Sequence[str | None], images: Sequence[Path], fallback: str | None, source: str
) -> list[str]:
    """The captions a dataset gives with its images (None: none); a blank one warns, and those missing are
    ``fallback`` (else "")."""
    result, missing = [], []
    for caption, image in zip(captions, images):
        text = _first_line(caption, f"{image.name} in {source}") if caption is not None else None
        if text is None:
            missing.append(image)
        result.append(text if text is not None else (fallback or ""))
    _report_missing(missing, len(images), fallback, "no caption column", source)
    return result


def _sidecar_caption(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        logger.warning("Caption file %s is not UTF-8 (%s); using the fallback prompt for its image", path, err.reason)
        return None
    except OSError as err:
        logger.warning("Cannot read caption file %s (%s); using the fallback prompt for its image", path, err)
        return None
    return _first_line(text, str(path))


def _first_line(text: str, where: str) -> str | None:
    """kohya reads one caption per image: the first non-blank line; an empty caption warns and falls back."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    logger.warning("Caption for %s is empty; using the fallback prompt for its image", where)
    return None


def _metadata_caption(entries: dict[str, str], image: Path) -> str | None:
    if image.name not in entries:
        return None
    return _first_line(entries[image.name], f"{image.name} in {image.parent / 'metadata'}.*")


def read_metadata(folder: Path, caption_column: str = "text") -> dict[str, str]:
    """{file_name: caption} from the folder's metadata.jsonl or metadata.csv ({} when it has neither)."""
    found = [folder / name for name in METADATA_FILES if (folder / name).is_file()]
    if not found:
        return {}
    if len(found) > 1:
        raise CaptionError(f"{folder}: both metadata.jsonl and metadata.csv are present; keep one of them")
    path = found[0]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CaptionError(f"{path}: not UTF-8 ({err.reason} at byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise CaptionError(f"{path}: cannot read it ({err})") from None
    rows = _jsonl_rows(path, text) if path.suffix == ".jsonl" else _csv_rows(path, text, caption_column)
    entries = {}
    for line, row in rows:
        file_name, caption = row.get("file_name"), row.get(caption_column)
        if not isinstance(file_name, str) or not file_name:
            raise CaptionError(f"{path}:{line}: expected a 'file_name' string naming an image, found {file_name!r}")
        if not isinstance(caption, str):
            raise CaptionError(
                f"{path}:{line}: expected a text column '{caption_column}' (choose it with --caption_column), "
                f"found {caption!r} among columns {sorted(str(k) for k in row)}"
            )
        entries[Path(file_name).name] = caption
    return entries


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError as err:
            raise CaptionError(f"{path}:{line}: not a JSON object ({err}); each line must be one object") from None
        if not isinstance(row, dict):
            raise CaptionError(f"{path}:{line}: expected a JSON object with file_name and a caption, found {row!r}")
        rows.append((line, row))
    return rows


def _csv_rows(path: Path, text: str, caption_column: str) -> list[tuple[int, dict]]:
    try:
        reader = csv.DictReader(text.splitlines())
        header = reader.fieldnames or []
        if "file_name" not in header or caption_column not in header:
            raise CaptionError(
                f"{path}: expected columns 'file_name' and '{caption_column}' (choose it with --caption_column), "
                f"found {header}"
            )
        return [(reader.line_num, dict(row)) for row in reader]
    except csv.Error as err:
        raise CaptionError(f"{path}: not a valid CSV file ({err})") from None


def _report_missing(missing: list[Path], total: int, fallback: str | None, searched: str, source: str) -> None:
    if not missing:
        return
    using = f"using {fallback!r}" if fallback else "using the empty caption (set a fallback prompt or class_tokens)"
    if len(missing) == total and fallback:
        logger.info("%s: no captions (%s); %s for all %d images", source, searched, using, total)
    else:
        logger.warning(
            "%s: %d of %d images have no caption (%s); %s", source, len(missing), total, names(missing), using
        )
