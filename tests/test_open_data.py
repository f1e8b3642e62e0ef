"""The researcher's own data: image folders, ImageNet's layout, torchvision datasets on disk, user functions.

Every dataset here is fabricated in its real on-disk format in a temporary directory (tiny PNG/JPEG files
written with PIL), so the readers are exercised on the files they will meet.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from xdsl.data import DataParamError, build_data
from xdsl.data.images import IMAGENET_MEAN, IMAGENET_STD
from xdsl.errors import SpecError, XdslError
from xdsl.lang.check import check
from xdsl.lang.format import format_spec
from xdsl.lang.parser import parse

CPU = torch.device("cpu")


def _write_image(path: Path, rng: np.random.Generator, size: tuple[int, int], mode: str = "RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (*size, 3) if mode == "RGB" else size
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode).save(path)


def _folder(root: Path, classes=("cat", "dog", "emu"), per_class: int = 3, size=(16, 16), val=None) -> Path:
    """root/train/<class>/*.png and root/val/<class>/*.jpg, images of `size` (one grayscale, one nested)."""
    rng = np.random.default_rng(0)
    for split, n, ext in (("train", per_class, "png"), ("val", 2, "jpg")):
        for c in (classes if split == "train" or val is None else val):
            for i in range(n):
                _write_image(root / split / c / f"{i}.{ext}", rng, size)
    _write_image(root / "train" / classes[0] / "nested" / "g.png", rng, size, mode="L")  # ImageFolder walks
    return root


def _first_batches(bundle, epoch: int = 0):
    return list(bundle.train_loader(epoch)), list(bundle.test_loader())


# ------------------------------------------------------------------------------------ image_folder


def test_image_folder_reads_the_layout_like_torchvisions_imagefolder(tmp_path):
    from torchvision.datasets import ImageFolder

    root = _folder(tmp_path / "pets")
    bundle = build_data("image_folder", {"root": str(root), "size": 16, "num_workers": 0})
    reference = ImageFolder(str(root / "train"))
    assert bundle.classes == reference.classes == ["cat", "dog", "emu"] and bundle.num_classes == 3
    assert bundle.input_shape == (3, 16, 16) and len(bundle.train) == 10 and len(bundle.test) == 6
    assert bundle.train.labels.tolist() == [label for _, label in reference.samples]
    # small images: decoded once into the uint8 cache at their size, so the batched pipeline applies
    assert bundle.train.images.dtype == torch.uint8 and bundle.train.images.shape == (10, 3, 16, 16)
    assert (root / ".xdsl-cache").is_dir()
    pil = v2.Compose([v2.PILToTensor()])
    first = pil(reference[0][0].convert("RGB"))
    assert torch.equal(bundle.train.images[0], first)
    eval_x, _ = bundle.test[0]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(eval_x, (bundle.test.images[0] / 255 - mean) / std)
    recipe = bundle.train.recipe()
    assert (recipe.crop, recipe.flip, recipe.pad) == ("pad", True, 4)  # the CIFAR recipe for small images


def test_image_folder_batched_and_per_sample_pipelines_give_the_same_batches(tmp_path):
    root = _folder(tmp_path / "pets", size=(12, 20))
    kw = {"root": str(root), "size": 16, "num_workers": 0, "batch_size": 4}
    per_sample, batched = (build_data("image_folder", {**kw, "pipeline": p}, seed=3) for p in ("per_sample", "auto"))
    assert "per-sample" in per_sample.use_device(CPU) and "batched" in batched.use_device(CPU)
    for (xs, ys), (xb, yb) in zip(*(_first_batches(b, 1)[0] for b in (per_sample, batched)), strict=True):
        assert torch.equal(xs, xb) and torch.equal(ys, yb) and xs.shape[1:] == (3, 16, 16)


def test_large_images_get_random_resized_crops_and_a_centre_crop_cached_or_not(tmp_path):
    root = _folder(tmp_path / "big", size=(96, 120), per_class=2)
    kw = {"root": str(root), "size": 80, "num_workers": 0, "batch_size": 3, "mean": [0.5, 0.5, 0.5],
          "std": [0.25, 0.25, 0.25]}
    cached = build_data("image_folder", kw, seed=1)
    files = build_data("image_folder", {**kw, "cache": False}, seed=1)
    assert cached.train.images.shape[-2:] == (91, 91)  # resize = 80 * 256/224, the centre square kept
    assert cached.train.recipe().crop == "resized" and cached.test.recipe().crop == "center"
    assert files.test.recipe().resize == 91 and not hasattr(files.train, "images")
    for bundle in (cached, files):
        bundle.use_device(CPU)
        train, test = _first_batches(bundle)
        assert all(x.shape[1:] == (3, 80, 80) for x, _ in train + test)
    # evaluation: Resize(91) + CenterCrop(80) of the file, the same whether decoded once or per sample
    from PIL import Image

    tv = v2.Compose([v2.PILToTensor(), v2.Resize(91), v2.CenterCrop(80), v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize([0.5] * 3, [0.25] * 3)])
    with Image.open(files.test.paths[0]) as img:
        expected = tv(img.convert("RGB"))
    assert torch.equal(files.test[0][0], cached.test[0][0])  # the same pixels, the same arithmetic
    torch.testing.assert_close(files.test[0][0], expected, rtol=0, atol=1e-5)  # normalisation rounds differently


def test_imagenet_reads_native_sizes_per_sample_with_the_standard_recipes(tmp_path):
    root = tmp_path / "ILSVRC2012"
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for k, wnid in enumerate(("n01440764", "n01443537")):
            _write_image(root / split / wnid / f"{wnid}_{k}.JPEG", rng, (260 + 10 * k, 300))
    bundle = build_data("imagenet", {"root": str(root), "num_workers": 0, "batch_size": 2})
    assert bundle.input_shape == (3, 224, 224) and bundle.classes == ["n01440764", "n01443537"]
    assert "per-sample" in bundle.use_device(CPU)  # too large to cache by default
    train, test = _first_batches(bundle)
    assert [x.shape for x, _ in train + test] == [(2, 3, 224, 224)] * 2
    from PIL import Image

    tv = v2.Compose([v2.PILToTensor(), v2.Resize(256), v2.CenterCrop(224), v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    with Image.open(bundle.test.paths[1]) as img:
        torch.testing.assert_close(bundle.test[1][0], tv(img.convert("RGB")), rtol=0, atol=1e-5)
    recipe = bundle.train.recipe()
    assert (recipe.crop, recipe.size, recipe.flip, recipe.scale) == ("resized", (224, 224), True, (0.08, 1.0))


# --------------------------------------------------------------------------------- located errors


@pytest.mark.parametrize("case, match", [
    ("no_root", r"does not exist.*expected .*train/<class>"),
    ("no_val", r"val does not exist"),
    ("no_classes", r"train has no class folders"),
    ("empty_class", r"class folder .*train/dog has no image"),
    ("mismatch", r"class folders of .*train and .*val differ: .*val lacks emu; .*train lacks fox"),
    ("unreadable", r"cannot decode image .*broken\.png"),
])
def test_folder_mistakes_are_one_error_naming_the_path(tmp_path, case, match):
    root = tmp_path / "data"
    if case == "no_val":
        _folder(root)
        import shutil

        shutil.rmtree(root / "val")
    elif case == "no_classes":
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
    elif case == "empty_class":
        _folder(root)
        for f in (root / "train" / "dog").iterdir():
            f.unlink()
    elif case == "mismatch":
        _folder(root, val=("cat", "dog", "fox"))
    elif case == "unreadable":
        _folder(root)
        (root / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataParamError, match=match) as info:
        build_data("image_folder", {"root": str(root), "size": 16, "num_workers": 0})
    assert info.value.key == "root" and info.value.hint


def test_folder_parameters_are_checked(tmp_path):
    root = _folder(tmp_path / "d")
    for kw, match in (({"mean": [0.5, 0.5]}, "mean.*3 numbers"), ({"std": [1, 0, 1]}, "std.*positive"),
                      ({"size": 32, "resize": 16}, "resize"), ({}, "root= is required")):
        with pytest.raises(DataParamError, match=match):
            build_data("image_folder", {"root": str(root), **kw} if kw else {})
    with pytest.raises(DataParamError, match=r"nowhere does not exist") as info:
        build_data("imagenet", {"root": str(tmp_path / "nowhere")})
    assert "cannot be downloaded automatically" in info.value.hint and "image-net.org" in info.value.hint


# ----------------------------------------------------------------------------------- the language


def test_data_names_may_be_dotted_or_strings_and_print_back():
    text = 'data torchvision.SVHN(root="svhn")\n\ndata "my_data.load:make"(n=3)\n'
    spec = parse(text)
    assert [s.name for s in spec.statements] == ["torchvision.SVHN", "my_data.load:make"]
    assert format_spec(spec) == text
    assert parse(format_spec(spec)) == spec


def test_check_knows_an_image_folders_input_shape_without_reading_it():
    from xdsl.compile.assemble import input_shape_of

    program = check(parse('data image_folder(root="nowhere", size=48)\nnetwork a = builtin.cnn(num_classes=3)\n'))
    assert input_shape_of(program) == (3, 48, 48)
    with pytest.raises((SpecError, XdslError), match="unknown dataset 'image_foldr'.*"):
        check(parse('data image_foldr(root="x")\n'))
