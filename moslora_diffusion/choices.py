"""Names the command line offers as choices, in a module that imports nothing heavy.

``moslora --help``, ``moslora train --help`` and bad flags are answered before torch, diffusers or PEFT
load; the modules that act on these names import them from here.
"""

MIXER_INITS = ("kaiming", "orthogonal", "identity", "kaiming_folded")

WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor", "adamw_schedulefree")
QUANTIZATIONS = ("int8", "fp8", "nf4")  # --quantize_base
QUANTIZATION_BACKENDS = ("auto", "torchao", "quanto", "bitsandbytes")  # --quantization_backend
