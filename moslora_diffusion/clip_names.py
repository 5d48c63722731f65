"""CLIP's ``text_model.`` root: checkpoint files keep it, transformers 5 flattens it away in memory.

Every LoRA tool and single-file checkpoint names CLIP's modules ``text_model.encoder.layers...`` (and the
projection of CLIPTextModelWithProjection ``text_projection``, outside the root). transformers >= 5.6
builds and saves CLIPTextModel without the ``text_model`` level. These helpers turn one name into the other.
"""

from __future__ import annotations

CLIP_ROOT = "text_model."
# Names of the checkpoint layout that stand outside the root already.
_OUTSIDE_ROOT = (CLIP_ROOT, "text_projection.")


def with_clip_root(name: str) -> str:
    """``name`` as checkpoints write it: under ``text_model.`` unless it is already (or is the projection)."""
    return name if name.startswith(_OUTSIDE_ROOT) or name == "text_projection" else CLIP_ROOT + name


def without_clip_root(name: str) -> str:
    """``name`` as a flattened (transformers 5) CLIP model names it."""
    return name.removeprefix(CLIP_ROOT)


def other_clip_name(name: str) -> str:
    """The same tensor under the other convention (with the root if ``name`` lacks it, else without)."""
    return without_clip_root(name) if name.startswith(CLIP_ROOT) else with_clip_root(name)
