"""Everything the training loop needs before its first step: run folder, data, optimizer.

Kept apart from the loop so the loop itself stays flat and short.
"""
from __future__ import annotations

import json
import platform
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Sampler

from adapt.data.cache import CachedDataset, LatentCache, TextCache, default_cache_dir
from adapt.data.dataset import build_dataset, collate_examples
from adapt.errors import ConfigError

PACKAGES = ("adapt", "torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "safetensors")


# ---- run folder ------------------------------------------------------------------------------
def config_stem(cfg) -> str:
    return Path(cfg.source).stem if cfg.source and cfg.source != "<config>" else cfg.recipe


def new_run_dir(cfg, runs_root: Path = Path("runs")) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = runs_root / f"{config_stem(cfg)}-{stamp}"
    n = 1
    while run_dir.exists():  # two runs started in the same second
        run_dir = runs_root / f"{config_stem(cfg)}-{stamp}-{n}"
        n += 1
    return run_dir


def environment(cfg, device) -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    return {"versions": versions, "python": platform.python_version(), "platform": platform.platform(),
            "seed": cfg.train.seed, "device": str(device), "git_revision": rev,
            "cuda": torch.version.cuda if torch.cuda.is_available() else None,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_run_files(run_dir: Path, cfg, device) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.dump(), sort_keys=False))
    (run_dir / "env.json").write_text(json.dumps(environment(cfg, device), indent=2))


# ---- data ------------------------------------------------------------------------------------
class StreamSampler(Sampler):
    """An endless, seeded stream of (index, epoch): example k of the run is always the same one.

    Starting at `start` (= examples already seen) resumes the stream exactly where it stopped.
    """

    def __init__(self, n: int, seed: int, start: int = 0):
        self.n, self.seed, self.start = n, seed, start

    def __iter__(self):
        k, perm, perm_epoch = self.start, None, -1
        while True:
            epoch, pos = divmod(k, self.n)
            if epoch != perm_epoch:
                perm, perm_epoch = np.random.default_rng([self.seed, epoch]).permutation(self.n), epoch
            yield int(perm[pos]), epoch
            k += 1

    def __len__(self):  # endless; DataLoader only needs a number
        return 2**62


def dataset_spec(dataset):
    """A data.dataset value (file, folder or inline mapping) as something build_dataset takes."""
    from adapt.data.spec import dataset_spec_from_dict

    return dataset_spec_from_dict(dataset, source="data.dataset") if isinstance(dataset, dict) else dataset


def build_data(cfg, base, recipe, run_dir: Path):
    """The dataset (cached where the frozen encoders allow) and cache statistics."""
    if not cfg.data.dataset:
        raise ConfigError(f"{cfg.source}: data.dataset is not set — point it at a dataset file (datasets_cfg/*.yaml) "
                          "or a folder of images, e.g. data.dataset=./my_photos")
    dataset = build_dataset(dataset_spec(cfg.data.dataset), cfg.data.resolution, cfg.data.center_crop, cfg.data.random_flip,
                            cfg.data.strict, cfg.train.seed)
    unknown = set(dataset.roles) - set(recipe.roles)
    if unknown:
        raise ConfigError(f"{cfg.data.dataset}: subsets with role(s) {sorted(unknown)} are not used by recipe "
                          f"'{cfg.recipe}' (it reads {list(recipe.roles)}); change the subset roles or the recipe.")
    dataset = recipe.setup_data(base, run_dir, dataset)
    return dataset


def cache_data(cfg, base, recipe, dataset):
    """Wrap the dataset with latent/text caches when the encoders are frozen. Returns (dataset, stats)."""
    cache_dir = default_cache_dir(cfg.data.cache_dir)
    encoder_frozen = not any(p.requires_grad for p in base.vae.encoder.parameters())
    text_frozen = not any(p.requires_grad for p in base.text_encoder.parameters())
    latents = text = None
    stats = {"latents_encoded": 0, "texts_encoded": 0}
    if cfg.data.cache_latents and encoder_frozen:
        if not cfg.data.center_crop:
            print("note: latents are not cached with random crops (data.center_crop: false); encoding every step")
        else:
            latents = LatentCache(cache_dir, base, dataset)
            stats["latents_encoded"] = latents.fill()
    if cfg.data.cache_text_embeddings and text_frozen:
        text = TextCache(cache_dir, base)
        captions = {r.caption for r in dataset.records} | {""}
        stats["texts_encoded"] = text.fill(sorted(captions))
    return CachedDataset(dataset, latents, text, needs_pixels=recipe.needs_pixels), stats


def make_loader(dataset, cfg, examples_seen: int) -> DataLoader:
    sampler = StreamSampler(len(dataset), cfg.train.seed, start=examples_seen)
    return DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, collate_fn=collate_examples,
                      num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0)


# ---- optimisation ----------------------------------------------------------------------------
def make_optimizer(params, tc):
    kwargs = dict(lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2), weight_decay=tc.weight_decay, eps=tc.adam_epsilon)
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if tc.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ConfigError(f"train.optimizer=adamw8bit needs bitsandbytes ({exc}); `pip install bitsandbytes` or use adamw") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise ConfigError("train.optimizer=prodigy needs the prodigyopt package: `pip install prodigyopt` "
                          "(and set train.lr=1.0 as Prodigy expects), or use adamw") from None
    return Prodigy(params, lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2), weight_decay=tc.weight_decay)


def make_lr_scheduler(optimizer, tc):
    from diffusers.optimization import get_scheduler

    return get_scheduler(tc.lr_scheduler, optimizer=optimizer, num_warmup_steps=tc.lr_warmup_steps,
                         num_training_steps=tc.steps)
