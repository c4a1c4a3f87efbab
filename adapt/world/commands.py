"""`adapt world ...`: build the tiny world's assets (base model, concept packs).

A small dispatcher: each action is a sub-subcommand with its own options.
"""
from __future__ import annotations

import argparse
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def _add_build_base(sub) -> None:
    p = sub.add_parser("build-base", help="train the embedded tiny base model from scratch on the generator")
    p.add_argument("--out", type=Path, default=ASSETS / "tinyworld", help="output diffusers folder")
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=None, help="VAE training steps")
    p.add_argument("--steps", type=int, default=None, help="text encoder + UNet training steps")
    p.add_argument("--batch", type=int, default=None, help="UNet batch size")
    p.add_argument("--lr", type=float, default=None, help="UNet/text-encoder peak learning rate")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop the UNet stage after this many minutes")
    p.add_argument("--init-from", type=Path, default=None,
                   help="continue from an earlier build folder: keep its VAE, train its UNet and text encoder further")
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke test; the model is useless)")


def _add_make_packs(sub) -> None:
    p = sub.add_parser("make-packs", help="(re)write the concept packs and their datasets_cfg/*.yaml")
    p.add_argument("--out", type=Path, default=None, help="packs folder (default: adapt/world/packs)")
    p.add_argument("--cfg-dir", type=Path, default=None, help="dataset-file folder (default: datasets_cfg)")
    p.add_argument("--seed", type=int, default=0)


def _add_build_judge(sub) -> None:
    p = sub.add_parser("build-judge", help="retrain the judge (the metrics' classifier) deterministically on the generator")
    p.add_argument("--out", type=Path, default=ASSETS / "judge", help="output folder (default: the embedded judge)")
    p.add_argument("--steps", type=int, default=1200, help="training steps (default 1200, ~6 CPU-minutes)")
    p.add_argument("--seed", type=int, default=0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="world_command", required=True, metavar="ACTION")
    _add_build_base(sub)
    _add_make_packs(sub)
    _add_build_judge(sub)


def _run_build_base(args) -> int:
    import torch

    from adapt.world.build import BuildConfig, build_base

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        from adapt.errors import ConfigError
        raise ConfigError("--device cuda was given but torch sees no CUDA device; use --device cpu")
    cfg = BuildConfig(out=args.out, device=args.device, seed=args.seed, max_minutes=args.max_minutes,
                      init_from=args.init_from)
    if args.device == "cpu":  # smaller batches: hours, not days, on a laptop CPU
        cfg.batch, cfg.vae_batch = 64, 32
    if args.quick:
        cfg.vae_steps, cfg.unet_steps, cfg.batch, cfg.vae_batch, cfg.log_every = 2, 2, 4, 4, 1
        cfg.subsample = 97
    for key, val in (("vae_steps", args.vae_steps), ("unet_steps", args.steps), ("batch", args.batch), ("lr", args.lr)):
        if val is not None:
            setattr(cfg, key, val)
    build_base(cfg)
    return 0


def _run_make_packs(args) -> int:
    from adapt.world.packs import make_packs

    for name, path in make_packs(out=args.out, cfg_dir=args.cfg_dir, seed=args.seed).items():
        print(f"{name}: {path}")
    return 0


def _run_build_judge(args) -> int:
    from adapt.world.judge import build_judge

    build_judge(args.out, steps=args.steps, seed=args.seed)
    print(f"judge: {args.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    actions = {"build-base": _run_build_base, "make-packs": _run_make_packs, "build-judge": _run_build_judge}
    return actions[args.world_command](args)


if __name__ == "__main__":  # `python -m adapt.world.commands ...` works without the `adapt` CLI
    import sys

    parser = argparse.ArgumentParser(prog="adapt world")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
