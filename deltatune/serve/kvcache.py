"""The running mixed batch's key/value cache: whether rows can join it, merging a newcomer's cache in, and trimming
the leading columns no live row attends to (``Engine._run``)."""

from __future__ import annotations

from typing import Any

import torch


def _joinable(cache: Any) -> bool:
    """Whether rows can be merged into ``cache``: every layer a plain growing key/value cache (no sliding window,
    no quantised or static layers, whose shapes follow other rules)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" and layer.is_initialized for layer in layers)


def _merge(cache: Any, mask: torch.Tensor, new_cache: Any, new_mask: torch.Tensor) -> torch.Tensor:
    """Append ``new_cache``'s rows to ``cache`` (in place), left-padding the shorter one; returns the merged mask.

    Padded key/value positions are zeros under a 0 in the mask: attention gives them weight exactly 0, so every
    row computes as before. Positions come from the mask (cumsum - 1), so they do not move either.
    """
    width = max(mask.shape[1], new_mask.shape[1])

    def pad(x: torch.Tensor, dim: int) -> torch.Tensor:
        missing = width - x.shape[dim]
        if missing == 0:
            return x
        shape = list(x.shape)
        shape[dim] = missing
        return torch.cat([x.new_zeros(shape), x], dim=dim)

    for old, new in zip(cache.layers, new_cache.layers):
        old.keys = torch.cat([pad(old.keys, 2), pad(new.keys, 2)])  # (rows, heads, seq, head_dim)
        old.values = torch.cat([pad(old.values, 2), pad(new.values, 2)])
    return torch.cat([pad(mask, 1), pad(new_mask, 1)])


def _trim(cache: Any, mask: torch.Tensor) -> torch.Tensor:
    """Drop the leading key/value columns that no live row attends to (padding left by rows that have gone); returns
    the trimmed mask. Under steady load a mixed batch never ends, and its cache grew by a column every step for as
    long as it ran (the width of every row, whatever its length). Positions come from the mask's cumsum, and the
    dropped columns are 0 in every row, so no row computes otherwise."""
    lead = int(mask.any(dim=0).int().argmax())  # the first column some row attends to
    if lead == 0 or not _joinable(cache) or any(layer.keys.shape[2] != mask.shape[1] for layer in cache.layers):
        return mask
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
    return mask[:, lead:]
