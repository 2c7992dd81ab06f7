"""The MNIST file format (IDX) and where MNIST-style sets keep their four files.

IDX is a tiny header and raw data: two zero bytes, a type byte (0x08: unsigned bytes, the only type
MNIST and Fashion-MNIST use), a byte with the number of dimensions, one big-endian uint32 per
dimension, then the data in C order. An image file is 3-d (N x rows x cols, magic 0x00000803), a
label file 1-d (N, magic 0x00000801). Each file may be gzipped (recognized by its first bytes, not
its name).

We read the files ourselves rather than through torchvision: its MNIST class wants its own folder
layout and its download checks archives against an md5 list, and Debian's `dataset-fashion-mnist`
ships the standard data in .gz files whose gzip headers differ from upstream's, so their md5 differs.
What matters is the content, and this checks all of it: the magic, the dimensions, that the data is
exactly as long as the header says (a truncated or padded file is an error, never a silent short
set), that images and labels agree in number, and that labels are 0..9. Every problem is one
`NasdslError` naming the file. Any image count is accepted, so subsets written in the same format
work (the full sets hold 60000 train and 10000 test images).
"""
from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nasdsl.errors import NasdslError

IDX_UBYTE = 0x08
GZIP_MAGIC = b"\x1f\x8b"
NUM_CLASSES = 10
#: (images, labels) base names of the two splits, as MNIST and Fashion-MNIST publish them
SPLIT_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
#: the folder torchvision's MNIST / FashionMNIST classes put under their root
TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


@dataclass(frozen=True)
class IdxSplit:
    """One split as read: uint8 images N x rows x cols, int64 labels N, and the files they came from."""
    images: np.ndarray
    labels: np.ndarray
    image_file: Path
    label_file: Path


def read_idx(path: Path, ndim: int, where: str) -> np.ndarray:
    """The uint8 array of an IDX file with `ndim` dimensions (gzipped or not), validated in full."""
    raw = _read_bytes(path, where)
    expected = (IDX_UBYTE << 8) | ndim
    if len(raw) < 4:
        raise NasdslError(f"{path} is truncated: {len(raw)} bytes, shorter than the 4-byte IDX magic", file=where)
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected:
        raise NasdslError(f"{path} is not an IDX file of {ndim}-d unsigned bytes: magic 0x{magic:08x}, "
                          f"expected 0x{expected:08x}", file=where)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise NasdslError(f"{path} is truncated: {len(raw)} bytes, shorter than its {header}-byte header",
                          file=where)
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    size = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != size:
        what = "truncated" if len(raw) - header < size else "longer than its header says"
        raise NasdslError(f"{path} is {what}: the header gives {' x '.join(map(str, shape))} = {size} bytes of "
                          f"data, the file holds {len(raw) - header}", file=where)
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _read_bytes(path: Path, where: str) -> bytes:
    """The file's bytes, gunzipped when it starts with gzip's magic; a bad archive names the file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise NasdslError(f"cannot read {path}: {exc.strerror or exc}", file=where) from None
    if raw[:2] != GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        text = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
        raise NasdslError(f"corrupt gzip file {path}: {reason}", file=where) from None


def find_folder(root: Path, source: str, where: str) -> Path:
    """The folder holding the IDX files: ROOT itself, ROOT/raw, or ROOT/MNIST/raw (FashionMNIST/raw),
    the layouts of the published files and of torchvision's download; the first that holds any."""
    if not root.exists():
        raise NasdslError(f"directory {root} does not exist", file=where)
    if not root.is_dir():
        raise NasdslError(f"{root} is not a directory", file=where)
    candidates = [root, root / "raw", root / TORCHVISION_FOLDERS[source] / "raw"]
    names = [n for pair in SPLIT_FILES.values() for n in pair]
    for folder in candidates:
        if any((folder / n).is_file() or (folder / f"{n}.gz").is_file() for n in names):
            return folder
    raise NasdslError(f"no IDX files in {root} (expected {', '.join(names)}, each optionally .gz, in "
                      f"{root}, {root}/raw or {root}/{TORCHVISION_FOLDERS[source]}/raw)", file=where)


def _file(folder: Path, name: str, where: str) -> Path:
    """NAME or NAME.gz in `folder` (the plain file first: torchvision keeps both after extracting)."""
    for path in (folder / name, folder / f"{name}.gz"):
        if path.is_file():
            return path
    raise NasdslError(f"file {name} (or {name}.gz) is missing in {folder}", file=where)


def read_split(folder: Path, split: str, where: str) -> IdxSplit:
    """Images and labels of 'train' or 'test', checked against each other."""
    image_name, label_name = SPLIT_FILES[split]
    image_file, label_file = _file(folder, image_name, where), _file(folder, label_name, where)
    images = read_idx(image_file, 3, where)
    labels = read_idx(label_file, 1, where)
    if images.shape[0] == 0 or min(images.shape[1:]) == 0:
        raise NasdslError(f"{image_file} holds no images (shape {' x '.join(map(str, images.shape))})", file=where)
    if labels.shape[0] != images.shape[0]:
        raise NasdslError(f"{label_file} holds {labels.shape[0]} labels but {image_file.name} holds "
                          f"{images.shape[0]} images", file=where)
    if labels.max() >= NUM_CLASSES:
        raise NasdslError(f"{label_file} has label {int(labels.max())}: labels must be 0..{NUM_CLASSES - 1}",
                          file=where)
    return IdxSplit(images, labels.astype(np.int64), image_file, label_file)


def read_mnist(root: Path, source: str, where: str) -> tuple[IdxSplit, IdxSplit]:
    """(train, test) of an MNIST-format set under `root`; both splits must share one image size."""
    folder = find_folder(root, source, where)
    train, test = read_split(folder, "train", where), read_split(folder, "test", where)
    if train.images.shape[1:] != test.images.shape[1:]:
        size = "x".join(map(str, train.images.shape[1:]))
        raise NasdslError(f"{test.image_file} holds {'x'.join(map(str, test.images.shape[1:]))} images but "
                          f"{train.image_file.name} holds {size} ones", file=where)
    return train, test
