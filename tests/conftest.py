"""Shared fixtures: tiny offline models and image folders.  Nothing here touches a model hub."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a busy machine extra threads cost a lot: one thread.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """A tiny SD-style diffusers folder (epsilon prediction), saved with save_pretrained."""
    from adapt.testing import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_base"), prediction_type="epsilon")


@pytest.fixture(scope="session")
def tiny_base_dir_v(tmp_path_factory):
    """The same tiny model with v_prediction."""
    from adapt.testing import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_base_v"), prediction_type="v_prediction")


@pytest.fixture
def image_folder(tmp_path):
    """Six captioned 48px images in a fresh folder."""
    from adapt.testing import make_image_folder

    return make_image_folder(tmp_path / "photos")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own adapt cache directory."""
    monkeypatch.setenv("ADAPT_CACHE", str(tmp_path / "adapt_cache"))
