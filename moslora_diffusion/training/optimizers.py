"""The run's optimizer: one of five, with the defaults peers use, over the adapters' parameter groups.

============================  =====================================  =============================================
--optimizer                   class (package)                        defaults (--optimizer_args overrides them)
============================  =====================================  =============================================
adamw                         torch.optim.AdamW                      betas, eps from --adam_*; fused on CPU
adamw8bit                     bitsandbytes.optim.AdamW8bit           betas, eps from --adam_*
prodigy                       prodigyopt.Prodigy                     LR 1.0; betas, eps from --adam_*; decouple,
                                                                     use_bias_correction, safeguard_warmup (as
                                                                     diffusers' DreamBooth LoRA scripts)
adafactor                     transformers.optimization.Adafactor    the given LR: relative_step=False,
                                                                     scale_parameter=False, warmup_init=False
adamw_schedulefree            schedulefree.AdamWScheduleFree         betas, eps from --adam_*; its own warm-up
                                                                     (--lr_warmup_steps) and no LR schedule
============================  =====================================  =============================================

Learning rates and weight decay come per parameter group (component and role; see
:func:`.adapters.adapter_param_groups`). Schedule-free AdamW trains one weight sequence (y) and evaluates
another (x, an average): :func:`evaluation_weights` switches to x for validation and export and puts y back
bit for bit. Checkpoints hold y and the optimizer in train mode, so a resumed run continues exactly.

Importing this module loads nothing heavy: run_inputs checks packages and arguments before the models load.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import inspect
from typing import Any

# optimizer -> (module, class, the package pip installs)
_CLASSES = {
    "adamw": ("torch.optim", "AdamW", None),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "adafactor": ("transformers.optimization", "Adafactor", None),
    "adamw_schedulefree": ("schedulefree", "AdamWScheduleFree", "schedulefree"),
}
SCHEDULE_FREE = "adamw_schedulefree"
_PER_GROUP_KEYS = {"lr": "--learning_rate / --text_encoder_lr", "weight_decay": "--adam_weight_decay(_text_encoder)"}


def missing_package(optimizer: str) -> str | None:
    """One line saying how to install the package ``optimizer`` needs, or None when it is importable."""
    module, _, package = _CLASSES[optimizer]
    if package is None or importlib.util.find_spec(module.split(".")[0]) is not None:
        return None
    extra = "bnb" if package == "bitsandbytes" else "optimizers"
    return (
        f"--optimizer {optimizer} needs {package}: pip install {package} (or pip install 'moslora-diffusion[{extra}]')"
    )


def parse_optimizer_args(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``["d_coef=2", "betas=0.9,0.99", "foo=bar"]`` -> ``{"d_coef": 2, "betas": (0.9, 0.99), "foo": "bar"}``.

    Values are Python literals (numbers, tuples, True/False/None), else strings, as kohya reads them.
    """
    kwargs = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--optimizer_args: expected key=value, got '{item}'")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        kwargs[key.strip()] = value
    return kwargs


def check_optimizer_args(optimizer: str, kwargs: dict[str, Any]) -> None:
    """Refuse a keyword the optimizer does not take, or one set per group by the run's flags (ValueError)."""
    for key in kwargs:
        if key in _PER_GROUP_KEYS:
            raise ValueError(f"--optimizer_args {key}=...: set per parameter group by {_PER_GROUP_KEYS[key]} instead")
    if not kwargs:
        return
    accepted = [name for name in inspect.signature(optimizer_class(optimizer).__init__).parameters if name != "self"]
    unknown = [key for key in kwargs if key not in accepted]
    if unknown:
        takes = ", ".join(name for name in accepted if name not in ("params", *_PER_GROUP_KEYS))
        raise ValueError(f"--optimizer_args: {optimizer} takes no '{unknown[0]}' (it takes: {takes})")


def optimizer_class(optimizer: str) -> type:
    module, name, _ = _CLASSES[optimizer]
    return getattr(importlib.import_module(module), name)


def default_kwargs(
    optimizer: str, *, betas: tuple[float, float], eps: float, warmup_steps: int, on_cpu: bool
) -> dict[str, Any]:
    """The keyword arguments peers use for ``optimizer`` (module docstring's table), before --optimizer_args."""
    if optimizer == "adamw":
        # On CPU torch's default AdamW updates the adapter's tensors one by one in Python (SD 1.5: 144 tensors,
        # 4 ms a step); the fused kernel takes 0.6 ms. On GPUs the default (foreach) is already batched.
        return {"betas": betas, "eps": eps, "fused": True if on_cpu else None}
    if optimizer == "adamw8bit":
        return {"betas": betas, "eps": eps}
    if optimizer == "prodigy":
        return {"betas": betas, "eps": eps, "decouple": True, "use_bias_correction": True, "safeguard_warmup": True}
    if optimizer == "adafactor":
        return {"relative_step": False, "scale_parameter": False, "warmup_init": False}
    if optimizer == SCHEDULE_FREE:
        return {"betas": betas, "eps": eps, "warmup_steps": warmup_steps}
    raise ValueError(f"unknown optimizer '{optimizer}'")


def make_optimizer(
    param_groups: list[dict],
    optimizer: str,
    *,
    betas: tuple[float, float],
    eps: float,
    warmup_steps: int = 0,
    optimizer_args: dict[str, Any] | None = None,
):
    """``optimizer`` over ``param_groups`` (each with its own "lr" and "weight_decay"), in train mode."""
    on_cpu = all(p.device.type == "cpu" for group in param_groups for p in group["params"])
    kwargs = {
        **default_kwargs(optimizer, betas=betas, eps=eps, warmup_steps=warmup_steps, on_cpu=on_cpu),
        **(optimizer_args or {}),
    }
    made = optimizer_class(optimizer)(param_groups, **kwargs)
    if optimizer == SCHEDULE_FREE:
        made.train()  # it starts in eval mode and refuses to step there
    return made


@contextlib.contextmanager
def evaluation_weights(optimizer, optimizer_name: str):
    """Inside the block the adapters hold the weights to evaluate and export.

    For schedule-free AdamW that is its average x (``optimizer.eval()``); on leaving, the training sequence
    y is put back bit for bit (``train()`` alone would recompute it with rounding), so validating or not
    never changes the run. Every other optimizer evaluates the live weights: nothing changes.
    """
    if optimizer_name != SCHEDULE_FREE:
        yield
        return
    import torch

    params = [p for group in optimizer.param_groups for p in group["params"]]
    training_weights = [p.detach().clone() for p in params]
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
        with torch.no_grad():
            for param, weights in zip(params, training_weights):
                param.copy_(weights)
