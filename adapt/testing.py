"""Tiny Stable-Diffusion-style components for tests and benchmarks.

Built from configs under a fixed seed and saved with `save_pretrained`, so that
callers load them back through the real `from_pretrained` path.  Nothing here
touches a model hub.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch


def build_tiny_pipeline(out_dir: str | Path, prediction_type: str = "epsilon", seed: int = 0,
                        cross_attention_dim: int = 32, sample_size: int = 16) -> Path:
    """Write a tiny SD-1-layout diffusers folder (32x32 px images, VAE factor 2) to out_dir."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from adapt.world.tokenizer import build_clip_tokenizer

    out = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(out / "_tok", model_max_length=16)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=sample_size * 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cross_attention_dim, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              prediction_type=prediction_type, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


def make_image_folder(folder: str | Path, n: int = 6, size: int = 48, seed: int = 0, captions: bool = True) -> Path:
    """A folder of small PNGs (coloured squares on grey) with same-name .txt captions."""
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(COLOURS)
    for i in range(n):
        colour = names[i % len(names)]
        im = Image.new("RGB", (size, size), (128, 128, 128))
        x, y = rng.randint(0, size // 2), rng.randint(0, size // 2)
        ImageDraw.Draw(im).rectangle([x, y, x + size // 3, y + size // 3], fill=COLOURS[colour])
        im.save(folder / f"img_{i:03d}.png")
        if captions:
            (folder / f"img_{i:03d}.txt").write_text(f"a {colour} square", encoding="utf-8")
    return folder
