"""The shared base model every recipe trains against.

Loads a Stable-Diffusion-style model from a local diffusers folder, a hub id or
a single-file checkpoint; detects its family and prediction type; freezes and
places components; builds inference pipelines that share (never copy) them.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from adapt.config import DEFAULT_BASE, BaseConfig
from adapt.errors import ModelLoadError

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def detect_family(unet_config, text_encoder=None) -> str:
    """sd1 / sd2 / sdxl / custom, from the UNet's conditioning layout."""
    if getattr(unet_config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    dim = unet_config.cross_attention_dim
    dim = dim[0] if isinstance(dim, (list, tuple)) else dim
    return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(dim, "custom")


def _check_diffusers_folder(path: Path) -> None:
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(
            f"{path} is not a diffusers model folder: missing model_index.json. "
            "Pass a diffusers folder (with unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a single .safetensors checkpoint.")
    needed = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json", "scheduler": "scheduler_config.json"}
    for sub, fname in needed.items():
        if not (path / sub / fname).is_file():
            raise ModelLoadError(f"{path} is not a complete diffusers model: missing {sub}/{fname}.")
    if not (path / "tokenizer").is_dir():
        raise ModelLoadError(f"{path} is not a complete diffusers model: missing tokenizer/ folder.")
    # Refuse SDXL from the configs, before reading gigabytes of weights.
    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        unet_config = json.loads((path / "unet" / "config.json").read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelLoadError(f"{path}: model_index.json or unet/config.json is not valid JSON ({exc}).") from None
    if "text_encoder_2" in index or unet_config.get("addition_embed_type") == "text_time":
        raise ModelLoadError(f"{path}: SDXL models are not supported yet (SD 1.x/2.x and the tiny world are); "
                             "SDXL support is planned.")


@dataclass
class BaseModel:
    """The loaded base: diffusers components plus what recipes need to know about them."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object
    source: str
    family: str = "custom"
    extra_components: dict = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, source: str | BaseConfig | None = None, device: Optional[str | torch.device] = None,
             dtype: Optional[str | torch.dtype] = None) -> "BaseModel":
        cfg = source if isinstance(source, BaseConfig) else BaseConfig(path=str(source or DEFAULT_BASE))
        pipe = _load_pipeline(cfg)
        if getattr(pipe, "text_encoder_2", None) is not None or "text_encoder_2" in getattr(pipe, "components", {}):
            raise ModelLoadError(f"{cfg.path}: SDXL models are not supported yet (SD 1.x/2.x and the tiny world are); "
                                 "SDXL support is planned.")
        family = detect_family(pipe.unet.config)
        if family == "sdxl":
            raise ModelLoadError(f"{cfg.path}: SDXL models are not supported yet (SD 1.x/2.x and the tiny world are).")
        base = cls(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                   noise_scheduler=_training_scheduler(pipe.scheduler), source=str(cfg.path), family=family)
        base.freeze()
        _limit_threads_for_tiny(base.unet, device)
        chosen = dtype if dtype is not None else cfg.dtype
        base.place(device or "cpu", DTYPES[chosen] if isinstance(chosen, str) else chosen)
        return base

    # ---- facts about the model -----------------------------------------------------------
    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def sample_size(self) -> int:
        """Native image size in pixels."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def fingerprint(self) -> str:
        """Identity of the architecture: adapters are compatible with bases of the same fingerprint."""
        keys = ("cross_attention_dim", "block_out_channels", "down_block_types", "in_channels", "layers_per_block")
        blob = json.dumps({k: self.unet.config.get(k) for k in keys}, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def describe(self) -> dict:
        return {"base_model": self.source, "family": self.family, "prediction_type": self.prediction_type,
                "vae_scale_factor": self.vae_scale_factor, "latent_channels": self.latent_channels,
                "fingerprint": self.fingerprint, "resolution": self.sample_size}

    # ---- placement -----------------------------------------------------------------------
    def freeze(self) -> None:
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)
            module.eval()

    def place(self, device: str | torch.device, dtype: torch.dtype = torch.float32) -> "BaseModel":
        """Move components; frozen weights take `dtype`, trainable ones stay fp32 (master weights)."""
        self.device, self.dtype = torch.device(device), dtype
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(self.device)
            for p in module.parameters():
                p.data = p.data.to(torch.float32 if p.requires_grad else dtype)
            for b in module.buffers():
                if b.is_floating_point():
                    b.data = b.data.to(dtype)
        return self

    # ---- encoders shared by recipes, previews and caches -------------------------------------
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder hidden states, as StableDiffusionPipeline conditions the UNet."""
        ids = self.tokenize(prompts).to(self.device)
        return self.text_encoder(ids)[0]

    def encode_images(self, pixel_values: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latents (mean of the posterior unless sample=True)."""
        dist = self.vae.encode(pixel_values.to(self.device, self.vae.dtype)).latent_dist
        latents = dist.sample(generator) if sample else dist.mean
        return (latents.float() - self.shift_factor) * self.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents / self.scaling_factor + self.shift_factor
        return self.vae.decode(latents.to(self.vae.dtype)).sample.float()

    # ---- inference -----------------------------------------------------------------------
    def pipeline(self, scheduler=None, **components):
        """A StableDiffusionPipeline over these very components (no second copy in memory)."""
        from diffusers import StableDiffusionPipeline

        parts = dict(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                     scheduler=scheduler or _inference_scheduler(self.noise_scheduler))
        parts.update(components)
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe


# ---- helpers ---------------------------------------------------------------------------------
TINY_UNET_PARAMS = 20_000_000


def _limit_threads_for_tiny(unet, device) -> None:
    """One intra-op thread for tiny models on the CPU.

    Their kernels are too small to gain from threads, and when the cores are shared the threads' spin-waiting
    costs a lot: measured here, one 25-step 64 px tiny-world image took 6 s with 1 thread and 141 s with 2 while
    another process was busy. Real-sized models keep torch's default.
    """
    on_cpu = device is None or torch.device(device).type == "cpu"
    if on_cpu and sum(p.numel() for p in unet.parameters()) < TINY_UNET_PARAMS and "ADAPT_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    elif os.environ.get("ADAPT_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["ADAPT_NUM_THREADS"]))


def _training_scheduler(scheduler):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler.config)


def _inference_scheduler(noise_scheduler):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(noise_scheduler.config)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _pipeline_kwargs(cfg: BaseConfig) -> dict:
    return dict(torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False)


def _load_pipeline(cfg: BaseConfig):
    from diffusers import StableDiffusionPipeline

    path = Path(os.path.expanduser(cfg.path))
    if path.is_dir():
        _check_diffusers_folder(path)
        try:
            return StableDiffusionPipeline.from_pretrained(
                str(path), variant=cfg.variant, use_safetensors=None if cfg.allow_pickle else True, **_pipeline_kwargs(cfg))
        except (OSError, EnvironmentError, ValueError) as exc:
            if not cfg.allow_pickle and "safetensors" in str(exc).lower():
                raise ModelLoadError(
                    f"{path}: no .safetensors weights found (only pickle files?). Pickle weights can run code when loaded; "
                    "convert them to safetensors, or set base.allow_pickle: true if you trust this folder.") from None
            raise ModelLoadError(f"{path}: could not load the diffusers folder: {exc}") from None
    if path.is_file():
        return _load_single_file(path, cfg)
    if _HUB_ID.match(cfg.path) and not cfg.path.startswith((".", "/", "~")):
        return _load_from_hub(cfg)
    raise ModelLoadError(f"{cfg.path}: no such file or folder. Pass a diffusers folder, a .safetensors checkpoint, "
                         "or a hub id like 'org/model'.")


def _load_single_file(path: Path, cfg: BaseConfig):
    from diffusers import StableDiffusionPipeline

    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not cfg.allow_pickle:
        raise ModelLoadError(
            f"{path}: refusing to load a pickle checkpoint ({suffix}); pickles can execute arbitrary code. "
            "Use a .safetensors file, or set base.allow_pickle: true if you trust it.")
    if suffix not in PICKLE_SUFFIXES + (".safetensors",):
        raise ModelLoadError(f"{path}: unknown checkpoint type '{suffix}'; expected .safetensors (or a diffusers folder).")
    kwargs = _pipeline_kwargs(cfg)
    if cfg.config_dir:
        kwargs["config"] = str(cfg.config_dir)
    try:
        return StableDiffusionPipeline.from_single_file(str(path), local_files_only=_offline() or bool(cfg.config_dir), **kwargs)
    except Exception as exc:  # diffusers raises many types here; all mean "cannot use this file"
        hint = ("" if cfg.config_dir else " Offline, single-file loading needs base.config_dir (--config-dir): a local diffusers folder "
                "of the same architecture whose configs describe this checkpoint.")
        raise ModelLoadError(f"{path}: could not load single-file checkpoint: {str(exc).rstrip('. ')}.{hint}") from None


def _load_from_hub(cfg: BaseConfig):
    from diffusers import StableDiffusionPipeline

    try:
        return StableDiffusionPipeline.from_pretrained(cfg.path, revision=cfg.revision, variant=cfg.variant,
                                                       use_safetensors=None if cfg.allow_pickle else True,
                                                       **_pipeline_kwargs(cfg))
    except Exception as exc:
        if _offline() or "offline" in str(exc).lower() or "connect" in str(exc).lower() or "resolve" in str(exc).lower():
            raise ModelLoadError(
                f"{cfg.path}: no local folder or file of that name, and the model hub cannot be reached (offline or "
                "unreachable), so it cannot be downloaded. Pass a local diffusers folder "
                "as base.path, or pre-download it into the hub cache (HF_HOME) while online.") from None
        raise ModelLoadError(f"{cfg.path}: could not load from the hub: {exc}") from None
