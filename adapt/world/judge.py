"""The judge: a small CNN that reads the tiny world's labels back from an image.

It is an instrument only (no recipe may train against it).  Heads: shape
(base shapes + the novel subject shapes), colour, background, position, size
and style; its penultimate vector is the feature space of our offline
Fréchet distance (`metrics.fd`).

Because the generator renders every image as a pure function of its labels,
the whole base world plus the pack styles/shapes is a few thousand distinct
images; training draws batches from all of them, freshly augmented (shift,
blur, colour gain, noise), so the judge also reads the slightly imperfect
images a diffusion model produces.  `build_judge` retrains it
deterministically; the result ships in adapt/assets/judge/.
"""
from __future__ import annotations

import itertools
import json
import math
import random
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from adapt.errors import ModelLoadError
from adapt.world import generator as G

DEFAULT_JUDGE_DIR = Path(__file__).resolve().parent.parent / "assets" / "judge"
IMAGE_SIZE = 64


def default_heads() -> dict[str, list[str]]:
    """Class names per head, in logit order."""
    return {
        "shape": list(G.SHAPES) + list(G.NOVEL_SHAPES),
        "color": list(G.COLORS),
        "background": list(G.BACKGROUNDS),
        "position": list(G.POSITIONS),
        "size": list(G.SIZES),
        "style": list(G.STYLES),
    }


class Judge(nn.Module):
    """Strided conv stages (64 -> 4 px), a linear feature layer, one linear head per label field.

    The first conv is 4x4 with stride 2, so every input pixel is seen before
    the resolution halves (fine outlines matter: a small heart vs a circle);
    later stages are 3x3 stride-2 convs, cheaper than conv + pool on our CPUs.
    The flatten (rather than global pooling) keeps where things are, which
    the position head needs.
    """

    def __init__(self, heads: dict[str, list[str]], channels: Sequence[int] = (32, 64, 96, 128), feature_dim: int = 128):
        super().__init__()
        self.heads = {k: list(v) for k, v in heads.items()}
        self.channels, self.feature_dim = list(channels), feature_dim
        layers, c_in = [], 3
        for i, c in enumerate(channels):
            conv = nn.Conv2d(c_in, c, 4, stride=2, padding=1) if i == 0 else nn.Conv2d(c_in, c, 3, stride=2, padding=1)
            layers += [conv, nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
        self.body = nn.Sequential(*layers)
        side = IMAGE_SIZE // 2 ** len(channels)
        self.feature = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, feature_dim), nn.ReLU(inplace=True))
        self.classifiers = nn.ModuleDict({k: nn.Linear(feature_dim, len(v)) for k, v in self.heads.items()})

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """x: (B, 3, 64, 64) in [-1, 1] -> (logits per head, features (B, feature_dim))."""
        feats = self.feature(self.body(x))
        return {k: head(feats) for k, head in self.classifiers.items()}, feats

    def config(self) -> dict:
        return {"heads": self.heads, "channels": self.channels, "feature_dim": self.feature_dim, "image_size": IMAGE_SIZE}

    # ------------------------------------------------------------------ inference on images

    @torch.no_grad()
    def analyze(self, images: Sequence, batch_size: int = 256) -> tuple[list[dict[str, str]], np.ndarray]:
        """Predicted labels (one dict per image) and penultimate features (N, feature_dim)."""
        self.eval()
        device = next(self.parameters()).device
        labels, feats = [], []
        for i in range(0, len(images), batch_size):
            x = images_to_tensor(images[i : i + batch_size]).to(device)
            logits, f = self(x)
            idx = {k: v.argmax(-1).tolist() for k, v in logits.items()}
            labels += [{k: self.heads[k][idx[k][j]] for k in self.heads} for j in range(len(x))]
            feats.append(f.float().cpu().numpy())
        return labels, (np.concatenate(feats) if feats else np.zeros((0, self.feature_dim), np.float32))

    def predict(self, images: Sequence) -> list[dict[str, str]]:
        return self.analyze(images)[0]

    def features(self, images: Sequence) -> np.ndarray:
        return self.analyze(images)[1]


def images_to_tensor(images: Sequence) -> torch.Tensor:
    """PIL images or uint8 (H, W, 3) arrays -> (B, 3, 64, 64) float in [-1, 1] (resized if needed)."""
    arrs = [np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im) for im in images]
    out = []
    for a in arrs:
        t = torch.from_numpy(np.array(a)).permute(2, 0, 1).float()
        t = t / 255.0 if a.dtype == np.uint8 else t
        if t.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            t = F.interpolate(t[None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)[0]
        out.append(t)
    return torch.stack(out) * 2 - 1


# ---------------------------------------------------------------------- load / save


def save_judge(judge: Judge, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Weights as fp16 safetensors (half the bytes; accuracy is re-measured after the round trip) + config.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in judge.state_dict().items() if v.is_floating_point()}
    save_file(state, str(out / "judge.safetensors"))
    (out / "config.json").write_text(json.dumps({**judge.config(), **(extra or {})}, indent=2) + "\n")
    return out


def load_judge(path: str | Path | None = None, device: str | torch.device = "cpu") -> Judge:
    """Load a judge folder (default: the embedded one)."""
    path = Path(path) if path is not None else DEFAULT_JUDGE_DIR
    cfg_file, weights = path / "config.json", path / "judge.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise ModelLoadError(f"no judge at {path}: expected config.json and judge.safetensors; "
                             "rebuild it with `adapt world build-judge`")
    cfg = json.loads(cfg_file.read_text())
    judge = Judge(cfg["heads"], cfg["channels"], cfg["feature_dim"])
    state = {k: v.float() for k, v in load_file(str(weights)).items()}
    missing, unexpected = judge.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not m.endswith("num_batches_tracked")]:
        raise ModelLoadError(f"judge weights in {weights} do not match its config.json "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]}); rebuild with `adapt world build-judge`")
    return judge.to(device).eval()


@lru_cache(maxsize=2)
def default_judge(device: str = "cpu") -> Judge:
    """The embedded judge, loaded once per process."""
    return load_judge(None, device)


# ---------------------------------------------------------------------- training data


def all_labels() -> list[G.Labels]:
    """Every distinct labelling the judge must read: base world x novel shapes x styles, shape never invisible."""
    heads = default_heads()
    out = []
    for shape, color, bg, pos, size, style in itertools.product(*heads.values()):
        if G.BACKGROUNDS[bg] != G.COLORS[color]:
            out.append(G.Labels(shape, color, bg, pos, size, style))
    return out


@dataclass
class _Pool:
    images: torch.Tensor  # (N, 3, 64, 64) uint8
    targets: dict[str, torch.Tensor]  # head -> (N,) long


def _render_pool(labels: list[G.Labels], heads: dict[str, list[str]]) -> _Pool:
    imgs = np.stack([np.asarray(G.render(lab, IMAGE_SIZE)) for lab in labels])
    targets = {k: torch.tensor([names.index(getattr(lab, k)) for lab in labels]) for k, names in heads.items()}
    return _Pool(torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), targets)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light, label-preserving damage of the kind generated images show.

    x: (B, 3, H, W) in [0, 1].  Shift up to 3 px (positions are 16 px apart),
    Gaussian blur sigma up to 1.2 px on half the batch, per-channel gain and
    offset up to 5% (palette colours are >= 0.29 apart), pixel noise up to 4%.
    """
    b = x.shape[0]
    pad = 3
    xp = F.pad(x, (pad,) * 4, mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2, b), generator=gen).tolist()
    x = torch.stack([xp[i, :, dy[i] : dy[i] + x.shape[2], dx[i] : dx[i] + x.shape[3]] for i in range(b)])
    sigma = torch.rand(b, generator=gen) * 1.2 * (torch.rand(b, generator=gen) < 0.5)
    k = torch.arange(-3, 4, dtype=torch.float32)
    g = torch.exp(-(k[None] ** 2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    g = g / g.sum(1, keepdim=True)  # (B, 7); sigma ~ 0 gives a delta
    xb = x.reshape(1, b * 3, *x.shape[2:])
    wk = g.repeat_interleave(3, 0)
    xb = F.conv2d(F.pad(xb, (3, 3, 0, 0), mode="replicate"), wk[:, None, None, :], groups=b * 3)
    xb = F.conv2d(F.pad(xb, (0, 0, 3, 3), mode="replicate"), wk[:, None, :, None], groups=b * 3)
    x = xb.reshape_as(x)
    gain = 1 + (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) * 0.1
    offset = (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) * 0.1
    noise = torch.randn(x.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * 0.04
    return (x * gain + offset + noise).clamp(0, 1)


# ---------------------------------------------------------------------- build


def train_judge(steps: int = 1200, seed: int = 0, batch_size: int = 64, lr: float = 2e-3,
                max_labels: int | None = None, log: Callable[[str], None] | None = print) -> Judge:
    """Train a fresh judge on the full label space (or a seeded subset of max_labels) with fresh augmentation each step."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    heads = default_heads()
    labels = all_labels()
    if max_labels is not None:
        labels = random.Random(seed).sample(labels, min(max_labels, len(labels)))
    pool = _render_pool(labels, heads)
    judge = Judge(heads)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    # Linear warm-up over 5% of the steps, then cosine to zero (stable and fast for small CNNs).
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    judge.train()
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(pool.images), (batch_size,), generator=gen)
        x = augment(pool.images[idx].float() / 255.0, gen) * 2 - 1
        logits, _ = judge(x)
        loss = sum(F.cross_entropy(logits[k], pool.targets[k][idx]) for k in heads)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (step % 100 == 0 or step == steps - 1):
            log(f"judge step {step:5d}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    return judge.eval()


def judge_accuracy(judge: Judge, n: int = 1000, seed: int = 1234, augmented: bool = False) -> dict[str, float]:
    """Per-head accuracy on `n` fresh random labellings (all shapes and styles), optionally augmented."""
    rng = random.Random(seed)
    heads = default_heads()
    labels = [G.sample_labels(rng, shape=rng.choice(heads["shape"]), style=rng.choice(heads["style"])) for _ in range(n)]
    images = [G.render(lab) for lab in labels]
    if augmented:
        gen = torch.Generator().manual_seed(seed)
        x = augment(torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 255, gen)
        images = list((x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
    preds = judge.predict(images)
    return {k: float(np.mean([p[k] == getattr(lab, k) for p, lab in zip(preds, labels)])) for k in heads}


def build_judge(out_dir: str | Path = DEFAULT_JUDGE_DIR, steps: int = 1200, seed: int = 0, threads: int = 1,
                max_labels: int | None = None, eval_n: int = 1000,
                log: Callable[[str], None] | None = print) -> dict[str, dict[str, float]]:
    """Retrain the judge deterministically, save it to out_dir, return its measured accuracy.

    Accuracy is measured on the saved (fp16) weights as loaded back, on fresh
    clean images and on augmented ones, and written into config.json.
    """
    # One thread: fixed so a rebuild reproduces the bits, and on our shared 2-core machines
    # a single thread was 3x faster than two (no OpenMP spinning against other jobs).
    torch.set_num_threads(threads)
    judge = train_judge(steps=steps, seed=seed, max_labels=max_labels, log=log)
    save_judge(judge, out_dir)
    loaded = load_judge(out_dir)
    acc = {"clean": judge_accuracy(loaded, n=eval_n, seed=seed + 1),
           "augmented": judge_accuracy(loaded, n=eval_n, seed=seed + 2, augmented=True)}
    save_judge(loaded, out_dir, extra={"train": {"steps": steps, "seed": seed, "threads": threads}, "accuracy": acc})
    if log:
        for kind, per_head in acc.items():
            log(f"judge accuracy ({kind}, n={eval_n}): " + ", ".join(f"{k} {v:.3f}" for k, v in per_head.items()))
    return acc
