"""peft's ``LoraModel.add_weighted_adapter`` on a DeltaModel: a new LoRA made of several, by peft 0.21.2's rules.

The new adapter's config is the first adapter's with ``r = lora_alpha =`` the new rank, use_rslora off (peft 0.22's fix:
0.21.2 kept the first adapter's, scaling the combined update by sqrt(r)), the union of the target
modules and no rank or alpha pattern; it is injected as any adapter is (drawing its init as peft's does, so that the
random masks of the dare combinations that follow are peft's under the same seed), then its A and B are written
at every module it adapts:

- ``cat``: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...] (rank: the sum), exact;
- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: A and B combined separately, each
  with weights sqrt(|w_i s_i|) (the sign on A's), by peft's merge_utils (equal ranks only);
- ``svd`` and the ``*_svd`` ones: the updates s_i B_i A_i combined, then a truncated SVD at ``svd_rank`` (default:
  the largest rank), optionally clamped at the ``svd_clamp`` quantile.

``add_weighted_adapter`` reaches DeltaModel through ``MODEL_FUNCTIONS`` (the registry's hook), as fusion's do, and
so does ``rescale_adapter_scale`` (peft.helpers'), which scales every LoRA's update for the length of a block.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..layer import ModulesToSave
from ._lora_conv import _LoraBase
from ._lora_mha import LoraMultiheadAttention
from .lora import LORA_LAYERS, LoraConfig, LoraConvNd, LoraEmbedding

EQUAL_RANKS = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")
SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
DENSITY = {"ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd", "magnitude_prune",
           "magnitude_prune_svd"}  # fmt: skip


# -- peft.utils.merge_utils, the same operations in the same order (same numbers, same random draws) ----------------
def _prune(tensor: torch.Tensor, density: float, random: bool) -> torch.Tensor:
    if density >= 1:  # peft warns and keeps all
        return tensor
    if random:  # DARE: a Bernoulli mask, the kept values rescaled by 1 / density
        return tensor * torch.bernoulli(torch.full_like(tensor, density)) / density
    mask = torch.zeros_like(tensor).reshape(-1)
    mask[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def combine(kind: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None,
            sign_method: str) -> torch.Tensor:  # fmt: skip
    """peft's task_arithmetic / ties / dare_linear / dare_ties / magnitude_prune over ``tensors`` (``kind`` with any
    ``_svd`` suffix dropped; "svd" alone is task arithmetic)."""
    kind = kind.removesuffix("_svd") if kind != "svd" else "linear"
    if kind != "linear":
        tensors = [_prune(t, density, random=kind.startswith("dare")) for t in tensors]
    stacked = torch.stack(tensors, dim=0)
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))
    if not kind.endswith("ties"):
        return weighted.sum(dim=0)
    sign = stacked.sign()  # TIES: elect a sign per entry, keep the entries that agree, average them
    magnitude = stacked.sum(dim=0) if sign_method == "total" else sign.sum(dim=0)
    agree = sign == torch.where(magnitude >= 0, 1, -1)
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


# -- the model function ----------------------------------------------------------------------------------------------
def add_weighted_adapter(
    model: Any,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> None:
    """Add ``adapter_name``, a LoRA combining the LoRA ``adapters`` with ``weights`` (``model.add_weighted_adapter``;
    peft's arguments and defaults). It is not made active (``set_adapter``); it saves and loads as any LoRA.

    Raises:
        ValueError: an unknown adapter; ``adapter_name`` taken (peft returns without a word); a non-LoRA adapter;
            unequal ranks for the equal-rank combinations; targets given as a list by one adapter and a regex by
            another; two adapters with their own copy of one module (modules_to_save); a weight count other than
            the adapters' (peft pairs them silently); a missing density, or an unknown combination or sign method;
            a NaN weight or a DARE density of 0 (peft writes NaNs); svd_clamp outside [0, 1]; an svd_driver other
            than gesvd / gesvdj / gesvda, or one for adapters not on CUDA (torch's error from inside the SVD).
        TypeError: weights that are not numbers.
    """
    names = model._check_names(adapters)
    if not names:
        raise ValueError("add_weighted_adapter: no adapters to combine")
    if adapter_name in model.peft_config:
        raise ValueError(f"add_weighted_adapter: an adapter named {adapter_name!r} exists already")
    weights = _numbers(weights)
    if len(weights) != len(names):
        raise ValueError(f"add_weighted_adapter: {len(names)} adapters and {len(weights)} weights; give one each")
    for name in names:
        if not isinstance(config := model.peft_config[name], LoraConfig):
            raise ValueError(f"add_weighted_adapter combines LoRA adapters; {name!r} is a {config.method} adapter")
        if config.lora_bias:  # peft copies the flag and leaves the new lora_B.bias at its init: the biases lost
            raise ValueError(f"add_weighted_adapter: {name!r} has lora_bias, which no combination carries (peft leaves "
                             "the combined adapter's bias at its init, not the sum); merge it instead")  # fmt: skip
    if combination_type not in EQUAL_RANKS + SVD + ("cat",):
        raise ValueError(f"add_weighted_adapter: invalid combination_type {combination_type!r}; one of "
                         f"{', '.join(('cat',) + EQUAL_RANKS + SVD)}")  # fmt: skip
    kind = "linear" if len(names) == 1 else combination_type  # peft: one adapter is combined linearly
    if kind in DENSITY and not (_real(density) and density >= 0):
        raise ValueError(f"add_weighted_adapter: combination_type {kind!r} needs a density >= 0, got {density!r}")
    if kind.startswith("dare") and density == 0:  # peft divides by it: an adapter of NaNs
        raise ValueError(f"add_weighted_adapter: combination_type {kind!r} needs a density > 0 (DARE rescales the "
                         "kept values by 1 / density), got 0")  # fmt: skip
    if svd_rank is not None and not (isinstance(svd_rank, numbers.Integral) and not isinstance(svd_rank, bool)
                                     and svd_rank >= 0):  # fmt: skip
        raise ValueError(f"add_weighted_adapter: svd_rank must be a whole number >= 0 (0 or None: the adapters' "
                         f"largest rank), got {svd_rank!r}")  # fmt: skip
    svd_rank = None if svd_rank is None else int(svd_rank)  # np.int64 too, as peft
    if svd_clamp is not None and not (_real(svd_clamp) and 0 <= svd_clamp <= 1):
        raise ValueError(
            f"add_weighted_adapter: svd_clamp is a quantile, a number in [0, 1] (or None), got {svd_clamp!r}"
        )
    if kind in SVD and svd_driver is not None:  # torch's error came from inside the first layer's SVD, naming driver=
        _check_driver(model, names, svd_driver)
    if "ties" in kind and majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"add_weighted_adapter: majority_sign_method must be 'total' or 'frequency', "
                         f"got {majority_sign_method!r}")  # fmt: skip
    for path, layer in model._layers():
        if isinstance(layer, LoraMultiheadAttention) and (held := [n for n in names if n in layer.adapter_names]):
            raise ValueError(f"add_weighted_adapter: adapter {held[0]!r} adapts {path}, an nn.MultiheadAttention (an "
                             "update of in_proj_weight and one of out_proj), which deltatune does not combine; leave "
                             "it out of the adapters' target_modules")  # fmt: skip
        if isinstance(layer, ModulesToSave) and len(held := [n for n in names if n in layer.adapter_names]) > 1:
            raise ValueError(f"add_weighted_adapter: adapters {held[0]!r} and {held[1]!r} each train their own "
                             f"copy of {path} (modules_to_save), which cannot be combined")  # fmt: skip
    configs = [model.peft_config[n] for n in names]
    ranks = [max([c.r, *c.rank_pattern.values()]) for c in configs]
    if kind in EQUAL_RANKS and len(set(ranks)) != 1:
        raise ValueError(f"add_weighted_adapter: combination_type {kind!r} needs equal ranks; "
                         + ", ".join(f"{n!r} has r={r}" for n, r in zip(names, ranks)))  # fmt: skip
    rank = sum(ranks) if kind == "cat" else (svd_rank or max(ranks)) if kind in SVD else ranks[0]
    kinds = {type(c.target_modules) for c in configs}
    if len(kinds) > 1:
        regex = next(n for n, c in zip(names, configs) if isinstance(c.target_modules, str))
        listed = next(n for n, c in zip(names, configs) if not isinstance(c.target_modules, str))
        raise ValueError(f"add_weighted_adapter: {regex!r} gives target_modules as a regex, {listed!r} as a list of "
                         "names; peft combines them only alike")  # fmt: skip
    if kinds == {str}:
        targets: Any = "|".join(f"({c.target_modules})" for c in configs)
    else:
        targets = sorted(set().union(*(c.target_modules for c in configs)))
    # use_rslora off: each source's scaling is folded into the factors, so the new adapter's must be 1 (with rsLoRA
    # r / sqrt(r): peft < 0.22 inherited use_rslora from the first adapter; peft 0.22 sets it False, as here)
    config = configs[0].replace(r=rank, lora_alpha=rank, target_modules=targets, alpha_pattern={}, rank_pattern={},
                                use_rslora=False)  # fmt: skip
    model.add_adapter(adapter_name, config)
    try:
        _write(model, adapter_name, kind, names, weights, rank, density, majority_sign_method, svd_clamp,
               svd_full_matrices, svd_driver)  # fmt: skip
    except BaseException:  # (a module where the adapters' ranks differ): the model as it was
        model.delete_adapter(adapter_name)
        raise


def _check_driver(model: Any, names: list[str], driver: Any) -> None:
    """svd_driver is torch.linalg.svd's cuSOLVER choice (peft's docs: None, gesvd, gesvdj or gesvda), for CUDA only."""
    if driver not in ("gesvd", "gesvdj", "gesvda"):
        raise ValueError(
            f"add_weighted_adapter: svd_driver must be None, 'gesvd', 'gesvdj' or 'gesvda', got {driver!r}"
        )
    for path, layer in model._layers():
        held = [n for n in names if n in layer.scaling] if isinstance(layer, LORA_LAYERS) else []
        if held and (device := _factors(layer, held[0])[0].device).type != "cuda":
            raise ValueError(f"add_weighted_adapter: svd_driver={driver!r} is a cuSOLVER option for CUDA tensors; "
                             f"adapter {held[0]!r} at {path} is on {device} (leave svd_driver None)")  # fmt: skip


def _real(value: Any) -> bool:
    """A real number (numpy's too), not a bool, finite."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(weights: Any) -> list[float]:
    """The weights as floats: numbers (numpy's and one-number tensors too, as peft multiplies whatever it gets)."""
    try:
        values = None if isinstance(weights, (str, bytes)) else list(weights)
    except TypeError:  # one number, None, a 0-d tensor
        values = None
    if values is None or not all(
        (isinstance(w, numbers.Real) and not isinstance(w, bool)) or (isinstance(w, torch.Tensor) and w.numel() == 1)
        for w in values
    ):
        raise TypeError(f"add_weighted_adapter: weights must be numbers, one per adapter, got {weights!r}")
    floats = [float(w) for w in values]
    if not all(math.isfinite(w) for w in floats):  # peft takes them: an adapter of NaNs
        raise ValueError(f"add_weighted_adapter: weights must be finite, got {floats!r}")
    return floats


def _write(model: Any, adapter_name: str, kind: str, names: list[str], weights: list[float], rank: int,
           density: float | None, majority_sign_method: str, svd_clamp: float | None, svd_full_matrices: bool,
           svd_driver: str | None) -> None:  # fmt: skip
    """The new adapter's A and B at every module it adapts."""
    with torch.no_grad():
        for path, layer in model._layers():
            if isinstance(layer, LORA_LAYERS) and adapter_name in layer.scaling:
                held = [(n, w) for n, w in zip(names, weights) if n in layer.scaling]
                if not held:  # peft: "No matching LoRAs found"; left zero here (it adds nothing)
                    A, B = _factors(layer, adapter_name)
                    A.data, B.data = A.data * 0.0, B.data * 0.0
                    continue
                args = (kind, held, density, majority_sign_method, path)
                if kind == "cat":
                    new = _cat(layer, adapter_name, held)
                elif kind in SVD:
                    new = _svd(layer, adapter_name, *args, rank, svd_clamp, svd_full_matrices, svd_driver)
                else:
                    new = _equal_ranks(layer, *args, rank)
                for p, value in zip(_factors(layer, adapter_name), new):
                    p.data = value


def _factors(layer: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def _pad(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r', ...) and B (d, r', ...) with zero rows and columns up to ``rank`` (no change to B A): a module whose
    rank a rank_pattern made smaller, or an SVD with fewer singular values than the rank. peft leaves such a
    factor at its smaller shape, which a saved file then does not fit."""
    missing = rank - A.shape[0]
    if missing <= 0:
        return A, B
    return torch.cat([A, A.new_zeros((missing, *A.shape[1:]))]), torch.cat(
        [B, B.new_zeros((B.shape[0], missing, *B.shape[2:]))], 1
    )


def _cat(layer: Any, name: str, held: list[tuple[str, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    A, B = (t.data * 0.0 for t in _factors(layer, name))
    As = torch.cat([_factors(layer, n)[0].data * w * layer.scaling[n] for n, w in held], dim=0)
    Bs = torch.cat([_factors(layer, n)[1].data for n, _ in held], dim=1)
    A[: As.shape[0]] = As
    B[:, : Bs.shape[1]] = Bs
    return A, B


def _equal_ranks(layer: Any, kind: str, held: list[tuple[str, float]], density: float | None, sign_method: str,
                 path: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    factors = [[t.data for t in _factors(layer, n)] for n, _ in held]
    if len({a.shape for a, _ in factors}) > 1:
        raise ValueError(f"add_weighted_adapter: {kind!r} needs equal ranks, but at {path} " + ", ".join(
            f"{n!r} has r={a.shape[0]}" for (n, _), (a, _) in zip(held, factors)))  # fmt: skip
    scaled = [w * layer.scaling[n] for n, w in held]
    on_a = torch.tensor([math.sqrt(abs(s)) * (1 if s >= 0 else -1) for s in scaled])  # the sign on one side only
    on_b = torch.tensor([math.sqrt(abs(s)) for s in scaled])
    dtype = factors[0][0].dtype
    A = combine(kind, [a for a, _ in factors], on_a.to(factors[0][0].device), density, sign_method).to(dtype)
    B = combine(kind, [b for _, b in factors], on_b.to(factors[0][1].device), density, sign_method).to(dtype)
    return _pad(A, B, rank)


def _svd(layer: Any, name: str, kind: str, held: list[tuple[str, float]], density: float | None, sign_method: str,
         path: str, rank: int, clamp: float | None, full: bool, driver: str | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    deltas = [layer.get_delta_weight(n) for n, _ in held]  # s_i B_i A_i, the adapter's dtype and W's layout (peft's)
    delta = combine(kind, deltas, torch.tensor([w for _, w in held]).to(deltas[0].device), density, sign_method)
    conv = isinstance(layer, LoraConvNd)  # Conv1d/2d/3d (peft's svd path knows Conv2d only: it fails on the others)
    if conv:
        kernel = layer.base_layer.weight.shape[2:]
        delta = delta.squeeze() if kernel == (1,) * len(kernel) else delta.flatten(start_dim=1)
    if getattr(layer, "fan_in_fan_out", False) or isinstance(layer, LoraEmbedding):
        delta = delta.T
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full, driver=driver)  # kohya's svd_merge_lora, as peft
    kept = min(rank, S.shape[0])  # full_matrices keeps all of U's columns and Vh's rows, past the singular values
    U, Vh = U[:, :kept] @ torch.diag(S[:kept]), Vh[:kept, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
        U, Vh = U.clamp(-high, high), Vh.clamp(-high, high)
    Vh, U = _pad(Vh, U, rank)
    if conv:
        A, B = _factors(layer, name)
        U, Vh = U.reshape(B.shape), Vh.reshape(A.shape)
    return Vh, U


@contextmanager
def rescale_adapter_scale(model: Any, multiplier: float) -> Iterator[None]:
    """Within the block every LoRA layer's scales (each adapter's alpha / r, active or not) are ``multiplier`` times
    what they were, as ``peft.helpers.rescale_adapter_scale`` (``multiplier`` in [0, 1]: WiSE-FT's interpolation of
    the base and the tuned model); on leaving they are what they were again, an exception or not. ``model``: a
    DeltaModel, or any module holding LoRA layers (``inject_adapter_in_model``'s); ``model.rescale_adapter_scale``.

    As peft's, an adapter merged into the base weights holds its update at the scale it was merged at, which the
    block does not change: merged before the block, the block does not reach it; merged inside (``merge_adapter``,
    ``fuse_lora(lora_scale)``), it stays merged at the block's scale after it (the WiSE-FT model, as peft's). Unlike
    peft's, an unmerge takes off the update at the scale it went in at, so the base weights come back exactly
    (peft's unmerge after the block subtracts the full-scale update: W 0.248 off).

    Raises:
        TypeError: ``multiplier`` is not a number (peft's check).
        ValueError: a NaN or infinite multiplier (peft takes it: NaN outputs); the model holds no LoRA layer (peft's).
    """
    if not isinstance(multiplier, (float, int)):
        raise TypeError(f"rescale_adapter_scale: multiplier should be of type float, got {type(multiplier)}")
    if not math.isfinite(multiplier):  # peft takes it: every LoRA layer's output NaN
        raise ValueError(f"rescale_adapter_scale: multiplier must be finite, got {multiplier!r}")
    modules = model.modules() if isinstance(model, torch.nn.Module) else ()
    layers = [module for module in modules if isinstance(module, _LoraBase)]
    if not layers:
        raise ValueError("rescale_adapter_scale: scaling is only supported for models with LoRA layers")
    saved = [(layer, dict(layer.scaling)) for layer in layers]
    for layer, scaling in saved:
        layer.scaling.update({name: scale * multiplier for name, scale in scaling.items()})
    try:
        yield
    finally:  # the scales as they were (an adapter added or deleted in the block: its own, or none); a merge made
        for layer, scaling in saved:  # in the block keeps the scale it was made at (each layer records it)
            layer.scaling.update({name: scale for name, scale in scaling.items() if name in layer.scaling})


MODEL_FUNCTIONS = {"add_weighted_adapter": add_weighted_adapter, "rescale_adapter_scale": rescale_adapter_scale}
"""Offered on DeltaModel through the registry's hook (``registry.model_function``)."""

__all__ = ["add_weighted_adapter", "combine", "rescale_adapter_scale"]
