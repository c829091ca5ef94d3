"""DCN-V2 ranker (Wang et al. 2021): a cross network and a deep MLP over [embeddings, numeric].

parallel: both read the same input side by side and a final Linear combines their outputs;
stacked: the MLP reads the cross network's output. The paper reports neither dominating (it
depends on the data), so both are a config switch rather than two models.
"""

from __future__ import annotations

import torch
from torch import nn

from recforge.nn import MLP, CrossNetwork, FusedEmbedding

STRUCTURES = ("parallel", "stacked")


class DCNv2(nn.Module):
    def __init__(
        self, embeddings: FusedEmbedding, cross: CrossNetwork, mlp: MLP, num_numeric: int, structure: str = "parallel"
    ):
        super().__init__()
        if structure not in STRUCTURES:
            raise ValueError(f"unknown DCN-V2 structure '{structure}'; choose one of {', '.join(STRUCTURES)}")
        width = embeddings.num_fields * embeddings.dim + num_numeric
        if cross.in_dim != width:
            raise ValueError(f"cross network width {cross.in_dim} != fields*dim + numeric = {width}")
        mlp_in = cross.out_dim if structure == "stacked" else width
        mlp.expect_input(mlp_in, f"{mlp_in} expected for a {structure} DCN-V2")
        self.embeddings = embeddings
        self.cross = cross
        self.mlp = mlp
        self.stacked = structure == "stacked"
        self.head = nn.Linear(mlp.out_dim if self.stacked else cross.out_dim + mlp.out_dim, 1)
        self.num_numeric = num_numeric

    def forward(
        self,
        categorical: torch.Tensor,
        numeric: torch.Tensor,
        history_values: torch.Tensor | None = None,
        history_offsets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """categorical [B, F] int64, numeric [B, N] float -> logits [B]. Histories are accepted (every
        model in MODELS takes the same arguments) and not used."""
        emb = self.embeddings(categorical).flatten(1)
        x0 = torch.cat([emb, numeric.to(emb.dtype)], dim=1) if self.num_numeric > 0 else emb
        crossed = self.cross(x0)
        out = self.mlp(crossed) if self.stacked else torch.cat([crossed, self.mlp(x0)], dim=1)
        return self.head(out).squeeze(-1)
