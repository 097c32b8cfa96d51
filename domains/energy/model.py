"""The energy network: one `SeriesForecaster` per series, held side by side in `EnergyModel`.

An MLP encodes the window into a context vector; a second MLP, shared across the 48 steps, maps
context + the step's own features + a step embedding to three quantiles (P50, and P10/P90 as
softplus offsets so they never cross), in units of the window's scale. Training minimises the
pinball loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from domains.energy.contract import DAY, HISTORY, HORIZON
from domains.energy.features import CALENDAR_DIM, N_LAGS
from domains.forecast import pinball_terms
from domains.metrics import QUANTILES

STEP_EMBED = 16


def summarise_week(x: torch.Tensor) -> torch.Tensor:
    """(N, WEEK) -> (N, DAY + 7): the last day in full and the mean of each of the seven days.

    A compact view of the week: with one input per half-hour of the week the encoder overfit.
    """
    return torch.cat([x[:, -DAY:], x.reshape(x.shape[0], 7, DAY).mean(dim=-1)], dim=1)


class SeriesForecaster(nn.Module):
    """One series' network: window encoder + a step decoder shared across the 48 steps.

    Args:
        use_temperature: read past temperature and the temperature forecast.
        hidden: width of both MLPs.
        context: size of the window's context vector.
        dropout: after each hidden layer.
    """

    def __init__(self, *, use_temperature: bool, hidden: int, context: int, dropout: float) -> None:
        super().__init__()
        self.use_temperature = use_temperature
        enc_in = DAY + 7 + (DAY + 7 + HORIZON if use_temperature else 0)
        self.encoder = nn.Sequential(
            nn.Linear(enc_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, context), nn.GELU()
        )
        self.step = nn.Embedding(HORIZON, STEP_EMBED)
        # Per step: context, calendar, lags, step embedding and (with temperature) the step's
        # forecast temperature, the forecast's maximum (demand follows the day's heat build-up)
        # and the temperature at the same time yesterday (which explains yesterday's demand lag).
        dec_in = context + CALENDAR_DIM + N_LAGS + STEP_EMBED + (3 if use_temperature else 0)
        self.decoder = nn.Sequential(
            nn.Linear(dec_in, hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, len(QUANTILES)),
        )

    def forward(self, history: torch.Tensor, temp_history: torch.Tensor, temp_forecast: torch.Tensor,
                calendar: torch.Tensor, lags: torch.Tensor) -> torch.Tensor:
        """Relative quantiles (N, HORIZON, 3): P10 <= P50 <= P90, in units of the window's scale."""
        n = history.shape[0]
        window = [summarise_week(history)]
        if self.use_temperature:
            window += [summarise_week(temp_history), temp_forecast]
        ctx = self.encoder(torch.cat(window, dim=1))
        steps = [
            ctx[:, None, :].expand(n, HORIZON, ctx.shape[1]),
            calendar,
            lags,
            self.step.weight[None].expand(n, HORIZON, STEP_EMBED),
        ]
        if self.use_temperature:
            peak = temp_forecast.max(dim=1, keepdim=True).values.expand(n, HORIZON)
            yesterday = temp_history[:, HISTORY - DAY : HISTORY - DAY + HORIZON]
            steps.append(torch.stack([temp_forecast, peak, yesterday], dim=-1))
        out = self.decoder(torch.cat(steps, dim=-1))
        mid = out[..., 1]
        return torch.stack([mid - F.softplus(out[..., 0]), mid, mid + F.softplus(out[..., 2])], dim=-1)


class EnergyModel(nn.Module):
    """Every series' forecaster in one module; each window is answered by its own series' network.

    Each network runs on its own windows of the batch, an empty selection included: a network
    with no window in a batch still takes part in the graph (with zero gradients), as
    DistributedDataParallel requires of every parameter.
    """

    def __init__(self, series: Sequence[tuple[str, bool]], *, hidden: int, context: int, dropout: float) -> None:
        super().__init__()
        self.nets = nn.ModuleDict({
            name: SeriesForecaster(use_temperature=has_temp, hidden=hidden, context=context, dropout=dropout)
            for name, has_temp in series
        })

    def forward(self, series: torch.Tensor, history: torch.Tensor, temp_history: torch.Tensor,
                temp_forecast: torch.Tensor, calendar: torch.Tensor, lags: torch.Tensor) -> torch.Tensor:
        """Relative quantiles (N, HORIZON, 3) for windows of any mix of series."""
        out = history.new_zeros(history.shape[0], HORIZON, len(QUANTILES))
        for k, net in enumerate(self.nets.values()):
            idx = torch.nonzero(series == k).squeeze(1)
            pred = net(history[idx], temp_history[idx], temp_forecast[idx], calendar[idx], lags[idx])
            out = out.index_copy(0, idx, pred.to(out.dtype))
        return out


MODEL_INPUTS = ("series", "history", "temp_history", "temp_forecast", "calendar", "lags")


def pinball_loss(target: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """Mean pinball loss of (N, H, 3) quantile predictions (the differentiable `metrics.pinball`)."""
    return pinball_terms(target, quantiles).mean()
