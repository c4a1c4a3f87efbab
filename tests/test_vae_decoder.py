"""The vae_decoder recipe: frozen encoder, decoder that learns, plain-diffusers artifact, clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapt.base import BaseModel
from adapt.config import load_config
from adapt.errors import ConfigError, ModelLoadError
from adapt.infer import attach, generate
from adapt.recipes.vae_decoder import (VAEDecoder, check_latent_layout, evaluate_decoder, guard_decode,
                                       load_vae_folder, ssim_torch)
from adapt.testing import make_image_folder
from adapt.train.trainer import train

PROMPT = "a red square"


def _raw(base_dir, folder, tmp, **section):
    return {"recipe": "vae_decoder", "base": {"path": str(base_dir)},
            # 48px images, random 32px crops: training never sees a whole image, evaluation does.
            "data": {"dataset": str(folder), "resolution": 48, "center_crop": False, "cache_dir": str(tmp / "cache"),
                     "cache_text_embeddings": False},
            "train": {"steps": 8, "batch_size": 2, "lr": 3e-3, "checkpoint_every": 100, "seed": 1},
            "output_dir": str(tmp / "run"), "vae_decoder": {"crop_size": 32, **section}}


@pytest.fixture(scope="module")
def trained(tiny_base_dir, tmp_path_factory):
    """One short CPU training on the fixture, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("vae_decoder")
    folder = make_image_folder(tmp / "photos", n=6, size=48)
    cfg = load_config(None, [], raw=_raw(tiny_base_dir, folder, tmp, eval_dataset=str(folder)))
    seen = {}
    run_dir = train(cfg, callbacks=[lambda t: seen.setdefault("trainer", t)], runs_root=tmp / "runs")
    return run_dir, seen["trainer"], folder


def _encoder_keys(sd):
    return {k: v for k, v in sd.items() if k.startswith(("encoder.", "quant_conv."))}


def test_encoder_bit_identical_decoder_changed(trained, tiny_base_dir):
    run_dir, trainer, _ = trained
    reference = BaseModel.load(str(tiny_base_dir)).vae.state_dict()
    live = trainer.base.vae.state_dict()
    saved = load_vae_folder(run_dir).state_dict()
    for name, sd in (("in memory", live), ("saved", saved)):
        for k, v in _encoder_keys(reference).items():
            assert torch.equal(sd[k].cpu(), v), f"{name} encoder weight {k} changed"
    changed = [k for k in reference if k.startswith("decoder.") and not torch.equal(saved[k], reference[k])]
    assert len(changed) > 10, "training did not change the decoder"
    assert not any(p.requires_grad for p in trainer.base.vae.encoder.parameters())


def test_reconstruction_improves_on_training_images(trained, tiny_base_dir):
    run_dir, _, folder = trained
    result = json.loads((run_dir / "decoder_eval.json").read_text())
    assert result["n"] == 6
    assert result["tuned"]["psnr"] > result["base"]["psnr"] + 1.0, result
    # Recomputed from the saved folder on full 48px images (training only saw random 32px crops).
    from adapt.recipes.vae_decoder import folder_images

    again = evaluate_decoder(BaseModel.load(str(tiny_base_dir)).vae, load_vae_folder(run_dir), folder_images(folder, 2))
    assert again["n"] == 2 and again["psnr_gain_db"] > 1.0, again


def test_tuned_folder_loads_in_plain_diffusers(trained, tiny_base_dir):
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    run_dir, _, _ = trained
    vae = AutoencoderKL.from_pretrained(str(run_dir), subfolder="vae")
    plain = StableDiffusionPipeline.from_pretrained(str(tiny_base_dir), vae=vae, safety_checker=None,
                                                    requires_safety_checker=False)
    ours = attach(BaseModel.load(str(tiny_base_dir)).pipeline(), run_dir, scale=1.0)
    a = np.asarray(generate(plain, [PROMPT], [5], steps=3)[0]).astype(int)
    b = np.asarray(generate(ours, [PROMPT], [5], steps=3)[0]).astype(int)
    assert np.abs(a - b).max() <= 1


def test_apply_scales(trained, tiny_base_dir):
    run_dir, _, _ = trained
    base = BaseModel.load(str(tiny_base_dir))
    pipe = base.pipeline()
    assert attach(pipe, run_dir, scale=0.0).vae is base.vae  # scale 0: the base VAE itself
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    def decode(scale):
        with torch.no_grad():
            return attach(base.pipeline(), run_dir, scale=scale).vae.decode(z).sample

    d0, d_half, d1 = decode(0.0), decode(0.5), decode(1.0)
    assert 0 < (d_half - d0).abs().mean() < (d1 - d0).abs().mean()
    tuned = load_vae_folder(run_dir).state_dict()
    half = attach(base.pipeline(), run_dir, scale=0.5).vae.state_dict()
    for k, v in base.vae.state_dict().items():
        if k.startswith(("decoder.", "post_quant_conv.")):
            torch.testing.assert_close(half[k], v + 0.5 * (tuned[k] - v))
        else:
            assert torch.equal(half[k], v)


def test_trainable_state_round_trip(trained, tiny_base_dir):
    _, trainer, _ = trained
    state = trainer.recipe.trainable_state_dict(trainer.base)
    assert state and all(k.startswith(("vae.decoder.", "vae.post_quant_conv.")) for k in state)
    fresh = BaseModel.load(str(tiny_base_dir))
    trainer.recipe.load_trainable_state_dict(fresh, state)
    for k, v in state.items():
        assert torch.equal(fresh.vae.state_dict()[k[4:]], v)


def test_crop_keeps_pixels_and_cached_latents_aligned():
    recipe = VAEDecoder.__new__(VAEDecoder)
    recipe.rc = VAEDecoder.Config(crop_size=8)
    recipe.objective = type("O", (), {"generator": torch.Generator().manual_seed(0)})()
    pixels = torch.randn(2, 3, 32, 32)
    latents = F.avg_pool2d(pixels, 4)  # a stand-in "encoder" with factor 4: latent cell = its 4x4 pixel block
    tops = set()
    for _ in range(6):
        crop, lat = recipe._crop(pixels, latents, 4)
        assert crop.shape[-2:] == (8, 8) and lat.shape[-2:] == (2, 2)
        torch.testing.assert_close(F.avg_pool2d(crop, 4), lat)
        tops.add(int((pixels[0, 0] == crop[0, 0, 0, 0]).nonzero()[0, 0]))
    assert len(tops) > 1, "crops are not random"


def test_ssim_torch_matches_metric_and_has_gradients():
    from adapt.world.metrics import ssim

    g = torch.Generator().manual_seed(0)
    x, noise = torch.rand(1, 3, 24, 24, generator=g), torch.randn(1, 3, 24, 24, generator=g)
    y = (x + 0.1 * noise).clamp(0, 1).requires_grad_(True)
    value = ssim_torch(x, y)
    expected = ssim(x[0].permute(1, 2, 0).numpy(), y[0].detach().permute(1, 2, 0).numpy())
    assert value.item() == pytest.approx(expected, abs=1e-4)
    assert ssim_torch(x, x).item() == pytest.approx(1.0, abs=1e-6)
    value.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_fp16_nan_decode_is_upcast_with_warning(tiny_base_dir):
    vae = load_vae_folder(tiny_base_dir).to(torch.bfloat16)
    real = vae.decode

    def flaky(z, *a, **k):  # what fp16 SD VAEs do on some latents: overflow to inf/NaN in reduced precision
        out = real(z, *a, **k)
        if vae.dtype != torch.float32:
            out.sample.fill_(float("nan"))
        return out

    vae.decode = flaky
    guard_decode(vae)
    with pytest.warns(RuntimeWarning, match="upcast to fp32"):
        out = vae.decode(torch.randn(1, 4, 8, 8, dtype=torch.float16)).sample
    assert torch.isfinite(out).all() and vae.dtype == torch.float32


def test_latent_layout_mismatch_names_both(tiny_base_dir, tmp_path):
    from diffusers import AutoencoderKL

    base_vae = load_vae_folder(tiny_base_dir)
    other = AutoencoderKL(latent_channels=8, block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, layers_per_block=1)
    other.save_pretrained(tmp_path / "other_vae")
    with pytest.raises(ModelLoadError, match=r"latent_channels: 4 in the base.*vs 8 in"):
        check_latent_layout(base_vae.config, other.config, "the base", "other")
    # as init_from: the recipe refuses before training
    folder = make_image_folder(tmp_path / "photos", n=2, size=48)
    cfg = load_config(None, [], raw=_raw(tiny_base_dir, folder, tmp_path, init_from=str(tmp_path / "other_vae")))
    base = BaseModel.load(str(tiny_base_dir))
    with pytest.raises(ModelLoadError, match=r"init_from.*latent_channels: 4 .* vs 8"):
        VAEDecoder(cfg).prepare(base)
    # as a run to apply: a run directory whose VAE has another layout
    (tmp_path / "run_x").mkdir()
    other.save_pretrained(tmp_path / "run_x" / "vae")
    with pytest.raises(ModelLoadError, match="different latent layout"):
        VAEDecoder.apply(base.pipeline(), tmp_path / "run_x", scale=1.0)


def test_lpips_without_local_weights_is_a_clear_error(tiny_base_dir, tmp_path):
    folder = make_image_folder(tmp_path / "photos", n=2, size=48)
    with pytest.raises(ConfigError, match="lpips_weights.*never downloaded"):
        load_config(None, [], raw=_raw(tiny_base_dir, folder, tmp_path, lpips_weight=0.1))
    with pytest.raises(ConfigError, match="no such file"):
        load_config(None, [], raw=_raw(tiny_base_dir, folder, tmp_path, lpips_weight=0.1,
                                       lpips_weights=str(tmp_path / "missing.pt")))


def test_lpips_from_local_torchscript_is_used(tiny_base_dir, tmp_path):
    class Distance(torch.nn.Module):  # stands in for an exported LPIPS network: f(x, y) -> per-image distance
        def forward(self, x, y):
            return (x - y).pow(2).mean(dim=(1, 2, 3))

    path = tmp_path / "lpips.pt"
    torch.jit.script(Distance()).save(str(path))
    folder = make_image_folder(tmp_path / "photos", n=2, size=48)
    cfg = load_config(None, [], raw=_raw(tiny_base_dir, folder, tmp_path, lpips_weight=0.5, lpips_weights=str(path)))
    base = BaseModel.load(str(tiny_base_dir))
    recipe = VAEDecoder(cfg)
    recipe.prepare(base)
    loss, logs = recipe.loss({"pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1}, base)
    assert "lpips" in logs and logs["lpips"] > 0 and torch.isfinite(loss)


def test_crop_larger_than_resolution_is_refused(tiny_base_dir, tmp_path):
    folder = make_image_folder(tmp_path / "photos", n=2, size=48)
    raw = _raw(tiny_base_dir, folder, tmp_path)
    raw["vae_decoder"]["crop_size"] = 64
    with pytest.raises(ConfigError, match="crop_size .*64.* larger than data.resolution"):
        load_config(None, [], raw=raw)
