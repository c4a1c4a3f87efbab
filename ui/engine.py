"""What the app does, without the widgets: one base in memory, adapters applied on demand, images generated.

Everything goes through `adapt.infer.attach` (the recipe's own `apply`) and
`adapt.infer.generate` with batch_size=1 — the code `adapt sample` and the
training previews use — so an image made here has the same pixels as the
`adapt sample` command the app prints to reproduce it.

One base is loaded once.  Each request builds a fresh pipeline object over the
base's shared components (no weights copied) and applies the selected
adapters to it.  Some recipes change the shared components in place (a LoRA
is injected into the UNet once per run folder, then only its weight changes);
the engine remembers those runs and applies them at scale 0 — which, by the
recipe contract, is exactly the base — whenever they are not selected.
"""
from __future__ import annotations

import shlex
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from adapt.errors import ConfigError, ModelLoadError
from adapt.infer import generate, grid, read_run_meta

from ui.runs import check_artifacts, compatibility, discover_runs, resolve_run

SWEEP_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class Settings:
    """Generation settings shared by the base and the adapted image."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 25
    cfg: float = 5.0
    sampler: str = "ddim"
    size: Optional[int] = None


@dataclass
class Selection:
    """Adapters (run names inside the runs folder) with their weights, and recipe inputs by recipe name."""

    adapters: list[tuple[str, float]] = field(default_factory=list)
    inputs: dict[str, dict] = field(default_factory=dict)

    def scaled(self, factor: float) -> "Selection":
        return Selection([(n, w * factor) for n, w in self.adapters], self.inputs)


class Engine:
    def __init__(self, base=None, runs_dir: str | Path = "runs", device: Optional[str] = None):
        from adapt.base import BaseModel
        from adapt.config import DEFAULT_BASE, BaseConfig

        if isinstance(base, BaseModel):
            self.base = base
        else:
            import torch

            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            self.base = BaseModel.load(BaseConfig(path=str(base or DEFAULT_BASE)), device=device)
        self.base_path = str(base.source if isinstance(base, BaseModel) else (base or DEFAULT_BASE))
        self.runs_dir = Path(runs_dir).expanduser().resolve()
        self.facts = self.base.describe()
        self._sticky: dict[Path, type] = {}  # run -> recipe, for runs whose apply changed shared components
        self._lock = threading.RLock()       # one generation at a time: the components are shared

    # ---- adapters ------------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        blocks = len(self.base.unet.config.block_out_channels)
        return self.base.vae_scale_factor * 2 ** (blocks - 1)

    def runs(self):
        return discover_runs(self.runs_dir, self.facts)

    def run_path(self, name: str) -> Path:
        """A usable run folder by name; every refusal is a ModelLoadError naming the reason."""
        path = resolve_run(self.runs_dir, name)
        meta = read_run_meta(path)
        reason = compatibility(meta, self.facts) or check_artifacts(path)
        if reason:
            raise ModelLoadError(f"adapter '{name}' cannot be used with this base: {reason}")
        return path

    def _resolve(self, selection: Selection) -> list[tuple[Path, float, type]]:
        from adapt.recipes import get_recipe

        out = []
        for name, weight in selection.adapters:
            path = self.run_path(name)
            out.append((path, float(weight), get_recipe(read_run_meta(path)["recipe"], source=str(path))))
        return out

    def _prepare(self, resolved, selection: Selection, width: int, height: int):
        """Per-run apply kwargs, merged pipeline-call kwargs and previews, from each recipe's ui_prepare."""
        apply_kw, call_kw, previews = {}, {}, []
        for path, _, recipe in resolved:
            a, c, p = recipe.ui_prepare(path, dict(selection.inputs.get(recipe.name, {})), width, height)
            apply_kw[path] = a
            call_kw.update(c)
            previews += p
        return apply_kw, call_kw, previews

    def pipeline(self, resolved, apply_kw: dict):
        """A pipeline over the shared base with exactly `resolved` applied (and every other run at scale 0)."""
        pipe = self.base.pipeline()
        chosen = {path for path, _, _ in resolved}
        for path, recipe in list(self._sticky.items()):
            if path not in chosen:  # straight to apply: the run folder may be gone while its weights are loaded
                pipe = recipe.apply(pipe, path, scale=0.0)
        for path, weight, recipe in resolved:
            new = recipe.apply(pipe, path, scale=weight, **apply_kw.get(path, {}))
            if new is pipe:
                self._sticky[path] = recipe
            pipe = new
        return pipe

    # ---- generation ----------------------------------------------------------------------
    def _size(self, settings: Settings) -> int:
        size = int(settings.size or self.base.sample_size)
        if size <= 0 or size % self.size_multiple:
            raise ConfigError(f"image size {size} must be a positive multiple of {self.size_multiple} for this base")
        return size

    def _generate(self, pipe, settings: Settings, call_kw: dict, size: int, progress: Optional[Callable] = None):
        import inspect

        extra = dict(call_kw)
        if progress is not None and "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
            def on_step(_pipe, step, _t, kwargs):
                progress(step + 1, settings.steps)
                return kwargs

            extra["callback_on_step_end"] = on_step
        image, = generate(pipe, [settings.prompt], [int(settings.seed)], steps=int(settings.steps),
                          guidance_scale=float(settings.cfg), negative_prompt=settings.negative_prompt or None,
                          sampler=settings.sampler, height=size, width=size, batch_size=1, **extra)
        return image

    def image(self, selection: Selection, settings: Settings, progress: Optional[Callable] = None):
        """One image with `selection` applied (an empty selection = the base)."""
        with self._lock:
            size = self._size(settings)
            resolved = self._resolve(selection)
            apply_kw, call_kw, _ = self._prepare(resolved, selection, size, size)
            return self._generate(self.pipeline(resolved, apply_kw), settings, call_kw, size, progress)

    def compare(self, selection: Selection, settings: Settings, progress: Optional[Callable] = None):
        """(base image, adapted image, [(caption, preview)]) with the same seed and settings."""
        if not selection.adapters:
            raise ConfigError("select an adapter to compare with the base")
        with self._lock:
            size = self._size(settings)
            resolved = self._resolve(selection)
            apply_kw, call_kw, previews = self._prepare(resolved, selection, size, size)
            step = (lambda tag: (lambda i, n: progress(i, n, tag))) if progress else (lambda tag: None)
            base_image = self._generate(self.pipeline([], {}), settings, {}, size, step("base"))
            adapted = self._generate(self.pipeline(resolved, apply_kw), settings, call_kw, size, step("adapted"))
        return base_image, adapted, previews

    def sweep(self, selection: Selection, settings: Settings, n_seeds: int = 2,
              scales: Sequence[float] = SWEEP_SCALES, progress: Optional[Callable] = None):
        """A grid: one column per scale (every adapter weight times it), one row per seed (seed, seed+1, ...)."""
        if not selection.adapters:
            raise ConfigError("select an adapter for the strength sweep")
        seeds = [int(settings.seed) + i for i in range(max(1, int(n_seeds)))]
        images = {}
        with self._lock:
            size = self._size(settings)
            for c, scale in enumerate(scales):
                scaled = selection.scaled(scale)
                resolved = self._resolve(scaled)
                apply_kw, call_kw, _ = self._prepare(resolved, scaled, size, size)
                pipe = self.pipeline(resolved, apply_kw)
                for r, seed in enumerate(seeds):
                    if progress:
                        progress(c * len(seeds) + r, len(scales) * len(seeds), f"scale {scale:g}, seed {seed}")
                    one = Settings(**{**settings.__dict__, "seed": seed})
                    images[r, c] = self._generate(pipe, one, call_kw, size)
        ordered = [images[r, c] for r in range(len(seeds)) for c in range(len(scales))]
        return grid(ordered, rows=len(seeds), cols=len(scales), row_labels=[f"seed {s}" for s in seeds],
                    col_labels=[f"x{s:g}" for s in scales], cell=max(96, size))

    # ---- reproduce -----------------------------------------------------------------------
    def reproduce(self, selection: Selection, settings: Settings) -> str:
        """`adapt sample` commands that regenerate the base and the adapted image (Python when the CLI cannot)."""
        from adapt.config import DEFAULT_BASE

        size = self._size(settings)
        resolved = [(self.run_path(n), float(w)) for n, w in selection.adapters]
        common = ["--prompt", settings.prompt, "--seed", str(int(settings.seed)), "--steps", str(int(settings.steps)),
                  "--cfg", repr(float(settings.cfg)), "--sampler", settings.sampler, "--size", str(size)]
        if settings.negative_prompt:
            common += ["--negative-prompt", settings.negative_prompt]
        if Path(self.base_path).resolve() != Path(DEFAULT_BASE).resolve():
            common = ["--base", str(Path(self.base_path).resolve())] + common
        device = ["--device", str(self.base.device.type)]
        lines = [f"# base ({self.facts['base_model']}) and adapted image, same seed and settings",
                 shlex.join(["adapt", "sample", *common, *device, "--out", "base.png"])]
        weights = {w for _, w in resolved}
        has_inputs = any(selection.inputs.get(read_run_meta(p)["recipe"]) for p, _ in resolved)
        if resolved and len(weights) == 1 and not has_inputs:
            adapters = [a for p, _ in resolved for a in ("--adapter", str(p))]
            lines.append(shlex.join(["adapt", "sample", *common, *adapters, "--scale", repr(weights.pop()), *device,
                                     "--out", "adapted.png"]))
            return "\n".join(lines) + "\n"
        lines += ["# per-adapter weights / recipe inputs: `adapt sample` takes one --scale, so in Python:",
                  "from adapt.base import BaseModel", "from adapt.infer import attach, generate",
                  f"base = BaseModel.load({str(Path(self.base_path).resolve())!r}, device={self.base.device.type!r})",
                  "pipe = base.pipeline()"]
        lines += [f"pipe = attach(pipe, {str(p)!r}, scale={w!r})" for p, w in resolved]
        if has_inputs:
            lines.append(f"# plus the recipe inputs as keyword arguments of generate(): {sorted(selection.inputs)}")
        lines += [f"image, = generate(pipe, [{settings.prompt!r}], [{int(settings.seed)}], steps={int(settings.steps)}, "
                  f"guidance_scale={float(settings.cfg)!r}, negative_prompt={settings.negative_prompt or None!r}, "
                  f"sampler={settings.sampler!r}, height={size}, width={size})", "image.save('adapted.png')"]
        return "\n".join(lines) + "\n"
