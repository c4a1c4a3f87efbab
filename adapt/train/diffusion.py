"""The diffusion training objective shared by every recipe that denoises.

Noise and timesteps come from one seeded CPU generator owned by the trainer
(so a resumed run draws exactly what an uninterrupted one would), targets
follow the base's prediction type, and the loss can be min-SNR-gamma weighted.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from adapt.errors import ConfigError


def rescaled_scheduler(noise_scheduler, zero_terminal_snr: bool):
    """The training scheduler, optionally rescaled to zero terminal SNR (Lin et al. 2024, Alg. 1).

    diffusers implements the rescale (`rescale_betas_zero_snr`); we only switch it on.
    """
    if not zero_terminal_snr or noise_scheduler.config.get("rescale_betas_zero_snr"):
        return noise_scheduler
    return type(noise_scheduler).from_config(noise_scheduler.config, rescale_betas_zero_snr=True)


def snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting").

    For epsilon targets w = min(SNR, gamma) / SNR; for v targets w = min(SNR, gamma) / (SNR + 1).
    A zero-terminal-SNR schedule has SNR = 0 at the last step; the clamp keeps that weight finite.
    """
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps).float()
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr.clamp(min=1e-8)


class DiffusionObjective:
    """noise -> noisy latents -> model prediction -> (weighted) MSE against the right target."""

    def __init__(self, noise_scheduler, train_cfg, generator: torch.Generator):
        self.noise_scheduler = rescaled_scheduler(noise_scheduler, train_cfg.rescale_zero_terminal_snr)
        self.cfg = train_cfg
        self.generator = generator
        total = self.noise_scheduler.config.num_train_timesteps
        lo, hi = train_cfg.min_timestep, min(train_cfg.max_timestep or total, total)
        if lo >= hi:  # the config already checks min < max; this catches a range beyond the scheduler's
            raise ConfigError(f"train.min_timestep={lo} / train.max_timestep={train_cfg.max_timestep} leave no timestep "
                              f"to train on (the scheduler has {total}); pick 0 <= min_timestep < max_timestep <= {total}")
        self.timestep_range = (lo, hi)  # [lo, hi) of the training timesteps

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def sample(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, timesteps) for a batch, drawn on the CPU generator and moved to the latents' device."""
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=self.generator, dtype=torch.float32)
        if self.cfg.noise_offset:
            # Offset noise (Guttenberg 2023): a per-channel constant lets the model shift overall brightness.
            noise += self.cfg.noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=self.generator)
        lo, hi = self.timestep_range
        timesteps = torch.randint(lo, hi, (b,), generator=self.generator)
        return noise.to(latents.device), timesteps.to(latents.device)

    def target(self, latents, noise, timesteps):
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        if self.prediction_type == "sample":
            return latents
        raise ValueError(f"unsupported prediction type {self.prediction_type}")

    def per_example_loss(self, latents: torch.Tensor, predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Loss per example (shape [B]); `predict(noisy_latents, timesteps)` returns the model output."""
        latents = latents.float()
        noise, timesteps = self.sample(latents)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        pred = predict(noisy, timesteps).float()
        loss = F.mse_loss(pred, self.target(latents, noise, timesteps), reduction="none").mean(dim=(1, 2, 3))
        if self.cfg.snr_gamma:
            loss = loss * snr_weights(self.noise_scheduler, timesteps, self.cfg.snr_gamma, self.prediction_type).to(loss.device)
        return loss


def unet_predictor(unet, encoder_hidden_states: torch.Tensor, **unet_kwargs) -> Callable:
    """The plain UNet as `predict` for DiffusionObjective (ControlNet passes residuals via unet_kwargs)."""
    def predict(noisy, timesteps):
        return unet(noisy.to(unet.dtype), timesteps, encoder_hidden_states.to(unet.dtype), **unet_kwargs).sample

    return predict


def batch_latents(batch: dict, base) -> torch.Tensor:
    """Cached latents when the trainer provided them, else encode the pixels with the frozen VAE."""
    if "latents" in batch:
        return batch["latents"].to(base.device)
    with torch.no_grad():
        return base.encode_images(batch["pixel_values"])


def batch_text(batch: dict, base, trainable: Optional[bool] = None) -> torch.Tensor:
    """Cached text embeddings when present, else run the text encoder (with grad if it trains)."""
    if "encoder_hidden_states" in batch:
        return batch["encoder_hidden_states"].to(base.device)
    trains = any(p.requires_grad for p in base.text_encoder.parameters()) if trainable is None else trainable
    with torch.set_grad_enabled(trains and torch.is_grad_enabled()):
        return base.encode_prompt(list(batch["caption"]))
