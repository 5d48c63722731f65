"""Two kinds of community LoRA files our readers take exactly (each module's delta = the file's (alpha / r) B A):

- PEFT-keyed files with a per-module ``<module>.alpha`` beside lora_A / lora_B (also under PEFT's own
  ``base_model.model.`` prefix), and
- ComfyUI's dotted keys ``diffusion_model.<original module>`` (SGM UNet names for SD1.x / SDXL, BFL names
  for Flux) with kohya or PEFT factor suffixes,

through read_adapter_file + a pipeline, ``moslora inspect``, merge and ``--init_lora``."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_adapter
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from moslora_diffusion import MoSLoRAConfig, add_moslora
from moslora_diffusion.cli import main
from moslora_diffusion.families import get_family
from moslora_diffusion.formats import read_adapter_file
from moslora_diffusion.formats.sd_scripts import split_fused
from moslora_diffusion.formats.sgm_names import sgm_module_names
from moslora_diffusion.loaders import adapter_state_from_pipeline, canonical_module_path, fit_adapter_to_models
from moslora_diffusion.merge import merge_adapters
from moslora_diffusion.testing import make_tiny_pipeline
from moslora_diffusion.training.init_lora import add_init_lora, read_init_lora

pytestmark = pytest.mark.usefixtures("one_thread")


def _adapted(family: str, preset: str = "attention+ff"):
    """The adapter of a tiny ``family`` pipeline: MoSLoRA on the denoiser (``preset``) and every text encoder."""
    pipe = make_tiny_pipeline(family)
    spec = get_family(family)
    add_moslora(getattr(pipe, spec.denoiser), MoSLoRAConfig(r=4, lora_alpha=8, target_modules=preset))
    randomize_adapter(getattr(pipe, spec.denoiser), "default", seed=1)
    for seed, component in enumerate(spec.text_encoders, start=2):
        add_moslora(getattr(pipe, component), MoSLoRAConfig(r=2, lora_alpha=3))
        randomize_adapter(getattr(pipe, component), "default", seed=seed)
    return adapter_state_from_pipeline(pipe)


def _denoiser_only(want: dict, family: str) -> dict:
    denoiser = get_family(family).denoiser + "."
    return {key: delta for key, delta in want.items() if key.startswith(denoiser)}


def _alpha(index: int) -> float:
    """A different alpha for neighbouring modules, so a reader that takes one alpha for all is caught."""
    return (1.0, 3.0, 8.0, 0.5)[index % 4]


def _peft_file_with_alphas(family: str, prefix: str | None = None):
    """(tensors, {component.path: the file's delta}) of a PEFT-keyed file with a per-module alpha. ``prefix``
    replaces the denoiser's ``<component>.`` (PEFT's own ``base_model.model.``; the file then holds the
    denoiser only, as PEFT saves one wrapped model)."""
    state = _adapted(family)
    tensors, want = {}, {}
    layers = sorted(state.layer_items(), key=lambda item: item[:2])
    if prefix:
        layers = [item for item in layers if item[0] == get_family(family).denoiser]
    for index, (component, path, layer) in enumerate(layers):
        module = f"{prefix or component + '.'}{path}"
        down, up, alpha = layer.lora_A, layer.folded_lora_b(), _alpha(index)
        tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = down, up
        tensors[f"{module}.alpha"] = torch.tensor(alpha)
        want[f"{component}.{path}"] = _file_delta(down, up, alpha)
    return tensors, want


def _file_delta(down: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    """(alpha / r) up @ down, shaped like the base weight (linear or conv)."""
    delta = up.double().flatten(1) @ down.double().flatten(1)
    return alpha / down.shape[0] * delta.reshape(up.shape[0], *down.shape[1:])


def _deltas(state) -> dict[str, torch.Tensor]:
    return {f"{c}.{p}": layer.delta_weight() for c, p, layer in state.layer_items()}


def _assert_same(got: dict, want: dict, atol: float = 1e-7) -> None:
    assert got.keys() == want.keys() and want
    for key, delta in want.items():
        torch.testing.assert_close(got[key].double(), delta, rtol=1e-6, atol=atol, msg=key)


def _fitted(path, family: str) -> dict[str, torch.Tensor]:
    spec = get_family(family)
    pipe = make_tiny_pipeline(family)
    models = {c: getattr(pipe, c) for c in spec.adapter_components() if getattr(pipe, c, None) is not None}
    return _deltas(fit_adapter_to_models(read_adapter_file(path), models, spec))


def _merged_deltas(path, family: str) -> dict[str, torch.Tensor]:
    """component.path -> merged weight - base weight, for each adapted module of the merge (an fp32
    difference of weights: compare with atol=MERGE_ATOL). Module paths are the files' (CLIP with text_model.)."""
    base_pipe = make_tiny_pipeline(family)
    merged_pipe = merge_adapters(make_tiny_pipeline(family), [(path, 1.0)])
    deltas = {}
    for component in get_family(family).adapter_components():
        base, merged = getattr(base_pipe, component), getattr(merged_pipe, component)
        merged_weights = merged.state_dict()
        for key, weight in base.state_dict().items():
            if key.endswith(".weight") and not torch.equal(merged_weights[key], weight):
                path_in_file = canonical_module_path(base, key.removesuffix(".weight"))
                deltas[f"{component}.{path_in_file}"] = merged_weights[key].double() - weight.double()
    return deltas


MERGE_ATOL = 1e-6  # fp32 rounding of base weights of size ~1


def _init_lora_deltas(path, family: str) -> dict[str, torch.Tensor]:
    spec = get_family(family)
    components = dict(make_tiny_pipeline(family).components)
    init = read_init_lora(str(path), spec)
    add_init_lora(
        components, spec, init, target_modules=None, train_text_encoder=False, text_encoder_config=None,
        train_mixer=True, lora_dropout=0.0, adapter_name="default",
    )  # fmt: skip
    denoiser = components[spec.denoiser]
    return {
        f"{spec.denoiser}.{name}": module.get_delta_weight("default").double()
        for name, module in denoiser.named_modules()
        if isinstance(module, LoraLayer)
    }


# ------------------------------------------------------------------------------------------------
# PEFT keys with a per-module alpha

PEFT_CASES = [("sd15", None), ("flux", None), ("sd15", "base_model.model."), ("flux", "base_model.model.")]


@pytest.mark.parametrize(("family", "prefix"), PEFT_CASES)
def test_peft_keys_with_per_module_alphas_read_each_modules_own_scale(family, prefix, tmp_path):
    tensors, want = _peft_file_with_alphas(family, prefix)
    save_file(tensors, tmp_path / "lora.safetensors")
    state = read_adapter_file(tmp_path / "lora.safetensors")
    assert state.source_format == "diffusers"
    _assert_same(_deltas(state), want)
    _assert_same(_fitted(tmp_path / "lora.safetensors", family), want)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_merge_and_init_lora_take_the_per_module_alphas(family, tmp_path):
    tensors, want = _peft_file_with_alphas(family)
    save_file(tensors, tmp_path / "lora.safetensors")
    _assert_same(_merged_deltas(tmp_path / "lora.safetensors", family), want, MERGE_ATOL)
    _assert_same(_init_lora_deltas(tmp_path / "lora.safetensors", family), _denoiser_only(want, family))


def test_inspect_reads_a_peft_file_with_alphas(tmp_path, capsys):
    tensors, _ = _peft_file_with_alphas("sd15")
    save_file(tensors, tmp_path / "lora.safetensors")
    assert main(["inspect", str(tmp_path / "lora.safetensors")]) == 0
    assert "format:     diffusers" in capsys.readouterr().out


def test_a_module_without_alpha_beside_others_with_one_is_one_line(tmp_path, capsys):
    tensors, _ = _peft_file_with_alphas("sd15")
    dropped = sorted(k for k in tensors if k.endswith(".alpha"))[1]
    del tensors[dropped]
    save_file(tensors, tmp_path / "lora.safetensors")
    assert main(["inspect", str(tmp_path / "lora.safetensors")]) == 2
    err = capsys.readouterr().err
    assert dropped.removesuffix(".alpha") + ".lora_A.weight" in err and "has no .alpha" in err


def test_alphas_that_disagree_with_the_files_metadata_are_refused(tmp_path):
    import json

    tensors, _ = _peft_file_with_alphas("sd15")
    metadata = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 4})}
    save_file(tensors, tmp_path / "lora.safetensors", metadata)
    with pytest.raises(ValueError, match="its .alpha gives scale"):
        read_adapter_file(tmp_path / "lora.safetensors")


# ------------------------------------------------------------------------------------------------
# ComfyUI's diffusion_model.<original name> keys


# ComfyUI's state-dict name of each text encoder, as its LoRA saver writes it after "text_encoders.".
COMFYUI_TEXT_ENCODERS = {
    "sd15": {"text_encoder": "clip_l"},
    "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"},
    "flux": {"text_encoder": "clip_l", "text_encoder_2": "t5xxl"},
}
FACTOR_NAMES = {"kohya": (".lora_down.weight", ".lora_up.weight"), "peft": (".lora_A.weight", ".lora_B.weight")}


def _put(tensors: dict, want: dict, module: str, key: str, down, up, alpha: float, suffixes: str) -> None:
    down_suffix, up_suffix = FACTOR_NAMES[suffixes]
    tensors[module + down_suffix], tensors[module + up_suffix] = down, up
    tensors[module + ".alpha"] = torch.tensor(alpha)
    want[key] = _file_delta(down, up, alpha)


def _comfyui_text_encoder_keys(state, family: str, suffixes: str, tensors: dict, want: dict) -> None:
    """Each text encoder's layers under text_encoders.<clip_l / clip_g / t5xxl>.transformer.<module>."""
    for component, name in COMFYUI_TEXT_ENCODERS[family].items():
        for index, (path, layer) in enumerate(sorted(state.components[component].layers.items())):
            module = f"text_encoders.{name}.transformer.{path}"
            down, up = layer.lora_A, layer.folded_lora_b()
            _put(tensors, want, module, f"{component}.{path}", down, up, _alpha(index + 1), suffixes)


def _comfyui_unet_file(family: str, suffixes: str):
    """(tensors, want) of a LoRA under diffusion_model.<SGM name> and text_encoders.*, per-module alphas."""
    state = _adapted(family)
    pipe_unet = make_tiny_pipeline(family).unet
    sgm_of = {path: sgm for sgm, path in sgm_module_names(pipe_unet.config, state.components["unet"].layers).items()}
    tensors, want = {}, {}
    for index, (path, layer) in enumerate(sorted(state.components["unet"].layers.items())):
        module = f"diffusion_model.{sgm_of[path]}"
        _put(tensors, want, module, f"unet.{path}", layer.lora_A, layer.folded_lora_b(), _alpha(index), suffixes)
    _comfyui_text_encoder_keys(state, family, suffixes, tensors, want)
    return tensors, want


def _comfyui_flux_file():
    """(tensors, want) of a Flux LoRA under diffusion_model.<BFL name> (q, k, v fused), PEFT suffixes, and
    alpha = 2 R with up halved (a reader that ignored alpha would be off by 2)."""
    from moslora_diffusion.formats.sd_scripts import sd_scripts_state_dict

    state = _adapted("flux", "attention")
    config = dict(make_tiny_pipeline("flux").transformer.config)
    file, _ = sd_scripts_state_dict(state, denoiser_config=config)
    tensors, want = {}, {}
    for module in get_family("flux").sd_scripts_modules(config):
        stem = "lora_unet_" + module.name.replace(".", "_")
        if f"{stem}.lora_down.weight" not in file:
            continue
        down, up = file[f"{stem}.lora_down.weight"], file[f"{stem}.lora_up.weight"] / 2
        alpha = 2 * float(file[f"{stem}.alpha"])
        name = f"diffusion_model.{module.name}"
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = down, up
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
        for part, factors in split_fused(module, down, up, alpha).items():
            want[f"transformer.{part}"] = factors.scale * (factors.lora_B.double() @ factors.lora_A.double())
    _comfyui_text_encoder_keys(state, "flux", "peft", tensors, want)
    return tensors, want


COMFYUI_CASES = [("sdxl", "kohya"), ("sdxl", "peft"), ("sd15", "kohya"), ("flux", "peft")]


def _comfyui_file(family: str, suffixes: str):
    return _comfyui_flux_file() if family == "flux" else _comfyui_unet_file(family, suffixes)


@pytest.mark.parametrize(("family", "suffixes"), COMFYUI_CASES)
def test_comfyui_dotted_keys_read_exactly(family, suffixes, tmp_path):
    tensors, want = _comfyui_file(family, suffixes)
    save_file(tensors, tmp_path / "lora.safetensors")
    state = read_adapter_file(tmp_path / "lora.safetensors")
    assert state.source_format == "comfyui"
    assert {layer.source_key for _, _, layer in state.layer_items()} <= set(tensors)  # messages name the file's keys
    _assert_same(_fitted(tmp_path / "lora.safetensors", family), want)


@pytest.mark.parametrize(("family", "suffixes"), [("sdxl", "kohya"), ("flux", "peft")])
def test_merge_and_init_lora_take_comfyui_dotted_keys(family, suffixes, tmp_path):
    tensors, want = _comfyui_file(family, suffixes)
    save_file(tensors, tmp_path / "lora.safetensors")
    _assert_same(_merged_deltas(tmp_path / "lora.safetensors", family), want, MERGE_ATOL)
    _assert_same(_init_lora_deltas(tmp_path / "lora.safetensors", family), _denoiser_only(want, family))


def test_inspect_fits_a_comfyui_file_to_an_sdxl_folder(tmp_path, capsys):
    from moslora_diffusion.testing import save_tiny_pipeline

    tensors, _ = _comfyui_unet_file("sdxl", "kohya")
    save_file(tensors, tmp_path / "lora.safetensors")
    base = save_tiny_pipeline("sdxl", tmp_path / "sdxl")
    code = main(["inspect", str(tmp_path / "lora.safetensors"), "--pretrained_model_name_or_path", str(base)])
    out = capsys.readouterr().out
    assert code == 0 and "format:     comfyui" in out and "fits:" in out


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("diffusion_model.double_blocks.0.img_attn.norm.lora_A.weight", "names no flux module"),
        ("diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight", "names no module of Stability's UNet"),
        ("text_encoders.clip_x.transformer.text_model.encoder.layers.0.mlp.fc1.lora_A.weight", "not a ComfyUI"),
    ],
)
def test_an_unknown_comfyui_name_is_one_line_naming_it(key, expected, tmp_path, capsys):
    tensors, _ = _comfyui_flux_file() if "double" in key else _comfyui_unet_file("sdxl", "peft")
    module = key.removesuffix(".lora_A.weight")
    tensors[key], tensors[module + ".lora_B.weight"] = torch.zeros(2, 8), torch.zeros(8, 2)
    save_file(tensors, tmp_path / "lora.safetensors")
    assert main(["inspect", str(tmp_path / "lora.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert key in err and expected in err and len(err.splitlines()) == 1


def test_an_unknown_sgm_name_is_refused_naming_the_files_key_when_fitted(tmp_path):
    tensors, _ = _comfyui_unet_file("sdxl", "kohya")
    module = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn9.to_q"
    tensors[module + ".lora_down.weight"], tensors[module + ".lora_up.weight"] = torch.zeros(2, 8), torch.zeros(8, 2)
    save_file(tensors, tmp_path / "lora.safetensors")
    with pytest.raises(ValueError, match=f"'{module}.lora_down.weight' names no module"):
        _fitted(tmp_path / "lora.safetensors", "sdxl")


def test_moslora_merge_bakes_a_peft_file_with_alphas_into_a_base_folder(tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from moslora_diffusion.testing import save_tiny_pipeline

    tensors, want = _peft_file_with_alphas("sd15")
    save_file(tensors, tmp_path / "lora.safetensors")
    base = save_tiny_pipeline("sd15", tmp_path / "base")
    argv = [
        "merge",
        "--base",
        str(base),
        "--adapter",
        str(tmp_path / "lora.safetensors"),
        "--output",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0
    before = UNet2DConditionModel.from_pretrained(base / "unet").state_dict()
    after = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet").state_dict()
    got = {
        f"unet.{key.removesuffix('.weight')}": after[key].double() - weight.double()
        for key, weight in before.items()
        if not torch.equal(after[key], weight)
    }
    _assert_same(got, _denoiser_only(want, "sd15"), MERGE_ATOL)
