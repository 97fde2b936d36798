"""A synthetic dataset to try the fine-tuning flow without data of one's own: textured
shapes on textured backgrounds, written in the folder format that data.folder_pairs reads.

    make_synthetic(root, n, ...)        a toy textured-shapes dataset in the folder format
    synthetic_split(root, n_train, ...) the same as root/train and root/val
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, PathLike, _check_num_classes, _describe, _np, _pil

__all__ = ["make_synthetic", "synthetic_split"]

def _check_count(name: str, n, least: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name}: expected an int >= {least}, got {_describe(n)}")
    if n < least:
        raise ValueError(f"{name}: expected an int >= {least}, got {n}")


def _two_colours(rng):
    """Two RGB colours at least about 110 apart, drawn at random."""
    np = _np()
    a = rng.uniform(0, 255, 3)
    b = rng.uniform(0, 255, 3)
    if np.linalg.norm(a - b) < 110:
        b = 255.0 - a
        if np.linalg.norm(a - b) < 110:  # a near mid-grey: push b to a far corner
            b = np.where(a < 128, 255.0, 0.0)
    return a.astype(np.float32), b.astype(np.float32)


def _texture(kind: int, yy, xx, rng):
    """A pattern in {0, 1} on the grid (yy, xx): foreground texture kind 1, 2, ... (the
    class id)."""
    np = _np()
    family, octave = (kind - 1) % 3, (kind - 1) // 3
    theta = rng.uniform(0, math.pi)
    c, s = math.cos(theta), math.sin(theta)
    u = xx * c + yy * s + rng.uniform(0, 100)
    v = yy * c - xx * s + rng.uniform(0, 100)
    grow = 1.0 + 0.7 * octave
    if family == 0:    # fine checkerboard, period 4-7 px
        p = rng.uniform(4, 7) * grow
        return ((np.floor(u / p) + np.floor(v / p)) % 2).astype(np.float32)
    if family == 1:    # sharp stripes, period 9-14 px
        p = rng.uniform(9, 14) * grow
        return (np.mod(u, p) < p / 2).astype(np.float32)
    p = rng.uniform(8, 12) * grow  # a lattice of dots
    du, dv = np.mod(u, p) - p / 2, np.mod(v, p) - p / 2
    return (du * du + dv * dv < (0.32 * p) ** 2).astype(np.float32)


def _shape(yy, xx, size: int, rng):
    """A random ellipse, rectangle or triangle as an (H, W) bool array."""
    np = _np()
    cy, cx = (float(t) for t in rng.uniform(0.15 * size, 0.85 * size, 2))
    r = rng.uniform(0.1 * size, 0.28 * size)
    theta = rng.uniform(0, math.pi)
    c, s = math.cos(theta), math.sin(theta)
    y, x = yy - cy, xx - cx
    u, v = x * c + y * s, y * c - x * s
    kind = int(rng.integers(3))
    if kind == 0:
        a, b = r, r * rng.uniform(0.5, 1.0)
        return (u / a) ** 2 + (v / b) ** 2 <= 1
    if kind == 1:
        a, b = r, r * rng.uniform(0.5, 1.0)
        return (np.abs(u) <= a) & (np.abs(v) <= b)
    phi = [theta + k * 2.1 + rng.uniform(-0.4, 0.4) for k in range(3)]
    py = [cy + r * math.sin(t) for t in phi]
    px = [cx + r * math.cos(t) for t in phi]
    side = [(px[(k + 1) % 3] - px[k]) * (yy - py[k]) - (py[(k + 1) % 3] - py[k]) * (xx - px[k])
            for k in range(3)]
    return ((side[0] >= 0) & (side[1] >= 0) & (side[2] >= 0)) | (
        (side[0] <= 0) & (side[1] <= 0) & (side[2] <= 0))


def _synthetic_pair(key: Sequence[int], num_classes: int, size: int):
    """One (image uint8 (S, S, 3), label uint8 (S, S)) pair, determined by key."""
    np = _np()
    rng = np.random.default_rng(list(key))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # Background: smooth colour noise plus soft, low-frequency stripes of a random colour.
    grid = torch.from_numpy(rng.uniform(0, 255, (1, 3, 5, 5)).astype(np.float32))
    img = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=True)[0]
    img = np.ascontiguousarray(img.numpy().transpose(1, 2, 0))
    theta = rng.uniform(0, math.pi)
    freq = 2 * math.pi / rng.uniform(40, 90)
    wave = np.sin((xx * (math.cos(theta) * freq) + yy * (math.sin(theta) * freq))
                  + rng.uniform(0, 2 * math.pi))
    img += wave[:, :, None] * rng.uniform(-40, 40, 3).astype(np.float32)
    label = np.zeros((size, size), np.uint8)
    fg = max(1, num_classes - 1)
    for k in range(int(rng.integers(1, 5))):
        # The first shape cycles through the classes, so that each appears in some image.
        cls = 1 + int(key[-1]) % fg if k == 0 else int(rng.integers(1, fg + 1))
        inside = _shape(yy, xx, size, rng)
        kind = cls if num_classes > 1 else int(rng.integers(1, 4))
        rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)) if rows.size else \
            (slice(0, 0), slice(0, 0))
        pattern = _texture(kind, yy[box], xx[box], rng)[:, :, None]
        a, b = _two_colours(rng)
        tex = a + pattern * (b - a)
        img[box] = np.where(inside[box][:, :, None], tex, img[box])
        label[inside] = cls
    img += rng.standard_normal(img.shape, dtype=np.float32) * 8
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), label


def _write_synthetic(root: Path, n: int, num_classes: int, size: int, key: Tuple[int, ...]):
    Image = _pil()
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, label = _synthetic_pair((*key, i), num_classes, size)
        if num_classes == 1:
            label = label * 255
        name = f"img_{i:04d}.png"
        Image.fromarray(img, "RGB").save(root / "images" / name, compress_level=1)
        Image.fromarray(label, "L").save(root / "masks" / name, compress_level=1)


def _check_synthetic(num_classes, size, seed) -> None:
    _check_num_classes(num_classes)
    if num_classes > IGNORE_INDEX:
        raise ValueError(f"num_classes: expected at most {IGNORE_INDEX} classes, got "
                         f"{num_classes}")
    _check_count("size", size, 32)
    _check_count("seed", seed, 0)


def make_synthetic(root: PathLike, n_images: int, num_classes: int = 2, size: int = 256,
                   seed: int = 0) -> Path:
    """Write a toy dataset in the folder format and return root.

    root/images/img_0000.png ... are RGB size x size images, root/masks/img_0000.png their
    class ids as 8-bit grayscale (binary masks, num_classes == 1, as 0/255). Each image has
    a background of smooth colour noise and soft stripes, and 1-4 ellipses, rectangles or
    triangles on it; a shape of class c carries c's texture (1: fine checkerboard, 2: sharp
    stripes, 3: dots, then the same at coarser periods) in two random colours. Colours
    alone do not tell the classes apart; the textures do. Later shapes cover earlier ones.
    With num_classes == 1 the shapes are foreground with any of the first three textures.

    Image i depends only on (seed, i), so a larger n_images extends a smaller one. Files of
    the same names are overwritten; other files in root are left as they are.
    """
    _check_count("n_images", n_images, 1)
    _check_synthetic(num_classes, size, seed)
    root = Path(root)
    _write_synthetic(root, n_images, num_classes, size, (seed, 0))
    return root


def synthetic_split(root: PathLike, n_train: int, n_val: int, num_classes: int = 2,
                    size: int = 256, seed: int = 0) -> Tuple[Path, Path]:
    """make_synthetic's dataset as root/train and root/val (images drawn independently of
    each other and of make_synthetic's for the same seed); returns the two folders."""
    _check_count("n_train", n_train, 1)
    _check_count("n_val", n_val, 1)
    _check_synthetic(num_classes, size, seed)
    root = Path(root)
    _write_synthetic(root / "train", n_train, num_classes, size, (seed, 1))
    _write_synthetic(root / "val", n_val, num_classes, size, (seed, 2))
    return root / "train", root / "val"
