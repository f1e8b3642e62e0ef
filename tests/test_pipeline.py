"""The batched uint8 pipeline: same augmentation as the per-sample path, same batches, automatic choice."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.transforms import v2

from xdsl.data import DataParamError, batch_augment, build_data
from xdsl.data.batch_augment import Recipe, Workspace, augment_batch, augment_one, draw, draw_one
from xdsl.data.images import UInt8Images
from xdsl.data.pipeline import BatchedLoader, choose, epoch_order, parse_budget

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
CPU = torch.device("cpu")


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)


def _reference(images: torch.Tensor, indices: np.ndarray, recipe: Recipe, seed: int, epoch: int) -> torch.Tensor:
    """Each image alone through torchvision's functional ops, with the draws the batch used."""
    draws = draw(recipe, seed, epoch, indices, tuple(images.shape[-2:]))
    return torch.stack([augment_one(images[i], draws.row(k), recipe) for k, i in enumerate(indices)])


# ------------------------------------------------------------------ exact equality given the draws


@pytest.mark.parametrize("pad_mode", ["reflect", "constant", "edge"])
@pytest.mark.parametrize("size", [32, 64])
def test_batched_pad_crop_flip_is_bit_identical_to_the_per_sample_reference(pad_mode, size):
    images = _images(300, size)
    indices = np.random.default_rng(1).permutation(300)[:128]
    recipe = Recipe(MEAN, STD, crop="pad", flip=True, pad=4, pad_mode=pad_mode)
    draws = draw(recipe, 3, 11, indices, (size, size))
    batch = augment_batch(images[torch.as_tensor(indices)], draws, recipe)
    assert batch.dtype == torch.float32 and batch.shape == (128, 3, size, size)
    assert torch.equal(batch, _reference(images, indices, recipe, 3, 11))
    assert draws.flip.any() and not draws.flip.all() and len(set(zip(draws.top, draws.left))) > 20


def test_batched_crop_to_a_smaller_size_and_plain_normalisation_match_the_reference():
    images = _images(64)
    indices = np.arange(64)
    for recipe in (Recipe(MEAN, STD, crop="pad", flip=True, size=(28, 24), pad=2),
                   Recipe(MEAN, STD), Recipe(MEAN, STD, flip=True)):
        draws = draw(recipe, 0, 5, indices, (32, 32))
        assert torch.equal(augment_batch(images, draws, recipe), _reference(images, indices, recipe, 0, 5))


@pytest.mark.parametrize("out", [(24, 24), (48, 40), (32, 32)])
def test_batched_random_resized_crop_matches_torchvision_resized_crop(out):
    """The batched resize is torch's antialiased bilinear filter as matrices: equal to float rounding."""
    images = _images(96)
    indices = np.arange(96)
    recipe = Recipe(MEAN, STD, crop="resized", flip=True, size=out)
    draws = draw(recipe, 2, 9, indices, (32, 32))
    batch = augment_batch(images, draws, recipe)
    assert batch.shape == (96, 3, *out)
    torch.testing.assert_close(batch, _reference(images, indices, recipe, 2, 9), rtol=0, atol=5e-5)


@pytest.mark.parametrize("resize", [None, 40])
@pytest.mark.parametrize("flip", [False, True])
def test_centre_crop_and_resize_match_torchvisions_resize_and_center_crop(resize, flip):
    """ImageNet's evaluation recipe Resize(int) + CenterCrop: both paths equal each other exactly, and
    torchvision's transforms to float rounding (the same uint8 resize; normalisation is one multiply-add)."""
    images = _images(24, 48)[:, :, :, :36]  # 48 x 36: not square, so the shorter side decides
    indices = np.arange(24)
    recipe = Recipe(MEAN, STD, crop="center", flip=flip, size=(32, 32), resize=resize)
    draws = draw(recipe, 1, 2, indices, (48, 36))
    batch = augment_batch(images, draws, recipe)
    assert batch.shape == (24, 3, 32, 32)
    assert torch.equal(batch, _reference(images, indices, recipe, 1, 2))
    assert [draw_one(recipe, 1, 2, i, (48, 36)) for i in range(24)] == [draws.row(k) for k in range(24)]
    if not flip:
        steps = [v2.Resize(resize)] if resize else []
        tv = v2.Compose([*steps, v2.CenterCrop(32), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
        torch.testing.assert_close(batch, torch.stack([tv(img) for img in images]), rtol=0, atol=1e-5)


def test_random_resized_crop_after_a_resize_matches_the_reference():
    images = _images(16, 40)
    recipe = Recipe(MEAN, STD, crop="resized", flip=True, size=(24, 24), resize=32)
    draws = draw(recipe, 0, 3, np.arange(16), (40, 40))
    assert int((draws.top + draws.height).max()) <= 32  # boxes are drawn in the resized image
    torch.testing.assert_close(augment_batch(images, draws, recipe), _reference(images, np.arange(16), recipe, 0, 3),
                               rtol=0, atol=5e-5)


_LOADER_RECIPES = [
    Recipe(MEAN, STD, crop="pad", flip=True, pad=4, pad_mode="constant"),
    Recipe(MEAN, STD, crop="pad", flip=True, pad=3, pad_mode="reflect"),
    Recipe(MEAN, STD, crop="pad", flip=True, pad=2, pad_mode="edge", size=(30, 28)),
    Recipe(MEAN, STD, crop="pad", flip=False, pad=4, pad_mode="constant"),
    Recipe(MEAN, STD, flip=True), Recipe(MEAN, STD),
    Recipe(MEAN, STD, crop="center", flip=True, size=(24, 24)),
    Recipe(MEAN, STD, crop="resized", flip=True, size=(16, 16)),
]


@pytest.mark.parametrize("chunk", [None, 5, 1])
@pytest.mark.parametrize("recipe", _LOADER_RECIPES, ids=lambda r: f"{r.crop}-{r.pad_mode}-flip{r.flip}")
def test_gathering_inside_with_a_reused_workspace_gives_the_per_sample_batches(recipe, chunk, monkeypatch):
    """The loader's form (the whole dataset + `index`, one workspace for many batches, the last one
    shorter) equals augmenting each pre-gathered batch alone, and the per-sample reference; also when
    the float stage goes in chunks of 5 samples (the last chunk shorter) or 1 (`chunk`; None: the
    default size, a whole 64-batch of 32x32 images in one chunk)."""
    if chunk is not None:
        monkeypatch.setattr(batch_augment, "CHUNK_BYTES", chunk * 4 * 3 * 32 * 32)
    images = _images(200)
    order = np.random.default_rng(4).permutation(200)
    work = Workspace()
    for start in range(0, 200, 64):  # 64, 64, 64, then 8
        indices = order[start:start + 64]
        draws = draw(recipe, 2, start, indices, (32, 32))
        ours = augment_batch(images, draws, recipe, work, torch.as_tensor(indices))
        alone = augment_batch(images[torch.as_tensor(indices)], draws, recipe)
        assert torch.equal(ours, alone)
        if recipe.crop != "resized":  # the resized crop agrees to float rounding (tested above)
            assert torch.equal(ours, _reference(images, indices, recipe, 2, start))


def _loader_batches(ds: UInt8Images, work: Workspace, epoch: int = 1):
    return BatchedLoader(ds, ds.images, ds.labels, ds.recipe(), order=epoch_order(len(ds), epoch), batch_size=16,
                         epoch_seed=epoch, work=work)


def test_a_batch_is_never_written_over_while_anything_still_refers_to_it():
    """Batches' storage is reused only once nothing refers to it: not the batch, a view of it, a numpy
    array of it, nor an autograd graph that saved it."""
    ds = _dataset(160)
    work = Workspace()
    reference = [x.clone() for x, _ in _loader_batches(ds, Workspace())]
    kept_view, kept_numpy, layer = None, None, torch.nn.Linear(3 * 32 * 32, 2)
    loss = None
    for k, (x, _) in enumerate(_loader_batches(ds, work)):
        assert torch.equal(x, reference[k])
        if k == 0:
            kept_view = x[3:5, 1]            # a view: the batch tensor itself is dropped
        if k == 1:
            kept_numpy = x.numpy()[7]
        if k == 2:
            loss = layer(x.flatten(1)).sum()  # the graph saves x for the weight's gradient
    assert torch.equal(kept_view, reference[0][3:5, 1])
    assert np.array_equal(kept_numpy, reference[2 - 1].numpy()[7])
    loss.backward()
    assert torch.allclose(layer.weight.grad, reference[2].flatten(1).sum(0).expand(2, -1))


def test_batches_nobody_holds_are_recycled_and_a_larger_batch_size_takes_their_place():
    ds = _dataset(160)
    work = Workspace()
    pointers = [x.data_ptr() for x, _ in _loader_batches(ds, work)]  # each batch dropped once used
    assert len(set(pointers)) <= Workspace.RECYCLED < len(pointers)
    big = BatchedLoader(ds, ds.images, ds.labels, ds.recipe(), order=epoch_order(160, 2), batch_size=64,
                        epoch_seed=2, work=work)
    reference = list(BatchedLoader(ds, ds.images, ds.labels, ds.recipe(), order=epoch_order(160, 2), batch_size=64,
                                   epoch_seed=2))
    pointers = []
    for (x, _), (rx, _) in zip(big, reference, strict=True):
        assert torch.equal(x, rx)
        pointers.append(x.data_ptr())
    assert pointers[0] != pointers[1] and len(set(pointers)) <= Workspace.RECYCLED


# --------------------------------------------------------------------- the distribution of the draws


def _coordinate_image(size: int) -> torch.Tensor:
    """Channel 0 = row + 1, channel 1 = column + 1, so a crop's offset and flip can be read back."""
    rows = torch.arange(1, size + 1, dtype=torch.uint8).view(size, 1).expand(size, size)
    return torch.stack([rows, rows.t(), torch.full((size, size), 7, dtype=torch.uint8)])


def _read_crops(out: torch.Tensor, pad: int) -> list[tuple[int, int, bool]]:
    """(top, left, flipped) of constant-padded crops of the coordinate image (unnormalised uint8 batch).

    Output rows/columns pad .. size-1-pad always come from inside the image, whatever the offset."""
    rows, cols = out[:, 0, :, pad].long(), out[:, 1, pad, :].long()
    flipped = cols[:, pad] > cols[:, pad + 1]
    left = torch.where(flipped, cols[:, -1 - pad], cols[:, pad]) - 1
    return list(zip((rows[:, pad] - 1).tolist(), left.tolist(), flipped.tolist(), strict=True))


def test_batched_crops_and_flips_have_torchvisions_per_sample_distribution():
    """Read (top, left, flip) back from 20,000 augmented images of each path; a chi-square test of
    homogeneity over the 81 x 2 outcomes must not tell the batched path from torchvision's
    RandomCrop(padding=4) + RandomHorizontalFlip (seeded: the test is deterministic)."""
    n, pad, size = 20_000, 4, 32
    image = _coordinate_image(size)
    identity = Recipe((0.0,) * 3, (1 / 255,) * 3, crop="pad", flip=True, pad=pad, pad_mode="constant")
    draws = draw(identity, 5, 17, np.arange(n), (size, size))
    batched = augment_batch(image.expand(n, -1, -1, -1), draws, identity).round().to(torch.uint8)
    ours = _read_crops(batched, pad)
    assert ours == list(zip(draws.top.tolist(), draws.left.tolist(), draws.flip.tolist(), strict=True))
    torch.manual_seed(0)
    tv = v2.Compose([v2.RandomCrop(size, padding=pad), v2.RandomHorizontalFlip()])
    theirs = _read_crops(torch.stack([tv(image) for _ in range(n)]), pad)

    outcomes = sorted(set(ours) | set(theirs))
    assert len(outcomes) == 81 * 2
    table = np.array([[counts.get(k, 0) for k in outcomes] for counts in map(Counter, (ours, theirs))])
    assert stats.chi2_contingency(table).pvalue > 1e-3
    assert stats.chisquare(table[0]).pvalue > 1e-3  # and uniform on its own


def test_random_resized_boxes_have_torchvisions_distribution():
    """Area fraction, aspect ratio and position of 20,000 boxes against RandomResizedCrop.get_params."""
    n, h, w = 20_000, 64, 48
    recipe = Recipe(MEAN, STD, crop="resized", size=(32, 32))
    d = draw(recipe, 1, 2, np.arange(n), (h, w))
    torch.manual_seed(0)
    image = torch.zeros(3, h, w)
    tv = np.array([v2.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]).T
    for ours, theirs in [(d.height * d.width / (h * w), tv[2] * tv[3] / (h * w)),
                         (d.width / d.height, tv[3] / tv[2]),
                         (d.top / (h - d.height + 1), tv[0] / (h - tv[2] + 1)),
                         (d.left / (w - d.width + 1), tv[1] / (w - tv[3] + 1))]:
        assert stats.ks_2samp(ours, theirs).pvalue > 1e-3
    assert ((d.top >= 0) & (d.top + d.height <= h) & (d.left >= 0) & (d.left + d.width <= w)).all()


def test_the_per_sample_fast_draw_equals_the_batched_draw():
    for recipe in (Recipe(MEAN, STD, crop="pad", flip=True), Recipe(MEAN, STD, crop="pad", size=(24, 28), pad=2),
                   Recipe(MEAN, STD, flip=True), Recipe(MEAN, STD, crop="resized", flip=True, size=(16, 16))):
        batch = draw(recipe, 12, 345, np.arange(200), (32, 32))
        assert [draw_one(recipe, 12, 345, i, (32, 32)) for i in range(200)] == [batch.row(k) for k in range(200)]


def test_draws_depend_only_on_seed_epoch_and_index():
    recipe = Recipe(MEAN, STD, crop="pad", flip=True)
    whole = draw(recipe, 1, 4, np.arange(100), (32, 32))
    part = draw(recipe, 1, 4, np.array([70, 3]), (32, 32))
    assert part.row(0) == whole.row(70) and part.row(1) == whole.row(3)
    other = [draw(recipe, s, e, np.arange(100), (32, 32)) for s, e in ((2, 4), (1, 5))]
    assert all(not np.array_equal(o.top, whole.top) for o in other)


# ----------------------------------------------------------------------------- loaders and choice


def _dataset(n: int = 90, size: int = 32, seed: int = 3, augment: bool = True) -> UInt8Images:
    return UInt8Images(_images(n, size), torch.arange(n), mean=MEAN, std=STD, augment=augment, seed=seed)


def _batched(ds: UInt8Images, epoch_seed: int, batch_size: int, sampler=None) -> BatchedLoader:
    ds.set_epoch(epoch_seed)
    if sampler is not None:
        sampler.set_epoch(epoch_seed)
    return BatchedLoader(ds, ds.images, ds.labels, ds.recipe(), order=epoch_order(len(ds), epoch_seed, sampler),
                         batch_size=batch_size, epoch_seed=epoch_seed)


@pytest.mark.parametrize("workers", [0, 2])
def test_batched_loader_yields_exactly_the_per_sample_dataloaders_batches(workers):
    ds = _dataset()
    for epoch_seed in (0, 7):
        ds.set_epoch(epoch_seed)
        generator = torch.Generator().manual_seed(epoch_seed)
        reference = list(DataLoader(ds, batch_size=16, shuffle=True, generator=generator, num_workers=workers))
        ours = list(_batched(ds, epoch_seed, 16))
        assert len(ours) == len(reference) == 6
        for (x, y), (rx, ry) in zip(ours, reference, strict=True):
            assert torch.equal(y, ry) and torch.equal(x, rx)


def test_ddp_ranks_see_disjoint_samples_with_the_same_augmentation():
    ds = _dataset(96)
    single = {int(i): x for xb, yb in _batched(ds, 4, 8) for i, x in zip(yb, xb, strict=True)}
    seen: list[set[int]] = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        batches = list(_batched(ds, 4, 8, sampler))
        reference = DataLoader(ds, batch_size=8, sampler=sampler)
        assert all(torch.equal(y, ry) for (_, y), (_, ry) in zip(batches, reference, strict=True))
        labels = torch.cat([y for _, y in batches])
        seen.append(set(labels.tolist()))
        # a sample is augmented the same way whichever process and batch it lands in
        assert all(torch.equal(x, single[int(i)]) for xb, yb in batches for i, x in zip(yb, xb, strict=True))
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(96))


def test_parse_budget():
    assert parse_budget("25%") == (0.25, None)
    assert parse_budget("2GiB") == (None, 2 * 2**30)
    assert parse_budget("500 MB") == (None, 500 * 10**6)
    assert parse_budget("0") == (None, 0)
    for bad in ("lots", "150%", "-1GB", "2 parsecs"):
        with pytest.raises(ValueError):
            parse_budget(bad)


def test_pipeline_choice_follows_the_memory_budget_and_says_why():
    train, test = _dataset(100), _dataset(20, augment=False)
    need = 120 * 3 * 32 * 32 + 120 * 8
    fits = choose("auto", f"{need}B", (train, test), CPU)
    assert fits.batched and "batched pipeline on cpu" in fits.line and "fit" in fits.line
    too_big = choose("auto", f"{need - 1}B", (train, test), CPU)
    assert not too_big.batched and too_big.line.startswith("per-sample pipeline") and "exceed" in too_big.line
    assert choose("auto", "25%", (train, test), CPU).batched  # a few KiB of a share of free memory
    assert "% of" in choose("auto", "25%", (train, test), CPU).line
    assert not choose("per_sample", "100%", (train, test), CPU).batched
    assert choose("batched", "0", (train, test), CPU).batched
    tensors = build_data("digits", {})
    assert not choose("auto", "100%", (tensors.train, tensors.test), CPU).batched


def test_pipeline_settings_are_checked(tmp_path):
    with pytest.raises(DataParamError, match="memory_budget") as info:
        build_data("digits", {"memory_budget": "plenty"})
    assert info.value.key == "memory_budget"
    with pytest.raises(DataParamError, match="'pipeline'.*one of") as info:
        build_data("digits", {"pipeline": "fast"})
    with pytest.raises(DataParamError, match="needs uint8 images") as info:
        build_data("digits", {"pipeline": "batched"})
    assert info.value.key == "pipeline"


# ------------------------------------------------------------------------ bundle and runner, end to end


def _cifar_dir(root: Path, per_batch: int = 32) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [*[(f"data_batch_{i}", per_batch) for i in range(1, 6)], ("test_batch", 24)]:
        batch = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 4, size=n)]}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    return root


def test_bundle_loaders_are_identical_on_both_paths(tmp_path):
    root = _cifar_dir(tmp_path / "cifar")
    kw = {"root": str(root), "batch_size": 24, "num_workers": 0}
    per_sample = build_data("cifar10", {**kw, "pipeline": "per_sample"}, seed=4)
    batched = build_data("cifar10", kw, seed=4)
    assert "per-sample" in per_sample.use_device(CPU) and "batched" in batched.use_device(CPU)
    assert batched.batched and not per_sample.batched
    for e in (0, 1):
        pairs = zip(per_sample.train_loader(e), batched.train_loader(e), strict=True)
        assert all(torch.equal(x0, x1) and torch.equal(y0, y1) for (x0, y0), (x1, y1) in pairs)
    pairs = zip(per_sample.test_loader(), batched.test_loader(), strict=True)
    assert all(torch.equal(x0, x1) and torch.equal(y0, y1) for (x0, y0), (x1, y1) in pairs)


SPEC = """data cifar10(root="cifar", batch_size=16, num_workers=0, pipeline="{pipeline}")
network a, b = builtin.cnn(num_classes=10, in_channels=3, width=4)
dml(a, b, epochs=2, optimizer=sgd(lr=0.05, momentum=0.9))
"""


def _final(out: Path) -> dict[str, torch.Tensor]:
    from xdsl.checkpoint import load_checkpoint

    return load_checkpoint(out / "checkpoints" / "dml" / "final.pt")["modules"]


@pytest.mark.slow
def test_runs_train_identically_on_both_paths_and_a_resumed_batched_run_is_bit_identical(tmp_path):
    from xdsl.train.runner import RunOptions, run

    _cifar_dir(tmp_path / "cifar")
    specs = {}
    for pipeline in ("batched", "per_sample"):
        specs[pipeline] = tmp_path / f"{pipeline}.xspec"
        specs[pipeline].write_text(SPEC.format(pipeline=pipeline))
    opts = {"quiet": True, "device": "cpu"}
    outs = {p: tmp_path / p for p in specs}
    results = {p: run(specs[p], RunOptions(out=outs[p], **opts)) for p in specs}
    assert results["batched"]["results"][0]["data"].startswith("batched pipeline on cpu")
    assert results["per_sample"]["results"][0]["data"].startswith("per-sample pipeline")
    want = _final(outs["per_sample"])
    got = _final(outs["batched"])
    assert all(torch.equal(got[k], want[k]) for k in want)

    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run(specs["batched"], RunOptions(out=resumed, stop_after_steps=13, **opts))  # epoch 2, batch 3
    run(specs["batched"], RunOptions(out=resumed, resume=True, **opts))
    got = _final(resumed)
    assert all(torch.equal(got[k], want[k]) for k in want)
