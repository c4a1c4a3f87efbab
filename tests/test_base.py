"""The shared base model: loading, detection, freezing/placement, shared pipelines, and clear load errors."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from adapt.base import BaseModel, detect_family
from adapt.config import BaseConfig
from adapt.errors import ModelLoadError


@pytest.fixture(scope="module")
def base(tiny_base_dir):
    return BaseModel.load(str(tiny_base_dir))


def load_error(cfg) -> str:
    with pytest.raises(ModelLoadError) as info:
        BaseModel.load(cfg)
    return str(info.value)


def copy_base(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("_tok"))
    return dst


# ---- what the loaded base knows about itself ----------------------------------------------------------
def test_load_from_folder_exposes_components_and_facts(base, tiny_base_dir):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    assert isinstance(base.unet, UNet2DConditionModel) and isinstance(base.vae, AutoencoderKL)
    assert isinstance(base.noise_scheduler, DDPMScheduler)  # training always uses the DDPM formulation
    assert base.source == str(tiny_base_dir)
    assert base.family == "custom"  # cross_attention_dim 32 is none of SD1/SD2/SDXL
    assert base.prediction_type == "epsilon"
    assert base.vae_scale_factor == 2 and base.latent_channels == 4 and base.sample_size == 32
    assert base.scaling_factor == pytest.approx(base.vae.config.scaling_factor)
    info = base.describe()
    assert info["prediction_type"] == "epsilon" and info["resolution"] == 32 and len(info["fingerprint"]) == 16


def test_v_prediction_is_detected(tiny_base_dir_v, base):
    v = BaseModel.load(BaseConfig(path=str(tiny_base_dir_v)))
    assert v.prediction_type == "v_prediction"
    assert v.fingerprint == base.fingerprint  # same architecture -> adapters are interchangeable


@pytest.mark.parametrize("config,family", [
    (dict(cross_attention_dim=768), "sd1"),
    (dict(cross_attention_dim=1024), "sd2"),
    (dict(cross_attention_dim=[1024, 1024]), "sd2"),
    (dict(cross_attention_dim=2048, addition_embed_type="text_time"), "sdxl"),
    (dict(cross_attention_dim=32), "custom"),
])
def test_detect_family_from_unet_config(config, family):
    assert detect_family(SimpleNamespace(**{"addition_embed_type": None, **config})) == family


def test_components_are_frozen_and_in_eval_mode(base):
    for module in (base.unet, base.vae, base.text_encoder):
        assert not any(p.requires_grad for p in module.parameters())
        assert not module.training


def test_encoders_give_expected_shapes(base):
    ids = base.tokenize(["a red square"])
    assert ids.shape == (1, base.tokenizer.model_max_length)
    hidden = base.encode_prompt(["a red square", "a blue circle"])
    assert hidden.shape == (2, 16, base.unet.config.cross_attention_dim)
    pixels = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        latents = base.encode_images(pixels)
        assert latents.shape == (1, 4, 16, 16)
        assert base.decode_latents(latents).shape == (1, 3, 32, 32)


# ---- placement ----------------------------------------------------------------------------
@pytest.mark.parametrize("name,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_load_with_dtype_places_frozen_weights(tiny_base_dir, name, dtype):
    b = BaseModel.load(BaseConfig(path=str(tiny_base_dir), dtype=name))
    assert b.dtype == dtype and b.device == torch.device("cpu")
    for module in (b.unet, b.vae, b.text_encoder):
        assert {p.dtype for p in module.parameters()} == {dtype}
        assert not any(p.requires_grad for p in module.parameters())


def test_place_keeps_trainable_weights_in_fp32(tiny_base_dir):
    b = BaseModel.load(str(tiny_base_dir))
    trainable = b.unet.conv_out.weight
    trainable.requires_grad_(True)
    b.place("cpu", torch.bfloat16)
    assert trainable.dtype == torch.float32 and trainable.requires_grad
    assert b.unet.conv_in.weight.dtype == torch.bfloat16


def test_explicit_dtype_argument_wins(tiny_base_dir):
    b = BaseModel.load(BaseConfig(path=str(tiny_base_dir), dtype="fp32"), dtype="bf16")
    assert b.unet.conv_in.weight.dtype == torch.bfloat16


# ---- pipelines share the components -------------------------------------------------------------------
def test_pipeline_shares_component_objects(base):
    pipe = base.pipeline()
    assert pipe.unet is base.unet and pipe.vae is base.vae
    assert pipe.text_encoder is base.text_encoder and pipe.tokenizer is base.tokenizer
    assert pipe.unet.conv_in.weight.data_ptr() == base.unet.conv_in.weight.data_ptr()
    other = base.pipeline()
    assert other.unet is pipe.unet
    # The sampler is its own object: changing it never changes the training scheduler.
    assert pipe.scheduler is not base.noise_scheduler
    assert pipe.scheduler.config.prediction_type == base.prediction_type


def test_pipeline_accepts_replacement_components(base):
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler.from_config(base.noise_scheduler.config)
    pipe = base.pipeline(scheduler=sched)
    assert pipe.scheduler is sched and pipe.unet is base.unet


# ---- load errors name the culprit ----------------------------------------------------------------
def test_missing_path(tmp_path):
    missing = tmp_path / "no_such_model"
    msg = load_error(BaseConfig(path=str(missing)))
    assert str(missing) in msg and "no such file or folder" in msg


def test_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    msg = load_error(BaseConfig(path=str(tmp_path)))
    assert str(tmp_path) in msg and "model_index.json" in msg


@pytest.mark.parametrize("missing", ["unet/config.json", "vae/config.json", "text_encoder/config.json",
                                     "scheduler/scheduler_config.json"])
def test_folder_missing_a_component_config(tiny_base_dir, tmp_path, missing):
    folder = copy_base(tiny_base_dir, tmp_path / "model")
    (folder / missing).unlink()
    msg = load_error(BaseConfig(path=str(folder)))
    assert str(folder) in msg and f"missing {missing}" in msg


def test_folder_missing_tokenizer(tiny_base_dir, tmp_path):
    folder = copy_base(tiny_base_dir, tmp_path / "model")
    shutil.rmtree(folder / "tokenizer")
    assert "tokenizer" in load_error(BaseConfig(path=str(folder)))


def test_folder_with_only_pickle_weights_needs_allow_pickle(tiny_base_dir, tmp_path):
    from safetensors.torch import load_file

    folder = copy_base(tiny_base_dir, tmp_path / "model")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    msg = load_error(BaseConfig(path=str(folder)))
    assert str(folder) in msg and "allow_pickle" in msg
    b = BaseModel.load(BaseConfig(path=str(folder), allow_pickle=True))
    assert b.unet.conv_in.weight.shape[0] == 32


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt"])
def test_pickle_checkpoint_refused_unless_allowed(tmp_path, suffix):
    ckpt = tmp_path / f"model{suffix}"
    ckpt.write_bytes(b"not really a pickle")
    msg = load_error(BaseConfig(path=str(ckpt)))
    assert str(ckpt) in msg and "pickle" in msg and "allow_pickle" in msg and ".safetensors" in msg
    # Allowed: the refusal is gone; this junk file then fails as an unreadable checkpoint instead.
    msg = load_error(BaseConfig(path=str(ckpt), allow_pickle=True))
    assert "refusing" not in msg and str(ckpt) in msg


def test_unknown_file_type(tmp_path):
    weird = tmp_path / "model.onnx"
    weird.write_bytes(b"\0")
    msg = load_error(BaseConfig(path=str(weird)))
    assert str(weird) in msg and ".safetensors" in msg


def test_hub_id_offline_fails_fast_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    msg = load_error(BaseConfig(path="some-org/some-model"))
    assert time.monotonic() - start < 30  # a guard against a hanging network attempt, not a benchmark
    assert "some-org/some-model" in msg and "local diffusers folder" in msg and "HF_HOME" in msg
    assert "no local folder" in msg  # a mistyped relative path looks like a hub id: say both were tried


def test_sdxl_unet_is_refused_before_loading_weights(tiny_base_dir, tmp_path):
    folder = copy_base(tiny_base_dir, tmp_path / "sdxl_like")
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=8 * 6 + 32)
    config_path.write_text(json.dumps(config))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"corrupt: must never be read")
    msg = load_error(BaseConfig(path=str(folder)))
    assert str(folder) in msg and "SDXL" in msg and "not supported" in msg


def test_sdxl_model_index_is_refused(tiny_base_dir, tmp_path):
    folder = copy_base(tiny_base_dir, tmp_path / "sdxl_index")
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    (folder / "model_index.json").write_text(json.dumps(index))
    assert "SDXL" in load_error(BaseConfig(path=str(folder)))
