"""The small world (moslora_diffusion.world): rendering, tokenizer, evaluator, and the bundled base."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moslora_diffusion import world

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "samples" / "tiny-base"


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_words_are_single_tokens_and_sks_is_characters():
    tok = world.make_tokenizer()
    for word in world.WORDS:
        ids = tok(word, add_special_tokens=False).input_ids
        assert tok.convert_ids_to_tokens(ids) == [word + "</w>"], word
    assert tok.convert_ids_to_tokens(tok("sks", add_special_tokens=False).input_ids) == ["s", "k", "s</w>"]
    assert len(tok("cross", add_special_tokens=False).input_ids) > 1  # the subject's shape is not a word of the base
    longest = world.subject_prompt(colour="yellow", background="black")
    assert len(tok(longest).input_ids) <= world.MAX_TOKENS


def test_build_merges_survive_overlapping_words():
    # "re" is merged for "red" first; a naive left-to-right chain for "grey" would then leave "g re y".
    merges = world.build_merges(["red", "grey", "green"])
    ranks = {pair: i for i, pair in enumerate(merges)}
    for word in ("red", "grey", "green"):
        assert world._bpe(word, ranks) == (word + "</w>",)


@pytest.mark.skipif(not BASE.is_dir(), reason="samples/tiny-base not built")
def test_bundled_base_tokenizer_is_the_worlds():
    from transformers import CLIPTokenizer

    assert CLIPTokenizer.from_pretrained(BASE / "tokenizer").get_vocab() == world.make_tokenizer().get_vocab()


def test_tokenizer_round_trips_through_save_pretrained(tmp_path):
    from transformers import CLIPTokenizer

    tok = world.make_tokenizer()
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    prompt = world.subject_prompt(colour="blue", background="black")
    assert again(prompt).input_ids == tok(prompt).input_ids
    assert again.model_max_length == world.MAX_TOKENS


# ---------------------------------------------------------------- evaluator


def test_evaluator_reads_every_rendered_object():
    rng = random.Random(7)
    for _ in range(300):
        shape, colour, bg = (
            rng.choice(world.SHAPES),
            rng.choice(list(world.COLOURS)),
            rng.choice(list(world.BACKGROUNDS)),
        )
        verdict = world.evaluate(world.render(shape, colour, bg, rng=rng))
        assert verdict.matches(shape, colour, bg), (shape, colour, bg, verdict)


def test_evaluator_reads_larger_images():
    image = world.render("triangle", "blue", "black", rng=random.Random(0), size=128)
    assert world.evaluate(image).matches("triangle", "blue", "black")


def test_evaluator_rejects_images_without_one_object():
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(20)]
    blurred_noise = [im.resize((8, 8)).resize((32, 32), Image.Resampling.BILINEAR) for im in noise]
    blank = [Image.new("RGB", (32, 32), rgb) for rgb in world.BACKGROUNDS.values()]
    two = world.render("circle", "red", "white", jitter=False)
    pixels = np.asarray(two).copy()
    pixels[:, 16:] = 240  # keep the left half of the circle...
    pixels[2:8, 24:30] = world.COLOURS["green"]  # ...and add a second, separate blob
    for image in noise + blurred_noise + blank + [Image.fromarray(pixels)]:
        verdict = world.evaluate(image)
        assert not verdict.matches(), verdict
    assert world.accuracy(noise, colour="red") == 0.0


def test_evaluator_rejects_a_shape_it_does_not_know():
    canvas = Image.new("RGB", (128, 128), world.BACKGROUNDS["white"])
    from PIL import ImageDraw

    ImageDraw.Draw(canvas).rectangle((20, 54, 108, 74), fill=world.COLOURS["red"])  # a bar: no shape of the world
    verdict = world.evaluate(canvas.resize((32, 32), Image.Resampling.BOX))
    assert verdict.has_object and verdict.colour == "red" and verdict.shape is None


def test_render_refuses_unknown_attributes():
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        world.render("hexagon", "red", "white")
    with pytest.raises(ValueError, match="unknown colour"):
        world.render("circle", "purple", "white")


def test_sample_subject_is_a_red_cross_on_white():
    images = sorted((REPO / "samples" / "subject").glob("*.png"))
    assert len(images) == 5
    for path in images:
        assert world.evaluate(Image.open(path)).matches(
            world.SUBJECT_SHAPE, world.SUBJECT_COLOUR, world.SUBJECT_BACKGROUND
        ), path


def test_captions():
    assert world.caption("circle", "red", "white") == "a photo of a red circle on a white background"
    assert world.caption(None, None, None) == "a photo of a shape"
    assert world.subject_prompt() == "a photo of sks shape"
    assert (
        world.subject_prompt(colour="blue", background="black") == "a photo of a blue sks shape on a black background"
    )


# ---------------------------------------------------------------- the bundled base


@pytest.mark.skipif(not BASE.is_dir(), reason="samples/tiny-base not built")
def test_bundled_base_loads_in_stock_diffusers_and_draws_the_class_prompts():
    """The shipped base is a plain StableDiffusionPipeline and still draws what it is asked to."""
    from diffusers import StableDiffusionPipeline

    size = sum(f.stat().st_size for f in BASE.rglob("*") if f.is_file())
    assert size <= 20e6
    pipe = StableDiffusionPipeline.from_pretrained(BASE)
    pipe.set_progress_bar_config(disable=True)
    cases = [(s, c) for s in world.BASE_SHAPES for c in world.COLOURS]
    images = pipe([world.caption(s, c, None) for s, c in cases], num_inference_steps=20, guidance_scale=4.0,
                  generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    verdicts = [world.evaluate(im) for im in images]
    colour = sum(v.matches(colour=c) for v, (_, c) in zip(verdicts, cases)) / len(cases)
    shape = sum(v.matches(shape=s) for v, (s, _) in zip(verdicts, cases)) / len(cases)
    assert colour >= 0.8 and shape >= 0.7, (colour, shape)
