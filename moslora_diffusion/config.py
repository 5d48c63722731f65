"""MoSLoRAConfig: a PEFT ``LoraConfig`` with the mixer's own settings.

    delta W = s * B M A        A: r x in, M: r x r (the mixer), B: out x r
    s = lora_alpha / r         (lora_alpha / sqrt(r) with use_rslora)

Being a ``LoraConfig`` subclass, it goes wherever diffusers and PEFT take a LoRA config
(``unet.add_adapter(MoSLoRAConfig(...))``); the MoSLoRA layer classes are registered on it so that
PEFT's injection builds them instead of plain ``lora.Linear``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft import LoraConfig

from .choices import MIXER_INITS
from .targets import DEFAULT_PRESET, PRESET_NAMES, preset_union

__all__ = ["MIXER_INITS", "MOSLORA_ONLY_FIELDS", "MoSLoRAConfig"]

# Settings that exist only in MoSLoRA; stock loaders reject them in ``lora_adapter_metadata``.
MOSLORA_ONLY_FIELDS = ("use_moslora", "mixer_init", "train_mixer")


@dataclass
class MoSLoRAConfig(LoraConfig):
    """LoRA configuration with a learnable r x r mixer between A and B (Wu et al., EMNLP 2024).

    ``target_modules=None`` (or a preset name: ``"attention"`` / ``"attention+ff"``) is resolved
    per model by :func:`moslora_diffusion.add_moslora` from :mod:`moslora_diffusion.targets`.
    ``mixer_init="identity"`` with ``train_mixer=False`` is exactly plain LoRA.
    """

    use_moslora: bool = field(
        default=True,
        # Tagged as a LoRA variant so that a stock ``lora.Linear`` refuses this config loudly instead of
        # silently building a plain LoRA layer without the mixer.
        metadata={"help": "Insert the r x r mixer M (always True for this config).", "is_lora_variant": True},
    )
    mixer_init: Literal["kaiming", "orthogonal", "identity", "kaiming_folded"] = field(
        default="kaiming",
        metadata={
            "help": (
                "Initialisation of the mixer M: 'kaiming' (uniform, a=sqrt(5); the paper's default), "
                "'orthogonal' (the paper's runner-up), 'identity' (starts as plain LoRA) or 'kaiming_folded' "
                "(a kaiming mixer folded into A at initialisation, M = identity: with train_mixer=False this is "
                "the 'init-only' control, plain LoRA with MoSLoRA's initial A)."
            )
        },
    )
    train_mixer: bool = field(
        default=True,
        metadata={"help": "Train M. False freezes it; identity + frozen is plain LoRA, the baseline."},
    )

    def __post_init__(self):
        if self.init_lora_weights == "kaiming":
            # PEFT spells LoRA's kaiming-uniform A init as True.
            self.init_lora_weights = True
        # A preset name (or None) becomes the union of every model kind's modules, so that a bare
        # ``model.add_adapter(MoSLoRAConfig())`` works; add_moslora narrows it to the model's own list.
        self.target_preset = None
        if self.target_modules is None or self.target_modules in PRESET_NAMES:
            self.target_preset = self.target_modules or DEFAULT_PRESET
            self.target_modules = preset_union(self.target_preset)
        super().__post_init__()
        if self.mixer_init not in MIXER_INITS:
            raise ValueError(f"mixer_init must be one of {MIXER_INITS}, got {self.mixer_init!r}")
        if not self.use_moslora:
            raise ValueError("MoSLoRAConfig needs use_moslora=True; use peft.LoraConfig for plain LoRA")
        if self.use_dora:
            raise ValueError("MoSLoRA cannot be combined with DoRA (use_dora=True)")
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if self.rank_pattern or self.alpha_pattern:
            raise ValueError("rank_pattern / alpha_pattern are not supported with MoSLoRA: use one r and alpha")
        from .layer import register_moslora_layers

        register_moslora_layers(self)

    @property
    def scaling(self) -> float:
        """s in delta W = s * B M A."""
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def to_lora_config_kwargs(self) -> dict:
        """The plain ``LoraConfig`` fields (what a folded adapter needs): no MoSLoRA-only field."""
        return {k: v for k, v in self.to_dict().items() if k not in MOSLORA_ONLY_FIELDS}
