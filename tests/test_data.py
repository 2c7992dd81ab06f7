"""Data sources for --data: every source on tiny files written in its real format, and every error."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from nasdsl.errors import NasdslError
from nasdsl.train.data import DataBundle, TorchSeeded, build_data, parse_spec

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --------------------------------------------------------------------------- fixtures in the real formats

def _batch(rng: np.random.Generator, n: int, label_key: str, num_classes: int, name: str) -> dict:
    """A CIFAR python batch as the official files hold it (keys as Python 3 reads them with latin1)."""
    entry = {"batch_label": name, "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
             label_key: [int(v) for v in rng.integers(0, num_classes, size=n)],
             "filenames": [f"img_{name}_{i}.png" for i in range(n)]}
    if label_key == "fine_labels":
        entry["coarse_labels"] = [int(v) % 20 for v in entry[label_key]]
    return entry


def write_cifar10(root: Path, per_batch: int = 4, test: int = 6) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(_batch(rng, per_batch, "labels", 10, f"training batch {i} of 5"), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(_batch(rng, test, "labels", 10, "testing batch 1 of 1"), f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_NAMES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return root


def write_cifar100(root: Path, train: int = 12, test: int = 5) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, n in (("train", train), ("test", test)):
        with open(folder / name, "wb") as f:
            pickle.dump(_batch(rng, n, "fine_labels", 100, name), f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"fine{i}" for i in range(100)],
                     "coarse_label_names": [f"coarse{i}" for i in range(20)]}, f)
    return root


def write_imagefolder(root: Path, gray: bool = False) -> Path:
    """Mixed sizes and modes (RGB, L, RGBA, P), PNG and JPEG; a non-image file that must be ignored."""
    rng = np.random.default_rng(2)
    specs = {"cat": [((40, 30), "RGB", "png"), ((17, 50), "L", "jpg"), ((64, 64), "RGBA", "png")],
             "dog": [((25, 25), "P", "png"), ((90, 60), "RGB", "jpeg")],
             "eel": [((33, 21), "RGB", "JPG")]}
    for split, take in (("train", None), ("val", 1)):
        for cls, files in specs.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for i, (size, mode, ext) in enumerate(files[:take]):
                mode = "L" if gray else mode
                arr = rng.integers(0, 256, size=(size[1], size[0], 4), dtype=np.uint8)
                img = Image.fromarray(arr, "RGBA").convert(mode)
                img.save(d / f"{i}.{ext}", format="JPEG" if ext.lower() in ("jpg", "jpeg") else "PNG")
            (d / "notes.txt").write_text("not an image")
    return root


# --------------------------------------------------------------------------- sources

def check_bundle(b: DataBundle, name: str, classes: int, channels: int, resolution: int,
                 n_train: int | None = None, n_val: int | None = None) -> None:
    assert b.name == name and b.num_classes == classes and b.in_channels == channels
    assert b.resolution == resolution and len(b.mean) == channels and len(b.std) == channels
    assert len(b.classes) == classes
    if n_train is not None:
        assert len(b.train) == n_train
    if n_val is not None:
        assert len(b.val) == n_val
    for ds in (b.train, b.val):
        for i in (0, len(ds) - 1):
            x, y = ds[i]
            assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
            assert x.shape == (channels, resolution, resolution)
            assert isinstance(y, int) and 0 <= y < classes
            assert torch.isfinite(x).all()


def test_digits():
    b = build_data("digits", 32)
    check_bundle(b, "digits", 10, 1, 32, 1437, 360)
    # the split is stratified: every class appears in both splits in proportion
    counts = np.bincount([b.val[i][1] for i in range(len(b.val))], minlength=10)
    assert counts.min() >= 34 and counts.max() <= 37
    # and fixed: independent of torch's seed
    torch.manual_seed(123)
    again = build_data("digits", 16)
    assert [again.val[i][1] for i in range(20)] == [b.val[i][1] for i in range(20)]
    assert again.train[0][0].shape == (1, 16, 16)
    # normalized validation images: roughly zero mean, unit std over the set
    val = torch.stack([b.val[i][0] for i in range(len(b.val))])
    assert abs(float(val.mean())) < 0.1 and 0.8 < float(val.std()) < 1.2


def test_fake():
    b = build_data("fake", 24)
    check_bundle(b, "fake", 10, 3, 24, 256, 64)
    again = build_data("fake", 24)
    assert torch.equal(b.train[5][0], again.train[5][0]) and b.train[5][1] == again.train[5][1]
    assert torch.equal(b.train[5][0], b.train[5][0])  # no augmentation


def test_cifar10(tmp_path):
    root = write_cifar10(tmp_path / "c10")
    b = build_data(f"cifar10:{root}", 32)
    check_bundle(b, "cifar10", 10, 3, 32, 20, 6)
    assert b.classes[0] == "airplane" and b.path == str(root)
    # pixels come out where the format puts them: channel-major rows of 1024
    with open(root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    x, y = b.val[2]
    expect = torch.from_numpy(raw["data"][2].reshape(3, 32, 32)).float() / 255
    mean, std = torch.tensor(b.mean)[:, None, None], torch.tensor(b.std)[:, None, None]
    assert torch.allclose(x * std + mean, expect, atol=1e-5) and y == raw["labels"][2]
    big = build_data(f"cifar10:{root}", 40)
    assert big.train[0][0].shape == (3, 40, 40) and big.val[0][0].shape == (3, 40, 40)


def test_cifar10_fixture_is_what_torchvision_reads(tmp_path, monkeypatch):
    """The fixture is the real format: torchvision itself reads it once its md5 check is bypassed."""
    import torchvision.datasets.cifar as tvcifar

    root = write_cifar10(tmp_path / "c10")
    monkeypatch.setattr(tvcifar, "check_integrity", lambda *a, **k: True)
    ours = build_data(f"cifar10:{root}", 32)
    theirs = tvcifar.CIFAR10(str(root), train=True)
    assert len(theirs) == len(ours.train) and theirs.classes == list(ours.classes)
    assert theirs.targets == ours.train.targets
    assert np.array_equal(theirs.data[3].transpose(2, 0, 1), ours.train.images[3].numpy())


def test_cifar100(tmp_path):
    root = write_cifar100(tmp_path / "c100")
    b = build_data(f"cifar100:{root}", 32)
    check_bundle(b, "cifar100", 100, 3, 32, 12, 5)


def test_imagefolder(tmp_path):
    root = write_imagefolder(tmp_path / "imgs")
    b = build_data(f"imagefolder:{root}", 28)
    check_bundle(b, "imagefolder", 3, 3, 28, 6, 3)
    assert b.classes == ("cat", "dog", "eel") and b.mean == (0.485, 0.456, 0.406) and b.crop_pct == 0.875
    assert b.preprocessing.crop_pct == 0.875
    assert sorted(b.train.targets) == [0, 0, 0, 1, 1, 2]
    for i in range(len(b.train)):  # every mode and size converts
        assert b.train[i][0].shape == (3, 28, 28)


def test_imagefolder_grayscale(tmp_path):
    root = write_imagefolder(tmp_path / "gray", gray=True)
    b = build_data(f"imagefolder:{root}", 20)
    check_bundle(b, "imagefolder", 3, 1, 20, 6, 3)


# --------------------------------------------------------------------------- determinism

def test_augmentation_is_seeded():
    b = build_data("digits", 32)
    torch.manual_seed(7)
    first = torch.stack([b.train[i][0] for i in range(8)])
    torch.manual_seed(7)
    second = torch.stack([b.train[i][0] for i in range(8)])
    assert torch.equal(first, second)
    torch.manual_seed(8)
    assert not torch.equal(first, torch.stack([b.train[i][0] for i in range(8)]))
    # augmentation does something, validation does nothing
    assert not torch.equal(b.train[0][0], b.train[0][0])
    assert torch.equal(b.val[0][0], b.val[0][0])


@pytest.mark.parametrize("source", ["cifar10", "imagefolder"])
def test_dataloader_is_seeded(tmp_path, source):
    root = write_cifar10(tmp_path / "c") if source == "cifar10" else write_imagefolder(tmp_path / "i")
    b = build_data(f"{source}:{root}", 32)

    def epoch(seed: int, workers: int) -> list[torch.Tensor]:
        # workers=0: augmentations draw from the global RNG; workers>0: each worker is seeded from `g`
        torch.manual_seed(seed + 1000 if workers else seed)
        g = torch.Generator().manual_seed(seed)
        loader = DataLoader(b.train, batch_size=4, shuffle=True, num_workers=workers, generator=g)
        return [x for x, _ in loader]

    a, c = epoch(3, 0), epoch(3, 0)
    assert all(torch.equal(x, y) for x, y in zip(a, c))
    assert not all(torch.equal(x, y) for x, y in zip(a, epoch(4, 0)))
    w1, w2 = epoch(3, 2), epoch(3, 2)
    assert all(torch.equal(x, y) for x, y in zip(w1, w2))
    torch.manual_seed(99)  # the global RNG does not matter with workers: only the generator does
    g = torch.Generator().manual_seed(3)
    w3 = [x for x, _ in DataLoader(b.train, batch_size=4, shuffle=True, num_workers=2, generator=g)]
    assert all(torch.equal(x, y) for x, y in zip(w1, w3))


# --------------------------------------------------------------------------- errors

def error(spec: str, **kw) -> str:
    with pytest.raises(NasdslError) as info:
        build_data(spec, 32, **kw)
    text = str(info.value)
    assert "\n" not in text and "Traceback" not in text
    assert text.startswith(f"--data {spec}: ")
    return text


def test_unknown_source():
    text = error("cifar")
    assert "unknown data source 'cifar' (did you mean 'cifar10'?)" in text
    assert "digits, fake, cifar10:DIR, cifar100:DIR, imagefolder:DIR" in text
    assert "did you mean 'imagefolder'" in error("imagefoldr:/x")


def test_spec_path_rules():
    assert "cifar10 needs a directory: --data cifar10:DIR" in error("cifar10")
    assert "needs a directory" in error("imagefolder:")
    assert "takes no PATH" in error("digits:/tmp")
    assert parse_spec("CIFAR10:~/d")[1].endswith("/d") and parse_spec("fake") == ("fake", None)


def test_cifar_missing(tmp_path):
    text = error(f"cifar10:{tmp_path / 'nope'}")
    assert "does not exist" in text and "--download" in text
    text = error(f"cifar10:{tmp_path}")
    assert f"no CIFAR-10 data in {tmp_path} (expected cifar-10-batches-py/; pass --download" in text
    assert "expected cifar-100-python/" in error(f"cifar100:{tmp_path}")
    root = write_cifar10(tmp_path / "c10")
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    assert "file cifar-10-batches-py/data_batch_3 is missing" in error(f"cifar10:{root}")


def test_cifar_download_failure_is_reported(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tvcifar

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(tvcifar, "download_and_extract_archive", offline)
    text = error(f"cifar10:{tmp_path}", download=True)
    assert "could not download CIFAR-10" in text and "network is unreachable" in text


@pytest.mark.parametrize("damage, expect", [
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "corrupt CIFAR-10 file"),           # truncated
    (lambda p: p.write_bytes(b"garbage that is no pickle"), "corrupt CIFAR-10 file"),
    (lambda p: p.write_bytes(b""), "EOFError"),
    (lambda p: p.write_bytes(pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]})),
     "N x 3072"),
    (lambda p: p.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]})),
     "2 images but 1 labels"),
    (lambda p: p.write_bytes(pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [10]})),
     "labels must be integers in 0..9"),
    (lambda p: p.write_bytes(pickle.dumps([1, 2, 3])), "expected a dict"),
])
def test_cifar_corrupt_batch(tmp_path, damage, expect):
    root = write_cifar10(tmp_path / "c10")
    damage(root / "cifar-10-batches-py" / "data_batch_2")
    text = error(f"cifar10:{root}")
    assert expect in text and "data_batch_2" in text


def test_cifar_corrupt_meta(tmp_path):
    root = write_cifar10(tmp_path / "c10")
    (root / "cifar-10-batches-py" / "batches.meta").write_bytes(pickle.dumps({"other": 1}))
    assert "expected a dict with a list 'label_names'" in error(f"cifar10:{root}")


def test_imagefolder_errors(tmp_path):
    assert "does not exist" in error(f"imagefolder:{tmp_path / 'nope'}")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    assert "not an image folder" in error(f"imagefolder:{tmp_path / 'flat'}")
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    assert "train/ has no class folders" in error(f"imagefolder:{empty}")

    root = write_imagefolder(tmp_path / "a")
    (root / "train" / "fox").mkdir()
    (root / "train" / "fox" / "readme.txt").write_text("x")
    assert "class 'fox' in" in error(f"imagefolder:{root}") and "has no images" in error(f"imagefolder:{root}")

    root = write_imagefolder(tmp_path / "b")
    (root / "val" / "zebra").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val" / "zebra" / "z.png")
    assert "class folders that" in error(f"imagefolder:{root}")

    root = write_imagefolder(tmp_path / "c")
    (root / "train" / "dog" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    text = error(f"imagefolder:{root}")
    assert "cannot read image" in text and "0.png" in text


def test_imagefolder_unreadable_image_later_is_a_nasdsl_error(tmp_path):
    root = write_imagefolder(tmp_path / "d")
    b = build_data(f"imagefolder:{root}", 16)
    (root / "train" / "cat" / "2.png").write_bytes(b"broken")  # not the one checked eagerly
    index = [i for i, (p, _) in enumerate(b.train.samples) if p.endswith("2.png")][0]
    with pytest.raises(NasdslError, match="cannot read image .*2.png"):
        b.train[index]


# --------------------------------------------------------------------------- preprocessing and augmentation

def _steps(tf) -> list:
    """Every transform inside a (wrapped, composed) pipeline, flattened, in order."""
    if isinstance(tf, TorchSeeded):
        return _steps(tf.transform)
    if hasattr(tf, "transforms"):
        return [s for t in tf.transforms for s in _steps(t)]
    return [tf]


def _flips(tf) -> list[float]:
    return [float(s.p) for s in _steps(tf) if "HorizontalFlip" in type(s).__name__]


def _crop_scales(tf) -> list[tuple]:
    return [tuple(s.scale) for s in _steps(tf) if "RandomResizedCrop" in type(s).__name__]


def aug(**kw):
    """A recipe's `augmentation` section as build_data reads it (attributes only)."""
    from types import SimpleNamespace
    base = dict(scale=None, ratio=(0.75, 4 / 3), hflip=None, auto_augment=None, re_prob=0.0)
    return SimpleNamespace(**{**base, **kw})


def write_folder(root: Path, size: tuple[int, int], mode: str, per_class: int = 4) -> Path:
    """2 classes x per_class images of one size (w, h) and mode, PNG, in train/ and val/."""
    rng = np.random.default_rng(3)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                w, h = size[0] + 3 * i, size[1] + i   # non-square, varying
                Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB").convert(mode) \
                    .save(d / f"{i}.png")
    return root


def test_in_memory_sources_do_not_crop(tmp_path):
    """digits, fake and CIFAR are measured on the whole image: their preprocessing says crop_pct 1.0."""
    from nasdsl.train.data import Preprocessing

    cifar = write_cifar10(tmp_path / "c10")
    for spec, res in (("digits", 16), ("fake", 12), (f"cifar10:{cifar}", 32)):
        b = build_data(spec, res)
        p = b.preprocessing
        assert isinstance(p, Preprocessing) and p.crop_pct == 1.0 and p.crop_mode == "center"
        assert p.input_size == (b.in_channels, res, res) and p.mean == b.mean and p.std == b.std
        assert p.to_timm_cfg() == {"input_size": (b.in_channels, res, res), "mean": b.mean, "std": b.std,
                                   "crop_pct": 1.0, "interpolation": "bilinear", "crop_mode": "center"}
        assert b.crop_pct == 1.0 and b.interpolation == "bilinear"


def test_preprocessing_checks_itself():
    from nasdsl.train.data import Preprocessing

    p = Preprocessing((1, 8, 8), [0.5], [0.25], crop_pct=0.875)
    assert p.mean == (0.5,) and p.to_dict()["input_size"] == [1, 8, 8]
    assert Preprocessing.from_timm_cfg(json_roundtrip(p.to_timm_cfg())) == p
    for bad in (dict(mean=(0.5, 0.5)), dict(std=(0.0,)), dict(crop_pct=1.5), dict(interpolation="nearest"),
                dict(crop_mode="squash")):
        with pytest.raises(NasdslError):
            Preprocessing(**{**dict(input_size=(1, 8, 8), mean=(0.5,), std=(0.25,)), **bad})


def json_roundtrip(value):
    import json
    return json.loads(json.dumps(value))


def test_imagefolder_val_is_timms_eval_transform(tmp_path):
    import timm.data

    b = build_data(f"imagefolder:{write_folder(tmp_path / 'g', (30, 22), 'L')}", 20)
    p = b.preprocessing
    assert p.input_size == (1, 20, 20) and p.crop_pct == 0.875 and len(p.mean) == 1
    tf = timm.data.create_transform(**p.to_timm_cfg())
    for i, (path, _) in enumerate(b.val.samples):
        assert torch.equal(tf(Image.open(path).convert("L")), b.val[i][0])


def test_small_grayscale_folder_trains_with_mild_crops_and_no_flips(tmp_path):
    b = build_data(f"imagefolder:{write_folder(tmp_path / 'sym', (28, 28), 'L')}", 28)
    tf = b.train.transform
    assert _flips(tf) == [] and all(s[0] >= 0.7 for s in _crop_scales(tf)) and _crop_scales(tf)
    assert b.augmentation["scale"] == (0.7, 1.0) and b.augmentation["hflip"] == 0.0
    assert b.augmentation["auto_augment"] is None and b.augmentation["re_prob"] == 0.0
    assert b.train[0][0].shape == (1, 28, 28)


def test_large_rgb_folder_trains_imagenet_style(tmp_path):
    b = build_data(f"imagefolder:{write_folder(tmp_path / 'photos', (200, 160), 'RGB', per_class=1)}", 128)
    tf = b.train.transform
    assert _flips(tf) == [0.5] and _crop_scales(tf) == [(0.08, 1.0)]
    assert b.augmentation["scale"] == (0.08, 1.0) and b.augmentation["hflip"] == 0.5
    # a large resolution over small images is still small images
    small = build_data(f"imagefolder:{write_folder(tmp_path / 'tiny', (28, 28), 'RGB', per_class=1)}", 128)
    assert small.augmentation["scale"] == (0.7, 1.0) and small.augmentation["hflip"] == 0.0


def test_augmentation_settings_take_effect(tmp_path):
    root = write_folder(tmp_path / "sym", (28, 28), "L")
    b = build_data(f"imagefolder:{root}", 28, augmentation=aug(scale=(0.5, 1.0), hflip=0.5, auto_augment="rand",
                                                               re_prob=0.25))
    tf = b.train.transform
    assert _flips(tf) == [0.5] and _crop_scales(tf) == [(0.5, 1.0)]
    assert b.augmentation == {"crop": "random-resized", "scale": (0.5, 1.0), "ratio": (0.75, 4 / 3), "hflip": 0.5,
                              "auto_augment": "rand-m9-mstd0.5", "re_prob": 0.25}
    assert any("RandAugment" in type(s).__name__ for s in _steps(tf))
    assert any("RandomErasing" in type(s).__name__ for s in _steps(tf))
    for i in range(len(b.train)):
        assert b.train[i][0].shape == (1, 28, 28)
    trivial = build_data(f"imagefolder:{root}", 28, augmentation=aug(auto_augment="trivial"))
    assert trivial.augmentation["auto_augment"].startswith("rand-n1-")
    assert trivial.train[0][0].shape == (1, 28, 28)
    with pytest.raises(NasdslError, match="auto_augment"):
        build_data(f"imagefolder:{root}", 28, augmentation=aug(auto_augment="bogus"))


def test_cifar_and_digits_augmentation(tmp_path):
    root = write_cifar10(tmp_path / "c10")
    auto = build_data(f"cifar10:{root}", 32)
    assert auto.augmentation["crop"] == "pad-4" and auto.augmentation["hflip"] == 0.5
    assert _flips(auto.train.transform) == [0.5]
    plain = build_data(f"cifar10:{root}", 32, augmentation=aug(hflip=0.0))
    assert _flips(plain.train.transform) == [] and plain.augmentation["crop"] == "pad-4"
    rrc = build_data(f"cifar10:{root}", 32, augmentation=aug(scale=(0.6, 1.0), auto_augment="rand"))
    assert _crop_scales(rrc.train.transform) == [(0.6, 1.0)] and _flips(rrc.train.transform) == [0.5]
    assert rrc.train[0][0].shape == (3, 32, 32) and rrc.train[0][0].dtype == torch.float32

    digits = build_data("digits", 16)
    assert digits.augmentation["crop"] == "affine" and digits.augmentation["hflip"] == 0.0
    flipped = build_data("digits", 16, augmentation=aug(hflip=0.5, scale=(0.8, 1.0)))
    assert _flips(flipped.train.transform) == [0.5] and _crop_scales(flipped.train.transform) == [(0.8, 1.0)]
    assert flipped.train[0][0].shape == (1, 16, 16)
    assert build_data("fake", 8).augmentation["crop"] == "none"


def test_imagefolder_augmentation_is_seeded_by_torch(tmp_path):
    """timm's crops draw from Python's random: nasdsl seeds it from torch's RNG for every sample."""
    import random

    b = build_data(f"imagefolder:{write_folder(tmp_path / 'g', (40, 30), 'RGB')}", 24,
                   augmentation=aug(auto_augment="rand", re_prob=0.5))
    torch.manual_seed(5)
    random.seed(1)
    first = torch.stack([b.train[i][0] for i in range(len(b.train))])
    torch.manual_seed(5)
    random.seed(2)
    assert torch.equal(first, torch.stack([b.train[i][0] for i in range(len(b.train))]))
