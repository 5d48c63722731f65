"""kohya dataset TOML: inheritance, every supported key, and one clear error for everything else."""

from __future__ import annotations

import json
import string
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moslora_diffusion.datasets.buckets import BucketOptions
from moslora_diffusion.datasets.captions import CaptionOptions
from moslora_diffusion.datasets.kohya_config import (
    DATASET_KEYS,
    SUBSET_KEYS,
    SUBSET_ONLY_KEYS,
    UNSUPPORTED_KEYS,
    DatasetConfigError,
    DatasetSpec,
    SubsetSpec,
    load_dataset_config,
    parse_dataset_config,
)

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def _write(tmp_path, text: str) -> Path:
    for folder in ("img", "reg", "masks"):
        (tmp_path / folder).mkdir(exist_ok=True)
    path = tmp_path / "dataset.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_a_kohya_file_with_several_concepts_inherits_subset_over_dataset_over_general(tmp_path):
    path = _write(
        tmp_path,
        """
        [general]
        shuffle_caption = true
        keep_tokens = 1
        caption_extension = ".txt"
        enable_bucket = true
        resolution = 512
        color_aug = false          # kohya's default: accepted, changes nothing

        [[datasets]]
        resolution = [768, 512]
        batch_size = 4
        min_bucket_reso = 320
        max_bucket_reso = 1280
        bucket_reso_steps = 32
        bucket_no_upscale = true
        num_repeats = 3

          [[datasets.subsets]]
          image_dir = "img"
          class_tokens = "sks shape"
          num_repeats = 10
          keep_tokens = 2
          caption_dropout_rate = 0.1
          caption_separator = ";"
          caption_prefix = "pre"
          caption_suffix = "post"
          flip_aug = true
          random_crop = true
          alpha_mask = true
          mask_dir = "masks"

          [[datasets.subsets]]
          image_dir = "reg"
          is_reg = true
          class_tokens = "shape"
          caption_extension = ".caption"
          shuffle_caption = false

        [[datasets]]
          [[datasets.subsets]]
          image_dir = "img"
          caption_dropout_rate = 1
        """,
    )
    first, second = load_dataset_config(path)
    assert first == DatasetSpec(
        subsets=(
            SubsetSpec(
                image_dir=tmp_path / "img", num_repeats=10, class_tokens="sks shape", caption_extension=".txt",
                caption=CaptionOptions(True, 2, ";", 0.1, "pre", "post"), flip_aug=True, random_crop=True,
                alpha_mask=True, mask_dir=tmp_path / "masks",
            ),
            SubsetSpec(
                image_dir=tmp_path / "reg", is_reg=True, num_repeats=3, class_tokens="shape",
                caption_extension=".caption", caption=CaptionOptions(shuffle_caption=False, keep_tokens=1),
            ),
        ),
        resolution=(768, 512),
        batch_size=4,
        buckets=BucketOptions(True, 320, 1280, 32, True),
    )  # fmt: skip
    assert second == DatasetSpec(
        subsets=(
            SubsetSpec(
                tmp_path / "img", caption_extension=".txt", caption=CaptionOptions(True, 1, caption_dropout_rate=1.0)
            ),
        ),
        resolution=(512, 512),
        buckets=BucketOptions(enable_bucket=True),
    )


def test_kohya_defaults_and_fallbacks_fill_what_the_file_leaves_out(tmp_path):
    path = _write(tmp_path, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "img"\n')
    (spec,) = load_dataset_config(
        path, fallbacks={"resolution": 64, "batch_size": 2, "caption_extension": ".txt", "keep_tokens": None}
    )
    assert spec == DatasetSpec((SubsetSpec(tmp_path / "img", caption_extension=".txt"),), (64, 64), 2, BucketOptions())
    assert SubsetSpec(tmp_path).caption_extension == ".caption"  # kohya's default when nothing says otherwise


def test_subset_with_num_repeats_below_one_is_left_out_as_kohya_does(tmp_path, caplog):
    path = _write(
        tmp_path,
        """
        [general]
        resolution = 64
        [[datasets]]
          [[datasets.subsets]]
          image_dir = "img"
          num_repeats = 0
          [[datasets.subsets]]
          image_dir = "reg"
        """,
    )
    (spec,) = load_dataset_config(path)
    assert [s.image_dir.name for s in spec.subsets] == ["reg"] and "num_repeats = 0" in caplog.text


_SUBSET = '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "img"\n'
# (file text, the error's table and key, what it says)
BAD_FILES = [
    ("resolution = 64\n" + _SUBSET, "resolution", "unknown top-level key"),
    ("[general]\nresolution = 64\n", "datasets", "missing: add at least one [[datasets]]"),
    ("datasets = 3\n[general]\nresolution = 64", "datasets", "expected one or more [[datasets]] tables"),
    ("general = 1\n" + _SUBSET, "[general]", "expected a table"),
    ("[general]\nresolution = 64\n[[datasets]]\nbatch_size = 2\n", "datasets[0].subsets", "missing"),
    (_SUBSET, "datasets[0].resolution", "not set"),
    (
        "[general]\nresolution = 64\n[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n",
        "datasets[0].subsets[0].image_dir",
        "missing",
    ),
    (
        '[general]\nresolution = 64\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "nope"\n',
        "datasets[0].subsets[0].image_dir",
        "does not exist",
    ),
    (
        '[general]\nresolution = 64\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = ""\n',
        "datasets[0].subsets[0].image_dir",
        "does not exist",
    ),
    (
        "[general]\nresolution = 64\n" + _SUBSET + 'mask_dir = "nope"\n',
        "datasets[0].subsets[0].mask_dir",
        "does not exist",
    ),
    (
        "[general]\nresolution = 64\n" + _SUBSET + 'num_repeats = "3"\n',
        "datasets[0].subsets[0].num_repeats",
        "expected an integer, found '3' (str)",
    ),
    (
        "[general]\nresolution = 64\n" + _SUBSET + "num_repeats = 2.0\n",
        "datasets[0].subsets[0].num_repeats",
        "expected an integer",
    ),
    (
        "[general]\nresolution = 64\n" + _SUBSET + "flip_aug = 1\n",
        "datasets[0].subsets[0].flip_aug",
        "expected true or false",
    ),
    (
        "[general]\nresolution = 64\n" + _SUBSET + "keep_tokens = -1\n",
        "datasets[0].subsets[0].keep_tokens",
        "an integer >= 0",
    ),
    (
        "[general]\nresolution = 64\n" + _SUBSET + "caption_dropout_rate = 1.5\n",
        "caption_dropout_rate",
        "between 0 and 1",
    ),
    (
        "[general]\nresolution = 64\n" + _SUBSET + "caption_dropout_rate = true\n",
        "caption_dropout_rate",
        "expected a number",
    ),
    ("[general]\nresolution = [64]\n" + _SUBSET, "general.resolution", "a positive integer or [width, height]"),
    ("[general]\nresolution = 0\n" + _SUBSET, "general.resolution", "a positive integer"),
    ("[general]\nbatch_size = 0\nresolution = 8\n" + _SUBSET, "general.batch_size", "an integer >= 1"),
    (
        "[general]\nresolution = 64\nmin_bucket_reso = 512\nmax_bucket_reso = 256\n" + _SUBSET,
        "datasets[0].min_bucket_reso",
        "above max",
    ),
    (
        "[general]\nresolution = 64\n" + _SUBSET + "num_repeat = 2\n",
        "datasets[0].subsets[0].num_repeat",
        "unknown key; did you mean 'num_repeats'",
    ),
    (
        "[general]\nresolution = 64\n" + _SUBSET + "resolution = 32\n",
        "datasets[0].subsets[0].resolution",
        "belongs in [[datasets]] or [general]",
    ),
    (
        '[general]\nresolution = 64\nimage_dir = "img"\n' + _SUBSET,
        "general.image_dir",
        "belongs in a [[datasets.subsets]]",
    ),
    ("[general]\nresolution = 64\nis_reg = true\n" + _SUBSET, "general.is_reg", "belongs in a [[datasets.subsets]]"),
    (
        "[general]\nresolution = 64\ncolor_aug = true\n" + _SUBSET,
        "general.color_aug",
        "kohya's color_aug is not supported",
    ),
    (
        "[general]\nresolution = 64\n" + _SUBSET + "face_crop_aug_range = [2.0, 4.0]\n",
        "face_crop_aug_range",
        "not supported",
    ),
    ("[general]\nresolution = 64\n" + _SUBSET + "token_warmup_step = 10\n", "token_warmup_step", "not supported"),
    ("[general]\nresolution = 64\n" + _SUBSET + 'metadata_file = "m.json"\n', "metadata_file", "not supported"),
    (
        "[general]\nresolution = 64\n" + _SUBSET + "[[datasets.subsets]]\n",
        "datasets[0].subsets[1].image_dir",
        "missing",
    ),
    ("[general\nresolution = 64", "", "not valid TOML"),
]


@pytest.mark.parametrize("text, where, message", BAD_FILES)
def test_bad_dataset_file_is_one_line_naming_file_table_and_key(tmp_path, text, where, message):
    path = _write(tmp_path, text)
    with pytest.raises(DatasetConfigError) as err:
        load_dataset_config(path)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and where in text and message in text and "\n" not in text


@pytest.mark.parametrize("key", sorted(UNSUPPORTED_KEYS))
def test_unsupported_kohya_key_at_its_default_changes_nothing_else_is_refused(tmp_path, key):
    default = UNSUPPORTED_KEYS[key]
    if default is not None:
        literal = str(default).lower() if isinstance(default, bool) else json.dumps(default)  # TOML's form
        path = _write(tmp_path, f"[general]\nresolution = 64\n{key} = {literal}\n" + _SUBSET)
        assert load_dataset_config(path)[0].subsets[0].image_dir == tmp_path / "img"
    path = _write(tmp_path, f'[general]\nresolution = 64\n{key} = "on"\n' + _SUBSET)
    with pytest.raises(DatasetConfigError, match=f"general.{key}: kohya's {key} is not supported"):
        load_dataset_config(path)


def test_missing_or_unreadable_file_is_one_error(tmp_path):
    with pytest.raises(DatasetConfigError, match="no such dataset config file"):
        load_dataset_config(tmp_path / "none.toml")
    (tmp_path / "latin.toml").write_bytes(b"# caf\xe9\n")
    with pytest.raises(DatasetConfigError, match="latin.toml: cannot read"):
        load_dataset_config(tmp_path / "latin.toml")


def test_the_sample_dataset_file_parses_and_its_captions_are_read():
    from moslora_diffusion.datasets.captions import read_captions
    from moslora_diffusion.datasets.images import list_images

    (dataset,) = load_dataset_config(SAMPLES / "dataset_tiny.toml")
    (subset,) = dataset.subsets
    assert subset.image_dir == SAMPLES / "subject" and dataset.resolution == (32, 32)
    images = list_images(subset.image_dir, "datasets[0].subsets[0]")
    captions = read_captions(images, caption_extension=subset.caption_extension, fallback=subset.class_tokens)
    assert len(captions) == 5 and all("sks" in c and "red" in c and "white background" in c for c in captions)


# ------------------------------------------------------------------------------------------------ fuzz

_KNOWN = sorted({*SUBSET_KEYS, *DATASET_KEYS, *SUBSET_ONLY_KEYS, *UNSUPPORTED_KEYS, "subsets", "general", "datasets"})
_scalars = st.one_of(
    st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True), st.text(max_size=8),
    st.sampled_from(["img", "", ".", "..", "/", "\x00", "img/../img"]),
)  # fmt: skip
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_keys = st.one_of(st.sampled_from(_KNOWN), st.text(string.ascii_lowercase + "_", min_size=1, max_size=12))
_DELETE = object()
# A valid file, then a few edits anywhere in it (set any key to any value, or delete it): reaches every check.
_edits = st.lists(
    st.tuples(st.sampled_from(["top", "general", "dataset", "subset"]), _keys, st.one_of(_values, st.just(_DELETE))),
    min_size=1,
    max_size=4,
)


def _edited(edits) -> dict:
    config = {"general": {"resolution": 64}, "datasets": [{"batch_size": 2, "subsets": [{"image_dir": "img"}]}]}
    for level, key, value in edits:
        try:
            table = {
                "top": lambda: config,
                "general": lambda: config["general"],
                "dataset": lambda: config["datasets"][0],
                "subset": lambda: config["datasets"][0]["subsets"][0],
            }[level]()
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit replaced the path to this table
        if not isinstance(table, dict):
            continue
        if value is _DELETE:
            table.pop(key, None)
        else:
            table[key] = value
    return config


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(edits=_edits)
def test_fuzz_any_config_parses_or_raises_only_dataset_config_error(tmp_path_factory, edits):
    config = _edited(edits)
    base_dir = tmp_path_factory.getbasetemp() / "fuzz"
    (base_dir / "img").mkdir(parents=True, exist_ok=True)
    try:
        specs = parse_dataset_config(config, source="fuzz.toml", base_dir=base_dir)
    except DatasetConfigError as err:
        assert str(err).startswith("fuzz.toml: ") and "\n" not in str(err)
    else:
        assert specs and all(isinstance(spec, DatasetSpec) and spec.subsets for spec in specs)
