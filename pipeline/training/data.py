"""Datasets by name, read offline from local files, and batched preprocessing.

Sources: ``fashion-mnist`` (default), ``cifar10``, ``cifar100`` and
``imagefolder:PATH`` (``PATH/train/<class>/*`` and ``PATH/val/<class>/*``).
Each split is a torch ``Dataset`` yielding ``(uint8 image CxHxW, label,
index)``; everything else (fitting to the model's input size, grey to RGB,
augmentation, normalisation) happens batched in :class:`BatchPreprocessor`,
on whatever device the model trains on. Augmentation parameters are drawn
per (seed, epoch, sample index), so a sample is augmented the same way
whatever the process count or batch order: a torchrun run sees exactly the
batches a single process sees.
"""
from __future__ import annotations

import gzip
import logging
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from exporters.errors import InputError
from exporters.preprocess import decode_file
from exporters.preprocess import spec as preprocessing
from pipeline.errors import BadInputError

log = logging.getLogger(__name__)

DEBIAN_ROOT = Path("/usr/share/datasets")
DOWNLOAD_ROOT = Path(os.environ.get("PIPELINE_DATA_HOME", Path.home() / ".cache" / "kdiff-pipeline" / "data"))
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class DataBundle:
    """Both splits of a dataset plus what the model and the exporter need to know about it."""

    name: str
    train: Dataset
    test: Dataset
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_image_size: int
    source: str  # where the files were found

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --------------------------------------------------------------------------- splits


class ArrayImages(Dataset):
    """An in-memory split: uint8 images N x C x H x W and int64 labels; fetched a batch at a time."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index], index

    def __getitems__(self, indices: list[int]):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.labels[idx], idx

    def targets(self) -> torch.Tensor:
        return self.labels


class FolderImages(Dataset):
    """Image files decoded on demand (in loader workers), resized to a fixed square."""

    def __init__(self, files: list[Path], labels: list[int], size: int):
        self.files, self.labels_list, self.size = files, labels, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        return decode_image(self.files[index], self.size), self.labels_list[index], index

    def targets(self) -> torch.Tensor:
        return torch.as_tensor(self.labels_list)


class Subset(Dataset):
    """A fixed selection of another split's samples (indices are re-numbered 0..n-1)."""

    def __init__(self, base: Dataset, indices: torch.Tensor):
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        image, label, _ = self.base[int(self.indices[index])]
        return image, label, index

    def __getitems__(self, indices: list[int]):
        if hasattr(self.base, "__getitems__"):
            images, labels, _ = self.base.__getitems__(self.indices[torch.as_tensor(indices)].tolist())
            return images, labels, torch.as_tensor(indices)
        return [self[i] for i in indices]

    def targets(self) -> torch.Tensor:
        return self.base.targets()[self.indices]


def collate(batch: Any):
    """Batches from ``__getitems__`` arrive ready; lists of samples are stacked."""
    return batch if isinstance(batch, tuple) else default_collate(batch)


def decode_image(path: Path, size: int) -> torch.Tensor:
    """An image-folder file as uint8 3 x size x size: shorter side resized, centre square (the shipped runtime
    decodes files with the same function, :func:`exporters.preprocess.decode_file`); errors name the file."""
    try:
        pixels = decode_file(path, "rgb", "shorter-side-centre", size)
    except InputError as exc:
        reason = str(exc).split(": ", 1)[-1]
        raise BadInputError(f"corrupt or unreadable image file {path}: {reason}") from None
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1)  # a writable copy of what Pillow decoded


# --------------------------------------------------------------------------- readers


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST format), gzip-compressed or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return array.reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as exc:
        raise BadInputError(f"corrupt data file {path}: {exc}") from None


_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _find_idx_dir(root: Path) -> Path | None:
    for folder in (root, root / "FashionMNIST" / "raw", root / "fashion-mnist", root / "fashion_mnist"):
        if all(_idx_file(folder, name) for pair in _MNIST_FILES.values() for name in pair):
            return folder
    return None


def _idx_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_mnist_split(folder: Path, split: str) -> ArrayImages:
    image_file, label_file = (_idx_file(folder, n) for n in _MNIST_FILES[split])
    images, labels = read_idx(image_file), read_idx(label_file)
    if len(images) != len(labels):
        raise BadInputError(f"corrupt data in {folder}: {len(images)} images but {len(labels)} labels")
    return ArrayImages(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


def _load_fashion_mnist(data_root: Path | None, download: bool) -> tuple[ArrayImages, ArrayImages, str]:
    tried = []
    for root, label in ((data_root, "--data-root"), (DEBIAN_ROOT / "fashion-mnist", "Debian package")):
        if root is None:
            tried.append(f"{label} (not given)")
            continue
        folder = _find_idx_dir(root)
        if folder is not None:
            return _read_mnist_split(folder, "train"), _read_mnist_split(folder, "test"), str(folder)
        tried.append(f"{label} {root}")
    if download:
        import torchvision

        target = data_root or DOWNLOAD_ROOT
        try:
            torchvision.datasets.FashionMNIST(str(target), train=True, download=True)
            torchvision.datasets.FashionMNIST(str(target), train=False, download=True)
        except Exception as exc:
            raise BadInputError(f"Fashion-MNIST download into {target} failed: {str(exc).splitlines()[0]}") from None
        folder = _find_idx_dir(target)
        if folder is not None:
            return _read_mnist_split(folder, "train"), _read_mnist_split(folder, "test"), str(folder)
    raise BadInputError(
        "Fashion-MNIST not found: looked in " + ", ".join(tried)
        + "; give --data-root DIR holding the idx files, install Debian's dataset-fashion-mnist"
        + ", or pass --download to fetch it through torchvision")


_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels",
                "batches.meta", "label_names", "CIFAR10"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", "meta", "fine_label_names", "CIFAR100"),
}


# What CIFAR's python batches hold besides dicts, lists, bytes and numbers: numpy arrays and scalars. Nothing else may be
# built while reading them (a pickle names any callable it likes, e.g. os.system).
_CIFAR_PICKLE_GLOBALS = {(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
                         for name in ("_reconstruct", "scalar")} | {("numpy", "ndarray"), ("numpy", "dtype"),
                                                                     ("_codecs", "encode")}  # bytes, as Python 3 pickles them


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: CIFAR files hold only arrays, lists "
                                         "and dicts")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict:
    """A CIFAR batch, read with an unpickler that builds nothing but numpy arrays."""
    try:
        with open(path, "rb") as handle:
            data = _CifarUnpickler(handle, encoding="latin1").load()
    except Exception as exc:
        raise BadInputError(f"corrupt data file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise BadInputError(f"corrupt data file {path}: expected a dict, found {type(data).__name__}")
    return data


def _load_cifar(name: str, data_root: Path | None, download: bool) -> tuple[ArrayImages, ArrayImages, list[str], str]:
    folder_name, train_files, test_files, label_key, meta_file, names_key, tv_name = _CIFAR[name]
    roots = [r for r in (data_root, DEBIAN_ROOT / name) if r is not None]
    folder = next((r / folder_name for r in roots if (r / folder_name / meta_file).is_file()), None)
    if folder is None and download:
        import torchvision

        target = data_root or DOWNLOAD_ROOT
        try:
            getattr(torchvision.datasets, tv_name)(str(target), train=True, download=True)
        except Exception as exc:
            raise BadInputError(f"{name} download into {target} failed: {str(exc).splitlines()[0]}") from None
        folder = target / folder_name
    if folder is None:
        where = ", ".join(str(r) for r in roots) if roots else "nowhere"
        raise BadInputError(f"{name} not found (looked for {folder_name}/ in {where}); give --data-root DIR "
                            f"holding {folder_name}/, or pass --download to fetch it through torchvision")

    def split(files: list[str]) -> ArrayImages:
        images, labels = [], []
        for file in files:
            entry = _read_pickle(folder / file)
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(entry[label_key])
        return ArrayImages(torch.from_numpy(np.concatenate(images)), torch.as_tensor(labels, dtype=torch.long))

    classes = list(_read_pickle(folder / meta_file)[names_key])
    return split(train_files), split(test_files), classes, str(folder)


def _scan_folder(split_dir: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for label, cls in enumerate(classes):
        cls_dir = split_dir / cls
        found = sorted(p for p in cls_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if cls_dir.is_dir() else []
        for path in found:
            if path.stat().st_size == 0:
                raise BadInputError(f"corrupt or unreadable image file {path}: empty file")
        files += found
        labels += [label] * len(found)
    return files, labels


def _load_imagefolder(root: Path, image_size: int) -> tuple[FolderImages, FolderImages, list[str]]:
    if not root.is_dir():
        raise BadInputError(f"image folder not found: {root}")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise BadInputError(f"image folder {root} has no {split}/ directory (expected {root}/{split}/<class>/*)")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if len(classes) < 2:
        raise BadInputError(f"image folder {root}/train needs at least 2 class folders (found {len(classes)})")
    train_files, train_labels = _scan_folder(root / "train", classes)
    val_files, val_labels = _scan_folder(root / "val", classes)
    empty = [cls for label, cls in enumerate(classes) if label not in set(train_labels)]
    if empty:  # a class the model could never learn, yet would have an output for
        raise BadInputError(f"image folder {root}/train/{empty[0]} holds no images ({len(empty)} empty class "
                            f"folder(s): {', '.join(empty)}); add images or remove the folder")
    for split, files in (("train", train_files), ("val", val_files)):
        if not files:
            raise BadInputError(f"image folder {root}/{split} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return (FolderImages(train_files, train_labels, image_size), FolderImages(val_files, val_labels, image_size),
            classes)


# --------------------------------------------------------------------------- registry

_STATS = {
    "fashion-mnist": ((0.2860,) * 3, (0.3530,) * 3),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
DATASET_NAMES = ("fashion-mnist", "cifar10", "cifar100", "imagefolder:PATH")


def check_dataset_name(name: str) -> str:
    key = name.strip()
    if key.lower() in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        return "fashion-mnist"
    if key.lower() in ("cifar10", "cifar100", "cifar-10", "cifar-100"):
        return key.lower().replace("-", "")
    if key.startswith("imagefolder:") and len(key) > len("imagefolder:"):
        return key
    raise ValueError(f"unknown dataset '{name}'; valid: {', '.join(DATASET_NAMES)}")


def preprocessing_spec(dataset: str, image_size: int, mean: list[float], std: list[float]) -> dict[str, Any]:
    """How an image file must be prepared for a model trained on ``dataset`` (what its artifacts carry):
    Fashion-MNIST is grey, CIFAR and image folders RGB; image folders are cropped as :func:`decode_image` does."""
    name = check_dataset_name(dataset)
    folder = name.startswith("imagefolder:")
    return preprocessing(color="grey" if name == "fashion-mnist" else "rgb",
                         crop="shorter-side-centre" if folder else "none", size=(image_size, image_size),
                         channels=3, mean=mean, std=std)


def default_image_size(name: str) -> int:
    """The input side a dataset trains at unless told otherwise: 32 for the 28/32-pixel sets, 224 for folders."""
    return 224 if check_dataset_name(name).startswith("imagefolder:") else 32


def load_dataset(name: str, data_root: str | None = None, download: bool = False,
                 image_size: int | None = None) -> DataBundle:
    """Load both splits; ``image_size`` is only needed to decode image folders."""
    name = check_dataset_name(name)
    root = Path(data_root).expanduser() if data_root else None
    if root is not None and not root.exists() and not download:
        raise BadInputError(f"data root not found: {root}")
    if name == "fashion-mnist":
        train, test, source = _load_fashion_mnist(root, download)
        mean, std = _STATS[name]
        return DataBundle(name, train, test, list(FASHION_CLASSES), mean, std, default_image_size(name), source)
    if name in _CIFAR:
        train, test, classes, source = _load_cifar(name, root, download)
        mean, std = _STATS[name]
        return DataBundle(name, train, test, classes, mean, std, default_image_size(name), source)
    folder = Path(name.split(":", 1)[1]).expanduser()
    size = image_size or default_image_size(name)
    train, test, classes = _load_imagefolder(folder, size)
    return DataBundle(name, train, test, classes, IMAGENET_MEAN, IMAGENET_STD, default_image_size(name), str(folder))


def _stratified_order(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """All indices in an order whose every prefix keeps the class proportions, drawn reproducibly from ``seed``."""
    total = len(labels)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(total, generator=gen)
    # rank of each sample within its class (in shuffled order), scaled by class size:
    # taking the n smallest keys keeps every class's share.
    key = torch.empty(total, dtype=torch.float64)
    for cls in labels.unique():
        members = order[labels[order] == cls]
        key[members] = (torch.arange(len(members), dtype=torch.float64) + 0.5) / len(members)
    return torch.argsort(key + torch.rand(total, generator=gen, dtype=torch.float64) * 1e-9)


def stratified_subset(split: Dataset, n: int | None, seed: int, what: str) -> Dataset:
    """``n`` samples with the class proportions of the split, chosen reproducibly from ``seed``."""
    if n is None:
        return split
    total = len(split)
    if n > total:
        setting = what if "." in what else f"data.{what}"
        raise BadInputError(f"invalid config: {setting}: {n} is larger than the split ({total} images)")
    if n == total:
        return split
    return Subset(split, torch.sort(_stratified_order(split.targets(), seed)[:n]).values)


VALIDATION_SEED = 20261202  # one fixed validation split, whatever the run's seed: tuning compares like with like


def validation_split(split: Dataset, n: int) -> tuple[Dataset, Dataset]:
    """(validation, rest): ``n`` stratified training images held out for tuning, and the others to train on. The
    split is the same for every seed, so settings tuned on it are compared on the same images."""
    if n >= len(split):
        raise BadInputError(f"invalid config: data.validation: {n} leaves no training images (the split has "
                            f"{len(split)})")
    order = _stratified_order(split.targets(), VALIDATION_SEED)
    return Subset(split, torch.sort(order[:n]).values), Subset(split, torch.sort(order[n:]).values)


# --------------------------------------------------------------------------- preprocessing


def crop_padding(image_size: int) -> int:
    """Random-crop padding: 4 px at 32 px, scaled with the input size."""
    return max(1, round(image_size / 8))


class BatchPreprocessor:
    """uint8 batch -> normalised float batch at the model's input size (train: random crop + flip).

    Fitting: an image at most 25% smaller than the input is zero-padded (centred),
    anything else is resized (bilinear, antialiased). Grey images are repeated
    to 3 channels.
    """

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...], seed: int = 0,
                 augment: str = "crop-flip"):
        if augment not in ("crop-flip", "flip", "none"):
            raise ValueError(f"unknown augmentation '{augment}'; valid: crop-flip, flip, none")
        self.size = image_size
        self.seed = seed
        self.augment_enabled = augment != "none"
        self.pad = crop_padding(image_size) if augment == "crop-flip" else 0
        self._mean = torch.tensor(mean).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(std).view(1, 3, 1, 1) * 255
        self._epoch_params: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def fit(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        if (h, w) == (self.size, self.size):
            return x
        if h <= self.size and w <= self.size and min(h, w) >= 0.75 * self.size:
            top, left = (self.size - h) // 2, (self.size - w) // 2
            return F.pad(x, (left, self.size - w - left, top, self.size - h - top))
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)

    def _params(self, epoch: int, dataset_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._epoch_params is None or self._epoch_params[0] != epoch or len(self._epoch_params[1]) != dataset_size:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            offsets = torch.randint(0, 2 * self.pad + 1, (dataset_size, 2), generator=gen)
            flips = torch.rand(dataset_size, generator=gen) < 0.5
            self._epoch_params = (epoch, offsets, flips)
        return self._epoch_params[1], self._epoch_params[2]

    def augment(self, x: torch.Tensor, indices: torch.Tensor, epoch: int, dataset_size: int) -> torch.Tensor:
        offsets, flips = self._params(epoch, dataset_size)
        offsets, flips = offsets[indices].to(x.device), flips[indices].to(x.device)
        p, s = self.pad, self.size
        padded = F.pad(x, (p, p, p, p)) if p else x
        ar = torch.arange(s, device=x.device)
        rows = (offsets[:, 0:1] + ar).unsqueeze(2)  # B x s x 1
        cols = offsets[:, 1:2] + ar  # B x s
        cols = torch.where(flips.unsqueeze(1), cols.flip(1), cols).unsqueeze(1)  # B x 1 x s
        batch = torch.arange(x.shape[0], device=x.device).view(-1, 1, 1)
        return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)

    def __call__(self, images: torch.Tensor, indices: torch.Tensor | None = None, epoch: int | None = None,
                 dataset_size: int | None = None) -> torch.Tensor:
        """Eval transform when ``epoch`` is None, else the epoch's augmentation of these sample indices."""
        x = self.fit(images)
        if epoch is not None and self.augment_enabled:
            x = self.augment(x, indices, epoch, dataset_size)
        return ((x - self._mean.to(x.device)) / self._std.to(x.device)).contiguous()


def default_num_workers(dataset: Dataset) -> int:
    """In-memory splits need no workers; decoding files does."""
    return 0 if isinstance(getattr(dataset, "base", dataset), ArrayImages) else min(4, os.cpu_count() or 1)
