"""SGM (Stability's original UNet) module names of a diffusers UNet: the same table as ComfyUI's."""

from __future__ import annotations

import pytest
from family_sets import UNET_FAMILIES
from test_loaders import _comfy_unet_config, _import_comfy

from moslora_diffusion.formats.sgm_names import sgm_module_names
from moslora_diffusion.testing import make_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", UNET_FAMILIES)
def test_every_module_gets_comfyuis_sgm_name(family):
    comfy = _import_comfy()
    unet = make_tiny_pipeline(family).unet
    modules = {name for name, _ in unet.named_modules()}
    sgm_of = {path: sgm for sgm, path in sgm_module_names(unet.config, modules).items()}
    checked = 0
    # comfy.utils.unet_to_diffusers: diffusers parameter name -> original parameter name
    for diffusers_name, original in comfy.utils.unet_to_diffusers(_comfy_unet_config(unet.config)).items():
        module, leaf = diffusers_name.rsplit(".", 1)
        if module in modules:
            assert f"{sgm_of[module]}.{leaf}" == original, diffusers_name
            checked += 1
    assert checked == len(list(unet.parameters()))  # every weight of the UNet has its original name
    assert any(name.startswith("output_blocks.") and ".attn2.to_k" in name for name in sgm_of.values())
