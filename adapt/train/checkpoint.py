"""Resumable checkpoints, written atomically.

A checkpoint is a folder `checkpoints/step-000100/` holding the trainable
weights (safetensors), the optimizer / LR-scheduler / EMA states and RNG
states (torch files of plain tensors and numbers, read back with
`weights_only=True`: no code can run from them), and `state.json` (step, data
position).  It is assembled in a hidden temp folder and renamed into place
only when complete, so a save killed half-way leaves the previous checkpoint
as the latest good one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from adapt.errors import AdaptError

PREFIX = "step-"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder without state.json is incomplete and ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "noise": generator.get_state(),
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)), "python": random.getstate()[1]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["noise"])
    np_state = list(np.random.get_state())
    np_state[1] = np.asarray(state["numpy"].numpy(), dtype=np.uint32)
    np.random.set_state(tuple(np_state))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, weights: dict[str, torch.Tensor], states: dict, info: dict,
                    keep: int) -> Path:
    """Write checkpoint `step` atomically, then drop the oldest beyond `keep`."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "trainable.safetensors"))
    torch.save(states, tmp / "states.pt")
    # state.json last: its presence marks the folder complete.
    (tmp / "state.json").write_text(json.dumps({"step": step, **info}, indent=2))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f".tmp-{PREFIX}*"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(weights, states, info) of a complete checkpoint folder."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise AdaptError(f"{path}: not a complete checkpoint (no state.json); resume from another one or from 'latest'.")
    info = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "trainable.safetensors"))
    states = torch.load(path / "states.pt", map_location="cpu", weights_only=True)
    return weights, states, info


def resolve_resume(resume: str, run_dir: Optional[Path], runs_root: Path, stem: str) -> tuple[Path, Path]:
    """(run_dir, checkpoint) for train.resume = 'latest' | a run folder | a checkpoint folder."""
    if resume != "latest":
        p = Path(resume)
        if (p / "state.json").is_file():
            return p.parent.parent, p
        ckpt = latest_checkpoint(p)
        if ckpt is None:
            raise AdaptError(f"train.resume={resume}: no complete checkpoint there; pass a run folder printed by `adapt train` "
                             "or one of its checkpoints/step-* folders.")
        return p, ckpt
    candidates = [run_dir] if run_dir is not None else sorted(runs_root.glob(f"{stem}-*"), key=lambda p: p.name)
    for cand in reversed(candidates):
        ckpt = latest_checkpoint(cand)
        if ckpt is not None:
            return cand, ckpt
    where = run_dir if run_dir is not None else runs_root / f"{stem}-*"
    raise AdaptError(f"train.resume=latest: no complete checkpoint found in {where}. Start without --resume, "
                     "or pass the run folder to resume.")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
