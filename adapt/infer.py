"""Generation shared by `adapt sample`, `adapt compare`, training previews, eval and the UI.

One function, `generate`, turns (prompts, seeds, settings) into images; every
caller goes through it, so the same inputs give the same pixels everywhere.
Each image gets its own seeded generator, so an image does not depend on the
batch it was generated in.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image, ImageDraw

from adapt.errors import ConfigError, ModelLoadError

# name -> (diffusers scheduler class name, extra config)
SAMPLERS: dict[str, tuple[str, dict]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "heun": ("HeunDiscreteScheduler", {}),
}
ALIASES = {"euler_ancestral": "euler_a", "dpm++_2m_karras": "dpmpp_2m_karras", "dpm++2m_karras": "dpmpp_2m_karras",
           "dpmpp2m_karras": "dpmpp_2m_karras"}
RUN_META = "adapt_run.json"


def sampler_names() -> list[str]:
    return list(SAMPLERS)


def make_scheduler(name: str, config):
    """A sampler by name, configured from the base's scheduler config (betas, prediction type, spacing)."""
    import diffusers

    key = ALIASES.get(name.lower().replace("-", "_").replace(" ", "_"), name.lower().replace("-", "_").replace(" ", "_"))
    if key not in SAMPLERS:
        raise ConfigError(f"unknown sampler '{name}'; choose one of: {', '.join(SAMPLERS)}")
    cls_name, extra = SAMPLERS[key]
    cls = getattr(diffusers, cls_name)
    cfg = dict(config)
    # Karras sigmas and a zero-terminal-SNR schedule conflict (the last sigma is infinite); keep the schedule.
    if cfg.get("rescale_betas_zero_snr") and extra.get("use_karras_sigmas"):
        extra = {**extra, "use_karras_sigmas": False, "final_sigmas_type": "zero"}
    return cls.from_config(cfg, **extra)


def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int = 25, guidance_scale: float = 5.0,
             negative_prompt: Optional[str] = None, sampler: str = "ddim", height: Optional[int] = None,
             width: Optional[int] = None, batch_size: int = 1, latents_only: bool = False, **extra) -> list:
    """Generate one image per (prompt, seed).  Extra keyword args go to the pipeline call.

    batch_size=1 (the default) makes every image pixel-identical whatever else is generated with it; larger
    batches are faster but batched kernels may differ in the last bit (±1 on some pixels).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    pipe.scheduler = make_scheduler(sampler, pipe.scheduler.config)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    device = pipe.unet.device
    out: list = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start:start + batch_size]]
        # Draw the initial noise on the CPU per image: identical on every device and batch size.
        shape = (pipe.unet.config.in_channels, (height or size) // pipe.vae_scale_factor, (width or size) // pipe.vae_scale_factor)
        latents = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device, pipe.unet.dtype)
        with torch.no_grad():
            result = pipe(prompt=chunk, negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
                          num_inference_steps=steps, guidance_scale=guidance_scale, height=height or size,
                          width=width or size, generator=gens, latents=latents,
                          output_type="latent" if latents_only else "pil", **extra)
        out.extend(result.images if not latents_only else list(result.images))
    return out


def read_run_meta(run_dir: str | Path) -> dict:
    """The metadata every finished run writes (recipe, base, steps, trigger...)."""
    path = Path(run_dir) / RUN_META
    if not path.is_file():
        raise ModelLoadError(f"{run_dir}: not an adapt run directory (missing {RUN_META}); pass the folder printed by `adapt train`.")
    return json.loads(path.read_text())


def attach(pipe, run_dir: str | Path, scale: float = 1.0, **kwargs):
    """Apply a finished run (any recipe) to a pipeline through its recipe's `apply`."""
    from adapt.recipes import get_recipe

    if Path(run_dir).suffix == ".safetensors" and Path(run_dir).is_file():
        # A single adapter file (diffusers, kohya/A1111, LyCORIS, ComfyUI conventions): the LoRA recipe reads them all.
        return get_recipe("lora").apply(pipe, Path(run_dir), scale=scale, **kwargs)
    meta = read_run_meta(run_dir)
    recipe = get_recipe(meta["recipe"], source=str(run_dir))
    return recipe.apply(pipe, Path(run_dir), scale=scale, **kwargs)


def grid(images: list, rows: int, cols: int, row_labels: Sequence[str] = (), col_labels: Sequence[str] = (),
         cell: Optional[int] = None) -> Image.Image:
    """Images laid out row by row, with optional labels on the left and on top."""
    if len(images) != rows * cols:
        raise ValueError(f"grid of {rows}x{cols} needs {rows * cols} images, got {len(images)}")
    w, h = images[0].size
    if cell:
        images = [im.resize((cell, cell * h // w), Image.NEAREST) for im in images]
        w, h = images[0].size
    left = max((8 + 7 * len(s) for s in row_labels), default=0)
    top = 18 if col_labels else 0
    canvas = Image.new("RGB", (left + cols * w, top + rows * h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        canvas.paste(im.convert("RGB"), (left + c * w, top + r * h))
    for c, label in enumerate(col_labels):
        draw.text((left + c * w + 4, 3), str(label), fill="black")
    for r, label in enumerate(row_labels):
        draw.text((4, top + r * h + h // 2 - 6), str(label), fill="black")
    return canvas
