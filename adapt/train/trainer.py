"""The training loop: flat and recipe-agnostic.

accelerate handles device placement, autocast and fp16 loss scaling; the loop
does accumulation, clipping, non-finite-loss skipping, EMA, logging, previews
and atomic checkpoints.  The only method-specific call is `recipe.loss`.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from adapt.base import BaseModel
from adapt.errors import AdaptError, ConfigError
from adapt.infer import RUN_META, generate, grid
from adapt.recipes import get_recipe
from adapt.train import checkpoint as ckpt
from adapt.train.diffusion import DiffusionObjective
from adapt.train.setup import (build_data, cache_data, config_stem, make_loader, make_lr_scheduler, make_optimizer,
                               new_run_dir, write_run_files)


class TrainingError(AdaptError):
    """Training stopped for a reason the user can act on (the message says which)."""


class Trainer:
    def __init__(self, cfg, callbacks: Optional[list[Callable]] = None, runs_root: Path = Path("runs")):
        self.cfg, self.callbacks, self.runs_root = cfg, callbacks or [], Path(runs_root)
        self.step = 0
        self.nonfinite_total = 0
        self.last_saved = -1
        self.stats: dict = {}

    # ---- setup -----------------------------------------------------------------------------
    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        cfg, tc = self.cfg, self.cfg.train
        device = tc.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cpu" and (tc.mixed_precision == "fp16" or cfg.base.dtype == "fp16"):
            raise ConfigError(f"{cfg.source}: fp16 needs a GPU; on the CPU use train.mixed_precision=bf16 or no, base.dtype=fp32")
        set_seed(tc.seed)
        self.run_dir, resume_from = self._resolve_run_dir()
        log_with = "tensorboard" if _has_tensorboard() else None
        self.accelerator = Accelerator(mixed_precision=tc.mixed_precision, cpu=device == "cpu", log_with=log_with,
                                       project_dir=str(self.run_dir / "logs"))
        write_run_files(self.run_dir, cfg, self.accelerator.device)
        self.base = BaseModel.load(cfg.base, device=self.accelerator.device)
        self.recipe = get_recipe(cfg.recipe)(cfg)
        # Before any data work, so a bad timestep range fails at once; the generator draws nothing until step 1.
        self.generator = torch.Generator("cpu").manual_seed(tc.seed)
        self.recipe.objective = DiffusionObjective(self.base.noise_scheduler, tc, self.generator)
        dataset = build_data(cfg, self.base, self.recipe, self.run_dir)
        self.params = [p for p in self.recipe.prepare(self.base) if p.requires_grad]
        if not self.params:
            raise TrainingError(f"recipe '{cfg.recipe}' returned no trainable parameters; check its settings in {cfg.source}")
        self._train_mode()
        self.dataset, self.stats = cache_data(cfg, self.base, self.recipe, dataset)
        self.optimizer = make_optimizer(self.params, tc)
        self.lr_scheduler = make_lr_scheduler(self.optimizer, tc)
        self.optimizer, self.lr_scheduler = self.accelerator.prepare(self.optimizer, self.lr_scheduler)
        self.ema = _make_ema(self.params, tc.ema_decay)
        if resume_from is not None:
            self._restore(resume_from)
        if log_with:
            self.accelerator.init_trackers("adapt", config=_flat_scalars(cfg.dump()))

    def _resolve_run_dir(self):
        cfg = self.cfg
        if not cfg.train.resume:
            return new_run_dir(cfg, self.runs_root), None
        explicit = Path(cfg.output_dir) if cfg.output_dir else None
        run_dir, checkpoint = ckpt.resolve_resume(cfg.train.resume, explicit, self.runs_root, config_stem(cfg))
        return run_dir, checkpoint

    def _train_mode(self) -> None:
        for module in (self.base.unet, self.base.text_encoder, self.base.vae):
            trains = any(p.requires_grad for p in module.parameters())
            module.train(trains)
            if trains and self.cfg.train.gradient_checkpointing:
                if hasattr(module, "enable_gradient_checkpointing"):
                    module.enable_gradient_checkpointing()
                elif hasattr(module, "gradient_checkpointing_enable"):
                    module.gradient_checkpointing_enable()

    # ---- the loop --------------------------------------------------------------------------
    def train(self) -> Path:
        self.setup()
        tc = self.cfg.train
        examples_per_step = tc.batch_size * tc.gradient_accumulation_steps
        batches = iter(make_loader(self.dataset, self.cfg, self.step * examples_per_step))
        bar = tqdm(total=tc.steps, initial=self.step, desc=f"train {self.cfg.recipe}", unit="step", dynamic_ncols=True)
        consecutive_bad = 0
        try:
            while self.step < tc.steps:
                loss, logs = self._accumulate(batches, tc.gradient_accumulation_steps)
                if loss is None:
                    consecutive_bad += 1
                    self.nonfinite_total += 1
                    if consecutive_bad >= tc.max_nonfinite_steps:
                        self._stop_nonfinite(consecutive_bad)
                    # A skipped step still consumed its batches; count it so the data stream stays aligned.
                    self.step += 1
                    bar.update(1)
                    continue
                consecutive_bad = 0
                self._optimizer_step()
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.lr_scheduler.get_last_lr()[0]:.2e}")
                self._after_step(loss, logs)
        except KeyboardInterrupt:
            self._save_checkpoint()
            bar.close()
            print(f"\ninterrupted at step {self.step}; checkpoint saved. Resume with:\n"
                  f"  adapt train {self.cfg.source} --resume output_dir={self.run_dir}")
            raise
        bar.close()
        return self._finish()

    def _accumulate(self, batches, micro_steps: int):
        """Forward/backward over the micro-batches of one step; (None, {}) if any loss was not finite."""
        total, logs = 0.0, {}
        for _ in range(micro_steps):
            batch = next(batches)
            with self.accelerator.autocast():
                loss, logs = self.recipe.loss(batch, self.base)
            if not torch.isfinite(loss.detach()).all():
                self.optimizer.zero_grad(set_to_none=True)
                return None, {}
            self.accelerator.backward(loss / micro_steps)
            total += loss.item() / micro_steps
        return total, logs

    def _optimizer_step(self) -> None:
        if self.cfg.train.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.params)

    def _after_step(self, loss: float, logs: dict) -> None:
        tc, pc = self.cfg.train, self.cfg.preview
        self.last_loss = loss
        if self.step % tc.log_every == 0 or self.step == tc.steps:
            self.accelerator.log({"loss": loss, "lr": self.lr_scheduler.get_last_lr()[0], **logs}, step=self.step)
        if pc.every and self.step % pc.every == 0 and self.step < tc.steps:
            self.preview(self.run_dir / "previews" / f"step-{self.step:06d}.png")
        if self.step % tc.checkpoint_every == 0 or self.step == tc.steps:
            self._save_checkpoint()
        for callback in self.callbacks:
            callback(self)

    def _stop_nonfinite(self, count: int) -> None:
        self._save_checkpoint()
        raise TrainingError(
            f"the loss was not finite (NaN/inf) for {count} steps in a row at step {self.step}; stopped. The weights were "
            f"not updated by those steps and are saved in {ckpt.latest_checkpoint(self.run_dir)}. Try a lower train.lr, "
            "train.mixed_precision=bf16 or no, or train.max_grad_norm=1.0, then resume with --resume.")

    # ---- checkpoints -------------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        if self.step == self.last_saved or not hasattr(self, "optimizer"):
            return
        states = {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                  "rng": ckpt.rng_state(self.generator)}
        if self.ema is not None:
            states["ema"] = self.ema.state_dict()
        info = {"nonfinite_total": self.nonfinite_total, "examples_seen": self.step * self.cfg.train.batch_size
                * self.cfg.train.gradient_accumulation_steps, "recipe": self.cfg.recipe}
        ckpt.save_checkpoint(self.run_dir, self.step, self.recipe.trainable_state_dict(self.base), states, info,
                             keep=self.cfg.train.keep_checkpoints)
        self.last_saved = self.step

    def _restore(self, path: Path) -> None:
        weights, states, info = ckpt.load_checkpoint(path)
        self.recipe.load_trainable_state_dict(self.base, weights)
        self.optimizer.load_state_dict(states["optimizer"])
        self.lr_scheduler.load_state_dict(states["lr_scheduler"])
        if self.ema is not None and "ema" in states:
            self.ema.load_state_dict(states["ema"])
        ckpt.restore_rng(states["rng"], self.generator)
        self.step = self.last_saved = int(info["step"])
        self.nonfinite_total = int(info.get("nonfinite_total", 0))
        print(f"resumed from {path} at step {self.step}")

    # ---- previews and the final artifact -----------------------------------------------------
    def preview(self, out: Path) -> Optional[Path]:
        pc = self.cfg.preview
        if not pc.prompts:
            return None
        pipe, extra = self.recipe.preview_pipeline(self.base, pc.scale)
        with _eval_mode(self.base):
            images = generate(pipe, pc.prompts, [pc.seed + i for i in range(len(pc.prompts))], steps=pc.steps,
                              guidance_scale=pc.guidance_scale, sampler=pc.sampler, **extra)
        out.parent.mkdir(parents=True, exist_ok=True)
        grid(images, 1, len(images), col_labels=[p[:20] for p in pc.prompts]).save(out)
        return out

    def _finish(self) -> Path:
        self._save_checkpoint()
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
        meta = self.metadata()
        self.recipe.save(self.run_dir, self.base, {k: str(v) for k, v in meta.items()})
        preview = self.preview(self.run_dir / "preview.png")
        meta["preview"] = preview.name if preview else None
        meta["stats"] = {**self.stats, "nonfinite_steps_skipped": self.nonfinite_total}
        (self.run_dir / RUN_META).write_text(json.dumps(meta, indent=2))
        if self.ema is not None:
            self.ema.restore(self.params)
        self.accelerator.end_training()
        return self.run_dir

    def metadata(self) -> dict:
        from adapt.data.spec import DatasetSpec, load_dataset_file
        from adapt.train.setup import dataset_spec

        spec = dataset_spec(self.cfg.data.dataset)
        spec = spec if isinstance(spec, DatasetSpec) else load_dataset_file(spec)
        triggers = list(dict.fromkeys(s.trigger for s in spec.subsets if s.trigger))
        return {"recipe": self.cfg.recipe, **self.base.describe(), "steps": self.step, "trigger": ", ".join(triggers),
                "resolution": self.cfg.data.resolution, "seed": self.cfg.train.seed,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": str(self.cfg.source)}


class _eval_mode:
    """Modules in eval mode while generating previews, restored afterwards."""

    def __init__(self, base):
        self.modules = [base.unet, base.text_encoder, base.vae]

    def __enter__(self):
        self.modes = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc):
        for m, mode in zip(self.modules, self.modes):
            m.train(mode)


def _make_ema(params, decay):
    if not decay:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=decay)


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
        return True
    except ImportError:
        return False


def _flat_scalars(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_scalars(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)) and not (isinstance(v, float) and math.isnan(v)):
            out[f"{prefix}{k}"] = v
    return out


def train(cfg, callbacks: Optional[list[Callable]] = None, runs_root: Path = Path("runs")) -> Path:
    """Train `cfg`; returns the run directory."""
    return Trainer(cfg, callbacks, runs_root).train()
