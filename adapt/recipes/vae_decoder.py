"""Fine-tuned VAE decoder: the encoder stays frozen, the decoder learns to reconstruct pixels.

Because the encoder (and quant_conv) are bit-identical to the base, the latent
space does not move: latent caches, the UNet and every adapter trained on the
base keep working, and only the decoding of latents to pixels improves — the
recipe behind the published "ft-EMA"/"ft-MSE" SD VAEs.

Loss: L1 + (1 - SSIM) by default (the mix of Zhao et al. 2017, "Loss Functions
for Image Restoration with Neural Networks"), plus an optional perceptual term
(LPIPS, Zhang et al. 2018) read from a local TorchScript file — never
downloaded.  EMA of the decoder uses the trainer's `train.ema_decay`.

The artifact is a plain diffusers `AutoencoderKL` folder (run_dir/vae/):
`StableDiffusionPipeline.from_pretrained(base, vae=AutoencoderKL.from_pretrained(run_dir, subfolder="vae"))`.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from adapt.config import Section
from adapt.errors import ConfigError, DataError, ModelLoadError
from adapt.recipes import Recipe, register_recipe

VAE_SUBFOLDER = "vae"
EVAL_FILE = "decoder_eval.json"
#: Parameter prefixes of the decoding path (everything after the latent); the rest of the VAE stays frozen.
DECODER_PREFIXES = ("decoder.", "post_quant_conv.")


class VAEDecoderConfig(Section):
    l1_weight: float = Field(1.0, ge=0, description="Weight of the L1 reconstruction loss (pixels in [-1, 1]).")
    ssim_weight: float = Field(1.0, ge=0, description="Weight of (1 - SSIM) (Gaussian 11x11 window, sigma 1.5; pixels in [0, 1]).")
    lpips_weight: float = Field(0.0, ge=0, description="Weight of a perceptual LPIPS term; > 0 needs lpips_weights.")
    lpips_weights: Optional[str] = Field(None, description="A local TorchScript LPIPS module: f(x, y) -> distance, images in [-1, 1]. Never downloaded.")
    crop_size: Optional[int] = Field(None, gt=0, description="Train on random crops of this many pixels cut from each training image (a multiple of the VAE factor); null = whole image.")
    vae_dtype: Literal["fp32", "base"] = Field("fp32", description="fp32: run the whole VAE in fp32 (avoids the fp16 NaN/black-image failure); base: keep base.dtype for the frozen encoder.")
    train_post_quant_conv: bool = Field(True, description="Also train post_quant_conv (the 1x1 conv between latent and decoder); the latent layout is unchanged either way.")
    init_from: Optional[str] = Field(None, description="Start from this VAE's decoder (an AutoencoderKL folder, or a model folder with vae/); it must share the base's latent layout.")
    eval_dataset: Optional[str] = Field(None, description="A folder of held-out images: at the end, PSNR/SSIM of base vs tuned decoder on the full images -> decoder_eval.json.")
    eval_max_images: int = Field(64, gt=0, description="At most this many images from eval_dataset are evaluated.")

    @model_validator(mode="after")
    def _check(self):
        if self.l1_weight == 0 and self.ssim_weight == 0 and self.lpips_weight == 0:
            raise ValueError("all loss weights are 0; set l1_weight and/or ssim_weight (e.g. 1.0)")
        return self


# ---- losses ------------------------------------------------------------------------------------
def _gaussian_kernel(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g).expand(channels, 1, size, size).contiguous()


def ssim_torch(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Differentiable mean SSIM (Wang et al. 2004, eq. 13) of (B, C, H, W) images in [0, 1].

    Same definition as adapt.world.metrics.ssim (Gaussian window, 'valid' positions, K1=0.01, K2=0.03),
    but on torch tensors with gradients; that one is a float64 numpy metric for evaluation.
    """
    size = min(window, x.shape[-1], x.shape[-2])
    k = _gaussian_kernel(size, sigma, x.shape[1], x.device, x.dtype)

    def blur(t):
        return F.conv2d(t, k, groups=x.shape[1])

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean()


def load_lpips(path: Optional[str], source: str = "<config>"):
    """A local TorchScript LPIPS module (frozen, eval mode); a clear error when it is not there."""
    how = ("export one where the `lpips` package and its backbone weights are installed: "
           "torch.jit.trace(lpips.LPIPS(net='vgg').eval(), (x, x)).save('lpips_vgg.pt') with x = torch.zeros(1, 3, 64, 64), "
           "then set vae_decoder.lpips_weights to that file — or set vae_decoder.lpips_weight: 0")
    if not path:
        raise ConfigError(f"{source}: vae_decoder.lpips_weight > 0 needs vae_decoder.lpips_weights (LPIPS weights are never "
                          f"downloaded); {how}")
    if not Path(path).expanduser().is_file():
        raise ConfigError(f"{source}: vae_decoder.lpips_weights: no such file {path}; {how}")
    try:
        module = torch.jit.load(str(Path(path).expanduser()), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError/ValueError variants for non-TorchScript files
        raise ConfigError(f"{source}: vae_decoder.lpips_weights: {path} is not a TorchScript module ({exc}); {how}") from None
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


# ---- the fp16 guard ----------------------------------------------------------------------------
def guard_decode(vae) -> None:
    """Make vae.decode safe in reduced precision: latents are cast to the VAE's dtype, and a non-finite decode
    (the fp16 NaN / black-image failure of the SD VAE) is redone in fp32 with a warning.

    Written by hand: diffusers upcasts only in the SDXL pipelines (`force_upcast`), not in StableDiffusionPipeline.
    """
    if getattr(vae, "_adapt_guarded", False):
        return
    original = vae.decode

    def decode(z, *args, **kwargs):
        out = original(z.to(vae.dtype), *args, **kwargs)
        sample = out[0] if isinstance(out, tuple) else out.sample
        reduced = vae.dtype != torch.float32 or torch.is_autocast_enabled(z.device.type)
        if reduced and not torch.isfinite(sample).all():
            warnings.warn("the VAE decode gave NaN/inf in reduced precision (the fp16 black-image failure); "
                          "the VAE is upcast to fp32 from now on", RuntimeWarning, stacklevel=2)
            vae.to(torch.float32)
            with torch.autocast(z.device.type, enabled=False):
                out = original(z.float(), *args, **kwargs)
        return out

    vae.decode = decode
    vae._adapt_guarded = True


# ---- latent layout -----------------------------------------------------------------------------
def latent_layout(config) -> dict:
    """What a VAE shares with everything trained on its latents."""
    return {"latent_channels": int(config.latent_channels), "scaling_factor": float(config.scaling_factor),
            "shift_factor": float(getattr(config, "shift_factor", None) or 0.0),
            "downsampling_blocks": len(config.block_out_channels), "in_channels": int(config.in_channels),
            "out_channels": int(config.out_channels)}


def check_latent_layout(base_config, other_config, base_name: str, other_name: str) -> None:
    a, b = latent_layout(base_config), latent_layout(other_config)
    diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    if diff:
        detail = "; ".join(f"{k}: {x} in {base_name} vs {y} in {other_name}" for k, (x, y) in diff.items())
        raise ModelLoadError(f"{other_name} has a different latent layout than {base_name} ({detail}). A decoder only "
                             "swaps in for a VAE with the same latent channels, scaling factor and downsampling; use a VAE "
                             "made for this base.")


def load_vae_folder(path: str | Path, name: Optional[str] = None):
    """AutoencoderKL from a VAE folder, a run directory (vae/) or a model folder (vae/), in fp32."""
    from diffusers import AutoencoderKL

    path = Path(path).expanduser()
    name = name or str(path)
    folder = path if (path / "config.json").is_file() else path / VAE_SUBFOLDER
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{name}: no VAE here (expected config.json in {path} or in {path / VAE_SUBFOLDER}); pass an "
                             "AutoencoderKL folder or a run directory of the vae_decoder recipe.")
    try:
        return AutoencoderKL.from_pretrained(str(folder), torch_dtype=torch.float32)
    except Exception as exc:  # diffusers raises OSError/ValueError/EnvironmentError for broken folders
        raise ModelLoadError(f"{name}: could not load the VAE in {folder}: {exc}") from None


def decoder_state(vae, prefixes=DECODER_PREFIXES) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vae.state_dict().items() if k.startswith(prefixes)}


# ---- evaluation on full images -----------------------------------------------------------------
def _to_tensor(image) -> torch.Tensor:
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


@torch.no_grad()
def reconstruct(vae, image):
    """encode (posterior mean) -> decode of one full image; sides are cut to a multiple of the VAE factor."""
    from PIL import Image

    f = 2 ** (len(vae.config.block_out_channels) - 1)
    w, h = image.size
    image = image.convert("RGB").crop((0, 0, w - w % f, h - h % f))
    x = _to_tensor(image).to(vae.device, vae.dtype)
    out = vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)
    arr = ((out[0].permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().astype(np.uint8)
    return image, Image.fromarray(arr)


def evaluate_decoder(base_vae, tuned_vae, images) -> dict:
    """PSNR / SSIM (adapt.world.metrics) of full-image reconstructions, base VAE vs tuned VAE.

    Returns {"n", "base": {"psnr", "ssim"}, "tuned": {...}, "psnr_gain_db", "ssim_gain"}; PSNR of identical
    images (+inf) is capped at 100 dB so means stay finite.
    """
    from adapt.world.metrics import psnr, ssim

    scores = {"base": {"psnr": [], "ssim": []}, "tuned": {"psnr": [], "ssim": []}}
    for image in images:
        for key, vae in (("base", base_vae), ("tuned", tuned_vae)):
            original, recon = reconstruct(vae, image)
            scores[key]["psnr"].append(min(psnr(original, recon), 100.0))
            scores[key]["ssim"].append(ssim(original, recon))
    out = {"n": len(images)}
    for key in scores:
        out[key] = {m: float(np.mean(v)) if v else float("nan") for m, v in scores[key].items()}
    out["psnr_gain_db"] = out["tuned"]["psnr"] - out["base"]["psnr"]
    out["ssim_gain"] = out["tuned"]["ssim"] - out["base"]["ssim"]
    return out


def folder_images(folder: str | Path, limit: int) -> list:
    from adapt.data.images import IMAGE_EXTENSIONS, load_image

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"vae_decoder.eval_dataset: {folder} is not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not files:
        raise DataError(f"vae_decoder.eval_dataset: {folder} holds no images (.png/.jpg/.webp ...)")
    return [load_image(p) for p in files[:limit]]


# ---- the recipe --------------------------------------------------------------------------------
@register_recipe("vae_decoder")
class VAEDecoder(Recipe):
    """Fine-tune the VAE decoder on reconstruction (encoder frozen: latents, UNets and adapters keep working)."""

    Config = VAEDecoderConfig
    roles = ("instance",)
    needs_pixels = True

    @classmethod
    def check_config(cls, cfg) -> None:
        rc = cfg.recipe_config
        _resolve_paths(rc, cfg.source)
        if rc.crop_size and rc.crop_size > cfg.data.resolution:
            raise ConfigError(f"{cfg.source}: vae_decoder.crop_size ({rc.crop_size}) is larger than data.resolution "
                              f"({cfg.data.resolution}); lower crop_size or raise data.resolution")
        if rc.lpips_weight > 0 and (not rc.lpips_weights or not Path(rc.lpips_weights).expanduser().is_file()):
            load_lpips(rc.lpips_weights, cfg.source)  # raises the explanatory ConfigError
        if rc.eval_dataset and not Path(rc.eval_dataset).expanduser().is_dir():
            raise ConfigError(f"{cfg.source}: vae_decoder.eval_dataset: {rc.eval_dataset} is not a folder of images")

    def prepare(self, base) -> list[torch.nn.Parameter]:
        rc, vae = self.rc, base.vae
        if rc.vae_dtype == "fp32" and any(p.dtype != torch.float32 for p in vae.parameters()):
            vae.to(torch.float32)  # keeps Parameter identity; the frozen encoder is merely upcast (exact)
        # The base decoder as loaded, for the base-vs-tuned evaluation at the end (CPU copy, only when asked).
        self._initial_decoder = ({k: v.detach().float().cpu().clone() for k, v in decoder_state(vae).items()}
                                 if rc.eval_dataset else {})
        factor = base.vae_scale_factor
        if rc.crop_size and rc.crop_size % factor:
            raise ConfigError(f"{self.cfg.source}: vae_decoder.crop_size ({rc.crop_size}) must be a multiple of the VAE "
                              f"factor {factor} of {base.source}")
        if rc.init_from:
            init = load_vae_folder(rc.init_from, f"vae_decoder.init_from ({rc.init_from})")
            check_latent_layout(vae.config, init.config, f"the base VAE ({base.source})", f"vae_decoder.init_from ({rc.init_from})")
            with torch.no_grad():
                for k, p in self._named_trainable(vae):
                    p.copy_(init.state_dict()[k])
        params = [p for _, p in self._named_trainable(vae)]
        for p in params:  # fp32 master weights whatever the base dtype
            p.data = p.data.float()
            p.requires_grad_(True)
        guard_decode(vae)
        self.lpips = load_lpips(rc.lpips_weights, self.cfg.source).to(base.device) if rc.lpips_weight > 0 else None
        return params

    def _prefixes(self) -> tuple[str, ...]:
        return DECODER_PREFIXES if self.rc.train_post_quant_conv else ("decoder.",)

    def _named_trainable(self, vae):
        return [(k, p) for k, p in vae.named_parameters() if k.startswith(self._prefixes())]

    # ---- the loss ----------------------------------------------------------------------------
    def _crop(self, pixels: torch.Tensor, latents: Optional[torch.Tensor], factor: int):
        """One random crop per batch, aligned to the VAE factor so cached latents crop with the pixels.

        Offsets come from the trainer's seeded generator, so a resumed run cuts the same crops.
        """
        size = self.rc.crop_size
        h, w = pixels.shape[-2:]
        if not size or (size >= h and size >= w):
            return pixels, latents
        size = min(size, h - h % factor, w - w % factor)
        gen = self.objective.generator if self.objective is not None else None
        top = int(torch.randint(0, (h - size) // factor + 1, (1,), generator=gen)) * factor
        left = int(torch.randint(0, (w - size) // factor + 1, (1,), generator=gen)) * factor
        pixels = pixels[..., top:top + size, left:left + size]
        if latents is not None:
            t, l, s = top // factor, left // factor, size // factor
            latents = latents[..., t:t + s, l:l + s]
        return pixels, latents

    def loss(self, batch, base):
        rc = self.rc
        pixels = batch["pixel_values"].to(base.device, torch.float32)
        pixels, latents = self._crop(pixels, batch.get("latents"), base.vae_scale_factor)
        if latents is None:
            with torch.no_grad():  # the frozen encoder: no graph, no grads
                latents = base.encode_images(pixels)
        z = latents.to(base.device).float() / base.scaling_factor + base.shift_factor
        recon = base.vae.decode(z).sample.float()
        l1 = (recon - pixels).abs().mean()
        sim = ssim_torch((recon + 1) / 2, (pixels + 1) / 2)
        loss = rc.l1_weight * l1 + rc.ssim_weight * (1 - sim)
        logs = {"l1": l1.item(), "ssim": sim.item()}
        if self.lpips is not None:
            perceptual = self.lpips(recon, pixels).mean()
            loss = loss + rc.lpips_weight * perceptual
            logs["lpips"] = perceptual.item()
        with torch.no_grad():
            mse = F.mse_loss((recon.clamp(-1, 1) + 1) / 2, (pixels + 1) / 2)
            logs["psnr"] = float(10 * torch.log10(1 / mse.clamp(min=1e-10)))
        return loss, logs

    # ---- checkpoints -------------------------------------------------------------------------
    def trainable_state_dict(self, base):
        return {f"vae.{k}": p.detach().clone() for k, p in self._named_trainable(base.vae)}

    def load_trainable_state_dict(self, base, state):
        params = dict(self._named_trainable(base.vae))
        missing = sorted(set(params) - {k[len("vae."):] for k in state})
        if missing:
            raise ModelLoadError(f"checkpoint lacks decoder weights ({', '.join(missing[:3])} ...); it was not written by "
                                 "this vae_decoder configuration")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state[f"vae.{k}"])

    # ---- the artifact ------------------------------------------------------------------------
    def export_vae(self, base):
        """A fresh fp32 AutoencoderKL: encoder side read again from the base's own files (bit-identical even when
        the base ran in fp16), decoder side the trained weights."""
        from diffusers import AutoencoderKL

        source_vae = Path(base.source).expanduser() / VAE_SUBFOLDER
        if (source_vae / "config.json").is_file():
            out = AutoencoderKL.from_pretrained(str(source_vae), torch_dtype=torch.float32, variant=self.cfg.base.variant)
        else:  # single file / hub: the in-memory base, upcast
            out = AutoencoderKL.from_config(base.vae.config)
            out.load_state_dict({k: v.float().cpu() for k, v in base.vae.state_dict().items()})
        trained = {k: p.detach().float().cpu() for k, p in self._named_trainable(base.vae)}
        result = out.load_state_dict(trained, strict=False)
        if result.unexpected_keys:
            raise ModelLoadError(f"trained decoder does not fit the base VAE: {result.unexpected_keys[:3]}")
        return out.eval()

    def save(self, run_dir: Path, base, metadata: dict[str, str]) -> None:
        run_dir = Path(run_dir)
        tuned = self.export_vae(base)
        tuned.save_pretrained(str(run_dir / VAE_SUBFOLDER), safe_serialization=True)
        info = {**metadata, "adapt.recipe": "vae_decoder", "adapt.trained": ",".join(self._prefixes()),
                "adapt.loss": f"l1*{self.rc.l1_weight} + (1-ssim)*{self.rc.ssim_weight} + lpips*{self.rc.lpips_weight}"}
        if self.rc.eval_dataset:
            from diffusers import AutoencoderKL

            base_vae = AutoencoderKL.from_config(tuned.config)
            base_vae.load_state_dict({**tuned.state_dict(), **self._initial_decoder})
            result = evaluate_decoder(base_vae.eval(), tuned, folder_images(self.rc.eval_dataset, self.rc.eval_max_images))
            (run_dir / EVAL_FILE).write_text(json.dumps(result, indent=2))
            print(f"decoder eval on {result['n']} full images of {self.rc.eval_dataset}: PSNR {result['base']['psnr']:.2f} -> "
                  f"{result['tuned']['psnr']:.2f} dB, SSIM {result['base']['ssim']:.4f} -> {result['tuned']['ssim']:.4f}")
        (run_dir / "adapter_info.json").write_text(json.dumps(info, indent=2))
        write_model_card(run_dir, info)

    @classmethod
    def apply(cls, pipe, run_dir: Path, scale: float = 1.0, **kwargs):
        """Swap the run's VAE into the pipeline.  scale 0 leaves the pipeline exactly as it was (the base VAE);
        scale s interpolates the decoder weights, base + s * (tuned - base) (encoder untouched); 1 = the tuned VAE."""
        if scale == 0:
            return pipe
        current = pipe.vae
        base_vae = getattr(current, "_adapt_base_vae", current)
        tuned = load_vae_folder(run_dir, f"run {run_dir}")
        check_latent_layout(base_vae.config, tuned.config, "the pipeline's VAE", f"the VAE of run {run_dir}")
        if scale != 1:
            start = {k: v.float().cpu() for k, v in decoder_state(base_vae).items()}
            mixed = {k: start[k] + float(scale) * (v - start[k]) for k, v in decoder_state(tuned).items()}
            tuned.load_state_dict(mixed, strict=False)
        tuned.requires_grad_(False).eval()
        if current.dtype != torch.float32 or current.device != tuned.device:
            tuned.to(current.device, current.dtype)
        if current.dtype != torch.float32:
            guard_decode(tuned)
        tuned._adapt_base_vae = base_vae
        pipe.vae = tuned
        return pipe


def _resolve_paths(rc, source) -> None:
    """Relative paths in a recipe file are relative to that file (the rule adapt.config applies to base/data paths)."""
    if not source or source == "<config>":
        return
    for key in ("init_from", "eval_dataset", "lpips_weights"):
        value = getattr(rc, key)
        if value and not Path(value).expanduser().is_absolute():
            candidate = Path(source).resolve().parent / value
            if candidate.exists():
                setattr(rc, key, str(candidate.resolve()))


def write_model_card(run_dir: Path, meta: dict[str, str]) -> None:
    card = f"""# Fine-tuned VAE decoder trained with adapt

- base model: `{meta.get('base_model')}`; the encoder is the base's, bit-identical, so the latent space is unchanged
- trained: {meta.get('adapt.trained')} · loss: {meta.get('adapt.loss')} · steps: {meta.get('steps')}, seed: {meta.get('seed')}

## Use it

```python
from diffusers import AutoencoderKL, StableDiffusionPipeline
vae = AutoencoderKL.from_pretrained("{run_dir}", subfolder="{VAE_SUBFOLDER}")
pipe = StableDiffusionPipeline.from_pretrained("{meta.get('base_model')}", vae=vae)
```

or `adapt sample --vae {run_dir} --prompt "..."`, `adapt compare --vae {run_dir} --prompts "..."`,
`adapt eval --suite decoder --vae {run_dir}`.
"""
    (run_dir / "README.md").write_text(card)
