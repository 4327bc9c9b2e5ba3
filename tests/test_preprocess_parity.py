"""One preprocessing everywhere: the tensor the shipped runtime builds from an image file equals the tensor the
training evaluation path builds from the same image, for every dataset kind and awkward file."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from exporters import preprocess
from pipeline.training.data import BatchPreprocessor, load_dataset, preprocessing_spec

TOLERANCE = 1e-6  # after normalisation


def runtime_tensor(path: Path, spec: dict) -> np.ndarray:
    """What exporters.runtime.Classifier does to one file (decode, crop, fit, normalise)."""
    height, width = spec["size"]
    pixels = preprocess.decode_file(path, spec["color"], spec["crop"], height)
    return preprocess.normalize(preprocess.fit(pixels, (height, width), spec["channels"])[None], spec)[0]


def training_tensor(image: torch.Tensor, bundle, size: int) -> np.ndarray:
    """The evaluation path of training: the dataset's uint8 image through the batched preprocessor."""
    return BatchPreprocessor(size, bundle.mean, bundle.std)(image[None]).numpy()[0]


def test_fashion_mnist_files_match_training(fashion_root, tmp_path):
    bundle = load_dataset("fashion-mnist", str(fashion_root), image_size=32)
    spec = preprocessing_spec("fashion-mnist", 32, list(bundle.mean), list(bundle.std))
    for i in range(0, 500, 50):
        image = bundle.test[i][0]
        path = tmp_path / f"{i}.png"
        Image.fromarray(image.numpy()[0]).save(path)
        diff = np.abs(runtime_tensor(path, spec) - training_tensor(image, bundle, 32)).max()
        assert diff <= TOLERANCE, (i, diff)


def test_the_runtime_classifier_builds_the_same_tensor(tiny_run, fashion_root, tmp_path):
    from exporters.runtime import Classifier

    clf = Classifier(tiny_run / "export" / "model.onnx")
    assert clf.preprocessing["color"] == "grey" and clf.preprocessing["crop"] == "none"
    bundle = load_dataset("fashion-mnist", str(fashion_root), image_size=32)
    image = bundle.test[7][0]
    Image.fromarray(image.numpy()[0]).save(tmp_path / "x.png")
    got = clf.normalize(clf.load_image(tmp_path / "x.png")[None])[0]
    assert np.abs(got - training_tensor(image, bundle, 32)).max() <= TOLERANCE


def test_cifar_layout_files_match_training(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"):
        batch = {"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), "labels": list(range(10))}
        (folder / name).write_bytes(pickle.dumps(batch))
    bundle = load_dataset("cifar10", str(tmp_path))
    spec = preprocessing_spec("cifar10", 32, list(bundle.mean), list(bundle.std))
    for i in range(10):
        image = bundle.test[i][0]
        path = tmp_path / f"{i}.png"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
        assert np.abs(runtime_tensor(path, spec) - training_tensor(image, bundle, 32)).max() <= TOLERANCE


def _awkward_images(rng: np.random.Generator) -> dict[str, Image.Image]:
    rgb = rng.integers(0, 256, (41, 57, 3), dtype=np.uint8)
    return {
        "rgb_odd.png": Image.fromarray(rgb),
        "grey.png": Image.fromarray(rng.integers(0, 256, (63, 38), dtype=np.uint8), "L"),
        "rgba.png": Image.fromarray(rng.integers(0, 256, (50, 33, 4), dtype=np.uint8), "RGBA"),
        "palette.png": Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64),
        "sixteen_bit.png": Image.fromarray(rng.integers(0, 65536, (44, 52), dtype=np.uint16).astype(np.int32),
                                           "I").convert("I;16"),
        "tall.jpg": Image.fromarray(rng.integers(0, 256, (120, 30, 3), dtype=np.uint8)),
        "tiny.bmp": Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)),
    }


@pytest.mark.parametrize("size", [32, 48])
def test_image_folder_files_of_every_kind_match_training(tmp_path, size):
    images = _awkward_images(np.random.default_rng(size))
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for name, image in images.items():
                image.save(tmp_path / split / cls / name)
    bundle = load_dataset(f"imagefolder:{tmp_path}", image_size=size)
    spec = preprocessing_spec(f"imagefolder:{tmp_path}", size, list(bundle.mean), list(bundle.std))
    assert spec["crop"] == "shorter-side-centre" and spec["color"] == "rgb"
    for index in range(len(bundle.test)):
        image, _, _ = bundle.test[index]
        path = bundle.test.files[index]
        diff = np.abs(runtime_tensor(path, spec) - training_tensor(image, bundle, size)).max()
        assert diff <= TOLERANCE, (path.name, diff)


def test_sixteen_bit_pixels_are_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.int32).reshape(64, 64) * 16) % 65536
    path = tmp_path / "ramp.png"
    Image.fromarray(ramp, "I").convert("I;16").save(path)
    pixels = preprocess.decode_file(path, "grey")
    assert pixels.dtype == np.uint8 and pixels.max() > 200 and 0 < pixels.mean() < 255
    with Image.open(path) as image:
        stored = np.asarray(image, dtype=np.float64)
    np.testing.assert_array_equal(pixels[..., 0], np.rint(stored / 257.0).astype(np.uint8))


def test_predict_on_the_test_split_scores_what_the_fused_model_scored(tiny_run, fashion_root, tmp_path):
    """The shipped path end to end: the run's test images as PNG files through `pipeline predict` reach the fused
    student's own test top-1 (same images, same subset)."""
    import json

    from pipeline.training.data import stratified_subset
    from tests.conftest import run_cli

    fused = json.loads((tiny_run / "fused" / "metrics.json").read_text())
    bundle = load_dataset("fashion-mnist", str(fashion_root), image_size=32)
    test = stratified_subset(bundle.test, fused["test_images"], 0, "eval_subset")
    files, labels = [], []
    for i in range(len(test)):
        image, label, _ = test[i]
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(image.numpy()[0]).save(files[-1])
        labels.append(int(label))
    result = run_cli("predict", "--model", str(tiny_run / "export" / "model.onnx"), "--json", *map(str, files))
    assert result.returncode == 0, result.stderr
    predicted = [json.loads(line)["index"] for line in result.stdout.splitlines()]
    top1 = 100.0 * sum(p == t for p, t in zip(predicted, labels)) / len(labels)
    assert len(predicted) == len(labels) and top1 == pytest.approx(fused["top1"], abs=1e-9)
