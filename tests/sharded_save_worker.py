"""One process of tests/test_sharded_save.py: a tiny SD 1.5 UNet with a MoSLoRA adapter, sharded with torch's
FSDP1 or FSDP2 over gloo, its adapter gathered and written by the trainer's own save functions.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/sharded_save_worker.py {fsdp1,fsdp2} OUT

The main process writes OUT/reference.safetensors (the adapter before sharding, read from the plain module),
OUT/gathered.safetensors (what the trainer's gather returned) and the adapter files in OUT/files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moslora_diffusion.config import MoSLoRAConfig  # noqa: E402
from moslora_diffusion.formats import write_adapter_files  # noqa: E402
from moslora_diffusion.inject import add_moslora  # noqa: E402
from moslora_diffusion.testing import make_tiny_pipeline  # noqa: E402
from moslora_diffusion.training.checkpoints import adapter_state_dict  # noqa: E402
from moslora_diffusion.training.sharding import adapter_state, gather_adapters  # noqa: E402


def shard(unet: torch.nn.Module, how: str) -> torch.nn.Module:
    if how == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(unet, use_orig_params=True, device_id=torch.device("cpu"))
    from torch.distributed.fsdp import fully_shard

    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        fully_shard(block)
    return fully_shard(unet)


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, torch.distributed.tensor.DTensor) else param


def main(how: str, out: Path) -> None:
    accelerator = Accelerator(cpu=True)
    unet = make_tiny_pipeline("sd15").unet
    add_moslora(unet, MoSLoRAConfig(r=4, target_modules="attention"))
    with torch.no_grad():  # B starts at zero: give every factor distinct values, the same on every process
        generator = torch.Generator().manual_seed(0)
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    reference = {name: tensor.clone() for name, tensor in adapter_state_dict(unet).items()}
    sharded = shard(unet, how)
    local = sum(_local(p).numel() for n, p in sharded.named_parameters() if "lora_" in n)
    adapters = gather_adapters(accelerator, {"unet": sharded})
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_file(reference, out / "reference.safetensors")
        save_file(adapters["unet"], out / "gathered.safetensors")
        state = adapter_state({"unet": unet}, adapters, "sd15", "default", "tiny:sd15")
        write_adapter_files(state, out / "files")
        print(f"local adapter elements: {local} of {sum(t.numel() for t in reference.values())}", flush=True)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
