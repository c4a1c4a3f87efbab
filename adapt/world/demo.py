"""`adapt demo`: the main job on the tiny world, offline, on a CPU in minutes.

Trains a LoRA on the world's `style` pack (the "personal photos" of the demo)
against the embedded base, then writes a base-vs-adapted grid and a metrics
table (style score and prompt adherence, base vs adapted, measured by the
judge).  The training settings are recipes/tinyworld-lora.yaml's; a test keeps
the two identical.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from adapt.config import DEFAULT_BASE
from adapt.errors import AdaptError
from adapt.world import generator as G

PACKS = Path(__file__).resolve().parent / "packs"
# The captions already end with the trigger phrase; naming it here records it in the adapter's metadata.
STYLE_DATASET = {"subsets": [{"path": str(PACKS / "style"), "role": "instance", "caption_ext": ".txt",
                              "trigger": G.STYLE_TRIGGER}]}


def demo_raw_config() -> dict:
    """The settings of recipes/tinyworld-lora.yaml, with paths inside the installed package."""
    return {
        "recipe": "lora",
        "base": {"path": DEFAULT_BASE},
        "data": {"dataset": STYLE_DATASET, "resolution": 64, "random_flip": True},
        "train": {"steps": 400, "batch_size": 8, "lr": 1.0e-3, "lr_scheduler": "constant_with_warmup",
                  "lr_warmup_steps": 20, "checkpoint_every": 100, "seed": 0},
        "preview": {"prompts": [f"a small red circle on a blue background, at the left {G.STYLE_TRIGGER}",
                                f"a large yellow star on a black background, at the center {G.STYLE_TRIGGER}"],
                    "steps": 25, "guidance_scale": 5.0},
        "lora": {"rank": 16, "alpha": 16},
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", default="runs", help="where the run folder goes (default runs/)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--n", type=int, default=100, help="samples per metric (default 100)")
    p.add_argument("--quick", action="store_true", help="a few steps and samples: checks the pipeline, proves nothing")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def _check_world() -> None:
    if not (Path(DEFAULT_BASE) / "model_index.json").is_file():
        raise AdaptError(f"the embedded tiny-world base is missing ({DEFAULT_BASE}); rebuild it with `adapt world build-base`")
    if not (PACKS / "style").is_dir():
        raise AdaptError(f"the style pack is missing ({PACKS / 'style'}); rebuild it with `adapt world make-packs`")


def compare_grid(run_dir: Path, prompts: list[str], seeds: list[int], steps: int) -> Path:
    """Rows: base and adapted for each prompt; columns: seeds (the same seed down a column)."""
    from adapt.base import BaseModel
    from adapt.infer import attach, generate, grid

    base = BaseModel.load(DEFAULT_BASE)
    images, labels = [], []
    for scale, name in ((0.0, "base"), (1.0, "LoRA")):
        pipe = attach(base.pipeline(), run_dir, scale=scale)
        for prompt in prompts:
            images += generate(pipe, [prompt] * len(seeds), seeds, steps=steps)
            labels.append(f"{name}: {prompt.split(',')[0][:24]}")
    order = [i for p in range(len(prompts)) for i in (p, p + len(prompts))]  # base row, then its LoRA row
    rows = [images[r * len(seeds):(r + 1) * len(seeds)] for r in range(2 * len(prompts))]
    cells = [im for r in order for im in rows[r]]
    out = run_dir / "demo_compare.png"
    grid(cells, rows=len(order), cols=len(seeds), row_labels=[labels[r] for r in order],
         col_labels=[f"seed {s}" for s in seeds], cell=96).save(out)
    return out


def measure(run_dir: Path, n: int, steps: int) -> dict:
    """Style score and prompt adherence on the style suite's prompts, base vs adapted."""
    from adapt.world.evaluate import EvalSettings, evaluate

    out = {}
    for who, adapter in (("base", None), ("adapted", str(run_dir))):
        result = evaluate(EvalSettings(suite="style", adapter=adapter, n=n, steps=steps, seed=0))
        out[who] = {k: result.get(k) for k in ("style_score", "prompt_adherence", "position_accuracy")}
    return out


def format_metrics(metrics: dict) -> str:
    lines = ["| metric | base | adapted |", "|---|---|---|"]
    for key in ("style_score", "prompt_adherence", "position_accuracy"):
        b, a = metrics["base"].get(key), metrics["adapted"].get(key)
        lines.append(f"| {key} | {'n/a' if b is None else f'{b:.3f}'} | {'n/a' if a is None else f'{a:.3f}'} |")
    return "\n".join(lines)


def run(args) -> int:
    from adapt.config import load_config
    from adapt.train.trainer import train

    _check_world()
    overrides = [f"train.steps={args.steps}"] if args.steps else []
    if args.quick:
        overrides = [f"train.steps={args.steps or 4}", "preview.steps=4", "train.lr_warmup_steps=0"]
    if args.device:
        overrides.append(f"train.device={args.device}")
    raw = demo_raw_config()
    cfg = load_config(None, overrides, raw=raw)
    cfg.source = "tinyworld-lora-demo"
    print(f"training a LoRA on the tiny world's style pack ({cfg.train.steps} steps) ...", flush=True)
    run_dir = train(cfg, runs_root=Path(args.runs))
    sample_steps = 4 if args.quick else 25
    prompts = raw["preview"]["prompts"] + [f"a large green triangle on a white background, at the right {G.STYLE_TRIGGER}"]
    grid_path = compare_grid(run_dir, prompts, [0, 1, 2, 3], sample_steps)
    n = 4 if args.quick else args.n
    print(f"measuring style score and prompt adherence on {n} samples, base vs adapted ...", flush=True)
    metrics = measure(run_dir, n, sample_steps)
    table = format_metrics(metrics)
    (run_dir / "demo_metrics.json").write_text(json.dumps(metrics, indent=2))
    (run_dir / "demo_metrics.md").write_text(table + "\n")
    print(f"\n{table}\n\nadapter:    {run_dir / 'pytorch_lora_weights.safetensors'}\ncomparison: {grid_path}\n"
          f"metrics:    {run_dir / 'demo_metrics.md'}\n\nOpen the UI to compare interactively:\n"
          f"  adapt ui --runs {args.runs}    (then browse to http://127.0.0.1:7860)")
    print(run_dir)
    return 0
