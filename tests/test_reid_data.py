"""Market-1501 read from a fabricated copy of its release layout, and the fabricated `synthetic_reid` set."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from xdsl.data import RETRIEVAL_DATASETS, DataParamError, build_data, dataset_params
from xdsl.data.reid import parse_market_name

# (directory, file name) of every image: ids 0002/0007/0010 train; 0003/0005 are test identities;
# 0000 distractors and -1 junk in the gallery (and one of each in training, to be dropped there).
MARKET_FILES = {
    "bounding_box_train": [
        "0010_c1s1_000151_01.jpg", "0010_c2s1_000176_02.jpg", "0002_c1s1_000451_03.jpg",
        "0002_c3s1_000551_01.jpg", "0007_c2s1_000321_01.jpg", "0007_c6s1_000876_04.jpg",
        "0000_c1s1_000001_01.jpg", "-1_c2s1_000002_01.jpg",
    ],
    "bounding_box_test": [
        "0003_c1s1_000100_01.jpg",  # same identity and camera as query 0003_c1: excluded for it
        "0003_c2s1_000200_01.jpg", "0003_c4s2_000300_02.jpg",
        "0005_c1s1_000400_01.jpg", "0005_c5s3_000500_01.jpg",
        "0000_c1s1_000600_01.jpg", "0000_c3s1_000700_02.jpg",  # distractors
        "-1_c2s1_000800_01.jpg",  # junk
    ],
    "query": ["0003_c1s1_000010_00.jpg", "0005_c2s1_000020_00.jpg"],
}


def make_market(root: Path, files: dict[str, list[str]] = MARKET_FILES, size: tuple[int, int] = (128, 64)) -> Path:
    """Write a Market-1501 directory: 64x128 JPEGs (the release's size), colour per identity and camera."""
    from PIL import Image

    for directory, names in files.items():
        (root / directory).mkdir(parents=True, exist_ok=True)
        for name in names:
            pid, cam = parse_market_name(Path(name))
            gen = torch.Generator().manual_seed(abs(pid) * 10 + cam)
            pixels = (torch.rand(3, 1, 1, generator=gen) * 255 + torch.randn(3, *size, generator=gen) * 8)
            Image.fromarray(pixels.clamp(0, 255).byte().permute(1, 2, 0).numpy()).save(root / directory / name)
    (root / "bounding_box_test" / "Thumbs.db").write_bytes(b"\0")  # the release ships these; ignored
    return root


@pytest.fixture
def market(tmp_path: Path) -> Path:
    return make_market(tmp_path / "Market-1501-v15.09.15")


def test_market1501_is_a_retrieval_dataset_with_the_papers_recipe_by_default():
    assert {"market1501", "synthetic_reid"} <= RETRIEVAL_DATASETS
    params = dataset_params("market1501")
    assert (params["height"], params["width"], params["batch_size"], params["augment"]) == (224, 224, 16, True)


def test_market1501_relabels_training_identities_in_id_order_and_drops_junk_and_distractors(market: Path):
    bundle = build_data("market1501", {"root": str(market), "num_workers": 0, "height": 32, "width": 16})
    assert bundle.num_classes == 3 and bundle.classes == ["0002", "0007", "0010"]
    assert bundle.input_shape == (3, 32, 16)
    labels = sorted(int(y) for y in bundle.train.labels)
    assert labels == [0, 0, 1, 1, 2, 2]  # 0000 and -1 training images are not identities
    names = [Path(p).name[:4] for p in bundle.train.paths]
    assert all({"0002": 0, "0007": 1, "0010": 2}[n] == int(y) for n, y in zip(names, bundle.train.labels))


def test_market1501_query_and_gallery_keep_distractors_and_drop_junk(market: Path):
    split = build_data("market1501", {"root": str(market), "num_workers": 0}).retrieval
    assert split.query_ids.tolist() == [3, 5] and split.query_cams.tolist() == [1, 2]
    assert split.gallery_ids.tolist() == [0, 0, 3, 3, 3, 5, 5]  # name order; the -1 image is gone
    assert split.gallery_cams.tolist() == [1, 3, 1, 2, 4, 1, 5]
    assert len(split.gallery) == 7 and len(split.query) == 2


def test_market1501_images_are_resized_scaled_to_minus_one_one_and_flipped_only_in_training(market: Path):
    bundle = build_data("market1501", {"root": str(market), "num_workers": 0, "height": 40, "width": 20})
    plain = build_data("market1501", {"root": str(market), "num_workers": 0, "height": 40, "width": 20,
                                      "augment": False})
    x, _ = plain.train[0]
    assert x.shape == (3, 40, 20) and x.min() >= -1.0 and x.max() <= 1.0
    flips = set()
    for epoch in range(8):
        bundle.train.set_epoch(epoch)
        a, _ = bundle.train[0]
        assert torch.equal(a, x) or torch.equal(a, TF.horizontal_flip(x))
        flips.add(torch.equal(a, x))
    assert flips == {True, False}  # both orientations occur over epochs
    q, pid = bundle.retrieval.query[0]
    assert q.shape == (3, 40, 20) and int(pid) == 3


def test_missing_market1501_directory_names_the_path(tmp_path: Path):
    with pytest.raises(DataParamError, match="Market-1501 release layout") as e:
        build_data("market1501", {"root": str(tmp_path / "nowhere")})
    assert f"directory {tmp_path / 'nowhere'} does not exist" in e.value.message
    (tmp_path / "m" / "query").mkdir(parents=True)
    with pytest.raises(DataParamError) as e:
        build_data("market1501", {"root": str(tmp_path / "m")})
    assert f"{tmp_path / 'm'} has no bounding_box_train/, bounding_box_test/" in e.value.message


@pytest.mark.parametrize("name", ["2_c1s1_000451_03.jpg", "0002_c7s1_000451_03.jpg", "0002_c1_000451_03.jpg",
                                  "abcd_c1s1_000451_03.jpg", "0002_c1s1_451_03.jpg"])
def test_malformed_market1501_file_name_is_an_error_naming_the_file(market: Path, name: str):
    bad = market / "query" / name
    bad.write_bytes(b"")
    with pytest.raises(DataParamError, match="not a Market-1501 image name") as e:
        build_data("market1501", {"root": str(market)})
    assert str(bad) in e.value.message


def test_missing_market1501_is_located_at_the_data_statement_when_running(tmp_path: Path):
    from typer.testing import CliRunner

    from xdsl.cli import app

    spec = tmp_path / "reid.xspec"
    spec.write_text('data market1501(root="nowhere")\nnetwork n = builtin.cnn(in_channels=3, width=4)\n'
                    "train { minimize ce(n, y) wrt n; steps 1 }\nevaluate retrieval\n")
    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert f"{spec}:1:1: error: dataset 'market1501' not found: directory {tmp_path / 'nowhere'}" in result.output


def test_synthetic_reid_is_deterministic_and_splits_identities_and_cameras():
    a = build_data("synthetic_reid", {"identities": 4, "test_identities": 3, "cameras": 2, "images_per_camera": 3,
                                      "distractors": 2, "junk": 1})
    b = build_data("synthetic_reid", {"identities": 4, "test_identities": 3, "cameras": 2, "images_per_camera": 3,
                                      "distractors": 2, "junk": 1})
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert a.num_classes == 4 and sorted(set(a.train.tensors[1].tolist())) == [0, 1, 2, 3]
    s = a.retrieval
    assert s.query_ids.tolist() == [1004, 1004, 1005, 1005, 1006, 1006] and s.query_cams.tolist() == [1, 2] * 3
    assert (s.gallery_ids == 0).sum() == 2 and (s.gallery_ids == -1).sum() == 1
    assert len(s.gallery) == 3 * 2 * 2 + 3 and not set(s.query_ids.tolist()) & set(range(4))
