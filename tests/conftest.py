import os

import pytest
import torch

# Hub access is never needed: make any accidental attempt fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny models run fastest so, far faster when processes share the
    cores, and killed-and-resumed subprocess runs (OMP_NUM_THREADS=1) use the same kernels, so the same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


def randomize_adapter(model: torch.nn.Module, adapter_name: str, std: float = 0.05, seed: int = 0) -> None:
    """Give an adapter non-zero B (and random A, M) so that it changes outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".{adapter_name}." in name and ("lora_B" in name or "lora_mixer" in name or "lora_A" in name):
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * (
                    std if "lora_B" in name else 1.0 / param.shape[-1] ** 0.5
                )
                if "lora_mixer" in name:
                    noise += torch.eye(param.shape[0])
                param.copy_(noise.to(param.dtype))
