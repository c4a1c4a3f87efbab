"""The contract every registered recipe keeps (see DESIGN.md):

1. at init the adapted output equals the base output (LoRA B=0, zero-convs, ...);
2. after a few steps only the intended parameters changed: frozen ones are bit-identical;
3. the saved artifact, applied to a freshly loaded base, reproduces the trained model's outputs;
4. the config round-trips through its YAML dump.

A recipe is covered by adding its minimal settings to CASES; a registered
recipe without a case fails loudly, so no recipe slips past the contract.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from adapt.base import BaseModel
from adapt.config import load_config
from adapt.infer import attach, generate
from adapt.recipes import available_recipes, get_recipe
from adapt.testing import make_image_folder
from adapt.train.trainer import train

# recipe name -> list of (case id, recipe section, extra overrides, data roles)
CASES: dict[str, list[tuple[str, dict, list[str], tuple[str, ...]]]] = {
    "lora": [("lora", {"rank": 4}, [], ("instance",)),
             ("lora-te-dora", {"rank": 4, "use_dora": True, "train_text_encoder": True}, [], ("instance",)),
             ("loha", {"rank": 4, "type": "loha"}, [], ("instance",)),
             ("lokr", {"rank": 4, "type": "lokr"}, [], ("instance",))],
    "dreambooth": [
        ("dreambooth-lora", {"instance_prompt": "a sks square", "class_prompt": "a square", "num_class_images": 2,
                             "class_steps": 2, "lora": {"rank": 4}}, [], ("instance",)),
        ("dreambooth-full", {"mode": "full", "instance_prompt": "a sks square", "class_prompt": "a square",
                             "num_class_images": 2, "class_steps": 2}, ["train.lr=1e-4"], ("instance",))],
    "controlnet": [("controlnet", {}, [], ("control",))],
    "vae_decoder": [("vae_decoder", {}, ["train.lr=1e-3"], ("instance",))],
}
PROMPT = "a red square"


def _cases():
    for name in available_recipes():
        for case in CASES.get(name, [(f"{name}-missing", None, [], ())]):
            yield pytest.param(name, *case[1:], id=case[0])


def _dataset(tmp_path, roles) -> str:
    subsets = []
    for role in roles:
        folder = make_image_folder(tmp_path / role, n=4, size=32, seed=len(subsets))
        sub = {"path": str(folder), "role": role}
        if role == "control":
            cond = make_image_folder(tmp_path / f"{role}_maps", n=4, size=32, seed=9, captions=False)
            sub["conditioning_path"] = str(cond)
        subsets.append(sub)
    path = tmp_path / "dataset.yaml"
    path.write_text(yaml.safe_dump({"subsets": subsets}))
    return str(path)


def _config(name, section, overrides, roles, base_dir, tmp_path, steps=3):
    raw = {"recipe": name, "base": {"path": str(base_dir)},
           "data": {"dataset": _dataset(tmp_path, roles), "resolution": 32},
           "train": {"steps": steps, "batch_size": 2, "lr": 5e-3, "checkpoint_every": 100, "seed": 3},
           "preview": {"prompts": [PROMPT], "steps": 4}, "output_dir": str(tmp_path / "run"), name: section}
    return load_config(None, overrides, raw=raw)


def _pixels(pipe, extra=None):
    return np.asarray(generate(pipe, [PROMPT], [11], steps=4, **(extra or {}))[0]).astype(np.int16)


@pytest.mark.parametrize("name,section,overrides,roles", list(_cases()))
def test_recipe_contract(name, section, overrides, roles, tiny_base_dir, tmp_path):
    assert section is not None, f"recipe '{name}' has no contract case: add its minimal settings to CASES"
    cfg = _config(name, section, overrides, roles, tiny_base_dir, tmp_path)

    # 4. the config round-trips through its YAML dump.
    again = load_config(None, [], raw=yaml.safe_load(yaml.safe_dump(cfg.dump())))
    assert again.dump() == cfg.dump()

    # 1. at init the adapted model generates exactly what the base does.
    base = BaseModel.load(str(tiny_base_dir))
    before = _pixels(base.pipeline())
    recipe = get_recipe(name)(cfg)
    recipe.prepare(base)
    pipe, extra = recipe.preview_pipeline(base, 1.0)
    np.testing.assert_array_equal(_pixels(pipe, extra), before)

    # 2. training changes the trainable parameters and nothing else.
    reference = {k: v.clone() for m in ("unet", "vae", "text_encoder")
                 for k, v in _named(getattr(BaseModel.load(str(tiny_base_dir)), m), m).items()}
    seen = {}
    run_dir = train(cfg, callbacks=[lambda t: seen.setdefault("trainer", t)], runs_root=tmp_path / "runs")
    trainer = seen["trainer"]
    trained = {id(p) for p in trainer.params}
    changed_trainable = False
    for m in ("unet", "vae", "text_encoder"):
        for k, p in getattr(trainer.base, m).named_parameters():
            key = f"{m}.{k.replace('.base_layer', '')}"
            if id(p) in trained:
                changed_trainable |= key not in reference or not torch.equal(p.detach().cpu(), reference[key])
            elif key in reference:
                assert torch.equal(p.detach().cpu(), reference[key]), f"frozen parameter {key} changed"
    recipe_state = trainer.recipe.trainable_state_dict(trainer.base)
    assert recipe_state, "trainable_state_dict is empty"
    assert changed_trainable or _any_changed_outside_base(trainer), "training changed no trainable parameter"

    # 3. the saved artifact on a fresh base reproduces the trained model.
    live_pipe, live_extra = trainer.recipe.preview_pipeline(trainer.base, 1.0)
    for mod in (trainer.base.unet, trainer.base.text_encoder, trainer.base.vae):
        mod.eval()
    live = _pixels(live_pipe, live_extra)
    fresh = attach(BaseModel.load(str(tiny_base_dir)).pipeline(), run_dir, scale=1.0)
    reloaded = _pixels(fresh, getattr(fresh, "_adapt_generate_kwargs", None))
    # Same weights through a different code path (e.g. peft scale kwargs vs loaded adapters): float round-off only.
    diff = np.abs(reloaded - live)
    assert diff.max() <= 4 and diff.mean() < 0.5, f"the saved artifact does not reproduce the trained model ({diff.max()})"
    assert (run_dir / "adapt_run.json").is_file() and (run_dir / "config.yaml").is_file()
    saved_cfg = load_config(None, [], raw=yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert saved_cfg.recipe == name


def _named(module, prefix):
    return {f"{prefix}.{k}": v.detach().cpu() for k, v in module.named_parameters()}


def _any_changed_outside_base(trainer) -> bool:
    """Recipes that train their own module (e.g. a ControlNet) keep it outside the base."""
    base_ids = {id(p) for m in (trainer.base.unet, trainer.base.vae, trainer.base.text_encoder) for p in m.parameters()}
    return any(id(p) not in base_ids for p in trainer.params)
