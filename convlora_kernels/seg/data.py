"""Datasets for prompt-free semantic segmentation: image/mask pairs from a folder, a CSV
file or a list, resized and padded for SAM, with training augmentation.

    read_image(path)                    (3, H, W) float32 RGB in 0-255
    read_mask(path, num_classes, ignore_index)  (H, W) int64 class ids, checked against
                                        num_classes; ignored pixels IGNORE_INDEX
    folder_pairs(root)                  root/images/<name>.<ext> with root/masks/<name>.png
    csv_pairs(path)                     a CSV file with columns ``image`` and ``mask``
    SegmentationDataset(source, ...)    items {"image", "mask", "name", "index", "valid",
                                        "original_size"}
    collate(batch)                      the DataLoader's collate_fn for those items

Masks hold one class id per pixel. ``num_classes == 1`` is binary segmentation: the mask is
0 (background) or 1 (foreground), stored as 0/1 or 0/255. ``num_classes >= 2`` counts every
class, background (id 0) included. Pixels that are not part of the image (the padding up to
the square size) get the mask value IGNORE_INDEX, which losses and metrics skip.

Pillow and numpy are needed here and in synthetic.py (nowhere else in convlora_kernels); they
are imported when first used.
"""

from __future__ import annotations

import csv
import math
import operator
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE_INDEX", "IMAGE_EXTENSIONS", "SegmentationDataset", "collate", "csv_pairs",
    "folder_pairs", "read_image", "read_mask",
]

# The mask value of pixels outside the image (padding); binary masks are 0/1 once read, and
# SegmentationDataset takes at most 255 classes, so no class has this id.
IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_EXTENSION = ".png"
# How many names / values an error message lists before "...".
_SHOW = 5

PathLike = Union[str, "os.PathLike[str]"]
Pair = Tuple[Path, Path]


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow is installed with torchvision
        raise ImportError("convlora_kernels.seg.data needs Pillow to read and write images "
                          "(pip install pillow)") from e
    return Image


def _np():
    try:
        import numpy
    except ImportError as e:  # pragma: no cover
        raise ImportError("convlora_kernels.seg.data needs numpy (pip install numpy)") from e
    return numpy


def _few(items: Sequence, n: int = _SHOW) -> str:
    """The first n items, comma-separated, with '...' and the count when there are more."""
    items = [str(x) for x in items]
    if len(items) <= n:
        return ", ".join(items)
    return ", ".join(items[:n]) + f", ... ({len(items)} in all)"


def _describe(x) -> str:
    return f"{type(x).__name__} {x!r}"


# --- Reading one file -----------------------------------------------------------------

def _open(path: PathLike, what: str):
    """The decoded Pillow image at path (first frame); what names the expected content."""
    Image = _pil()
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file (expected {what})")
    if p.is_dir():
        raise IsADirectoryError(f"{p}: is a folder (expected {what})")
    try:
        img = Image.open(p)
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{p}: not an image Pillow can read (expected {what}; "
                         f"{type(e).__name__}: {e})") from None
    return img


def read_image(path: PathLike) -> torch.Tensor:
    """The image at path as a (3, H, W) float32 RGB tensor with values in 0-255.

    Grayscale, palette and CMYK images are converted to RGB, an alpha channel is dropped,
    16-bit grayscale is scaled to 0-255. Pixels are taken as stored: an EXIF orientation is
    not applied, so the image keeps the frame of a mask drawn on the same pixels.
    """
    np = _np()
    img = _open(path, "an RGB or grayscale image")
    if img.mode.startswith("I;16"):
        a = np.asarray(img).astype(np.float32) * (255.0 / 65535.0)
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif img.mode in ("I", "F"):
        raise ValueError(f"{path}: expected an image with 8-bit channels (or 16-bit "
                         f"grayscale), got Pillow mode {img.mode!r} (32-bit values)")
    else:
        try:
            rgb = img.convert("RGB")
        except (ValueError, OSError) as e:
            raise ValueError(f"{path}: expected an image Pillow can convert to RGB, got Pillow "
                             f"mode {img.mode!r} ({e})") from None
        a = np.asarray(rgb, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def _check_ignore_index(ignore_index, num_classes: int) -> None:
    if ignore_index in ("auto", None):
        return
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) \
            or not 0 <= ignore_index <= 65535:
        raise ValueError(f"ignore_index: expected 'auto', None or a mask value in [0, 65535], "
                         f"got {_describe(ignore_index)}")
    if ignore_index < max(2, num_classes):
        raise ValueError(f"ignore_index: {ignore_index} is a class id with "
                         f"num_classes={num_classes} (ids 0 to {max(2, num_classes) - 1}); "
                         f"the value to ignore must be none of them")


def read_mask(path: PathLike, num_classes: int, ignore_index="auto") -> torch.Tensor:
    """The mask at path as an (H, W) int64 tensor of class ids, IGNORE_INDEX where a pixel
    is ignored.

    The file holds one value per pixel: a grayscale image (8- or 16-bit), or a palette
    image whose palette indices are the ids. An RGB(A) mask is accepted only when its three
    channels are equal; alpha channels are ignored.

    ignore_index, the value in the file that marks pixels to ignore:
    "auto" (default): none for binary masks; 255 (IGNORE_INDEX, as in VOC-style masks)
    when num_classes >= 2, where a mask of only 0 and 255 is refused (a binary mask saved
    as 0/255 would train no foreground at all). None: no value is ignored. An int v (not a
    class id): pixels of value v are ignored, whatever the number of classes.

    num_classes == 1 (binary): values {0, 1} or {0, 255}; 255 becomes 1.
    num_classes >= 2: ids in [0, num_classes).
    Anything else raises ValueError naming the file and the values found.
    """
    np = _np()
    _check_num_classes(num_classes)
    _check_ignore_index(ignore_index, num_classes)
    img = _open(path, "a mask: a grayscale or palette PNG of class ids")
    mode = img.mode
    if mode in ("1", "L", "P", "I") or mode.startswith("I;16"):
        a = np.asarray(img)
    elif mode in ("LA", "PA", "La"):
        a = np.asarray(img)[:, :, 0]
    elif mode in ("RGB", "RGBA", "RGBX", "RGBa"):
        rgb = np.asarray(img)[:, :, :3]
        differ = (rgb[:, :, 0] != rgb[:, :, 1]) | (rgb[:, :, 0] != rgb[:, :, 2])
        if differ.any():
            r, c = (int(v) for v in np.argwhere(differ)[0])
            raise ValueError(
                f"{path}: expected a single-channel mask of class ids (grayscale or palette "
                f"PNG), got an {mode} image whose channels differ (at row {r}, column {c}: "
                f"{tuple(int(v) for v in rgb[r, c])}); save the ids as a grayscale image")
        a = rgb[:, :, 0]
    else:
        raise ValueError(f"{path}: expected a single-channel mask of class ids (grayscale or "
                         f"palette PNG), got Pillow mode {mode!r}")
    a = a.astype(np.int64)
    skip = None
    if isinstance(ignore_index, int):
        skip = a == ignore_index
        a = np.where(skip, 0, a)  # checked as background, ignored below
    values = np.unique(a)
    if num_classes == 1:
        if set(values.tolist()) <= {0, 1}:
            pass
        elif set(values.tolist()) <= {0, 255}:
            a = (a == 255).astype(np.int64)
        else:
            raise ValueError(f"{path}: expected a binary mask (num_classes=1) with values "
                             f"{{0, 1}} or {{0, 255}}, found values {_few(values.tolist())}")
    else:
        auto = ignore_index == "auto"
        if auto and IGNORE_INDEX in values.tolist() and set(values.tolist()) <= {0, IGNORE_INDEX}:
            raise ValueError(
                f"{path}: values {{0, {IGNORE_INDEX}}} with num_classes={num_classes}: "
                f"{IGNORE_INDEX} is read as 'ignore' (VOC style), so nothing in this mask "
                f"would be learned as foreground. A binary mask saved as 0/255 takes "
                f"--num-classes 1; with {num_classes} classes save the foreground as ids 1 to "
                f"{num_classes - 1} (and {IGNORE_INDEX} only for pixels to ignore)")
        ignored = (values == IGNORE_INDEX) & (num_classes < IGNORE_INDEX) & auto
        bad = values[((values < 0) | (values >= num_classes)) & ~ignored]
        if bad.size:
            marks = {"auto": f", or {IGNORE_INDEX} for pixels to ignore", None: ""}.get(
                ignore_index, f", or {ignore_index} for pixels to ignore")
            raise ValueError(f"{path}: ids beyond num_classes={num_classes}: found "
                             f"{_few(bad.tolist())} (expected ids in [0, {num_classes})"
                             f"{marks}; --ignore-index names another value to ignore)")
    if skip is not None:
        a = np.where(skip, IGNORE_INDEX, a)
    return torch.from_numpy(a)


# --- Listing pairs --------------------------------------------------------------------

_LAYOUT = ("root/images/<name>.<ext> with root/masks/<name>.png (ext one of "
           + " ".join(IMAGE_EXTENSIONS) + ")")


def folder_pairs(root: PathLike) -> List[Pair]:
    """(image path, mask path) for every image of root/images, sorted by name.

    Layout: root/images/<name>.<ext> (ext one of IMAGE_EXTENSIONS, any case) and
    root/masks/<name>.png. Other files and hidden files are not listed. Every image needs
    its mask and every mask its image; two images of one name (a.png, a.jpg) are an error.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such folder (expected a dataset folder: {_LAYOUT})")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: is a file (expected a dataset folder: {_LAYOUT})")
    for sub in ("images", "masks"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root}: no {sub}/ folder in it (expected {_LAYOUT})")

    def files(sub: str, exts: Tuple[str, ...]) -> Dict[str, List[Path]]:
        out: Dict[str, List[Path]] = {}
        for p in (root / sub).iterdir():
            if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in exts:
                continue
            out.setdefault(p.stem, []).append(p)
        return out

    images = files("images", IMAGE_EXTENSIONS)
    masks = files("masks", (MASK_EXTENSION,))
    if not images:
        raise ValueError(f"{root / 'images'}: no images in it (expected files ending in "
                         f"{', '.join(IMAGE_EXTENSIONS)})")
    for kind, found in (("images", images), ("masks", masks)):
        twice = sorted(s for s, ps in found.items() if len(ps) > 1)
        if twice:
            shown = _few(["/".join(sorted(p.name for p in found[s])) for s in twice])
            raise ValueError(f"{root / kind}: {len(twice)} name(s) used by more than one file "
                             f"(expected one file per name): {shown}")
    no_mask = sorted(set(images) - set(masks))
    if no_mask:
        raise ValueError(f"{root}: {len(no_mask)} image(s) have no mask (expected "
                         f"masks/<name>.png for each): {_few(no_mask)}")
    no_image = sorted(set(masks) - set(images))
    if no_image:
        raise ValueError(f"{root}: {len(no_image)} mask(s) have no image (expected "
                         f"images/<name>.<ext> for each; misnamed files?): {_few(no_image)}")
    return [(images[s][0], masks[s][0]) for s in sorted(images)]


def csv_pairs(path: PathLike) -> List[Pair]:
    """(image path, mask path) for each row of a CSV file, in file order.

    The header names the columns; ``image`` and ``mask`` are read and others ignored.
    Relative paths are resolved against the CSV file's folder. Errors name the row as a
    spreadsheet numbers it (the header is row 1).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (expected a CSV file with columns "
                                f"'image' and 'mask')")
    if not path.is_file():
        raise IsADirectoryError(f"{path}: is a folder (expected a CSV file with columns "
                                f"'image' and 'mask')")
    base = path.parent
    pairs: List[Pair] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: the file is empty (expected a header with columns "
                             f"'image' and 'mask', then one row per pair)")
        names = [h.strip() for h in header]
        missing = [c for c in ("image", "mask") if c not in names]
        if missing:
            raise ValueError(f"{path}: no column {' or '.join(repr(c) for c in missing)} "
                             f"(expected a header with columns 'image' and 'mask', found "
                             f"columns {names})")
        col = {c: names.index(c) for c in ("image", "mask")}
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                raise ValueError(f"{path}, row {line}: empty row (expected an image path "
                                 f"and a mask path)")
            got = []
            for c in ("image", "mask"):
                cell = row[col[c]].strip() if col[c] < len(row) else ""
                if not cell:
                    raise ValueError(f"{path}, row {line}: the {c} column is empty "
                                     f"(expected a path)")
                p = Path(os.path.expanduser(cell))
                p = p if p.is_absolute() else base / p
                if not p.is_file():
                    raise FileNotFoundError(f"{path}, row {line}: {c} file {p} does not exist")
                got.append(p)
            pairs.append((got[0], got[1]))
    if not pairs:
        raise ValueError(f"{path}: no rows after the header (expected one row per "
                         f"image/mask pair)")
    return pairs


def _pairs_of(source) -> List[Pair]:
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            return folder_pairs(p)
        if p.is_file():
            if p.suffix.lower() != ".csv":
                raise ValueError(f"source: expected a dataset folder, a .csv file or a list "
                                 f"of (image, mask) pairs, got the file {p}")
            return csv_pairs(p)
        raise FileNotFoundError(f"source: {p} does not exist (expected a dataset folder "
                                f"or a .csv file)")
    if not isinstance(source, (list, tuple)):
        raise TypeError(f"source: expected a dataset folder, a .csv file or a list of "
                        f"(image, mask) pairs, got {_describe(source)}")
    if not source:
        raise ValueError("source: expected at least one (image, mask) pair, got an empty "
                         "list")
    pairs: List[Pair] = []
    for i, pair in enumerate(source):
        if (isinstance(pair, (str, bytes, os.PathLike)) or not isinstance(pair, Sequence)
                or len(pair) != 2
                or not all(isinstance(q, (str, os.PathLike)) for q in pair)):
            raise TypeError(f"source[{i}]: expected an (image, mask) pair of paths, got "
                            f"{_describe(pair)}")
        img, mask = Path(pair[0]), Path(pair[1])
        for what, q in (("image", img), ("mask", mask)):
            if not q.is_file():
                raise FileNotFoundError(f"source[{i}]: {what} file {q} does not exist")
        pairs.append((img, mask))
    return pairs


# --- The dataset ----------------------------------------------------------------------

def _check_num_classes(num_classes) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes: expected a positive int (1 for binary masks), got "
                        f"{_describe(num_classes)}")
    if num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int (1 for binary masks), got "
                         f"{num_classes}")


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _fit(h: int, w: int, longest: int) -> Tuple[int, int]:
    """(h, w) scaled so that the longer side is longest, rounded half up, at least 1."""
    s = longest / max(h, w)
    return max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))


def _resize(image: torch.Tensor, mask: torch.Tensor, hw: Tuple[int, int]):
    """Image bilinear (antialiased when shrinking), mask nearest; unchanged at equal size."""
    if tuple(image.shape[1:]) == tuple(hw):
        return image, mask
    image = F.interpolate(image[None], size=hw, mode="bilinear", align_corners=False,
                          antialias=True)[0].clamp_(0, 255)
    # "nearest-exact" samples each output pixel's centre, as the bilinear image does
    # ("nearest" shifts by up to a pixel when shrinking).
    mask = F.interpolate(mask[None, None].float(), size=hw, mode="nearest-exact")[0, 0].long()
    return image, mask


def _seed_of(*ints: int) -> int:
    """A 63-bit seed that mixes ints (non-negative) well and does not depend on Python's
    hash randomisation."""
    np = _np()
    lo, hi = np.random.SeedSequence(list(ints)).generate_state(2, dtype=np.uint32)
    return (int(hi) << 31) ^ int(lo)


class SegmentationDataset(torch.utils.data.Dataset):
    """Image/mask pairs as tensors for semantic segmentation.

    source: a dataset folder (see folder_pairs), a .csv file (see csv_pairs) or a list of
    (image path, mask path) pairs. Files are read when an item is asked for.

    Item i is a dict:
        image          (3, S, S) float32 RGB in 0-255 (not normalised)
        mask           (S, S) int64 class ids, IGNORE_INDEX on the padding
        name           the image file's name without extension
        index          i, the item's index in the dataset (what seeds its randomness)
        valid          (h, w): the size of the image content at the top left, before padding
        original_size  (H, W) of the file

    ignore_index: the mask value of pixels to ignore, as read_mask takes it ("auto": 255
    with two classes or more); those pixels become IGNORE_INDEX.

    size=S resizes the image so that its longer side is S (bilinear with antialiasing; the
    mask nearest) and pads it at the bottom and right to S x S (image 0, mask IGNORE_INDEX).
    size=None keeps the file's size; the images of one batch must then share it.

    train=True adds, per item: a horizontal flip with probability hflip, then a scale
    jitter: the content is resized by a factor f drawn uniformly from scale (its longer side
    becomes round(S * f)), cropped at a random place to S where it is larger and padded to
    S where smaller. Image and mask share the geometry. With size=None the frame is the
    file's (H, W) and f scales the file's own size.

    Randomness: item i of epoch e draws from a torch.Generator seeded with (seed, e, i), so
    an item is the same whichever worker or order loads it, and changes with the epoch;
    call set_epoch(e) before each epoch. DataLoader workers copy the dataset when they
    start: with persistent_workers=True they keep the epoch they started with. train=False
    is deterministic and draws nothing.
    """

    def __init__(self, source, num_classes: int, size: Optional[int] = None,
                 train: bool = False, hflip: float = 0.5,
                 scale: Tuple[float, float] = (0.75, 1.25), seed: int = 0,
                 ignore_index="auto"):
        _check_num_classes(num_classes)
        _check_ignore_index(ignore_index, num_classes)
        if num_classes > IGNORE_INDEX:
            raise ValueError(f"num_classes: expected at most {IGNORE_INDEX} classes "
                             f"(id {IGNORE_INDEX} is IGNORE_INDEX, the padding), got "
                             f"{num_classes}")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int)):
            raise TypeError(f"size: expected a positive int (the square side) or None, got "
                            f"{_describe(size)}")
        if size is not None and size < 1:
            raise ValueError(f"size: expected a positive int (the square side) or None, got "
                             f"{size}")
        if not isinstance(train, bool):
            raise TypeError(f"train: expected a bool, got {_describe(train)}")
        if not _is_real(hflip):
            raise TypeError(f"hflip: expected a probability in [0, 1], got {_describe(hflip)}")
        if not 0 <= hflip <= 1:
            raise ValueError(f"hflip: expected a probability in [0, 1], got {hflip}")
        if (isinstance(scale, (str, bytes)) or not isinstance(scale, Sequence)
                or len(scale) != 2 or not all(_is_real(v) for v in scale)):
            raise TypeError(f"scale: expected a pair (lo, hi) of numbers with 0 < lo <= hi, "
                            f"got {_describe(scale)}")
        if not (0 < scale[0] <= scale[1] and math.isfinite(scale[1])):
            raise ValueError(f"scale: expected a pair (lo, hi) with 0 < lo <= hi (finite), got "
                             f"{tuple(scale)}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected a non-negative int, got {_describe(seed)}")
        if seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed}")
        self.pairs: List[Pair] = _pairs_of(source)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.size = size
        self.train = train
        self.hflip = float(hflip)
        self.scale = (float(scale[0]), float(scale[1]))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch that, with seed and the item's index, seeds the item's augmentation."""
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise TypeError(f"epoch: expected a non-negative int, got {_describe(epoch)}")
        if epoch < 0:
            raise ValueError(f"epoch: expected a non-negative int, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} pairs, num_classes={self.num_classes}, "
                f"size={self.size}, train={self.train})")

    def load(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Item i's image and mask as read, checked to be of one size."""
        img_path, mask_path = self.pairs[i]
        image = read_image(img_path)
        mask = read_mask(mask_path, self.num_classes, self.ignore_index)
        if tuple(image.shape[1:]) != tuple(mask.shape):
            raise ValueError(f"size mismatch: image {img_path} is (H, W) = "
                             f"{tuple(image.shape[1:])} but mask {mask_path} is "
                             f"{tuple(mask.shape)} (expected the same size)")
        return image, mask

    def __getitem__(self, i: int) -> dict:
        n = len(self.pairs)
        try:
            i = operator.index(i)
        except TypeError:
            raise TypeError(f"index: expected an int, got {_describe(i)}") from None
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} items")
        i %= n
        image, mask = self.load(i)
        H, W = int(image.shape[1]), int(image.shape[2])
        frame = (H, W) if self.size is None else (self.size, self.size)
        if not self.train:
            if self.size is not None:
                image, mask = _resize(image, mask, _fit(H, W, self.size))
            valid = (int(image.shape[1]), int(image.shape[2]))
        else:
            g = torch.Generator().manual_seed(_seed_of(self.seed, self.epoch, i))
            u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
            if u[0] < self.hflip:
                image, mask = image.flip(-1), mask.flip(-1)
            lo, hi = self.scale
            f = lo + u[1] * (hi - lo)
            longest = max(1, int(max(frame) * f + 0.5))
            image, mask = _resize(image, mask, _fit(H, W, longest))
            h, w = int(image.shape[1]), int(image.shape[2])
            top = min(int(u[2] * (h - frame[0] + 1)), h - frame[0]) if h > frame[0] else 0
            left = min(int(u[3] * (w - frame[1] + 1)), w - frame[1]) if w > frame[1] else 0
            image = image[:, top:top + frame[0], left:left + frame[1]]
            mask = mask[top:top + frame[0], left:left + frame[1]]
            valid = (int(image.shape[1]), int(image.shape[2]))
        ph, pw = frame[0] - valid[0], frame[1] - valid[1]
        if ph or pw:
            image = F.pad(image, (0, pw, 0, ph), value=0.0)
            mask = F.pad(mask, (0, pw, 0, ph), value=IGNORE_INDEX)
        return {"image": image.contiguous(), "mask": mask.contiguous(),
                "name": self.pairs[i][0].stem, "index": i, "valid": valid,
                "original_size": (H, W)}


def check_data(datasets: Sequence["SegmentationDataset"], progress: bool = False,
               threads: Optional[int] = None, limit: int = 20) -> int:
    """Reads every image and mask of ``datasets`` (in a thread pool, Pillow decoding
    outside the GIL) as training will: the files decode whole, the masks hold the classes
    their dataset's num_classes allows, each image and its mask share a size. Returns the
    number of pairs checked; raises one ValueError listing every pair that fails (the
    first ``limit`` of them, and how many more), so bad data is found before the first step
    rather than at the step that reads it."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(ds, i) for ds in datasets for i in range(len(ds))]

    def check(job) -> Optional[str]:
        ds, i = job
        try:
            ds.load(i)
        except (ValueError, OSError) as e:
            return str(e)
        return None

    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(jobs), unit="pair", desc="checking data", dynamic_ncols=True)
        except ImportError:
            bar = None
    problems: List[str] = []
    workers = threads or min(8, (os.cpu_count() or 1) + 1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for why in pool.map(check, jobs):
                if why is not None:
                    problems.append(why)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if problems:
        shown = "\n  ".join(problems[:limit])
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        raise ValueError(f"{len(problems)} of {len(jobs)} image/mask pairs cannot be used "
                         f"(fix or remove them; nothing was trained):\n  {shown}{more}")
    return len(jobs)


def collate(batch: Sequence[dict]) -> dict:
    """SegmentationDataset items -> one dict: "image" (B, 3, S, S) and "mask" (B, S, S)
    stacked, "name", "index", "valid" and "original_size" as lists. For DataLoader(collate_fn=...)."""
    if not batch:
        raise ValueError("batch: expected at least one item, got none")
    shapes = {tuple(b["image"].shape) for b in batch}
    if len(shapes) > 1:
        first = batch[0]
        other = next(b for b in batch if tuple(b["image"].shape) != tuple(first["image"].shape))
        raise ValueError(f"batch: images of one batch must share a size, got "
                         f"{tuple(first['image'].shape)} for {first['name']!r} and "
                         f"{tuple(other['image'].shape)} for {other['name']!r} (pass size= "
                         f"to SegmentationDataset to resize them to one square size)")
    return {"image": torch.stack([b["image"] for b in batch]),
            "mask": torch.stack([b["mask"] for b in batch]),
            "name": [b["name"] for b in batch],
            "index": [b["index"] for b in batch],
            "valid": [b["valid"] for b in batch],
            "original_size": [b["original_size"] for b in batch]}
