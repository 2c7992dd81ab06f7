"""--data mnist:DIR and fashion-mnist[:DIR]: tiny IDX files written in the real format (gzipped and
not, in each folder layout), the subset option, every error as one line naming the file, a short
search, and (when Debian's package is installed) the real Fashion-MNIST."""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nasdsl.errors import NasdslError
from nasdsl.train import data as data_module
from nasdsl.train.data import build_data, stratified_subset
from nasdsl.train.idx import read_mnist

from cli_helpers import TINY, run_nasdsl

N_TRAIN, N_TEST = 50, 20
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train-images": "train-images-idx3-ubyte", "train-labels": "train-labels-idx1-ubyte",
         "t10k-images": "t10k-images-idx3-ubyte", "t10k-labels": "t10k-labels-idx1-ubyte"}


# --------------------------------------------------------------------------- fixtures in the real format

def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file: 0x00 0x00, type 0x08 (uint8), the number of dimensions, big-endian sizes, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    raw = idx_bytes(array)
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def make_split(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n 28x28 images, labels 0..9 equally often in a shuffled order; each class a bright band at its
    own rows plus noise, so a network can learn it."""
    labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    for i, y in enumerate(labels):
        images[i, 2 + 2 * y:4 + 2 * y, 4:24] = 250
    return images, labels


def write_mnist(root: Path, gz: bool = False, layout: str = "", n_train: int = N_TRAIN, n_test: int = N_TEST):
    """The four files in root/layout; returns (folder, {name: (images, labels)})."""
    folder = root / layout if layout else root
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    splits = {"train": make_split(rng, n_train), "t10k": make_split(rng, n_test)}
    for split, (images, labels) in splits.items():
        write_idx(folder / FILES[f"{split}-images"], images, gz)
        write_idx(folder / FILES[f"{split}-labels"], labels, gz)
    return folder, splits


def error(spec: str, resolution: int = 28) -> str:
    with pytest.raises(NasdslError) as info:
        build_data(spec, resolution)
    text = str(info.value)
    assert "\n" not in text and "Traceback" not in text
    assert text.startswith(f"--data {spec}: ")
    return text


# --------------------------------------------------------------------------- reading

@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("source, layout", [("mnist", ""), ("mnist", "raw"), ("mnist", "MNIST/raw"),
                                            ("fashion-mnist", "FashionMNIST/raw")])
def test_reads_every_layout_gzipped_or_not(tmp_path, gz, source, layout):
    _, splits = write_mnist(tmp_path, gz=gz, layout=layout)
    b = build_data(f"{source}:{tmp_path}", 28)
    assert b.name == source and b.num_classes == 10 and b.in_channels == 1 and b.resolution == 28
    assert len(b.train) == N_TRAIN and len(b.val) == N_TEST and b.path == str(tmp_path)
    assert b.classes[0] == ("0" if source == "mnist" else "T-shirt/top") and len(b.classes) == 10
    images, labels = splits["t10k"]
    assert b.val.targets == labels.tolist() and b.train.targets == splits["train"][1].tolist()
    for i in (0, N_TEST - 1):  # validation: the file's image, scaled to [0, 1] and normalized, nothing else
        x, y = b.val[i]
        assert x.dtype == torch.float32 and x.shape == (1, 28, 28) and y == int(labels[i])
        want = (torch.from_numpy(images[i]).float() / 255 - b.mean[0]) / b.std[0]
        assert torch.allclose(x[0], want, atol=1e-5)
    x, y = b.train[0]
    assert x.shape == (1, 28, 28) and torch.isfinite(x).all() and isinstance(y, int)


def test_plain_file_wins_over_its_gz_as_torchvision_leaves_both(tmp_path):
    folder, _ = write_mnist(tmp_path)
    (folder / (FILES["train-images"] + ".gz")).write_bytes(b"stale archive, never read")
    assert len(build_data(f"mnist:{tmp_path}", 28).train) == N_TRAIN


def test_resolution_and_normalisation_from_the_training_images(tmp_path):
    _, splits = write_mnist(tmp_path)
    b = build_data(f"mnist:{tmp_path}", 32)
    assert b.train.images.dtype == torch.uint8 and b.train.images.shape == (N_TRAIN, 1, 32, 32)
    assert b.val.images.shape == (N_TEST, 1, 32, 32) and b.val[0][0].shape == (1, 32, 32)
    pixels = b.train.images.double() / 255  # mean/std: of the training images at the resolution
    assert b.mean[0] == pytest.approx(float(pixels.mean()), abs=1e-4)
    assert b.std[0] == pytest.approx(float(pixels.std()), abs=1e-4)
    at28 = build_data(f"mnist:{tmp_path}", 28)
    raw = splits["train"][0] / 255.0
    assert at28.mean[0] == pytest.approx(raw.mean(), abs=1e-4) and at28.std[0] == pytest.approx(raw.std(ddof=1),
                                                                                                    abs=1e-4)
    normalized = torch.stack([at28.val[i][0] for i in range(N_TEST)])
    assert abs(float(normalized.mean())) < 0.5 and 0.5 < float(normalized.std()) < 2


@pytest.mark.parametrize("resolution, grey_levels", [(28, 0.001), (32, 1.01), (20, 1.01)])
def test_timm_eval_transform_of_the_preprocessing_reproduces_the_validation_inputs(tmp_path, resolution,
                                                                                    grey_levels):
    """An export advertises `preprocessing`; timm's eval transform of it on the file's image as a PIL
    'L' image gives nasdsl's validation tensor: exactly at 28 px, within one grey level (PIL's and
    torch's bilinear resize rounding apart) when resized up or down."""
    _, splits = write_mnist(tmp_path)
    b = build_data(f"fashion-mnist:{tmp_path}", resolution)
    assert b.preprocessing.to_timm_cfg() == {"input_size": (1, resolution, resolution), "mean": b.mean,
                                             "std": b.std, "crop_pct": 1.0, "interpolation": "bilinear",
                                             "crop_mode": "center"}
    tf = b.preprocessing.eval_transform()
    for i in range(0, N_TEST, 7):
        theirs = tf(Image.fromarray(splits["t10k"][0][i], "L"))
        assert theirs.shape == (1, resolution, resolution)
        assert float((theirs - b.val[i][0]).abs().max()) * b.std[0] * 255 <= grey_levels


def test_augmentation_is_the_digits_affine_never_a_flip(tmp_path):
    write_mnist(tmp_path)
    b = build_data(f"mnist:{tmp_path}", 28)
    assert b.augmentation["crop"] == "affine" and b.augmentation["hflip"] == 0.0
    assert any(isinstance(s, data_module.RandomAffine) for s in b.train.transform.transforms)
    torch.manual_seed(0)
    first = b.train[3][0]
    torch.manual_seed(0)
    assert torch.equal(first, b.train[3][0]) and not torch.equal(first, b.train[3][0])
    assert torch.equal(b.val[3][0], b.val[3][0])


def test_recipe_augmentation_goes_through_timm(tmp_path):
    from types import SimpleNamespace

    write_mnist(tmp_path)
    aug = SimpleNamespace(scale=(0.8, 1.0), ratio=(0.75, 1.33), hflip=0.5, auto_augment="rand", re_prob=0.25)
    b = build_data(f"fashion-mnist:{tmp_path}", 24, augmentation=aug)
    assert b.augmentation["crop"] == "random-resized" and b.augmentation["hflip"] == 0.5
    torch.manual_seed(1)
    x, _ = b.train[0]
    assert x.shape == (1, 24, 24) and x.dtype == torch.float32 and torch.isfinite(x).all()


# --------------------------------------------------------------------------- the subset option

def test_subset_is_stratified_first_in_file_order_and_fixed(tmp_path):
    _, splits = write_mnist(tmp_path, gz=True)
    labels = splits["train"][1]
    b = build_data(f"mnist:{tmp_path}?train=20,val=10", 28)
    assert len(b.train) == 20 and len(b.val) == 10
    assert np.bincount(b.train.targets, minlength=10).tolist() == [2] * 10
    assert np.bincount(b.val.targets, minlength=10).tolist() == [1] * 10
    kept = np.sort(np.concatenate([np.flatnonzero(labels == k)[:2] for k in range(10)]))
    assert torch.equal(b.train.images[:, 0], torch.from_numpy(splits["train"][0][kept]))  # file order
    again = build_data(f"mnist:{tmp_path}?val=10&train=20", 28)  # '&' too; another order; no seed involved
    assert torch.equal(again.train.images, b.train.images) and again.val.targets == b.val.targets
    assert build_data(f"mnist:{tmp_path}?val=20", 28).train.targets == labels.tolist()  # train: all of it
    assert len(build_data(f"mnist:{tmp_path}?TRAIN = 50", 28).train) == N_TRAIN


def test_subset_of_unequal_classes_keeps_their_shares():
    labels = np.repeat(np.arange(10), [30, 20, 10, 10, 10, 5, 5, 5, 3, 2])  # 100 images
    rng = np.random.default_rng(3)
    labels = labels[rng.permutation(len(labels))]
    keep = stratified_subset(labels, 10, "train=10", "f", "w")
    assert np.bincount(labels[keep], minlength=10).tolist() == [3, 2, 1, 1, 1, 1, 1, 0, 0, 0]
    assert np.all(np.diff(keep) > 0) and len(keep) == 10   # remainders .5 each: labels 5, 6 win the ties
    keep = stratified_subset(labels, 37, "train=37", "f", "w")
    counts = np.bincount(labels[keep], minlength=10)
    assert counts.sum() == 37 and np.all(np.abs(counts - 37 * np.bincount(labels) / 100) < 1)
    assert stratified_subset(labels, 100, "train=100", "f", "w").tolist() == list(range(100))


@pytest.mark.parametrize("options, expect", [
    ("trian=5", "unknown option 'trian' (did you mean 'train'?); known: train=N, val=N"),
    ("vall=5", "(did you mean 'val'?)"),
    ("train=0", "train must be a positive whole number of images, got '0'"),
    ("train=-3", "got '-3'"),
    ("train=1e4", "got '1e4'"),
    ("train=", "got ''"),
    ("train", "option 'train' is not KEY=N"),
    ("train=5,train=6", "option train is given twice"),
    ("", "nothing after '?'"),
    ("train=51", f"train=51 asks for more than the {N_TRAIN} images in"),
    ("val=21", f"val=21 asks for more than the {N_TEST} images in"),
])
def test_bad_subset_options_are_one_line(tmp_path, options, expect):
    write_mnist(tmp_path)
    text = error(f"mnist:{tmp_path}?{options}")
    assert expect in text
    if "asks for more" in expect:
        assert ("train-images-idx3-ubyte" if options.startswith("train") else "t10k-images-idx3-ubyte") in text


def test_other_sources_take_no_options(tmp_path):
    assert "digits takes no options (got '?train=5')" in error("digits?train=5")
    assert "for mnist and fashion-mnist" in error(f"cifar10:{tmp_path}?train=5")


# --------------------------------------------------------------------------- errors

def test_missing_directory_and_files(tmp_path):
    assert f"directory {tmp_path / 'nope'} does not exist" in error(f"mnist:{tmp_path / 'nope'}")
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in error(f"mnist:{tmp_path / 'file'}")
    (tmp_path / "empty").mkdir()
    text = error(f"fashion-mnist:{tmp_path / 'empty'}")
    assert "no IDX files in" in text and "train-images-idx3-ubyte" in text and "FashionMNIST/raw" in text
    folder, _ = write_mnist(tmp_path / "m", layout="raw")
    (folder / FILES["t10k-labels"]).unlink()
    text = error(f"mnist:{tmp_path / 'm'}")
    assert f"file t10k-labels-idx1-ubyte (or t10k-labels-idx1-ubyte.gz) is missing in {folder}" in text


def _damage(folder: Path, name: str, gz: bool, change) -> Path:
    """Rewrite one file's uncompressed bytes with `change`, keeping its compression; returns its path."""
    path = folder / (FILES[name] + (".gz" if gz else ""))
    raw = path.read_bytes()
    raw = change(gzip.decompress(raw) if gz else raw)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("name, change, expect", [
    ("train-images", lambda b: b[:-100], "is truncated: the header gives 50 x 28 x 28 = 39200 bytes of data, "
                                         "the file holds 39100"),
    ("train-images", lambda b: b[:10], "shorter than its 16-byte header"),
    ("t10k-labels", lambda b: b[:2], "shorter than the 4-byte IDX magic"),
    ("train-labels", lambda b: b + b"\0", "is longer than its header says"),
    ("train-images", lambda b: b"\0\0\x08\x01" + b[4:], "is not an IDX file of 3-d unsigned bytes: magic "
                                                       "0x00000801, expected 0x00000803"),
    ("t10k-labels", lambda b: b"\0\0\x0d\x01" + b[4:], "magic 0x00000d01, expected 0x00000801"),
    ("train-labels", lambda b: idx_bytes(np.zeros(49, np.uint8)), "holds 49 labels but train-images-idx3-ubyte"),
    ("t10k-labels", lambda b: b[:-1] + b"\x0a", "has label 10: labels must be 0..9"),
    ("t10k-images", lambda b: idx_bytes(np.zeros((20, 14, 14), np.uint8)), "holds 14x14 images but "
                                                                           "train-images-idx3-ubyte"),
    ("train-images", lambda b: idx_bytes(np.zeros((0, 28, 28), np.uint8)), "holds no images"),
])
def test_damaged_file_is_one_line_naming_it(tmp_path, gz, name, change, expect):
    folder, _ = write_mnist(tmp_path, gz=gz)
    path = _damage(folder, name, gz, change)
    text = error(f"mnist:{tmp_path}")
    assert expect in text and str(path) in text


def test_corrupt_gzip_and_unreadable_file(tmp_path):
    folder, _ = write_mnist(tmp_path, gz=True)
    path = folder / (FILES["train-labels"] + ".gz")
    path.write_bytes(path.read_bytes()[:-12])  # cut inside the archive
    text = error(f"mnist:{tmp_path}")
    assert f"corrupt gzip file {path}" in text
    path.write_bytes(b"\x1f\x8bnot deflate at all")
    assert f"corrupt gzip file {path}" in error(f"mnist:{tmp_path}")
    path.unlink()
    path.mkdir()  # a folder where the file should be: not found as a file
    assert "train-labels-idx1-ubyte (or train-labels-idx1-ubyte.gz) is missing" in error(f"mnist:{tmp_path}")


def test_one_grey_level_is_an_error_naming_the_file(tmp_path):
    folder, _ = write_mnist(tmp_path)
    path = _damage(folder, "train-images", False, lambda b: idx_bytes(np.full((N_TRAIN, 28, 28), 7, np.uint8)))
    assert f"the training images of {path} are all one grey level" in error(f"mnist:{tmp_path}")


def test_fashion_mnist_without_dir_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setitem(data_module.DEFAULT_DIRS, "fashion-mnist", str(tmp_path / "absent"))
    text = error("fashion-mnist")
    assert f"{tmp_path / 'absent'} is absent: apt-get install dataset-fashion-mnist, or pass --data " \
           f"fashion-mnist:DIR" in text
    write_mnist(tmp_path / "present")
    monkeypatch.setitem(data_module.DEFAULT_DIRS, "fashion-mnist", str(tmp_path / "present"))
    assert len(build_data("fashion-mnist?train=10", 28).train) == 10
    assert "mnist needs a directory: --data mnist:DIR" in error("mnist")
    assert "fashion-mnist[:DIR]" in error("fashion")


# --------------------------------------------------------------------------- end to end

def test_search_on_idx_files_writes_a_summary(tmp_path):
    write_mnist(tmp_path / "data", gz=True, n_train=64, n_test=20)
    space = tmp_path / "tiny.space"
    space.write_text(TINY)
    out = tmp_path / "run"
    run_nasdsl("search", space, "--data", f"mnist:{tmp_path / 'data'}?train=48", "--out", out, "-q",
               "--set", "resolution=8", "--set", "batch_size=16", "--set", "weights.epochs=1",
               "--set", "architecture.epochs=1", "--set", "finetune.epochs=1", timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["derived"]["top1"] <= 1.0
    config = json.loads(next(out.rglob("config.json")).read_text())
    assert config["pretrained_cfg"]["input_size"] == [1, 8, 8]


def test_search_stops_on_a_damaged_file_before_training(tmp_path):
    folder, _ = write_mnist(tmp_path / "data")
    path = _damage(folder, "t10k-images", False, lambda b: b[:-1])
    space = tmp_path / "tiny.space"
    space.write_text(TINY)
    out = tmp_path / "run"
    proc = run_nasdsl("search", space, "--data", f"mnist:{tmp_path / 'data'}", "--out", out, check=False,
                      timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "truncated" in lines[0]
    assert not out.exists()


# --------------------------------------------------------------------------- the real set (Debian's package)

@pytest.mark.skipif(not DEBIAN.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_debian_fashion_mnist_is_the_full_standard_set():
    train, test = read_mnist(DEBIAN, "fashion-mnist", "test")
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert np.bincount(train.labels).tolist() == [6000] * 10 and np.bincount(test.labels).tolist() == [1000] * 10
    assert train.image_file.name == "train-images-idx3-ubyte.gz"
    b = build_data("fashion-mnist?train=1000,val=500", 28)  # the default directory
    assert b.path == str(DEBIAN) and len(b.train) == 1000 and len(b.val) == 500
    assert np.bincount(b.train.targets).tolist() == [100] * 10
