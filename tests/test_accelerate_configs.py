"""The accelerate config files shipped for several GPUs (configs/accelerate/*.yaml) are ones accelerate reads, with
the settings the trainer's save path needs; their launch lines name themselves."""

from __future__ import annotations

import pytest
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.utils import DistributedType
from train_support import REPO

CONFIGS = REPO / "configs" / "accelerate"


@pytest.mark.parametrize(
    "name, distributed_type, settings",
    [
        ("ddp", DistributedType.MULTI_GPU, {}),
        ("fsdp2", DistributedType.FSDP, {"fsdp_version": 2}),
        ("zero2", DistributedType.DEEPSPEED, {"zero_stage": 2, "gradient_accumulation_steps": 1}),
        # accelerate's get_state_dict consolidates ZeRO-3 weights only with this set: the adapter save needs it
        ("zero3", DistributedType.DEEPSPEED, {"zero_stage": 3, "zero3_save_16bit_model": True}),
    ],
)
def test_accelerate_config_files_load_with_the_settings_the_trainer_needs(name, distributed_type, settings):
    path = CONFIGS / f"{name}.yaml"
    config = ClusterConfig.from_yaml_file(path)
    assert config.distributed_type == distributed_type
    plugin = config.fsdp_config if distributed_type == DistributedType.FSDP else config.deepspeed_config
    assert {k: (plugin or {}).get(k) for k in settings} == settings
    launches = [line for line in path.read_text().splitlines() if "accelerate launch" in line]
    assert len(launches) == 2 and all(f"--config_file configs/accelerate/{name}.yaml" in line for line in launches)
