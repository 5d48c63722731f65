"""The offline tiny pipelines of moslora_diffusion.testing: deterministic, loadable, seeded."""

import numpy as np
import pytest
import torch
from family_sets import ALL_FAMILIES as FAMILIES
from PIL import Image

from moslora_diffusion.testing import (
    default_tiny_resolution,
    make_test_images,
    make_tiny_pipeline,
    save_tiny_pipeline,
    tiny_pipeline_kwargs,
)

PROMPT = "a photo of a red Cat, 42!"


@pytest.fixture(autouse=True, scope="module")
def _few_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _images(pipe, family):
    return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **tiny_pipeline_kwargs(family)).images


def _modules(pipe):
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def _tokenizers(pipe):
    return {name: c for name, c in pipe.components.items() if name.startswith("tokenizer") and c is not None}


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        sa, sb = a[name].state_dict(), b[name].state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"


@pytest.mark.parametrize("family", FAMILIES)
def test_inference_is_deterministic(family):
    pipe = make_tiny_pipeline(family)
    first, second = _images(pipe, family), _images(pipe, family)
    res = default_tiny_resolution(family)
    assert first.shape == (1, res, res, 3)
    assert np.isfinite(first).all()
    assert first.std() > 0
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_round_trip(family, tmp_path):
    from diffusers import DiffusionPipeline

    pipe = make_tiny_pipeline(family)
    save_tiny_pipeline(family, tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)

    assert type(loaded) is type(pipe)
    _assert_same_weights(_modules(pipe), _modules(loaded))

    def public(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    assert public(loaded.scheduler.config) == public(pipe.scheduler.config)
    for name, tokenizer in _tokenizers(pipe).items():
        reloaded = getattr(loaded, name)
        assert reloaded.model_max_length == tokenizer.model_max_length
        kwargs = dict(padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
        assert reloaded(PROMPT, **kwargs).input_ids == tokenizer(PROMPT, **kwargs).input_ids
    # Bit-identical weights; safetensors' memory-mapped tensors can take other CPU kernels (seen on
    # flux: 4e-7), so the images are compared to float noise.
    np.testing.assert_allclose(_images(loaded, family), _images(pipe, family), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_seed_fixes_the_weights(family):
    first, second, other = (_modules(make_tiny_pipeline(family, seed=s)) for s in (0, 0, 1))
    _assert_same_weights(first, second)
    for name, module in first.items():
        weights = torch.cat([p.detach().flatten() for p in module.parameters()])
        others = torch.cat([p.detach().flatten() for p in other[name].parameters()])
        assert weights.std() > 0, name
        assert not torch.equal(weights, others), name


def test_seeding_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_pipeline("sd15", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_family_specifics():
    from diffusers import (
        FluxPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    sd15, sd2 = make_tiny_pipeline("sd15"), make_tiny_pipeline("sd2")
    assert isinstance(sd15, StableDiffusionPipeline) and isinstance(sd2, StableDiffusionPipeline)
    assert sd15.scheduler.config.prediction_type == "epsilon"
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    assert sd2.unet.config.use_linear_projection and not sd15.unet.config.use_linear_projection

    sdxl = make_tiny_pipeline("sdxl")
    assert isinstance(sdxl, StableDiffusionXLPipeline)
    assert sdxl.unet.config.addition_embed_type == "text_time"
    assert type(sdxl.text_encoder_2).__name__ == "CLIPTextModelWithProjection"

    sd3, flux = make_tiny_pipeline("sd3"), make_tiny_pipeline("flux")
    assert isinstance(sd3, StableDiffusion3Pipeline) and isinstance(flux, FluxPipeline)
    assert sd3.vae.config.latent_channels == flux.vae.config.latent_channels == 16
    assert type(flux.text_encoder_2).__name__ == "T5EncoderModel"

    # SD3 also runs without its T5 encoder, as many trainers load it.
    sd3.text_encoder_3 = sd3.tokenizer_3 = None
    assert np.isfinite(_images(sd3, "sd3")).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_dtype(dtype):
    pipe = make_tiny_pipeline("sd15", torch_dtype=dtype)
    assert {p.dtype for m in _modules(pipe).values() for p in m.parameters()} == {dtype}


def test_make_test_images(tmp_path):
    paths = make_test_images(tmp_path / "images", n=3, size=48, seed=5)
    assert len(paths) == 3 and all(p.suffix == ".png" and p.exists() for p in paths)
    arrays = [np.asarray(Image.open(p)) for p in paths]
    assert all(a.shape == (48, 48, 3) for a in arrays)
    assert all(len(np.unique(a.reshape(-1, 3), axis=0)) > 1 for a in arrays)  # a shape on a background
    assert not np.array_equal(arrays[0], arrays[1])
    again = make_test_images(tmp_path / "again", n=3, size=48, seed=5)
    assert all(np.array_equal(np.asarray(Image.open(p)), a) for p, a in zip(again, arrays))


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown family"):
        make_tiny_pipeline("sd1")


def test_testing_is_the_public_name_of_the_tiny_module_and_knows_every_family():
    from moslora_diffusion import families, testing, tiny

    assert testing.FAMILIES == tuple(families.FAMILIES)  # one list of families: families.FAMILIES
    assert (
        testing.make_tiny_pipeline is tiny.make_tiny_pipeline and testing.save_tiny_pipeline is tiny.save_tiny_pipeline
    )
