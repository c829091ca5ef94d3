"""Row-wise (lazy) Adam for embedding tables with sparse gradients.

A batch touches a few percent of the embedding rows. Dense Adam rewrites every row's moments
every step (the cost that dominates peer libraries); torch's SparseAdam updates only touched rows
but spends most of its time coalescing and masking sparse tensors. This optimizer does the same
lazy update with four dense kernels on the touched rows: unique + index_add (coalesce), gather
the moments, Adam arithmetic, scatter back.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class RowWiseAdam(torch.optim.Optimizer):
    """Adam on the rows a sparse gradient touches; untouched rows and their moments stay as they are.

    Same update as torch.optim.SparseAdam (bias correction by the global step), so the two are
    interchangeable; `tests/train/test_optim.py` checks they agree. `weight_decay` is L2 the way
    torch.optim.Adam applies it (`grad += weight_decay * row` before the moments), but only on the
    rows the batch touches: a row no batch touches is neither decayed nor moved. That is the lazy
    optimizer's regularization (SparseAdam has none); dense Adam over the whole table would instead
    shrink every row every step, the cost this optimizer exists to avoid.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must not be negative, got {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - the torch.optim signature
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if not grad.is_sparse:
                    raise RuntimeError("RowWiseAdam takes sparse gradients: build the embedding with sparse=True")
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                rows, row_grad = _coalesce_rows(grad)
                if group.get("weight_decay", 0.0):
                    row_grad = row_grad.add(param.index_select(0, rows).to(row_grad.dtype),
                                            alpha=group["weight_decay"])
                exp_avg = state["exp_avg"].index_select(0, rows)
                exp_avg_sq = state["exp_avg_sq"].index_select(0, rows)
                exp_avg.mul_(beta1).add_(row_grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(row_grad, row_grad, value=1 - beta2)
                state["exp_avg"].index_copy_(0, rows, exp_avg)
                state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
                step = state["step"]
                step_size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
                update = exp_avg.div_(exp_avg_sq.sqrt_().add_(group["eps"])).mul_(-step_size)
                # rows are unique, so gather-add-copy is exact and far cheaper than index_add_ (a scatter).
                param.index_copy_(0, rows, param.index_select(0, rows).add_(update.to(param.dtype)))
        return loss


def _coalesce_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique row ids, summed gradient per row) of an uncoalesced sparse row gradient."""
    if grad.is_coalesced():
        return grad.indices()[0], grad.values()
    indices = grad._indices()[0]
    values = grad._values()
    rows, inverse = torch.unique(indices, sorted=False, return_inverse=True)
    summed = torch.zeros((rows.shape[0], values.shape[1]), dtype=values.dtype, device=values.device)
    summed.index_add_(0, inverse, values)
    return rows, summed
