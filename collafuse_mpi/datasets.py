"""Datasets: digits, shapes, an npz file or an image folder, read as labels first and pixels on
demand (`_source`: labels and a fetch of any indices), so a rank decodes only the images its
clients own. Images are float32 [N, C, H, W] in [-1, 1]; labels int64 [N] (-1 = unlabelled).
"""
from __future__ import annotations

import os
import zipfile
import zlib

import numpy as np
from PIL import Image

from .config import DataConfig

SHAPES = ("disc", "square", "triangle", "ring", "cross")
N_SHAPES_IMAGES = 2000
SHAPES_SEED = 1234      # fixed: the shapes dataset is the same in every run
SUBSET_SEED = 0x5EED    # fixed: max_images keeps the same images on every rank and client
AUX_STREAM = 11         # the public-data carve's random stream, apart from the partition's
MIN_PER_CLIENT = 2      # one image to train on, one held out
NPZ_SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")


class DataError(ValueError):
    """A dataset that cannot be loaded or split: the message names the file and the problem."""


def _rng(*seeds: int) -> np.random.Generator:
    # masked to 64 bits: numpy refuses negative seeds, and the config allows any integer
    return np.random.default_rng([int(s) & 0xFFFFFFFFFFFFFFFF for s in seeds])


# ---- pixel conversion: everything passes through uint8 before scaling to [-1, 1] ----

def _to_float(u8: np.ndarray) -> np.ndarray:
    return u8.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _fit(im: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square (CelebA is 178x218), then bilinear resize to size x size."""
    w, h = im.size
    s = min(w, h)
    if w != h:
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return im if im.size == (size, size) else im.resize((size, size), Image.BILINEAR)


def _first(mask: np.ndarray) -> str:
    """Where the first True of an image array's mask is: 'image i, pixel (y, x)'."""
    at = np.unravel_index(int(np.argmax(mask.reshape(-1))), mask.shape)
    return f"image {at[0]}, pixel ({', '.join(map(str, at[1:]))})" if len(at) > 1 else f"value {at[0]}"


def _pixel_rule(a: np.ndarray, where: str):
    """How a numeric image array becomes uint8, decided on the whole array (a split, or one
    image file) so that every image converts the same whichever client loads it:
    floats in [0, 1] are x255, values already in 0..255 whole numbers are kept, integers beyond
    0..255 (16-bit scans) are min-max scaled. Non-finite values and other floats are refused:
    rescaling by an outlier would put every other pixel near black."""
    if a.dtype == np.uint8:
        return None
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise DataError(f"{where}: images have dtype {a.dtype}, expected numbers")
    if a.size == 0:
        return (0.0, 1.0)
    if np.issubdtype(a.dtype, np.floating):
        finite = np.isfinite(a)
        if not finite.all():
            bad = ~finite
            raise DataError(f"{where} has a non-finite value ({a.reshape(-1)[np.argmax(bad.reshape(-1))]}) "
                            f"at {_first(bad)}")
        lo, hi = float(a.min()), float(a.max())
        if 0 <= lo and hi <= 1:
            return (0.0, 1 / 255.0)
        if 0 <= lo and hi <= 255 and np.array_equal(a, np.round(a)):
            return (0.0, 1.0)  # 8-bit values stored as floats
        outside = (a < 0) | (a > 1)
        raise DataError(f"{where} has float values outside [0, 1]: {a.reshape(-1)[np.argmax(outside.reshape(-1))]:g} "
                        f"at {_first(outside)} (float images must lie in [0, 1], or be whole numbers in 0..255)")
    lo, hi = float(a.min()), float(a.max())
    if a.dtype == np.bool_:
        return (0.0, 1 / 255.0)
    if lo < 0 or hi > 255:
        return (lo, (hi - lo) / 255.0 if hi > lo else np.inf)
    return (0.0, 1.0)


def _array_to_u8(a: np.ndarray, where: str, rule="whole") -> np.ndarray:
    """Numeric array -> uint8 by `rule` (offset, step per level), by default decided on `a` itself."""
    if rule == "whole":
        rule = _pixel_rule(a, where)
    if rule is None:
        return a
    lo, step = rule
    return np.clip(np.round((a.astype(np.float64) - lo) / step), 0, 255).astype(np.uint8)


def _pil_to_u8(im: Image.Image, size: int, channels: int, where: str) -> np.ndarray:
    """Any PIL image -> uint8 [C, size, size]."""
    if im.mode in ("I", "F") or im.mode.startswith("I;"):  # 16-bit / float (MRI slices)
        im = Image.fromarray(_array_to_u8(np.asarray(im), where))
    elif im.mode == "P" or "transparency" in im.info:
        im = im.convert("RGBA")  # avoids Pillow's palette-transparency warning; alpha dropped next
    a = np.asarray(_fit(im.convert("L" if channels == 1 else "RGB"), size), dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _batch_to_u8(a: np.ndarray, size: int, channels: int, where: str, rule="whole") -> np.ndarray:
    """[N,H,W] or [N,H,W,1|3|4] -> uint8 [N, channels, size, size]."""
    a = _array_to_u8(a, where, rule)
    a = a[..., None] if a.ndim == 3 else a[..., :3]  # alpha dropped
    if a.shape[-1] != channels:
        if channels == 3:
            a = np.repeat(a, 3, axis=-1)
        else:  # ITU-R 601 luma with PIL's integer rounding, so npz and folder images agree
            w = a.astype(np.uint32)
            luma = (w[..., 0] * 19595 + w[..., 1] * 38470 + w[..., 2] * 7471 + 0x8000) >> 16
            a = luma[..., None].astype(np.uint8)
    if a.shape[1:3] != (size, size):
        a = np.stack([np.asarray(_fit(Image.fromarray(x[..., 0] if channels == 1 else x), size))
                      .reshape(size, size, channels) for x in a])
    return np.ascontiguousarray(a.transpose(0, 3, 1, 2))


# ---- sources: each returns (labels, fetch); fetch(indices) decodes only those images ----

def digits_table() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (images [1797, 8, 8] float, 0..16; labels): its own data file,
    read as load_digits reads it, without importing scikit-learn (seconds per rank at start-up)."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz") \
        if spec is not None and spec.origin else ""
    if os.path.isfile(path):
        with gzip.open(path, mode="rt", encoding="utf-8") as fh:
            data = np.loadtxt(fh, delimiter=",")
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits  # another layout: the loader itself
    d = load_digits()
    return d.images, d.target


def _digits(cfg: DataConfig):
    images, target = digits_table()
    imgs, side = images.astype(np.float32), (cfg.image_size, cfg.image_size)  # 8x8, 0..16

    def fetch(idx):
        out = np.stack([np.asarray(Image.fromarray(imgs[i]).resize(side, Image.BILINEAR))
                        for i in idx])
        out = np.clip(out / 8.0 - 1.0, -1.0, 1.0).astype(np.float32)[:, None]
        return np.repeat(out, cfg.channels, axis=1)
    return target.astype(np.int64), fetch


def _shape_mask(kind: int, x, y, cx, cy, r):
    dx, dy = abs(x - cx), y - cy
    if kind == 0:
        return dx * dx + dy * dy <= r * r
    if kind == 1:
        return np.maximum(dx, abs(dy)) <= 0.8 * r
    if kind == 2:  # upward equilateral triangle inscribed in the circle of radius r
        return (dy <= 0.5 * r) & (dy >= -r + np.sqrt(3.0) * dx)
    if kind == 3:
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    return ((dx <= 0.3 * r) & (abs(dy) <= r)) | ((abs(dy) <= 0.3 * r) & (dx <= r))


def _shapes(cfg: DataConfig):
    # All parameters drawn up front, so image i is the same whatever subset is rendered.
    rng, n, s, ss = _rng(SHAPES_SEED), N_SHAPES_IMAGES, cfg.image_size, 4  # ss: supersampling
    kinds = rng.integers(0, len(SHAPES), n)
    radius = rng.uniform(0.15, 0.35, n)
    cx, cy = rng.uniform(radius, 1 - radius), rng.uniform(radius, 1 - radius)
    colour = rng.uniform(0.3, 1.0, (n, 3))  # grayscale uses the first component as intensity
    x, y = np.meshgrid(*[(np.arange(s * ss) + 0.5) / (s * ss)] * 2)

    def fetch(idx):
        out = np.empty((len(idx), cfg.channels, s, s), np.float32)
        for j, i in enumerate(idx):
            mask = _shape_mask(kinds[i], x, y, cx[i], cy[i], radius[i])
            cover = mask.reshape(s, ss, s, ss).mean((1, 3))  # anti-aliased edges
            out[j] = -1.0 + 2.0 * cover[None] * colour[i, :cfg.channels, None, None]
        return out
    return kinds.astype(np.int64), fetch


def _open_npz(path: str):
    if not path:
        raise DataError("dataset npz needs data.path (a MedMNIST-style .npz file)")
    if not os.path.exists(path):
        raise DataError(f"npz file {path} does not exist")
    if os.path.isdir(path):
        raise DataError(f"{path} is a folder, not an .npz file (use dataset folder for folders)")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not a readable .npz file "
                        f"({type(exc).__name__}: {exc})") from None
    if not hasattr(z, "files"):
        raise DataError(f"{path} holds a single .npy array, not an .npz archive (train_images ...)")
    return z


def _member(z, key: str, path: str) -> np.ndarray:
    try:
        return z[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{path}: cannot read {key} ({type(exc).__name__}: {exc})") from None


def _npy_shape(zf: zipfile.ZipFile, key: str) -> tuple:
    with zf.open(key + ".npy") as fh:
        version = np.lib.format.read_magic(fh)
        fmt = np.lib.format
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        return read(fh)[0]


def _npz(cfg: DataConfig):
    path = cfg.path
    with _open_npz(path) as z:
        keys = [(f"{s}_images", f"{s}_labels") for s in NPZ_SPLITS if f"{s}_images" in z.files]
        keys = keys or ([("images", "labels")] if "images" in z.files else [])
        if not keys:
            raise DataError(f"{path} has none of the keys train_images, val_images, test_images, "
                            f"images (found: {', '.join(z.files) or 'nothing'})")
        try:  # shapes from the .npy headers: indexing and counting decompress no pixels
            with zipfile.ZipFile(path) as zf:
                shapes = [_npy_shape(zf, k) for k, _ in keys]
        except Exception:  # odd or damaged header: loading the array names the problem
            shapes = [_member(z, k, path).shape for k, _ in keys]
        parts, labels, start = [], [], 0
        for (img_key, lab_key), shape in zip(keys, shapes):
            if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3, 4)):
                raise DataError(f"{path}: {img_key} has shape {shape}; "
                                "expected [N,H,W] or [N,H,W,3]")
            n = shape[0]
            lab = _member(z, lab_key, path) if lab_key in z.files else np.full(n, -1)
            if not (np.issubdtype(lab.dtype, np.number) or lab.dtype == np.bool_):
                raise DataError(f"{path}: {lab_key} holds {lab.dtype} values, not integer class ids")
            whole = np.isfinite(lab).all() and np.array_equal(lab, np.round(lab))
            if np.issubdtype(lab.dtype, np.floating) and not whole:
                raise DataError(f"{path}: {lab_key} holds float values that are not whole numbers, not class ids")
            if lab.shape[:1] != (n,):
                raise DataError(f"{path}: {lab_key} has shape {lab.shape} but {img_key} has {n}")
            # [N,1] class ids -> [N]; multi-label [N,K] (ChestMNIST) has no single class -> -1
            lab = lab if lab.ndim == 1 else lab[:, 0] if lab.shape[1:] == (1,) else np.full(n, -1)
            labels.append(lab.astype(np.int64))
            parts.append((img_key, start, n))
            start += n
    if start == 0:
        raise DataError(f"{path} contains no images")

    def fetch(idx):
        out = np.empty((len(idx), cfg.channels, cfg.image_size, cfg.image_size), np.uint8)
        with _open_npz(path) as z:
            for key, first, n in parts:  # one split in memory at a time
                sel = np.nonzero((idx >= first) & (idx < first + n))[0]
                if sel.size:
                    where, whole = f"{path}: {key}", _member(z, key, path)
                    out[sel] = _batch_to_u8(whole[idx[sel] - first], cfg.image_size, cfg.channels, where,
                                            _pixel_rule(whole, where))
        return _to_float(out)
    return np.concatenate(labels), fetch


def _folder_files(path: str) -> tuple[list[str], np.ndarray]:
    if not path:
        raise DataError("dataset folder needs data.path (a folder of PNG/JPG images)")
    if not os.path.isdir(path):
        why = "is a file, not a folder" if os.path.exists(path) else "does not exist"
        raise DataError(f"image folder {path} {why}")
    files, tops = [], []
    for dirpath, dirnames, names in os.walk(path):
        dirnames.sort()
        rel = os.path.relpath(dirpath, path)
        for name in sorted(names):
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTS):  # skips ._x.jpg
                files.append(os.path.join(dirpath, name))
                tops.append(None if rel == "." else rel.split(os.sep)[0])
    if not files:
        raise DataError(f"image folder {path} has no .png/.jpg/.jpeg images")
    classes = {t: k for k, t in enumerate(sorted({t for t in tops if t is not None}))}
    return files, np.array([classes.get(t, -1) for t in tops], np.int64)


def _folder(cfg: DataConfig):
    files, labels = _folder_files(cfg.path)
    mode, side = ("L" if cfg.channels == 1 else "RGB"), (cfg.image_size, cfg.image_size)

    def fetch(idx):
        out = np.empty((len(idx), cfg.channels) + side, np.uint8)
        for j, i in enumerate(idx):
            try:
                with Image.open(files[i]) as im:
                    im.draft(mode, side)  # JPEG: decode at reduced scale, much faster for CelebA
                    out[j] = _pil_to_u8(im, cfg.image_size, cfg.channels, files[i])
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                raise DataError(f"cannot read image {files[i]} "
                                f"({type(exc).__name__}: {exc})") from None
        return _to_float(out)
    return labels, fetch


def _source(cfg: DataConfig):
    """(labels, fetch) after max_images; fetch takes indices into those labels."""
    loaders = {"digits": _digits, "shapes": _shapes, "npz": _npz, "folder": _folder}
    if cfg.dataset not in loaders:
        raise DataError(f"unknown dataset {cfg.dataset!r}; choose {', '.join(loaders)}")
    if cfg.channels not in (1, 3):
        raise DataError(f"data.channels must be 1 or 3, got {cfg.channels!r}")
    labels, fetch = loaders[cfg.dataset](cfg)
    keep = np.arange(len(labels))
    if 0 < cfg.max_images < len(labels):  # a fixed-seed random subset, kept in original order
        keep = np.sort(_rng(SUBSET_SEED).permutation(len(labels))[:cfg.max_images])
    return labels[keep], lambda idx: fetch(keep[np.asarray(idx, np.int64)])


def load_images(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """All images (after max_images) as float32 [N, C, S, S] in [-1, 1], and int64 labels [N]."""
    labels, fetch = _source(cfg)
    return fetch(np.arange(len(labels))), labels


def count_images(cfg: DataConfig) -> int:
    """What load_images would return (after max_images), decoding no pixels: a folder is only
    listed, an npz only has its .npy headers and label arrays read."""
    return len(_source(cfg)[0])
