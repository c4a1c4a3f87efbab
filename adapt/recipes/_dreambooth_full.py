"""DreamBooth artifacts: the full-fine-tune model folder, its `apply`, and the model card.

Full mode writes a *complete* diffusers folder into the run directory: the
trained components saved with `save_pretrained`, everything else copied from
the base folder unchanged.  diffusers has no way for a model_index.json to point
at another folder for some components, and a complete folder is what
`StableDiffusionPipeline.from_pretrained(run_dir)` needs without adapt.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from adapt.recipes.lora import WEIGHT_NAME

INFO_FILE = "adapter_info.json"


def save_full(run_dir: Path, base, trained: list[str]) -> None:
    """Trained components via save_pretrained; the rest copied from a base folder (or saved from memory)."""
    source = Path(base.source).expanduser()
    if (source / "model_index.json").is_file():
        index = json.loads((source / "model_index.json").read_text())
        for name in index:
            if name.startswith("_") or name in trained or not (source / name).is_dir():
                continue
            shutil.rmtree(run_dir / name, ignore_errors=True)
            shutil.copytree(source / name, run_dir / name)
        shutil.copy2(source / "model_index.json", run_dir / "model_index.json")
    else:  # single-file or hub base: write every component from memory
        from diffusers import DDIMScheduler

        pipe = base.pipeline(scheduler=DDIMScheduler.from_config(base.noise_scheduler.config))
        pipe.save_pretrained(run_dir, safe_serialization=True)
        return
    for name in trained:
        getattr(base, name).save_pretrained(run_dir / name, safe_serialization=True)


def _params(module) -> dict[str, torch.nn.Parameter]:
    """Parameters by their plain name (peft wraps layers as `.base_layer`; its own lora_ weights are not ours)."""
    return {n.replace(".base_layer", ""): p for n, p in module.named_parameters() if "lora_" not in n}


@torch.no_grad()
def apply_full(pipe, run_dir: Path, scale: float, trained: list[str]):
    """Set each trained component to lerp(base, fine-tuned, scale), in place.

    Scale 0 restores the base bit for bit (torch.lerp returns `start` exactly at weight 0), 1 gives the
    fine-tuned weights exactly; values in between interpolate the weights (not the outputs).  The base
    weights are kept on the CPU the first time, so the scale can be changed again later.
    """
    store = pipe.__dict__.setdefault("_adapt_full", {})
    for name in trained:
        module = getattr(pipe, name)
        params = _params(module)
        entry = store.setdefault(name, {"base": {n: p.detach().cpu().clone() for n, p in params.items()}, "run": None})
        if entry["run"] != str(run_dir):
            tuned = type(module).from_pretrained(str(run_dir / name), torch_dtype=torch.float32)
            entry["tuned"], entry["run"] = {n: t.detach().cpu() for n, t in tuned.state_dict().items()}, str(run_dir)
        for n, p in params.items():
            start, end = entry["base"][n].float(), entry["tuned"][n].float()
            p.copy_(torch.lerp(start, end, float(scale)).to(p.device, p.dtype))
    return pipe


def write_card(run_dir: Path, meta: dict[str, str]) -> None:
    info_path = run_dir / INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info.update(meta)
    info_path.write_text(json.dumps(info, indent=2))
    base = meta.get("base_model")
    if meta.get("adapt.mode") == "full":
        use = f"""```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{run_dir}")   # a complete model folder
image = pipe("{meta.get('adapt.instance_prompt')}").images[0]
```

`adapt sample --adapter {run_dir} --scale s` interpolates the weights between the base (s=0, exactly the base)
and the fine-tuned model (s=1)."""
    else:
        use = f"""```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{base}")
pipe.load_lora_weights("{run_dir}")      # reads {WEIGHT_NAME}
image = pipe("{meta.get('adapt.instance_prompt')}", cross_attention_kwargs={{"scale": 1.0}}).images[0]
```"""
    card = f"""# DreamBooth ({meta.get('adapt.mode')} mode) trained with adapt

- base model: `{base}` (family: {meta.get('family')}, prediction: {meta.get('prediction_type')})
- identifier: `{meta.get('adapt.identifier')}`; instance prompt: {meta.get('adapt.instance_prompt')}
- class prompt(s): {meta.get('adapt.class_prompt') or '(none)'}; prior_loss_weight: {meta.get('adapt.prior_loss_weight')}
- trained: {meta.get('adapt.trained_components')}; steps: {meta.get('steps')}, resolution: {meta.get('resolution')}, seed: {meta.get('seed')}

## Use it

{use}
"""
    (run_dir / "README.md").write_text(card)
