"""RowWiseAdam is the same lazy Adam as torch's SparseAdam, computed with dense row kernels."""

from __future__ import annotations

import pytest
import torch

from recforge.train.optim import RowWiseAdam


def _run(optimizer_cls, steps: int = 6) -> torch.Tensor:
    torch.manual_seed(0)
    table = torch.nn.Embedding(50, 4, sparse=True)
    opt = optimizer_cls(table.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, 20, (32,), generator=gen)  # rows 20..49 are never touched; repeats are common
        loss = (table(idx).sum(1) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return table.weight.detach().clone()


def test_matches_sparse_adam():
    assert torch.allclose(_run(RowWiseAdam), _run(torch.optim.SparseAdam), atol=1e-6)


def test_untouched_rows_do_not_move():
    torch.manual_seed(0)
    initial = torch.nn.Embedding(50, 4, sparse=True).weight.detach().clone()
    after = _run(RowWiseAdam)
    assert torch.equal(after[20:], initial[20:])
    assert not torch.equal(after[:20], initial[:20])


def test_dense_gradient_is_refused():
    weight = torch.nn.Parameter(torch.zeros(3, 2))
    weight.grad = torch.ones(3, 2)
    with pytest.raises(RuntimeError, match="sparse=True"):
        RowWiseAdam([weight]).step()
