"""The README.md model card written next to the adapter, in the Hugging Face hub's format.

YAML front matter (base_model, instance_prompt, license, tags, widget images) and then what a user
needs: the adapter's settings, the validation images, how to load the files with stock diffusers, and
which file each client (diffusers, ComfyUI, webui, sd-scripts, moslora_diffusion) takes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..fileio import atomic_path


@dataclass
class ModelCard:
    base_model: str
    family: type  # a moslora_diffusion.families.Family subclass
    instance_prompt: str
    validation_prompts: tuple[str, ...]  # the first is the usage example's prompt
    adapter_settings: dict  # name -> value, shown as a table
    training_settings: dict
    validation_images: list[tuple[str, str]] = field(default_factory=list)  # (file name in the output folder, prompt)
    files: dict = field(default_factory=dict)  # role -> file name
    license: str | None = None

    def front_matter(self) -> dict:
        meta = {
            "base_model": self.base_model,
            "instance_prompt": self.instance_prompt,
            "license": self.license or self.family.license,
            "library_name": "diffusers",
            "tags": [
                "text-to-image",
                "diffusers",
                "lora",
                "moslora",
                "dreambooth",
                "template:sd-lora",
                *self.family.hub_tags,
            ],
        }
        if self.validation_images:
            meta["widget"] = [{"text": prompt, "output": {"url": name}} for name, prompt in self.validation_images]
        return meta

    def render(self) -> str:
        front = yaml.safe_dump(self.front_matter(), sort_keys=False, allow_unicode=True).strip()
        lora_file = self.files.get("diffusers", "pytorch_lora_weights.safetensors")
        lines = [
            "---",
            front,
            "---",
            "",
            f"# MoSLoRA DreamBooth adapter for `{self.base_model}`",
            "",
            "A MoSLoRA (mixture-of-subspaces LoRA, Wu et al. 2024) adapter trained with DreamBooth "
            f"on a {self.family.name} base. "
            f"Trigger it with the instance prompt: `{self.instance_prompt}`.",
            "",
            "The mixer M of delta W = s * B M A is folded into B for the plain LoRA files below, so they load in any "
            "tool that reads LoRA, with the same outputs as the MoSLoRA model.",
            "",
            "What to expect from the mixer: on moslora-diffusion's measured sweep (ranks 2-32; kaiming, orthogonal "
            "and identity mixers; mixer learning rate 0.1x and 1x; LoRA+), no MoSLoRA setting beat plain LoRA of the "
            "same rank on any metric after correction for multiple comparisons: treat MoSLoRA as a drop-in for "
            "LoRA at the same cost, not as an upgrade.",
            "",
            "## Files",
            "",
            "| file | what it is |",
            "| --- | --- |",
        ]
        descriptions = client_file_descriptions(self.family)
        for role, name in self.files.items():
            lines.append(f"| `{name}` | {descriptions.get(role, role)} |")
        lines += ["", "## Adapter", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {key} | {_cell(value)} |" for key, value in self.adapter_settings.items()]
        lines += ["", "## Training", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {key} | {_cell(value)} |" for key, value in self.training_settings.items()]
        if self.validation_images:
            lines += ["", "## Validation images", ""]
            for prompt in dict.fromkeys(prompt for _, prompt in self.validation_images):
                lines += [f"Prompt: `{prompt}`", ""]
                names = [name for name, image_prompt in self.validation_images if image_prompt == prompt]
                lines += [f"![validation image {name}]({name})" for name in names] + [""]
            lines.pop()
        if self.base_model.startswith("tiny:"):  # the offline smoke base: random weights, built in memory
            load_base = [
                "from moslora_diffusion.testing import make_tiny_pipeline",
                "",
                f'pipe = make_tiny_pipeline("{self.base_model[len("tiny:") :]}")  # the tiny random base it trained on',
            ]
        else:
            load_base = [
                "import torch",
                "from diffusers import AutoPipelineForText2Image",
                "",
                f'pipe = AutoPipelineForText2Image.from_pretrained("{self.base_model}", torch_dtype=torch.float16)',
                'pipe = pipe.to("cuda")',
            ]
        lines += [
            "",
            "## Use it with diffusers",
            "",
            "```python",
            *load_base,
            f'pipe.load_lora_weights("path/to/this/folder", weight_name="{lora_file}")',
            f'image = pipe(prompt="{(self.validation_prompts or (self.instance_prompt,))[0]}").images[0]',
            "```",
            "",
            "## Which file each client takes",
            "",
            *(f"- {line}" for line in client_lines(self.family, self.files)),
            "",
        ]
        return "\n".join(lines)

    def save(self, path: str | Path) -> Path:
        with atomic_path(path) as tmp:
            tmp.write_text(self.render(), encoding="utf-8")
        return Path(path)


def client_file_descriptions(family) -> dict[str, str]:
    """role -> what the file is and who reads it, for ``family`` (its Family.*_file_layout)."""
    if family.diffusers_file_layout == "kohya":
        diffusers = "plain LoRA (mixer folded in), kohya keys: stock diffusers `pipe.load_lora_weights`, ComfyUI"
    else:
        diffusers = (
            "plain LoRA (mixer and scale folded in), diffusers keys: stock diffusers `pipe.load_lora_weights`, "
            "ComfyUI (T5 included)"
        )
    if family.kohya_file_layout == "kohya":
        kohya = "the same LoRA with kohya/webui keys: AUTOMATIC1111, Forge, ComfyUI, LyCORIS, sd-scripts"
    elif family.kohya_file_layout == "kohya_sgm":
        kohya = (
            "the same LoRA with kohya/webui keys, the UNet in Stability's original block names as sd-scripts "
            "writes them: AUTOMATIC1111, Forge, ComfyUI, LyCORIS, sd-scripts"
        )
    else:
        kohya = "the same LoRA in kohya sd-scripts' names (q, k, v fused): sd-scripts, Forge, ComfyUI"
    return {
        "diffusers": diffusers,
        "kohya": kohya,
        "onetrainer": "the same LoRA in OneTrainer's layout (lora_transformer_): ComfyUI, OneTrainer",
        "native": "MoSLoRA with the mixer unfolded, for resuming, analysis and further training",
    }


def client_lines(family, files: dict) -> list[str]:
    """One line per client: which of ``files`` (role -> name) it takes."""
    diffusers = f"`{files.get('diffusers', 'pytorch_lora_weights.safetensors')}`"
    kohya = f"`{files.get('kohya', 'pytorch_lora_weights_kohya.safetensors')}`"
    native = f"`{files.get('native', 'moslora_weights.safetensors')}`"
    original_names = family.kohya_file_layout == "sd_scripts"  # SD3 / Flux: Forge, not AUTOMATIC1111
    return [
        f"diffusers: {diffusers} (`pipe.load_lora_weights(folder)` picks it)",
        f"ComfyUI: {diffusers} or {kohya}, in `models/loras`",
        f"{'Forge' if original_names else 'AUTOMATIC1111, Forge'}: {kohya}, in `models/Lora`",
        f"kohya sd-scripts{'' if original_names else ', LyCORIS'}: {kohya}",
        f"moslora_diffusion (`load_moslora_weights(..., trainable=True)`, further training): {native}",
    ]


def _cell(value) -> str:
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value)
    return f"`{value}`" if value not in (None, "") else "-"
