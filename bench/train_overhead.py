"""Trainer overhead vs a bare loop, and an SD1.5-sized LoRA step.

    python bench/train_overhead.py                 # {"trainer_ms":..,"bare_ms":..,"ratio":..}
    python bench/train_overhead.py --arch sd15     # {"ms_per_step":..,"peak_rss_mib":..[,"cuda_peak_mib":..]}
    python bench/train_overhead.py --arch sd15 --device cuda --steps 20 --batch 4 --mixed-precision bf16

Default mode: in one process, the same model, batch and resolution, caches warm.  The trainer's time per
optimizer step (median over steps, measured by a callback) is compared with a bare loop doing only
UNet forward + loss + backward + optimizer step on pre-made tensors.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _base_dir(tmp: Path) -> Path:
    from adapt.config import DEFAULT_BASE
    from adapt.testing import build_tiny_pipeline

    if (Path(DEFAULT_BASE) / "model_index.json").is_file():
        return Path(DEFAULT_BASE)
    return build_tiny_pipeline(tmp / "base")


def trainer_ms(base_dir: Path, data: Path, tmp: Path, steps: int, batch: int, resolution: int, device: str) -> float:
    from adapt.config import load_config
    from adapt.train.trainer import train

    raw = {"recipe": "lora", "base": {"path": str(base_dir)}, "data": {"dataset": str(data), "resolution": resolution},
           "train": {"steps": steps, "batch_size": batch, "lr": 1e-4, "checkpoint_every": 10**6, "log_every": 10**6,
                     "max_grad_norm": None, "device": device},
           "lora": {"rank": 8}}
    times: list[float] = []
    stamps: list[float] = []
    for name in ("warm", "timed"):  # the first run fills the caches
        raw["output_dir"] = str(tmp / name)
        stamps.clear()
        train(load_config(None, [], raw=raw), callbacks=[lambda t: stamps.append(time.perf_counter())], runs_root=tmp)
    times = [b - a for a, b in zip(stamps, stamps[1:])][steps // 5:]
    return 1000 * statistics.median(times)


def bare_ms(base_dir: Path, steps: int, batch: int, resolution: int, device: str) -> float:
    from adapt.base import BaseModel
    from adapt.recipes.lora import LoRAConfig, _peft_config, lora_parameters

    base = BaseModel.load(str(base_dir), device=device)
    base.unet.add_adapter(_peft_config(8, None, LoRAConfig(), LoRAConfig().target_modules))
    params = lora_parameters(base.unet)
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    base.unet.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    side = resolution // base.vae_scale_factor
    latents = torch.randn(batch, base.latent_channels, side, side, device=device)
    cond = base.encode_prompt(["a red circle"] * batch).detach()
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (batch,), device=device)

    def loss_fn():
        noisy = base.noise_scheduler.add_noise(latents, noise, t)
        return torch.nn.functional.mse_loss(base.unet(noisy, t, cond).sample, noise)

    times = _timed_steps(loss_fn, opt, steps, device)
    return 1000 * statistics.median(times[steps // 5:])


def _timed_steps(loss_fn, opt, steps: int, device: str) -> list[float]:
    """Seconds per bare optimizer step: forward + loss, backward, step."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def sd15_step(device: str, steps: int = 2, batch: int = 1, precision: str = "no") -> dict:
    """LoRA steps of an SD1.5-sized UNet (random init, 64x64 latents = 512 px), fp32 weights, optional autocast."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280)).to(device)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    unet.train()
    unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(params, lr=1e-4)
    latents = torch.randn(batch, 4, 64, 64, device=device)
    cond = torch.randn(batch, 77, 768, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = torch.randint(0, 1000, (batch,), device=device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    def loss_fn():
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            pred = unet(latents, t, cond).sample
        return torch.nn.functional.mse_loss(pred.float(), latents)

    times = _timed_steps(loss_fn, opt, steps, device)
    out = {"arch": "sd15", "device": device, "batch": batch, "mixed_precision": precision,
           "params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
           "ms_per_step": [round(1000 * x, 1) for x in times],
           "median_ms_after_first": round(1000 * statistics.median(times[1:]), 1) if len(times) > 1 else None,
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device == "cuda":
        out["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 40; sd15: 2)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 8; sd15: 1)")
    ap.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="sd15 only: autocast dtype")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.arch == "sd15":
        print(json.dumps(sd15_step(args.device, args.steps or 2, args.batch or 1, args.mixed_precision)))
        return 0
    args.steps, args.batch = args.steps or 40, args.batch or 8
    from adapt.testing import make_image_folder

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        os.environ["ADAPT_CACHE"] = str(tmp / "cache")
        base_dir = _base_dir(tmp)
        data = make_image_folder(tmp / "data", n=32, size=args.resolution)
        t_ms = trainer_ms(base_dir, data, tmp, args.steps, args.batch, args.resolution, args.device)
        b_ms = bare_ms(base_dir, args.steps, args.batch, args.resolution, args.device)
    print(json.dumps({"trainer_ms": round(t_ms, 2), "bare_ms": round(b_ms, 2), "ratio": round(t_ms / b_ms, 3),
                      "steps": args.steps, "batch": args.batch, "resolution": args.resolution, "device": args.device,
                      "base": str(base_dir)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
