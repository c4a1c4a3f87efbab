"""`adapt eval`: measure a base model (and adapters) on the tiny world with the judge.

Each suite draws fresh seeded labels from the generator, turns them into
prompts, generates one image per prompt through `adapt.infer.generate`, and
scores the images with the judge and the functions of `adapt.world.metrics`:

  adherence  prompt_adherence, position_accuracy, fd (vs renders of the same labels)
  style      style_score (+ adherence, position, fd vs striped renders) on the style pack's prompts
  subject    subject_fidelity on the subject pack's prompts ("a small sks shape at ..."): the judge must call
             the sample the subject shape, then its foreground mask is IoU-compared with the subject's outline
             (both cropped to their bounding box, so placement and size do not count); 0 for any other shape
  class      class_diversity for class prompts with no shape ("a red shape at the left ...")
  control    control_iou (+ adherence) for silhouette control maps; without --controlnet, the base's baseline
  decoder    psnr, ssim, fd of VAE reconstructions (encode -> decode, no diffusion) of fine-detail images
             like the decoder pack's; details.psnr_plain for plain renders

`evaluate(...)` is the library entry (the demo calls it); `run(args)` prints a
table, or with --json one JSON object: the metric keys at the top level, plus
"settings" (everything that determines the numbers) and "details".
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from adapt.errors import ConfigError
from adapt.world import generator as G
from adapt.world import metrics as M

SUITES = ("adherence", "style", "subject", "class", "control", "decoder")
DEFAULT_N = {"adherence": 200, "style": 100, "subject": 100, "class": 100, "control": 100, "decoder": 100}
METRIC_KEYS = ("prompt_adherence", "position_accuracy", "style_score", "subject_fidelity", "class_diversity",
               "control_iou", "psnr", "ssim", "fd")


@dataclass
class EvalSettings:
    """Everything that determines an evaluation's numbers (echoed in the JSON output)."""

    suite: str = "adherence"
    base: Optional[str] = None
    adapter: Optional[str] = None
    controlnet: Optional[str] = None
    vae: Optional[str] = None
    n: Optional[int] = None
    seed: int = 0
    steps: int = 25
    cfg: float = 5.0
    sampler: str = "ddim"
    scale: float = 1.0
    batch_size: int = 50
    device: Optional[str] = None
    judge: Optional[str] = None
    grid: Optional[str] = None
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------- prompts


def world_expected(prompt: str) -> dict:
    """Expected labels named by a tiny-world prompt (the parser bound to the generator's vocabulary)."""
    found = M.parse_prompt(prompt, shapes=list(G.SHAPES) + list(G.NOVEL_SHAPES), colors=list(G.COLORS),
                           backgrounds=list(G.BACKGROUNDS), sizes=list(G.SIZES))
    found["style"] = "striped" if G.STYLE_TRIGGER in prompt else "plain"
    return found


def _rng(suite: str, seed: int) -> random.Random:
    # A string seed is hashed deterministically (sha512), so suites draw independent labels for the same --seed.
    return random.Random(f"adapt-eval:{suite}:{seed}")


def suite_cases(suite: str, n: int, seed: int, identifier: Optional[str] = None) -> list[tuple[str, G.Labels]]:
    """(prompt, labels) pairs of a suite: fresh seeded labels and their captions.

    `identifier` is the subject's rare word (subject suite), default the subject pack's.
    """
    rng = _rng(suite, seed)
    cases = []
    for _ in range(n):
        if suite == "style":
            labels = G.sample_labels(rng, style="striped")
        elif suite == "subject":
            labels = G.sample_labels(rng, shape=G.NOVEL_SHAPES[0], color=G.SUBJECT_COLOR)
        else:
            labels = G.sample_labels(rng)
        if suite == "class":
            prompt = G.caption(labels, rng, omit=("shape",))
        elif suite == "control":
            # Only the control map says where and how large: a prompt naming position and size would let the
            # base alone score a high IoU, and the metric would not measure control.
            prompt = G.caption(labels, rng, omit=("position", "size"))
        elif suite == "subject":
            prompt = subject_prompt(labels, identifier)
        else:
            prompt = G.caption(labels, rng)
        cases.append((prompt, labels))
    return cases


def subject_prompt(labels: G.Labels, identifier: Optional[str] = None) -> str:
    """The subject pack's caption for labels: the rare identifier + class noun instead of the shape word."""
    return G.subject_caption(labels, token=identifier or G.SUBJECT_TOKEN)


def run_identifier(run_dir: Optional[str]) -> Optional[str]:
    """The rare word a DreamBooth run was trained with (adapter_info.json or its weights' metadata), if any."""
    from safetensors import safe_open

    if not run_dir:
        return None
    info_file = Path(run_dir) / "adapter_info.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    if info.get("adapt.identifier"):
        return info["adapt.identifier"]
    for weights in sorted(Path(run_dir).glob("*.safetensors")):
        with safe_open(str(weights), "pt") as f:
            found = (f.metadata() or {}).get("adapt.identifier")
        if found:
            return found
    return None


def control_map(labels: G.Labels, size: int = 64):
    """The control image for labels: the shape's silhouette, white on black."""
    return G.render_control(labels, size=size)


def control_inputs(run_dir: str, cases) -> list:
    """What a ControlNet run expects for each case: the control pack's map, or the run's preprocessor applied
    to the rendered image (e.g. canny edges) when it was trained with one."""
    from adapt.data.control import preprocess
    from adapt.recipes.controlnet import INFO_FILE

    info_file = Path(run_dir) / INFO_FILE
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    name = info.get("adapt.preprocessor", "none")
    if name == "none":
        return [control_map(labels) for _, labels in cases]
    params = json.loads(info.get("adapt.preprocessor_params", "{}"))
    return [preprocess(name, G.render(labels), **params) for _, labels in cases]


# ---------------------------------------------------------------------- models


def _load(settings: EvalSettings, base_model=None):
    """The base (loaded or given), a pipeline with the requested runs attached, and the judge."""
    from adapt.base import BaseModel
    from adapt.config import DEFAULT_BASE
    from adapt.infer import attach
    from adapt.world.judge import default_judge, load_judge

    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = base_model or BaseModel.load(settings.base or DEFAULT_BASE, device=device)
    pipe = base.pipeline()
    if settings.vae:
        pipe = attach(pipe, settings.vae, scale=1.0) or pipe
    for run_dir in (settings.adapter, settings.controlnet):
        if run_dir:
            pipe = attach(pipe, run_dir, scale=settings.scale) or pipe
    judge = load_judge(settings.judge) if settings.judge else default_judge()
    return base, pipe, judge


def _generate(pipe, prompts: list[str], settings: EvalSettings, controls: Optional[list] = None,
              log=None) -> list:
    from adapt.infer import generate

    seeds = [settings.seed * 1_000_003 + i for i in range(len(prompts))]
    images: list = []
    bs = max(1, settings.batch_size)
    for start in range(0, len(prompts), bs):
        extra = {"image": controls[start:start + bs]} if controls is not None else {}
        images += generate(pipe, prompts[start:start + bs], seeds[start:start + bs], steps=settings.steps,
                           guidance_scale=settings.cfg, sampler=settings.sampler, batch_size=bs, **extra)
        if log:
            log(f"generated {len(images)}/{len(prompts)}")
    return images


# ---------------------------------------------------------------------- suites


def _judged(judge, images, cases) -> tuple[dict, dict, list, np.ndarray]:
    """Adherence-style metrics shared by several suites, plus per-head accuracy details."""
    preds, feats = judge.analyze(images)
    expected = [world_expected(p) for p, _ in cases]
    metrics = {"prompt_adherence": M.prompt_adherence(preds, expected),
               "position_accuracy": M.position_accuracy(preds, expected)}
    details = {}
    for head in ("shape", "color", "background", "size"):  # position is a metric of its own
        flags = [p[head] == e[head] for p, e in zip(preds, expected) if head in e]
        if flags:
            details[f"{head}_accuracy"] = float(np.mean(flags))
    return metrics, details, preds, feats


def save_grid(images: list, path: str, cols: int = 8, max_images: int = 32) -> str:
    """The first images of a suite as one PNG (4x nearest-neighbour upscale), for looking at them."""
    from adapt.infer import grid

    shown = images[:max_images]
    cols = min(cols, len(shown))
    rows = math.ceil(len(shown) / cols)
    padded = shown + [Image.new("RGB", shown[0].size, "white")] * (rows * cols - len(shown))
    sheet = grid(padded, rows=rows, cols=cols, cell=shown[0].size[0] * 4)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return str(path)


def _fd_vs_real(judge, feats: np.ndarray, cases) -> float:
    real = judge.features([G.render(labels) for _, labels in cases])
    return M.fd(feats, real)


def _suite_generation(suite: str, settings: EvalSettings, pipe, judge, n: int, log) -> tuple[dict, dict]:
    cases = suite_cases(suite, n, settings.seed, identifier=run_identifier(settings.adapter))
    prompts = [p for p, _ in cases]
    controls = control_inputs(settings.controlnet, cases) if suite == "control" and settings.controlnet else None
    # Masks and renders are compared at the world's 64 px, whatever size the base generates.
    images = [im if im.size == (64, 64) else im.convert("RGB").resize((64, 64), Image.Resampling.BICUBIC)
              for im in _generate(pipe, prompts, settings, controls, log)]
    metrics, details, preds, feats = _judged(judge, images, cases)
    if settings.grid:
        details["grid"] = save_grid(images, settings.grid)
    if suite in ("adherence", "style"):
        metrics["fd"] = _fd_vs_real(judge, feats, cases)
    if suite == "style":
        metrics["style_score"] = M.style_score(preds)
    elif suite == "class":
        metrics = {"class_diversity": M.class_diversity([p["shape"] for p in preds], len(judge.heads["shape"]))}
        details["shape_counts"] = {s: sum(p["shape"] == s for p in preds) for s in judge.heads["shape"]}
    elif suite == "subject":
        subject = G.NOVEL_SHAPES[0]
        reference = G.render_mask(G.Labels(subject, "red", "white", "center", "large"))
        masks = [M.foreground_mask(im) for im in images]
        metrics = {"subject_fidelity": M.subject_fidelity(masks, [p["shape"] for p in preds], subject, reference)}
        details["judged_subject_rate"] = float(np.mean([p["shape"] == subject for p in preds]))
        for size in G.SIZES:
            picked = [i for i, (_, labels) in enumerate(cases) if labels.size == size]
            if picked:
                details[f"subject_fidelity_{size}"] = M.subject_fidelity(
                    [masks[i] for i in picked], [preds[i]["shape"] for i in picked], subject, reference)
    elif suite == "control":
        masks = [M.foreground_mask(im) for im in images]
        metrics["control_iou"] = M.control_iou(masks, [G.render_mask(labels) for _, labels in cases])
        if not settings.controlnet:
            details["note"] = "no --controlnet: the base's prompt-only baseline"
    return metrics, details


@torch.no_grad()
def _reconstruct(vae, images: list, batch_size: int) -> list:
    """Encode -> decode (posterior mode) through a VAE; uint8 arrays back."""
    out = []
    for start in range(0, len(images), max(1, batch_size)):
        x = _pixels(images[start:start + batch_size]).to(vae.device, vae.dtype)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)
        out += list(((rec.cpu().permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8))
    return out


def _mean_psnr(originals, recons) -> float:
    return float(np.mean([min(M.psnr(o, r), 100.0) for o, r in zip(originals, recons)]))  # identical pairs: +inf


def _suite_decoder(settings: EvalSettings, pipe, judge, n: int) -> tuple[dict, dict]:
    """Reconstruction quality of the (possibly fine-tuned) VAE on held-out decoder-pack-style images
    (fine detail); plain renders' PSNR is reported too, since a decoder tuned on detail alone can lose it."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    labels = [lab for _, lab in suite_cases("decoder", n, settings.seed)]
    originals = [G.render_detail(lab).resize((size, size)) for lab in labels]
    recons = _reconstruct(pipe.vae, originals, settings.batch_size)
    plain = [G.render(lab).resize((size, size)) for lab in labels]
    metrics = {"psnr": _mean_psnr(originals, recons),
               "ssim": float(np.mean([M.ssim(o, r) for o, r in zip(originals, recons)])),
               "fd": M.fd(judge.features(recons), judge.features(originals))}
    return metrics, {"psnr_plain": _mean_psnr(plain, _reconstruct(pipe.vae, plain, settings.batch_size))}


def _pixels(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB")) for im in images]).astype(np.float32) / 127.5 - 1
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def evaluate(settings: EvalSettings, base_model=None, log=None) -> dict:
    """Run one suite; returns {metric: value, ..., "settings": {...}, "details": {...}}."""
    if settings.suite not in SUITES:
        raise ConfigError(f"unknown suite '{settings.suite}'; choose one of: {', '.join(SUITES)}")
    n = settings.n or DEFAULT_N[settings.suite]
    if n < 2:
        raise ConfigError(f"--n {n}: need at least 2 samples (the Fréchet distance needs a covariance)")
    base, pipe, judge = _load(settings, base_model)
    if settings.suite == "decoder":
        metrics, details = _suite_decoder(settings, pipe, judge, n)
    else:
        metrics, details = _suite_generation(settings.suite, settings, pipe, judge, n, log)
    resolved = {k: v for k, v in asdict(settings).items() if k != "extra"}
    resolved.update(n=n, base=base.source, device=str(base.device), **settings.extra)
    return {**{k: metrics[k] for k in METRIC_KEYS if k in metrics}, "settings": resolved, "details": details}


# ---------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from adapt.infer import sampler_names

    parser.add_argument("--base", default=None, help="base model folder or checkpoint (default: the embedded tiny world)")
    parser.add_argument("--adapter", default=None, help="a LoRA/DreamBooth run directory to apply")
    parser.add_argument("--controlnet", default=None, help="a ControlNet run directory to apply (control suite)")
    parser.add_argument("--vae", default=None, help="a VAE-decoder run directory to apply (decoder suite)")
    parser.add_argument("--suite", default="adherence", choices=SUITES, help="what to measure (default adherence)")
    parser.add_argument("--n", type=int, default=None,
                        help="samples (default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_N.items()) + ")")
    parser.add_argument("--seed", type=int, default=0, help="seed for labels and sampling noise (default 0)")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    parser.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    parser.add_argument("--sampler", default="ddim", choices=sampler_names(), help="sampler (default ddim)")
    parser.add_argument("--scale", type=float, default=1.0, help="adapter / ControlNet scale (default 1.0)")
    parser.add_argument("--batch-size", type=int, default=50, help="images generated per batch (default 50)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--judge", default=None, help="judge folder (default: the embedded judge)")
    parser.add_argument("--grid", default=None, metavar="PNG", help="also save the first 32 generated images as a grid PNG")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _finite(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


def format_table(result: dict) -> str:
    s = result["settings"]
    head = (f"adapt eval · suite {s['suite']} · n {s['n']} · seed {s['seed']} · steps {s['steps']} · "
            f"cfg {s['cfg']:g} · sampler {s['sampler']}\nbase {s['base']}"
            + "".join(f"\n{k} {s[k]} (scale {s['scale']:g})" for k in ("adapter", "controlnet") if s.get(k))
            + (f"\nvae {s['vae']}" if s.get("vae") else ""))
    rows = [(k, result[k]) for k in METRIC_KEYS if k in result]
    rows += [(k, v) for k, v in result["details"].items() if not isinstance(v, dict)]
    lines = [head, "", f"{'metric':22s} value"]
    for k, v in rows:
        lines.append(f"{k:22s} {'n/a' if v is None else f'{v:.4f}' if isinstance(v, float) else v}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    settings = EvalSettings(suite=args.suite, base=args.base, adapter=args.adapter, controlnet=args.controlnet,
                            vae=args.vae, n=args.n, seed=args.seed, steps=args.steps, cfg=args.cfg,
                            sampler=args.sampler, scale=args.scale, batch_size=args.batch_size, device=args.device,
                            judge=args.judge, grid=args.grid)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = evaluate(settings, log=log)
    if args.json:
        clean = {k: _finite(v) for k, v in result.items()}
        print(json.dumps(clean, allow_nan=False))
    else:
        print(format_table(result))
    return 0
