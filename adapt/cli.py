"""The `adapt` command.

Each subcommand lives in the module of its concern and exposes
`add_arguments(parser)` and `run(args) -> int`; this file only dispatches, and
holds the small generation commands (`sample`, `compare`, `recipes`).  Errors a
user can fix (AdaptError) are printed without a traceback, exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from adapt.errors import AdaptError

# name -> (module, one-line help).  Modules not built yet say so plainly.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("adapt.train.command", "train a recipe: adapt train recipes/x.yaml [key=value ...]"),
    "sample": ("adapt.cli", "generate images with the base model, optionally with an adapter"),
    "compare": ("adapt.cli", "grid of base vs adapted images: same seed per column"),
    "eval": ("adapt.world.evaluate", "measure a base or adapter on the tiny world (table or --json)"),
    "export": ("adapt.export.command", "write an adapter in another key convention, or merge it into the base"),
    "ui": ("ui.app", "the Gradio app: base and adapted outputs side by side"),
    "demo": ("adapt.world.demo", "train a LoRA on the tiny world and show the result (the main job, offline)"),
    "world": ("adapt.world.commands", "build the tiny world: generator packs, base model, judge"),
    "recipes": ("adapt.cli", "list the installed recipes"),
}


# ---- sample / compare / recipes ---------------------------------------------------------------
def _add_generation_args(p: argparse.ArgumentParser) -> None:
    from adapt.infer import sampler_names

    p.add_argument("--base", default=None, help="base model (diffusers folder, .safetensors, hub id); default: the embedded tiny world")
    p.add_argument("--adapter", action="append", default=[], help="a run directory to apply (repeatable)")
    p.add_argument("--vae", action="append", dest="adapter", metavar="RUN_DIR",
                   help="a vae_decoder run directory: swap in its decoder (an alias of --adapter; scale 0 = base decoder)")
    p.add_argument("--controlnet", action="append", default=[], metavar="RUN_DIR",
                   help="a controlnet run directory (repeatable); needs --control unless the run has an example map")
    p.add_argument("--control", default=None, metavar="IMAGE", help="control image for --controlnet runs")
    p.add_argument("--control-scale", type=float, default=1.0,
                   help="ControlNet conditioning scale (default 1.0; multiplied by the row scale in compare)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    p.add_argument("--sampler", default="ddim", choices=sampler_names(), help="sampler (default ddim)")
    p.add_argument("--size", type=int, default=None, help="image size in pixels (default: the base's native size)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle checkpoints (trusted files only)")
    p.add_argument("--config-dir", default=None,
                   help="for a single-file --base offline: a local diffusers folder of the same architecture")


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--scale", type=float, default=1.0, help="adapter scale (default 1.0)")
    p.add_argument("--out", default="sample.png", help="output PNG (default sample.png)")
    _add_generation_args(p)


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", nargs="+", required=True, help="prompts (one row block each)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3], help="seeds, one column each")
    p.add_argument("--scales", nargs="+", type=float, default=[0.0, 1.0], help="adapter scales, one row each (0 = base)")
    p.add_argument("--out", default="compare.png", help="output PNG (default compare.png)")
    _add_generation_args(p)


def _device(name):
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _load(args):
    from adapt.base import BaseModel
    from adapt.config import DEFAULT_BASE, BaseConfig

    cfg = BaseConfig(path=args.base or DEFAULT_BASE, allow_pickle=args.allow_pickle, config_dir=args.config_dir)
    return BaseModel.load(cfg, device=_device(args.device))


def _pipes_for_scales(base, args, scales):
    """Yield (scale, pipeline) with every adapter and ControlNet applied at that scale.

    Adapters are applied at scale 0 too (= the plain base output): a LoRA injected into the shared UNet for an
    earlier scale must be switched off, not merely left out.
    """
    from adapt.infer import attach

    for scale in scales:
        pipe = base.pipeline()
        for run_dir in args.adapter:
            pipe = attach(pipe, run_dir, scale=scale)
        for run_dir in args.controlnet:
            pipe = attach(pipe, run_dir, scale=scale * args.control_scale, control_image=args.control)
        yield scale, pipe


def run_sample(args) -> int:
    from adapt.infer import generate

    base = _load(args)
    (_, pipe), = _pipes_for_scales(base, args, [args.scale if args.adapter or args.controlnet else 0.0])
    image, = generate(pipe, [args.prompt], [args.seed], steps=args.steps, guidance_scale=args.cfg,
                      negative_prompt=args.negative_prompt, sampler=args.sampler, height=args.size, width=args.size)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(args.out)
    return 0


def run_compare(args) -> int:
    from adapt.infer import generate, grid

    if not args.adapter and not args.controlnet:
        raise AdaptError("compare needs --adapter RUN_DIR (or --vae / --controlnet RUN_DIR): the folder printed by `adapt train`")
    base = _load(args)
    images, labels = [], []
    for scale, pipe in _pipes_for_scales(base, args, args.scales):
        for prompt in args.prompts:
            images += generate(pipe, [prompt] * len(args.seeds), args.seeds, steps=args.steps, guidance_scale=args.cfg,
                               negative_prompt=args.negative_prompt, sampler=args.sampler, height=args.size, width=args.size)
            labels.append(f"{'base' if scale == 0 else f'x{scale:g}'}: {prompt[:28]}")
    sheet = grid(images, rows=len(labels), cols=len(args.seeds), row_labels=labels,
                 col_labels=[f"seed {s}" for s in args.seeds], cell=128)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(args.out)
    return 0


def run_recipes(args) -> int:
    from adapt.recipes import available_recipes

    for name, cls in available_recipes().items():
        doc = (cls.__doc__ or "").strip().splitlines()
        print(f"{name:14s} {cls.__module__}  {doc[0] if doc else ''}")
    return 0


_LOCAL = {"sample": (add_sample_arguments, run_sample), "compare": (add_compare_arguments, run_compare),
          "recipes": (lambda p: None, run_recipes)}


# ---- dispatch ----------------------------------------------------------------------------
def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only the `selected` command's module is imported (keeps --help fast)."""
    parser = argparse.ArgumentParser(prog="adapt", description="Fine-tune latent-diffusion models: LoRA, DreamBooth, ControlNet, VAE decoders.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name != selected:
            continue
        if name in _LOCAL:
            _LOCAL[name][0](p)
            p.set_defaults(_run=_LOCAL[name][1])
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith((module_name.split(".")[0], module_name)):
                raise
            p.set_defaults(_run=_not_built(name))
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            continue
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _not_built(name):
    def run(args) -> int:
        print(f"adapt {name}: not built yet in this version.", file=sys.stderr)
        return 2

    return run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected if selected in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except AdaptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
