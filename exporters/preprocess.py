"""The one definition of how an image file becomes model input, shared by training and the shipped runtime.

Numpy and Pillow only (the runtime needs no torch). Training reads image folders
through :func:`decode_file`; the runtime reads any file through
:func:`decode_file` and :func:`fit`, with the settings the model's metadata
carries (:func:`spec`), so a deployed model sees the pixels it was trained on.

Steps, in order:

1. **decode**: the file's pixels as 8-bit channels. 16-bit and 32-bit integer
   images are scaled to 8 bits (value / 257, rounded: 65535 -> 255); float
   images are clipped to 0..255; palette images are expanded; an alpha channel
   is dropped; then the pixels become ``grey`` (one channel, ITU-R 601-2 luma)
   or ``rgb`` as the model was trained.
2. **crop** (image-folder models): the shorter side is resized to the input
   side (bilinear, on 8-bit pixels) and the centre square cut out.
3. **fit** to the input size: an image at most 25% smaller than the input is
   zero-padded (centred), any other size is resized (bilinear); grey is repeated
   to the model's channels.
4. **normalise**: ``(pixel / 255 - mean) / std`` per channel.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from exporters.errors import InputError, printable
from exporters.files import open_regular

COLORS = ("grey", "rgb")
CROPS = ("none", "shorter-side-centre")
BIT_DEPTH_RULE = "8-bit; 16/32-bit integer pixels / 257 (rounded), float pixels clipped to 0..255; alpha dropped"
# The runtime's pixel budget: an image that declares more pixels in its header is refused before it is decoded
# (a 2 MB PNG can declare 50000 x 50000). Derived from the model's input: max(MIN_PIXEL_BUDGET, PIXELS_PER_INPUT x
# H x W); 16.7 M pixels (a 4096 x 4096 photo, about 50 MB decoded) for any input up to 512 x 512.
MIN_PIXEL_BUDGET = 4096 * 4096
PIXELS_PER_INPUT = 64


def pixel_budget(height: int, width: int) -> int:
    """The most pixels the runtime decodes for a model whose input is ``height`` x ``width`` (see above)."""
    return max(MIN_PIXEL_BUDGET, PIXELS_PER_INPUT * height * width)


def spec(*, color: str, crop: str, size: tuple[int, int], channels: int, mean: list[float],
         std: list[float]) -> dict[str, Any]:
    """The preprocessing an exported model carries in its metadata (key ``preprocessing``)."""
    if color not in COLORS or crop not in CROPS:
        raise ValueError(f"preprocessing: color must be one of {COLORS}, crop one of {CROPS}")
    return {"color": color, "crop": crop, "size": [int(size[0]), int(size[1])], "channels": int(channels),
            "fit": "pad-or-resize", "interpolation": "bilinear", "bit_depth": BIT_DEPTH_RULE,
            "scale": "1/255", "mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def _eight_bit(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> "L" or "RGB" with 8-bit values (no alpha)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.rint(np.asarray(image, np.float64)), 0, 255).astype(np.uint8), "L")
    if image.mode in ("1", "L"):
        return image.convert("L")
    if image.mode == "LA":
        return image.convert("L")
    return image.convert("RGBA").convert("RGB") if image.mode in ("P", "PA") else image.convert("RGB")


def decode(image: Image.Image, color: str) -> np.ndarray:
    """Pixels as uint8 H x W x C (C = 1 for grey, 3 for rgb)."""
    eight = _eight_bit(image)
    target = "L" if color == "grey" else "RGB"
    array = np.asarray(eight.convert(target), dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def crop_size(width: int, height: int, side: int) -> tuple[int, int]:
    """The size :func:`crop_shorter_side` resizes a ``width`` x ``height`` image to before cutting the square."""
    scale = side / min(width, height)
    return max(side, round(width * scale)), max(side, round(height * scale))


def crop_shorter_side(pixels: np.ndarray, side: int) -> np.ndarray:
    """Resize the shorter side to ``side`` (bilinear, 8-bit) and cut out the centre square."""
    h, w, c = pixels.shape
    image = Image.fromarray(pixels[:, :, 0] if c == 1 else pixels)
    image = image.resize(crop_size(w, h, side), Image.BILINEAR)
    w, h = image.size
    left, top = (w - side) // 2, (h - side) // 2
    array = np.asarray(image.crop((left, top, left + side, top + side)), dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def decode_file(path: str | Path, color: str, crop: str = "none", side: int | None = None,
                max_pixels: int | None = None) -> np.ndarray:
    """An image file -> uint8 H x W x C; an unreadable file is an InputError naming it.

    Only a regular file is opened (a FIFO would block, a device never end). ``max_pixels``: the budget (see
    :func:`pixel_budget`) that the size declared in the header, and the size a crop resizes to, must stay within;
    it is checked before any pixel is decoded."""
    shown = printable(path)
    cropping = crop == "shorter-side-centre" and bool(side)
    try:
        with open_regular(path, "image") as handle, _quiet_open(handle) as image:
            width, height = image.size
            if max_pixels is not None:
                needed = width * height
                if cropping and min(width, height) > 0:  # a 1 x 100000 strip resizes to 32 x 3.2 M
                    crop_width, crop_height = crop_size(width, height, side)
                    needed = max(needed, crop_width * crop_height)
                if needed > max_pixels:
                    raise InputError(f"image {shown} is {width}x{height} pixels: over the pixel budget of "
                                     f"{max_pixels} (--max-pixels); refused before decoding")
            image.load()
            pixels = decode(image, color)
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(f"image {shown} declares over {2 * Image.MAX_IMAGE_PIXELS} pixels (Pillow's limit): over the "
                         "pixel budget; refused before decoding") from None
    except FileNotFoundError:
        raise InputError(f"image {shown} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"cannot read image {shown}: {printable(exc)}") from None
    except Exception as exc:  # Pillow's decoders raise many types on crafted files (SyntaxError, struct.error...)
        raise InputError(f"cannot read image {shown}: {type(exc).__name__}: {printable(exc)}") from None
    return crop_shorter_side(pixels, side) if cropping and side else pixels


def _quiet_open(handle: Any) -> Image.Image:
    """``Image.open`` without Pillow's DecompressionBombWarning (a multi-line warning on stderr): the pixel budget
    is checked right after, from the same header."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(handle)


def fit(pixels: np.ndarray, size: tuple[int, int], channels: int) -> np.ndarray:
    """uint8 H x W x C -> float32 C x H x W in [0, 255] at the model's input size."""
    planes = np.moveaxis(pixels, -1, 0).astype(np.float32)
    if planes.shape[0] == 1 and channels == 3:
        planes = np.repeat(planes, 3, axis=0)  # grey to the model's three channels, as in training
    h, w = planes.shape[1:]
    height, width = size
    if (h, w) == (height, width):
        return planes
    if h <= height and w <= width and min(h, w) >= 0.75 * min(height, width):
        top, left = (height - h) // 2, (width - w) // 2
        return np.pad(planes, ((0, 0), (top, height - h - top), (left, width - w - left)))
    # float ("F") resampling: no rounding to 8 bits in between
    return np.stack([np.asarray(Image.fromarray(p, "F").resize((width, height), Image.BILINEAR), np.float32)
                     for p in planes])


def normalize(batch: np.ndarray, settings: Mapping[str, Any]) -> np.ndarray:
    """N x C x H x W pixels in [0, 255] -> the model's input."""
    mean = np.asarray(settings["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(settings["std"], np.float32).reshape(1, -1, 1, 1)
    return ((batch / np.float32(255.0) - mean) / std).astype(np.float32)
