"""Latent and text-embedding caches: a second run encodes nothing; anything changed or corrupt is recomputed."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from PIL import Image

from moslora_diffusion.datasets.buckets import BucketChoice, place
from moslora_diffusion.datasets.cache import (
    TensorCache,
    caption_cache_key,
    latent_cache_key,
    weights_fingerprint,
)
from moslora_diffusion.fileio import load_safetensors


class FakeEncoder:
    """Counts its calls; its output depends on the input, so a wrong cache hit would show."""

    def __init__(self):
        self.calls = 0

    def __call__(self, text: str) -> dict[str, torch.Tensor]:
        self.calls += 1
        return {"embedding": torch.full((2, 3), float(len(text))), "pooled": torch.arange(3.0) + len(text)}


def _placement(flip=False, size=(8, 8)):
    return place(size, BucketChoice(size, size), random_crop=False, flip=flip, rng=random.Random(0))


def _run(folder, captions, encoder, fingerprint="te-1"):
    cache = TensorCache(folder, "text-encoder")
    outputs = [cache.get_or_compute(caption_cache_key(c, fingerprint), lambda c=c: encoder(c)) for c in captions]
    return cache, outputs


@pytest.mark.parametrize("on_disk", [True, False], ids=["disk", "memory"])
def test_second_run_encodes_nothing_and_returns_the_same_tensors(tmp_path, on_disk):
    encoder = FakeEncoder()
    captions = ["a photo of sks shape", "a red sks shape", "a photo of sks shape"]
    folder = tmp_path / "te" if on_disk else None
    cache, first = _run(folder, captions, encoder)
    assert encoder.calls == 2 and (cache.hits, cache.computed) == (1, 2)  # per unique caption
    if on_disk:
        cache, second = _run(folder, captions, encoder)  # a later run: a fresh cache object, same folder
        assert encoder.calls == 2 and cache.hits == 3
        for a, b in zip(first, second):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_or_foreign_entry_is_recomputed_with_a_warning(tmp_path, caplog):
    encoder = FakeEncoder()
    cache, _ = _run(tmp_path, ["x"], encoder)
    path = cache.path(caption_cache_key("x", "te-1"))
    path.write_bytes(path.read_bytes()[:20])  # truncated, as by a crash of another tool
    with caplog.at_level(logging.WARNING):
        _, (out,) = _run(tmp_path, ["x"], encoder)
    assert encoder.calls == 2 and "unreadable" in caplog.text and str(path) in caplog.text
    assert torch.equal(out["embedding"], torch.full((2, 3), 1.0))
    assert load_safetensors(path)[1]["key"] == path.stem  # rewritten whole
    other = cache.path(caption_cache_key("y", "te-1"))
    other.write_bytes(path.read_bytes())  # an entry under the wrong name
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, (out,) = _run(tmp_path, ["y"], encoder)
    assert encoder.calls == 3 and "written for another input" in caplog.text


def test_text_key_changes_with_caption_and_encoders():
    keys = {caption_cache_key(c, f) for c in ("a", "a ", "b") for f in ("te-1", "te-2")}
    assert len(keys) == 6


def test_latent_key_changes_with_image_bytes_vae_and_transform(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "same.png")
    key = latent_cache_key(tmp_path / "a.png", "vae-1", _placement())
    assert latent_cache_key(tmp_path / "same.png", "vae-1", _placement()) == key  # same bytes: same entry
    others = [
        latent_cache_key(tmp_path / "a.png", "vae-2", _placement()),
        latent_cache_key(tmp_path / "a.png", "vae-1", _placement(flip=True)),
        latent_cache_key(tmp_path / "a.png", "vae-1", _placement(size=(8, 16))),
        latent_cache_key(tmp_path / "a.png", "vae-1", _placement(), extra="bf16"),
    ]
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "a.png")  # the image edited in place
    others.append(latent_cache_key(tmp_path / "a.png", "vae-1", _placement()))
    assert len({key, *others}) == 6


def test_latent_cache_second_run_calls_the_vae_never(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    vae = torch.nn.Conv2d(3, 4, 1)
    fingerprint = weights_fingerprint(vae)
    calls = []

    def encode():
        calls.append(1)
        return {"latent_parameters": torch.randn(8, 1, 1)}

    placements = [_placement(), _placement(flip=True)]
    for _ in range(2):
        cache = TensorCache(tmp_path / "latents", "latent")
        for placement in placements:
            cache.get_or_compute(latent_cache_key(tmp_path / "a.png", fingerprint, placement), encode)
    assert len(calls) == 2 and cache.hits == 2  # one entry per flip, reused by the second run
    with torch.no_grad():
        vae.weight[0, 0] += 1
    assert weights_fingerprint(vae) != fingerprint


def test_unwritable_cache_folder_warns_and_training_goes_on(tmp_path, caplog):
    (tmp_path / "file").write_text("x")
    cache = TensorCache(tmp_path / "file" / "cache", "latent")  # its parent is a file: cannot be created
    with caplog.at_level(logging.WARNING):
        out = cache.get_or_compute("k", lambda: {"t": torch.ones(1)})
    assert torch.equal(out["t"], torch.ones(1)) and "training goes on without it" in caplog.text
