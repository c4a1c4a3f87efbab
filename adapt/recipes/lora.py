"""LoRA (Hu et al. 2021) on the UNet's attention projections, optionally on the text encoder; DoRA, LoHa, LoKr via peft.

peft injects and trains the low-rank layers; diffusers writes and reads the
standard `pytorch_lora_weights.safetensors`, so `pipe.load_lora_weights(run_dir)`
works in plain diffusers without adapt installed.  LoHa (Hyeon-Woo et al. 2022) and
LoKr (Yeh et al. 2023), which diffusers' SD loader cannot read, are saved in the
LyCORIS convention (`lycoris_weights.safetensors`, kohya names with hada_*/lokr_*
tensors) that A1111/Forge and ComfyUI load, and that `apply` (adapt.export) reads back.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import Field, model_validator

from adapt.config import Section
from adapt.recipes import Recipe, register_recipe
from adapt.train.diffusion import batch_latents, batch_text, unet_predictor

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LYCORIS_NAME = "lycoris_weights.safetensors"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class LoRAConfig(Section):
    type: Literal["lora", "loha", "lokr"] = Field("lora", description="Adapter kind: lora (low-rank, + DoRA with use_dora), loha (Hadamard product of two low-rank factors) or lokr (Kronecker product).")
    rank: int = Field(8, gt=0, description="LoRA rank r (inner dimension of the low-rank update).")
    alpha: Optional[float] = Field(None, gt=0, description="LoRA alpha; the update is scaled by alpha/rank. Default: equal to rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    init: Literal["default", "gaussian"] = Field("default", description="Init of A (B is always zero, so training starts at the base).")
    target_modules: list[str] = Field(default_factory=lambda: list(UNET_TARGETS), description="UNet module names to adapt.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA, Liu et al. 2024) through peft.")
    train_text_encoder: bool = Field(False, description="Also put LoRA layers on the text encoder.")
    text_encoder_rank: Optional[int] = Field(None, gt=0, description="Rank for the text encoder (default: rank).")
    text_encoder_target_modules: list[str] = Field(default_factory=lambda: list(TEXT_TARGETS), description="Text-encoder module names to adapt.")

    @model_validator(mode="after")
    def _check(self):
        if not self.target_modules:
            raise ValueError("target_modules is empty; list at least one UNet module, e.g. [to_q, to_k, to_v, to_out.0]")
        if self.type != "lora" and (self.use_dora or self.init != "default"):
            raise ValueError(f"use_dora and init apply to type lora only; remove them or set lora.type=lora (type is {self.type})")
        return self


def _peft_config(rank: int, alpha: Optional[float], rc: LoRAConfig, targets: list[str]):
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if rc.type != "lora":  # peft's default init keeps one factor at zero, so training starts at the base
        cls = LoHaConfig if rc.type == "loha" else LoKrConfig
        return cls(r=rank, alpha=alpha or rank, module_dropout=rc.dropout, target_modules=targets)
    return LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=rc.dropout, target_modules=targets,
                      init_lora_weights=True if rc.init == "default" else "gaussian", use_dora=rc.use_dora)


def lora_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in module.named_parameters() if "lora_" in n or "hada_" in n or "lokr_" in n]


@register_recipe("lora")
class LoRA(Recipe):
    """Low-rank adapters on the UNet (and optionally the text encoder)."""

    Config = LoRAConfig
    roles = ("instance",)

    def prepare(self, base) -> list[torch.nn.Parameter]:
        rc = self.rc
        base.unet.add_adapter(_peft_config(rc.rank, rc.alpha, rc, rc.target_modules))
        params = lora_parameters(base.unet)
        if rc.train_text_encoder:
            base.text_encoder.add_adapter(_peft_config(rc.text_encoder_rank or rc.rank, rc.alpha, rc, rc.text_encoder_target_modules))
            params += lora_parameters(base.text_encoder)
        for p in params:  # fp32 master weights whatever the base dtype
            p.data = p.data.float()
            p.requires_grad_(True)
        return params

    def loss(self, batch, base):
        latents = batch_latents(batch, base)
        cond = batch_text(batch, base)
        loss = self.objective.per_example_loss(latents, unet_predictor(base.unet, cond)).mean()
        return loss, {}

    # ---- checkpoints -------------------------------------------------------------------------
    def _modules(self, base):
        return {"unet": base.unet, **({"text_encoder": base.text_encoder} if self.rc.train_text_encoder else {})}

    def trainable_state_dict(self, base):
        from peft.utils import get_peft_model_state_dict

        return {f"{name}.{k}": v for name, m in self._modules(base).items() for k, v in get_peft_model_state_dict(m).items()}

    def load_trainable_state_dict(self, base, state):
        from peft.utils import set_peft_model_state_dict

        for name, module in self._modules(base).items():
            part = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            set_peft_model_state_dict(module, part)

    # ---- the artifact ------------------------------------------------------------------------
    def save(self, run_dir: Path, base, metadata: dict[str, str]) -> None:
        if self.rc.type != "lora":
            return self._save_lycoris(Path(run_dir), base, metadata)
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = {f"{name}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(m))
                  for name, m in self._modules(base).items()}
        adapter_meta = {f"{name}_lora_adapter_metadata": m.peft_config["default"].to_dict()
                        for name, m in self._modules(base).items()}
        for meta in adapter_meta.values():  # sets are not JSON
            meta["target_modules"] = sorted(meta["target_modules"]) if meta.get("target_modules") else meta.get("target_modules")
        tmp = Path(run_dir) / ".lora-tmp"
        StableDiffusionPipeline.save_lora_weights(str(tmp), safe_serialization=True, **layers, **adapter_meta)
        ours = {**metadata, "adapt.recipe": "lora", "adapt.rank": str(self.rc.rank),
                "adapt.alpha": str(self.rc.alpha or self.rc.rank), "adapt.use_dora": str(self.rc.use_dora).lower(),
                "adapt.train_text_encoder": str(self.rc.train_text_encoder).lower()}
        add_metadata(tmp / WEIGHT_NAME, Path(run_dir) / WEIGHT_NAME, ours)
        tmp.joinpath(WEIGHT_NAME).unlink(missing_ok=True)
        tmp.rmdir()
        write_model_card(Path(run_dir), ours)

    def _save_lycoris(self, run_dir: Path, base, metadata: dict[str, str]) -> None:
        from adapt.export.convention import from_peft
        from adapt.export.meta import training_metadata
        from adapt.export.files import write_adapters
        from peft.utils import get_peft_model_state_dict

        rc, adapters = self.rc, {}
        for name, m in self._modules(base).items():
            rank = (rc.text_encoder_rank or rc.rank) if name == "text_encoder" else rc.rank
            adapters.update(from_peft(get_peft_model_state_dict(m), name, (rc.alpha or rank) / rank))
        ours = {**metadata, "adapt.recipe": "lora", "adapt.type": rc.type, "adapt.rank": str(rc.rank),
                "adapt.alpha": str(rc.alpha or rc.rank), "adapt.use_dora": "false",
                "adapt.train_text_encoder": str(rc.train_text_encoder).lower()}
        write_adapters(adapters, run_dir / LYCORIS_NAME, "kohya", metadata={**training_metadata(ours, adapters), **ours})
        write_model_card(run_dir, ours)

    def preview_pipeline(self, base, scale: float = 1.0):
        return base.pipeline(), {"cross_attention_kwargs": {"scale": scale}}

    @classmethod
    def apply(cls, pipe, run_dir: Path, scale: float = 1.0, **kwargs):
        """Load the run's adapter into the pipeline (once) and set its weight; other loaded LoRAs keep theirs.

        `run_dir` may also be a single .safetensors adapter file in any convention adapt.export reads
        (diffusers/PEFT, kohya/A1111, LyCORIS LoHa/LoKr, DoRA).
        """
        path = Path(run_dir)
        name = "adapt_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
        loaded = set(getattr(pipe.unet, "peft_config", {}) or {}) | set(getattr(pipe.text_encoder, "peft_config", {}) or {})
        names = sorted(n for n in loaded if n == name or n.startswith(name + "_"))
        if not names and path.is_dir() and (path / WEIGHT_NAME).is_file():
            from adapt.export.apply import quiet_empty_text_encoder_note

            quiet_empty_text_encoder_note()
            pipe.load_lora_weights(str(path), weight_name=WEIGHT_NAME, adapter_name=name)
            names = [name]
        elif not names:
            from adapt.export.apply import apply_file

            names = apply_file(pipe, path / LYCORIS_NAME if path.is_dir() else path, name)
        weights = dict(getattr(pipe, "_adapt_lora_weights", {}))
        weights.update({n: float(scale) for n in names})
        pipe._adapt_lora_weights = weights
        pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))
        return pipe


def add_metadata(src: Path, dst: Path, extra: dict[str, str]) -> None:
    """Rewrite a safetensors file with `extra` merged into its header metadata (atomically)."""
    from safetensors import safe_open

    from adapt.data.cache import atomic_save

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update({k: str(v) for k, v in extra.items()})
    atomic_save(tensors, dst, metadata=meta)


def write_model_card(run_dir: Path, meta: dict[str, str]) -> None:
    trigger = meta.get("trigger") or "(none)"
    card = f"""# LoRA adapter trained with adapt

- base model: `{meta.get('base_model')}` (family: {meta.get('family')}, prediction: {meta.get('prediction_type')})
- rank {meta.get('adapt.rank')}, alpha {meta.get('adapt.alpha')}, DoRA: {meta.get('adapt.use_dora')}, text encoder trained: {meta.get('adapt.train_text_encoder')}
- steps: {meta.get('steps')}, resolution: {meta.get('resolution')}, seed: {meta.get('seed')}
- trigger word(s): {trigger}

## Use it

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{meta.get('base_model')}")
pipe.load_lora_weights("{run_dir}")      # reads {WEIGHT_NAME}
image = pipe("your prompt", cross_attention_kwargs={{"scale": 0.8}}).images[0]
```

or `adapt sample --adapter {run_dir} --prompt "..." --scale 0.8`.
"""
    (run_dir / "README.md").write_text(card)
    (run_dir / "adapter_info.json").write_text(json.dumps(meta, indent=2))
