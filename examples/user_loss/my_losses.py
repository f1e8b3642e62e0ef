"""Loss primitives for user_loss.xspec: plain functions of tensors returning a batch-mean scalar.

`primitive` statements in the spec declare each parameter's kind and which tensors learn; the
defaults come from here. Keep them branch-free on tensor values so torch.compile can trace them.
"""

import torch.nn.functional as F
from torch import Tensor


def focal(p: Tensor, y: Tensor, gamma: float = 2.0) -> Tensor:
    """Focal loss (Lin et al. 2017): ``mean((1 - p_y)^gamma * -log p_y)``; gamma=0 is cross-entropy."""
    logp = F.log_softmax(p, dim=1).gather(1, y[:, None]).squeeze(1)
    return (-(1 - logp.exp()) ** gamma * logp).mean()


def sym_kl(a: Tensor, b: Tensor, T: float = 1.0, grad: bool = False) -> Tensor:
    """Symmetric KL ``T^2 (KL(a||b) + KL(b||a)) / 2`` of the tempered softmaxes, batch mean.

    Gradient always flows into ``b``; into ``a`` only with ``grad=true`` (declared `learns b, a if grad`).
    """
    a = a if grad else a.detach()
    la, lb = F.log_softmax(a / T, dim=1), F.log_softmax(b / T, dim=1)
    forward = F.kl_div(lb, la, reduction="batchmean", log_target=True)
    backward = F.kl_div(la, lb, reduction="batchmean", log_target=True)
    return (forward + backward) / 2 * T * T
