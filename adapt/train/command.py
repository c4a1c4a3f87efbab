"""`adapt train RECIPE.yaml [key=value ...] [--resume [PATH]]`.

Prints the run directory as the last line of its output (scripts rely on it).
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe file, e.g. recipes/tinyworld-lora.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=5e-5 data.resolution=64")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the newest complete checkpoint (or from PATH: a run folder or checkpoint)")


def run(args) -> int:
    from adapt.config import load_config
    from adapt.train.trainer import train

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    cfg = load_config(args.recipe, overrides)
    run_dir = train(cfg)
    print(run_dir)
    return 0
