"""Datasets for `--data NAME[:PATH]`: what the trainer searches and finetunes on.

    digits            scikit-learn's bundled UCI digits (1797 8x8 grayscale, 10 classes); the default
    fake              small deterministic synthetic set for smoke tests (256 train / 64 val, 10 classes)
    cifar10:DIR       torchvision's CIFAR-10 python format: DIR/cifar-10-batches-py/
    cifar100:DIR      torchvision's CIFAR-100 python format: DIR/cifar-100-python/
    imagefolder:DIR   DIR/train/<class>/*.jpg|png|... and DIR/val/<class>/...
    mnist:DIR         MNIST's four IDX files (gzipped or not) in DIR, DIR/raw or DIR/MNIST/raw
    fashion-mnist[:DIR]  Fashion-MNIST, likewise (DIR/FashionMNIST/raw); without DIR, Debian's
                      /usr/share/datasets/fashion-mnist (`apt-get install dataset-fashion-mnist`)

MNIST and Fashion-MNIST take subset options after a '?': `fashion-mnist:DIR?train=10000,val=2000`
('&' separates too; quote the spec in a shell). train=N keeps N of the training images, val=N N of
the test images, which are the validation set. The subset is stratified and fixed, never drawn from
the run's seed: each class keeps its share of N (N x its count / all, rounded down, the images left
over going to the classes with the largest remainders, ties to the lower label) and takes its
FIRST images in file order. The published files are already shuffled, so these are a random sample,
the same on every machine and run.

`build_data(spec, resolution, augmentation=..., download=...)` returns a `DataBundle`. Every problem
with the data is found here, at build time, and reported as one `NasdslError` naming the `--data`
spec, never as a traceback from the first batch. Nothing is ever downloaded unless `download=True`.

Preprocessing: each source makes one `Preprocessing` (input size, mean/std, crop_pct, interpolation,
crop mode: the keys of timm's pretrained_cfg). The validation set follows it and the export writes
exactly `to_timm_cfg()`, so timm's standard eval transform on an export reproduces nasdsl's top-1.
- digits / fake / CIFAR: crop_pct 1.0 (their images are square and measured whole: a plain resize).
- imagefolder: crop_pct 0.875 (ImageNet-style: shorter side to resolution / 0.875, centre crop), and
  the validation transform IS `timm.data.create_transform(**preprocessing.to_timm_cfg())`.

Training augmentation: the recipe's `augmentation` (scale, ratio, hflip, auto_augment, re_prob);
None means auto, resolved by `resolve_augmentation` and reported as `DataBundle.augmentation`:
- imagefolder: a random-resized crop, built with timm's `create_transform(is_training=True)`.
  Photos (resolution and the median shorter side of the first image of each class both >= 128 px):
  ImageNet-style, scale (0.08, 1), hflip 0.5. Small images (either below 128 px, e.g. 28 px symbols):
  scale (0.7, 1.0) and no flips; ImageNet's 8% crops and flips wreck such data.
- CIFAR: the usual random crop with padding (4 px at 32 px) and hflip 0.5.
- digits: a small random affine (rotation, shift, zoom), never a flip. fake: no augmentation.
- A `scale` replaces a source's own crop with timm's random-resized crop; `hflip`, `auto_augment`
  ('rand' -> 'rand-m9-mstd0.5'; 'trivial' -> 'rand-n1-m9-mstd101-inc1', TrivialAugment as timm's
  RandAugment: one op, uniform magnitude, since this timm has no 'trivialaugment' policy; or any timm
  policy string) and `re_prob` (random erasing) apply through timm to every source (in-memory images
  go through PIL for it). ratio defaults to (3/4, 4/3). No colour jitter (not a recipe setting).

Randomness: torchvision v2 transforms draw from torch's RNG; timm's draw from Python's `random` and
NumPy, which `TorchSeeded` seeds from torch's RNG per sample. So a run that seeds torch (and the
DataLoader's generator, which seeds each worker) is reproducible.

Decisions, documented here once:
- CIFAR integrity: torchvision checks the official md5 of every batch file before loading. We do not:
  the loader only requires the files to exist and to unpickle into the documented layout (a dict
  with `data`, a uint8 N x 3072 array, and `labels` / `fine_labels`), which it checks itself and
  reports per file. This accepts hand-made or subset folders in the same format (and the tests'
  tiny fixtures) and still turns a truncated or garbled file into a clear error. `--download` goes
  through torchvision's own download, which does verify the official archive's md5; it is skipped
  when the batches folder already exists.
- imagefolder channels: RGB (3 channels) unless the first image of every train class is grayscale
  (modes 1, L, LA, I, I;16, F), then 1 channel; every image is converted to that mode on load (so
  does a user of the export: `Image.open(f).convert("L")` for a 1-channel model).
- digits / fake: resized once to the resolution at build time (bilinear) and kept in memory as
  float tensors; mean/std are computed from the train split at that resolution.
- MNIST / Fashion-MNIST: 1 channel; resized once at build time (bilinear, as digits) but kept as
  uint8 (60000 images are 61 MB at 32 px, not 246 MB as floats, and 3 GB at 224 px instead of 12),
  converted and normalized per sample; mean/std from the (subset's) training images at the
  resolution; augmentation as the digits' (small random affine, no flips: flipped digits are other
  symbols; Fashion-MNIST's items survive a flip, `augmentation.hflip` turns it on). Crop_pct 1.0:
  timm's eval transform of the export on a PIL 'L' image of the 28 px file reproduces the input.
  The files are read and checked by `nasdsl.train.idx` (content, not archive checksums).
"""
from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from nasdsl.errors import NasdslError, did_you_mean

#: source name -> whether it takes a PATH
SOURCES: dict[str, bool] = {"digits": False, "fake": False, "cifar10": True, "cifar100": True,
                            "imagefolder": True, "mnist": True, "fashion-mnist": True}
#: sources whose PATH may be left out, and where they then look
DEFAULT_DIRS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}
DEFAULT_DIR_PACKAGES = {"fashion-mnist": "dataset-fashion-mnist"}
#: sources that take '?train=N,val=N' subset options
SUBSET_SOURCES = ("mnist", "fashion-mnist")
SUBSET_OPTIONS = ("train", "val")
MNIST_CLASSES = {"mnist": tuple(str(i) for i in range(10)),
                 "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                   "Sneaker", "Bag", "Ankle boot")}
RESIZE_CHUNK = 4096        # images resized (and summed for mean/std) at a time: bounds the float copies

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD = (0.449,), (0.226,)
IMAGEFOLDER_CROP_PCT = 0.875
INTERPOLATIONS = ("bilinear", "bicubic")
CROP_MODES = ("center",)
SMALL_IMAGE = 128          # px: below this (resolution or images) an image folder trains with mild crops, no flips
AUTO_AUGMENT_ALIASES = {"rand": "rand-m9-mstd0.5", "trivial": "rand-n1-m9-mstd101-inc1"}
DEFAULT_RATIO = (3 / 4, 4 / 3)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F"}

DIGITS_SPLIT_SEED = 0      # fixed: the digits train/val split never depends on the run's seed
DIGITS_VAL_FRACTION = 0.2
FAKE_SEED, FAKE_TRAIN, FAKE_VAL, FAKE_CLASSES, FAKE_CHANNELS = 1234, 256, 64, 10, 3


@dataclass(frozen=True)
class Preprocessing:
    """How an image file becomes the model's input at evaluation, in the terms of timm's pretrained_cfg.

    One value, made once by the data source: the validation set is built from it (imagefolder: its
    transform IS timm's eval transform of these settings) and the export advertises exactly
    `to_timm_cfg()`, so `timm.data.create_transform(**resolve_data_config({}, model=m))` reproduces
    the inputs nasdsl measured top-1 on. A 1-channel model takes PIL 'L' images (`img.convert("L")`),
    as nasdsl converts them; timm's transform normalizes with the 1-element mean/std as given."""
    input_size: tuple           # (C, H, W)
    mean: tuple                 # one value per channel
    std: tuple
    crop_pct: float = 1.0       # resize the shorter side to H / crop_pct, then centre-crop H x W
    interpolation: str = "bilinear"
    crop_mode: str = "center"

    def __post_init__(self):
        where = "preprocessing"
        try:
            size = tuple(int(v) for v in self.input_size)
            mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
            crop = float(self.crop_pct)
        except (TypeError, ValueError):
            raise NasdslError(f"input_size, mean, std and crop_pct must be numbers, got {self!r}", file=where) from None
        if len(size) != 3 or min(size) < 1:
            raise NasdslError(f"input_size must be (channels, height, width), got {self.input_size!r}", file=where)
        for what, values in (("mean", mean), ("std", std)):
            if len(values) != size[0] or not all(math.isfinite(v) for v in values):
                raise NasdslError(f"{what} needs {size[0]} finite values (one per input channel), got {values}",
                                  file=where)
        if min(std) <= 0:
            raise NasdslError(f"std must be positive, got {std}", file=where)
        if not 0 < crop <= 1:
            raise NasdslError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}", file=where)
        if self.interpolation not in INTERPOLATIONS:
            raise NasdslError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}",
                              file=where)
        if self.crop_mode not in CROP_MODES:
            raise NasdslError(f"crop_mode must be one of {', '.join(CROP_MODES)}, got {self.crop_mode!r}", file=where)
        for name, value in (("input_size", size), ("mean", mean), ("std", std), ("crop_pct", crop)):
            object.__setattr__(self, name, value)

    def to_timm_cfg(self) -> dict:
        """The keys of timm's pretrained_cfg (and create_transform's arguments) this sets."""
        return {"input_size": self.input_size, "mean": self.mean, "std": self.std, "crop_pct": self.crop_pct,
                "interpolation": self.interpolation, "crop_mode": self.crop_mode}

    def to_dict(self) -> dict:
        """`to_timm_cfg()` as JSON holds it (lists), for config.json and run summaries."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.to_timm_cfg().items()}

    @classmethod
    def from_timm_cfg(cls, cfg: dict, where: str = "pretrained_cfg") -> "Preprocessing":
        """Back from a pretrained_cfg (an export's config.json); crop and interpolation default as timm's."""
        missing = [k for k in ("input_size", "mean", "std") if k not in cfg]
        if missing:
            raise NasdslError(f"{where} lacks {', '.join(missing)}: cannot tell the preprocessing")
        return cls(tuple(cfg["input_size"]), tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("crop_pct", 0.875),
                   cfg.get("interpolation", "bilinear"), cfg.get("crop_mode", "center"))

    def eval_transform(self):
        """timm's own eval transform for these settings (PIL image in, normalized tensor out)."""
        import timm.data

        return timm.data.create_transform(**self.to_timm_cfg(), is_training=False)


@dataclass
class DataBundle:
    """Train and validation sets plus what a model and its export need to know about them.

    `train[i]` / `val[i]` -> (float tensor C x resolution x resolution, normalized; int label).
    `preprocessing` is the one record of the input format; the other input facts read it."""
    name: str                   # source name: digits, fake, cifar10, cifar100, imagefolder
    spec: str                   # the --data spec as given
    train: Dataset
    val: Dataset
    num_classes: int
    preprocessing: Preprocessing
    classes: tuple = ()         # class names, index = label
    path: str | None = None     # the data directory, for sources that have one
    augmentation: dict = field(default_factory=dict)   # the training augmentation, every 'auto' resolved
    notes: list[str] = field(default_factory=list)

    in_channels = property(lambda self: self.preprocessing.input_size[0])
    resolution = property(lambda self: self.preprocessing.input_size[-1])
    mean = property(lambda self: self.preprocessing.mean)
    std = property(lambda self: self.preprocessing.std)
    crop_pct = property(lambda self: self.preprocessing.crop_pct)
    interpolation = property(lambda self: self.preprocessing.interpolation)


class TensorImageDataset(Dataset):
    """Images kept in memory as one N x C x H x W tensor; `transform` runs per sample on a tensor."""

    def __init__(self, images: torch.Tensor, labels, transform: Callable | None = None):
        self.images = images
        self.targets = [int(t) for t in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = self.images[index]
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


class ImageFileDataset(Dataset):
    """Image files read with PIL and converted to `mode` ('L' or 'RGB') on every access."""

    def __init__(self, samples: list[tuple[str, int]], mode: str, transform: Callable, where: str):
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.mode = mode
        self.transform = transform
        self.where = where

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            img = _open_image(path, self.mode)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a data error
            raise NasdslError(f"cannot read image {path}: {_reason(exc)}", file=self.where) from None
        return self.transform(img), label


class RandomAffine:
    """Random rotation (+-degrees), shift (+-translate of the size) and zoom (1 +- scale) of a float
    C x H x W tensor, bilinear, zero fill; draws from torch's RNG.

    torchvision's RandomAffine does the same but costs about 2 ms a sample on a busy 2-core CPU
    (affine_grid's batched matmul); this builds the grid elementwise from a cached base: ~0.1 ms."""

    def __init__(self, degrees: float, translate: float, scale: float):
        self.degrees, self.translate, self.scale = degrees, translate, scale
        self._base: dict[tuple[int, int], torch.Tensor] = {}

    def base(self, h: int, w: int) -> torch.Tensor:
        if (h, w) not in self._base:
            ys = (torch.arange(h, dtype=torch.float32) * 2 + 1) / h - 1
            xs = (torch.arange(w, dtype=torch.float32) * 2 + 1) / w - 1
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            self._base[(h, w)] = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1).unsqueeze(-2)  # H W 1 3
        return self._base[(h, w)]

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        r = (torch.rand(4) * 2 - 1).tolist()
        angle = math.radians(self.degrees * r[0])
        zoom = 1.0 + self.scale * r[1]
        cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
        theta = torch.tensor([[cos, -sin, 2 * self.translate * r[2]],
                              [sin, cos, 2 * self.translate * r[3]]], dtype=img.dtype)
        grid = (self.base(img.shape[-2], img.shape[-1]) * theta).sum(-1).unsqueeze(0)
        return F.grid_sample(img.unsqueeze(0), grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False).squeeze(0)

    def __repr__(self) -> str:
        return f"RandomAffine(degrees={self.degrees}, translate={self.translate}, scale={self.scale})"


class TorchSeeded:
    """Run `transform` with Python's and NumPy's global RNGs seeded from torch's RNG, then restore them.

    timm's transforms draw from `random` (crops, erasing, RandAugment) and `numpy.random` (AugMix).
    Runs reseed torch every epoch and the DataLoader seeds each worker's torch, so taking the seed
    from torch keeps an augmented epoch a function of the run's seed (and resumable), with or
    without workers, and leaves the caller's Python/NumPy random streams as they were."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, img):
        import random

        import numpy as np

        seed = int(torch.randint(0, 2**62, ()))
        state, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            return self.transform(img)
        finally:
            random.setstate(state)
            np.random.set_state(np_state)

    def __repr__(self) -> str:
        return f"TorchSeeded({self.transform!r})"


def _clamp01(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0.0, 1.0)


# --------------------------------------------------------------------------- entry point

def parse_spec(spec: str) -> tuple[str, str | None]:
    """'cifar10:/x' -> ('cifar10', '/x'); 'digits' -> ('digits', None). Raises on unknown names.

    Options after a '?' are left to `parse_options`; a source with a default directory
    (`DEFAULT_DIRS`) given none gives None, and its builder looks there."""
    where = f"--data {spec}"
    name, sep, path = spec.partition("?")[0].strip().partition(":")
    name = name.strip().lower()
    if not name:
        raise NasdslError("empty data source; expected NAME[:PATH] with NAME one of " + _known(), file=where)
    if name not in SOURCES:
        raise NasdslError(f"unknown data source '{name}'{did_you_mean(name, SOURCES)}; known: {_known()}",
                          file=where)
    path = path.strip() if sep else ""
    if SOURCES[name] and not path and name not in DEFAULT_DIRS:
        raise NasdslError(f"{name} needs a directory: --data {name}:DIR", file=where)
    if not SOURCES[name] and path:
        raise NasdslError(f"{name} is built in and takes no PATH (got '{path}')", file=where)
    return name, (os.path.expanduser(path) if path else None)


def parse_options(spec: str) -> dict[str, int]:
    """The subset options after a '?' ('train=10000,val=2000', '&' works too) as {'train': 10000, ...};
    {} without a '?'. Only `SUBSET_SOURCES` take them; every mistake is one line."""
    where = f"--data {spec}"
    base, sep, text = spec.partition("?")
    if not sep:
        return {}
    name = base.partition(":")[0].strip().lower()
    if name not in SUBSET_SOURCES:
        raise NasdslError(f"{name} takes no options (got '?{text}'); the subset options train=N and val=N are "
                          f"for {' and '.join(SUBSET_SOURCES)}", file=where)
    items = [t.strip() for t in text.replace("&", ",").split(",")]
    if not any(items):
        raise NasdslError("nothing after '?'; expected subset options such as ?train=10000,val=2000", file=where)
    options: dict[str, int] = {}
    for item in items:
        key, eq, value = (part.strip() for part in item.partition("="))
        key = key.lower()
        if not eq or not key:
            raise NasdslError(f"option '{item}' is not KEY=N (e.g. train=10000)", file=where)
        if key not in SUBSET_OPTIONS:
            raise NasdslError(f"unknown option '{key}'{did_you_mean(key, SUBSET_OPTIONS)}; "
                              f"known: {', '.join(k + '=N' for k in SUBSET_OPTIONS)}", file=where)
        if key in options:
            raise NasdslError(f"option {key} is given twice", file=where)
        if not value.isascii() or not value.isdigit() or int(value) == 0:
            raise NasdslError(f"{key} must be a positive whole number of images, got '{value}'", file=where)
        options[key] = int(value)
    return options


def build_data(spec: str, resolution: int, *, augmentation=None, download: bool = False) -> DataBundle:
    """Build the train/val datasets for a `--data` spec at `resolution` x `resolution` pixels.

    `augmentation` is the recipe's augmentation section, any object with `scale`, `ratio`, `hflip`,
    `auto_augment` and `re_prob` attributes (None: all auto); see the module docstring."""
    name, path = parse_spec(spec)
    options = parse_options(spec)
    where = f"--data {spec}"
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
        raise NasdslError(f"resolution must be a positive integer, got {resolution!r}", file=where)
    if name in SUBSET_SOURCES:
        return _build_mnist(spec, name, path, resolution, augmentation, options)
    if name == "digits":
        return _build_digits(spec, resolution, augmentation)
    if name == "fake":
        return _build_fake(spec, resolution, augmentation)
    if name in ("cifar10", "cifar100"):
        return _build_cifar(spec, name, Path(path), resolution, download, augmentation)
    return _build_imagefolder(spec, Path(path), resolution, augmentation)


def resolve_augmentation(source: str, resolution: int, augmentation=None, *, small: bool = False) -> dict:
    """The training augmentation for `source` with every 'auto' (None) decided, as a plain dict.

    Keys: crop ('random-resized', 'pad-N', 'affine' or 'none'), scale, ratio, hflip, auto_augment
    (a timm policy string or None), re_prob. `small`: an image folder of small images."""
    where = "augmentation"
    get = (lambda key, default: default) if augmentation is None else \
        (lambda key, default: getattr(augmentation, key, default))
    scale, ratio = _pair(get("scale", None), "scale", where), _pair(get("ratio", DEFAULT_RATIO), "ratio", where)
    hflip, re_prob = _prob(get("hflip", None), "hflip", where), _prob(get("re_prob", 0.0) or 0.0, "re_prob", where)
    auto = get("auto_augment", None)
    if auto is not None and (not isinstance(auto, str) or not auto.strip()):
        raise NasdslError(f"auto_augment must be None, 'rand', 'trivial' or a timm policy string, got {auto!r}",
                          file=where)
    auto = AUTO_AUGMENT_ALIASES.get(auto, auto)
    if scale is not None and not 0 < scale[0] <= scale[1] <= 1:
        raise NasdslError(f"scale must be (low, high) with 0 < low <= high <= 1, got {scale}", file=where)
    if ratio is None or not 0 < ratio[0] <= ratio[1]:
        raise NasdslError(f"ratio must be (low, high) with 0 < low <= high, got {ratio}", file=where)
    if source == "imagefolder":
        crop = "random-resized"
        scale = scale or ((0.7, 1.0) if small else (0.08, 1.0))
        hflip = (0.0 if small else 0.5) if hflip is None else hflip
    else:
        fallback = {"cifar10": f"pad-{_cifar_pad(resolution)}", "cifar100": f"pad-{_cifar_pad(resolution)}",
                    "digits": "affine", "mnist": "affine", "fashion-mnist": "affine"}.get(source, "none")
        crop = "random-resized" if scale is not None else fallback
        hflip = (0.5 if source.startswith("cifar") else 0.0) if hflip is None else hflip
    return {"crop": crop, "scale": scale, "ratio": ratio, "hflip": hflip, "auto_augment": auto, "re_prob": re_prob}


def _pair(value, what: str, where: str) -> tuple | None:
    if value is None:
        return None
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise NasdslError(f"{what} must be a pair of numbers (low, high), got {value!r}", file=where) from None
    return (low, high)


def _prob(value, what: str, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise NasdslError(f"{what} must be a probability in [0, 1], got {value!r}", file=where)
    return float(value)


def _plain(aug: dict, flips: bool) -> bool:
    """Whether the source's own fast tensor pipeline does `aug` (no timm crop, policy or erasing)."""
    return aug["scale"] is None and not aug["auto_augment"] and not aug["re_prob"] and (flips or not aug["hflip"])


def _timm_train(prep: Preprocessing, aug: dict, pre: list | None = None) -> TorchSeeded:
    """timm's training transform for `aug` after the `pre` steps (which must end in a PIL image).

    No random-resized crop (scale None): timm's crop runs at scale = ratio = 1, which keeps the
    whole square image. No colour jitter: it is no recipe setting and nasdsl never used it."""
    import timm.data

    whole = aug["scale"] is None
    try:
        tf = timm.data.create_transform(prep.input_size, is_training=True, scale=(1.0, 1.0) if whole else aug["scale"],
                                        ratio=(1.0, 1.0) if whole else aug["ratio"], hflip=aug["hflip"],
                                        auto_augment=aug["auto_augment"], re_prob=aug["re_prob"], color_jitter=None,
                                        interpolation=prep.interpolation, mean=prep.mean, std=prep.std)
    except (AssertionError, ValueError, KeyError, IndexError) as exc:
        raise NasdslError(f"auto_augment {aug['auto_augment']!r} is not a policy timm knows ({_reason(exc)}); "
                          f"use 'rand', 'trivial' or a timm string such as 'rand-m9-mstd0.5'",
                          file="augmentation") from None
    return TorchSeeded(_v2().Compose([*pre, tf]) if pre else tf)


def _known() -> str:
    return ", ".join(f"{n}[:DIR]" if n in DEFAULT_DIRS else f"{n}:DIR" if needs else n
                     for n, needs in SOURCES.items())


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# --------------------------------------------------------------------------- in-memory sets

def _v2():
    from torchvision.transforms import v2
    return v2


def _resize_float(images: torch.Tensor, resolution: int) -> torch.Tensor:
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images.contiguous()
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False,
                         antialias=resolution < images.shape[-1]).clamp_(0.0, 1.0)


def _stats(images: torch.Tensor) -> tuple[tuple, tuple]:
    mean = images.mean(dim=(0, 2, 3))
    std = images.std(dim=(0, 2, 3))
    return tuple(round(float(m), 4) for m in mean), tuple(round(float(s), 4) for s in std)


def _build_digits(spec: str, resolution: int, augmentation) -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    v2 = _v2()
    digits = load_digits()  # shipped inside scikit-learn: no download
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_val = train_test_split(list(range(len(labels))), test_size=DIGITS_VAL_FRACTION,
                                          stratify=digits.target, random_state=DIGITS_SPLIT_SEED)
    images = _resize_float(images, resolution)
    train_x, val_x = images[idx_train], images[idx_val]
    mean, std = _stats(train_x)
    prep = Preprocessing((1, resolution, resolution), mean, std)
    aug = resolve_augmentation("digits", resolution, augmentation)
    normalize = v2.Normalize(mean, std)
    affine = [RandomAffine(degrees=10.0, translate=0.1, scale=0.1)] if aug["crop"] == "affine" else []
    if _plain(aug, flips=False):
        train_tf = v2.Compose(affine + [normalize])
    else:
        train_tf = _timm_train(prep, aug, affine + [v2.Lambda(_clamp01), v2.ToPILImage()])
    val_x = normalize(val_x)  # validation: precomputed once, no per-sample work
    return DataBundle(name="digits", spec=spec, train=TensorImageDataset(train_x, labels[idx_train], train_tf),
                      val=TensorImageDataset(val_x, labels[idx_val]), num_classes=10, preprocessing=prep,
                      classes=tuple(str(i) for i in range(10)), augmentation=aug)


def _build_fake(spec: str, resolution: int, augmentation) -> DataBundle:
    """Class templates (smooth random colour patterns) plus per-image noise: learnable, deterministic."""
    v2 = _v2()
    g = torch.Generator().manual_seed(FAKE_SEED)
    templates = torch.rand(FAKE_CLASSES, FAKE_CHANNELS, 4, 4, generator=g)
    templates = F.interpolate(templates, size=(resolution, resolution), mode="bilinear", align_corners=False)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % FAKE_CLASSES
        labels = labels[torch.randperm(n, generator=g)]
        noise = torch.randn(n, FAKE_CHANNELS, resolution, resolution, generator=g)
        return (0.6 * templates[labels] + 0.2 + 0.15 * noise).clamp_(0.0, 1.0), labels

    train_x, train_y = make(FAKE_TRAIN)
    val_x, val_y = make(FAKE_VAL)
    mean, std = _stats(train_x)
    prep = Preprocessing((FAKE_CHANNELS, resolution, resolution), mean, std)
    aug = resolve_augmentation("fake", resolution, augmentation)
    normalize = v2.Normalize(mean, std)
    if _plain(aug, flips=False):  # no augmentation: normalized once, in memory
        train = TensorImageDataset(normalize(train_x), train_y)
    else:
        train = TensorImageDataset(train_x, train_y, _timm_train(prep, aug, [v2.ToPILImage()]))
    return DataBundle(name="fake", spec=spec, train=train, val=TensorImageDataset(normalize(val_x), val_y),
                      num_classes=FAKE_CLASSES, preprocessing=prep, augmentation=aug,
                      classes=tuple(f"class{i}" for i in range(FAKE_CLASSES)))


# --------------------------------------------------------------------------- CIFAR

def _cifar_class(name: str):
    from torchvision.datasets import CIFAR10, CIFAR100
    return CIFAR10 if name == "cifar10" else CIFAR100


def _build_cifar(spec: str, name: str, root: Path, resolution: int, download: bool, augmentation) -> DataBundle:
    where = f"--data {spec}"
    tv = _cifar_class(name)
    title = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
    folder = root / tv.base_folder
    if download and not folder.is_dir():
        try:
            tv(root=str(root), train=True, download=True)  # torchvision's fetch, md5-checked archive
        except Exception as exc:  # noqa: BLE001 - network, disk and archive errors alike
            raise NasdslError(f"could not download {title} into {root}: {_reason(exc)}", file=where) from None
    if not root.exists():
        raise NasdslError(f"directory {root} does not exist (pass --download to fetch {title} where a "
                          f"network exists)", file=where)
    if not root.is_dir():
        raise NasdslError(f"{root} is not a directory", file=where)
    if not folder.is_dir():
        raise NasdslError(f"no {title} data in {root} (expected {tv.base_folder}/; pass --download to fetch "
                          f"it where a network exists)", file=where)
    classes = _cifar_meta(folder, tv, title, where)
    train_x, train_y = _cifar_split(folder, [n for n, _ in tv.train_list], len(classes), title, where)
    val_x, val_y = _cifar_split(folder, [n for n, _ in tv.test_list], len(classes), title, where)

    v2 = _v2()
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    prep = Preprocessing((3, resolution, resolution), mean, std)
    aug = resolve_augmentation(name, resolution, augmentation)
    resize = [] if resolution == 32 else [v2.Resize(resolution, antialias=True)]
    crop = [] if aug["scale"] is not None else [v2.RandomCrop(resolution, padding=_cifar_pad(resolution))]
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if _plain(aug, flips=True):
        flip = [v2.RandomHorizontalFlip(aug["hflip"])] if aug["hflip"] else []
        train_tf = v2.Compose(resize + crop + flip + tail)
    else:
        train_tf = _timm_train(prep, aug, resize + crop + [v2.ToPILImage()])
    val_tf = v2.Compose(resize + tail)
    return DataBundle(name=name, spec=spec, train=TensorImageDataset(train_x, train_y, train_tf),
                      val=TensorImageDataset(val_x, val_y, val_tf), num_classes=len(classes), preprocessing=prep,
                      classes=tuple(classes), path=str(root), augmentation=aug)


def _cifar_pad(resolution: int) -> int:
    """The usual CIFAR random crop's padding (4 px at 32 px), scaled with the resolution."""
    return max(1, round(4 * resolution / 32))


def _unpickle(path: Path, title: str, where: str):
    rel = f"{path.parent.name}/{path.name}"
    if not path.is_file():
        raise NasdslError(f"{title} file {rel} is missing in {path.parent.parent}", file=where)
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, EOFError, ValueError, ... : all corrupt
        raise NasdslError(f"corrupt {title} file {path}: {_reason(exc)}", file=where) from None


def _cifar_meta(folder: Path, tv, title: str, where: str) -> list[str]:
    path = folder / tv.meta["filename"]
    meta = _unpickle(path, title, where)
    key = tv.meta["key"]
    names = meta.get(key) if isinstance(meta, dict) else None
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise NasdslError(f"corrupt {title} file {path}: expected a dict with a list '{key}'", file=where)
    return list(names)


def _cifar_split(folder: Path, files: list[str], num_classes: int, title: str, where: str):
    import numpy as np

    arrays, labels = [], []
    for file in files:
        path = folder / file
        entry = _unpickle(path, title, where)
        bad = f"corrupt {title} file {path}"
        if not isinstance(entry, dict) or "data" not in entry:
            raise NasdslError(f"{bad}: expected a dict with 'data' and 'labels'", file=where)
        key = "labels" if "labels" in entry else "fine_labels"
        data, ys = entry["data"], entry.get(key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            shape = getattr(data, "shape", type(data).__name__)
            raise NasdslError(f"{bad}: 'data' must be a uint8 array of N x 3072, got {shape}", file=where)
        if ys is None or len(ys) != data.shape[0]:
            raise NasdslError(f"{bad}: {data.shape[0]} images but {0 if ys is None else len(ys)} labels",
                              file=where)
        ys = np.asarray(ys)
        if ys.size and (not np.issubdtype(ys.dtype, np.integer) or ys.min() < 0 or ys.max() >= num_classes):
            raise NasdslError(f"{bad}: labels must be integers in 0..{num_classes - 1}", file=where)
        arrays.append(data)
        labels.append(ys.astype(np.int64))
    data = np.concatenate(arrays)
    if data.shape[0] == 0:
        raise NasdslError(f"{title} files {', '.join(files)} in {folder} hold no images", file=where)
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())  # stored CHW, as the format is
    return images, torch.from_numpy(np.concatenate(labels))


# --------------------------------------------------------------------------- MNIST and Fashion-MNIST

def _build_mnist(spec: str, name: str, path: str | None, resolution: int, augmentation,
                 options: dict[str, int]) -> DataBundle:
    """MNIST / Fashion-MNIST from their IDX files: train = the train files, val = the t10k files,
    each optionally a stratified subset (module docstring); uint8 in memory at the resolution."""
    from nasdsl.train.idx import read_mnist

    where = f"--data {spec}"
    root = _mnist_root(name, path, where)
    train, test = read_mnist(root, name, where)
    keep_train = stratified_subset(train.labels, options.get("train"), f"train={options.get('train')}",
                                   str(train.image_file), where)
    keep_val = stratified_subset(test.labels, options.get("val"), f"val={options.get('val')}",
                                 str(test.image_file), where)
    train_x = _resize_uint8(torch.from_numpy(train.images[keep_train]), resolution)
    val_x = _resize_uint8(torch.from_numpy(test.images[keep_val]), resolution)
    mean, std = _uint8_stats(train_x)
    if std[0] <= 0:
        raise NasdslError(f"the training images of {train.image_file} are all one grey level", file=where)
    prep = Preprocessing((1, resolution, resolution), mean, std)
    aug = resolve_augmentation(name, resolution, augmentation)
    v2 = _v2()
    to_float, normalize = v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)
    affine = [RandomAffine(degrees=10.0, translate=0.1, scale=0.1)] if aug["crop"] == "affine" else []
    if _plain(aug, flips=False):
        train_tf = v2.Compose([to_float, *affine, normalize])
    else:
        train_tf = _timm_train(prep, aug, [to_float, *affine, v2.Lambda(_clamp01), v2.ToPILImage()])
    train_y, val_y = torch.from_numpy(train.labels[keep_train]), torch.from_numpy(test.labels[keep_val])
    return DataBundle(name=name, spec=spec, train=TensorImageDataset(train_x, train_y, train_tf),
                      val=TensorImageDataset(val_x, val_y, v2.Compose([to_float, normalize])), num_classes=10,
                      preprocessing=prep, classes=MNIST_CLASSES[name], path=str(root), augmentation=aug)


def _mnist_root(name: str, path: str | None, where: str) -> Path:
    """The DIR given, or the source's default directory, whose absence names the package to install."""
    if path is not None:
        return Path(path)
    root = Path(DEFAULT_DIRS[name])
    if not root.is_dir():
        raise NasdslError(f"{root} is absent: apt-get install {DEFAULT_DIR_PACKAGES[name]}, or pass "
                          f"--data {name}:DIR", file=where)
    return root


def stratified_subset(labels, n: int | None, option: str, file: str, where: str):
    """Indices (ascending, i.e. file order) of `n` images: each class keeps n x its count / all, rounded
    down, the rest going one each to the largest remainders (ties: lower label); a class keeps its
    first images in file order. Deterministic: no seed, the same subset on every run. None: every index."""
    import numpy as np

    total = len(labels)
    if n is None:
        return np.arange(total)
    if n > total:
        raise NasdslError(f"{option} asks for more than the {total} images in {file}", file=where)
    counts = np.bincount(labels, minlength=10).astype(np.int64)
    take, remainder = (n * counts) // total, (n * counts) % total
    short = n - int(take.sum())
    for k in sorted(range(len(counts)), key=lambda k: (-int(remainder[k]), k))[:short]:
        take[k] += 1
    keep = [np.flatnonzero(labels == k)[:take[k]] for k in range(len(counts))]
    return np.sort(np.concatenate(keep))


def _resize_uint8(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """N x H x W uint8 -> N x 1 x resolution x resolution uint8, resized as digits are (bilinear,
    antialiased when shrinking), rounded back to bytes, in chunks so no full float copy exists."""
    images = images.unsqueeze(1)
    if images.shape[-2:] == (resolution, resolution):
        return images.contiguous()
    out = torch.empty((images.shape[0], 1, resolution, resolution), dtype=torch.uint8)
    for start in range(0, images.shape[0], RESIZE_CHUNK):
        chunk = images[start:start + RESIZE_CHUNK].float().div_(255.0)
        out[start:start + RESIZE_CHUNK] = _resize_float(chunk, resolution).mul_(255.0).round_().to(torch.uint8)
    return out


def _uint8_stats(images: torch.Tensor) -> tuple[tuple, tuple]:
    """Per-channel mean and (sample) std of N x C x H x W uint8 images scaled to [0, 1], as `_stats`
    gives for floats, summed in float64 chunks."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in images.split(RESIZE_CHUNK):
        x = chunk.double().div_(255.0)
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    n = images.numel() // images.shape[1]
    mean = total / n
    var = ((squares - n * mean.square()) / max(n - 1, 1)).clamp_(min=0.0)
    return tuple(round(float(m), 4) for m in mean), tuple(round(float(s), 4) for s in var.sqrt())


# --------------------------------------------------------------------------- image folders

def _open_image(path: str, mode: str | None, draft: int | None = None):
    """Decode `path` with PIL; convert to `mode` ('L' or 'RGB') unless it is None."""
    from PIL import Image

    with open(path, "rb") as f:
        img = Image.open(f)
        if draft:
            img.draft(None, (draft, draft))  # JPEG: decode at reduced scale, enough for a check
        img.load()
    if mode is None or img.mode == mode:
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
    return img.convert(mode)


def _scan_classes(split_dir: Path, where: str) -> dict[str, list[str]]:
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    found: dict[str, list[str]] = {}
    for cls in classes:
        files = []
        for dirpath, dirnames, filenames in os.walk(split_dir / cls, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                         if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith("."))
        if not files:
            raise NasdslError(f"class '{cls}' in {split_dir} has no images "
                              f"(looked for {', '.join(IMG_EXTENSIONS)})", file=where)
        found[cls] = files
    return found


def _build_imagefolder(spec: str, root: Path, resolution: int, augmentation) -> DataBundle:
    where = f"--data {spec}"
    if not root.exists():
        raise NasdslError(f"directory {root} does not exist", file=where)
    if not root.is_dir():
        raise NasdslError(f"{root} is not a directory", file=where)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise NasdslError(f"not an image folder: {root}/{split}/ is missing (expected {root}/train/<class>/ "
                              f"and {root}/val/<class>/ holding images)", file=where)
    train = _scan_classes(root / "train", where)
    if not train:
        raise NasdslError(f"{root}/train/ has no class folders (expected {root}/train/<class>/*.jpg ...)",
                          file=where)
    val = _scan_classes(root / "val", where)
    if not val:
        raise NasdslError(f"{root}/val/ has no class folders (expected {root}/val/<class>/*.jpg ...)", file=where)
    extra = sorted(set(val) - set(train))
    if extra:
        raise NasdslError(f"{root}/val/ has class folders that {root}/train/ lacks: {', '.join(extra[:5])}"
                          + (" ..." if len(extra) > 5 else ""), file=where)

    firsts = _first_images(train, val, resolution, where)
    gray = all(m in GRAY_MODES for m, _ in firsts)
    in_channels, mode = (1, "L") if gray else (3, "RGB")
    mean, std = (IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD) if gray else (IMAGENET_MEAN, IMAGENET_STD)
    shorter = sorted(min(size) for _, size in firsts)[len(firsts) // 2]
    prep = Preprocessing((in_channels, resolution, resolution), mean, std, crop_pct=IMAGEFOLDER_CROP_PCT)
    aug = resolve_augmentation("imagefolder", resolution, augmentation,
                               small=min(resolution, shorter) < SMALL_IMAGE)
    train_tf = _timm_train(prep, aug)
    val_tf = prep.eval_transform()   # timm's: an export evaluated through timm sees the same tensors
    names = list(train)
    index = {c: i for i, c in enumerate(names)}
    train_samples = [(f, index[c]) for c, files in train.items() for f in files]
    val_samples = [(f, index[c]) for c, files in val.items() for f in files]
    return DataBundle(name="imagefolder", spec=spec,
                      train=ImageFileDataset(train_samples, mode, train_tf, where),
                      val=ImageFileDataset(val_samples, mode, val_tf, where), num_classes=len(names),
                      preprocessing=prep, classes=tuple(names), path=str(root), augmentation=aug)


def _first_images(train: dict, val: dict, resolution: int, where: str) -> list[tuple[str, tuple]]:
    """Eager check: decode the first image of every class in both splits. Returns (mode, size) of the
    train ones: their modes pick the channels, their sizes whether the folder holds small images."""
    firsts = []
    for split, found in (("train", train), ("val", val)):
        for files in found.values():
            try:
                img = _open_image(files[0], None, draft=resolution)
            except Exception as exc:  # noqa: BLE001 - any decoder failure is a data error
                raise NasdslError(f"cannot read image {files[0]}: {_reason(exc)}", file=where) from None
            if split == "train":
                firsts.append((img.mode, img.size))
    return firsts
