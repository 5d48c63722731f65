"""Bake adapters into a base model: in place in a loaded pipeline, or streamed into a new checkpoint.

    W = W0 + sum_i w_i * s_i * B_i M_i A_i        (fp32 maths, then cast to the output dtype)

Adapters are read the way the tools people use read them: each one is loaded into a *hollow* copy of the
pipeline (every base weight a zero-stride view with no storage) through :func:`load_moslora_weights` for
our native, folded and kohya files, and through diffusers' own ``load_lora_weights`` for any other LoRA
file diffusers reads. diffusers' key conversion, ranks and alphas therefore decide every layer's delta,
and the deltas are read back from the PEFT layers (``get_delta_weight``), one base tensor at a time.

:func:`merge_checkpoint` then streams the base checkpoint tensor by tensor (plain file reads, no mmap):
each tensor is read, gets its delta, is cast and written before the next is read, so memory holds the
adapters and a few tensors, never the model. The output is a diffusers folder (``save_pretrained``
layout) or a single file in the family's original layout (:mod:`moslora_diffusion.single_file`), and it
appears complete or not at all. :func:`merge_adapters` fuses into a loaded pipeline's own weights.

The package, by job: specs.py (``PATH[:WEIGHT]``), hollow.py (the hollow pipeline), deltas.py (loading
adapters, their per-tensor deltas), in_place.py (:func:`merge_adapters`), base_weights.py (the base read
tensor by tensor), plan.py (:func:`merge_checkpoint`: every check before any write), writers.py (the
folder and single-file outputs, the README record), command.py (``moslora merge``).
"""

from .command import run_merge
from .in_place import merge_adapters
from .plan import DTYPES, MergeResult, merge_checkpoint
from .specs import AdapterSpec, parse_adapter_spec

__all__ = [
    "DTYPES",
    "AdapterSpec",
    "MergeResult",
    "merge_adapters",
    "merge_checkpoint",
    "parse_adapter_spec",
    "run_merge",
]
