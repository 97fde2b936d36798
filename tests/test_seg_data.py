"""convlora_kernels.seg.data: reading images and masks, the folder and CSV formats, the
dataset's resize / pad geometry and training augmentation, collate, and the synthetic
data generator. Every test writes its own files under tmp_path."""

import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convlora_kernels.seg.data import (IGNORE_INDEX, SegmentationDataset, collate, csv_pairs,
                                       folder_pairs, read_image, read_mask)
from convlora_kernels.seg.synthetic import make_synthetic, synthetic_split


def save(path, array, mode=None, palette=None):
    """Write array to path with Pillow (mode as Image.fromarray takes it); returns path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.asarray(array), mode) if mode else Image.fromarray(np.asarray(array))
    if palette is not None:
        img.putpalette(palette)
    img.save(path)
    return path


def rand_image(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_folder(root, names, h=8, w=10, num_classes=3, ext=".png", seed=0):
    """root/images/<name><ext> random RGB and root/masks/<name>.png random ids."""
    rng = np.random.default_rng(seed)
    for n in names:
        save(Path(root) / "images" / f"{n}{ext}", rand_image(rng, h, w))
        save(Path(root) / "masks" / f"{n}.png",
             rng.integers(0, num_classes, (h, w), dtype=np.uint8))
    return Path(root)


# --- read_image ---------------------------------------------------------------------

def test_read_image_rgb(tmp_path):
    a = rand_image(np.random.default_rng(0), 5, 7)
    t = read_image(save(tmp_path / "a.png", a))
    assert t.dtype == torch.float32 and t.shape == (3, 5, 7)
    assert torch.equal(t, torch.from_numpy(a).permute(2, 0, 1).float())


def test_read_image_gray_rgba_palette(tmp_path):
    rng = np.random.default_rng(1)
    g = rng.integers(0, 256, (4, 6), dtype=np.uint8)
    t = read_image(save(tmp_path / "g.png", g, "L"))
    assert torch.equal(t, torch.from_numpy(g).float().expand(3, 4, 6))

    rgba = rng.integers(0, 256, (4, 6, 4), dtype=np.uint8)
    t = read_image(save(tmp_path / "rgba.png", rgba, "RGBA"))
    assert torch.equal(t, torch.from_numpy(rgba[:, :, :3]).permute(2, 0, 1).float())

    idx = rng.integers(0, 4, (4, 6), dtype=np.uint8)
    pal = [10, 20, 30, 200, 0, 0, 0, 250, 0, 7, 8, 9]
    t = read_image(save(tmp_path / "p.png", idx, "P", palette=pal))
    want = np.array(pal, np.float32).reshape(4, 3)[idx]
    assert torch.equal(t, torch.from_numpy(want).permute(2, 0, 1))


def test_read_image_16bit_gray(tmp_path):
    a = np.array([[0, 65535], [257, 32896]], np.uint16)
    t = read_image(save(tmp_path / "g16.png", a))
    assert torch.allclose(t[0], torch.tensor([[0.0, 255.0], [1.0, 128.0]]), atol=1e-4)


def test_read_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.png: no such file \(expected an RGB"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(ValueError, match=r"notes\.png: not an image Pillow can read"):
        read_image(tmp_path / "notes.png")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        read_image(tmp_path)


# --- read_mask ----------------------------------------------------------------------

def test_read_mask_binary(tmp_path):
    a = np.array([[0, 1, 1], [0, 0, 1]], np.uint8)
    m = read_mask(save(tmp_path / "m01.png", a), 1)
    assert m.dtype == torch.int64 and torch.equal(m, torch.from_numpy(a).long())
    m = read_mask(save(tmp_path / "m255.png", a * 255), 1)
    assert torch.equal(m, torch.from_numpy(a).long())
    m = read_mask(save(tmp_path / "mbit.png", a.astype(bool)), 1)  # mode "1"
    assert torch.equal(m, torch.from_numpy(a).long())
    m = read_mask(save(tmp_path / "zeros.png", np.zeros((2, 2), np.uint8)), 1)
    assert torch.equal(m, torch.zeros(2, 2, dtype=torch.long))


def test_read_mask_bad_binary_values(tmp_path):
    p = save(tmp_path / "bad.png", np.array([[0, 7, 255]], np.uint8))
    with pytest.raises(ValueError, match=re.escape(
            f"{p}: expected a binary mask (num_classes=1) with values {{0, 1}} or "
            f"{{0, 255}}, found values 0, 7, 255")):
        read_mask(p, 1)
    p = save(tmp_path / "mixed.png", np.array([[0, 1, 255]], np.uint8))
    with pytest.raises(ValueError, match="found values 0, 1, 255"):
        read_mask(p, 1)
    p = save(tmp_path / "many.png", np.arange(20, dtype=np.uint8)[None])
    with pytest.raises(ValueError, match=re.escape("found values 0, 1, 2, 3, 4, ... (20 in "
                                                   "all)")):
        read_mask(p, 1)


def test_read_mask_multiclass_and_palette(tmp_path):
    a = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    assert torch.equal(read_mask(save(tmp_path / "l.png", a), 3), torch.from_numpy(a).long())
    # A palette PNG: the ids are the palette indices, not the colours.
    pal = [0, 0, 0, 128, 0, 0, 0, 128, 0]
    assert torch.equal(read_mask(save(tmp_path / "p.png", a, "P", palette=pal), 3),
                       torch.from_numpy(a).long())
    # An RGB mask whose channels are equal is read from one channel.
    rgb = np.repeat(a[:, :, None], 3, axis=2)
    assert torch.equal(read_mask(save(tmp_path / "rgb.png", rgb), 3),
                       torch.from_numpy(a).long())
    # 16-bit ids.
    a16 = np.array([[0, 300], [299, 5]], np.uint16)
    assert torch.equal(read_mask(save(tmp_path / "i16.png", a16), 301),
                       torch.from_numpy(a16.astype(np.int64)))


def test_read_mask_errors(tmp_path):
    p = save(tmp_path / "ids.png", np.array([[0, 1, 2, 3, 7]], np.uint8))
    with pytest.raises(ValueError, match=re.escape(
            f"{p}: ids beyond num_classes=3: found 3, 7 (expected ids in [0, 3), or 255 for "
            f"pixels to ignore; --ignore-index names another value to ignore)")):
        read_mask(p, 3)
    # 255 marks pixels to ignore (VOC / ADE masks) and is kept as such; 254 is an error
    p = save(tmp_path / "void.png", np.array([[0, 2, 255, 1]], np.uint8))
    assert read_mask(p, 3).tolist() == [[0, 2, IGNORE_INDEX, 1]]
    p = save(tmp_path / "void254.png", np.array([[0, 254, 255]], np.uint8))
    with pytest.raises(ValueError, match="ids beyond num_classes=3: found 254 "):
        read_mask(p, 3)
    # a binary mask saved as 0/255 with 2 classes would train no foreground: refused,
    # naming both fixes (255 with other ids stays "ignore", as above)
    p = save(tmp_path / "binary255.png", np.array([[0, 255], [255, 0]], np.uint8))
    with pytest.raises(ValueError, match=re.escape(
            f"{p}: values {{0, 255}} with num_classes=2: 255 is read as 'ignore'")) as e:
        read_mask(p, 2)
    assert "--num-classes 1" in str(e.value) and "ids 1 to 1" in str(e.value)
    assert read_mask(p, 1).tolist() == [[0, 1], [1, 0]]
    # A palette PNG with indices beyond num_classes.
    p = save(tmp_path / "pal.png", np.array([[0, 4]], np.uint8), "P", palette=[0] * 15)
    with pytest.raises(ValueError, match="ids beyond num_classes=2: found 4"):
        read_mask(p, 2)
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[1, 2] = (5, 5, 6)
    p = save(tmp_path / "rgb.png", rgb)
    with pytest.raises(ValueError, match=re.escape(
            "got an RGB image whose channels differ (at row 1, column 2: (5, 5, 6))")):
        read_mask(p, 7)
    with pytest.raises(FileNotFoundError, match=r"none\.png: no such file \(expected a mask"):
        read_mask(tmp_path / "none.png", 2)
    with pytest.raises(ValueError, match="num_classes: expected a positive int"):
        read_mask(p, 0)


# --- folder_pairs ---------------------------------------------------------------------

def test_folder_pairs(tmp_path):
    root = make_folder(tmp_path / "d", ["b", "a"])
    make_folder(root, ["c"], ext=".JPG", seed=1)
    make_folder(root, ["d"], ext=".tiff", seed=2)
    (root / "images" / "readme.txt").write_text("ignored")
    (root / "images" / ".hidden.png").write_text("ignored")
    pairs = folder_pairs(root)
    assert [(i.name, m.name) for i, m in pairs] == [
        ("a.png", "a.png"), ("b.png", "b.png"), ("c.JPG", "c.png"), ("d.tiff", "d.png")]
    assert all(i.parent == root / "images" and m.parent == root / "masks" for i, m in pairs)


def test_folder_pairs_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing: no such folder \(expected a "
                                                r"dataset folder: root/images/<name>"):
        folder_pairs(tmp_path / "missing")
    (tmp_path / "f.txt").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        folder_pairs(tmp_path / "f.txt")

    root = tmp_path / "r"
    (root / "masks").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"{root}: no images/ folder in it (expected root/images/<name>.<ext> with "
            f"root/masks/<name>.png")):
        folder_pairs(root)
    (root / "masks").rmdir()
    (root / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="no masks/ folder in it"):
        folder_pairs(root)
    (root / "masks").mkdir()
    with pytest.raises(ValueError, match=r"images: no images in it \(expected files ending "
                                         r"in \.png, \.jpg"):
        folder_pairs(root)

    make_folder(root, ["a"])
    rng = np.random.default_rng(0)
    for n in ["x1", "x2", "x3", "x4", "x5", "x6", "x7"]:
        save(root / "images" / f"{n}.png", rand_image(rng, 2, 2))
    with pytest.raises(ValueError, match=re.escape(
            f"{root}: 7 image(s) have no mask (expected masks/<name>.png for each): "
            f"x1, x2, x3, x4, x5, ... (7 in all)")):
        folder_pairs(root)


def test_folder_pairs_orphan_masks_and_duplicates(tmp_path):
    root = make_folder(tmp_path / "r", ["a", "b"])
    save(root / "masks" / "lost.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match=re.escape(
            f"{root}: 1 mask(s) have no image (expected images/<name>.<ext> for each; "
            f"misnamed files?): lost")):
        folder_pairs(root)
    (root / "masks" / "lost.png").unlink()
    save(root / "images" / "a.jpg", rand_image(np.random.default_rng(0), 8, 10))
    with pytest.raises(ValueError, match=re.escape(
            f"{root / 'images'}: 1 name(s) used by more than one file (expected one file per "
            f"name): a.jpg/a.png")):
        folder_pairs(root)


# --- csv_pairs ------------------------------------------------------------------------

def test_csv_pairs(tmp_path):
    root = make_folder(tmp_path / "d", ["a", "b"])
    other = make_folder(tmp_path / "elsewhere", ["c"])
    csv = root / "list.csv"
    csv.write_text(f"id,mask,image\n1,masks/b.png,images/b.png\n"
                   f"2, {other / 'masks' / 'c.png'} , {other / 'images' / 'c.png'}\n"
                   f"3,masks/a.png,images/a.png\n")
    pairs = csv_pairs(csv)
    assert pairs == [(root / "images" / "b.png", root / "masks" / "b.png"),
                     (other / "images" / "c.png", other / "masks" / "c.png"),
                     (root / "images" / "a.png", root / "masks" / "a.png")]


def test_csv_pairs_errors(tmp_path):
    root = make_folder(tmp_path / "d", ["a"])
    csv = root / "l.csv"
    with pytest.raises(FileNotFoundError, match=r"l\.csv: no such file \(expected a CSV file "
                                                r"with columns 'image' and 'mask'\)"):
        csv_pairs(csv)
    csv.write_text("")
    with pytest.raises(ValueError, match="the file is empty"):
        csv_pairs(csv)
    csv.write_text("img,mask\nimages/a.png,masks/a.png\n")
    with pytest.raises(ValueError, match=re.escape(
            "no column 'image' (expected a header with columns 'image' and 'mask', found "
            "columns ['img', 'mask'])")):
        csv_pairs(csv)
    csv.write_text("image,mask\n")
    with pytest.raises(ValueError, match="no rows after the header"):
        csv_pairs(csv)
    csv.write_text("image,mask\nimages/a.png,masks/a.png\n,\n")
    with pytest.raises(ValueError, match=re.escape(f"{csv}, row 3: empty row")):
        csv_pairs(csv)
    csv.write_text("image,mask\nimages/a.png,masks/a.png\nimages/a.png\n")
    with pytest.raises(ValueError, match=re.escape(f"{csv}, row 3: the mask column is empty")):
        csv_pairs(csv)
    csv.write_text("image,mask\nimages/a.png,masks/a.png\nimages/zz.png,masks/a.png\n")
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"{csv}, row 3: image file {root / 'images' / 'zz.png'} does not exist")):
        csv_pairs(csv)


# --- SegmentationDataset --------------------------------------------------------------

def test_dataset_sources_agree(tmp_path):
    root = make_folder(tmp_path / "d", ["a", "b", "c"])
    (root / "l.csv").write_text("image,mask\n" + "".join(
        f"images/{n}.png,masks/{n}.png\n" for n in "abc"))
    by_folder = SegmentationDataset(root, 3, size=16)
    by_csv = SegmentationDataset(str(root / "l.csv"), 3, size=16)
    by_list = SegmentationDataset([(str(i), m) for i, m in folder_pairs(root)], 3, size=16)
    assert len(by_folder) == len(by_csv) == len(by_list) == 3
    for i in range(3):
        a, b, c = by_folder[i], by_csv[i], by_list[i]
        assert a["name"] == b["name"] == c["name"] == "abc"[i]
        for k in ("image", "mask"):
            assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k])
    assert torch.equal(by_folder[-1]["mask"], by_folder[2]["mask"])
    with pytest.raises(IndexError, match="index 3 out of range for a dataset of 3 items"):
        by_folder[3]


def test_dataset_upscale_geometry(tmp_path):
    # A 6 x 12 image of 3 x 3 blocks, each of its own colour and id; size 24 doubles it.
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (2, 4, 3), dtype=np.uint8)
    ids = rng.integers(0, 5, (2, 4), dtype=np.uint8)
    img = colours.repeat(3, 0).repeat(3, 1)
    mask = ids.repeat(3, 0).repeat(3, 1)
    pairs = [(save(tmp_path / "i.png", img), save(tmp_path / "m.png", mask))]
    item = SegmentationDataset(pairs, 5, size=24)[0]
    x, m = item["image"], item["mask"]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    assert m.shape == (24, 24) and m.dtype == torch.int64
    assert item["valid"] == (12, 24) and item["original_size"] == (6, 12)
    assert item["name"] == "i"
    # Block (bi, bj) covers rows 6bi..6bi+5, columns 6bj..6bj+5; inside it (away from the
    # blends at its border) the colour is exact.
    for bi in range(2):
        for bj in range(4):
            inner = x[:, 6 * bi + 1:6 * bi + 5, 6 * bj + 1:6 * bj + 5]
            want = torch.tensor(colours[bi, bj], dtype=torch.float32)[:, None, None]
            assert torch.allclose(inner, want.expand_as(inner), atol=1e-3), (bi, bj)
    want_mask = torch.from_numpy(mask).long().repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(m[:12], want_mask)
    assert torch.all(x[:, 12:] == 0) and torch.all(m[12:] == IGNORE_INDEX)


def test_dataset_downscale_geometry(tmp_path):
    # A 64 x 32 (portrait) image of 16 x 16 blocks; size 16 shrinks it by 4 to 16 x 8.
    rng = np.random.default_rng(1)
    colours = rng.integers(0, 256, (4, 2, 3), dtype=np.uint8)
    img = colours.repeat(16, 0).repeat(16, 1)
    mask = rng.integers(0, 3, (64, 32), dtype=np.uint8)
    pairs = [(save(tmp_path / "i.png", img), save(tmp_path / "m.png", mask))]
    item = SegmentationDataset(pairs, 3, size=16)[0]
    x, m = item["image"], item["mask"]
    assert item["valid"] == (16, 8) and item["original_size"] == (64, 32)
    # Nearest at pixel centres: output pixel y samples input pixel 4y + 2.
    assert torch.equal(m[:, :8], torch.from_numpy(mask[2::4, 2::4]).long())
    assert torch.all(m[:, 8:] == IGNORE_INDEX) and torch.all(x[:, :, 8:] == 0)
    # Antialiased: block centres (output pixels 4b+1, 4b+2) keep the block's colour.
    for bi in range(4):
        for bj in range(2):
            inner = x[:, 4 * bi + 1:4 * bi + 3, 4 * bj + 1:4 * bj + 3]
            want = torch.tensor(colours[bi, bj], dtype=torch.float32)[:, None, None]
            assert torch.allclose(inner, want.expand_as(inner), atol=1e-3)


def test_dataset_downscale_antialiased(tmp_path):
    # Every 4th column bright: shrinking by 4 averages it (the triangle filter's weights on
    # the two bright columns in reach sum to 1 of 4) rather than sampling two dark columns.
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, ::4] = 255
    pairs = [(save(tmp_path / "i.png", img), save(tmp_path / "m.png", np.zeros((32, 32),
                                                                              np.uint8)))]
    x = SegmentationDataset(pairs, 2, size=8)[0]["image"]
    assert torch.allclose(x[:, :, 1:7], torch.full((3, 8, 6), 63.75), atol=1e-3)


def test_dataset_rounding_and_no_resize(tmp_path):
    rng = np.random.default_rng(2)
    img, mask = rand_image(rng, 10, 3), rng.integers(0, 2, (10, 3), dtype=np.uint8)
    pairs = [(save(tmp_path / "i.png", img), save(tmp_path / "m.png", mask))]
    assert SegmentationDataset(pairs, 2, size=4)[0]["valid"] == (4, 1)   # 3 * 0.4 -> 1
    assert SegmentationDataset(pairs, 2, size=25)[0]["valid"] == (25, 8)  # 7.5 -> 8
    img5, mask5 = rand_image(rng, 10, 5), np.zeros((10, 5), np.uint8)
    pairs5 = [(save(tmp_path / "i5.png", img5), save(tmp_path / "m5.png", mask5))]
    assert SegmentationDataset(pairs5, 2, size=5)[0]["valid"] == (5, 3)  # 2.5 -> 3, as SAM
    item = SegmentationDataset(pairs, 2)[0]
    assert item["valid"] == item["original_size"] == (10, 3)
    assert torch.equal(item["image"], torch.from_numpy(img).permute(2, 0, 1).float())
    assert torch.equal(item["mask"], torch.from_numpy(mask).long())
    # Already at the size: taken as read, no resampling.
    item = SegmentationDataset(pairs, 2, size=10)[0]
    assert torch.equal(item["image"][:, :, :3], torch.from_numpy(img).permute(2, 0, 1).float())


def test_dataset_binary_masks_and_padding(tmp_path):
    mask = np.zeros((4, 8), np.uint8)
    mask[1:3, 2:6] = 255
    pairs = [(save(tmp_path / "i.png", np.full((4, 8, 3), 9, np.uint8)),
              save(tmp_path / "m.png", mask))]
    m = SegmentationDataset(pairs, 1, size=8)[0]["mask"]
    want = torch.full((8, 8), IGNORE_INDEX)
    want[:4] = torch.from_numpy(mask // 255).long()
    assert torch.equal(m, want)


def test_dataset_size_mismatch(tmp_path):
    rng = np.random.default_rng(0)
    i = save(tmp_path / "i.png", rand_image(rng, 10, 12))
    m = save(tmp_path / "m.png", np.zeros((10, 11), np.uint8))
    with pytest.raises(ValueError, match=re.escape(
            f"size mismatch: image {i} is (H, W) = (10, 12) but mask {m} is (10, 11)")):
        SegmentationDataset([(i, m)], 2, size=16)[0]


def test_dataset_bad_mask_values(tmp_path):
    i = save(tmp_path / "i.png", np.zeros((2, 2, 3), np.uint8))
    m = save(tmp_path / "m.png", np.array([[0, 5], [1, 1]], np.uint8))
    with pytest.raises(ValueError, match="ids beyond num_classes=2: found 5"):
        SegmentationDataset([(i, m)], 2)[0]


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(num_classes=0), ValueError, r"num_classes: expected a positive int .*got 0"),
    (dict(num_classes=2.0), TypeError, r"num_classes: expected a positive int .*got float"),
    (dict(num_classes=True), TypeError, r"num_classes: .*got bool"),
    (dict(num_classes=256), ValueError, r"num_classes: expected at most 255 classes"),
    (dict(size=0), ValueError, r"size: expected a positive int .*got 0"),
    (dict(size=64.0), TypeError, r"size: expected a positive int .*got float 64\.0"),
    (dict(train=1), TypeError, r"train: expected a bool, got int 1"),
    (dict(hflip=1.5), ValueError, r"hflip: expected a probability in \[0, 1\], got 1\.5"),
    (dict(hflip="yes"), TypeError, r"hflip: expected a probability in \[0, 1\], got str"),
    (dict(hflip=float("nan")), ValueError, r"hflip: expected a probability .*got nan"),
    (dict(scale=(0.0, 1.0)), ValueError, r"scale: expected a pair \(lo, hi\) with "
                                         r"0 < lo <= hi \(finite\), got \(0\.0, 1\.0\)"),
    (dict(scale=(1.2, 1.0)), ValueError, r"0 < lo <= hi \(finite\), got \(1\.2, 1\.0\)"),
    (dict(scale=(1.0, float("inf"))), ValueError, r"got \(1\.0, inf\)"),
    (dict(scale=1.0), TypeError, r"scale: expected a pair \(lo, hi\) of numbers"),
    (dict(scale=(1.0,)), TypeError, r"scale: expected a pair"),
    (dict(seed=-1), ValueError, r"seed: expected a non-negative int, got -1"),
    (dict(seed=0.5), TypeError, r"seed: expected a non-negative int, got float"),
])
def test_dataset_argument_errors(tmp_path, kwargs, err, match):
    root = make_folder(tmp_path / "d", ["a"])
    args = dict(num_classes=3) | kwargs
    with pytest.raises(err, match=match):
        SegmentationDataset(root, **args)


def test_dataset_source_errors(tmp_path):
    root = make_folder(tmp_path / "d", ["a"])
    with pytest.raises(TypeError, match="source: expected a dataset folder, a .csv file or a "
                                        "list of .* got int 3"):
        SegmentationDataset(3, 2)
    with pytest.raises(FileNotFoundError, match=r"source: .*nothing does not exist"):
        SegmentationDataset(tmp_path / "nothing", 2)
    with pytest.raises(ValueError, match=r"source: expected .* got the file .*a\.png"):
        SegmentationDataset(root / "images" / "a.png", 2)
    with pytest.raises(ValueError, match="got an empty list"):
        SegmentationDataset([], 2)
    with pytest.raises(TypeError, match=r"source\[0\]: expected an \(image, mask\) pair of "
                                        r"paths, got str"):
        SegmentationDataset(("images/a.png", "masks/a.png"), 2)
    with pytest.raises(FileNotFoundError, match=r"source\[1\]: mask file .*zz\.png does not"):
        SegmentationDataset([folder_pairs(root)[0], (root / "images" / "a.png", "zz.png")], 2)
    ds = SegmentationDataset(root, 3)
    with pytest.raises(ValueError, match="epoch: expected a non-negative int, got -1"):
        ds.set_epoch(-1)


# --- Training augmentation ------------------------------------------------------------

def blocky_pair(tmp_path, h, w, seed, num_classes=3, block=4):
    """An image whose colour encodes its mask: class k is pure 255 in channel (k + 2) % 3
    (class 0 blue, 1 red, 2 green), on blocks of block x block pixels."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, num_classes, (h // block, w // block), dtype=np.uint8)
    mask = ids.repeat(block, 0).repeat(block, 1)
    img = np.zeros((h, w, 3), np.uint8)
    for k in range(num_classes):
        img[mask == k, (k + 2) % 3] = 255
    return (save(tmp_path / f"i{seed}.png", img), save(tmp_path / f"m{seed}.png", mask))


def test_train_flip_exact(tmp_path):
    pairs = [blocky_pair(tmp_path, 8, 16, seed=0)]
    ev = SegmentationDataset(pairs, 3, size=32)[0]
    tr = SegmentationDataset(pairs, 3, size=32, train=True, hflip=1.0, scale=(1, 1))[0]
    assert tr["valid"] == ev["valid"] == (16, 32)
    assert torch.allclose(tr["image"][:, :16], ev["image"][:, :16].flip(-1), atol=1e-4)
    assert torch.equal(tr["mask"][:16], ev["mask"][:16].flip(-1))
    assert torch.all(tr["mask"][16:] == IGNORE_INDEX) and torch.all(tr["image"][:, 16:] == 0)
    # No flip, no scale: training items are the evaluation items.
    tr = SegmentationDataset(pairs, 3, size=32, train=True, hflip=0.0, scale=(1, 1))[0]
    assert torch.equal(tr["image"], ev["image"]) and torch.equal(tr["mask"], ev["mask"])


def test_train_scale_crop_and_pad(tmp_path):
    pairs = [blocky_pair(tmp_path, 16, 16, seed=1)]
    # Scale 2: the content is the 32 x 32 resize, cropped at a random place to 16 x 16.
    big = SegmentationDataset(pairs, 3, size=32)[0]
    ds = SegmentationDataset(pairs, 3, size=16, train=True, hflip=0.0, scale=(2.0, 2.0))
    offsets = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        it = ds[0]
        assert it["valid"] == (16, 16)
        found = [(t, l) for t in range(17) for l in range(17)
                 if torch.equal(it["mask"], big["mask"][t:t + 16, l:l + 16])
                 and torch.equal(it["image"], big["image"][:, t:t + 16, l:l + 16])]
        assert found, epoch
        offsets.add(found[0])
    assert len({t for t, _ in offsets}) > 1 and len({l for _, l in offsets}) > 1
    # Scale 0.5: the 8 x 8 resize at the top left, padded.
    small = SegmentationDataset(pairs, 3, size=8)[0]
    it = SegmentationDataset(pairs, 3, size=16, train=True, hflip=0.0, scale=(0.5, 0.5))[0]
    assert it["valid"] == (8, 8)
    assert torch.equal(it["image"][:, :8, :8], small["image"])
    assert torch.equal(it["mask"][:8, :8], small["mask"])
    assert torch.all(it["mask"][8:] == IGNORE_INDEX) and torch.all(it["mask"][:, 8:] == 255)
    assert torch.all(it["image"][:, 8:] == 0) and torch.all(it["image"][:, :, 8:] == 0)


def test_train_without_size_keeps_the_frame(tmp_path):
    pairs = [blocky_pair(tmp_path, 8, 12, seed=2)]
    it = SegmentationDataset(pairs, 3, train=True, hflip=0.0, scale=(0.5, 0.5))[np.int64(0)]
    assert it["image"].shape == (3, 8, 12) and it["valid"] == (4, 6)
    assert torch.equal(it["mask"][:4, :6], SegmentationDataset(pairs, 3, size=6)[0]["mask"][:4])
    assert torch.all(it["mask"][4:] == IGNORE_INDEX) and torch.all(it["mask"][:, 6:] == 255)
    it = SegmentationDataset(pairs, 3, train=True, hflip=0.0, scale=(2.0, 2.0))[0]
    assert it["image"].shape == (3, 8, 12) and it["valid"] == (8, 12)
    assert not (it["mask"] == IGNORE_INDEX).any()


def test_train_image_and_mask_stay_aligned(tmp_path):
    pairs = [blocky_pair(tmp_path, 48, 80, seed=s, block=16) for s in range(3)]
    ds = SegmentationDataset(pairs, 3, size=64, train=True, hflip=0.5, scale=(0.6, 1.6))
    valids, flips = set(), set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            it = ds[i]
            x, m, (h, w) = it["image"], it["mask"], it["valid"]
            valids.add((h, w))
            # Padding exactly where the mask says IGNORE_INDEX, and only outside valid.
            pad = m == IGNORE_INDEX
            assert torch.equal(pad, x.sum(0) == 0)
            assert not pad[:h, :w].any() and pad[h:].all() and pad[:, w:].all()
            # Where the image is a pure class colour, the mask has that class.
            pure = 0
            for k in range(3):
                here = (x[(k + 2) % 3] > 254) & (x.sum(0) - x[(k + 2) % 3] < 1)
                assert torch.all(m[here] == k), (epoch, i, k)
                pure += int(here.sum())
            assert pure > 0.25 * h * w
            # Which way round: the first column of the content against the file's.
            ev = SegmentationDataset(pairs, 3)[i]["mask"]
            flips.add(bool(it["mask"][0, 0] != ev[0, 0]))
    assert len(valids) > 3 and flips == {True, False}


def test_train_reproducible_and_epoch_dependent(tmp_path):
    pairs = [blocky_pair(tmp_path, 24, 40, seed=s) for s in range(4)]

    def items(ds):
        return [ds[i] for i in range(len(ds))]

    def same(a, b):
        return all(torch.equal(p["image"], q["image"]) and torch.equal(p["mask"], q["mask"])
                   and p["valid"] == q["valid"] for p, q in zip(a, b))

    kw = dict(size=32, train=True, scale=(0.5, 1.5), seed=3)
    a, b = SegmentationDataset(pairs, 3, **kw), SegmentationDataset(pairs, 3, **kw)
    first = items(a)
    assert same(first, items(b)) and same(first, items(a))  # same seed and epoch, any call
    a.set_epoch(1)
    assert not same(first, items(a))
    a.set_epoch(0)
    assert same(first, items(a))
    assert not same(first, items(SegmentationDataset(pairs, 3, **(kw | dict(seed=4)))))
    # Eval mode ignores seed and epoch.
    e1, e2 = SegmentationDataset(pairs, 3, size=32), SegmentationDataset(pairs, 3, size=32,
                                                                        seed=9)
    e2.set_epoch(5)
    assert same(items(e1), items(e2))


def test_train_same_in_dataloader_workers(tmp_path):
    pairs = [blocky_pair(tmp_path, 16, 24, seed=s) for s in range(4)]
    ds = SegmentationDataset(pairs, 3, size=16, train=True, scale=(0.5, 1.5), seed=1)
    ds.set_epoch(2)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate)
    got = torch.cat([b["mask"] for b in loader])
    assert torch.equal(got, torch.stack([ds[i]["mask"] for i in range(4)]))


# --- collate --------------------------------------------------------------------------

def test_collate_through_dataloader(tmp_path):
    root = make_folder(tmp_path / "d", [f"n{k}" for k in range(6)], h=12, w=20)
    ds = SegmentationDataset(root, 3, size=16)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate))
    assert [b["image"].shape for b in batches] == [(4, 3, 16, 16), (2, 3, 16, 16)]
    assert [b["mask"].shape for b in batches] == [(4, 16, 16), (2, 16, 16)]
    assert batches[0]["mask"].dtype == torch.int64
    assert batches[0]["name"] == ["n0", "n1", "n2", "n3"] and batches[1]["name"] == ["n4", "n5"]
    assert batches[1]["valid"] == [(10, 16), (10, 16)]
    assert batches[1]["original_size"] == [(12, 20), (12, 20)]
    assert torch.equal(batches[1]["image"][1], ds[5]["image"])
    assert torch.equal(batches[0]["mask"][2], ds[2]["mask"])


def test_collate_errors(tmp_path):
    a = make_folder(tmp_path / "a", ["x"], h=4, w=4)
    b = make_folder(tmp_path / "b", ["y"], h=4, w=6)
    items = [SegmentationDataset(a, 3)[0], SegmentationDataset(b, 3)[0]]
    with pytest.raises(ValueError, match=re.escape(
            "batch: images of one batch must share a size, got (3, 4, 4) for 'x' and "
            "(3, 4, 6) for 'y' (pass size= to SegmentationDataset")):
        collate(items)
    with pytest.raises(ValueError, match="batch: expected at least one item"):
        collate([])


# --- make_synthetic -------------------------------------------------------------------

def read_all(root):
    names = sorted(p.name for p in (Path(root) / "images").iterdir())
    imgs = [np.asarray(Image.open(Path(root) / "images" / n)) for n in names]
    masks = [np.asarray(Image.open(Path(root) / "masks" / n)) for n in names]
    return names, imgs, masks


def test_make_synthetic_files_and_ids(tmp_path):
    root = make_synthetic(tmp_path / "s", 9, num_classes=3, size=64, seed=0)
    assert root == tmp_path / "s"
    names, imgs, masks = read_all(root)
    assert names == [f"img_{i:04d}.png" for i in range(9)]
    assert all(im.shape == (64, 64, 3) and im.dtype == np.uint8 for im in imgs)
    assert all(m.shape == (64, 64) and m.dtype == np.uint8 for m in masks)
    assert set(np.unique(np.stack(masks)).tolist()) == {0, 1, 2}
    for k in (1, 2):  # each foreground class in some images, and never everywhere
        assert 0 < sum(bool((m == k).any()) for m in masks) < 9
    assert all((m == 0).any() for m in masks)
    # The dataset reads it back as it is.
    ds = SegmentationDataset(root, 3)
    assert len(ds) == 9 and np.array_equal(ds[4]["mask"].numpy(), masks[4])


def test_make_synthetic_binary_and_more_classes(tmp_path):
    _, _, masks = read_all(make_synthetic(tmp_path / "b", 4, num_classes=1, size=48))
    assert set(np.unique(np.stack(masks)).tolist()) == {0, 255}
    ds = SegmentationDataset(tmp_path / "b", 1)
    assert set(torch.unique(ds[0]["mask"]).tolist()) <= {0, 1}
    _, _, masks = read_all(make_synthetic(tmp_path / "five", 12, num_classes=5, size=48))
    assert set(np.unique(np.stack(masks)).tolist()) == {0, 1, 2, 3, 4}


def test_make_synthetic_not_a_colour_threshold(tmp_path):
    # The classes' colours are drawn per shape: the mean colour of class 1 varies widely
    # across images, and its colour range overlaps the background's.
    _, imgs, masks = read_all(make_synthetic(tmp_path / "s", 16, num_classes=2, size=64))
    means = np.array([im[m == 1].mean(0) for im, m in zip(imgs, masks) if (m == 1).any()])
    assert len(means) >= 8 and means.std(0).min() > 20
    fg = np.concatenate([im[m == 1] for im, m in zip(imgs, masks)]).astype(float)
    bg = np.concatenate([im[m == 0] for im, m in zip(imgs, masks)]).astype(float)
    for c in range(3):
        assert np.percentile(fg[:, c], 10) < np.percentile(bg[:, c], 50) < \
            np.percentile(fg[:, c], 90)


def test_make_synthetic_deterministic(tmp_path):
    _, a_img, a_mask = read_all(make_synthetic(tmp_path / "a", 5, size=48, seed=7))
    _, b_img, b_mask = read_all(make_synthetic(tmp_path / "b", 3, size=48, seed=7))
    _, c_img, c_mask = read_all(make_synthetic(tmp_path / "c", 3, size=48, seed=8))
    for i in range(3):  # image i depends on (seed, i) only
        assert np.array_equal(a_img[i], b_img[i]) and np.array_equal(a_mask[i], b_mask[i])
        assert not np.array_equal(a_img[i], c_img[i])
    assert not all(np.array_equal(a_mask[i], c_mask[i]) for i in range(3))
    train, val = synthetic_split(tmp_path / "split", 3, 2, size=48, seed=7)
    assert (train, val) == (tmp_path / "split" / "train", tmp_path / "split" / "val")
    _, t_img, _ = read_all(train)
    _, v_img, _ = read_all(val)
    assert len(t_img) == 3 and len(v_img) == 2
    assert not np.array_equal(t_img[0], v_img[0]) and not np.array_equal(t_img[0], a_img[0])


def test_make_synthetic_speed(tmp_path):
    start = time.perf_counter()
    make_synthetic(tmp_path / "s", 64, num_classes=3, size=256)
    assert time.perf_counter() - start < 20


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(n_images=0), ValueError, r"n_images: expected an int >= 1, got 0"),
    (dict(num_classes=0), ValueError, r"num_classes: expected a positive int"),
    (dict(size=16), ValueError, r"size: expected an int >= 32, got 16"),
    (dict(seed=1.0), TypeError, r"seed: expected an int >= 0, got float"),
])
def test_make_synthetic_errors(tmp_path, kwargs, err, match):
    with pytest.raises(err, match=match):
        make_synthetic(tmp_path, **(dict(n_images=1) | kwargs))


def test_read_mask_ignore_index(tmp_path):
    """ignore_index: "auto" (255 ignored with two classes or more, none for binary), None
    (nothing ignored), or a value that is no class id (ignored, whatever the classes)."""
    a = np.array([[0, 1, 2], [254, 255, 0]], np.uint8)
    path = save(tmp_path / "m.png", a)
    with pytest.raises(ValueError, match=r"ids beyond num_classes=3: found 255 .*or 254 "
                                         r"for pixels to ignore"):
        read_mask(path, 3, ignore_index=254)  # 255 is then neither a class nor ignored
    b = a.copy()
    b[1, 1] = 0
    m = read_mask(save(tmp_path / "b.png", b), 3, ignore_index=254)
    assert m.tolist() == [[0, 1, 2], [IGNORE_INDEX, 0, 0]]
    c = a.copy()
    c[1, 0] = 1
    m = read_mask(save(tmp_path / "c.png", c), 3)  # auto: 255 ignored
    assert m.tolist() == [[0, 1, 2], [1, IGNORE_INDEX, 0]]
    with pytest.raises(ValueError, match=r"ids beyond num_classes=3: found 255 \(expected "
                                         r"ids in \[0, 3\); --ignore"):
        read_mask(save(tmp_path / "c.png", c), 3, ignore_index=None)
    # binary: 0/1 with 255 as the value to ignore
    d = np.array([[0, 1], [255, 1]], np.uint8)
    m = read_mask(save(tmp_path / "d.png", d), 1, ignore_index=255)
    assert m.tolist() == [[0, 1], [IGNORE_INDEX, 1]]
    with pytest.raises(ValueError, match="expected a binary mask"):  # auto: 0, 1 and 255
        read_mask(save(tmp_path / "d.png", d), 1)
    # 0/255-only masks with two classes: refused in auto, allowed when 255 is named
    e = np.array([[0, 255]], np.uint8)
    with pytest.raises(ValueError, match="255 is read as 'ignore'"):
        read_mask(save(tmp_path / "e.png", e), 2)
    assert read_mask(save(tmp_path / "e.png", e), 2, ignore_index=255).tolist() == \
        [[0, IGNORE_INDEX]]
    for bad, why in ((1, "is a class id"), (-1, "expected 'auto', None or a mask value"),
                     ("255", "expected 'auto', None or a mask value")):
        with pytest.raises(ValueError, match=why):
            read_mask(path, 3, ignore_index=bad)
        with pytest.raises(ValueError, match=why):
            SegmentationDataset(tmp_path, 3, ignore_index=bad)
