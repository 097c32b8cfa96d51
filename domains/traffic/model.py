"""The traffic network (`TrafficNet`): a shared per-sensor encoder, learned-adjacency mixing and a
quantile head.

Every sensor's recent window is encoded by one MLP shared across all sensors of both networks
(weights shared across sensors); sensor identity enters as a learned embedding. The sensors then
exchange information through an adaptive adjacency learned per network from source and target
node embeddings (Graph WaveNet's `softmax(relu(E1 E2^T))`), in residual mixing blocks. The head
gives P10/P50/P90 at 15, 30 and 60 minutes as corrections to the sensor's smoothed daily profile,
in units of the sensor's mean count; P10 and P90 are P50 minus/plus a softplus, so quantiles never
cross.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from domains.traffic.contract import HORIZONS, W_MAX
from domains.traffic.features import N_FEATURES


class MixBlock(nn.Module):
    """Residual block: a per-sensor MLP, then one hop over the learned adjacency."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.norm2 = nn.LayerNorm(hidden)
        self.message = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        h = h + self.drop(self.mlp(self.norm1(h)))
        return h + self.drop(adjacency @ self.message(self.norm2(h)))


class TrafficNet(nn.Module):
    """Shared per-sensor encoder + learned-adjacency mixing + quantile head (see the module docstring).

    Everything but the per-sensor embeddings is shared by every sensor of every network.
    """

    def __init__(self, sizes: Sequence[int], hidden: int, node_dim: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(W_MAX * N_FEATURES + len(HORIZONS), hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.sensor_embedding = nn.ParameterList(nn.Parameter(torch.zeros(n, hidden)) for n in sizes)
        self.source = nn.ParameterList(nn.Parameter(torch.randn(n, node_dim) * 0.1) for n in sizes)
        self.target = nn.ParameterList(nn.Parameter(torch.randn(n, node_dim) * 0.1) for n in sizes)
        self.blocks = nn.ModuleList(MixBlock(hidden, dropout) for _ in range(layers))
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, len(HORIZONS) * 3))

    def forecast(self, network: int, x: torch.Tensor, target_profile: torch.Tensor) -> torch.Tensor:
        """One network's quantiles in units of each sensor's mean count: (windows, sensors, horizons, 3)."""
        h = self.encoder(torch.cat([x, target_profile], dim=-1)) + self.sensor_embedding[network]
        adjacency = torch.softmax(F.relu(self.source[network] @ self.target[network].T), dim=-1)
        for block in self.blocks:
            h = block(h, adjacency)
        out = self.head(h).unflatten(-1, (len(HORIZONS), 3)).float()
        p50 = target_profile + out[..., 1]
        return torch.stack([p50 - F.softplus(out[..., 0]), p50, p50 + F.softplus(out[..., 2])], dim=-1)

    def forward(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """`inputs` are (x, target_profile) for each network in meta order; one output per network."""
        return [self.forecast(k, inputs[2 * k], inputs[2 * k + 1]) for k in range(len(inputs) // 2)]
