"""A hollow pipeline: the real module structure, every base weight a zero-stride view with no storage.

Adapters load into it exactly as into the real pipeline (same loaders, same key conversion), at the cost
of the adapters alone.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
from pathlib import Path

import torch
from torch import nn


def _hollow(model: nn.Module) -> nn.Module:
    """Replace every meta parameter and buffer by a zero-stride CPU view: shapes and dtypes, no storage.

    Unlike meta tensors, these let diffusers and PEFT create and load adapter weights on the CPU.
    """
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                view = torch.zeros((), dtype=param.dtype).expand(param.shape)
                module._parameters[name] = nn.Parameter(view, requires_grad=False)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.zeros((), dtype=buffer.dtype).expand(buffer.shape)
    return model.eval()


def _hollow_model(cls: type, config) -> nn.Module:
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights():
        # A copy: building a model may write into its config (attention implementation and the like).
        model = cls.from_config(config) if issubclass(cls, diffusers.ModelMixin) else cls(copy.deepcopy(config))
    return _hollow(model)


def _construct_pipeline(pipeline_cls: type, components: dict):
    """The pipeline from hollow models; tokenizers and other processors are left out (None)."""
    parameters = inspect.signature(pipeline_cls.__init__).parameters
    kwargs = {
        name: components.get(name)
        for name, parameter in parameters.items()
        if name != "self"
        and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
        and (name in components or parameter.default is parameter.empty)
    }
    if "requires_safety_checker" in parameters:
        kwargs["requires_safety_checker"] = False
    return pipeline_cls(**kwargs)


def hollow_pipeline_from_folder(base: Path):
    import diffusers
    import transformers

    index = json.loads((base / "model_index.json").read_text())
    components = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or None in spec:
            continue
        library, class_name = spec
        if library not in ("diffusers", "transformers"):
            continue
        cls = getattr(importlib.import_module(library), class_name)
        if issubclass(cls, diffusers.ModelMixin):
            components[name] = _hollow_model(cls, cls.load_config(base / name))
        elif issubclass(cls, transformers.PreTrainedModel):
            components[name] = _hollow_model(cls, cls.config_class.from_pretrained(base / name))
        elif issubclass(cls, diffusers.SchedulerMixin):
            components[name] = cls.from_config(cls.load_config(base / name))
    return _construct_pipeline(getattr(diffusers, index["_class_name"]), components)


def hollow_pipeline_like(pipe):
    import diffusers
    import transformers

    components = {}
    for name, component in pipe.components.items():
        if isinstance(component, diffusers.ModelMixin):
            components[name] = _hollow_model(type(component), component.config)
        elif isinstance(component, transformers.PreTrainedModel):
            components[name] = _hollow_model(type(component), component.config)
        elif isinstance(component, diffusers.SchedulerMixin):
            components[name] = component
    return _construct_pipeline(type(pipe), components)
