"""Person re-identification data: Market-1501 read from its release layout, and a fabricated twin.

Re-id trains an identity classifier on the training identities and evaluates by retrieval on
*other* identities: each query image is matched against a gallery (`retrieval(...)` in `evaluate`).
A re-id DataBundle therefore carries a `RetrievalSplit` (query and gallery images with identity and
camera), and its `test` split is the query set, used only for shape inference.

    data market1501(root="data/Market-1501-v15.09.15", batch_size=16)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from xdsl.data.bundle import DataBundle
from xdsl.data.images import ImageFiles
from xdsl.data.params import BuildContext, DataParamError, require

__all__ = ["RetrievalSplit", "market1501", "parse_market_name", "synthetic_reid", "MARKET_NAME"]

MARKET_NAME = re.compile(r"^(-1|\d{4})_c(\d)s(\d)_(\d{6})_(\d{2})\.jpg$")
"""`PPPP_cCsS_FFFFFF_NN.jpg`: person id (`-1` junk, `0000` distractor), camera, sequence, frame, box."""
MARKET_DIRS = ("bounding_box_train", "bounding_box_test", "query")
MARKET_CAMERAS = 6
JUNK, DISTRACTOR = -1, 0


@dataclass
class RetrievalSplit:
    """Query and gallery images (datasets yielding `(image, identity)`) with identity and camera tensors."""

    query: Dataset
    gallery: Dataset
    query_ids: Tensor
    query_cams: Tensor
    gallery_ids: Tensor
    gallery_cams: Tensor

    def loaders(self, batch_size: int, num_workers: int = 0) -> tuple[DataLoader, DataLoader]:
        """Query and gallery loaders in dataset order (features line up with the id/camera tensors)."""
        kw = {"batch_size": batch_size, "shuffle": False, "num_workers": num_workers}
        return DataLoader(self.query, **kw), DataLoader(self.gallery, **kw)


def parse_market_name(path: Path) -> tuple[int, int]:
    """(person id, camera) of a Market-1501 file; a malformed name is an error naming the file."""
    m = MARKET_NAME.match(path.name)
    if m is None or not 1 <= int(m.group(2)) <= MARKET_CAMERAS:
        raise DataParamError(
            f"{path}: not a Market-1501 image name (expected PPPP_cCsS_FFFFFF_NN.jpg: a 4-digit person id "
            f"or -1, camera 1..{MARKET_CAMERAS}, sequence, 6-digit frame, 2-digit box, e.g. 0002_c1s1_000451_03.jpg)",
            dataset="market1501",
            key="root",
        )
    return int(m.group(1)), int(m.group(2))


def _read_dir(directory: Path) -> tuple[list[str], list[int], list[int]]:
    """Every .jpg of a Market-1501 directory in name order: paths, person ids, cameras (other files,
    such as the release's Thumbs.db, are ignored)."""
    with os.scandir(directory) as it:
        names = sorted(e.name for e in it if e.name.lower().endswith(".jpg"))
    paths, ids, cams = [], [], []
    for name in names:
        pid, cam = parse_market_name(directory / name)
        paths.append(str(directory / name))
        ids.append(pid)
        cams.append(cam)
    return paths, ids, cams


def market1501(
    ctx: BuildContext,
    *,
    root: str = "data/Market-1501-v15.09.15",
    height: int = 224,
    width: int = 224,
    batch_size: int = 16,
    num_workers: int = 4,
    augment: bool = True,
) -> DataBundle:
    """Market-1501 (Zheng et al. 2015): 751 training identities, 3,368 queries against a 15,913-image gallery.

    The recipe of the DML paper's released code: images resized to 224x224 (the networks' ImageNet input
    size), random horizontal flips when training, pixels scaled to [-1, 1]; batch size 16 as in the paper.
    Training identities are relabelled 0..750 in id order. Junk images (`-1_...`) are dropped from every
    split (the protocol gives them no influence); distractors (`0000_...`) stay in the gallery as
    non-matches and are dropped from training.
    """
    for key, value in (("height", height), ("width", width), ("batch_size", batch_size)):
        require(value >= 1, ctx, key, "a positive integer", value)
    require(num_workers >= 0, ctx, "num_workers", "a non-negative integer", num_workers)
    path = ctx.resolve(root)
    missing = [d for d in MARKET_DIRS if not (path / d).is_dir()]
    if missing:
        what = f"directory {path} does not exist" if not path.is_dir() else \
            f"{path} has no {', '.join(d + '/' for d in missing)}"
        raise DataParamError(
            f"dataset '{ctx.name}' not found: {what}{ctx.where(root)}; expected the Market-1501 release layout "
            f"{path}/{{{','.join(MARKET_DIRS)}}}/PPPP_cCsS_FFFFFF_NN.jpg",
            dataset=ctx.name,
            key="root",
            hint="unzip Market-1501-v15.09.15.zip (from the dataset authors' page) so that "
            f"{path / 'bounding_box_train'} exists, or set root= to where it is",
        )
    train_paths, train_ids, _ = _read_dir(path / "bounding_box_train")
    keep = [i for i, pid in enumerate(train_ids) if pid not in (JUNK, DISTRACTOR)]
    identities = sorted({train_ids[i] for i in keep})
    if not identities:
        raise DataParamError(f"{path / 'bounding_box_train'} holds no identity images", dataset=ctx.name, key="root")
    label = {pid: k for k, pid in enumerate(identities)}
    common = {"size": (height, width), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "pad": 0,
              "seed": ctx.seed}
    train = ImageFiles([train_paths[i] for i in keep], torch.tensor([label[train_ids[i]] for i in keep]),
                       augment=augment, **common)
    split = _image_split(path, common)
    return DataBundle(
        train=train,
        test=split.query,
        num_classes=len(identities),
        input_shape=(3, height, width),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=ctx.device_is_cuda,
        name=ctx.name,
        classes=[f"{pid:04d}" for pid in identities],
        retrieval=split,
    )


def _image_split(path: Path, common: dict) -> RetrievalSplit:
    sets = {}
    for name in ("query", "bounding_box_test"):
        paths, ids, cams = _read_dir(path / name)
        kept = [i for i, pid in enumerate(ids) if pid != JUNK]
        if not kept:
            raise DataParamError(f"{path / name} holds no images", dataset="market1501", key="root")
        ids_t = torch.tensor([ids[i] for i in kept])
        images = ImageFiles([paths[i] for i in kept], ids_t, augment=False, **common)
        sets[name] = (images, ids_t, torch.tensor([cams[i] for i in kept]))
    (q, q_ids, q_cams), (g, g_ids, g_cams) = sets["query"], sets["bounding_box_test"]
    return RetrievalSplit(q, g, q_ids, q_cams, g_ids, g_cams)


def synthetic_reid(
    ctx: BuildContext,
    *,
    identities: int = 16,
    test_identities: int = 16,
    cameras: int = 3,
    images_per_camera: int = 3,
    distractors: int = 8,
    junk: int = 4,
    shape: tuple[int, ...] = (3, 16, 8),
    camera_shift: float = 0.5,
    noise: float = 0.7,
    batch_size: int = 32,
    seed: int = 0,
) -> DataBundle:
    """Fabricated identities seen by several cameras, for CI-sized re-id runs; fully determined by `seed`.

    An image is its identity's mean + its camera's offset + noise. Training uses `identities`; retrieval
    uses `test_identities` others: one query per identity and camera, the rest of their images in the
    gallery (including same-camera ones the protocol excludes), plus distractors (id 0) and junk (id -1).
    """
    for key, value in (("identities", identities), ("test_identities", test_identities), ("cameras", cameras),
                       ("batch_size", batch_size)):
        require(value >= 1, ctx, key, "a positive integer", value)
    require(cameras >= 2, ctx, "cameras", "an integer >= 2 (re-id matches across cameras)", cameras)
    require(images_per_camera >= 2, ctx, "images_per_camera", "an integer >= 2", images_per_camera)
    require(distractors >= 0, ctx, "distractors", "a non-negative integer", distractors)
    require(junk >= 0, ctx, "junk", "a non-negative integer", junk)
    require(len(shape) >= 1 and all(isinstance(d, int) and d >= 1 for d in shape), ctx, "shape",
            "a non-empty list of positive integers", shape)
    shape = tuple(shape)
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(identities + test_identities, *shape, generator=gen)
    offsets = camera_shift * torch.randn(cameras, *shape, generator=gen)

    def images(person: int, cam: int, n: int) -> Tensor:
        return means[person] + offsets[cam] + noise * torch.randn(n, *shape, generator=gen)

    x_train = torch.cat([images(p, c, images_per_camera) for p in range(identities) for c in range(cameras)])
    y_train = torch.arange(identities).repeat_interleave(cameras * images_per_camera)
    q_x, q_ids, q_cams, g_x, g_ids, g_cams = [], [], [], [], [], []
    for p in range(identities, identities + test_identities):
        pid = 1000 + p  # raw identities, unrelated to the training labels
        for c in range(cameras):
            x = images(p, c, images_per_camera)
            q_x.append(x[:1])
            q_ids.append(pid)
            q_cams.append(c + 1)
            g_x.append(x[1:])
            g_ids += [pid] * (images_per_camera - 1)
            g_cams += [c + 1] * (images_per_camera - 1)
    for pid, count in ((DISTRACTOR, distractors), (JUNK, junk)):
        if count:
            g_x.append(torch.randn(count, *shape, generator=gen))
            g_ids += [pid] * count
            g_cams += torch.randint(1, cameras + 1, (count,), generator=gen).tolist()
    query = TensorDataset(torch.cat(q_x), torch.tensor(q_ids))
    gallery = TensorDataset(torch.cat(g_x), torch.tensor(g_ids))
    split = RetrievalSplit(query, gallery, torch.tensor(q_ids), torch.tensor(q_cams), torch.tensor(g_ids),
                           torch.tensor(g_cams))
    return DataBundle(
        train=TensorDataset(x_train, y_train),
        test=query,
        num_classes=identities,
        input_shape=shape,
        batch_size=batch_size,
        num_workers=0,
        pin_memory=ctx.device_is_cuda,
        name=ctx.name,
        classes=[str(i) for i in range(identities)],
        retrieval=split,
    )
