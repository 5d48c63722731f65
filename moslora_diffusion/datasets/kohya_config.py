"""kohya's dataset TOML (``--dataset_config``): ``[general]``, ``[[datasets]]``, ``[[datasets.subsets]]``.

Keys, levels, types and defaults follow kohya sd-scripts' library/config_util.py (DreamBooth-style
subsets). A subset key may also sit in its dataset or in [general]; a dataset key in [general]; the value
nearest the subset wins (subset > dataset > general > the caller's fallbacks, e.g. command-line flags >
kohya's default). Two differences: relative paths are relative to the TOML file, and ``mask_dir`` (a
folder of masks with the images' stems) is ours. Every problem is one :class:`DatasetConfigError` line
naming the file, the table (``datasets[0].subsets[1]``) and the key; kohya keys we do not implement are
accepted only at their kohya default (so they change nothing) and are otherwise refused by name.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from .buckets import BucketOptions, Size
from .captions import CaptionOptions
from .hf_dataset import DatasetRow

logger = logging.getLogger(__name__)


class DatasetConfigError(ValueError):
    """A dataset file that cannot be used; one line naming the file, table and key."""


@dataclass(frozen=True)
class SubsetSpec:
    """One folder of images: a concept (or, with ``is_reg``, prior-preservation images)."""

    image_dir: Path
    is_reg: bool = False
    num_repeats: int = 1
    class_tokens: str | None = None  # the caption of images without one
    caption_extension: str = ".caption"  # kohya's default; the flag route defaults to ".txt"
    caption: CaptionOptions = field(default_factory=CaptionOptions)
    flip_aug: bool = False
    random_crop: bool = False
    alpha_mask: bool = False
    mask_dir: Path | None = None
    source: str | None = None  # how messages name it: a flag (--instance_data_dir); None: its table in the file
    # The images and captions of a Hugging Face dataset (--dataset_name), used instead of image_dir's files.
    rows: tuple[DatasetRow, ...] | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class DatasetSpec:
    """Subsets sharing a resolution, batch size and bucket settings (a batch never mixes datasets)."""

    subsets: tuple[SubsetSpec, ...]
    resolution: Size | None  # (width, height); None on the flag route until the base says its default
    batch_size: int = 1
    buckets: BucketOptions = field(default_factory=BucketOptions)


def _resolution(value) -> Size:
    if _is_int(value) and value > 0:
        return (value, value)
    if isinstance(value, list) and len(value) == 2 and all(_is_int(v) and v > 0 for v in value):
        return (value[0], value[1])
    raise TypeError("a positive integer or [width, height]")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checker(kind: type, minimum: float | None = None, maximum: float | None = None):
    """A converter for a scalar key: the type (ints pass as floats, bools never as numbers), then the range."""

    def check(value):
        ok = isinstance(value, bool) if kind is bool else _is_int(value) if kind is int else isinstance(value, kind)
        if kind is float and _is_int(value):
            ok, value = True, float(value)
        name = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
        if not ok:
            raise TypeError(name)
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise TypeError(f"{name} {bounds}")
        return value

    return check


SUBSET_ONLY_KEYS = {
    "image_dir": _checker(str),
    "is_reg": _checker(bool),
    "mask_dir": _checker(str),
}
SUBSET_KEYS = {
    "num_repeats": _checker(int),
    "class_tokens": _checker(str),
    "caption_extension": _checker(str),
    "shuffle_caption": _checker(bool),
    "keep_tokens": _checker(int, 0),
    "caption_separator": _checker(str),
    "caption_dropout_rate": _checker(float, 0, 1),
    "caption_prefix": _checker(str),
    "caption_suffix": _checker(str),
    "flip_aug": _checker(bool),
    "random_crop": _checker(bool),
    "alpha_mask": _checker(bool),
}
DATASET_KEYS = {
    "resolution": _resolution,
    "batch_size": _checker(int, 1),
    "enable_bucket": _checker(bool),
    "min_bucket_reso": _checker(int, 1),
    "max_bucket_reso": _checker(int, 1),
    "bucket_reso_steps": _checker(int, 1),
    "bucket_no_upscale": _checker(bool),
}
# kohya keys we do not implement, with the value at which they change nothing (accepted silently).
UNSUPPORTED_KEYS = {
    "color_aug": False, "face_crop_aug_range": None, "keep_tokens_separator": "", "secondary_separator": "",
    "enable_wildcard": False, "token_warmup_min": 1, "token_warmup_step": 0, "custom_attributes": {},
    "resize_interpolation": None, "caption_dropout_every_n_epochs": 0, "caption_tag_dropout_rate": 0,
    "cache_info": False, "validation_seed": None, "validation_split": 0, "network_multiplier": 1,
    "metadata_file": None, "conditioning_data_dir": None,
}  # fmt: skip


def load_dataset_config(path: str | Path, fallbacks: Mapping[str, object] | None = None) -> tuple[DatasetSpec, ...]:
    """Read and check a kohya dataset TOML; ``fallbacks`` are values for keys the file leaves out."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetConfigError(f"{path}: no such dataset config file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetConfigError(f"{path}: cannot read the dataset config ({err})") from None
    except tomllib.TOMLDecodeError as err:
        raise DatasetConfigError(f"{path}: not valid TOML ({err})") from None
    return parse_dataset_config(data, source=str(path), base_dir=path.parent, fallbacks=fallbacks)


def parse_dataset_config(
    data: Mapping, *, source: str, base_dir: Path, fallbacks: Mapping[str, object] | None = None
) -> tuple[DatasetSpec, ...]:
    """Check an already-parsed dataset config; ``source`` (the file) starts every error message."""

    def fail(table: str, key: str | None, message: str) -> DatasetConfigError:
        return DatasetConfigError(f"{source}: {'.'.join(part for part in (table, key) if part)}: {message}")

    _check_table(data, {"general", "datasets"}, fail)
    general = _table(data.get("general", {}), "[general]", fail)
    _check_keys(general, "general", {**SUBSET_KEYS, **DATASET_KEYS}, fail)
    defaults = {key: value for key, value in (fallbacks or {}).items() if value is not None}
    _check_keys(defaults, "fallbacks", {**SUBSET_KEYS, **DATASET_KEYS}, fail)
    datasets = _array_of_tables(data.get("datasets"), "datasets", "[[datasets]]", fail)
    specs = []
    for d, dataset in enumerate(datasets):
        where = f"datasets[{d}]"
        _check_keys(dataset, where, {**SUBSET_KEYS, **DATASET_KEYS, "subsets": None}, fail)
        chain = (dataset, general, defaults)
        value = _lookup(chain, DATASET_KEYS)
        if value("resolution") is None:
            raise fail(where, "resolution", "not set: put resolution = 512 (or [width, height]) in [general]")
        bucket_keys = ("enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale")
        buckets = BucketOptions(**{key: value(key) for key in bucket_keys if value(key) is not None})
        if buckets.min_bucket_reso > buckets.max_bucket_reso:
            raise fail(
                where,
                "min_bucket_reso",
                f"{buckets.min_bucket_reso} is above max_bucket_reso {buckets.max_bucket_reso}",
            )
        subsets = []
        subset_tables = _array_of_tables(dataset.get("subsets"), f"{where}.subsets", "[[datasets.subsets]]", fail)
        for s, subset in enumerate(subset_tables):
            spec = _subset(subset, f"{where}.subsets[{s}]", (subset, *chain), base_dir, fail)
            if spec is not None:
                subsets.append(spec)
        if not subsets:
            raise fail(where, "subsets", "every subset has num_repeats < 1: nothing to train on")
        specs.append(DatasetSpec(tuple(subsets), value("resolution"), value("batch_size") or 1, buckets))
    return tuple(specs)


def _subset(subset: dict, where: str, chain: tuple[dict, ...], base_dir: Path, fail) -> SubsetSpec | None:
    _check_keys(subset, where, {**SUBSET_KEYS, **SUBSET_ONLY_KEYS}, fail)
    value = _lookup(chain, SUBSET_KEYS)
    if "image_dir" not in subset:
        raise fail(where, "image_dir", "missing: every [[datasets.subsets]] needs the folder of its images")
    image_dir = _folder(base_dir, subset["image_dir"], where, "image_dir", fail)
    repeats = value("num_repeats")
    if repeats is not None and repeats < 1:
        logger.warning(
            "%s: num_repeats = %d, so the subset '%s' is left out (as kohya does)", where, repeats, image_dir
        )
        return None
    mask_dir = _folder(base_dir, subset["mask_dir"], where, "mask_dir", fail) if "mask_dir" in subset else None
    caption_fields = [option.name for option in dataclasses.fields(CaptionOptions)]
    present = {
        key: value(key)
        for key in (*caption_fields, "class_tokens", "caption_extension", "flip_aug", "random_crop", "alpha_mask")
    }
    present = {key: v for key, v in present.items() if v is not None}
    return SubsetSpec(
        image_dir=image_dir,
        is_reg=subset.get("is_reg", False),
        num_repeats=repeats or 1,
        caption=CaptionOptions(**{key: present.pop(key) for key in caption_fields if key in present}),
        mask_dir=mask_dir,
        **present,
    )


def _folder(base_dir: Path, text: str, where: str, key: str, fail) -> Path:
    try:
        folder = (base_dir / Path(text).expanduser()) if text else None
        exists = folder is not None and folder.is_dir()
    except (OSError, ValueError, RuntimeError):
        exists = False
    if not exists:
        raise fail(where, key, f"folder {text!r} does not exist (relative paths start at {base_dir})")
    return folder


def _lookup(chain: tuple[dict, ...], keys: dict):
    """The value of ``key`` nearest the subset in ``chain`` (already checked), or None."""

    def value(key):
        for table in chain:
            if key in table:
                return keys[key](table[key])
        return None

    return value


def _check_keys(table: Mapping, where: str, allowed: dict, fail) -> None:
    """Every key known here, of the right type; unsupported kohya keys only at their no-op default."""
    for key, value in table.items():
        if key in allowed:
            if allowed[key] is not None:
                try:
                    allowed[key](value)
                except TypeError as err:
                    raise fail(where, key, f"expected {err}, found {_show(value)} ({type(value).__name__})") from None
        elif key in UNSUPPORTED_KEYS:
            default = UNSUPPORTED_KEYS[key]
            if value != default or isinstance(value, bool) != isinstance(default, bool):
                raise fail(where, key, f"kohya's {key} is not supported by moslora; remove it (found {_show(value)})")
        elif key in SUBSET_ONLY_KEYS:
            raise fail(where, key, "belongs in a [[datasets.subsets]] table")
        elif key in DATASET_KEYS:
            raise fail(where, key, "belongs in [[datasets]] or [general], not in a subset")
        else:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            raise fail(where, str(key), "unknown key" + (f"; did you mean {close[0]!r}?" if close else ""))


def _check_table(data, allowed: set[str], fail) -> None:
    for key in data:
        if key not in allowed:
            raise fail("", str(key), f"unknown top-level key; a dataset config holds {' and '.join(sorted(allowed))}")


def _table(value, name: str, fail) -> dict:
    if not isinstance(value, dict):
        raise fail(name, None, f"expected a table, found {_show(value)}")
    return value


def _show(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _array_of_tables(value, where: str, name: str, fail) -> list[dict]:
    if value is None:
        raise fail(where, None, f"missing: add at least one {name} table")
    if not isinstance(value, list) or not value or not all(isinstance(item, dict) for item in value):
        raise fail(where, None, f"expected one or more {name} tables, found {_show(value)}")
    return value
