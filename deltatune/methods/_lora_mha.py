"""LoRA on torch's ``nn.MultiheadAttention`` (peft 0.21.2's ``lora.MultiheadAttention``).

The module computes with two weights it reads itself, never calling a linear layer: ``in_proj_weight`` W_in
(3E x E, query, key and value stacked) and ``out_proj.weight`` W_out (E x E). Each gets its own low-rank update, as
peft: W_in + s B A (A r x E, B 3E x r) and W_out + s B' A' (A' r x E, B' E x r), s = lora_alpha / r (rsLoRA:
/ sqrt(r)). The forward runs the base module with the updated weights put in for the call
(``torch.func.functional_call``: the base is never written, gradients reach A, B, A', B'); merging adds the updates
to the weights in place, unmerging subtracts them.

Saved keys are peft's: ``<path>.lora_A.weight``, ``<path>.lora_B.weight`` (W_in's) and
``<path>.base_layer.out_proj.lora_A.weight`` / ``.lora_B.weight`` (W_out's), so adapters move both ways.

Differences from peft, on purpose: peft's forward and merge add W_out's update twice (W_out + 2 s B' A': its merge
writes W_out + s B' A', then merges its out_proj layer again; huggingface/peft#3774, fixed in peft 0.22.0, whose
output and merge are these), here once, as the math says; a peft adapter with B' = 0 (as trained from its init)
computes the same in both, one trained in peft 0.21 computes there as B' doubled. With several active adapters peft's gradient reaches only the last one's (it merges from the
previous merge's ``.data``), here each one's. As peft: lora_dropout has no effect (the update is folded into the
weights), mixed-adapter batches are refused, DoRA and a module whose query, key and value sizes differ too. Unlike
peft, an ``nn.TransformerEncoderLayer`` around it in eval without grad computes with the adapter: its fused path,
which reads the base weights itself (peft's output there is the base's), is not taken while an adapter computes.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..config import ConfigError, DeltaConfig
from . import _lora_init as inits
from ._lora_conv import _factors, _LoraBase

OUT = "base_layer.out_proj."  # peft's key prefix of W_out's factors (its out_proj is a LoRA Linear of its own)


class LoraMultiheadAttention(_LoraBase):
    """LoRA on an ``nn.MultiheadAttention``: an update of ``in_proj_weight`` (``lora_A``, ``lora_B``) and one of
    ``out_proj.weight`` (``out_lora_A``, ``out_lora_B``, saved under peft's ``base_layer.out_proj.`` names)."""

    adapter_attrs = ("lora_A", "lora_B", "out_lora_A", "out_lora_B")
    supports_row_adapters, merge_state, merge_checks = False, ("_merged_scaling",), ()  # peft: no mixed batches

    def __init__(self, base_layer: nn.MultiheadAttention) -> None:
        super().__init__(base_layer)
        self.out_lora_A = nn.ModuleDict()
        self.out_lora_B = nn.ModuleDict()
        self._drawn = False  # peft draws W_out's factors twice for a module's first adapter (see ``add``)

    def __getattr__(self, name: str):
        # Code that reads the wrapped module's attributes (nn.TransformerEncoderLayer: batch_first, in_proj_weight)
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self._modules.get("base_layer")
            if base is None:
                raise
            return getattr(base, name)

    @property
    def _qkv_same_embed_dim(self) -> bool:
        # False while an unmerged adapter computes: nn.TransformerEncoderLayer's fused inference path (eval, no grad)
        # reads in_proj_weight and out_proj.weight itself, skipping this forward (and peft's update) unless it is
        return self.base_layer._qkv_same_embed_dim and (self.disabled or self.merged or not self._active())

    def _active(self) -> list[str]:
        return [n for n in self.active_adapters if n in self.lora_A]

    @property
    def weight(self) -> torch.Tensor:  # (the module has no ``weight``; its input projection's)
        return self.base_layer.in_proj_weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.in_proj_bias

    def add(self, name: str, r: int, alpha: float, dropout: float, rslora: bool, dora: bool, init: bool | str,
            bias: bool = False) -> None:  # fmt: skip
        self._add_common(name, r, alpha, dropout, rslora)
        base = self.base_layer
        E = base.embed_dim
        w = base.in_proj_weight
        dtype = w.dtype if w.is_floating_point() else torch.float32
        # peft's draws, in its order: its first adapter wraps out_proj (W_out's factors drawn), then update_layer
        # draws W_in's and W_out's again (the second W_out pair is kept); a later adapter draws W_in's, W_out's.
        if not self._drawn:
            _pair(E, E, r, init)
            self._drawn = True
        for a, b, d_out in ((self.lora_A, self.lora_B, 3 * E), (self.out_lora_A, self.out_lora_B, E)):
            a[name], b[name] = _pair(E, d_out, r, init)
            a[name].to(w.device, dtype), b[name].to(w.device, dtype)

    def _deltas(self, name: str, merging: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """s B A for W_in (3E, E) and s B' A' for W_out (E, E) (``merging``: as peft's get_delta_weight)."""
        out = []
        for a, b in ((self.lora_A, self.lora_B), (self.out_lora_A, self.out_lora_B)):
            A, B, dtype = _factors(a[name].weight, b[name].weight, merging)
            out.append(((B @ A) * self.scaling[name]).to(dtype))
        return out[0], out[1]

    def delta_weight(self, name: str, merging: bool = False) -> torch.Tensor:
        """W_in's update s B A, (3E, E)."""
        return self._deltas(name, merging)[0]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        # W_out's factors under peft's names: out_lora_A.weight -> base_layer.out_proj.lora_A.weight
        own = super().adapter_parameters(name)
        return {(OUT + k.removeprefix("out_") if k.startswith("out_") else k): p for k, p in own.items()}

    def forward(self, query: torch.Tensor, *args, **kwargs):
        base = self.base_layer
        names = self._active()
        if self.disabled or self.merged or not names:
            result = base(query, *args, **kwargs)
        else:
            w_in, w_out = base.in_proj_weight, base.out_proj.weight
            for name in names:  # peft's order: each adapter's update rounded to the weight's dtype, then added
                d_in, d_out = self._deltas(name, merging=True)
                w_in, w_out = w_in + d_in.to(w_in.dtype), w_out + d_out.to(w_out.dtype)
            weights = {"in_proj_weight": w_in, "out_proj.weight": w_out}
            result = torch.func.functional_call(base, weights, (query, *args), kwargs)
        out, attn = result  # as peft: both cast back to the query's dtype
        return out.to(query.dtype), None if attn is None else attn.to(query.dtype)

    def _merge_weights(self, name: str, base: torch.Tensor | None = None, safe: bool | None = None) -> None:
        with self._merge_scale(name):  # its scale now, or (a redo) the one it was merged at
            self._add_deltas(name, 1)

    def _unmerge_weights(self, name: str) -> None:
        with self._merge_scale(name):  # the update as it was merged, whatever the scale now
            self._add_deltas(name, -1)

    def _add_deltas(self, name: str, sign: int) -> None:
        base = self.base_layer
        d_in, d_out = self._deltas(name, merging=True)
        for weight, delta in ((base.in_proj_weight, d_in), (base.out_proj.weight, d_out)):
            weight.add_(delta.to(weight.dtype) * sign)  # the delta rounded to W's dtype, as peft's merge and unmerge


def _pair(d_in: int, d_out: int, r: int, init: bool | str) -> tuple[nn.Linear, nn.Linear]:
    """A (r x d_in) and B (d_out x r) drawn as peft's update_layer draws them: two nn.Linear, then the init."""
    A, B = nn.Linear(d_in, r, bias=False), nn.Linear(r, d_out, bias=False)
    inits.reset(A.weight, B.weight, init, r)
    return A, B


def mha_layer(module: nn.Module) -> LoraMultiheadAttention | None:
    """A new LoRA layer around ``module`` if it is an ``nn.MultiheadAttention`` (a subclass too)."""
    return LoraMultiheadAttention(module) if isinstance(module, nn.MultiheadAttention) else None


def check_target(model: nn.Module, layer: nn.Module, name: str, config: DeltaConfig) -> None:
    """ConfigError, before the model is touched, where ``config`` (a LoraConfig) cannot adapt ``layer`` at ``name``
    as an ``nn.MultiheadAttention``; a warning for its ``out_proj`` (which it never calls); nothing for another layer."""
    parent = model.get_submodule(name.rpartition(".")[0]) if name.endswith("out_proj") else None
    if isinstance(parent, (nn.MultiheadAttention, LoraMultiheadAttention)):  # adapted as peft does: told here
        warnings.warn(f"lora: {name} is the out_proj of an nn.MultiheadAttention, which reads its weight itself, so "
                      f"LoRA there changes nothing until merged; target {name.rpartition('.')[0]} instead (LoRA on "
                      "its in_proj_weight and out_proj, as peft)", stacklevel=5)  # fmt: skip
    if not isinstance(layer, LoraMultiheadAttention):
        return
    base, init = layer.base_layer, config.init_lora_weights
    where = f"{name} (MultiheadAttention)"
    if config.use_dora:  # peft: "MultiheadAttention does not support DoRA (yet), please set use_dora to False"
        raise ConfigError(f"lora: use_dora is not supported on {where}, as in peft; set use_dora=False or leave it "
                          "out of target_modules")  # fmt: skip
    if not base._qkv_same_embed_dim:  # peft: "Only same embed for query/key/value is supported ..."
        raise ConfigError(f"lora: {where} has kdim/vdim unlike embed_dim (separate q/k/v weights); LoRA adapts "
                          "one stacked in_proj_weight only, as peft; leave it out of target_modules")  # fmt: skip
    if not isinstance(base.out_proj, nn.Linear):  # peft: "out_proj must be an instance of nn.Linear ..."
        raise ConfigError(f"lora: the out_proj of {where} is a {type(base.out_proj).__name__}, not an nn.Linear")
    if config.lora_bias:  # peft keeps the bias out of the forward's update but merges it: refused here
        raise ConfigError(f"lora: lora_bias=True is not supported on {where}; set lora_bias=False")
    if init not in (True, False, "gaussian"):
        raise ConfigError(f"lora: init_lora_weights={init!r} is not drawn on {where}; use True, False or 'gaussian'")
    if config.lora_dropout:
        warnings.warn(f"lora: lora_dropout has no effect on {where}: its update is folded into the weights for the "
                      "forward, as peft's", stacklevel=5)  # fmt: skip
