"""Sparse embedding gradients averaged across ranks by the trainer, not by DDP.

DDP hands a sparse gradient to the process group's sparse all-reduce. On gloo that path fails when the
ranks' gradients differ in shape (pytorch/pytorch#87497: a rank whose batch touches no row of a
table), and it has crashed a rank outright (SIGSEGV in a gloo thread, mid-backward) in two-process CPU
runs under load. The embedding tables are therefore left out of DDP and synchronized here with dense
all_gathers (each rank's row count, then its (row, values) pairs packed and padded to the longest):
collectives every backend implements, one code path, and every rank ends with the identical coalesced
mean, so the replicas cannot drift apart.
"""

from __future__ import annotations

import math

import torch


def sparse_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The tables that produce sparse gradients, by name (as `module.named_parameters()` names them):
    what the lazy optimizers update and what DDP leaves to SparseGradientSync."""
    found = {}
    for prefix, child in module.named_modules():
        if isinstance(child, torch.nn.Embedding) and child.sparse:
            for name, parameter in child.named_parameters(recurse=False):
                found[f"{prefix}.{name}" if prefix else name] = parameter
    return found


class SparseGradientSync:
    """Call after backward and before the optimizer step: each listed parameter's sparse gradient
    becomes the mean over ranks (rows touched on any rank; a rank that touched none contributes zeros)."""

    def __init__(self, parameters: list[torch.nn.Parameter], world_size: int, group: object | None = None) -> None:
        self.parameters = parameters
        self.world_size = world_size
        self.group = group

    def broadcast_from_main(self) -> None:
        """Rank 0's tables on every rank: DDP copies only the parameters it manages when it wraps a model."""
        import torch.distributed as dist

        with torch.no_grad():
            for parameter in self.parameters:
                dist.broadcast(parameter.data, src=0, group=self.group)

    def __call__(self) -> None:
        for parameter in self.parameters:
            parameter.grad = self._mean(parameter)

    def _mean(self, parameter: torch.nn.Parameter) -> torch.Tensor | None:
        import torch.distributed as dist

        grad = parameter.grad
        width = parameter.shape[1:]
        if grad is None:
            rows = torch.zeros(0, dtype=torch.long, device=parameter.device)
            values = torch.zeros((0, *width), dtype=parameter.dtype, device=parameter.device)
        else:
            if not grad.is_sparse:
                raise ValueError("SparseGradientSync got a dense gradient: the parameter's table is not sparse")
            grad = grad.coalesce()
            rows, values = grad.indices()[0], grad.values()
        count = torch.tensor([len(rows)], dtype=torch.long, device=parameter.device)
        counts = [torch.zeros_like(count) for _ in range(self.world_size)]
        dist.all_gather(counts, count, group=self.group)
        sizes = [int(c.item()) for c in counts]
        longest = max(sizes)
        if longest == 0:  # no rank touched the table this step
            return grad
        # One message per rank: each row's int64 index rides in front of its values, as raw bytes.
        values = values.reshape(len(rows), math.prod(width))
        row_bytes = 8 + values.shape[1] * values.element_size()
        packed = torch.zeros((longest, row_bytes), dtype=torch.uint8, device=parameter.device)
        packed[:len(rows), :8] = rows.reshape(-1, 1).view(torch.uint8)
        packed[:len(rows), 8:] = values.contiguous().view(torch.uint8)
        gathered = [torch.empty_like(packed) for _ in range(self.world_size)]
        dist.all_gather(gathered, packed, group=self.group)
        # Concatenated in rank order on every rank, so the coalesced sums are bitwise the same everywhere.
        received = torch.cat([g[:n] for g, n in zip(gathered, sizes, strict=True)])
        rows = received[:, :8].contiguous().view(torch.long).reshape(-1)
        values = received[:, 8:].contiguous().view(values.dtype).reshape(-1, *width) / self.world_size
        return torch.sparse_coo_tensor(rows.unsqueeze(0), values, parameter.shape).coalesce()
