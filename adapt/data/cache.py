"""On-disk caches of VAE latents and text-encoder embeddings.

When the VAE encoder (or the text encoder) is frozen, encoding the same image
(or caption) again every epoch is wasted work.  Each entry is one small
safetensors file named by a hash of everything that decides its value:
  latents:    image bytes + transform settings + VAE identity (both flips stored)
  embeddings: caption text + tokenizer settings + text-encoder identity
so a changed image, transform or model simply misses the cache.  Files are
written to a temporary name and renamed (atomic), and read lazily per item, so
memory stays flat however large the dataset grows.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm


def default_cache_dir(configured: Optional[str] = None) -> Path:
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("ADAPT_CACHE") or Path.home() / ".cache" / "adapt")


def module_identity(module: torch.nn.Module) -> str:
    """Digest of a module's config and weights: a different model can never share cache entries."""
    h = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        h.update(json.dumps(dict(config) if not hasattr(config, "to_dict") else config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: Optional[dict] = None) -> None:
    """safetensors write to a temp file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class _Store:
    """A folder of safetensors entries addressed by key, with a small in-memory LRU in front.

    The LRU holds at most `memory_budget` bytes, so memory stays bounded however large the dataset is, while a
    small dataset (the common LoRA case) is read from disk once per process instead of once per step.
    """

    memory_budget = 256 * 2**20

    def __init__(self, root: Path):
        self.root = root
        self.encoded = 0  # entries computed (not read) in this process: tests and logs use it
        self._lru: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._lru_bytes = 0

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str) -> dict[str, torch.Tensor]:
        if key in self._lru:
            self._lru.move_to_end(key)
            return self._lru[key]
        entry = load_file(str(self.path(key)))
        size = sum(t.numel() * t.element_size() for t in entry.values())
        if size <= self.memory_budget:
            self._lru[key] = entry
            self._lru_bytes += size
            while self._lru_bytes > self.memory_budget:
                _, old = self._lru.popitem(last=False)
                self._lru_bytes -= sum(t.numel() * t.element_size() for t in old.values())
        return entry

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        atomic_save(tensors, self.path(key))
        self.encoded += 1


class LatentCache(_Store):
    def __init__(self, cache_dir: Path, base, dataset):
        self.base, self.dataset = base, dataset
        # Only the encoder side decides latents: a fine-tuned decoder keeps the cache valid.
        parts = [base.vae.encoder] + [m for m in [getattr(base.vae, "quant_conv", None)] if m is not None]
        self.vae_id = hashlib.sha256("".join(module_identity(m) for m in parts).encode()).hexdigest()[:24]
        super().__init__(Path(cache_dir) / "latents" / self.vae_id)
        self._keys: dict[int, str] = {}

    def key(self, index: int) -> str:
        if index not in self._keys:
            image, _ = self.dataset.image_bytes(index)
            h = hashlib.sha256(image)
            h.update(self.dataset.transform_key().encode())
            h.update(f"{self.base.scaling_factor}:{self.base.shift_factor}".encode())
            self._keys[index] = h.hexdigest()
        return self._keys[index]

    @torch.no_grad()
    def fill(self, batch_size: int = 8, show_progress: bool = True) -> int:
        """Encode every item not yet cached (both flips when random_flip is on). Returns how many were encoded."""
        missing = sorted({self.key(i): i for i in range(len(self.dataset)) if not self.has(self.key(i))}.values())
        flips = (False, True) if self.dataset.settings.random_flip else (False,)
        for start in tqdm(range(0, len(missing), batch_size), desc="caching latents", disable=not show_progress or not missing):
            chunk = missing[start:start + batch_size]
            encoded = {}
            for flip in flips:
                pixels = torch.stack([self.dataset.item(i, flip=flip)["pixel_values"] for i in chunk])
                encoded[flip] = self.base.encode_images(pixels).cpu()
            for j, i in enumerate(chunk):
                self.put(self.key(i), {f"flip{int(f)}": encoded[f][j] for f in flips})
        return len(missing)

    def latents(self, index: int, flip: bool) -> torch.Tensor:
        return self.get(self.key(index))[f"flip{int(flip)}"]


class TextCache(_Store):
    def __init__(self, cache_dir: Path, base):
        self.base = base
        self.te_id = module_identity(base.text_encoder)
        super().__init__(Path(cache_dir) / "text" / self.te_id)

    def key(self, caption: str) -> str:
        tok = self.base.tokenizer
        return hashlib.sha256(f"{caption}\0{tok.model_max_length}\0{len(tok)}".encode()).hexdigest()

    @torch.no_grad()
    def fill(self, captions: list[str], batch_size: int = 32, show_progress: bool = True) -> int:
        missing = sorted({c for c in captions if not self.has(self.key(c))})
        for start in tqdm(range(0, len(missing), batch_size), desc="caching text embeddings", disable=not show_progress or not missing):
            chunk = missing[start:start + batch_size]
            hidden = self.base.encode_prompt(chunk).float().cpu()
            for j, caption in enumerate(chunk):
                self.put(self.key(caption), {"encoder_hidden_states": hidden[j]})
        return len(missing)

    def embedding(self, caption: str) -> torch.Tensor:
        return self.get(self.key(caption))["encoder_hidden_states"]


class CachedDataset(Dataset):
    """Serves training examples from the caches; pixels are decoded only when the recipe needs them.

    Indices are (index, epoch) pairs so flips and caption dropout follow the dataset's seeded decisions.
    """

    def __init__(self, dataset, latents: Optional[LatentCache], text: Optional[TextCache], needs_pixels: bool):
        self.dataset, self.latent_cache, self.text_cache, self.needs_pixels = dataset, latents, text, needs_pixels
        self.has_conditioning = any(r.conditioning_path for r in dataset.records)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, None)
        flip = self.dataset.flip(index, epoch)
        if self.latent_cache is None or self.needs_pixels or self.has_conditioning:
            example = self.dataset.item(index, epoch, flip=flip)
        else:
            rec = self.dataset.records[index]
            example = {"caption": self.dataset.caption(index, epoch), "role": rec.role, "image_path": rec.image_path}
        if self.latent_cache is not None:
            example["latents"] = self.latent_cache.latents(index, flip)
            if not self.needs_pixels:
                example.pop("pixel_values", None)
        if self.text_cache is not None:
            example["encoder_hidden_states"] = self.text_cache.embedding(example["caption"])
        return example
