"""The uint8 image cache: decoded once, reused while valid, rebuilt (never trusted) when corrupt or stale."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from xdsl.data import build_data
from xdsl.data import cache as cache_mod
from xdsl.data.cache import cache_file, cached_images, decode_image

SIZE = (16, 16)


@pytest.fixture
def files(tmp_path: Path) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        path = tmp_path / "images" / f"img{i}.png"
        path.parent.mkdir(exist_ok=True)
        side = 16 if i != 2 else 20  # one of another size: resized on decode
        Image.fromarray(rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """Every file decode_image is called on, in order."""
    seen: list[str] = []
    original = cache_mod.decode_image

    def counted(path, size):
        seen.append(path)
        return original(path, size)

    monkeypatch.setattr(cache_mod, "decode_image", counted)
    return seen


def _expected(files: list[str]) -> torch.Tensor:
    return torch.stack([decode_image(p, SIZE) for p in files])


def test_cache_is_decoded_once_then_reused(files, tmp_path, decodes):
    path = cache_file(tmp_path / "root", "train", SIZE)
    assert path == tmp_path / "root" / ".xdsl-cache" / "train-16x16.u8"
    notes: list[str] = []
    first = cached_images(files, SIZE, path, notes)
    assert first.dtype == torch.uint8 and first.shape == (6, 3, 16, 16)
    assert torch.equal(first, _expected(files)) and len(decodes) == 6 and path.is_file()
    again = cached_images(files, SIZE, path, notes)
    assert torch.equal(again, first) and len(decodes) == 6 and notes == []  # nothing decoded the second time


def _corrupt_payload(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00" * 4096)


def _bad_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"version"', b'"versi@n"', 1))


def _other_shape(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"shape": [6, 3, 16, 16]', b'"shape": [6, 3, 16, 15]', 1))


def _older_than_images(path: Path) -> None:
    past = os.stat(path).st_mtime - 3600
    os.utime(path, (past, past))


@pytest.mark.parametrize(("damage", "reason"), [
    (_corrupt_payload, "checksum mismatch (corrupt)"),
    (_truncate, "its size does not match its header (truncated?)"),
    (_garbage, "not an xdsl image cache"),
    (_bad_header, "cache version None, expected 1"),
    (_other_shape, "it holds shape [6, 3, 16, 15], expected [6, 3, 16, 16]"),
    (_older_than_images, "an image is newer than the cache"),
])
def test_a_damaged_or_stale_cache_is_rebuilt_with_the_reason(files, tmp_path, decodes, damage, reason):
    path = tmp_path / "c" / "train.u8"
    cached_images(files, SIZE, path)
    damage(path)
    notes: list[str] = []
    rebuilt = cached_images(files, SIZE, path, notes)
    assert notes == [f"image cache {path}: {reason}; rebuilding it"]
    assert torch.equal(rebuilt, _expected(files)) and len(decodes) == 12
    assert cached_images(files, SIZE, path, notes) is not None and len(decodes) == 12  # valid again


def test_changed_images_invalidate_the_cache(files, tmp_path, decodes):
    from PIL import Image

    path = tmp_path / "c" / "train.u8"
    cached_images(files, SIZE, path)
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(files[4])  # same name, new pixels
    notes: list[str] = []
    rebuilt = cached_images(files, SIZE, path, notes)
    assert notes == [f"image cache {path}: the image files changed since it was written; rebuilding it"]
    assert int(rebuilt[4].sum()) == 0 and torch.equal(rebuilt, _expected(files))
    notes.clear()
    assert cached_images(files[::-1], SIZE, path, notes).shape == (6, 3, 16, 16)  # another order is another cache
    assert "changed" in notes[0]


def test_an_unwritable_cache_location_falls_back_to_memory(files, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    notes: list[str] = []
    images = cached_images(files, SIZE, blocker / "train.u8", notes)
    assert torch.equal(images, _expected(files))
    assert len(notes) == 1 and "could not be written" in notes[0] and "kept in memory" in notes[0]


def test_tiny_imagenet_uses_the_cache_and_reports_a_rebuild(tmp_path):
    from tests.test_data import tiny_dir

    root = tiny_dir.__wrapped__(tmp_path)  # the fabricated Tiny ImageNet of test_data.py
    first = build_data("tiny_imagenet", {"root": str(root), "num_workers": 0})
    assert first.notes == []
    train_cache = root / ".xdsl-cache" / "train-64x64.u8"
    assert train_cache.is_file() and (root / ".xdsl-cache" / "val-64x64.u8").is_file()
    assert first.train.images.dtype == torch.uint8 and first.train.images.shape == (6, 3, 64, 64)
    _corrupt_payload(train_cache)
    again = build_data("tiny_imagenet", {"root": str(root), "num_workers": 0})
    assert again.notes == [f"image cache {train_cache}: checksum mismatch (corrupt); rebuilding it"]
    assert torch.equal(again.train.images, first.train.images)
    elsewhere = build_data("tiny_imagenet", {"root": str(root), "num_workers": 0, "cache_dir": str(tmp_path / "cc")})
    assert (tmp_path / "cc" / "train-64x64.u8").is_file() and torch.equal(elsewhere.test.images, first.test.images)
