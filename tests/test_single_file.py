"""Single-file (original LDM / A1111) checkpoints: our diffusers -> LDM writer, and loading them back.

The writer is checked three ways: against key names every SD1.5 file has, against diffusers' own
LDM -> diffusers converters (our output must invert to the exact original weights), and end to end
through `BaseModel.load` (diffusers' `from_single_file` with a local config folder).
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapt.base import BaseModel
from adapt.config import BaseConfig
from adapt.errors import ModelLoadError
from adapt.export.ldm import (TEXT_ENCODER_PREFIX, UNET_PREFIX, VAE_PREFIX, diffusers_to_ldm_state_dict,
                              save_single_file, unet_to_ldm, vae_to_ldm)


@pytest.fixture(scope="module")
def folder_base(tiny_base_dir):
    return BaseModel.load(str(tiny_base_dir))


@pytest.fixture(scope="module")
def single_file(folder_base, tmp_path_factory):
    return save_single_file(folder_base, tmp_path_factory.mktemp("single") / "tiny.safetensors")


def sd15_shaped_unet_and_vae():
    """SD1.5's block layout (4 levels, 2 layers per block) with tiny channel counts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=(8, 16, 32, 32), norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=16, attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=(4, 8, 16, 16), layers_per_block=2, norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    return unet, vae


def assert_same_state(expected: dict, got: dict):
    assert set(expected) == set(got)
    for key, value in expected.items():
        assert got[key].shape == value.shape, key
        assert torch.equal(got[key].to(value.dtype), value), key


# ---- the key layout -------------------------------------------------------------------------------
def test_state_dict_has_the_three_prefixes_and_no_collisions(folder_base):
    state = diffusers_to_ldm_state_dict(folder_base.unet, folder_base.vae, folder_base.text_encoder)
    n = sum(len(m.state_dict()) for m in (folder_base.unet, folder_base.vae, folder_base.text_encoder))
    assert len(state) == n  # every tensor kept, none renamed onto another
    assert all(k.startswith((UNET_PREFIX, VAE_PREFIX, TEXT_ENCODER_PREFIX)) for k in state)
    # The key diffusers checks to recognise an SD1-style CLIP text encoder.
    assert TEXT_ENCODER_PREFIX + "text_model.embeddings.position_embedding.weight" in state
    # Tiny layout: input_blocks 1 (res+attn), 2 (downsample), 3 (res); VAE attention as 1x1 convs.
    assert UNET_PREFIX + "input_blocks.2.0.op.weight" in state
    assert UNET_PREFIX + "output_blocks.1.1.conv.weight" in state  # upsampler after a plain UpBlock2D
    assert state[VAE_PREFIX + "encoder.mid.attn_1.q.weight"].ndim == 4


def test_sd15_layout_matches_known_checkpoint_keys():
    unet, vae = sd15_shaped_unet_and_vae()
    keys = set(unet_to_ldm(unet)) | set(vae_to_ldm(vae))
    known = ["input_blocks.1.1.proj_in.weight", "input_blocks.3.0.op.weight", "input_blocks.9.0.op.weight",
             "input_blocks.11.0.out_layers.3.weight", "input_blocks.4.0.skip_connection.weight",
             "middle_block.0.in_layers.0.weight", "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
             "middle_block.2.emb_layers.1.weight", "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
             "output_blocks.8.2.conv.weight", "output_blocks.11.0.skip_connection.weight",
             "output_blocks.11.1.proj_out.weight", "time_embed.0.weight", "out.2.bias"]
    for key in known:
        assert UNET_PREFIX + key in keys, key
    assert UNET_PREFIX + "input_blocks.12.0.op.weight" not in keys  # no downsampler after the last level
    for key in ["encoder.down.0.block.1.conv2.weight", "encoder.down.2.downsample.conv.weight",
                "encoder.down.1.block.0.nin_shortcut.weight", "encoder.mid.block_2.norm1.weight",
                "encoder.mid.attn_1.proj_out.weight", "encoder.norm_out.weight", "decoder.up.3.upsample.conv.weight",
                "decoder.up.0.block.2.conv1.weight", "decoder.up.0.block.0.nin_shortcut.weight", "quant_conv.weight"]:
        assert VAE_PREFIX + key in keys, key
    assert VAE_PREFIX + "encoder.down.3.downsample.conv.weight" not in keys
    assert VAE_PREFIX + "decoder.up.0.upsample.conv.weight" not in keys


@pytest.mark.parametrize("layout", ["tiny", "sd15"])
def test_diffusers_converters_invert_our_layout_exactly(folder_base, layout):
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     infer_diffusers_model_type)

    unet, vae = (folder_base.unet, folder_base.vae) if layout == "tiny" else sd15_shaped_unet_and_vae()
    state = {**unet_to_ldm(unet), **vae_to_ldm(vae)}
    assert_same_state(unet.state_dict(), convert_ldm_unet_checkpoint(state, dict(unet.config)))
    assert_same_state(vae.state_dict(), convert_ldm_vae_checkpoint(state, dict(vae.config)))
    if layout == "sd15":
        assert infer_diffusers_model_type(state) == "v1"  # diffusers recognises it as an SD1 checkpoint


def test_non_sd1_unet_is_refused():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=4 * 6 + 16)
    with pytest.raises(ValueError, match="SD1/SD2"):
        unet_to_ldm(unet)


# ---- the file ------------------------------------------------------------------------------------
def test_save_writes_safetensors_in_the_requested_dtype(folder_base, tmp_path):
    path = save_single_file(folder_base.pipeline(), tmp_path / "half.safetensors", dtype=torch.float16)
    assert not list(tmp_path.glob("*.tmp"))
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["format"] == "pt"
        assert f.get_tensor(UNET_PREFIX + "input_blocks.0.0.weight").dtype == torch.float16
        assert len(list(f.keys())) > 300


def test_save_refuses_other_suffixes(folder_base, tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        save_single_file(folder_base, tmp_path / "model.ckpt")


# ---- loading it back through adapt.base -------------------------------------------------------------
def test_single_file_reproduces_the_folder(folder_base, single_file, tiny_base_dir):
    from adapt.infer import generate

    loaded = BaseModel.load(BaseConfig(path=str(single_file), config_dir=str(tiny_base_dir)))
    for name in ("unet", "vae", "text_encoder"):
        assert_same_state(getattr(folder_base, name).state_dict(), getattr(loaded, name).state_dict())
    assert loaded.prediction_type == folder_base.prediction_type and loaded.fingerprint == folder_base.fingerprint
    a, = generate(folder_base.pipeline(), ["a red square"], [11], steps=2)
    b, = generate(loaded.pipeline(), ["a red square"], [11], steps=2)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_prediction_type_comes_from_the_config_folder(single_file, tiny_base_dir_v):
    loaded = BaseModel.load(BaseConfig(path=str(single_file), config_dir=str(tiny_base_dir_v)))
    assert loaded.prediction_type == "v_prediction"


def test_pickle_ckpt_loads_only_when_allowed(folder_base, tiny_base_dir, tmp_path):
    state = diffusers_to_ldm_state_dict(folder_base.unet, folder_base.vae, folder_base.text_encoder)
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": state}, ckpt)
    with pytest.raises(ModelLoadError, match="refusing to load a pickle"):
        BaseModel.load(BaseConfig(path=str(ckpt), config_dir=str(tiny_base_dir)))
    loaded = BaseModel.load(BaseConfig(path=str(ckpt), config_dir=str(tiny_base_dir), allow_pickle=True))
    assert torch.equal(loaded.unet.conv_in.weight, folder_base.unet.conv_in.weight)


def test_offline_without_config_dir_fails_fast_and_says_what_to_pass(single_file):
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        BaseModel.load(BaseConfig(path=str(single_file)))
    assert time.monotonic() - start < 30  # a guard against a network attempt, not a benchmark
    msg = str(info.value)
    assert str(single_file) in msg and "base.config_dir" in msg


def test_file_that_is_not_a_checkpoint(tmp_path, tiny_base_dir):
    junk = tmp_path / "junk.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(junk))
    with pytest.raises(ModelLoadError) as info:
        BaseModel.load(BaseConfig(path=str(junk), config_dir=str(tiny_base_dir)))
    assert str(junk) in str(info.value)


def test_cli_sample_from_single_file_matches_the_folder(single_file, tiny_base_dir, tmp_path, capsys):
    from adapt.cli import main

    common = ["--prompt", "a red square", "--seed", "4", "--steps", "2", "--device", "cpu"]
    assert main(["sample", "--base", str(tiny_base_dir), *common, "--out", str(tmp_path / "folder.png")]) == 0
    assert main(["sample", "--base", str(single_file), "--config-dir", str(tiny_base_dir), *common,
                 "--out", str(tmp_path / "file.png")]) == 0
    assert (tmp_path / "folder.png").read_bytes() == (tmp_path / "file.png").read_bytes()
    capsys.readouterr()
    assert main(["sample", "--base", str(single_file), *common, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "--config-dir" in err and "Traceback" not in err
