# ruff: noqa: UP008  (the reference classes are kept as RepDistiller wrote them)
"""CRD (xdsl.contrastive) against the authors' code, RepDistiller, on the same weights, memory and negatives.

The reference classes below are copied from https://github.com/HobbitLong/RepDistiller (commit b84f547,
`crd/criterion.py` and `crd/memory.py`, BSD-2-Clause), changed only where modern torch or a CPU needs it:
`ContrastMemory` no longer moves its (unused here) AliasMethod to CUDA, and its "Z is set" print is dropped.
The contrast indices are drawn once (by xdsl's sampler, seeded) and handed to both, as RepDistiller's data
loader hands `contrast_idx` to `CRDLoss.forward`.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from xdsl.contrastive import CRD

torch.set_num_threads(1)

# ------------------------------------------------------------------- RepDistiller (reference, copied)

eps = 1e-7


class CRDLoss(nn.Module):
    def __init__(self, opt):
        super(CRDLoss, self).__init__()
        self.embed_s = Embed(opt.s_dim, opt.feat_dim)
        self.embed_t = Embed(opt.t_dim, opt.feat_dim)
        self.contrast = ContrastMemory(opt.feat_dim, opt.n_data, opt.nce_k, opt.nce_t, opt.nce_m)
        self.criterion_t = ContrastLoss(opt.n_data)
        self.criterion_s = ContrastLoss(opt.n_data)

    def forward(self, f_s, f_t, idx, contrast_idx=None):
        f_s = self.embed_s(f_s)
        f_t = self.embed_t(f_t)
        out_s, out_t = self.contrast(f_s, f_t, idx, contrast_idx)
        s_loss = self.criterion_s(out_s)
        t_loss = self.criterion_t(out_t)
        loss = s_loss + t_loss
        return loss


class ContrastLoss(nn.Module):
    def __init__(self, n_data):
        super(ContrastLoss, self).__init__()
        self.n_data = n_data

    def forward(self, x):
        bsz = x.shape[0]
        m = x.size(1) - 1
        Pn = 1 / float(self.n_data)
        P_pos = x.select(1, 0)
        log_D1 = torch.div(P_pos, P_pos.add(m * Pn + eps)).log_()
        P_neg = x.narrow(1, 1, m)
        log_D0 = torch.div(P_neg.clone().fill_(m * Pn), P_neg.add(m * Pn + eps)).log_()
        loss = - (log_D1.sum(0) + log_D0.view(-1, 1).sum(0)) / bsz
        return loss


class Embed(nn.Module):
    def __init__(self, dim_in=1024, dim_out=128):
        super(Embed, self).__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.l2norm = Normalize(2)

    def forward(self, x):
        x = x.view(x.shape[0], -1)
        x = self.linear(x)
        x = self.l2norm(x)
        return x


class Normalize(nn.Module):
    def __init__(self, power=2):
        super(Normalize, self).__init__()
        self.power = power

    def forward(self, x):
        norm = x.pow(self.power).sum(1, keepdim=True).pow(1. / self.power)
        out = x.div(norm)
        return out


class ContrastMemory(nn.Module):
    def __init__(self, inputSize, outputSize, K, T=0.07, momentum=0.5):
        super(ContrastMemory, self).__init__()
        self.nLem = outputSize
        self.unigrams = torch.ones(self.nLem)
        self.K = K
        self.register_buffer('params', torch.tensor([K, T, -1, -1, momentum]))
        stdv = 1. / math.sqrt(inputSize / 3)
        self.register_buffer('memory_v1', torch.rand(outputSize, inputSize).mul_(2 * stdv).add_(-stdv))
        self.register_buffer('memory_v2', torch.rand(outputSize, inputSize).mul_(2 * stdv).add_(-stdv))

    def forward(self, v1, v2, y, idx=None):
        K = int(self.params[0].item())
        T = self.params[1].item()
        Z_v1 = self.params[2].item()
        Z_v2 = self.params[3].item()
        momentum = self.params[4].item()
        batchSize = v1.size(0)
        outputSize = self.memory_v1.size(0)
        inputSize = self.memory_v1.size(1)
        weight_v1 = torch.index_select(self.memory_v1, 0, idx.view(-1)).detach()
        weight_v1 = weight_v1.view(batchSize, K + 1, inputSize)
        out_v2 = torch.bmm(weight_v1, v2.view(batchSize, inputSize, 1))
        out_v2 = torch.exp(torch.div(out_v2, T))
        weight_v2 = torch.index_select(self.memory_v2, 0, idx.view(-1)).detach()
        weight_v2 = weight_v2.view(batchSize, K + 1, inputSize)
        out_v1 = torch.bmm(weight_v2, v1.view(batchSize, inputSize, 1))
        out_v1 = torch.exp(torch.div(out_v1, T))
        if Z_v1 < 0:
            self.params[2] = out_v1.mean() * outputSize
            Z_v1 = self.params[2].clone().detach().item()
        if Z_v2 < 0:
            self.params[3] = out_v2.mean() * outputSize
            Z_v2 = self.params[3].clone().detach().item()
        out_v1 = torch.div(out_v1, Z_v1).contiguous()
        out_v2 = torch.div(out_v2, Z_v2).contiguous()
        with torch.no_grad():
            l_pos = torch.index_select(self.memory_v1, 0, y.view(-1))
            l_pos.mul_(momentum)
            l_pos.add_(torch.mul(v1, 1 - momentum))
            l_norm = l_pos.pow(2).sum(1, keepdim=True).pow(0.5)
            updated_v1 = l_pos.div(l_norm)
            self.memory_v1.index_copy_(0, y, updated_v1)
            ab_pos = torch.index_select(self.memory_v2, 0, y.view(-1))
            ab_pos.mul_(momentum)
            ab_pos.add_(torch.mul(v2, 1 - momentum))
            ab_norm = ab_pos.pow(2).sum(1, keepdim=True).pow(0.5)
            updated_v2 = ab_pos.div(ab_norm)
            self.memory_v2.index_copy_(0, y, updated_v2)
        return out_v1, out_v2


# ----------------------------------------------------------------------------------------- the test

N_DATA, CLASSES, B = 60, 4, 8
OPT = SimpleNamespace(s_dim=12, t_dim=2 * 3 * 3, feat_dim=16, nce_k=20, nce_t=0.07, nce_m=0.5, n_data=N_DATA)


def _pair(seed: int = 0) -> tuple[CRDLoss, CRD]:
    """RepDistiller's CRDLoss and xdsl's CRD with the same heads and memory banks."""
    torch.manual_seed(seed)
    ref = CRDLoss(OPT)
    ours = CRD(OPT.t_dim, OPT.s_dim, OPT.feat_dim, OPT.nce_k, OPT.nce_t, OPT.nce_m)
    ours.bind_data(torch.arange(N_DATA) % CLASSES, seed=seed)
    ours.embed_s.linear.load_state_dict(ref.embed_s.linear.state_dict())
    ours.embed_t.linear.load_state_dict(ref.embed_t.linear.state_dict())
    ours.memory_s.copy_(ref.contrast.memory_v1)
    ours.memory_t.copy_(ref.contrast.memory_v2)
    ours.generator = torch.Generator().manual_seed(seed + 1)
    return ref, ours


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    f_t = torch.randn(B, 2, 3, 3, generator=g)             # a teacher feature map, flattened by the heads
    f_s = torch.randn(B, OPT.s_dim, generator=g)
    idx = torch.randperm(N_DATA, generator=g)[:B]
    return f_t, f_s, idx, idx % CLASSES


@pytest.mark.parametrize("with_labels", [True, False])
def test_crd_equals_repdistiller_loss_gradients_and_memory_over_steps(with_labels: bool) -> None:
    ref, ours = _pair()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    our_opt = torch.optim.SGD(ours.parameters(), lr=0.5)
    for step in range(3):  # Z is set at the first step; later steps read it and the updated memory
        f_t, f_s, idx, y = _batch(step)
        contrast_idx = ours.contrast_indices(idx, y if with_labels else None)
        s_ref, s_ours = f_s.clone().requires_grad_(), f_s.clone().requires_grad_()
        loss_ref = ref(s_ref, f_t, idx, contrast_idx)
        loss_ours = ours(f_t, s_ours, idx, y if with_labels else None, contrast_idx=contrast_idx)
        assert loss_ours.dim() == 0 and loss_ref.shape == (1,)
        torch.testing.assert_close(loss_ours, loss_ref[0], rtol=1e-5, atol=1e-5)
        ref_opt.zero_grad()
        our_opt.zero_grad()
        loss_ref.sum().backward()
        loss_ours.backward()
        torch.testing.assert_close(s_ours.grad, s_ref.grad, rtol=1e-4, atol=1e-6)
        for name in ("embed_s", "embed_t"):
            for p_ours, p_ref in zip(getattr(ours, name).parameters(), getattr(ref, name).parameters()):
                torch.testing.assert_close(p_ours.grad, p_ref.grad, rtol=1e-4, atol=1e-6)
        ref_opt.step()
        our_opt.step()
        torch.testing.assert_close(ours.memory_s, ref.contrast.memory_v1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.memory_t, ref.contrast.memory_v2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.z, ref.contrast.params[2:4], rtol=1e-5, atol=1e-5)
        assert not torch.equal(ours.memory_s[idx], _pair()[1].memory_s[idx])  # the rows really moved


def test_teacher_feature_gets_no_gradient() -> None:
    _, ours = _pair()
    f_t, f_s, idx, y = _batch(0)
    f_t.requires_grad_()
    s = f_s.clone().requires_grad_()
    ours(f_t, s, idx, y).backward()
    assert f_t.grad is None and s.grad is not None and s.grad.abs().sum() > 0


def test_contrast_indices_positive_first_negatives_of_other_classes_without_replacement() -> None:
    _, ours = _pair()
    _, _, idx, y = _batch(0)
    c = ours.contrast_indices(idx, y)
    assert c.shape == (B, OPT.nce_k + 1) and torch.equal(c[:, 0], idx)
    labels = torch.arange(N_DATA) % CLASSES
    assert (labels[c[:, 1:]] != y.unsqueeze(1)).all()                 # RepDistiller's 'exact' mode
    assert all(len(set(row.tolist())) == OPT.nce_k for row in c[:, 1:])  # 45 others >= 20: no repeats
    ours.generator = torch.Generator().manual_seed(5)
    hard = ours.contrast_indices(idx, y)
    ours.generator = torch.Generator().manual_seed(5)
    soft = 0.7 * torch.nn.functional.one_hot(y, CLASSES) + 0.3 * torch.nn.functional.one_hot((y + 1) % CLASSES, CLASSES)
    assert torch.equal(ours.contrast_indices(idx, soft.float()), hard)  # mixup's soft labels: the dominant class
    free = ours.contrast_indices(idx)                                # no labels: uniform over every sample
    assert torch.equal(free[:, 0], idx) and free.min() >= 0 and free.max() < N_DATA
    # the same generator state gives the same indices (what lets the test hand both sides one draw)
    ours.generator = torch.Generator().manual_seed(7)
    a = ours.contrast_indices(idx, y)
    ours.generator = torch.Generator().manual_seed(7)
    assert torch.equal(a, ours.contrast_indices(idx, y))


def test_few_negatives_are_drawn_with_replacement() -> None:
    crd = CRD(4, 4, feat_dim=8, nce_k=50)
    crd.bind_data(torch.arange(30) % 3)  # 20 samples of other classes < 50
    i = torch.tensor([0, 1, 2])
    c = crd.contrast_indices(i, i % 3)
    assert c.shape == (3, 51) and ((torch.arange(30) % 3)[c[:, 1:]] != (i % 3).unsqueeze(1)).all()


def test_memory_init_is_repdistillers_uniform_and_a_checkpoint_brings_its_own_size() -> None:
    crd = CRD(4, 4, feat_dim=27, nce_k=5)
    assert crd.memory_s.shape == (0, 27)
    crd.bind_data(torch.zeros(1000, dtype=torch.long), seed=3)
    stdv = 1 / math.sqrt(27 / 3)
    assert crd.memory_s.shape == (1000, 27) and crd.memory_s.abs().max() <= stdv
    assert abs(float(crd.memory_s.mean())) < 0.02 and not torch.equal(crd.memory_s, crd.memory_t)
    fresh = CRD(4, 4, feat_dim=27, nce_k=5)
    fresh.load_state_dict(crd.state_dict())  # built before the data is known: adopts the saved banks
    assert torch.equal(fresh.memory_s, crd.memory_s) and torch.equal(fresh.z, crd.z)
    assert torch.equal(fresh.labels, crd.labels) and fresh._replace == crd._replace
