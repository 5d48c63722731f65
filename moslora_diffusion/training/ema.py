"""An exponential moving average of the trained adapter weights (--use_ema), kept in every checkpoint.

    ema_t = d_t * ema_{t-1} + (1 - d_t) * w_t,   d_t = min(decay, (1 + t) / (10 + t))  (t >= 1: d_1 = 0)

The averaging is diffusers' ``EMAModel`` (its default decay 0.9999 and warm-up, as diffusers' training
scripts use them); the warm-up means short DreamBooth runs average over roughly the last tenth of their
steps. Checkpoints store the averages as ``ema_adapters.safetensors`` (one tensor per trained parameter,
named "<component>.<parameter>", the step count as metadata), never as a pickle, and a resumed run reads
them back bit for bit.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from torch import nn

from ..fileio import load_safetensors, save_safetensors

EMA_FILE = "ema_adapters.safetensors"
_STEP_KEY = "moslora.ema_optimization_step"
logger = logging.getLogger(__name__)


class AdapterEMA:
    """The moving average of ``named_parameters`` (name -> trainable parameter), updated after each optimizer step."""

    def __init__(self, named_parameters: dict[str, nn.Parameter], decay: float):
        self.names = list(named_parameters)
        self.parameters = list(named_parameters.values())
        self.average = EMAModel(self.parameters, decay=decay)

    @classmethod
    def of_adapters(cls, trained: dict[str, nn.Module], decay: float) -> AdapterEMA:
        """Over every trainable parameter of the adapted ``trained`` components (name -> model)."""
        named = {
            f"{component}.{name}": param
            for component, model in trained.items()
            for name, param in model.named_parameters()
            if param.requires_grad
        }
        return cls(named, decay)

    def step(self) -> None:
        self.average.step(self.parameters)

    def copy_to_adapters(self) -> None:
        """Replace the live adapter weights by their averages (before the adapter files are written)."""
        self.average.copy_to(self.parameters)

    def save(self, folder: str | Path) -> Path:
        tensors = {name: shadow.detach().contiguous() for name, shadow in zip(self.names, self.average.shadow_params)}
        return save_safetensors(tensors, Path(folder) / EMA_FILE, {_STEP_KEY: str(self.average.optimization_step)})

    def load(self, folder: str | Path) -> None:
        """The averages saved in checkpoint ``folder``. A checkpoint saved without --use_ema has none: the average
        stays fresh, and its first step (d_1 = 0) takes the weights the run continues from."""
        path = Path(folder) / EMA_FILE
        if not path.is_file():
            logger.warning("%s was saved without --use_ema: the EMA starts from its weights", folder)
            return
        tensors, metadata = load_safetensors(path)
        if set(tensors) != set(self.names):
            missing = sorted(set(self.names) ^ set(tensors))
            raise ValueError(f"{path}: EMA weights do not match this run's adapter (first offending key: {missing[0]})")
        with torch.no_grad():
            for name, shadow in zip(self.names, self.average.shadow_params):
                shadow.copy_(tensors[name])
        self.average.optimization_step = int(metadata[_STEP_KEY])


def register_ema_checkpoint_hooks(accelerator, ema: AdapterEMA) -> None:
    """Make ``save_state`` write the averages into the checkpoint (main process) and ``load_state`` read them."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            ema.save(output_dir)

    def load_hook(models, input_dir):
        ema.load(input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
