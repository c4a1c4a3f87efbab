"""DreamBooth: class-image generation (resumable, reused, never in user folders), prior loss, both modes, bad input."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from adapt.base import BaseModel
from adapt.config import load_config
from adapt.data.dataset import collate_examples
from adapt.errors import ConfigError, DataError
from adapt.infer import attach, generate
from adapt.recipes import _classimages as ci
from adapt.recipes.dreambooth import DreamBooth, IdentifierWarning
from adapt.testing import make_image_folder
from adapt.train.trainer import train

CLASS_PROMPT = "a square"


def _cfg(base_dir, dataset, tmp_path, name="run", steps=2, **section):
    db = {"instance_prompt": "a sks square", "class_prompt": CLASS_PROMPT, "num_class_images": 4, "class_steps": 3,
          "class_batch_size": 2, **section}
    raw = {"recipe": "dreambooth", "base": {"path": str(base_dir)},
           "data": {"dataset": str(dataset), "resolution": 32},
           "train": {"steps": steps, "batch_size": 2, "lr": 5e-3, "checkpoint_every": 100, "seed": 3},
           "output_dir": str(tmp_path / name), "dreambooth": db}
    return load_config(None, [], raw=raw)


def _listing(folder):
    return sorted((p.name, p.stat().st_size) for p in folder.iterdir())


def _pixels(pipe, prompts, seeds=(1, 2), steps=4):
    images = generate(pipe, [p for p in prompts for _ in seeds], list(seeds) * len(prompts), steps=steps)
    return np.stack([np.asarray(im) for im in images]).astype(np.int16)


@pytest.fixture
def instance_folder(tmp_path):
    return make_image_folder(tmp_path / "subject", n=4, size=32, seed=1)


# ---- class images ------------------------------------------------------------------------------
def test_class_images_resume_after_interrupt_and_are_reused(tiny_base_dir, tmp_path):
    base = BaseModel.load(str(tiny_base_dir))
    settings = ci.ClassImageSettings((CLASS_PROMPT, "a big square"), None, "ddim", 3, 5.0, base.sample_size, 7, batch_size=2)
    folder = ci.cache_folder(tmp_path / "cache", base, settings)

    def stop_after_first_batch(done):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ci.ensure_class_images(base.pipeline(), folder, 5, settings, on_batch=stop_after_first_batch)
    assert ci.existing(folder, 5) == [0, 1]
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")], "a temp file was left behind"

    paths, made = ci.ensure_class_images(base.pipeline(), folder, 5, settings)
    assert made == 3 and [p.name for p in paths] == [f"{i:06d}.png" for i in range(5)]
    assert (folder / "000001.txt").read_text() == "a big square"  # prompts are used in turn and saved
    _, made_again = ci.ensure_class_images(base.pipeline(), folder, 5, settings)
    assert made_again == 0
    _, more = ci.ensure_class_images(base.pipeline(), folder, 6, settings)
    assert more == 1  # asking for more generates only the new ones

    # the resumed folder holds exactly what an uninterrupted generation makes
    fresh = tmp_path / "uninterrupted"
    ci.ensure_class_images(base.pipeline(), fresh, 5, settings)
    from PIL import Image
    for i in range(5):
        a, b = (np.asarray(Image.open(f / f"{i:06d}.png")) for f in (folder, fresh))
        np.testing.assert_array_equal(a, b)


def test_class_image_cache_key(tiny_base_dir, tmp_path):
    base = BaseModel.load(str(tiny_base_dir))
    s = ci.ClassImageSettings((CLASS_PROMPT,), None, "ddim", 3, 5.0, 32, 0, batch_size=2)
    key = ci.cache_folder(tmp_path, base, s)
    assert ci.cache_folder(tmp_path, base, ci.ClassImageSettings((CLASS_PROMPT,), None, "ddim", 3, 5.0, 32, 0, 8)) == key
    assert ci.cache_folder(tmp_path, base, ci.ClassImageSettings(("a circle",), None, "ddim", 3, 5.0, 32, 0, 2)) != key
    assert ci.cache_folder(tmp_path, base, ci.ClassImageSettings((CLASS_PROMPT,), None, "ddim", 3, 7.0, 32, 0, 2)) != key
    with torch.no_grad():
        next(base.unet.parameters()).add_(0.01)  # another checkpoint of the same architecture
    assert ci.cache_folder(tmp_path, base, s) != key


def test_training_generates_once_and_never_writes_into_user_folders(tiny_base_dir, instance_folder, tmp_path):
    user_class = make_image_folder(tmp_path / "my_class", n=2, size=32, seed=5)
    dataset = tmp_path / "db.yaml"
    dataset.write_text(f"subsets:\n  - path: {instance_folder}\n    role: instance\n"
                       f"  - path: {user_class}\n    role: class\n")
    before = (_listing(instance_folder), _listing(user_class))
    seen = {}
    run = train(_cfg(tiny_base_dir, dataset, tmp_path, "first"), callbacks=[lambda t: seen.setdefault("t", t)])
    info = json.loads((run / "class_images.json").read_text())
    assert info["user_images"] == 2 and info["generated_images"] == 2 and info["generated_now"] == 2
    again = json.loads((train(_cfg(tiny_base_dir, dataset, tmp_path, "second")) / "class_images.json").read_text())
    assert again["generated_now"] == 0 and again["generated_folder"] == info["generated_folder"]
    assert (_listing(instance_folder), _listing(user_class)) == before

    # each example carries a class partner; the loss is instance + weight * prior, both reported
    trainer = seen["t"]
    batch = collate_examples([trainer.dataset[(i, 0)] for i in range(2)])
    assert len(batch["class_caption"]) == 2 and set(batch["class_caption"]) == {CLASS_PROMPT}
    loss, logs = trainer.recipe.loss(batch, trainer.base)
    assert set(logs) == {"instance_loss", "prior_loss"}
    assert float(loss) == pytest.approx(logs["instance_loss"] + 1.0 * logs["prior_loss"], rel=1e-5)
    # the partner is a pure function of (seed, epoch, index): the same after a resume
    assert trainer.dataset[(1, 3)]["class_caption"] == trainer.dataset[(1, 3)]["class_caption"]
    assert [trainer.dataset.dataset.partner(i, 3) for i in range(4)] == [trainer.dataset.dataset.partner(i, 3) for i in range(4)]


# ---- full mode ---------------------------------------------------------------------------------
def test_full_mode_folder_loads_in_plain_diffusers_and_scale_zero_is_base(tiny_base_dir, instance_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    cfg = _cfg(tiny_base_dir, instance_folder, tmp_path, "full", mode="full")
    cfg.train.optimizer, cfg.train.gradient_checkpointing = "adamw8bit", True
    base_px = _pixels(BaseModel.load(str(tiny_base_dir)).pipeline(), [CLASS_PROMPT])
    run = train(cfg)
    assert (run / "unet" / "diffusion_pytorch_model.safetensors").is_file() and (run / "model_index.json").is_file()
    plain = StableDiffusionPipeline.from_pretrained(str(run), safety_checker=None, requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    tuned_px = _pixels(plain, [CLASS_PROMPT])
    assert np.abs(tuned_px - base_px).max() > 0, "full fine-tuning changed nothing"

    pipe = attach(BaseModel.load(str(tiny_base_dir)).pipeline(), run, scale=1.0)
    assert np.abs(_pixels(pipe, [CLASS_PROMPT]) - tuned_px).max() <= 1
    pipe = attach(pipe, run, scale=0.0)
    np.testing.assert_array_equal(_pixels(pipe, [CLASS_PROMPT]), base_px)
    # the untrained components are the base's, byte for byte
    assert (run / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (tiny_base_dir / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    meta = json.loads((run / "adapter_info.json").read_text())
    assert meta["adapt.mode"] == "full" and meta["adapt.trained_components"] == "unet"


# ---- bad input ---------------------------------------------------------------------------------
def test_missing_class_prompt_with_prior_is_an_error(tiny_base_dir, instance_folder, tmp_path):
    with pytest.raises(ConfigError, match="dreambooth.class_prompt"):
        _cfg(tiny_base_dir, instance_folder, tmp_path, class_prompt=None)
    _cfg(tiny_base_dir, instance_folder, tmp_path, class_prompt=None, prior_loss_weight=0.0)  # fine without prior


def test_instance_prompt_without_identifier_is_an_error(tiny_base_dir, instance_folder, tmp_path):
    with pytest.raises(ConfigError, match="dreambooth.identifier"):
        _cfg(tiny_base_dir, instance_folder, tmp_path, instance_prompt="a photo of a square")
    with pytest.raises(ConfigError, match="zwx"):
        _cfg(tiny_base_dir, instance_folder, tmp_path, identifier="zwx")


def test_dataset_captions_without_identifier_are_an_error(tiny_base_dir, instance_folder, tmp_path):
    cfg = _cfg(tiny_base_dir, instance_folder, tmp_path, instance_prompt=None, prior_loss_weight=0.0, class_prompt=None)
    with pytest.raises(ConfigError, match="lack the identifier 'sks'"):
        train(cfg)


def test_common_word_identifier_warns(tiny_base_dir, instance_folder, tmp_path):
    base = BaseModel.load(str(tiny_base_dir))
    assert ci.identifier_warnings("square", base.tokenizer, [CLASS_PROMPT])
    assert not ci.identifier_warnings("sks", base.tokenizer, [CLASS_PROMPT])
    cfg = _cfg(tiny_base_dir, instance_folder, tmp_path, identifier="square", instance_prompt="a square square",
               generate_class_images=False, num_class_images=1)
    with pytest.warns(IdentifierWarning, match="dreambooth.identifier 'square'"), pytest.raises(DataError):
        DreamBooth(cfg).setup_data(base, tmp_path, _dataset(cfg))


class _BigVocab:
    """A stand-in for SD's 49k CLIP vocabulary (ids ordered by merge frequency)."""

    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return 49408

    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": self.ids[text]})()

    def convert_ids_to_tokens(self, ids):
        return [{1929: "dog</w>", 48136: "sks</w>"}[i] for i in ids]


def test_common_word_rule_on_a_large_vocabulary():
    tok = _BigVocab({"dog": [1929], "sks": [48136]})
    assert any("common word" in r for r in ci.identifier_warnings("dog", tok, ["a photo of a cat"]))
    assert not ci.identifier_warnings("sks", tok, ["a photo of a dog"])


def test_too_few_class_images_without_generation_names_the_keys(tiny_base_dir, instance_folder, tmp_path):
    user_class = make_image_folder(tmp_path / "my_class", n=2, size=32, seed=5)
    dataset = tmp_path / "db.yaml"
    dataset.write_text(f"subsets:\n  - path: {instance_folder}\n    role: instance\n  - path: {user_class}\n    role: class\n")
    before = _listing(user_class)
    cfg = _cfg(tiny_base_dir, dataset, tmp_path, generate_class_images=False, num_class_images=5)
    with pytest.raises(DataError, match="num_class_images is 5.*generate_class_images is false"):
        train(cfg)
    assert _listing(user_class) == before
    assert not (tmp_path / "adapt_cache" / "class_images").exists()


def _dataset(cfg):
    from adapt.data.dataset import build_dataset

    return build_dataset(cfg.data.dataset, cfg.data.resolution)


# ---- the claim, shortened ------------------------------------------------------------------------
@pytest.mark.slow
def test_prior_preservation_keeps_class_outputs_closer_to_the_base(tiny_base_dir, tmp_path):
    """Ruiz et al.'s language drift, in miniature: training 'a sks square' on white discs drags 'a square' along;
    the class loss holds it near the base's own 'a square'.

    The prior loss keeps a model where it already denoises its own class samples well, which a randomly
    initialised fixture does not; so the fixture first learns 'a square' (100 full fine-tune steps on coloured
    squares, through this very recipe), and that model is the base of the two DreamBooth runs.  Across seeds 3-6
    and lr 2e-4..5e-4 the prior run's drift was 0.75-0.91 of the other run's (measured while writing this test).
    """
    from PIL import Image, ImageDraw

    squares = make_image_folder(tmp_path / "squares", n=8, size=32, seed=0)
    pre = _cfg(tiny_base_dir, squares, tmp_path, "pretrained", steps=100, mode="full", identifier="square",
               instance_prompt=CLASS_PROMPT, prior_loss_weight=0.0, class_prompt=None)
    pre.train.batch_size, pre.train.lr, pre.train.seed = 4, 1e-3, 4
    base_dir = train(pre)
    subject = tmp_path / "discs"
    subject.mkdir()
    for i in range(4):
        im, x = Image.new("RGB", (32, 32), (10, 10, 10)), 4 + 3 * i
        ImageDraw.Draw(im).ellipse([x, x, x + 16, x + 16], fill=(250, 250, 250))
        im.save(subject / f"s{i}.png")
        (subject / f"s{i}.txt").write_text("a sks square")
    seeds = tuple(range(8))
    base_px = _pixels(BaseModel.load(str(base_dir)).pipeline(), [CLASS_PROMPT], seeds=seeds, steps=8)
    drift = {}
    for weight in (1.0, 0.0):
        cfg = _cfg(base_dir, subject, tmp_path, f"prior{weight}", steps=10, mode="full", prior_loss_weight=weight,
                   num_class_images=8, class_steps=8, class_batch_size=8)
        cfg.train.batch_size, cfg.train.lr, cfg.train.seed = 4, 5e-4, 4
        pipe = attach(BaseModel.load(str(base_dir)).pipeline(), train(cfg))
        drift[weight] = float(np.abs(_pixels(pipe, [CLASS_PROMPT], seeds=seeds, steps=8) - base_px).mean())
    assert drift[1.0] < drift[0.0], drift
