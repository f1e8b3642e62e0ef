"""Contrastive representation distillation (CRD; Tian, Krishnan & Isola, ICLR 2020) as a stateful loss module.

The math follows the authors' code, RepDistiller (https://github.com/HobbitLong/RepDistiller):
`crd/criterion.py` (`CRDLoss`, `Embed`, `Normalize`, `ContrastLoss`) and `crd/memory.py`
(`ContrastMemory`), with the contrast indices drawn as `dataset/cifar100.py`'s `CIFAR100InstanceSample`
does in its default `mode='exact'` when labels are given. `tests/test_crd.py` runs RepDistiller's classes
beside this module on the same weights, memory and contrast indices and compares loss, gradients and memory.

What differs from RepDistiller, and why:
- The normalisation constants Z (set from the first batch) live in a buffer and are set branch-free
  (`torch.where`), so a step has no host sync and torch.compile traces it; the values are the same.
- The memory bank's size (the number of training samples) is not known when a spec is compiled: the
  module is built with empty banks and `bind_data(labels)` sizes and initialises them before training
  (a loaded checkpoint brings its own banks, whatever their size).
- Negatives are drawn with torch (on the module's device, from the global torch generator unless a
  `generator` is set) rather than by numpy in a data-loader worker: `contrast_indices`. With labels they
  are drawn, as RepDistiller's 'exact' mode, without replacement from the samples of the other classes
  (with replacement when a class has fewer than `nce_k` samples of other classes); without labels, as its
  `AliasMethod` on uniform weights, uniformly with replacement from every sample. Soft labels (mixup,
  cutmix) count as their dominant class.
- The loss is a 0-dim tensor (RepDistiller's has shape (1,)); it is computed in float32 under `--amp` too.
- Under torchrun every process updates its memory banks with the features and indices of every
  process's batch (all_gather), so the banks stay identical across processes, and Z is the mean over
  processes; see `xdsl.distributed.gather_batches`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from xdsl.distributed import all_reduce_mean, gather_batches

__all__ = ["CRD", "Embed", "contrast_loss", "EPS"]

EPS = 1e-7  # RepDistiller's eps in ContrastLoss


class Embed(nn.Module):
    """Flatten, linear map to `dim_out`, L2-normalise each row (RepDistiller's `Embed` with `Normalize(2)`)."""

    def __init__(self, dim_in: int, dim_out: int = 128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(x.reshape(x.shape[0], -1))
        return x.div(x.pow(2).sum(1, keepdim=True).pow(0.5))


def contrast_loss(x: Tensor, n_data: int) -> Tensor:
    """NCE loss of the CRD paper's Eq. (18) (RepDistiller's `ContrastLoss`): `x` is (B, K+1, 1), the
    positive's score first; noise distribution uniform over the `n_data` training samples."""
    bsz, m = x.shape[0], x.shape[1] - 1
    pn = 1.0 / float(n_data)
    p_pos = x.select(1, 0)
    log_d1 = torch.div(p_pos, p_pos.add(m * pn + EPS)).log()
    p_neg = x.narrow(1, 1, m)
    log_d0 = torch.div(torch.full_like(p_neg, m * pn), p_neg.add(m * pn + EPS)).log()
    return (-(log_d1.sum(0) + log_d0.reshape(-1, 1).sum(0)) / bsz).squeeze(0)


class CRD(nn.Module):
    """CRD between a teacher and a student feature: two embedding heads (trained) and two memory banks.

    `forward(t, s, i, y=None)` takes the teacher's and the student's features (any shape, flattened per
    sample), the batch's sample indices `i` into the training set and optionally its labels `y` (then
    negatives come from other classes), returns the loss and updates the memory banks with momentum.
    The teacher feature is detached; gradient reaches the student feature and both heads.
    """

    def __init__(self, t_dim: int, s_dim: int, feat_dim: int = 128, nce_k: int = 16384, nce_t: float = 0.07,
                 nce_m: float = 0.5):
        super().__init__()
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        self.feat_dim, self.nce_k, self.nce_t, self.nce_m = feat_dim, nce_k, nce_t, nce_m
        self.register_buffer("memory_s", torch.empty(0, feat_dim))   # RepDistiller's memory_v1 (student)
        self.register_buffer("memory_t", torch.empty(0, feat_dim))   # memory_v2 (teacher)
        self.register_buffer("z", torch.full((2,), -1.0))           # Z_v1, Z_v2; < 0: not set yet
        self.register_buffer("labels", torch.empty(0, dtype=torch.long))  # of every training sample
        self.generator: torch.Generator | None = None  # None: the global torch generator (checkpointed)
        self._replace = True

    @property
    def n_data(self) -> int:
        return self.memory_s.shape[0]

    def extra_repr(self) -> str:
        return f"feat_dim={self.feat_dim}, nce_k={self.nce_k}, nce_t={self.nce_t}, nce_m={self.nce_m}, " \
               f"n_data={self.n_data}"

    def bind_data(self, labels: Tensor, seed: int = 0) -> None:
        """Size the memory banks for the training set (`labels`: one per sample) and initialise them as
        RepDistiller does, uniform in [-stdv, stdv] with stdv = 1/sqrt(feat_dim/3) (from a generator seeded
        `seed`, so the global random stream is untouched and every process draws the same banks)."""
        device = self.z.device
        n = len(labels)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        gen = torch.Generator().manual_seed(int(seed))
        for name in ("memory_s", "memory_t"):
            bank = torch.rand(n, self.feat_dim, generator=gen).mul_(2 * stdv).add_(-stdv)
            setattr(self, name, bank.to(device))
        self.z = torch.full((2,), -1.0, device=device)
        self.set_labels(labels)

    def set_labels(self, labels: Tensor) -> None:
        """The label of every training sample (for negatives of other classes, RepDistiller's 'exact' mode)."""
        self.labels = labels.to(self.z.device, torch.long)
        self._set_replace()

    def _set_replace(self) -> None:
        counts = torch.bincount(self.labels) if len(self.labels) else torch.zeros(1, dtype=torch.long)
        fewest_negatives = len(self.labels) - int(counts.max())
        self._replace = self.nce_k > fewest_negatives

    def contrast_indices(self, i: Tensor, y: Tensor | None = None) -> Tensor:
        """(B, nce_k + 1) sample indices: the positive `i` first, then the negatives (see the module doc)."""
        n, k, b = self.n_data, self.nce_k, i.shape[0]
        if y is None:
            idx = torch.randint(n, (b, k + 1), device=i.device, generator=self.generator)
        else:
            if y.is_floating_point():  # soft labels (mixup, cutmix): each sample's dominant class
                y = y.argmax(dim=1)
            if len(self.labels) != n:
                raise RuntimeError("crd: negatives of other classes need the training labels (bind_data)")
            others = (self.labels.unsqueeze(0) != y.unsqueeze(1)).float()
            negatives = torch.multinomial(others, k, replacement=self._replace, generator=self.generator)
            idx = torch.cat([i.unsqueeze(1), negatives], dim=1)
        idx[:, 0] = i
        return idx

    def forward(self, t: Tensor, s: Tensor, i: Tensor, y: Tensor | None = None,
                contrast_idx: Tensor | None = None) -> Tensor:
        if self.n_data == 0:
            raise RuntimeError("crd: the memory banks are empty; bind_data(train_labels) sizes them")
        with torch.autocast(s.device.type, enabled=False):  # fp32 as RepDistiller, also under --amp
            return self._loss(t.detach().float(), s.float(), i, y, contrast_idx)

    def _loss(self, t: Tensor, s: Tensor, i: Tensor, y: Tensor | None, contrast_idx: Tensor | None) -> Tensor:
        v1, v2 = self.embed_s(s), self.embed_t(t)
        idx = self.contrast_indices(i, y) if contrast_idx is None else contrast_idx
        bsz, k1 = idx.shape
        w1 = torch.index_select(self.memory_s, 0, idx.reshape(-1)).detach().view(bsz, k1, self.feat_dim)
        out_v2 = torch.exp(torch.div(torch.bmm(w1, v2.view(bsz, self.feat_dim, 1)), self.nce_t))
        w2 = torch.index_select(self.memory_t, 0, idx.reshape(-1)).detach().view(bsz, k1, self.feat_dim)
        out_v1 = torch.exp(torch.div(torch.bmm(w2, v1.view(bsz, self.feat_dim, 1)), self.nce_t))
        with torch.no_grad():
            first = all_reduce_mean(torch.stack([out_v1.mean(), out_v2.mean()])) * self.n_data
            self.z.copy_(torch.where(self.z < 0, first, self.z))
        z = self.z.clone()
        out_v1, out_v2 = torch.div(out_v1, z[0]), torch.div(out_v2, z[1])
        self._update_memory(v1.detach(), v2.detach(), i)
        return contrast_loss(out_v1, self.n_data) + contrast_loss(out_v2, self.n_data)

    @torch.no_grad()
    def _update_memory(self, v1: Tensor, v2: Tensor, i: Tensor) -> None:
        """Momentum update of the positives' rows, renormalised (RepDistiller's ContrastMemory), with
        every process's batch under torchrun."""
        v1, v2, i = gather_batches(v1, v2, i)
        for bank, v in ((self.memory_s, v1), (self.memory_t, v2)):
            pos = torch.index_select(bank, 0, i.reshape(-1))
            pos.mul_(self.nce_m)
            pos.add_(torch.mul(v, 1 - self.nce_m))
            norm = pos.pow(2).sum(1, keepdim=True).pow(0.5)
            bank.index_copy_(0, i, pos.div(norm))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """A checkpoint's banks and labels fit whatever size this module has (it is built before the data
        is known)."""
        for name in ("memory_s", "memory_t", "labels"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=self.z.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._set_replace()
