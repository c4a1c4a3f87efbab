"""Typed config: YAML loading, dotted overrides, and every user error naming file, key and fix.

A throwaway recipe (`dummy_test`) is registered while this module runs, so these tests do not depend on
any real recipe.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pydantic import Field, model_validator

from adapt.config import (BaseConfig, DataConfig, PreviewConfig, RunConfig, Section, TrainConfig, load_config,
                          parse_value)
from adapt.errors import AdaptError, ConfigError
from adapt.recipes import Recipe, available_recipes, register_recipe


class DummyConfig(Section):
    rank: int = Field(4, gt=0, description="Adapter rank.")
    alpha: float = Field(4.0, gt=0, description="Adapter alpha.")
    targets: list[str] = Field(default_factory=lambda: ["to_q", "to_v"], description="Modules to adapt.")

    @model_validator(mode="after")
    def _check(self):
        if self.alpha > 100 * self.rank:
            raise ValueError("alpha is more than 100x rank; lower alpha")
        return self


class DummyRecipe(Recipe):
    """Throwaway recipe for config tests."""

    Config = DummyConfig

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.data.resolution % 8:
            raise ConfigError(f"{cfg.source}: data.resolution={cfg.data.resolution} must be a multiple of 8 for dummy_test")


@pytest.fixture(autouse=True, scope="module")
def _dummy_recipe():
    """Registered only while this module runs: other suites iterate over every registered recipe."""
    from adapt.recipes import _REGISTRY

    register_recipe("dummy_test")(DummyRecipe)
    yield
    _REGISTRY.pop("dummy_test", None)


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


GOOD = textwrap.dedent("""\
    recipe: dummy_test
    base:
      path: org/some-model
    data:
      resolution: 64
    train:
      steps: 20
      lr: 1.0e-4
    dummy_test:
      rank: 8
    """)


def config_error(path, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides or [])
    assert isinstance(info.value, AdaptError)
    return str(info.value)


# ---- valid files ----------------------------------------------------------------------------
def test_valid_file_loads_typed_sections(tmp_path):
    path = write(tmp_path, GOOD)
    cfg = load_config(path)
    assert cfg.recipe == "dummy_test"
    assert cfg.source == str(path)
    assert isinstance(cfg.train, TrainConfig) and cfg.train.steps == 20 and cfg.train.lr == pytest.approx(1e-4)
    assert cfg.data.resolution == 64
    assert cfg.base.path == "org/some-model"  # a hub id is not mistaken for a relative path
    assert isinstance(cfg.recipe_config, DummyConfig) and cfg.recipe_config.rank == 8
    assert cfg.recipe_config.targets == ["to_q", "to_v"]
    assert cfg.train.lr_warmup_steps == 0 and cfg.preview.prompts == []  # defaults


def test_dump_round_trips_including_recipe_section(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["dummy_test.alpha=2", "preview.prompts=[a red square, a blue circle]"])
    dumped = cfg.dump()
    assert dumped["dummy_test"] == {"rank": 8, "alpha": 2.0, "targets": ["to_q", "to_v"]}
    assert "recipe_config" not in dumped and "source" not in dumped
    again = load_config(None, raw=dumped)
    assert again.dump() == dumped


def test_every_field_has_help_text():
    for section in (RunConfig, BaseConfig, DataConfig, TrainConfig, PreviewConfig):
        for name, field in section.model_fields.items():
            assert field.description, f"{section.__name__}.{name} has no help text"


def test_recipe_check_config_hook_runs(tmp_path):
    msg = config_error(write(tmp_path, GOOD), ["data.resolution=60"])
    assert "data.resolution=60" in msg and "multiple of 8" in msg


def test_recipe_is_registered_and_listed():
    assert available_recipes()["dummy_test"] is DummyRecipe


# ---- unknown keys ----------------------------------------------------------------------------
def test_unknown_top_level_key_suggests_the_section(tmp_path):
    path = write(tmp_path, GOOD + "trian:\n  steps: 5\n")
    msg = config_error(path)
    assert str(path) in msg and "'trian'" in msg and "did you mean 'train'" in msg


def test_internal_field_names_are_not_accepted_in_yaml(tmp_path):
    msg = config_error(write(tmp_path, GOOD + "recipe_config: {}\n"))
    assert "unknown key 'recipe_config'" in msg


def test_unknown_key_in_section_suggests_the_field(tmp_path):
    path = write(tmp_path, GOOD.replace("lr: 1.0e-4", "lrr: 1.0e-4"))
    msg = config_error(path)
    assert str(path) in msg and "'train.lrr'" in msg and "did you mean 'train.lr'" in msg


def test_unknown_key_in_recipe_section_suggests_the_field(tmp_path):
    path = write(tmp_path, GOOD.replace("rank: 8", "rnak: 8"))
    msg = config_error(path)
    assert str(path) in msg and "'dummy_test.rnak'" in msg and "did you mean 'dummy_test.rank'" in msg


def test_unknown_key_without_close_match_lists_known_keys(tmp_path):
    msg = config_error(write(tmp_path, GOOD), ["data.zzzzzz=1"])
    assert "'data.zzzzzz'" in msg and "resolution" in msg and "center_crop" in msg


# ---- wrong types, missing fields, impossible combinations ----------------------------------------------
def test_wrong_type_names_key_value_and_help(tmp_path):
    path = write(tmp_path, GOOD.replace("steps: 20", "steps: many"))
    msg = config_error(path)
    assert str(path) in msg and "'train.steps'" in msg and "'many'" in msg
    assert "optimizer steps" in msg.lower()  # the field's help text tells what it is


def test_wrong_type_in_recipe_section(tmp_path):
    msg = config_error(write(tmp_path, GOOD.replace("rank: 8", "rank: eight")))
    assert "'dummy_test.rank'" in msg and "'eight'" in msg


def test_literal_choice_lists_allowed_values(tmp_path):
    msg = config_error(write(tmp_path, GOOD), ["base.dtype=fp8"])
    assert "'base.dtype'" in msg and "'fp8'" in msg and "fp16" in msg and "bf16" in msg


def test_out_of_range_value(tmp_path):
    msg = config_error(write(tmp_path, GOOD), ["train.lr=-1"])
    assert "'train.lr'" in msg and "greater than 0" in msg


def test_section_given_as_scalar(tmp_path):
    msg = config_error(write(tmp_path, GOOD + "preview: 3\n"))
    assert "'preview'" in msg


def test_recipe_section_must_be_a_mapping(tmp_path):
    msg = config_error(write(tmp_path, GOOD.replace("dummy_test:\n  rank: 8", "dummy_test: 5")))
    assert "'dummy_test'" in msg and "mapping" in msg


def test_missing_recipe_names_key_file_and_fix(tmp_path):
    path = write(tmp_path, "train:\n  steps: 3\n")
    msg = config_error(path)
    assert str(path) in msg and "'recipe'" in msg and "recipe: lora" in msg


def test_unknown_recipe_suggests_close_name(tmp_path):
    path = write(tmp_path, GOOD.replace("recipe: dummy_test", "recipe: dumy_test"))
    msg = config_error(path)
    assert str(path) in msg and "unknown recipe 'dumy_test'" in msg and "did you mean 'dummy_test'" in msg
    assert "adapt recipes" in msg


def test_warmup_longer_than_training_is_refused(tmp_path):
    path = write(tmp_path, GOOD)
    msg = config_error(path, ["train.lr_warmup_steps=50"])  # steps is 20
    assert str(path) in msg and "train" in msg and "lr_warmup_steps (50)" in msg and "steps (20)" in msg


def test_preview_every_without_prompts_is_refused(tmp_path):
    path = write(tmp_path, GOOD + "preview:\n  every: 10\n")
    msg = config_error(path)
    assert str(path) in msg and "preview" in msg and "preview.prompts" in msg
    assert load_config(path, ["preview.prompts=[a red square]"]).preview.every == 10


def test_recipe_validator_combination(tmp_path):
    msg = config_error(write(tmp_path, GOOD), ["dummy_test.rank=1", "dummy_test.alpha=500"])
    assert "dummy_test" in msg and "lower alpha" in msg


# ---- file-level problems ------------------------------------------------------------------------
def test_missing_file(tmp_path):
    msg = config_error(tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "no such config file" in msg


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "recipe: dummy_test\ntrain: [unclosed\n")
    msg = config_error(path)
    assert str(path) in msg and "not valid YAML" in msg


def test_top_level_must_be_mapping(tmp_path):
    msg = config_error(write(tmp_path, "- a\n- b\n"))
    assert "mapping" in msg


def test_empty_file_asks_for_recipe(tmp_path):
    msg = config_error(write(tmp_path, ""))
    assert "'recipe'" in msg


# ---- dotted overrides ---------------------------------------------------------------------------
def test_overrides_are_type_checked(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["train.lr=5e-5", "data.resolution=32", "train.snr_gamma=5",
                                              "base.variant=null", "train.gradient_checkpointing=true",
                                              "preview.sampler=euler_a", "dummy_test.rank=16"])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(5e-5)
    assert cfg.data.resolution == 32 and isinstance(cfg.data.resolution, int)
    assert cfg.train.snr_gamma == 5.0 and cfg.base.variant is None
    assert cfg.train.gradient_checkpointing is True and cfg.preview.sampler == "euler_a"
    assert cfg.recipe_config.rank == 16


def test_override_with_wrong_type_is_an_error(tmp_path):
    msg = config_error(write(tmp_path, GOOD), ["train.steps=abc"])
    assert "'train.steps'" in msg and "'abc'" in msg


def test_override_of_unknown_key_suggests(tmp_path):
    msg = config_error(write(tmp_path, GOOD), ["train.stepz=3"])
    assert "'train.stepz'" in msg and "did you mean 'train.steps'" in msg


def test_override_can_create_a_section_and_set_recipe(tmp_path):
    cfg = load_config(write(tmp_path, "recipe: dummy_test\n"), ["preview.seed=7"])
    assert cfg.preview.seed == 7
    cfg = load_config(write(tmp_path, "train:\n  steps: 3\n", "norecipe.yaml"), ["recipe=dummy_test"])
    assert cfg.recipe == "dummy_test"


@pytest.mark.parametrize("bad", ["train.lr", "train.lr:5e-5", "=5"])
def test_bad_override_syntax(tmp_path, bad):
    msg = config_error(write(tmp_path, GOOD), [bad])
    assert "key=value" in msg or "'='" in msg or "empty" in msg
    assert bad in msg


def test_override_through_a_value_is_an_error(tmp_path):
    msg = config_error(write(tmp_path, GOOD), ["train.lr.value=3"])
    assert "train.lr" in msg and "not a section" in msg


def test_numbers_are_accepted_for_text_fields(tmp_path):
    # A git revision or a folder name made of digits must not be a type error.
    cfg = load_config(write(tmp_path, GOOD + "output_dir: 2024\n"), ["base.revision=1234567"])
    assert cfg.output_dir == "2024" and cfg.base.revision == "1234567"


@pytest.mark.parametrize("text,value", [("5e-5", 5e-5), ("3", 3), ("true", True), ("null", None),
                                        ("[a, b]", ["a", "b"]), ("euler", "euler"), ("1.5", 1.5)])
def test_parse_value(text, value):
    assert parse_value(text) == value


# ---- relative paths ---------------------------------------------------------------------------
def test_relative_paths_resolve_against_the_yaml_folder(tmp_path, monkeypatch):
    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "photos").mkdir()
    path = write(tmp_path / "recipes", """\
        recipe: dummy_test
        base:
          path: ../models/mine
          config_dir: ../models/mine
        data:
          dataset: ../photos
        """)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(path)
    assert Path(cfg.base.path) == (tmp_path / "models" / "mine").resolve()
    assert Path(cfg.base.config_dir) == (tmp_path / "models" / "mine").resolve()
    assert Path(cfg.data.dataset) == (tmp_path / "photos").resolve()


def test_override_paths_stay_relative_to_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "recipes" / "here").mkdir(parents=True)
    path = write(tmp_path / "recipes", "recipe: dummy_test\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path, ["data.dataset=here"])
    assert cfg.data.dataset == "here"  # not recipes/here: the user typed it relative to their shell
