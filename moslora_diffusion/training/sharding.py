"""The adapter of models that may be sharded across processes (FSDP1, FSDP2, DeepSpeed ZeRO-3), gathered whole
for the checkpoints and the final adapter files.

Under sharding each process holds a slice of every weight, so the unwrapped module's parameters are not the
adapter (FSDP1: flat views of the local shard, FSDP2: DTensors, ZeRO-3: empty placeholders). The adapter is
read through accelerate's state-dict path instead (``Accelerator.get_state_dict``: FSDP1's full state dict,
FSDP2's ``get_model_state_dict``, ZeRO-3's 16-bit consolidation), and FSDP2's DTensors are made full. Without
sharding (one process, DDP) the same call returns the live tensors, so there is one way to save.

    adapters = gather_adapters(accelerator, {"unet": prepared_unet})     # every process calls it
    if accelerator.is_main_process:
        state = adapter_state(trained, adapters, family.name, "default", base_model)
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats import AdapterState
from ..loaders import component_adapter_from_model


def gather_adapter_state_dict(accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of a prepared ``model`` by parameter name, whole and on the CPU.

    Every process must call it (under sharding it is a collective); the main process gets every tensor, the
    others may get none (accelerate gathers FSDP and ZeRO-3 state to the main process only).
    """
    if _is_fsdp1(model) and accelerator.device.type == "cpu":
        state = _fsdp1_full_state_dict_on_cpu(model)
    else:
        state = accelerator.get_state_dict(model)
    adapter = {}
    for name, tensor in state.items():  # one order on every process: full_tensor() is a collective
        if "lora_" not in name:
            continue
        if isinstance(tensor, torch.distributed.tensor.DTensor):
            tensor = tensor.full_tensor()
        adapter[name] = tensor.detach().cpu()
    return adapter


def gather_adapters(accelerator, prepared: dict[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`gather_adapter_state_dict` of each prepared model, by component name."""
    return {component: gather_adapter_state_dict(accelerator, model) for component, model in prepared.items()}


def adapter_state(
    trained: dict[str, nn.Module],
    adapters: dict[str, dict[str, torch.Tensor]],
    family: str,
    adapter_name: str,
    base_model: str | None,
) -> AdapterState:
    """The gathered ``adapters`` (component -> PEFT parameter name -> tensor) as an AdapterState to write.

    ``trained`` (component -> unwrapped model) gives each component's adapter settings and module naming only;
    no tensor is read from it.
    """
    components = {
        component: component_adapter_from_model(trained[component], adapter_name, component, state_dict=tensors)
        for component, tensors in adapters.items()
    }
    return AdapterState(components, family, base_model, adapter_name, source_format="live")


def _is_fsdp1(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


def _fsdp1_full_state_dict_on_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    """FSDP1's full state dict on every process, without accelerate's offload_to_cpu + rank0_only: on a CPU
    (gloo) that combination crashed the main process with SIGSEGV here; the weights are in host memory anyway."""
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

    config = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
    with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
        return model.state_dict()
