"""The public name of the tiny offline pipelines (:mod:`moslora_diffusion.tiny`), for tests, docs and smoke runs.

>>> from moslora_diffusion.testing import make_tiny_pipeline
>>> pipe = make_tiny_pipeline("sdxl")
"""

from .tiny import (  # noqa: F401
    FAMILIES,
    __all__,
    default_tiny_resolution,
    make_clip_tokenizer,
    make_t5_tokenizer,
    make_test_images,
    make_tiny_pipeline,
    save_tiny_pipeline,
    tiny_pipeline_kwargs,
)
