"""Train the embedded tiny base model from scratch on the generator.

The result is an ordinary Stable-Diffusion-style folder (AutoencoderKL,
CLIPTextModel + CLIPTokenizer, UNet2DConditionModel with cross-attention,
DDPMScheduler) that `StableDiffusionPipeline.from_pretrained` loads.

The base world is finite: every image is a function of its labels, so we
render each label combination once and train on those tensors (resampling
indices, caption phrasings and diffusion noise every step).  Two stages:

1. the VAE, on the base world plus the packs' novel shapes and styles (a
   general-purpose autoencoder, as SD's VAE is; the UNet never sees those);
2. the text encoder and UNet jointly, on the base world only, with
   v-prediction on a zero-terminal-SNR schedule and trailing timestep spacing
   (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
   Flawed"): with a non-zero terminal SNR the first sampling step keeps the
   layout of the input noise, and the issue's pilot found position at chance.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from adapt.world import generator as g
from adapt.world.tokenizer import DEFAULT_WORDS, build_clip_tokenizer

MAX_TOKENS = 32  # captions are ~16 tokens; a short context keeps the text encoder small

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=32,
)  # three levels = 4x downsampling: 64 px images -> 16x16x4 latents
UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(64, 96, 128),
    down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=128, attention_head_dim=4, norm_num_groups=32,
)
TEXT_CONFIG = dict(
    hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=MAX_TOKENS, projection_dim=128,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
    prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
    clip_sample=False, steps_offset=1,
)
# Partial captions teach prompts that leave attributes open ("a red shape at the
# left"): the class prompt of DreamBooth ("a photo of a shape") and CFG-free use.
PARTIAL_OMITS = (("size",), ("background",), ("position",), ("shape",), ("color",), ("shape", "size"),
                 ("color", "size"), ("shape", "color", "size"), ("position", "background"),
                 ("shape", "color", "size", "position", "background"))


@dataclass
class BuildConfig:
    out: Path
    device: str = "cpu"
    seed: int = 0
    vae_steps: int = 3000
    vae_batch: int = 128
    vae_lr: float = 1e-3
    unet_steps: int = 12000
    batch: int = 256
    lr: float = 1e-3
    ema_decay: float = 0.999
    p_partial: float = 0.15  # share of partial captions
    p_empty: float = 0.1  # share of empty captions, for classifier-free guidance (Ho & Salimans 2022)
    max_minutes: float = 0.0  # stop the UNet stage early after this many minutes (0 = no limit)
    log_every: int = 200
    subsample: int = 1  # keep every n-th label combination (quick smoke runs)
    init_from: Path | None = None  # continue from an earlier build: its VAE is kept, UNet + text encoder trained on


def log(msg: str) -> None:
    print(f"[build-base {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def world_labels(novel: bool) -> list[g.Labels]:
    """Every label combination of the base world (plus novel shapes and styles if asked)."""
    shapes = g.SHAPES + (g.NOVEL_SHAPES if novel else ())
    styles = g.STYLES if novel else ("plain",)
    out = []
    for shape, color, bg, pos, size, style in itertools.product(
            shapes, g.COLORS, g.BACKGROUNDS, g.POSITIONS, g.SIZES, styles):
        if g.COLORS[color] != g.BACKGROUNDS[bg]:
            out.append(g.Labels(shape, color, bg, pos, size, style))
    return out


def to_tensor(images) -> torch.Tensor:
    """PIL images -> float tensor (N, 3, H, W) in [-1, 1], the VAE's range."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def caption_words() -> list[str]:
    """Every word the generator's captions can use, for the tokenizer."""
    words = set(DEFAULT_WORDS) | set(g.SHAPES) | set(g.NOVEL_SHAPES) | set(g.COLORS) | set(g.BACKGROUNDS)
    words |= set(g.POSITIONS) | set(g.SIZES) | set(g.STYLES) | set(g.STYLE_TRIGGER.split())
    for phrasing in g._PHRASINGS:
        words |= {w.strip(",") for w in phrasing.split() if "{" not in w}
    return sorted(words - {""})


def make_models(tokenizer, seed: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id, **TEXT_CONFIG))
    unet = UNet2DConditionModel(**UNET_CONFIG)
    return vae, text_encoder, unet


def load_models(folder: Path):
    """VAE, text encoder and UNet of an earlier build, in fp32 for training."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    return (AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval(),
            CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32),
            UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and shifts (with wrap-around) so the VAE sees more than the world's fixed layouts."""
    if torch.rand((), generator=gen, device=x.device) < 0.5:
        x = x.flip(-1)
    dy, dx = (int(v) for v in torch.randint(-8, 9, (2,), generator=gen, device=x.device))
    return torch.roll(x, (dy, dx), dims=(-2, -1))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR in dB of images in [-1, 1]."""
    mse = ((a - b) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


def train_vae(vae, images: torch.Tensor, cfg: BuildConfig, gen: torch.Generator) -> None:
    """Reconstruction (L1 + L2) plus a small KL term, as in Rombach et al. 2022 without the GAN."""
    dev = torch.device(cfg.device)
    vae.to(dev).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.vae_lr, total_steps=max(cfg.vae_steps, 2), pct_start=0.05)
    for step in range(1, cfg.vae_steps + 1):
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=gen, device=dev)
        x = _augment(images[idx], gen)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample(generator=None)).sample.float()
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % cfg.log_every == 0 or step == cfg.vae_steps:
            log(f"vae step {step}/{cfg.vae_steps} loss {loss.item():.4f} kl {kl.item():.3f} psnr {psnr(rec.detach(), x):.2f}")
    vae.eval()


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for chunk in images.split(batch):
        dist = vae.encode(chunk).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_psnr(vae, images: torch.Tensor, batch: int = 256) -> float:
    vals = [psnr(vae.decode(vae.encode(c).latent_dist.mode()).sample.clamp(-1, 1), c) * len(c) for c in images.split(batch)]
    return sum(vals) / len(images)


def caption_tokens(labels: list[g.Labels], tokenizer, seed: int) -> tuple[torch.Tensor, int]:
    """Token ids (N, V, MAX_TOKENS): V = full phrasings, then partial captions, then the empty caption."""
    rng = random.Random(seed)
    texts = []
    for lab in labels:
        full = [p.format(**lab.__dict__) for p in g._PHRASINGS]
        partial = [g.caption(lab, rng, omit=o) for o in PARTIAL_OMITS]
        texts.append(full + partial + [""])
    flat = [t for row in texts for t in row]
    ids = tokenizer(flat, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return ids.view(len(labels), len(texts[0]), -1), len(g._PHRASINGS)


def _pick_variant(n: int, n_full: int, n_var: int, cfg: BuildConfig, gen: torch.Generator, dev) -> torch.Tensor:
    u = torch.rand(n, generator=gen, device=dev)
    full = torch.randint(0, n_full, (n,), generator=gen, device=dev)
    part = torch.randint(n_full, n_var - 1, (n,), generator=gen, device=dev)
    empty = torch.full((n,), n_var - 1, device=dev)
    return torch.where(u < cfg.p_empty, empty, torch.where(u < cfg.p_empty + cfg.p_partial, part, full))


def train_unet(unet, text_encoder, scheduler, lat_mean, lat_std, tokens, n_full, scale, cfg, gen):
    """Joint text encoder + UNet training with the v-prediction objective (Salimans & Ho 2022)."""
    dev = torch.device(cfg.device)
    unet.to(dev).train()
    text_encoder.to(dev).train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    warm = min(500, max(cfg.unet_steps // 10, 1))
    n_var = tokens.shape[1]
    start, avg = time.time(), None
    for step in range(1, cfg.unet_steps + 1):
        idx = torch.randint(0, len(lat_mean), (cfg.batch,), generator=gen, device=dev)
        ids = tokens[idx, _pick_variant(cfg.batch, n_full, n_var, cfg, gen, dev)]
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen, device=dev)) * scale
        noise = torch.randn(z0.shape, generator=gen, device=dev)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch,), generator=gen, device=dev)
        zt = scheduler.add_noise(z0, noise, t)
        target = scheduler.get_velocity(z0, noise, t)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            cond = text_encoder(ids)[0]
            pred = unet(zt, t, cond).sample.float()
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        # Warm-up, then cosine decay to 2% (Loshchilov & Hutter 2017).  Progress is the
        # larger of steps and elapsed time, so a --max-minutes run still anneals fully.
        minutes = (time.time() - start) / 60
        progress = max(step / cfg.unet_steps, minutes / cfg.max_minutes if cfg.max_minutes else 0.0)
        lr = cfg.lr * min(1.0, (step + 1) / warm) * (0.02 + 0.49 * (1 + math.cos(math.pi * min(progress, 1.0))))
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # EMA warm-up as in diffusers' EMAModel
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        if step % cfg.log_every == 0 or step == cfg.unet_steps or step == 1:
            avg = loss.item() if avg is None else 0.9 * avg + 0.1 * loss.item()
            log(f"unet step {step}/{cfg.unet_steps} loss {avg:.4f} lr {lr:.2e} {minutes:.1f} min")
        if cfg.max_minutes and minutes >= cfg.max_minutes:
            log(f"time limit reached at step {step}; stopping")
            break
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()
    return {"unet_steps_done": step, "unet_loss": avg, "unet_minutes": round(minutes, 2)}


def save_pipeline(out: Path, vae, text_encoder, tokenizer, unet, fp16: bool = True) -> None:
    """Write a diffusers folder.  UNet and VAE weights go in fp16 (diffusers upcasts them to
    fp32 on load); the text encoder stays fp32 because transformers keeps a checkpoint's
    dtype by default, and a half text encoder feeding a float UNet breaks plain loading."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    dtype = torch.float16 if fp16 else torch.float32
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).cpu().to(dtype), text_encoder=copy.deepcopy(text_encoder).cpu().float(),
        tokenizer=tokenizer, unet=copy.deepcopy(unet).cpu().to(dtype), scheduler=DDPMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)


def build_base(cfg: BuildConfig) -> dict:
    """Train and write the base model folder; returns a summary (also written to build_info.json)."""
    from diffusers import DDPMScheduler

    t0 = time.time()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    gen = torch.Generator(dev).manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_clip_tokenizer(out / "tokenizer", caption_words(), model_max_length=MAX_TOKENS)
    vae, text_encoder, unet = make_models(tokenizer, cfg.seed) if cfg.init_from is None else load_models(cfg.init_from)
    log(f"params: vae {_count(vae):.2f}M text_encoder {_count(text_encoder):.2f}M unet {_count(unet):.2f}M")

    all_labels = world_labels(novel=True)[::cfg.subsample]
    base_labels = [lab for lab in all_labels if lab.shape in g.SHAPES and lab.style == "plain"]
    log(f"rendering {len(all_labels)} images ({len(base_labels)} in the base world)")
    vae_images = to_tensor([g.render(lab) for lab in all_labels]).to(dev)
    in_base = set(base_labels)
    base_images = vae_images[[i for i, lab in enumerate(all_labels) if lab in in_base]]
    if cfg.init_from is None:
        train_vae(vae, vae_images, cfg, gen)
    vae.to(dev)
    info = {"vae_psnr_base": vae_psnr(vae, base_images), "vae_psnr_all": vae_psnr(vae, vae_images[::3])}
    lat_mean, lat_std = encode_all(vae, base_images)
    if cfg.init_from is None:  # Rombach et al. 2022: rescale latents to unit variance
        vae.register_to_config(scaling_factor=float(1.0 / (lat_mean + lat_std * torch.randn_like(lat_mean)).std()))
    scale = vae.config.scaling_factor
    log(f"vae psnr base {info['vae_psnr_base']:.2f} dB, all {info['vae_psnr_all']:.2f} dB; scaling_factor {scale:.4f}")

    tokens, n_full = caption_tokens(base_labels, tokenizer, cfg.seed)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    info.update(train_unet(unet, text_encoder, scheduler, lat_mean, lat_std, tokens.to(dev), n_full, scale, cfg, gen))
    save_pipeline(out, vae, text_encoder, tokenizer, unet)
    info.update(scaling_factor=scale, seed=cfg.seed, init_from=str(cfg.init_from) if cfg.init_from else None, vae_steps=cfg.vae_steps, unet_steps=cfg.unet_steps,
                batch=cfg.batch, minutes=round((time.time() - t0) / 60, 2),
                params_m={"vae": _count(vae), "text_encoder": _count(text_encoder), "unet": _count(unet)})
    (out / "build_info.json").write_text(json.dumps(info, indent=2))
    log(f"wrote {out} in {info['minutes']} min")
    return info


def _count(model) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 3)


@torch.no_grad()
def template_check(model_dir: str | Path, device: str = "cpu", n: int = 200, steps: int = 25,
                   guidance: float = 5.0, seed: int = 0, sampler: str = "ddim", grid: str | None = None) -> dict:
    """Rough adherence check before the judge exists: label each generated image by
    its nearest rendered template (every world image is a function of its labels)."""
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), torch_dtype=torch.float32).to(device)
    kinds = {"ddim": DDIMScheduler, "euler_a": EulerAncestralDiscreteScheduler}
    if sampler in kinds:
        pipe.scheduler = kinds[sampler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    labels = world_labels(novel=True)
    templates = to_tensor([g.render(lab) for lab in labels]).to(device).flatten(1)
    rng = random.Random(seed)
    asked = [g.sample_labels(rng) for _ in range(n)]
    prompts = [g.caption(lab, rng) for lab in asked]
    styled = [g.caption(g.Labels(lab.shape, lab.color, lab.background, lab.position, lab.size, "striped"), rng)
              for lab in asked[:50]]
    gen = torch.Generator(device).manual_seed(seed)
    found = []
    for chunk in [prompts[i:i + 100] for i in range(0, n, 100)] + [styled]:
        imgs = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, guidance_rescale=0.7,
                    generator=gen, output_type="pt").images.to(device) * 2 - 1
        nearest = torch.cdist(imgs.flatten(1), templates).argmin(1)
        found += [labels[int(i)] for i in nearest]
        if grid and len(found) == len(chunk):
            _save_grid(imgs[:64], chunk[:64], grid)
    gen_labels, style_labels = found[:n], found[n:]
    res = {f"{f}_acc": sum(getattr(a, f) == getattr(b, f) for a, b in zip(asked, gen_labels)) / n
           for f in ("shape", "color", "background", "position", "size")}
    res["adherence"] = sum(a.shape == b.shape and a.color == b.color for a, b in zip(asked, gen_labels)) / n
    res["style_rate_on_trigger"] = sum(b.style != "plain" for b in style_labels) / len(style_labels)
    res.update(steps=steps, guidance=guidance, sampler=sampler, n=n)
    return res


def _save_grid(imgs: torch.Tensor, prompts: list[str], path: str, cols: int = 8) -> None:
    from PIL import Image

    arr = ((imgs.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    rows = math.ceil(len(arr) / cols)
    sheet = Image.new("RGB", (cols * 64, rows * 64))
    for i, a in enumerate(arr):
        sheet.paste(Image.fromarray(a), ((i % cols) * 64, (i // cols) * 64))
    sheet.save(path)
    Path(path).with_suffix(".txt").write_text("\n".join(prompts))


if __name__ == "__main__":  # python -m adapt.world.build check MODEL_DIR [device] [sampler] [guidance] [grid.png]
    import sys

    a = sys.argv[1:]
    print(json.dumps(template_check(a[1], device=a[2] if len(a) > 2 else "cpu", sampler=a[3] if len(a) > 3 else "ddim",
                                    guidance=float(a[4]) if len(a) > 4 else 5.0, grid=a[5] if len(a) > 5 else None)))
