"""Adapter file layouts without pipelines: round trips, metadata, validation, resize maths."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import save_file

from moslora_diffusion.formats import (
    DIFFUSERS_WEIGHT_NAME,
    FORMAT_VERSION,
    KOHYA_WEIGHT_NAME,
    NATIVE_HEADER_KEY,
    NATIVE_WEIGHT_NAME,
    AdapterState,
    ComponentAdapter,
    LayerFactors,
    as_moslora_state,
    detect_format,
    diffusers_state_dict,
    find_adapter_file,
    kohya_state_dict,
    mixer_statistics,
    native_state_dict,
    read_adapter_file,
    resize_adapter,
    validate_adapter_state_dict,
    write_adapter_files,
)


def _moslora_config(r: int, alpha: float, **overrides) -> dict:
    config = {
        "use_moslora": True, "r": r, "lora_alpha": alpha, "use_rslora": False, "mixer_init": "kaiming",
        "train_mixer": True, "target_modules": ["to_q", "proj_in", "q_proj"], "lora_dropout": 0.0,
        "rank_pattern": {}, "alpha_pattern": {},
    }  # fmt: skip
    config.update(overrides)
    return config


def _layer(
    out: int, inp: int, r: int, scale: float, conv: bool = False, mixer: bool = True, seed: int = 0
) -> LayerFactors:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn((r, inp, 1, 1) if conv else (r, inp), generator=g)
    b = torch.randn((out, r, 1, 1) if conv else (out, r), generator=g)
    m = torch.randn(r, r, generator=g) if mixer else None
    return LayerFactors(a, b, m, scale)


def _sd15_state(r: int = 4, alpha: float = 6.0, rslora: bool = False) -> AdapterState:
    scale = alpha / (math.sqrt(r) if rslora else r)
    unet = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": _layer(64, 64, r, scale, seed=1),
        "down_blocks.1.attentions.0.proj_in": _layer(64, 64, r, scale, conv=True, seed=2),
    }
    te = {"text_model.encoder.layers.0.self_attn.q_proj": _layer(32, 32, r, scale, seed=3)}
    return AdapterState(
        {
            "unet": ComponentAdapter(_moslora_config(r, alpha, use_rslora=rslora), unet),
            "text_encoder": ComponentAdapter(_moslora_config(r, alpha, use_rslora=rslora), te),
        },
        family="sd15",
        base_model="tiny/sd15",
    )


def _deltas(state: AdapterState) -> dict[str, torch.Tensor]:
    """Delta weights keyed by component and module name with dots as underscores (comparable with kohya)."""
    return {f"{c}:{p.replace('.', '_')}": layer.delta_weight() for c, p, layer in state.layer_items()}


def _assert_same_deltas(a: AdapterState, b: AdapterState, atol: float = 1e-5) -> None:
    da, db = _deltas(a), _deltas(b)
    assert da.keys() == db.keys()
    for key in da:
        torch.testing.assert_close(da[key], db[key], atol=atol, rtol=1e-5, msg=key)


# ------------------------------------------------------------------------------------------------
# Round trips through the three files


@pytest.mark.parametrize("rslora", [False, True])
def test_native_folded_kohya_files_agree(tmp_path, rslora):
    state = _sd15_state(rslora=rslora)
    paths = write_adapter_files(state, tmp_path)
    assert {p.name for p in paths.values()} == {NATIVE_WEIGHT_NAME, DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME}
    native = read_adapter_file(paths["native"])
    folded = read_adapter_file(paths["diffusers"])
    kohya = read_adapter_file(paths["kohya"])
    # SD1/SD2/SDXL's diffusers file holds kohya keys (Family.diffusers_file_layout): ComfyUI reads it too.
    assert (native.source_format, folded.source_format, kohya.source_format) == ("native", "kohya", "kohya")
    assert native.has_mixer and not folded.has_mixer and not kohya.has_mixer
    for other in (native, folded, kohya):
        _assert_same_deltas(state, other)
    assert native.family == folded.family == kohya.family == "sd15"
    assert native.components["unet"].config == state.components["unet"].config


def test_native_header_is_versioned_and_complete():
    _, metadata = native_state_dict(_sd15_state())
    header = json.loads(metadata[NATIVE_HEADER_KEY])
    assert header["format_version"] == FORMAT_VERSION
    assert header["family"] == "sd15" and header["base_model"] == "tiny/sd15"
    assert header["library"] == "moslora-diffusion" and header["library_version"]
    unet = header["components"]["unet"]
    for name in ("r", "lora_alpha", "use_rslora", "mixer_init", "train_mixer", "target_modules"):
        assert name in unet


def test_kohya_alpha_is_one_value_per_component_and_every_delta_survives(tmp_path):
    """Under rsLoRA a rank-2 module's s r differs from the rank-4 ones': it keeps the component's alpha and
    carries the ratio in lora_up (diffusers' kohya reader applies an odd text-encoder alpha to no module)."""
    state = _sd15_state(r=4, alpha=6.0, rslora=True)
    odd = _layer(32, 32, 2, 6.0 / math.sqrt(2), seed=4)
    state.components["text_encoder"].layers["text_model.encoder.layers.0.self_attn.k_proj"] = odd
    tensors, _ = kohya_state_dict(state)
    for prefix in ("lora_unet_", "lora_te_"):
        alphas = {float(v) for k, v in tensors.items() if k.startswith(prefix) and k.endswith(".alpha")}
        assert len(alphas) == 1 and alphas.pop() == pytest.approx(6.0 * 2)  # s r = alpha sqrt(r) at rank 4
    file = tmp_path / KOHYA_WEIGHT_NAME
    save_file(tensors, str(file))
    _assert_same_deltas(state, read_adapter_file(file))


def test_folded_metadata_holds_plain_lora_config_fields_only():
    tensors, metadata = diffusers_state_dict(_sd15_state(r=4, alpha=6.0))
    assert not any("mixer" in k for k in tensors)
    lora_metadata = json.loads(metadata["lora_adapter_metadata"])
    for component in ("unet", "text_encoder"):
        fields = {k.removeprefix(component + "."): v for k, v in lora_metadata.items() if k.startswith(component + ".")}
        assert fields["r"] == 4 and fields["lora_alpha"] == 6.0  # alpha != r survives
        assert not {"mixer_init", "train_mixer", "use_moslora", "target_preset"} & fields.keys()
        LoraConfig(**fields)  # what stock load_lora_weights does with it


def test_kohya_file_has_one_alpha_per_module_and_a_lora_card():
    tensors, metadata = kohya_state_dict(_sd15_state(r=4, alpha=6.0), title="my lora")
    stems = {k.rsplit(".lora_down.weight", 1)[0] for k in tensors if k.endswith(".lora_down.weight")}
    assert stems == {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_1_attentions_0_proj_in",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    }
    for stem in stems:
        assert tensors[f"{stem}.alpha"].item() == pytest.approx(6.0)
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "4" and float(metadata["ss_network_alpha"]) == 6.0
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.title"] == "my lora"
    assert "MoSLoRA" in metadata["ss_training_comment"]


@pytest.mark.parametrize(
    "family, components, expected_prefixes",
    [
        ("sdxl", ("unet", "text_encoder", "text_encoder_2"), {"lora_unet_", "lora_te1_", "lora_te2_"}),
        ("sd3", ("transformer", "text_encoder", "text_encoder_2"), {"lora_transformer_", "lora_te1_", "lora_te2_"}),
        ("flux", ("transformer", "text_encoder", "text_encoder_2"), {"lora_transformer_", "lora_te1_", "lora_te2_"}),
    ],
)
def test_kohya_prefixes_per_family(family, components, expected_prefixes):
    state = AdapterState(
        {c: ComponentAdapter(_moslora_config(2, 2), {"block.proj": _layer(8, 8, 2, 1.0)}) for c in components},
        family=family,
    )
    tensors, _ = kohya_state_dict(state)
    prefixes = {k.split("block_proj")[0] for k in tensors}
    assert prefixes == expected_prefixes


def test_layer_scales_that_differ_within_a_component_are_folded_exactly(tmp_path):
    state = _sd15_state()
    layer = state.components["unet"].layers["down_blocks.1.attentions.0.proj_in"]
    layer.scale *= 3.0  # as a kohya file with per-module alphas can have
    folded = read_adapter_file(write_adapter_files(state, tmp_path, ("diffusers",))["diffusers"])
    _assert_same_deltas(state, folded)
    kohya = read_adapter_file(write_adapter_files(state, tmp_path, ("kohya",))["kohya"])
    _assert_same_deltas(state, kohya)


def test_as_moslora_state_keeps_every_delta():
    state = _sd15_state()
    state.components["unet"].layers["down_blocks.1.attentions.0.proj_in"].scale *= 0.5
    for layer in state.components["text_encoder"].layers.values():
        layer.mixer = None
    converted = as_moslora_state(state)
    _assert_same_deltas(state, converted)
    assert all(layer.mixer is not None for _, _, layer in converted.layer_items())


# ------------------------------------------------------------------------------------------------
# Resize


def test_resize_to_full_rank_is_lossless(tmp_path):
    state = _sd15_state(r=4)
    resized, report = resize_adapter(state, 4)
    _assert_same_deltas(state, resized, atol=1e-4)
    assert all(e == pytest.approx(1.0) for e in report.energy.values())
    # and it still writes and reads back as a native adapter with an identity mixer
    reread = read_adapter_file(write_adapter_files(resized, tmp_path)["native"])
    _assert_same_deltas(state, reread, atol=1e-4)
    for _, _, layer in reread.layer_items():
        torch.testing.assert_close(layer.mixer, torch.eye(4))


def test_resize_reports_the_energy_of_a_constructed_case():
    # s B M A with orthonormal A and B and M = diag(3, 2, 1): singular values 3s, 2s, s.
    r, scale = 3, 2.0
    a = torch.eye(r, 5)
    b = torch.eye(6, r)
    layer = LayerFactors(a, b, torch.diag(torch.tensor([3.0, 2.0, 1.0])), scale)
    state = AdapterState({"unet": ComponentAdapter(_moslora_config(r, r * scale), {"x.to_q": layer})}, family="sd15")
    resized, report = resize_adapter(state, 2)
    assert report.energy["unet.x.to_q"] == pytest.approx((9 + 4) / (9 + 4 + 1))
    assert report.singular_values["unet.x.to_q"] == pytest.approx([6.0, 4.0, 2.0])
    new = resized.components["unet"].layers["x.to_q"]
    assert new.rank == 2
    expected = scale * b @ torch.diag(torch.tensor([3.0, 2.0, 0.0])) @ a
    torch.testing.assert_close(new.delta_weight().float(), expected, atol=1e-5, rtol=0)


def test_resize_never_grows():
    with pytest.raises(ValueError, match="only shrinks"):
        resize_adapter(_sd15_state(r=4), 8)


def test_mixer_statistics_of_identity():
    stats = mixer_statistics(torch.eye(4))
    assert stats["distance_from_identity"] == pytest.approx(0.0)
    assert stats["singular_values"] == pytest.approx([1.0] * 4)
    assert stats["condition"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------
# Detection and validation


def test_detect_format():
    native, meta = native_state_dict(_sd15_state())
    assert detect_format(native, meta) == "native"
    folded, meta = diffusers_state_dict(_sd15_state())
    assert detect_format(folded, meta) == "diffusers"
    kohya, meta = kohya_state_dict(_sd15_state())
    assert detect_format(kohya, meta) == "kohya"
    with pytest.raises(ValueError, match="mixes kohya"):
        detect_format({**folded, **kohya}, {})


def _valid_native():
    tensors, _ = native_state_dict(_sd15_state())
    return dict(tensors)


Q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.mark.parametrize(
    "corrupt, offending, message",
    [
        (lambda t: t.__setitem__(f"{Q}.lora_B.weight", torch.full((64, 4), float("nan"))), f"{Q}.lora_B.weight", "NaN"),
        (
            lambda t: t.__setitem__(f"{Q}.lora_mixer.weight", torch.zeros(5, 5)),
            f"{Q}.lora_mixer.weight",
            "mixer must be 4 x 4",
        ),
        (lambda t: t.__setitem__(f"{Q}.lora_B.weight", torch.zeros(64, 3)), f"{Q}.lora_B.weight", "must share r"),
        (lambda t: t.pop(f"{Q}.lora_B.weight"), f"{Q}.lora_A.weight", "no up"),
        (
            lambda t: t.__setitem__(f"{Q}.lora_A.weight", torch.zeros(4, 64, dtype=torch.int64)),
            f"{Q}.lora_A.weight",
            "dtype",
        ),
        (lambda t: t.__setitem__("unet.something.weight", torch.zeros(2)), "unet.something.weight", "unexpected key"),
    ],
)
def test_bad_state_dicts_name_the_file_and_the_first_offending_key(corrupt, offending, message):
    tensors = _valid_native()
    corrupt(tensors)
    with pytest.raises(ValueError) as info:
        validate_adapter_state_dict(tensors, "some/adapter.safetensors")
    text = str(info.value)
    assert text.startswith("some/adapter.safetensors: ")
    assert repr(offending) in text
    assert message in text


def test_unreadable_files_name_the_file(tmp_path):
    good = write_adapter_files(_sd15_state(), tmp_path / "good", ("native",))["native"]
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    for path in (truncated, garbage):
        with pytest.raises(ValueError, match=str(path)):
            read_adapter_file(path)


class _TouchOnUnpickle:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["adapter.bin", "adapter.ckpt", "adapter.safetensors"])
def test_pickles_are_never_unpickled(tmp_path, name):
    marker = tmp_path / "unpickled"
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"x.lora_A.weight": _TouchOnUnpickle(marker)}))
    with pytest.raises(ValueError, match=str(path)):
        read_adapter_file(path)
    assert not marker.exists()


def test_future_native_versions_are_refused(tmp_path):
    tensors, metadata = native_state_dict(_sd15_state())
    header = json.loads(metadata[NATIVE_HEADER_KEY])
    header["format_version"] = FORMAT_VERSION + 1
    path = tmp_path / NATIVE_WEIGHT_NAME
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={NATIVE_HEADER_KEY: json.dumps(header)}
    )
    with pytest.raises(ValueError, match="upgrade moslora-diffusion"):
        read_adapter_file(path)


def test_find_adapter_file_prefers_native_and_honours_weight_name(tmp_path):
    write_adapter_files(_sd15_state(), tmp_path)
    assert find_adapter_file(tmp_path).name == NATIVE_WEIGHT_NAME
    assert find_adapter_file(tmp_path, KOHYA_WEIGHT_NAME).name == KOHYA_WEIGHT_NAME
    with pytest.raises(FileNotFoundError):
        find_adapter_file(tmp_path / "missing")
