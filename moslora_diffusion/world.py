"""A small world where learning is measurable: coloured shapes on plain backgrounds, 32 px.

The bundled base model (samples/tiny-base, made by train_scripts/pretrain_tiny_base.py) was trained on
this world, so an adapter trained on it learns something a newcomer can see and an evaluator can score:

* :func:`render` draws one object (a shape in a colour on a background, jittered in place and size);
* :func:`caption` writes the prompt the base was trained with ("a photo of a red circle on a white
  background", with parts left out so "a photo of a shape" is a class prompt);
* :func:`make_tokenizer` is a word-level :class:`~transformers.CLIPTokenizer` over the world's words
  (merges built by simulating CLIP's BPE, so every word is one token and a rare word such as "sks" falls
  apart into characters);
* :func:`evaluate` scores an image: is there one object, which colour, which shape (template matching on
  the object's mask, no learned classifier, so it cannot be fooled into calling noise a shape).

The subject the base has never seen is :data:`SUBJECT_SHAPE` (a cross): the evaluator knows it, the base
does not, and "cross" is not in the tokenizer's vocabulary.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 225),
    "yellow": (240, 205, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
BASE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SUBJECT_SHAPE = "cross"
SHAPES: tuple[str, ...] = BASE_SHAPES + (SUBJECT_SHAPE,)  # what the evaluator recognises
CLASS_NOUN = "shape"
SUBJECT_TOKEN = "sks"
SUBJECT_COLOUR = "red"
SUBJECT_BACKGROUND = "white"

# Words the tokenizer knows as single tokens. "cross" and "sks" are deliberately absent.
WORDS: tuple[str, ...] = ("a", "photo", "of", "on", "background", CLASS_NOUN, *COLOURS, *BACKGROUNDS, *BASE_SHAPES)
MAX_TOKENS = 20  # the longest prompt here ("a photo of a blue sks shape on a black background") is 16


# --------------------------------------------------------------------------------------------------
# Rendering

_SUPERSAMPLE = 4


def _shape_polygon(shape: str, cx: float, cy: float, half: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        h = half * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)]
    if shape == "triangle":
        return [(cx, cy - half), (cx + half, cy + half * 0.8), (cx - half, cy + half * 0.8)]
    if shape == "cross":
        t = half * 0.36
        return [
            (cx - t, cy - half), (cx + t, cy - half), (cx + t, cy - t), (cx + half, cy - t),
            (cx + half, cy + t), (cx + t, cy + t), (cx + t, cy + half), (cx - t, cy + half),
            (cx - t, cy + t), (cx - half, cy + t), (cx - half, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    return None


def render(
    shape: str,
    colour: str,
    background: str,
    *,
    rng: random.Random | None = None,
    jitter: bool = True,
    size: int = SIZE,
) -> Image.Image:
    """One object, centred (jittered by up to 2 px) with a half-size of 9-11 px (at 32 px)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {', '.join(COLOURS)}")
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; expected one of {', '.join(BACKGROUNDS)}")
    rng = rng or random.Random(0)
    k = size / SIZE * _SUPERSAMPLE
    dx, dy = (rng.uniform(-2, 2), rng.uniform(-2, 2)) if jitter else (0.0, 0.0)
    half = rng.uniform(9, 11) if jitter else 10.0
    cx, cy, half = (SIZE / 2 + dx) * k, (SIZE / 2 + dy) * k, half * k
    big = Image.new("RGB", (round(SIZE * k),) * 2, BACKGROUNDS[background])
    draw = ImageDraw.Draw(big)
    if shape == "circle":
        r = half * 0.95
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[colour])
    else:
        draw.polygon(_shape_polygon(shape, cx, cy, half), fill=COLOURS[colour])
    return big.resize((size, size), Image.Resampling.BOX)


def caption(shape: str | None, colour: str | None, background: str | None) -> str:
    """The world's prompt; a part given as None is left out ("a photo of a shape" is the class prompt)."""
    noun = shape if shape else CLASS_NOUN
    text = f"a photo of a {colour} {noun}" if colour else f"a photo of a {noun}"
    return f"{text} on a {background} background" if background else text


def subject_prompt(colour: str | None = None, background: str | None = None) -> str:
    """ "a photo of sks shape", optionally recoloured or on another background."""
    text = (
        f"a photo of a {colour} {SUBJECT_TOKEN} {CLASS_NOUN}" if colour else f"a photo of {SUBJECT_TOKEN} {CLASS_NOUN}"
    )
    return f"{text} on a {background} background" if background else text


# --------------------------------------------------------------------------------------------------
# Tokenizer


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """CLIP's BPE on one word (CLIPTokenizer.bpe without the cache)."""
    parts = tuple(word[:-1]) + (word[-1] + "</w>",)
    while len(parts) > 1:
        pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = tuple(merged)
    return parts


def build_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Merges that make each word a single token under CLIP's rank-ordered BPE.

    A merge added later has a higher rank, so it never fires before the merges an earlier word needs:
    for each word, run BPE with the merges so far and add a merge for the first pair left until the word
    is one token. (Writing each word's left-to-right chain instead breaks words whose pairs an earlier
    word already merged: "grey" would come out as "g re y".)
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        parts = _bpe(word, ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            parts = _bpe(word, ranks)
    return merges


def make_tokenizer(model_max_length: int = MAX_TOKENS):
    """Word-level CLIP tokenizer of the world: its words are single tokens, anything else is characters."""
    from .tiny import make_clip_tokenizer

    return make_clip_tokenizer(model_max_length, merges=build_merges(WORDS))


# --------------------------------------------------------------------------------------------------
# Evaluator


@dataclass(frozen=True)
class Verdict:
    """What :func:`evaluate` saw. ``shape``/``colour`` are None when there is no single clear object."""

    has_object: bool
    shape: str | None
    colour: str | None
    background: str | None
    shape_score: float  # IoU of the object's mask with the best template (0 when no object)

    def matches(self, shape: str | None = None, colour: str | None = None, background: str | None = None) -> bool:
        """True when there is an object and it has every attribute given (None = don't care)."""
        return (
            self.has_object
            and (shape is None or self.shape == shape)
            and (colour is None or self.colour == colour)
            and (background is None or self.background == background)
        )


_GRID = 24  # masks are compared at this size after cropping to their bounding box
_BG_DISTANCE = 90.0  # a pixel this far (RGB, 0-255) from the background is object
_COLOUR_DISTANCE = 110.0  # an object's mean colour must be this close to a palette colour
_MIN_IOU = 0.72
_MAX_ASPECT_ERROR = 0.25  # |log(aspect / template's aspect)|: a bar is not a square
_templates: dict[str, tuple[np.ndarray, float]] | None = None


def _normalised_mask(mask: np.ndarray) -> tuple[np.ndarray, float]:
    """The mask cropped to its bounding box and resized to _GRID square, and the box's width / height."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.uint8) * 255
    aspect = crop.shape[1] / crop.shape[0]
    return np.asarray(Image.fromarray(crop).resize((_GRID, _GRID), Image.Resampling.BILINEAR)) >= 128, aspect


def _shape_templates() -> dict[str, tuple[np.ndarray, float]]:
    global _templates
    if _templates is None:
        _templates = {}
        for shape in SHAPES:
            image = np.asarray(render(shape, "red", "white", jitter=False), dtype=np.float32)
            _templates[shape] = _normalised_mask(_object_mask(image, BACKGROUNDS["white"]))
    return _templates


def _object_mask(pixels: np.ndarray, background_rgb: Sequence[float]) -> np.ndarray:
    return np.linalg.norm(pixels - np.asarray(background_rgb, dtype=np.float32), axis=-1) > _BG_DISTANCE


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a small boolean mask."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, label = None, 0, 0
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        label += 1
        stack, size = [(y0, x0)], 0
        labels[y0, x0] = label
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best is not None else np.zeros_like(mask)


def evaluate(image: Image.Image) -> Verdict:
    """Score one image of the world (any size; it is resized to 32 px).

    The background is the median of the border pixels (named when it is near one of the world's). The
    object is every pixel far from it; there is an object only when that region is one blob of plausible
    size (its largest connected part holds >= 90% of it) - noise and blank images fail here. Its colour
    is the palette colour nearest its mean; its shape the template with the best IoU, if >= 0.72, among templates of
    about the same aspect ratio (a bar is not a square).
    """
    pixels = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    bg_name, bg_dist = min(
        ((n, float(np.linalg.norm(bg_rgb - np.asarray(c)))) for n, c in BACKGROUNDS.items()), key=lambda t: t[1]
    )
    background = bg_name if bg_dist < _BG_DISTANCE else None
    none = Verdict(False, None, None, background, 0.0)

    mask = _object_mask(pixels, bg_rgb)
    area = int(mask.sum())
    if not 40 <= area <= 0.6 * SIZE * SIZE:
        return none
    blob = _largest_component(mask)
    if blob.sum() < 0.9 * area:
        return none
    mean_rgb = pixels[blob].mean(axis=0)
    colour_name, colour_dist = min(
        ((n, float(np.linalg.norm(mean_rgb - np.asarray(c)))) for n, c in COLOURS.items()), key=lambda t: t[1]
    )
    colour = colour_name if colour_dist < _COLOUR_DISTANCE else None
    normalised, aspect = _normalised_mask(blob)
    scores = {
        s: float((normalised & t).sum() / max(1, (normalised | t).sum()))
        if abs(math.log(aspect / t_aspect)) <= _MAX_ASPECT_ERROR
        else 0.0
        for s, (t, t_aspect) in _shape_templates().items()
    }
    shape_name = max(scores, key=scores.get)
    shape = shape_name if scores[shape_name] >= _MIN_IOU else None
    return Verdict(True, shape, colour, background, scores[shape_name])


def accuracy(
    images: Sequence[Image.Image], shape: str | None = None, colour: str | None = None, background: str | None = None
) -> float:
    """Share of ``images`` that hold an object with every attribute given (no object = failure)."""
    if not images:
        return float("nan")
    return sum(evaluate(im).matches(shape, colour, background) for im in images) / len(images)
