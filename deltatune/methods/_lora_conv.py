"""LoRA's layer base and its conv layers (peft 0.21.2's ``_ConvNd``: ``Conv1d``, ``Conv2d``, ``Conv3d``).

``_LoraBase`` is the per-adapter state, forward, mixed-batch routing and merge every LoRA layer shares (lora.py's
``LoraLinear`` and ``LoraEmbedding`` subclass it; it lives here so that the conv layers below can too without an
import cycle). On an ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` base of kernel k, A is a conv of the same kind into
r channels with the base's kernel, stride, padding, dilation and padding mode (peft's A takes kernel, stride and
padding only: a dilated base then adds outputs of two sizes and fails), B a 1-kernel conv with the base's groups, so
s * B A folds into W as a kernel of W's shape: delta = s * conv(A^T, B)^T (a 1x1 Conv2d's as the matmul B A, as
peft). r must be a multiple of groups, and a grouped conv is adapted but not merged (peft's rules). DoRA's magnitude
is stored (1, c_out, 1, ...), one per output channel (methods/_dora_layers.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, DeltaConfig
from ..layer import DeltaLayer, DequantizedLinear, NotMergeable
from . import _lora_init as inits
from ._dora import add_dora, dora, merge_weight, unmerge_weight
from ._dora_layers import conv_dora, init_magnitude
from ._quant_inplace import kept_in_place, requantized_after
from .quant import is_quantized


class _LoraBase(DeltaLayer):
    """Per-adapter state shared by the LoRA layer types (scaling, dropout, DoRA magnitude, merge cache)."""

    adapter_attrs = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    supports_row_adapters, merge_checks = True, (inits.check_bias_merge,)
    merge_state = ("_dora_norm", "_merged_scaling")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.r: dict[str, int] = {}  # peft's LoraLayer attributes, which set_scale / unscale_layer start from
        self.lora_alpha: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self._dora_norm: dict[str, torch.Tensor] = {}  # the row norms a DoRA merge divided by, for unmerge
        self._merged_scaling: dict[str, float] = {}  # the scale each merged adapter's update went in at

    def _add_common(self, name: str, r: int, alpha: float, dropout: float, rslora: bool) -> None:
        self.r[name], self.lora_alpha[name], self.use_rslora[name] = r, alpha, rslora
        self.scaling[name] = alpha / math.sqrt(r) if rslora else alpha / r  # rsLoRA: alpha / sqrt(r)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        inits.settle(self, name, restore=True)  # a refused load: the base weight its init replaced comes back
        for held in (self.scaling, self.r, self.lora_alpha, self.use_rslora):
            held.pop(name, None)
        if name in self.lora_dropout:
            del self.lora_dropout[name]

    def import_state(self, name: str, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        super().import_state(name, prefix, tensors)
        if name not in self.__dict__.get("_settle_later", ()):  # (else once the whole import is in: settled_after)
            inits.settle(self, name, restore=False)  # the file passed its checks: the residual stays

    def set_scale(self, adapter: str, scale: float) -> None:
        """peft's ``LoraLayer.set_scale``: ``adapter``'s scale is ``scale`` times its initial alpha / r (rsLoRA: alpha
        / sqrt(r)); an adapter this layer does not hold is passed over."""
        if adapter in self.scaling:
            self.scaling[adapter] = scale * self._initial_scale(adapter)

    def scale_layer(self, scale: float) -> None:
        """peft's ``LoraLayer.scale_layer``: every active adapter's current scale times ``scale``. An Embedding's
        adapters are scaled too (peft's pass over them, kept in ``lora_embedding_A``, not ``lora_A``)."""
        for name in [n for n in self.active_adapters if n in self.scaling] if scale != 1 else []:
            self.scaling[name] *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        """peft's ``LoraLayer.unscale_layer``: every active adapter's scale divided by ``scale`` (None: the initial).
        An Embedding's adapters are unscaled too (peft's pass over them, as its ``scale_layer``)."""
        for name in [n for n in self.active_adapters if n in self.scaling]:
            self.scaling[name] = self._initial_scale(name) if scale is None else self.scaling[name] / scale

    def _initial_scale(self, name: str) -> float:
        r, alpha = self.r[name], self.lora_alpha[name]
        return alpha / math.sqrt(r) if self.use_rslora[name] else alpha / r

    def unmerge(self, name: str | None = None) -> None:
        """``DeltaLayer.unmerge``: the update taken off at the scale it was merged at (a scale changed since, by
        ``set_scale`` or ``rescale_adapter_scale``, does not reach the merged weights), the adapters merged after it
        put back at theirs. Without a name, every merged adapter (peft's ``unmerge()``), each by this method."""
        super().unmerge(name)
        if name is None:
            return
        if name not in self.merged_adapters:
            self._merged_scaling.pop(name, None)

    @contextmanager
    def _merge_scale(self, name: str) -> Iterator[None]:
        """``scaling[name]`` as the merge of ``name`` used it (recorded by its merge) while its update is written to or
        taken off the weights (unmerge, and the redos of unmerge and of a DoRA merge's ``_unmerged_base``)."""
        now, recorded = self.scaling[name], name in self._merged_scaling
        self.scaling[name] = self._merged_scaling.setdefault(name, now)
        try:
            yield
        except BaseException:  # a merge that failed leaves no record for the next one to take up
            if not recorded:
                self._merged_scaling.pop(name, None)
            raise
        finally:
            self.scaling[name] = now

    @property
    def _weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def weight(self) -> torch.Tensor:
        # Modeling code reads the wrapped layer's weight and bias (T5 checks ``self.wo.weight.dtype``), as PEFT allows.
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def delta_weight(self, name: str, merging: bool = False) -> torch.Tensor:
        """s * B A in the base weight's own layout (``merging``: as PEFT's get_delta_weight, see ``_factors``)."""
        raise NotImplementedError

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """peft's name: adapter ``adapter``'s update s * B A in the adapter's dtype and the base weight's layout (an
        embedding's (vocab, dim), which its merge rounds to W's dtype before adding; a MultiheadAttention's for its
        in_proj_weight; DoRA's without its magnitude)."""
        return self.delta_weight(adapter, merging=True)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        if self.row_adapters is not None:
            return self._routed(x, result)
        if self.merged:  # as peft: a layer holding a merged adapter computes as its (merged) weights alone
            return result
        dtype = result.dtype
        for name in self.active_adapters:  # peft's order: fp32 updates summed onto a bf16 base output, rounded once
            if name in self.lora_A:  # the input cast to each adapter's dtype in turn, as peft's
                x = x.to(self.lora_A[name].weight.dtype)
            result = self._add(name, x, result)
        return result.to(dtype)

    def _add(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` (the base output for ``x``) plus adapter ``name``'s update s * B A x, in peft's operations and
        order: the sum in the wider of the two dtypes, rounded by the caller. A mixed batch's row rounds as the
        adapter alone (peft's _mixed_batch_forward rounds an fp32 update to a bf16 base's dtype before adding it)."""
        x_in = self.lora_dropout[name](x.to(self.lora_A[name].weight.dtype))  # peft casts, then drops out
        if name in self.lora_magnitude_vector:
            return add_dora(self, name, x_in, result)
        out = self.lora_B[name](self.lora_A[name](x_in)) * self.scaling[name]
        return result + (out.to(result.dtype) if self._rounds_update() else out)

    def _rounds_update(self) -> bool:
        """Whether an update is rounded to the base output's dtype before it is added: peft's QLoRA (bitsandbytes)
        layer does so outside autocast, its plain layers add first and round once."""
        return is_quantized(self.base_layer) and not torch.is_autocast_enabled()

    def _routed(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """A mixed-adapter batch (``row_adapters``): each adapter's update computed on its own rows only."""
        if (out := self._gathered(x, result)) is not None:
            return out  # every row's own adapter in two batched matmuls (a LoraLinear's, methods/_lora_gather.py)
        for name, rows in self.row_adapters.groups(x.shape[0], x.device):
            if name not in self.scaling:  # BASE_ROW, or an adapter this layer does not hold
                continue
            if rows is None:
                result = self._add(name, x, result).to(result.dtype)
            else:
                part = self._add(name, x.index_select(0, rows), result[rows])
                result = result.index_copy(0, rows, part.to(result.dtype))
        return result

    def _gathered(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor | None:
        return None  # the row loop; LoraLinear overrides it with the batched path

    def check_merge(self, names: list[str]) -> None:
        with kept_in_place(getattr(self, "base_layer", None)):  # a bitsandbytes base: its trial merge written into it
            super().check_merge(names)

    def _merge_weights(self, name: str, base: torch.Tensor | None = None, safe: bool | None = None) -> None:
        safe = self.safe_merged.get(name, False) if safe is None else safe
        inits.check_bias_merge(self, name)
        with requantized_after(self, name):  # a bitsandbytes layer transformers loaded: quantised again, as peft's
            self._merge_into(name, base, safe)

    def _merge_into(self, name: str, base: torch.Tensor | None, safe: bool) -> None:
        self._dequantize_base()
        with self._merge_scale(name):  # its scale now, or (a redo) the one it was merged at
            dora = name in self.lora_magnitude_vector
            # DoRA's norm is of the base without the adapters merged before (W0), as the forward computes it (peft's
            # _unmerged_base_weight, which merges them back with this merge's safe_merge); W itself holds them. W is
            # read after that replay, which may replace the layer (a requantised merge: _quant_steps.py), as peft's
            # merge_safe reads W again after it.
            unmerged = (self._unmerged_base(safe) if base is None else base) if dora else None
            weight = self._weight
            delta = self.delta_weight(name, merging=True)
            if dora:  # W' = m (W + s B A) / ||W0 + s B A||, the norm kept
                merge_weight(self, name, weight, delta, unmerged)
            elif safe and not isinstance(self.base_layer, DequantizedLinear):  # peft's bitsandbytes merge: plain's
                weight.add_(delta.to(weight.dtype))  # peft's safe merge: an fp32 delta rounded to a bf16 W, added
            else:  # peft's plain merge: added in fp32, rounded once (an embedding's: the delta rounded, then added)
                weight.add_(delta.to(weight.dtype) if self._merge_rounds else delta)
            inits.add_bias(self, name, 1)

    def _unmerged_base(self, safe: bool) -> torch.Tensor:
        """The base weight without the adapters merged into it (taken out, copied, merged back in turn)."""
        merged = list(self.merged_adapters)
        if not merged:
            return self._weight
        for n in reversed(merged):
            self._unmerge_weights(n)
        base = self._weight.detach().clone()
        for n in merged:
            self._merge_weights(n, base, safe)
        return base

    def _unmerge_weights(self, name: str) -> None:
        # the update as it was merged, whatever the scale now; a bitsandbytes base quantised again after, as peft's
        with requantized_after(self, name), self._merge_scale(name):
            weight = self._weight
            delta = self.delta_weight(name, merging=True)
            if name in self.lora_magnitude_vector:
                unmerge_weight(self, name, weight, delta)
            else:  # the delta rounded, then subtracted: peft's unmerge (its merge adds, then rounds)
                weight.sub_(delta.to(weight.dtype))
            inits.add_bias(self, name, -1)

    _rows_dim, _dora = 0, staticmethod(dora)  # the stored weight's dimension that indexes outputs; DoRA's update
    _merge_rounds = False  # a plain merge rounds the delta to W's dtype before adding it (LoraEmbedding: as peft's)


@contextmanager
def settled_after(model: nn.Module, name: str) -> Iterator[None]:
    """A load's import of adapter ``name`` into ``model`` (a DeltaModel; adapter_io.import_tensors): within, each LoRA
    layer keeps the base weight its init (PiSSA, OLoRA) replaced, its ``import_state`` included; once the whole import
    went through, all are dropped together. A failure anywhere in it (a later layer, a base copy, Ctrl-C) leaves every
    one for the refused load's ``delete_adapter`` to put back (settled per layer, those imported before kept the
    residual: an OLoRA base without its adapter)."""
    held = [layer for _, layer in model._layers() if name in layer.__dict__.get("_pre_init", {})]
    for layer in held:
        layer.__dict__.setdefault("_settle_later", set()).add(name)
    try:
        yield
    finally:
        for layer in held:
            layer.__dict__["_settle_later"].discard(name)
    for layer in held:
        inits.settle(layer, name, restore=False)


def _factors(A: torch.Tensor, B: torch.Tensor, merging: bool) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """A, B as ``delta_weight`` multiplies them, and the delta's dtype. ``merging`` (PEFT's get_delta_weight): on CPU
    half-precision factors multiply and scale in float32, the delta rounded once to their dtype."""
    if merging and A.device.type == "cpu" and A.dtype in (torch.float16, torch.bfloat16):
        return A.float(), B.float(), A.dtype
    return A, B, A.dtype


def check_grouped_merge(layer: nn.Module, name: str) -> None:
    """NotMergeable where the base conv is grouped: B A is not a kernel of W's shape (peft's NotImplementedError).
    One of the layer's ``merge_checks``, which DeltaModel runs on every layer before any weight is written."""
    if layer.base_layer.groups > 1:
        raise NotMergeable(
            f"adapter {name!r} is on a grouped {type(layer.base_layer).__name__}, which peft cannot merge either"
        )


class LoraConvNd(_LoraBase):
    """LoRA on an ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (``conv``: the kind, ``conv_fn``: its functional)."""

    conv: type[nn.Module] = nn.Conv2d
    conv_fn = staticmethod(F.conv2d)
    _dora, merge_checks = staticmethod(conv_dora), (inits.check_bias_merge, check_grouped_merge)

    def add(self, name: str, r: int, alpha: float, dropout: float, rslora: bool, dora: bool, init: bool | str,
            bias: bool = False) -> None:  # fmt: skip
        base = self.base_layer
        self._add_common(name, r, alpha, dropout, rslora)
        w, ones = base.weight, (1,) * (base.weight.dim() - 2)
        # A sees the input exactly as the base kernel does (dilation, padding mode too), so B A merges into W.
        kw = dict(stride=base.stride, padding=base.padding, dilation=base.dilation, padding_mode=base.padding_mode)
        self.lora_A[name] = self.conv(base.in_channels, r, base.kernel_size, bias=False, **kw)  # drawn as peft's
        self.lora_B[name] = self.conv(r, base.out_channels, ones, ones, groups=base.groups, bias=bias)
        inits.reset(self.lora_A[name].weight, self.lora_B[name].weight, init, r)
        inits.reset_bias(self.lora_B[name], init)
        self.lora_A[name].to(w.device, w.dtype), self.lora_B[name].to(w.device, w.dtype)
        if dora:  # m stored (1, c_out, 1, ...), as peft's DoraConvNdLayer
            self.lora_magnitude_vector[name] = init_magnitude(self, name)

    def delta_weight(self, name: str, merging: bool = False) -> torch.Tensor:
        check_grouped_merge(self, name)
        A, B, dtype = _factors(self.lora_A[name].weight, self.lora_B[name].weight, merging)  # A (r, c_in, *k)
        if A.dim() == 4 and A.shape[2:] == (1, 1):  # peft's 1x1 Conv2d: a matmul
            delta = (B.flatten(1) @ A.flatten(1)).unsqueeze(2).unsqueeze(3)
        else:
            delta = self.conv_fn(A.transpose(0, 1), B).transpose(0, 1)  # (c_out, c_in, *k)
        return (delta * self.scaling[name]).to(dtype)


class LoraConv1d(LoraConvNd):
    conv, conv_fn = nn.Conv1d, staticmethod(F.conv1d)


class LoraConv2d(LoraConvNd):
    conv, conv_fn = nn.Conv2d, staticmethod(F.conv2d)


class LoraConv3d(LoraConvNd):
    conv, conv_fn = nn.Conv3d, staticmethod(F.conv3d)


def conv_layer(module: nn.Module) -> LoraConvNd | None:
    """A new LoRA layer around ``module`` if it is a torch conv LoRA adapts (a subclass too, as peft's isinstance)."""
    kinds = ((nn.Conv1d, LoraConv1d), (nn.Conv2d, LoraConv2d), (nn.Conv3d, LoraConv3d))
    return next((layer(module) for kind, layer in kinds if isinstance(module, kind)), None)


def check_target(layer: nn.Module, name: str, config: DeltaConfig, r: int) -> None:
    """ConfigError, before the model is touched, where ``config`` (a LoraConfig) cannot adapt the conv ``layer``
    (nothing for another layer): r not a multiple of its groups, an init peft does not define on a conv."""
    if not isinstance(layer, LoraConvNd):
        return
    base, init = layer.base_layer, config.init_lora_weights
    if r % base.groups:  # peft: "Targeting a Conv2d with groups=2 and rank 3 ..."
        raise ConfigError(
            f"lora: {name} is a {type(base).__name__} with groups={base.groups}; r={r} must be a multiple of it"
        )
    if init not in (True, False, "gaussian"):  # peft: "Unknown initialization init_lora_weights='pissa'"
        raise ConfigError(f"lora: init_lora_weights={init!r} is not defined for {name} ({type(base).__name__}), as in "
                          "peft; leave it out of target_modules")  # fmt: skip
