from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.training.data as data
from pipeline.errors import BadInputError
from pipeline.training.data import (
    BatchPreprocessor,
    load_dataset,
    read_idx,
    stratified_subset,
)
from tests.conftest import make_stripes, write_idx


def test_idx_roundtrip_gz_and_raw(tmp_path):
    images, _ = make_stripes(5, 0)
    for name in ("a-idx3-ubyte", "b-idx3-ubyte.gz"):
        write_idx(tmp_path / name, images)
        assert np.array_equal(read_idx(tmp_path / name), images)


def test_corrupt_idx_names_file(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(BadInputError, match="train-images-idx3-ubyte.gz"):
        read_idx(bad)


def test_fashion_from_data_root(stripes_root):
    bundle = load_dataset("fashion-mnist", str(stripes_root))
    assert len(bundle.train) == 640 and len(bundle.test) == 200
    assert bundle.num_classes == 10 and bundle.source == str(stripes_root)
    image, label, index = bundle.train[3]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8 and index == 3


def test_fashion_in_torchvision_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        images, labels = make_stripes(20, 0)
        write_idx(raw / f"{split}-images-idx3-ubyte", images)  # uncompressed, as torchvision leaves them
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
    assert len(load_dataset("fashion-mnist", str(tmp_path)).train) == 20


def test_fashion_falls_back_to_debian_package(fashion_root):
    bundle = load_dataset("fashion-mnist")
    assert len(bundle.train) == 60000 and len(bundle.test) == 10000
    assert bundle.source == str(fashion_root)


def test_fashion_missing_everywhere_names_all_three_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_ROOT", tmp_path / "no-debian")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInputError) as err:
        load_dataset("fashion-mnist", str(empty))
    message = str(err.value)
    assert str(empty) in message and "dataset-fashion-mnist" in message and "--download" in message


def test_missing_data_root_is_named(tmp_path):
    with pytest.raises(BadInputError, match="data root not found: .*nowhere"):
        load_dataset("fashion-mnist", str(tmp_path / "nowhere"))


def test_unknown_dataset_lists_valid():
    with pytest.raises(ValueError, match="unknown dataset 'mnist2'; valid: fashion-mnist, cifar10"):
        data.check_dataset_name("mnist2")


def _write_cifar10(root: Path, n: int = 30) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


def test_cifar10_reader(tmp_path):
    _write_cifar10(tmp_path)
    bundle = load_dataset("cifar10", str(tmp_path))
    assert len(bundle.train) == 150 and len(bundle.test) == 30
    assert bundle.classes[0] == "c0" and bundle.train[0][0].shape == (3, 32, 32)


def test_cifar_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(BadInputError, match="cifar100 not found.*--download"):
        load_dataset("cifar100", str(tmp_path))


def _write_imagefolder(root: Path, per_class: int = 3) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_imagefolder_decodes_and_resizes(tmp_path):
    _write_imagefolder(tmp_path)
    bundle = load_dataset(f"imagefolder:{tmp_path}", image_size=36)
    assert bundle.classes == ["cat", "dog"] and len(bundle.train) == 6
    image, label, _ = bundle.test[5]
    assert image.shape == (3, 36, 36) and label == 1


def test_corrupt_image_error_names_file(tmp_path):
    _write_imagefolder(tmp_path)
    bad = tmp_path / "train" / "dog" / "1.png"
    bad.write_bytes(b"\x89PNG broken")
    bundle = load_dataset(f"imagefolder:{tmp_path}", image_size=32)
    with pytest.raises(BadInputError, match=f"corrupt or unreadable image file {bad}"):
        bundle.train[4]


def test_stratified_subset_is_seeded_and_keeps_proportions(stripes_root):
    train = load_dataset("fashion-mnist", str(stripes_root)).train
    a = stratified_subset(train, 100, seed=3, what="subset")
    b = stratified_subset(train, 100, seed=3, what="subset")
    c = stratified_subset(train, 100, seed=4, what="subset")
    assert torch.equal(a.indices, b.indices) and not torch.equal(a.indices, c.indices)
    counts = torch.bincount(a.targets(), minlength=10)
    assert counts.tolist() == [10] * 10


def test_subset_larger_than_data_names_field(stripes_root):
    train = load_dataset("fashion-mnist", str(stripes_root)).train
    with pytest.raises(BadInputError, match="data.subset: 1000 is larger than the split \\(640 images\\)"):
        stratified_subset(train, 1000, seed=0, what="subset")


def test_preprocessor_pads_grey_to_rgb_and_normalises():
    prep = BatchPreprocessor(32, (0.5,) * 3, (0.25,) * 3)
    images = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    out = prep(images)
    assert out.shape == (2, 3, 32, 32)
    assert torch.allclose(out[:, :, 2:30, 2:30], torch.tensor(2.0))  # (1 - 0.5) / 0.25
    assert torch.allclose(out[:, :, 0, :], torch.tensor(-2.0))  # zero padding, normalised


def test_preprocessor_resizes_when_far_from_size():
    out = BatchPreprocessor(64, (0.0,) * 3, (1 / 255,) * 3)(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))
    assert out.shape == (1, 3, 64, 64)


def test_augmentation_depends_on_sample_not_batch():
    prep = BatchPreprocessor(32, (0.0,) * 3, (1 / 255,) * 3, seed=7)
    images = torch.randint(0, 255, (8, 1, 28, 28), dtype=torch.uint8)
    idx = torch.arange(8)
    whole = prep(images, idx, epoch=2, dataset_size=8)
    halves = torch.cat([prep(images[:4], idx[:4], 2, 8), prep(images[4:], idx[4:], 2, 8)])
    assert torch.equal(whole, halves)
    assert not torch.equal(whole, prep(images, idx, epoch=3, dataset_size=8))
    assert not torch.equal(whole, prep(images))  # eval transform is not augmented
    # every augmented image is a shifted (maybe flipped) copy: its pixel sum is preserved up to the border
    assert whole.shape == (8, 3, 32, 32)


def test_flip_only_and_no_augmentation():
    images = torch.randint(0, 255, (16, 1, 32, 32), dtype=torch.uint8)
    idx = torch.arange(16)
    flip = BatchPreprocessor(32, (0.0,) * 3, (1 / 255,) * 3, augment="flip")(images, idx, 0, 16)
    plain = BatchPreprocessor(32, (0.0,) * 3, (1 / 255,) * 3)(images)
    flipped = torch.tensor([torch.equal(f, p.flip(-1)) for f, p in zip(flip, plain)])
    kept = torch.tensor([torch.equal(f, p) for f, p in zip(flip, plain)])
    assert bool((flipped | kept).all()) and flipped.any() and kept.any()
    none = BatchPreprocessor(32, (0.0,) * 3, (1 / 255,) * 3, augment="none")(images, idx, 0, 16)
    assert torch.equal(none, plain)


def test_the_validation_split_is_stratified_disjoint_and_the_same_for_every_seed():
    """Tuning reads a validation set carved from the training split: disjoint from what is trained on, every class
    in proportion, and one split for all seeds (a seed changes the training subset drawn from the rest)."""
    labels = torch.arange(1000) % 4
    split = data.ArrayImages(torch.zeros(1000, 1, 2, 2, dtype=torch.uint8), labels)
    held, rest = data.validation_split(split, 200)
    held_idx, rest_idx = set(held.indices.tolist()), set(rest.indices.tolist())
    assert len(held_idx) == 200 and held_idx.isdisjoint(rest_idx) and len(held_idx | rest_idx) == 1000
    assert torch.bincount(held.targets()).tolist() == [50, 50, 50, 50]
    again, _ = data.validation_split(split, 200)
    assert torch.equal(held.indices, again.indices)
    a, b = (data.stratified_subset(rest, 100, seed, "subset") for seed in (0, 1))
    assert not torch.equal(a.indices, b.indices) and torch.bincount(a.targets()).tolist() == [25] * 4
    with pytest.raises(BadInputError, match="data.validation: 1000 leaves no training images"):
        data.validation_split(split, 1000)
