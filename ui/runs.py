"""Finding adapters for the app, and the rule that only adapters inside the runs folder are usable.

A run is any folder under the runs root holding `adapt_run.json` (written by
the trainer when a run finishes).  The browser names a run by its path relative
to the root; `resolve_run` turns that name back into a folder and refuses
anything that resolves outside the root (`..`, absolute paths, symlinks).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from adapt.errors import ModelLoadError
from adapt.infer import RUN_META

#: Weight files that can execute code when loaded; a run holding one (outside checkpoints/) is not loaded.
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
#: Resumable training state (optimizer pickles included) that `apply` never reads.
IGNORED_DIRS = {"checkpoints", "logs", "previews", "cache"}
MAX_DEPTH = 3


@dataclass
class RunInfo:
    """One run folder as the app lists it."""

    name: str                 # path relative to the runs root, posix separators: what the browser sends back
    path: Path                # resolved folder
    meta: dict = field(default_factory=dict)
    reason: str = ""          # why it cannot be used with the loaded base ("" = usable)
    inside: bool = True       # False: the folder (a symlink) resolves outside the runs root; nothing is read from it

    @property
    def usable(self) -> bool:
        return not self.reason

    @property
    def recipe(self) -> str:
        return str(self.meta.get("recipe", "?"))

    @property
    def trigger(self) -> str:
        return str(self.meta.get("trigger") or "")

    @property
    def preview(self) -> Optional[Path]:
        name = self.meta.get("preview")
        if not name or not self.inside:
            return None
        candidate = (self.path / str(name)).resolve()
        return candidate if _inside(candidate, self.path) and candidate.is_file() else None

    def label(self) -> str:
        text = f"{self.name} · {self.recipe} · {self.meta.get('steps', '?')} steps"
        return text if self.usable else f"{text} — unavailable: {self.reason}"

    def row(self) -> list:
        return [self.name, self.recipe, str(self.meta.get("base_model", "?")), self.meta.get("steps", ""),
                self.trigger, str(self.meta.get("created", "")), "ok" if self.usable else self.reason]


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _meta_files(root: Path):
    """adapt_run.json files up to MAX_DEPTH below root, skipping training-state folders."""
    stack = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.name == RUN_META and entry.is_file():
                yield entry
            elif entry.is_dir() and depth < MAX_DEPTH and entry.name not in IGNORED_DIRS and not entry.name.startswith("."):
                stack.append((entry, depth + 1))


def check_artifacts(path: Path) -> str:
    """'' if the run's artifact is safetensors only; otherwise the reason it is refused."""
    weights, pickles = [], []
    for f in path.rglob("*"):
        if not f.is_file() or IGNORED_DIRS & set(f.relative_to(path).parts[:-1]):
            continue
        if f.suffix.lower() == ".safetensors":
            weights.append(f)
        elif f.suffix.lower() in PICKLE_SUFFIXES:
            pickles.append(f)
    if pickles:
        return f"holds pickle weights ({pickles[0].relative_to(path)}); only safetensors are loaded"
    if not weights:
        return "no .safetensors artifact (run unfinished?)"
    return ""


def compatibility(meta: dict, base_facts: dict) -> str:
    """'' if a run trained on a base described by `meta` fits the loaded base; else the reason."""
    from adapt.recipes import available_recipes

    recipe = meta.get("recipe")
    if recipe not in available_recipes():
        return f"recipe '{recipe}' is not installed"
    family, fingerprint = meta.get("family"), meta.get("fingerprint")
    if family and base_facts.get("family") and family != base_facts["family"]:
        return f"built for a {family} base; the loaded base is {base_facts['family']}"
    if fingerprint and base_facts.get("fingerprint") and fingerprint != base_facts["fingerprint"]:
        return f"built for another {family or ''} architecture (fingerprint {fingerprint} ≠ {base_facts['fingerprint']})".replace("  ", " ")
    return ""


def discover_runs(runs_dir: str | Path, base_facts: dict) -> list[RunInfo]:
    """Every run under runs_dir, newest first, each marked usable or not (with the reason)."""
    root = Path(runs_dir).expanduser().resolve()
    if not root.is_dir():
        return []
    runs = []
    for meta_file in _meta_files(root):
        folder = meta_file.parent
        name = folder.relative_to(root).as_posix() if folder != root else "."
        resolved = folder.resolve()
        info = RunInfo(name=name, path=resolved)
        if not _inside(resolved, root):
            info.reason, info.inside = "links outside the runs folder", False
        else:
            try:
                info.meta = json.loads(meta_file.read_text(encoding="utf-8"))
                if not isinstance(info.meta, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as exc:
                info.meta, info.reason = {}, f"unreadable {RUN_META} ({exc})"
        info.reason = info.reason or compatibility(info.meta, base_facts) or check_artifacts(resolved)
        runs.append(info)
    runs.sort(key=lambda r: (str(r.meta.get("created", "")), r.name), reverse=True)
    return runs


def resolve_run(runs_dir: str | Path, name: str) -> Path:
    """The folder of run `name` (relative to runs_dir).  Refuses anything that is not a run inside runs_dir."""
    root = Path(runs_dir).expanduser().resolve()
    text = str(name or "").strip()
    if not text:
        raise ModelLoadError("no adapter selected")
    candidate = Path(text)
    if candidate.is_absolute() or ".." in candidate.parts or "\\" in text or "\x00" in text:
        raise ModelLoadError(f"'{text}': adapters are chosen by their name inside the runs folder {root}; paths are refused")
    resolved = (root / candidate).resolve()
    if not _inside(resolved, root):
        raise ModelLoadError(f"'{text}' resolves outside the runs folder {root}; refused")
    if not (resolved / RUN_META).is_file():
        raise ModelLoadError(f"'{text}' is not a finished run in {root} (no {RUN_META}); press refresh")
    return resolved
