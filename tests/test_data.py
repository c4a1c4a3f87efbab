"""Datasets: every input format, every bad-data case, image conversions and transforms."""
from __future__ import annotations

import io
import json
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adapt.data import (
    BadDataWarning,
    TransformSettings,
    build_dataset,
    collate_examples,
    compose_caption,
    load_dataset_file,
    load_image,
    transform_pair,
)
from adapt.errors import ConfigError, DataError

# --------------------------------------------------------------------------- helpers


def gradient(w: int, h: int, seed: int = 0) -> Image.Image:
    """A distinctive RGB image (no symmetry, so flips and crops are visible)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), rng.integers(0, 256, (h, w))], -1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def make_folder(root: Path, n: int = 3, size=(24, 16), captions=True, prefix="img") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        gradient(*size, seed=i).save(root / f"{prefix}{i}.png")
        if captions:
            (root / f"{prefix}{i}.txt").write_text(f"a photo number {i}\n", encoding="utf-8")
    return root


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.rglob("*"))} | {
        ".": folder.stat().st_mtime_ns}


def build_quiet(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", BadDataWarning)
        return build_dataset(*args, **kwargs)


def write_yaml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- formats


def test_folder_with_captions_yields_tensors(tmp_path):
    folder = make_folder(tmp_path / "photos")
    ds = build_quiet(folder, resolution=8)
    assert len(ds) == 3 and [Path(r.image_path).name for r in ds.records] == ["img0.png", "img1.png", "img2.png"]
    ex = ds[1]
    assert ex["pixel_values"].shape == (3, 8, 8) and ex["pixel_values"].dtype == torch.float32
    assert -1.0 <= ex["pixel_values"].min() < 0 < ex["pixel_values"].max() <= 1.0
    assert ex["caption"] == "a photo number 1" and ex["role"] == "instance"
    assert ex["image_path"] == str(folder / "img1.png") and "conditioning_pixel_values" not in ex


def test_inline_folder_is_one_instance_subset(tmp_path):
    folder = make_folder(tmp_path / "photos")
    spec = load_dataset_file(folder)
    assert len(spec.subsets) == 1 and spec.subsets[0].role == "instance" and spec.subsets[0].path == str(folder.resolve())


def test_yaml_file_relative_paths_template_trigger_repeats(tmp_path):
    make_folder(tmp_path / "data" / "style", n=2)
    make_folder(tmp_path / "data" / "reg", n=3, captions=False)
    cfg = write_yaml(tmp_path / "cfgs" / "ds.yaml", """
subsets:
  - path: ../data/style
    trigger: zzstripe
    caption_template: "{caption}, striped"
    repeats: 3
  - path: ../data/reg
    role: class
    default_caption: a photo
""")
    ds = build_quiet(cfg, resolution=8)
    assert len(ds) == 2 * 3 + 3
    assert ds.records[0].caption == "zzstripe, a photo number 0, striped"
    assert sum(r.image_path.endswith("style/img1.png") for r in ds.records) == 3
    reg = ds.subset("class")
    assert len(reg) == 3 and {r.caption for r in reg.records} == {"a photo"} and reg[0]["role"] == "class"
    assert ds.roles == ["class", "instance"]


def test_compose_caption_rules():
    assert compose_caption("a cat", trigger="zzx") == "zzx, a cat"
    assert compose_caption("a Zzx cat", trigger="zzx") == "a Zzx cat"  # already there (whole word)
    assert compose_caption("a zzxy cat", trigger="zzx") == "zzx, a zzxy cat"  # not a whole word
    assert compose_caption("a cat", "photo of {trigger} {caption}", "zzx") == "photo of zzx a cat"
    assert compose_caption("", "{trigger}, {caption}", "zzx") == "zzx"
    assert compose_caption("  two\n lines ", "{caption}") == "two lines"


def _metadata_folder(root: Path, rows: list[dict], images: dict[str, Image.Image]) -> Path:
    root.mkdir(parents=True)
    for name, img in images.items():
        img.save(root / name)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def test_metadata_jsonl_folder(tmp_path):
    folder = _metadata_folder(tmp_path / "meta", [{"file_name": "a.png", "text": "first"}, {"file_name": "b.png", "text": "second"}],
                              {"a.png": gradient(16, 16, 1), "b.png": gradient(16, 16, 2)})
    ds = build_quiet(folder, resolution=8)
    assert [(Path(r.image_path).name, r.caption) for r in ds.records] == [("a.png", "first"), ("b.png", "second")]
    assert ds[0]["pixel_values"].shape == (3, 8, 8)


def test_metadata_jsonl_custom_column_control_and_missing_file(tmp_path):
    rows = [{"file_name": "a.png", "prompt": "first", "conditioning_image_file_name": "ca.png"},
            {"file_name": "gone.png", "prompt": "lost", "conditioning_image_file_name": "ca.png"}]
    folder = _metadata_folder(tmp_path / "meta", rows, {"a.png": gradient(16, 16, 1), "ca.png": Image.new("L", (16, 16), 200)})
    cfg = write_yaml(tmp_path / "ds.yaml", f"subsets:\n  - path: {folder}\n    role: control\n    caption_column: prompt\n")
    with pytest.warns(BadDataWarning, match="gone.png"):
        ds = build_dataset(cfg, resolution=8)
    assert len(ds) == 1 and ds.records[0].caption == "first" and ds.records[0].conditioning_path.endswith("ca.png")
    cond = ds[0]["conditioning_pixel_values"]
    assert cond.shape == (3, 8, 8) and torch.allclose(cond, torch.full_like(cond, 200 / 255), atol=1e-6)


def _saved_hf(tmp_path: Path, n=3, control=False, dict_split=None) -> Path:
    import datasets

    data = {"image": [gradient(16, 12, i) for i in range(n)], "text": [f"row {i}" for i in range(n)]}
    features = {"image": datasets.Image(), "text": datasets.Value("string")}
    if control:
        data["conditioning_image"] = [Image.new("L", (16, 12), 10 * i) for i in range(n)]
        features["conditioning_image"] = datasets.Image()
    ds = datasets.Dataset.from_dict(data, features=datasets.Features(features))
    out = tmp_path / "saved"
    (datasets.DatasetDict({dict_split: ds}) if dict_split else ds).save_to_disk(str(out))
    return out


def test_hf_saved_to_disk(tmp_path):
    saved = _saved_hf(tmp_path)
    before = snapshot(saved)
    cfg = write_yaml(tmp_path / "ds.yaml", "subsets:\n  - hf: saved\n    trigger: zzq\n")
    ds = build_quiet(cfg, resolution=12)
    assert len(ds) == 3 and ds.records[2].caption == "zzq, row 2" and ds.records[2].image_path.endswith("#2")
    expected = transform_pair(gradient(16, 12, 2), settings=ds.settings).pixel_values
    assert torch.equal(ds[2]["pixel_values"], expected)
    pickle.loads(pickle.dumps(ds))  # DataLoader workers need it
    assert len(build_quiet(saved, resolution=12)) == 3  # a saved dataset folder given inline
    assert snapshot(saved) == before


def test_hf_saved_control_and_split_and_bad_columns(tmp_path):
    saved = _saved_hf(tmp_path, control=True, dict_split="validation")
    ds = build_quiet(write_yaml(tmp_path / "a.yaml", "subsets:\n  - {hf: saved, role: control, split: validation}\n"), resolution=12)
    assert ds[1]["conditioning_pixel_values"].shape == (3, 12, 12)
    with pytest.raises(DataError, match=r"no split 'train'.*validation"):
        build_dataset(write_yaml(tmp_path / "b.yaml", "subsets:\n  - {hf: saved}\n"), resolution=12)
    with pytest.raises(DataError, match=r"no column 'caption'.*caption_column"):
        build_dataset(write_yaml(tmp_path / "c.yaml", "subsets:\n  - {hf: saved, split: validation, caption_column: caption}\n"), resolution=12)


def test_hf_hub_name_offline_is_clear(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = write_yaml(tmp_path / "ds.yaml", "subsets:\n  - hf: someone/no-such-dataset-xyz\n")
    with pytest.raises(DataError, match=r"someone/no-such-dataset-xyz.*pass a local folder"):
        build_dataset(cfg, resolution=8)


# --------------------------------------------------------------------------- dataset-file errors


@pytest.mark.parametrize("body, pattern", [
    ("subsets:\n  - path: x\n    captoin_ext: .txt\n", r"subsets\[0\]\.captoin_ext.*did you mean 'subsets\[0\]\.caption_ext'"),
    ("subsets:\n  - path: x\n    repeats: many\n", r"subsets\[0\]\.repeats.*many"),
    ("subsets:\n  - path: x\n    repeats: 0\n", r"subsets\[0\]\.repeats.*greater than or equal to 1"),
    ("subsets:\n  - path: x\n    hf: y\n", r"exactly one of 'path'.*'hf'"),
    ("subsets:\n  - hf: y\n    role: teacher\n", r"subsets\[0\]\.role.*instance"),
    ("subsets:\n  - path: x\n    caption_template: '{cap}'\n", r"\{cap\}"),
    ("subsets:\n  - path: x\n    conditioning_path: y\n", r"conditioning_path is only used by 'role: control'"),
    ("subsetz:\n  - path: x\n", r"unknown key 'subsetz'.*did you mean 'subsets'"),
    ("subsets: [\n", r"not valid YAML"),
    ("- path: x\n", r"must be a mapping with a 'subsets:' list"),
])
def test_dataset_file_errors_name_file_and_key(tmp_path, body, pattern):
    cfg = write_yaml(tmp_path / "bad.yaml", body)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_dataset_file(cfg)
    assert str(cfg) in str(info.value)


def test_missing_dataset_path_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="nothere"):
        load_dataset_file(tmp_path / "nothere")
    with pytest.raises(DataError, match="nothere"):
        build_dataset(write_yaml(tmp_path / "d.yaml", "subsets:\n  - path: nothere\n"), resolution=8)


# --------------------------------------------------------------------------- bad data


def _messy_folder(root: Path) -> Path:
    make_folder(root, n=2)
    (root / "notes.txt").write_text("not a caption of anything")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    buf = io.BytesIO()
    gradient(64, 64).save(buf, format="JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "truncated.txt").write_text("caption of a broken image")
    (root / "fake.png").write_text("I am text")
    (root / "sub").mkdir()
    return root


def test_bad_files_skipped_with_one_warning(tmp_path):
    folder = _messy_folder(tmp_path / "messy")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = build_dataset(folder, resolution=8)
    bad = [w for w in caught if issubclass(w.category, BadDataWarning)]
    assert len(bad) == 1 and len(ds) == 2
    msg = str(bad[0].message)
    for name in ("notes.txt", ".DS_Store", "truncated.jpg", "fake.png", "sub"):
        assert name in msg
    assert "caption file without a matching image" in msg and "cannot read image" in msg
    assert "img0.txt" not in msg and "truncated.txt" not in msg  # real captions are not reported


def test_strict_mode_raises_naming_bad_files(tmp_path):
    folder = _messy_folder(tmp_path / "messy")
    with pytest.raises(DataError, match=r"truncated\.jpg") as info:
        build_dataset(folder, resolution=8, strict=True)
    assert "fake.png" in str(info.value) and "strict" in str(info.value)


def test_empty_and_all_bad_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"no usable images in {empty}"):
        build_dataset(empty, resolution=8)
    allbad = tmp_path / "allbad"
    allbad.mkdir()
    (allbad / "x.jpg").write_bytes(b"garbage")
    with pytest.warns(BadDataWarning), pytest.raises(DataError, match=rf"no usable images in {allbad}.*x\.jpg"):
        build_dataset(allbad, resolution=8)


def test_missing_caption_needs_default(tmp_path):
    folder = make_folder(tmp_path / "photos", n=2)
    (folder / "img1.txt").unlink()
    with pytest.raises(DataError, match=r"img1\.png.*add a same-name \.txt.*default_caption"):
        build_dataset(folder, resolution=8)
    cfg = write_yaml(tmp_path / "ds.yaml", "subsets:\n  - path: photos\n    default_caption: a thing\n")
    assert [r.caption for r in build_quiet(cfg, resolution=8).records] == ["a photo number 0", "a thing"]


def _control_folders(tmp_path: Path, cond_size=(24, 16)) -> Path:
    make_folder(tmp_path / "img", n=2)
    (tmp_path / "cond").mkdir()
    for i in range(2):
        Image.new("L", cond_size, 40 * i).save(tmp_path / "cond" / f"img{i}.png")
    return write_yaml(tmp_path / "ds.yaml", "subsets:\n  - path: img\n    role: control\n    conditioning_path: cond\n")


def test_control_subset(tmp_path):
    ds = build_quiet(_control_folders(tmp_path), resolution=8)
    ex = ds[1]
    assert ex["conditioning_pixel_values"].shape == (3, 8, 8)  # grayscale became RGB
    assert torch.allclose(ex["conditioning_pixel_values"], torch.full((3, 8, 8), 40 / 255), atol=1e-6)


def test_control_missing_conditioning_names_file(tmp_path):
    cfg = _control_folders(tmp_path)
    (tmp_path / "cond" / "img1.png").unlink()
    with pytest.raises(DataError, match=r"cond/img1\.png"):
        build_dataset(cfg, resolution=8)


def test_control_size_mismatch_names_both(tmp_path):
    cfg = _control_folders(tmp_path, cond_size=(20, 16))
    with pytest.raises(DataError, match=r"img/img0\.png is 24x16 but its conditioning image .*cond/img0\.png is 20x16"):
        build_dataset(cfg, resolution=8)


def test_control_without_conditioning_path(tmp_path):
    make_folder(tmp_path / "img", n=1)
    cfg = write_yaml(tmp_path / "ds.yaml", "subsets:\n  - path: img\n    role: control\n")
    with pytest.raises(DataError, match="conditioning_path"):
        build_dataset(cfg, resolution=8)


def test_user_folder_untouched(tmp_path):
    folder = _messy_folder(tmp_path / "messy")
    meta = _metadata_folder(tmp_path / "meta", [{"file_name": "a.png", "text": "t"}], {"a.png": gradient(9, 9)})
    cfg = _control_folders(tmp_path)
    watched = [folder, meta, tmp_path / "img", tmp_path / "cond"]
    before = [snapshot(f) for f in watched]
    for source in (folder, meta, cfg):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = build_dataset(source, resolution=8, random_flip=True)
        for i in range(len(ds)):
            ds[i]
    assert [snapshot(f) for f in watched] == before


# --------------------------------------------------------------------------- image conversions


def _roundtrip(img: Image.Image, fmt: str = "PNG", **save) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return load_image(buf.getvalue())


def test_exif_orientation_honoured():
    img = Image.fromarray(np.asarray(gradient(20, 10)) * np.array([1, 1, 0], dtype=np.uint8))  # no noise: JPEG keeps it
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90° clockwise
    out = _roundtrip(img, "JPEG", exif=exif, quality=100)
    assert out.size == (10, 20)
    expected = np.asarray(img.transpose(Image.Transpose.ROTATE_270), dtype=float)
    assert np.abs(np.asarray(out, dtype=float) - expected).mean() < 4
    assert np.abs(np.asarray(out, dtype=float) - expected[::-1, ::-1]).mean() > 40  # a wrong rotation would fail


def test_sixteen_bit_scaled_not_clipped(tmp_path):
    arr = np.full((4, 4), 32768, dtype=np.uint16)
    arr[0, 0] = 65535
    arr[0, 1] = 0
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)  # a 16-bit grayscale PNG
    out = np.asarray(load_image(path))
    assert out.shape == (4, 4, 3) and out[2, 2].tolist() == [128, 128, 128]
    assert out[0, 0, 0] == 255 and out[0, 1, 0] == 0
    as_int32 = np.asarray(load_image(Image.fromarray(arr.astype(np.int32), mode="I")))
    assert as_int32[2, 2, 0] == 128


def test_palette_rgba_la_gray_cmyk_conversions():
    pal = Image.new("P", (4, 4))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 1)
    out = _roundtrip(pal)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (0, 0, 255) and out.getpixel((1, 1)) == (255, 0, 0)
    pal.info["transparency"] = 0  # index 0 (red) transparent → white
    assert _roundtrip(pal, transparency=0).getpixel((1, 1)) == (255, 255, 255)
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    r, g, b = _roundtrip(rgba).getpixel((0, 0))
    assert r == 255 and 120 <= g <= 135 and g == b
    assert _roundtrip(Image.new("LA", (4, 4), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert _roundtrip(Image.new("L", (4, 4), 77)).getpixel((0, 0)) == (77, 77, 77)
    cmyk = _roundtrip(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG", quality=100)
    r, g, b = cmyk.getpixel((0, 0))
    assert cmyk.mode == "RGB" and r > 200 and g < 60 and b < 60


# --------------------------------------------------------------------------- transforms


def test_resize_center_crop_and_flip():
    img = gradient(40, 20)
    s = TransformSettings(resolution=10)
    out = transform_pair(img, settings=s)
    assert out.pixel_values.shape == (3, 10, 10) and out.original_size == (20, 40) and out.crop_top_left == (0, 5)
    flipped = transform_pair(img, settings=s, flip=True)
    assert torch.equal(flipped.pixel_values, out.pixel_values.flip(-1)) and flipped.crop_top_left == (0, 5)
    assert hash(s) == hash(TransformSettings(resolution=10)) and s.key() == TransformSettings(resolution=10).key()
    assert s.key() != TransformSettings(resolution=10, random_flip=True).key()


def test_paired_transform_same_geometry():
    img = gradient(37, 23, seed=5)
    s = TransformSettings(resolution=16, center_crop=False, resample="nearest")
    for seed in range(4):
        out = transform_pair(img, img.copy(), settings=s, flip=bool(seed % 2), rng=np.random.default_rng(seed))
        assert torch.allclose(out.conditioning_pixel_values * 2 - 1, out.pixel_values, atol=1e-6)
    tops = {transform_pair(img, settings=s, rng=np.random.default_rng(k)).crop_top_left for k in range(8)}
    assert len(tops) > 1  # the crop really is random


def test_dataset_paired_random_crop_and_flip(tmp_path):
    make_folder(tmp_path / "img", n=2, size=(30, 20))
    (tmp_path / "cond").mkdir()
    for i in range(2):
        gradient(30, 20, seed=i).save(tmp_path / "cond" / f"img{i}.png")  # conditioning == image
    cfg = write_yaml(tmp_path / "ds.yaml", "subsets:\n  - {path: img, role: control, conditioning_path: cond}\n")
    ds = build_quiet(cfg, resolution=10, center_crop=False, random_flip=True, seed=3)
    flips = set()
    for epoch in range(6):
        for i in range(len(ds)):
            ex = ds.item(i, epoch=epoch)
            flips.add(ex["flipped"])
            assert torch.allclose(ex["conditioning_pixel_values"] * 2 - 1, ex["pixel_values"], atol=1e-6)
    assert flips == {True, False}
    a, b = ds.item(0, epoch=1, flip=False), ds.item(0, epoch=1, flip=True)
    assert torch.equal(a["pixel_values"], b["pixel_values"].flip(-1))
    batch = collate_examples([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 10, 10) and batch["conditioning_pixel_values"].shape == (2, 3, 10, 10)


def test_caption_dropout_seeded_and_isolated(tmp_path):
    make_folder(tmp_path / "p", n=50, size=(8, 8))
    cfg = write_yaml(tmp_path / "ds.yaml", "subsets:\n  - {path: p, caption_dropout: 0.3}\n")
    ds = build_quiet(cfg, resolution=8, seed=7)
    same = build_quiet(cfg, resolution=8, seed=7)
    other = build_quiet(cfg, resolution=8, seed=8)
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    drops = [ds.caption(i, epoch=0) == "" for i in range(len(ds))]
    assert drops == [same.caption(i, epoch=0) == "" for i in range(len(same))]
    assert drops != [other.caption(i, epoch=0) == "" for i in range(len(other))]
    assert drops != [ds.caption(i, epoch=1) == "" for i in range(len(ds))]
    assert 5 <= sum(drops) <= 25
    ds.set_epoch(0)
    assert [ds[i]["caption"] == "" for i in range(len(ds))] == drops
    assert np.array_equal(np.random.get_state()[1], np_state) and torch.equal(torch.get_rng_state(), torch_state)


def test_dataloader_batches(tmp_path):
    make_folder(tmp_path / "p", n=4)
    ds = build_quiet(tmp_path / "p", resolution=8)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_examples)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (2, 3, 8, 8) and batch["caption"] == ["a photo number 0", "a photo number 1"]
    assert os.fspath(batch["image_path"][0]).endswith("img0.png")
