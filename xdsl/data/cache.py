"""Image files decoded once into a validated uint8 cache file, so an epoch never decodes a JPEG.

Any dataset whose samples are image files of one output size can use it:

    images = cached_images(paths, (64, 64), cache_file(root, "train", (64, 64), cache_dir), notes)
    # -> uint8 tensor (N, 3, 64, 64) read from the cache file, row i = paths[i]

The file holds a magic line, a JSON header and the raw pixels. The header records the shape, a SHA-256
of the pixels, and a fingerprint of the sources (every path with its size and modification time). The
cache is used only if all of it checks out: right magic and version, the shape asked for, the payload
length, the checksum, the same sources, and a file at least as new as the newest image. Anything else
(truncated, corrupt, stale, another size) is reported in `notes` and the cache is rebuilt; it is never
trusted. Writes go to a temporary file renamed into place, so a crash or a concurrent process (one per
DDP rank) never leaves a half-written cache under the real name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from xdsl.errors import XdslError

__all__ = ["CACHE_VERSION", "cache_file", "cached_images", "decode_cropped", "decode_image", "decode_native",
           "fit_cropped", "read_cache"]

CACHE_VERSION = 1
MAGIC = b"XDSL-UINT8-IMAGES\n"
_ALIGN = 64  # pixels start at a multiple of this (so the file can be memory-mapped by other tools)
_CHUNK = 1 << 24


def decode_native(path: str, size: tuple[int, int] | None = None) -> Tensor:
    """One image file as uint8 (3, H, W) RGB at its own size (grayscale and palette images become RGB);
    `size` is ignored (it makes this a decoder like the others, see `images.ImageFiles`)."""
    # PIL rather than torchvision.io, whose decoders are deprecated since torchvision 0.29.
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.v2 import functional as F

    try:
        with Image.open(path) as pil:
            return F.pil_to_tensor(pil.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise XdslError(f"cannot decode image {path}: {e}") from None


def decode_image(path: str, size: tuple[int, int]) -> Tensor:
    """One image file as uint8 (3, H, W) RGB, resized (antialiased) to `size` if it is another size."""
    from torchvision.transforms.v2 import functional as F

    img = decode_native(path)
    if tuple(img.shape[-2:]) != tuple(size):
        img = F.resize(img, list(size), antialias=True)
    return img


def decode_cropped(path: str, size: tuple[int, int], inner: int | None = None) -> Tensor:
    """One image file as uint8 (3, H, W) RGB: shorter side resized to fit `size`, then centre-cropped to it
    (torchvision's Resize(int) + CenterCrop: the aspect ratio is kept, the margins of the long side go).

    With `inner`, the crop is placed (within a pixel of the centre) so that a later CenterCrop(inner) of
    it is exactly torchvision's Resize(size) + CenterCrop(inner) of the file (centre offsets round twice).
    """
    return fit_cropped(decode_native(path), size, inner)


def fit_cropped(img: Tensor, size: tuple[int, int], inner: int | None = None) -> Tensor:
    """A uint8 (C, H, W) image resized and centre-cropped to `size` as `decode_cropped` does to a file."""
    from torchvision.transforms.v2 import functional as F

    if tuple(img.shape[-2:]) == tuple(size):
        return img
    h, w = img.shape[-2:]
    if size[0] == size[1]:  # exactly torchvision's Resize(int) rule for the long side
        img = F.resize(img, [size[0]], antialias=True)
    else:
        scale = max(size[0] / h, size[1] / w)
        img = F.resize(img, [max(size[0], round(h * scale)), max(size[1], round(w * scale))], antialias=True)
    if inner is None:
        return F.center_crop(img, list(size))
    h, w = img.shape[-2:]
    top = int(round((h - inner) / 2.0)) - int(round((size[0] - inner) / 2.0))
    left = int(round((w - inner) / 2.0)) - int(round((size[1] - inner) / 2.0))
    return F.crop(img, min(max(top, 0), h - size[0]), min(max(left, 0), w - size[1]), size[0], size[1])


def cache_file(root: Path, split: str, size: tuple[int, int], cache_dir: Path | None = None) -> Path:
    """Where the cache of `split` at `size` lives: `<root>/.xdsl-cache/` unless `cache_dir` is given."""
    directory = Path(cache_dir) if cache_dir is not None else Path(root) / ".xdsl-cache"
    return directory / f"{split}-{size[0]}x{size[1]}.u8"


def _fingerprint(paths: Sequence[str]) -> tuple[str, int]:
    """A digest of every source's path, size and mtime, and the newest mtime (ns)."""
    digest = hashlib.sha256()
    newest = 0
    for p in paths:
        st = os.stat(p)
        newest = max(newest, st.st_mtime_ns)
        digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest(), newest


def _checksum(buffer: np.ndarray) -> str:
    digest = hashlib.sha256()
    flat = buffer.reshape(-1)
    for start in range(0, flat.size, _CHUNK):
        digest.update(memoryview(flat[start:start + _CHUNK]))
    return digest.hexdigest()


def read_cache(path: Path, shape: tuple[int, ...], sources: str, newest_ns: int) -> tuple[Tensor | None, str]:
    """The cached pixels if every check passes, else (None, why not)."""
    try:
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                return None, "not an xdsl image cache"
            header = json.loads(f.readline(1 << 16))
            offset = f.tell()
        offset += -offset % _ALIGN
        if header.get("version") != CACHE_VERSION:
            return None, f"cache version {header.get('version')}, expected {CACHE_VERSION}"
        if tuple(header.get("shape", ())) != tuple(shape):
            return None, f"it holds shape {header.get('shape')}, expected {list(shape)}"
        if header.get("sources") != sources:
            return None, "the image files changed since it was written"
        if os.stat(path).st_mtime_ns < newest_ns:
            return None, "an image is newer than the cache"
        if os.path.getsize(path) != offset + int(np.prod(shape)):
            return None, "its size does not match its header (truncated?)"
        # read into memory rather than memory-map: the bytes checked are the bytes used, even if the
        # file is overwritten in place later
        pixels = np.fromfile(path, dtype=np.uint8, offset=offset).reshape(shape)
        if _checksum(pixels) != header.get("sha256"):
            return None, "checksum mismatch (corrupt)"
    except (OSError, ValueError, UnicodeDecodeError, AttributeError, TypeError) as e:
        return None, f"unreadable ({e})"
    return torch.from_numpy(pixels), ""


def _write_cache(path: Path, pixels: np.ndarray, sources: str) -> None:
    header = json.dumps({"version": CACHE_VERSION, "shape": list(pixels.shape), "sources": sources,
                         "sha256": _checksum(pixels)}).encode() + b"\n"
    head = MAGIC + header
    head += b"\0" * (-len(head) % _ALIGN)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(head)
            f.write(memoryview(pixels.reshape(-1)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _decode_all(paths: Sequence[str], size: tuple[int, int], decode: Callable[[str, tuple[int, int]], Tensor] | None
                ) -> np.ndarray:
    """Decode every file into one (N, 3, H, W) array; PIL decodes outside the GIL, so threads help."""
    pixels = np.empty((len(paths), 3, *size), dtype=np.uint8)
    decode = decode or decode_image

    def one(i: int) -> None:
        pixels[i] = decode(paths[i], size).numpy()

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for _ in pool.map(one, range(len(paths))):
            pass
    return pixels


def cached_images(paths: Sequence[str], size: tuple[int, int], path: Path,
                  notes: list[str] | None = None, decode: Callable[[str, tuple[int, int]], Tensor] | None = None
                  ) -> Tensor:
    """uint8 (N, 3, H, W) images of `paths` at `size`, from the cache at `path` or decoded into it.

    `decode(path, size)` makes one image (default `decode_image`, which stretches to `size`); a cache
    written by another decoder must live under another file name (see `cache_file`'s `split`).

    A missing, stale or corrupt cache is rebuilt, with the reason appended to `notes`. If the cache
    cannot be written, the decoded images are used from memory and `notes` says so.
    """
    notes = notes if notes is not None else []
    shape = (len(paths), 3, *size)
    sources, newest = _fingerprint(paths)
    if path.exists():
        cached, why = read_cache(path, shape, sources, newest)
        if cached is not None:
            return cached
        notes.append(f"image cache {path}: {why}; rebuilding it")
    pixels = _decode_all(paths, size, decode)
    try:
        _write_cache(path, pixels, sources)
    except OSError as e:
        notes.append(f"image cache {path} could not be written ({e.strerror or e}); decoded images kept in memory")
        return torch.from_numpy(pixels)
    return torch.from_numpy(pixels)
