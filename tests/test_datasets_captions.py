"""Captions: where they come from, what happens when they are bad, and kohya's shuffle / dropout."""

from __future__ import annotations

import logging
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from moslora_diffusion.datasets.captions import (
    CaptionError,
    CaptionOptions,
    caption_rng,
    process_caption,
    read_captions,
)


def _images(folder, *names):
    folder.mkdir(exist_ok=True)
    for name in names:
        Image.new("RGB", (4, 4)).save(folder / name)
    return [folder / name for name in names]


# (files beside a.png and b.png, keyword arguments, expected captions)
SOURCES = [
    ({"a.txt": "a red cross\n"}, {}, ["a red cross", ""]),
    ({"a.txt": "\n  first line  \nsecond"}, {}, ["first line", ""]),
    ({"a.caption": "kohya"}, {"caption_extension": ".caption"}, ["kohya", ""]),
    ({"a.txt": "x"}, {"fallback": "a photo of sks shape"}, ["x", "a photo of sks shape"]),
    ({"metadata.jsonl": '{"file_name": "b.png", "text": "from jsonl"}\n\n'}, {}, ["", "from jsonl"]),
    ({"metadata.jsonl": '{"file_name": "b.png", "prompt": "p"}'}, {"caption_column": "prompt"}, ["", "p"]),
    ({"metadata.csv": 'file_name,text\nb.png,"from, csv"\n'}, {}, ["", "from, csv"]),
    ({"a.txt": "sidecar", "metadata.jsonl": '{"file_name": "a.png", "text": "meta"}'}, {}, ["sidecar", ""]),
    ({"a.txt": "", "b.txt": "  \n"}, {"fallback": "fb"}, ["fb", "fb"]),
    ({"a.txt": b"caf\xe9 latin-1", "b.txt": "ok"}, {"fallback": "fb"}, ["fb", "ok"]),
    ({"metadata.jsonl": '{"file_name": "a.png", "text": ""}'}, {"fallback": "fb"}, ["fb", "fb"]),
]


@pytest.mark.parametrize("files, kwargs, expected", SOURCES)
def test_caption_sources_in_order_sidecar_metadata_fallback(tmp_path, files, kwargs, expected):
    images = _images(tmp_path, "a.png", "b.png")
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    assert read_captions(images, **kwargs) == expected


@pytest.mark.parametrize(
    "content, name",
    [(b"caf\xe9", "a.txt"), (b"   ", "a.txt")],
    ids=["not-utf8", "empty"],
)
def test_bad_caption_file_warns_naming_it(tmp_path, caplog, content, name):
    images = _images(tmp_path, "a.png")
    (tmp_path / name).write_bytes(content)
    with caplog.at_level(logging.WARNING):
        assert read_captions(images, fallback="fb") == ["fb"]
    assert str(tmp_path / name) in caplog.text


def test_some_captions_missing_is_one_warning_naming_the_images(tmp_path, caplog):
    images = _images(tmp_path, "a.png", "b.png", "c.png")
    (tmp_path / "a.txt").write_text("x")
    with caplog.at_level(logging.WARNING):
        read_captions(images, fallback="fb", source="datasets[0].subsets[0]")
    assert len(caplog.records) == 1 and "2 of 3" in caplog.text and "b.png, c.png" in caplog.text


@pytest.mark.parametrize(
    "files, message",
    [
        ({"metadata.jsonl": "{not json"}, r"metadata.jsonl:1: not a JSON object"),
        ({"metadata.jsonl": '{"text": "x"}'}, r"metadata.jsonl:1: expected a 'file_name'"),
        ({"metadata.jsonl": '{"file_name": "a.png", "text": "x"}\n["x"]'}, r"metadata.jsonl:2: expected a JSON object"),
        ({"metadata.jsonl": '{"file_name": "a.png", "text": 3}'}, r"metadata.jsonl:1: expected a text column 'text'"),
        ({"metadata.csv": "file_name,prompt\na.png,x\n"}, r"metadata.csv: expected columns 'file_name' and 'text'"),
        ({"metadata.csv": b"file_name,text\na.png,caf\xe9\n"}, r"metadata.csv: not UTF-8"),
        ({"metadata.csv": "file_name,text\n", "metadata.jsonl": ""}, "both metadata.jsonl and metadata.csv"),
    ],
    ids=["bad-json", "no-file-name", "not-an-object", "caption-not-text", "csv-column-missing", "csv-not-utf8", "both"],
)
def test_bad_metadata_is_one_caption_error_naming_file_and_line(tmp_path, files, message):
    images = _images(tmp_path, "a.png")
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CaptionError, match=message):
        read_captions(images)


class _Draws(random.Random):
    """A generator whose first random() is fixed (dropout's draw), shuffling by a fixed rotation."""

    def __init__(self, first: float):
        super().__init__(0)
        self.first = first

    def random(self):
        return self.first

    def shuffle(self, items):
        items[:] = items[1:] + items[:1]


# (caption, options, dropout draw, expected): shuffle by rotation makes the expected text exact.
OPERATIONS = [
    ("a, b, c", CaptionOptions(), 0.0, "a, b, c"),
    ("sks,b , c,d", CaptionOptions(shuffle_caption=True), 0.9, "b, c, d, sks"),
    ("sks, red, b, c", CaptionOptions(shuffle_caption=True, keep_tokens=2), 0.9, "sks, red, c, b"),
    ("sks, b", CaptionOptions(shuffle_caption=True, keep_tokens=5), 0.9, "sks, b"),
    ("sks; b; c", CaptionOptions(shuffle_caption=True, keep_tokens=1, caption_separator=";"), 0.9, "sks, c, b"),
    ("b, c", CaptionOptions(shuffle_caption=True, keep_tokens=1, caption_prefix="sks,"), 0.9, "sks, c, b"),
    ("a photo", CaptionOptions(caption_suffix="of sks"), 0.9, "a photo of sks"),
    ("a, b", CaptionOptions(caption_dropout_rate=0.5, shuffle_caption=True), 0.49, ""),
    ("a, b", CaptionOptions(caption_dropout_rate=0.5), 0.5, "a, b"),
]


@pytest.mark.parametrize("caption, options, draw, expected", OPERATIONS)
def test_process_caption_follows_kohya(caption, options, draw, expected):
    assert process_caption(caption, options, _Draws(draw)) == expected


def test_caption_randomness_is_keyed_by_seed_epoch_index():
    options = CaptionOptions(shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.2)
    caption = "sks, " + ", ".join(f"t{i}" for i in range(12))

    def run(seed, epoch, index):
        return process_caption(caption, options, caption_rng(seed, epoch, index))

    assert run(0, 3, 7) == run(0, 3, 7)  # a resumed run sees the same caption
    outcomes = {run(0, epoch, index) for epoch in range(4) for index in range(10)}
    assert len(outcomes) > 20 and "" in outcomes  # varied, and some dropped (about 1 in 5)
    assert all(text.startswith("sks, ") for text in outcomes if text)
    dropped = sum(run(1, 0, index) == "" for index in range(2000)) / 2000
    assert 0.17 < dropped < 0.23


# ------------------------------------------------------------------------------------------------ fuzz

_files = st.dictionaries(
    st.sampled_from(["a.txt", "b.txt", "metadata.jsonl", "metadata.csv"]),
    st.one_of(
        st.binary(max_size=40),
        st.text(max_size=40).map(str.encode),
        st.sampled_from([b'{"file_name": "a.png", "text": "x"}', b'{"file_name": 1}', b"file_name,text\na.png,\"x",
                         b"file_name,text\na.png,y,z\n", b'{"file_name": "b.png", "text": null}', b"\xff\xfe"]),
    ),
    max_size=3,
)  # fmt: skip


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(files=_files, fallback=st.one_of(st.none(), st.text(max_size=5)))
def test_fuzz_caption_files_give_captions_or_one_caption_error(tmp_path_factory, files, fallback):
    folder = tmp_path_factory.mktemp("captions")
    images = _images(folder, "a.png", "b.png")
    for name, content in files.items():
        (folder / name).write_bytes(content)
    try:
        captions = read_captions(images, fallback=fallback)
    except CaptionError as err:
        assert "metadata" in str(err) and "\n" not in str(err)
    else:
        assert len(captions) == 2 and all(isinstance(c, str) and "\n" not in c for c in captions)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(caption=st.text(max_size=30), keep=st.integers(0, 5), rate=st.floats(0, 1), seed=st.integers(0, 2**32))
def test_fuzz_process_caption_keeps_its_first_tokens_and_shuffles_the_rest(caption, keep, rate, seed):
    options = CaptionOptions(shuffle_caption=True, keep_tokens=keep, caption_dropout_rate=rate)
    out = process_caption(caption, options, random.Random(seed))
    tokens = [t.strip() for t in caption.strip().split(",")]
    if out or rate == 0:
        assert out.split(", ")[:keep] == tokens[:keep]
        assert sorted(out.split(", ")) == sorted(tokens)
