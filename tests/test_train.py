"""Trainer behaviour: caches, resume, atomic checkpoints, non-finite losses, run folders, the CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from adapt.config import load_config
from adapt.errors import AdaptError
from adapt.train import checkpoint as ckpt
from adapt.train.trainer import TrainingError, train


def _cfg(base_dir, data_dir, tmp_path, *overrides, name="run", steps=4):
    raw = {"recipe": "lora", "base": {"path": str(base_dir)},
           "data": {"dataset": str(data_dir), "resolution": 32},
           "train": {"steps": steps, "batch_size": 2, "lr": 1e-2, "checkpoint_every": 2, "keep_checkpoints": 5, "seed": 5},
           "output_dir": str(tmp_path / name), "lora": {"rank": 4}}
    return load_config(None, list(overrides), raw=raw)


def _weights(run_dir):
    return load_file(str(run_dir / "pytorch_lora_weights.safetensors"))


def test_run_writes_artifacts_config_and_env(tiny_base_dir, image_folder, tmp_path):
    run = train(_cfg(tiny_base_dir, image_folder, tmp_path))
    meta = json.loads((run / "adapt_run.json").read_text())
    assert meta["recipe"] == "lora" and meta["steps"] == 4 and meta["fingerprint"]
    env = json.loads((run / "env.json").read_text())
    assert env["seed"] == 5 and env["versions"]["torch"] and env["versions"]["diffusers"]
    assert "train:" in (run / "config.yaml").read_text()
    assert (run / "README.md").is_file()
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-000002", "step-000004"]


def test_second_run_encodes_nothing(tiny_base_dir, image_folder, tmp_path):
    first = train(_cfg(tiny_base_dir, image_folder, tmp_path, "data.random_flip=true", name="a"))
    second = train(_cfg(tiny_base_dir, image_folder, tmp_path, "data.random_flip=true", name="b"))
    s1 = json.loads((first / "adapt_run.json").read_text())["stats"]
    s2 = json.loads((second / "adapt_run.json").read_text())["stats"]
    assert s1["latents_encoded"] == 6 and s1["texts_encoded"] > 0
    assert s2["latents_encoded"] == 0 and s2["texts_encoded"] == 0
    # a changed transform invalidates the latent cache (but not the text cache)
    third = train(_cfg(tiny_base_dir, image_folder, tmp_path, "data.random_flip=true", "data.resolution=16", name="c"))
    s3 = json.loads((third / "adapt_run.json").read_text())["stats"]
    assert s3["latents_encoded"] == 6 and s3["texts_encoded"] == 0


def test_cached_training_matches_uncached(tiny_base_dir, image_folder, tmp_path):
    cached = _weights(train(_cfg(tiny_base_dir, image_folder, tmp_path, name="cached")))
    plain = _weights(train(_cfg(tiny_base_dir, image_folder, tmp_path, "data.cache_latents=false",
                                "data.cache_text_embeddings=false", name="plain")))
    for k in cached:
        torch.testing.assert_close(cached[k], plain[k], rtol=1e-4, atol=1e-5)


class _StopAt:
    def __init__(self, step):
        self.step = step

    def __call__(self, trainer):
        if trainer.step == self.step:
            raise KeyboardInterrupt


def test_resume_matches_uninterrupted(tiny_base_dir, image_folder, tmp_path):
    straight = _weights(train(_cfg(tiny_base_dir, image_folder, tmp_path, "train.steps=6", name="straight")))
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_base_dir, image_folder, tmp_path, "train.steps=6", name="resumed"), callbacks=[_StopAt(3)])
    run = tmp_path / "resumed"
    assert ckpt.latest_checkpoint(run).name == "step-000003"  # the interrupt saved its step
    resumed = _weights(train(_cfg(tiny_base_dir, image_folder, tmp_path, "train.steps=6", "train.resume=latest", name="resumed")))
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-5, atol=1e-6)


def test_killed_save_leaves_run_resumable(tiny_base_dir, image_folder, tmp_path, monkeypatch):
    original = ckpt.torch.save

    def dying_save(obj, path, *a, **k):
        if "step-000004" in str(path):
            raise OSError("disk vanished mid-save")
        return original(obj, path, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(OSError):
        train(_cfg(tiny_base_dir, image_folder, tmp_path, name="killed"))
    monkeypatch.setattr(ckpt.torch, "save", original)
    run = tmp_path / "killed"
    assert ckpt.latest_checkpoint(run).name == "step-000002"
    assert list((run / "checkpoints").glob(".tmp-*")), "the half-written checkpoint should be left aside, not in place"
    resumed = train(_cfg(tiny_base_dir, image_folder, tmp_path, "train.resume=latest", name="killed"))
    assert json.loads((resumed / "adapt_run.json").read_text())["steps"] == 4
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_nonfinite_losses_are_skipped_then_stop(tiny_base_dir, image_folder, tmp_path, monkeypatch):
    from adapt.recipes.lora import LoRA

    real_loss = LoRA.loss
    calls = {"n": 0}

    def flaky(self, batch, base):
        calls["n"] += 1
        loss, logs = real_loss(self, batch, base)
        return (loss * float("nan") if calls["n"] == 2 else loss), logs

    monkeypatch.setattr(LoRA, "loss", flaky)
    run = train(_cfg(tiny_base_dir, image_folder, tmp_path, name="one_nan"))
    meta = json.loads((run / "adapt_run.json").read_text())
    assert meta["stats"]["nonfinite_steps_skipped"] == 1
    assert all(torch.isfinite(v).all() for v in _weights(run).values())

    monkeypatch.setattr(LoRA, "loss", lambda self, b, base: (torch.tensor(float("inf"), requires_grad=True), {}))
    with pytest.raises(TrainingError, match="not finite"):
        train(_cfg(tiny_base_dir, image_folder, tmp_path, "train.max_nonfinite_steps=2", name="all_nan"))
    weights, _, info = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "all_nan"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_v_prediction_base_trains(tiny_base_dir_v, image_folder, tmp_path):
    run = train(_cfg(tiny_base_dir_v, image_folder, tmp_path, "train.snr_gamma=5", "train.noise_offset=0.05",
                     "train.rescale_zero_terminal_snr=true", name="v"))
    meta = json.loads((run / "adapt_run.json").read_text())
    assert meta["prediction_type"] == "v_prediction"
    assert all(torch.isfinite(v).all() for v in _weights(run).values())


def test_loss_decreases_on_a_fixed_batch(tiny_base_dir, image_folder, tmp_path):
    """Sanity: the LoRA can fit its data (the loss on the first steps vs the last is lower)."""
    losses = []
    run_cfg = _cfg(tiny_base_dir, image_folder, tmp_path, "train.steps=30", "train.lr=2e-2", "train.log_every=1",
                   "train.checkpoint_every=100", name="fit")

    def record(trainer):
        losses.append(trainer.last_loss)

    train(run_cfg, callbacks=[record])
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8


def test_resume_without_checkpoint_is_a_clear_error(tiny_base_dir, image_folder, tmp_path):
    with pytest.raises(AdaptError, match="no complete checkpoint"):
        train(_cfg(tiny_base_dir, image_folder, tmp_path, "train.resume=latest", name="nothing"))


def test_cli_prints_run_dir_last(tiny_base_dir, image_folder, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"recipe: lora\nbase: {{path: {tiny_base_dir}}}\ndata: {{dataset: {image_folder}, resolution: 32}}\n"
                      "train: {steps: 2, batch_size: 2}\nlora: {rank: 2}\n")
    proc = subprocess.run([sys.executable, "-m", "adapt.cli", "train", str(recipe), "train.lr=1e-3"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("runs/r-") and (tmp_path / last / "pytorch_lora_weights.safetensors").is_file()
    bad = subprocess.run([sys.executable, "-m", "adapt.cli", "train", str(recipe), "train.lrr=1"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "did you mean 'train.lr'" in bad.stderr and "Traceback" not in bad.stderr


def test_timestep_range_limits_the_training_noise_levels(tiny_base_dir):
    from diffusers import DDPMScheduler

    from adapt.errors import ConfigError
    from adapt.train.diffusion import DiffusionObjective

    sched = DDPMScheduler.from_pretrained(tiny_base_dir, subfolder="scheduler")
    tc = load_config(None, ["train.min_timestep=100", "train.max_timestep=300"], raw={"recipe": "lora"}).train
    obj = DiffusionObjective(sched, tc, torch.Generator().manual_seed(0))
    drawn = torch.cat([obj.sample(torch.zeros(64, 4, 2, 2))[1] for _ in range(20)])
    assert drawn.min() >= 100 and drawn.max() < 300 and len(drawn.unique()) > 100
    full = DiffusionObjective(sched, load_config(None, [], raw={"recipe": "lora"}).train, torch.Generator().manual_seed(0))
    assert full.sample(torch.zeros(512, 4, 2, 2))[1].max() >= 300
    with pytest.raises(AdaptError, match="min_timestep"):
        load_config(None, ["train.min_timestep=300", "train.max_timestep=100"], raw={"recipe": "lora"})
    beyond = load_config(None, ["train.min_timestep=5000"], raw={"recipe": "lora"}).train
    with pytest.raises(ConfigError, match="leave no timestep"):
        DiffusionObjective(sched, beyond, None)
