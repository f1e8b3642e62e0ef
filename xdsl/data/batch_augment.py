"""Augmentation recipes, their random draws, and two implementations: one image at a time, or a batch.

A `Recipe` names what a training image goes through: a random crop (after padding, or random-resized),
a horizontal flip with probability 1/2, conversion to float in [0, 1], and normalisation. Evaluation
images go through normalisation only, or (ImageNet-style) a resize of the shorter side and a centre crop.

Every random number comes from a counter-based hash of (run seed, epoch seed, sample index, stream),
not from a stateful generator. So a sample is augmented the same way whichever process, worker or
batch it lands in, and whether it is augmented alone or with its whole batch:

    draws = draw(recipe, seed, epoch_seed, indices, (H, W))   # host numpy, cheap
    augment_one(images[i], draws.row(k), recipe)                   # per-sample path (torchvision ops)
    augment_batch(images[indices], draws, recipe)                   # batched path: a few tensor ops
    augment_batch(images, draws, recipe, work, index=indices)       # the same, gathered inside, memory reused

For pad-and-crop recipes the two paths give bit-identical tensors; for random-resized crop the batched
resize is the same antialiased bilinear filter as torchvision's, written as two batched matrix
products, so it agrees with the per-sample path to float rounding (about 1e-6).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import Tensor
from torchvision.transforms.v2 import functional as F

__all__ = ["CROPS", "Draws", "Recipe", "Workspace", "augment_batch", "augment_one", "draw", "draw_one", "mix64",
           "uniforms"]

CROPS = ("none", "pad", "resized", "center")
PAD_MODES = ("constant", "reflect", "edge")
RESIZED_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries ten boxes before a centre crop

_MASK64 = (1 << 64) - 1
_GOLDEN, _MUL1, _MUL2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


@dataclass(frozen=True)
class Recipe:
    """One augmentation recipe; `crop` is 'none', 'pad' (pad, then a random crop), 'resized' or 'center'.

    `size` is the output (H, W); None keeps the input size (what 'pad' means for CIFAR: pad 4, crop 32).
    'resized' follows torchvision's RandomResizedCrop (area fraction `scale`, aspect ratio `ratio`,
    log-uniform, ten attempts, then a centre crop) with an antialiased bilinear resize. 'center' is
    CenterCrop(size). `resize` (an int) first resizes the shorter side to it, as torchvision's
    Resize(int) does: `resize=256, crop="center", size=(224, 224)` is ImageNet's evaluation recipe.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop: str = "none"
    flip: bool = False
    size: tuple[int, int] | None = None
    pad: int = 4
    pad_mode: str = "reflect"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    resize: int | None = None

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {self.pad_mode!r}")
        if self.crop in ("resized", "center") and self.size is None:
            raise ValueError(f"a {self.crop!r} crop needs an output size")

    @property
    def random(self) -> bool:
        """Whether the recipe draws anything (a crop or a flip)."""
        return self.crop != "none" or self.flip

    def out_size(self, in_size: tuple[int, int]) -> tuple[int, int]:
        return tuple(self.size) if self.size is not None else tuple(in_size)  # type: ignore[return-value]

    def resized(self, in_size: tuple[int, int]) -> tuple[int, int]:
        """The input size after `resize` (torchvision's Resize(int): shorter side to it, aspect kept)."""
        h, w = int(in_size[0]), int(in_size[1])
        if self.resize is None or min(h, w) == self.resize:
            return h, w
        if h <= w:
            return self.resize, int(self.resize * w / h)
        return int(self.resize * h / w), self.resize


# ------------------------------------------------------------------------------------------ draws


def _mix(state: np.ndarray, value: np.ndarray | int) -> np.ndarray:
    """One splitmix64 round (uint64, wrapping): distinct inputs give unrelated outputs."""
    state = (state ^ np.uint64(int(value) & _MASK64) if isinstance(value, int) else state ^ value) * np.uint64(_MUL1)
    state = (state ^ (state >> np.uint64(31))) * np.uint64(_MUL2)
    return state ^ (state >> np.uint64(29))


def uniforms(seed: int, epoch_seed: int, indices: np.ndarray, streams: int) -> np.ndarray:
    """(len(indices), streams) float64 uniforms in [0, 1), a pure function of every argument.

    Column k of row i depends only on (seed, epoch_seed, indices[i], k): no state, so any split of the
    samples over batches, workers or processes draws the same numbers for the same sample.
    """
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64).reshape(-1, 1)
    with np.errstate(over="ignore"):
        state = np.full((1, 1), _GOLDEN, dtype=np.uint64)
        state = _mix(_mix(state, seed), epoch_seed)
        state = _mix(state, idx)
        state = _mix(state, np.arange(streams, dtype=np.uint64).reshape(1, -1))
    return (state >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _mix_int(state: int, value: int) -> int:
    """`_mix` on Python ints: the same numbers, without numpy's per-call overhead (one sample)."""
    state = ((state ^ (value & _MASK64)) * _MUL1) & _MASK64
    state = ((state ^ (state >> 31)) * _MUL2) & _MASK64
    return state ^ (state >> 29)


def mix64(*values: int) -> int:
    """splitmix64 rounds over `values`: distinct tuples give unrelated 64-bit numbers."""
    state = _GOLDEN
    for v in values:
        state = _mix_int(state, int(v))
    return state


def _uniforms_one(seed: int, epoch_seed: int, index: int, streams: int) -> list[float]:
    """Row `index` of `uniforms` (bit-identical), for the per-sample path."""
    return [(mix64(seed, epoch_seed, index, k) >> 11) * 2.0**-53 for k in range(streams)]


@dataclass(frozen=True)
class Draws:
    """Per-sample crop boxes (in input pixels) and flips: what augmentation does to each image."""

    top: np.ndarray     # int64 (B,); for 'pad', rows of the padded image
    left: np.ndarray    # int64 (B,)
    height: np.ndarray  # int64 (B,); crop size in the (padded) input
    width: np.ndarray   # int64 (B,)
    flip: np.ndarray    # bool (B,)

    def row(self, k: int) -> tuple[int, int, int, int, bool]:
        return (int(self.top[k]), int(self.left[k]), int(self.height[k]), int(self.width[k]), bool(self.flip[k]))


def _below(u: np.ndarray, n: np.ndarray | int) -> np.ndarray:
    """Uniform integers in [0, n) from uniforms in [0, 1)."""
    return np.minimum(np.floor(u * n).astype(np.int64), np.asarray(n, dtype=np.int64) - 1)


def draw(recipe: Recipe, seed: int, epoch_seed: int, indices: np.ndarray | Sequence[int],
         in_size: tuple[int, int]) -> Draws:
    """The random crop and flip of each sample in `indices` for this (seed, epoch)."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    n = len(idx)
    h, w = in_size = recipe.resized(in_size)
    out_h, out_w = recipe.out_size(in_size)
    u = uniforms(seed, epoch_seed, idx, 3 + (2 * RESIZED_ATTEMPTS if recipe.crop == "resized" else 0))
    flip = (u[:, 2] < 0.5) if recipe.flip else np.zeros(n, dtype=bool)
    if recipe.crop == "pad":
        span_h, span_w = h + 2 * recipe.pad - out_h + 1, w + 2 * recipe.pad - out_w + 1
        top, left = _below(u[:, 0], span_h), _below(u[:, 1], span_w)
        return Draws(top, left, np.full(n, out_h), np.full(n, out_w), flip)
    if recipe.crop in ("none", "center"):
        top, left, height, width = _fixed_box(recipe, h, w)
        return Draws(np.full(n, top), np.full(n, left), np.full(n, height), np.full(n, width), flip)
    ch, cw = _resized_boxes(recipe, u[:, 3:], h, w)
    return Draws(_below(u[:, 0], h - ch + 1), _below(u[:, 1], w - cw + 1), ch, cw, flip)


def draw_one(recipe: Recipe, seed: int, epoch_seed: int, index: int,
             in_size: tuple[int, int]) -> tuple[int, int, int, int, bool]:
    """`draw(...).row(0)` for one sample, fast: the per-sample path calls it once per image."""
    if recipe.crop == "resized":
        return draw(recipe, seed, epoch_seed, [index], in_size).row(0)
    u = _uniforms_one(seed, epoch_seed, index, 3)
    h, w = in_size = recipe.resized(in_size)
    out_h, out_w = recipe.out_size(in_size)
    flip = recipe.flip and u[2] < 0.5
    if recipe.crop in ("none", "center"):
        return (*_fixed_box(recipe, h, w), flip)
    span_h, span_w = h + 2 * recipe.pad - out_h + 1, w + 2 * recipe.pad - out_w + 1
    return min(math.floor(u[0] * span_h), span_h - 1), min(math.floor(u[1] * span_w), span_w - 1), out_h, out_w, flip


def _fixed_box(recipe: Recipe, h: int, w: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the crop that draws nothing: the whole image, or torchvision's
    CenterCrop box (offsets rounded as `F.center_crop` rounds them)."""
    if recipe.crop == "none":
        return 0, 0, h, w
    out_h, out_w = recipe.out_size((h, w))
    if out_h > h or out_w > w:
        raise ValueError(f"a centre crop of {out_h}x{out_w} does not fit a {h}x{w} image")
    return int(round((h - out_h) / 2.0)), int(round((w - out_w) / 2.0)), out_h, out_w


def _resized_boxes(recipe: Recipe, u: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Box sizes as torchvision's RandomResizedCrop.get_params picks them, for all samples at once."""
    lo, hi = math.log(recipe.ratio[0]), math.log(recipe.ratio[1])
    area = h * w * (recipe.scale[0] + (recipe.scale[1] - recipe.scale[0]) * u[:, :RESIZED_ATTEMPTS])
    aspect = np.exp(lo + (hi - lo) * u[:, RESIZED_ATTEMPTS:])
    cw = np.round(np.sqrt(area * aspect)).astype(np.int64)  # round half to even, like Python's round
    ch = np.round(np.sqrt(area / aspect)).astype(np.int64)
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = ok.argmax(axis=1)
    rows = np.arange(len(u))
    box_h, box_w = ch[rows, first], cw[rows, first]
    centre_h, centre_w = _centre_box(recipe, h, w)
    none = ~ok.any(axis=1)
    box_h[none], box_w[none] = centre_h, centre_w
    return box_h, box_w


def _centre_box(recipe: Recipe, h: int, w: int) -> tuple[int, int]:
    """torchvision's fallback when no attempt fits: the whole image, cut to the nearest allowed ratio."""
    in_ratio = w / h
    if in_ratio < min(recipe.ratio):
        return int(round(w / min(recipe.ratio))), w
    if in_ratio > max(recipe.ratio):
        return h, int(round(h * max(recipe.ratio)))
    return h, w


# ------------------------------------------------------------------------------------- per sample


def _affine(recipe: Recipe, channels: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(scale, bias), (C, 1, 1) float32: uint8 x -> x * scale + bias is (x / 255 - mean) / std in one pass.

    Computed in float64 and rounded once, so both pipelines use the very same two numbers per channel
    (identical results, within float rounding of torchvision's to_dtype + normalize). Made once per
    (mean, std, channels, device): shared, read-only tensors (building them cost 17 us, per image)."""
    return _affine_of(tuple(recipe.mean), tuple(recipe.std), int(channels), torch.device(device))


@functools.lru_cache(maxsize=64)
def _affine_of(mean: tuple[float, ...], std: tuple[float, ...], channels: int,
               device: torch.device) -> tuple[Tensor, Tensor]:
    m, s = (torch.tensor(v, dtype=torch.float64).expand(channels if len(v) == 1 else len(v)) for v in (mean, std))
    scale, bias = 1.0 / (255.0 * s), -m / s
    return scale.float().view(-1, 1, 1).to(device), bias.float().view(-1, 1, 1).to(device)


def _scale_shift(x: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """x (float32, converted from uint8) * scale + bias in place, as a multiply and then an add, each
    rounded: the one arithmetic both pipelines use, so that they agree bit for bit."""
    return x.mul_(scale).add_(bias)


def _to_float(img: Tensor, recipe: Recipe) -> Tensor:
    """uint8 (C, H, W) -> normalised float32 (`_scale_shift`, as the batched path)."""
    scale, bias = _affine(recipe, img.shape[-3], img.device)
    return _scale_shift(img.to(torch.float32), scale, bias)


def augment_one(img: Tensor, box: tuple[int, int, int, int, bool], recipe: Recipe) -> Tensor:
    """The reference: one uint8 (C, H, W) image through torchvision's functional ops, given its draws.

    The centre fallback of a 'resized' crop is centred, as in torchvision; its draws carry the offset.
    """
    top, left, height, width, flip = box
    if recipe.resize is not None:
        img = F.resize(img, [recipe.resize], antialias=True)
    if recipe.crop == "pad":
        if recipe.pad:
            img = F.pad(img, [recipe.pad], padding_mode=recipe.pad_mode)
        img = F.crop(img, top, left, height, width)
    elif recipe.crop == "center":
        img = F.center_crop(img, [height, width])
    elif recipe.crop == "resized":
        img = F.to_dtype(img, torch.float32, scale=True)
        img = F.resized_crop(img, top, left, height, width, list(recipe.out_size(img.shape[-2:])), antialias=True)
        img = F.horizontal_flip(img) if flip else img
        return F.normalize(img, list(recipe.mean), list(recipe.std))
    if flip:
        img = F.horizontal_flip(img)
    return _to_float(img, recipe)


# ---------------------------------------------------------------------------------------- batched


class Workspace:
    """Memory that one stream of batches reuses: scratch buffers, and the storage of batches let go of.

    On CPU, fresh multi-megabyte tensors every batch cost more than the arithmetic that fills them: the
    host allocator hands freed pages back to the system and faults them in again, page by page. So the
    gathered, padded and cropped uint8 images live in scratch buffers (`take`), and a batch's float
    output (`fresh`) reuses the storage of an earlier batch once nothing else holds it: no tensor, view,
    autograd graph or numpy array of the caller's shares it (torch's storage use count is 1, ours). A
    caller may keep every batch it was given; only batches nobody can see again are written over.
    """

    RECYCLED = 3  # output storages kept: the batch being consumed, the one being made, and a spare

    def __init__(self) -> None:
        self._buffers: dict[tuple, Tensor] = {}
        self._outputs: list[torch.UntypedStorage] = []

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A contiguous scratch tensor of `shape`: zeros when first made, then the same memory on every
        call with the same name and trailing shape (a shorter batch gets its first rows). What is written
        stays until written again, so a border zeroed once stays zero. Never hand it out."""
        key = (name, tuple(shape[1:]), dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None or len(buffer) < shape[0]:
            buffer = self._buffers[key] = torch.zeros(shape, dtype=dtype, device=device)
        return buffer[:shape[0]]

    def fresh(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised tensor of `shape` that nothing else refers to: a new tensor on a storage
        no one else holds any more, else a new allocation. CUDA's caching allocator already reuses
        memory, so there it is always `torch.empty`."""
        if device.type != "cpu" or not hasattr(torch._C, "_storage_Use_Count"):
            return torch.empty(shape, dtype=dtype, device=device)
        nbytes = math.prod(shape) * dtype.itemsize
        free = [k for k, storage in enumerate(self._outputs) if torch._C._storage_Use_Count(storage._cdata) == 1]
        for k in free:
            if self._outputs[k].nbytes() >= nbytes:
                return torch.empty(0, dtype=dtype, device=device).set_(self._outputs[k], 0, shape)
        out = torch.empty(shape, dtype=dtype, device=device)
        if len(self._outputs) < self.RECYCLED:
            self._outputs.append(out.untyped_storage())
        elif free:  # a free storage too small for this batch size gives way to this one
            self._outputs[free[0]] = out.untyped_storage()
        return out


def augment_batch(images: Tensor, draws: Draws, recipe: Recipe, work: Workspace | None = None,
                  index: Tensor | None = None) -> Tensor:
    """A uint8 (B, C, H, W) batch augmented in a few tensor ops on its own device; always a new tensor.

    `index`: the batch is `images[index]` (a whole dataset's images), gathered here, straight into the
    padded buffer where the recipe pads with zeros. `work`: buffers to reuse across calls (a loader
    passes one per epoch).
    """
    work = work or Workspace()
    # the crop-and-flip pass gathers by `index` itself when it is the first step; otherwise gather first
    crop_flip_first = recipe.resize is None and (recipe.crop == "pad" or (recipe.crop == "none" and draws.flip.any()))
    if index is not None and not crop_flip_first:
        images = torch.index_select(images, 0, index, out=work.take("batch", (len(index), *images.shape[1:]),
                                                                    images.dtype, images.device))
        index = None
    if recipe.resize is not None:
        images = F.resize(images, [recipe.resize], antialias=True)  # one call, the per-sample path's filter
    if recipe.crop == "center":
        top, left, height, width = draws.row(0)[:4]
        images = images[..., top:top + height, left:left + width]
    if recipe.crop == "resized":
        return _resized_batch(images, draws, recipe)
    if recipe.crop == "pad" or draws.flip.any():
        return _crop_flip_batch(images, draws if recipe.crop == "pad" else _whole(images, draws), recipe, work,
                                index)
    return _normalise(images, recipe, work)


def _whole(images: Tensor, draws: Draws) -> Draws:
    """The draws of a flip-only pass over `images` (already cropped): boxes covering each image."""
    n, (h, w) = len(draws.flip), images.shape[-2:]
    zeros = np.zeros(n, dtype=np.int64)
    return Draws(zeros, zeros.copy(), np.full(n, h), np.full(n, w), draws.flip)


CHUNK_BYTES = 3 << 18  # float output per chunk on CPU (768 KiB): small enough to stay in a core's L2 cache


def _chunk(shape: Sequence[int], device: torch.device) -> int:
    """Samples per chunk of the float stage: on CPU as many as fill `CHUNK_BYTES` of float32 output, so
    that the multiply and the add after the conversion read what the conversion just wrote from cache,
    not from memory (1.3x faster at 64x64); elsewhere the whole batch, one kernel per op."""
    if device.type != "cpu":
        return max(1, int(shape[0]))
    return max(1, CHUNK_BYTES // (4 * math.prod(shape[1:])))


def _normalise(images: Tensor, recipe: Recipe, work: Workspace | None = None) -> Tensor:
    """uint8 -> (x / 255 - mean) / std as one multiply-add per element, into a tensor nobody else holds
    (`work.fresh`), as `_to_float` does per image, so the two pipelines agree bit for bit; float input
    (already in [0, 1], the resized crop) -> (x - mean) / std in place, as torchvision's normalize."""
    if images.dtype == torch.uint8:
        scale, bias = _affine(recipe, images.shape[-3], images.device)
        out = (work or Workspace()).fresh(tuple(images.shape), torch.float32, images.device)
        step = _chunk(images.shape, images.device)
        for i in range(0, len(images), step):
            _scale_shift(out[i:i + step].copy_(images[i:i + step]), scale, bias)
        return out
    mean = torch.as_tensor(recipe.mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std = torch.as_tensor(recipe.std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return images.sub_(mean).div_(std)


def _gather_mirrored(images: Tensor, index: Tensor | None, flip: np.ndarray, out: Tensor,
                     work: Workspace) -> np.ndarray:
    """Fill `out` (B, C, H, W; may be a view) with the batch's images, the ones that flip mirrored: first
    the unflipped ones, then the flipped ones, each in batch order. Returns each sample's slot in `out`.

    Whole-image copies (index_select, flip, copy_) are far cheaper than writing rows back by index.
    """
    kept, flipped = np.flatnonzero(~flip), np.flatnonzero(flip)
    order = np.concatenate([kept, flipped])
    slot = np.empty(len(order), dtype=np.int64)
    slot[order] = np.arange(len(order))
    source = torch.as_tensor(order, device=images.device)
    if index is not None:
        source = index.index_select(0, source)
    if out.device.type == "cpu" or out.is_contiguous():
        torch.index_select(images, 0, source[:len(kept)], out=out[:len(kept)])
    else:  # a strided `out=` is exercised on CPU only; elsewhere the extra copy costs little bandwidth
        out[:len(kept)].copy_(images.index_select(0, source[:len(kept)]))
    if len(flipped):
        chosen = work.take("chosen", (len(flipped), *images.shape[1:]), images.dtype, images.device)
        torch.index_select(images, 0, source[len(kept):], out=chosen)
        out[len(kept):].copy_(chosen.flip(-1))
    return slot


def _padded(images: Tensor, index: Tensor | None, draws: Draws, recipe: Recipe,
            work: Workspace) -> tuple[Tensor, np.ndarray]:
    """The batch padded as the recipe says, flipped samples mirrored, and each sample's slot in it.

    Zero padding gathers straight into the middle of a buffer whose border was zeroed once; reflect and
    edge padding is `nnf.pad`'s. Padding commutes with mirroring, so a mirrored padded image is the
    padded mirrored image.
    """
    pad = recipe.pad if recipe.crop == "pad" else 0
    batch = len(index) if index is not None else len(images)
    channels, height, width = images.shape[1:]
    if pad and recipe.pad_mode == "constant":
        padded = work.take("padded", (batch, channels, height + 2 * pad, width + 2 * pad), images.dtype,
                           images.device)
        slot = _gather_mirrored(images, index, draws.flip, padded[..., pad:pad + height, pad:pad + width], work)
        return padded, slot
    slots = work.take("slots", (batch, channels, height, width), images.dtype, images.device)
    slot = _gather_mirrored(images, index, draws.flip, slots, work)
    if pad:
        slots = nnf.pad(slots, (pad,) * 4, mode="replicate" if recipe.pad_mode == "edge" else recipe.pad_mode)
    return slots, slot


def _crop_flip_batch(images: Tensor, draws: Draws, recipe: Recipe, work: Workspace,
                     index: Tensor | None = None) -> Tensor:
    """Pad the batch (flipped samples mirrored), then copy every output row of every sample with
    `index_select` over a view of all row-long windows of the padded batch, and normalise it.

    A flipped sample is cropped from its mirrored image at the mirrored offset. Row copies are several
    times faster on CPU than indexing pixel by pixel (unfold + advanced indexing, or torch.where). Crop
    and normalisation go chunk by chunk (`_chunk`), each chunk's crop into the same small scratch
    buffer, so that on CPU the uint8 crop never leaves the cache before it is converted.
    """
    padded, slot = _padded(images, index, draws, recipe, work)
    batch, channels, height, width = padded.shape
    device = padded.device
    out_h, out_w = int(draws.height[0]), int(draws.width[0])
    left = np.where(draws.flip, width - out_w - draws.left, draws.left)
    plane = (slot[:, None] * channels + np.arange(channels)) * (height * width)
    rows = (draws.top[:, None] + np.arange(out_h)) * width + left[:, None]
    starts = torch.as_tensor((plane[:, :, None] + rows[:, None, :]).reshape(-1), device=device)
    flat = padded.view(-1)
    windows = flat.as_strided((flat.numel() - out_w + 1, out_w), (1, 1))
    scale, bias = _affine(recipe, channels, device)
    out = work.fresh((batch, channels, out_h, out_w), torch.float32, device)
    step = _chunk(out.shape, device)
    crop = work.take("crop", (min(step, batch), channels, out_h, out_w), torch.uint8, device)
    rows_per_sample = channels * out_h
    for i in range(0, batch, step):
        n = min(step, batch - i)
        torch.index_select(windows, 0, starts[i * rows_per_sample:(i + n) * rows_per_sample],
                           out=crop[:n].view(-1, out_w))
        _scale_shift(out[i:i + n].copy_(crop[:n]), scale, bias)
    return out


def _resize_weights(start: Tensor, length: Tensor, out: int, size: int) -> Tensor:
    """(B, out, size) rows of torch's antialiased bilinear filter over [start, start + length).

    The same kernel as `interpolate(mode="bilinear", antialias=True, align_corners=False)`: a triangle
    of half-width max(scale, 1) input pixels, normalised to sum 1, zero outside the crop.
    """
    scale = (length.double() / out).view(-1, 1, 1)
    inv = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))
    centre = scale * (torch.arange(out, device=start.device, dtype=torch.float64).view(1, -1, 1) + 0.5)
    j = torch.arange(size, device=start.device, dtype=torch.float64).view(1, 1, -1) - start.view(-1, 1, 1)
    weights = (1 - ((j + 0.5 - centre) * inv).abs()).clamp_min(0)
    weights = weights * ((j >= 0) & (j < length.view(-1, 1, 1)))
    return (weights / weights.sum(-1, keepdim=True)).float()


def _resized_batch(images: Tensor, draws: Draws, recipe: Recipe) -> Tensor:
    """Crop + antialiased resize as rows @ image @ cols^T per sample (two batched matmuls); a flip
    reverses the rows of the column matrix, so it costs nothing."""
    device = images.device
    out_h, out_w = recipe.out_size(images.shape[-2:])
    as_t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
    wy = _resize_weights(as_t(draws.top), as_t(draws.height), out_h, images.shape[-2])
    wx = _resize_weights(as_t(draws.left), as_t(draws.width), out_w, images.shape[-1])
    flip = torch.as_tensor(draws.flip, device=device)
    wx = torch.where(flip.view(-1, 1, 1), wx.flip(1), wx)
    x = images.to(torch.float32).mul_(1.0 / 255)
    return _normalise(wy.unsqueeze(1) @ x @ wx.transpose(1, 2).unsqueeze(1), recipe)
