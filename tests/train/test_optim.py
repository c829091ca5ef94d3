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


def test_weight_decay_matches_a_hand_computed_step_on_touched_rows_only():
    weight = torch.arange(12, dtype=torch.float32).reshape(6, 2) / 10
    table = torch.nn.Embedding.from_pretrained(weight.clone(), freeze=False, sparse=True)
    lr, decay, eps = 0.1, 0.5, 1e-8
    opt = RowWiseAdam(table.parameters(), lr=lr, weight_decay=decay, eps=eps)
    (table(torch.tensor([1, 1, 4])) * torch.tensor([1.0, -2.0])).sum().backward()
    opt.step()
    beta1, beta2 = 0.9, 0.999
    expected = weight.clone()
    for row, touches in ((1, 2), (4, 1)):
        grad = touches * torch.tensor([1.0, -2.0]) + decay * weight[row]
        m, v = (1 - beta1) * grad, (1 - beta2) * grad * grad
        step_size = lr * (1 - beta2) ** 0.5 / (1 - beta1)
        expected[row] = weight[row] - step_size * m / (v.sqrt() + eps)
    after = table.weight.detach()
    assert torch.allclose(after, expected, atol=1e-6)
    untouched = [0, 2, 3, 5]
    assert torch.equal(after[untouched], weight[untouched])


def test_weight_decay_equals_dense_adam_when_every_row_is_touched():
    def run(dense: bool) -> torch.Tensor:
        torch.manual_seed(0)
        table = torch.nn.Embedding(8, 3, sparse=not dense)
        opt = (torch.optim.Adam if dense else RowWiseAdam)(table.parameters(), lr=0.05, weight_decay=0.3)
        gen = torch.Generator().manual_seed(2)
        for _ in range(5):
            idx = torch.cat([torch.arange(8), torch.randint(0, 8, (8,), generator=gen)])
            opt.zero_grad()
            (table(idx).sum(1) ** 2).mean().backward()
            opt.step()
        return table.weight.detach()

    assert torch.allclose(run(dense=False), run(dense=True), atol=1e-6)


def test_weight_decay_shrinks_touched_rows_without_any_loss_gradient():
    table = torch.nn.Embedding.from_pretrained(torch.ones(4, 2), freeze=False, sparse=True)
    opt = RowWiseAdam(table.parameters(), lr=0.01, weight_decay=1.0)
    for _ in range(3):
        opt.zero_grad()
        (table(torch.tensor([2])) * 0.0).sum().backward()
        opt.step()
    assert (table.weight[2] < 1.0).all()
    assert torch.equal(table.weight[[0, 1, 3]].detach(), torch.ones(3, 2))
