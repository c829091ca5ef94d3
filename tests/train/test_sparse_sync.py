"""Sparse embedding gradients averaged across two real gloo processes by SparseGradientSync: the mean of
the ranks' dense gradients, bitwise the same on both ranks, also when one rank touched no row (the case
gloo's own sparse all-reduce fails on) or never used the table at all."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recforge.train.sparse_sync import SparseGradientSync, sparse_parameters

# Per rank and case: the rows its batch looks up (None: the table is not used at all this step).
CASES = {
    "overlapping": ([1, 2, 2, 7], [2, 5]),
    "one rank touches nothing": ([3, 3, 4], []),
    "one rank has no gradient": ([0, 9], None),
    "no rank has a gradient": (None, None),
}


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)  # different tables on purpose: broadcast_from_main must align them
        table = torch.nn.Embedding(10, 3, sparse=True)
        sync = SparseGradientSync([table.weight], world_size=2)
        sync.broadcast_from_main()
        results = {"weight": table.weight.detach().clone()}
        for name, rows_by_rank in CASES.items():
            table.weight.grad = None
            rows = rows_by_rank[rank]
            if rows is not None:
                index = torch.tensor(rows, dtype=torch.long)
                weights = torch.arange(1, len(rows) * 3 + 1, dtype=torch.float32).reshape(len(rows), 3) * (rank + 1)
                (table(index) * weights).sum().backward()
            mine = None if table.weight.grad is None else table.weight.grad.to_dense().clone()
            sync()
            grad = table.weight.grad
            results[name] = (mine, None if grad is None else (grad.is_sparse, grad.to_dense()))
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_end_with_the_mean_of_their_sparse_gradients(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"])
    for name in CASES:
        own = [r[name][0] for r in ranks]
        synced = [r[name][1] for r in ranks]
        if all(g is None for g in own):
            assert synced == [None, None], name
            continue
        expected = sum(g for g in own if g is not None) / 2
        for is_sparse, dense in synced:
            assert is_sparse, name
            torch.testing.assert_close(dense, expected, rtol=0, atol=1e-6, msg=name)
        assert torch.equal(synced[0][1], synced[1][1]), name


def test_only_sparse_tables_are_named():
    model = torch.nn.ModuleDict({"ids": torch.nn.Embedding(4, 2, sparse=True), "dense": torch.nn.Embedding(4, 2),
                                 "mlp": torch.nn.Linear(2, 1)})
    assert list(sparse_parameters(model)) == ["ids.weight"]
    assert sparse_parameters(model)["ids.weight"] is model["ids"].weight
