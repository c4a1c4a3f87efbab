"""Concept packs: small image folders the base world never shows, in the ordinary data format.

Each pack is a folder of PNGs with same-name `.txt` captions (what a user
would prepare from their own photos) plus a dataset file under
`datasets_cfg/tinyworld-<name>.yaml` that points at it.  `adapt world
make-packs` rewrites them all from a seed.

- style:   striped shapes whose captions carry the trigger phrase (LoRA demo);
- subject: one novel shape in one colour, captioned with a rare identifier (DreamBooth);
- control: images with their silhouettes under `conditioning/` (ControlNet);
- decoder: fine-detail + plain renders, with held-out detail renders in decoder_heldout/ (VAE-decoder fine-tuning).
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

from adapt.world import generator as g

PACKS_DIR = Path(__file__).resolve().parent / "packs"
CFG_DIR = Path(__file__).resolve().parent.parent.parent / "datasets_cfg"
SIZES = {"style": 12, "subject": 6, "control": 200, "decoder": 100, "decoder_heldout": 32}


def _write(folder: Path, stem: str, image, text: str) -> None:
    image.save(folder / f"{stem}.png", optimize=True)
    (folder / f"{stem}.txt").write_text(text + "\n", encoding="utf-8")


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _distinct(rng: random.Random, n: int, **fixed) -> list[g.Labels]:
    """n different label sets (a pack of near-duplicates teaches less)."""
    seen: dict[g.Labels, None] = {}
    while len(seen) < n:
        seen.setdefault(g.sample_labels(rng, **fixed))
    return list(seen)


def make_style(folder: Path, rng: random.Random) -> None:
    # Mostly large shapes: the stripes are what the pack teaches, and they read best large.
    labels = _distinct(rng, 8, style="striped", size="large") + _distinct(rng, 4, style="striped", size="small")
    for i, lab in enumerate(labels):
        _write(folder, f"style_{i:02d}", g.render(lab), g.caption(lab, rng))


def make_subject(folder: Path, rng: random.Random) -> None:
    # Both sizes, as photos of one object at different distances: a pack of large hearts alone leaves
    # "a small sks shape" to the class prior, and a prior-preserving run then draws a generic small shape there.
    half = SIZES["subject"] // 2
    labels = (_distinct(rng, SIZES["subject"] - half, shape=g.NOVEL_SHAPES[0], color=g.SUBJECT_COLOR, size="large")
              + _distinct(rng, half, shape=g.NOVEL_SHAPES[0], color=g.SUBJECT_COLOR, size="small"))
    # Varied positions: make sure no two images share one when there are enough positions.
    positions = rng.sample(g.POSITIONS, len(g.POSITIONS)) + [rng.choice(g.POSITIONS)]
    labels = [g.with_labels(lab, position=pos) for lab, pos in zip(labels, positions)]
    for i, lab in enumerate(labels):
        _write(folder, f"subject_{i:02d}", g.render(lab), g.subject_caption(lab))


def make_control(folder: Path, rng: random.Random) -> None:
    cond = _fresh(folder / "conditioning")
    for i, lab in enumerate(_distinct(rng, SIZES["control"])):
        stem = f"control_{i:03d}"
        _write(folder, stem, g.render(lab), g.caption(lab, rng))
        g.render_control(lab).save(cond / f"{stem}.png", optimize=True)


def make_decoder(folder: Path, rng: random.Random) -> None:
    """Fine-detail renders to train on, plain renders beside them, and held-out detail renders.

    The plain half matters: a decoder tuned on detail images alone paints hairlines into every image
    (prompt adherence of base generations fell from 0.95 to 0.49 in the vae_decoder proof); a 50/50 mix keeps it.
    Plain and held-out images live in sibling folders (decoder_plain/, decoder_heldout/), not subfolders, so
    scanning the pack lists no skipped files.
    """
    plain = _fresh(folder.parent / "decoder_plain")
    held = _fresh(folder.parent / "decoder_heldout")
    labels = _distinct(rng, SIZES["decoder"] + SIZES["decoder_heldout"])
    for i, lab in enumerate(labels):
        where, stem = (folder, f"decoder_{i:03d}") if i < SIZES["decoder"] else (held, f"heldout_{i:03d}")
        _write(where, stem, g.render_detail(lab), g.caption(lab, rng))
    for i, lab in enumerate(_distinct(rng, SIZES["decoder"])):
        _write(plain, f"plain_{i:03d}", g.render(lab), g.caption(lab, rng))


_YAML = """# datasets_cfg/tinyworld-{name}.yaml -- {what}
# Written by `adapt world make-packs`; paths are relative to this file.
subsets:
  - path: ../adapt/world/packs/{name}
    role: {role}
    caption_ext: .txt
    repeats: {repeats}
{extra}"""
_PACKS = {  # name: (writer, role, repeats, what)
    "style": (make_style, "instance", 1, f"striped shapes with the trigger phrase '{g.STYLE_TRIGGER}' (LoRA)"),
    "subject": (make_subject, "instance", 1, "the subject: a red heart named 'sks shape' (DreamBooth)"),
    "control": (make_control, "control", 1, "images + silhouettes in conditioning/ (ControlNet)"),
    "decoder": (make_decoder, "instance", 1, "fine-detail + plain renders; decoder_heldout/ is not trained on (VAE decoder)"),
}


def make_packs(out: Path | None = None, cfg_dir: Path | None = None, seed: int = 0) -> dict[str, Path]:
    """Write every pack and its dataset file; returns {name: pack folder}."""
    out, cfg_dir = Path(out or PACKS_DIR), Path(cfg_dir or CFG_DIR)
    cfg_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, (writer, role, repeats, what) in _PACKS.items():
        folder = _fresh(out / name)
        writer(folder, random.Random(f"pack:{name}:{seed}"))
        rel = _relpath(folder, cfg_dir)
        extra = f"    conditioning_path: {rel}/conditioning\n" if name == "control" else ""
        if name == "decoder":
            # Plain renders twice as often as detail ones: the decoder must stay exact on the world the UNet draws.
            extra = f"  - path: {rel}_plain\n    role: instance\n    caption_ext: .txt\n    repeats: 2\n"
        text = _YAML.format(name=name, what=what, role=role, repeats=repeats, extra=extra)
        (cfg_dir / f"tinyworld-{name}.yaml").write_text(text.replace(f"../adapt/world/packs/{name}\n", rel + "\n"))
        written[name] = folder
    return written


def _relpath(target: Path, start: Path) -> str:
    import os

    return Path(os.path.relpath(target.resolve(), start.resolve())).as_posix()
