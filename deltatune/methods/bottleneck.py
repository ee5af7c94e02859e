"""Bottleneck adapters (Houlsby et al., 2019, arXiv:1902.00751; Pfeiffer et al., 2021, arXiv:2005.00247).

A small bottleneck network sits on the output h (d) of a transformer sub-layer, before the block's residual add
and LayerNorm, with a residual of its own:

    h' = h + s * (W_up f(W_down LN_b(h) + b_down) + b_up)      (then LN_a on the added term, if asked)

with W_down (m x d), W_up (d x m), m = bottleneck_size or d // reduction_factor, f a non-linearity and s =
``scaling`` (or trained: ``scaling='learned'``, a scalar, ``'channel'``, a vector of size d, both starting at 1).
With ``use_gating`` the term is multiplied by g = mean over positions of sigmoid(W_g h + b_g), one per sequence.
Only W_down, b_down, W_up, b_up (the optional LayerNorms, a learned s, the gate) train; the base stays frozen.
Houlsby places an adapter after the attention output projection and after the feed-forward output projection of
every block; Pfeiffer only after the feed-forward one. Where those projections live in each model family is data
(``targets.BOTTLENECK_TARGETS``), not code.

Init: W_down ~ N(0, 0.01^2) (Houlsby's near-zero init), W_up = 0 and biases 0, so the adapter starts as the
identity and the model as the base. ``init_weights="houlsby"`` draws W_up from N(0, 0.01^2) too, as the paper
does (near, not exactly, the base). Nothing to merge: f is non-linear.

Several adapters at one sub-layer compute from the same h and their terms add up. AdapterFusion
(methods/fusion.py) puts a fusion module into ``adapter_fusion``; the layer calls it with the outputs of the
adapters it fuses.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, DeltaConfig, check_positive_int, check_range
from ..layer import DeltaLayer, linear_shape, set_submodule
from ..targets import fused_experts
from ._bottleneck_sites import locate, width

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "leakyrelu": nn.LeakyReLU,
}


def _activations() -> list[str]:
    """The names the adapters library takes (case aside): ours, and transformers' ACT2FN less those with weights."""
    from transformers.activations import ACT2CLS

    return sorted(set(ACTIVATIONS) | {n for n in ACT2CLS if n not in ("prelu", "xielu")})


def _activation(name: str) -> nn.Module:
    key = name.lower()
    if key in ACTIVATIONS:
        return ACTIVATIONS[key]()
    from transformers.activations import get_activation

    return get_activation(key)


SUBLAYERS = {"houlsby": ("attn", "ffn"), "pfeiffer": ("ffn",)}


def read_text_switches(data: dict[str, Any], keys: tuple[str, ...], source: str) -> dict[str, Any]:
    """``data`` with the switches among ``keys`` that a file holds as text (or 0, 1, None) read as bool(value), as
    they ran: before 6e49933 a config took ln_before="false" (and the fusion's value_bias, init_weights) as given, ran
    it as True and saved it. One warning naming the file; a config made in Python still refuses them."""
    text = {key: value for key in keys if key in data and not isinstance(value := data[key], bool)}  # (0, 1, None)
    if text:
        said = ", ".join(f"{key}={value!r} (read as {bool(value)})" for key, value in text.items())
        warnings.warn(f"{source}: {said}: not a bool, as older deltatune saved it, read as it trained", stacklevel=4)
    return {**data, **{key: bool(value) for key, value in text.items()}}


@dataclass
class BottleneckConfig(DeltaConfig):
    """Bottleneck adapters: a down-projection, a non-linearity and an up-projection after chosen sub-layers."""

    method = "bottleneck"
    peft_type = "BOTTLENECK"

    config: str = "houlsby"
    """Placement: 'houlsby' (after attention and feed-forward) or 'pfeiffer' (after feed-forward only)."""
    reduction_factor: int = 16
    """Bottleneck size m = d // reduction_factor (d the sub-layer's output size). Ignored if bottleneck_size is set."""
    bottleneck_size: int | None = None
    """Bottleneck size m, overriding reduction_factor."""
    non_linearity: str = "relu"
    """The non-linearity f between the projections: 'relu', 'gelu', 'swish' (= 'silu'), 'tanh', 'leakyrelu', or any
    other name of transformers' ACT2FN ('gelu_new', ...), case aside, as the adapters library takes them."""
    ln_before: bool = False
    """A trainable LayerNorm on the adapter's input h (inside the adapter; the residual uses the raw h)."""
    ln_after: bool = False
    """A trainable LayerNorm on the adapter's added term, after its dropout, before the residual add: the adapters
    library's ln_after with its default adapter_residual_before_ln=False. LN(0) = 0, so the start is still the base;
    LN ignores the term's scale, so ``scaling`` then (almost) does nothing, as there."""
    scaling: float | str = 1.0
    """s: the adapter's term is multiplied by it. 'learned': a trainable scalar, 'channel': a trainable vector (d),
    both starting at 1 (saved as ``adapter_scale``), as the adapters library's scaling options."""
    adapter_dropout: float = 0.0
    """Dropout on the adapter's term, in [0, 1)."""
    use_gating: bool = False
    """A trained gate g = mean over positions of sigmoid(W_g h + b_g) (W_g: 1 x d; one per sequence) multiplies the
    adapter's term after its dropout, before LN_a: the adapters library's use_gating (saved as ``adapter_gate``).
    Init: W_g ~ N(0, 0.02^2), b_g = 0 (the library's for 'bert' and 'mam_adapter'; ours for True), so g starts near
    1/2; nn.Linear's for 'houlsby' (as the library's) and False."""
    init_weights: bool | str = True
    """True: W_down ~ N(0, 0.01^2), W_up and biases 0 (starts exactly as the base). 'houlsby': W_up ~ N(0, 0.01^2)
    as well (the paper's near-identity init). The adapters library's 'bert' (W_down, W_up ~ N(0, 0.02^2), biases 0:
    not the base at the start) and 'mam_adapter' (W_down as nn.Linear's kaiming-uniform, W_up and biases 0).
    False: nn.Linear's random init (changes outputs; for tests)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.config not in SUBLAYERS:
            raise ConfigError(f"config must be 'houlsby' or 'pfeiffer', got {self.config!r}")
        check_range("reduction_factor", self.reduction_factor, 0, None, low_open=True)
        for key in ("ln_before", "ln_after", "use_gating"):  # a string ("false") would switch it on
            if not isinstance(value := getattr(self, key), bool):
                raise ConfigError(f"{key} must be a bool, got {value!r}")
        if self.scaling not in ("learned", "channel"):
            try:
                check_range("scaling", self.scaling)
            except ConfigError:  # name the words too: 'learnt' was told only "must be a finite number"
                raise ConfigError(
                    f"scaling must be a finite number, 'learned' or 'channel', got {self.scaling!r}"
                ) from None
        check_positive_int("bottleneck_size", self.bottleneck_size, optional=True)
        if not isinstance(self.non_linearity, str) or self.non_linearity.lower() not in _activations():
            raise ConfigError(f"non_linearity must be one of {_activations()}, got {self.non_linearity!r}")
        check_range("adapter_dropout", self.adapter_dropout, 0.0, 1.0)
        init = self.init_weights  # not 0 / 1: 0 == False passed, ran W_up as True's init and the gate as False's
        if type(init) not in (bool, str) or init not in (True, False, "houlsby", "bert", "mam_adapter"):
            raise ConfigError(f"init_weights must be True, False, 'houlsby', 'bert' or 'mam_adapter', got {init!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter config") -> BottleneckConfig:
        """As ``DeltaConfig.from_dict``; ln_before, ln_after or use_gating as text read as they ran
        (``read_text_switches``); init_weights 0 / 1 (taken before session 58) as False / True: its weights load."""
        data = {**data, "init_weights": bool(v)} if type(v := data.get("init_weights")) in (int, float) else data
        return super().from_dict(read_text_switches(data, ("ln_before", "ln_after", "use_gating"), source), source)

    @property
    def sublayers(self) -> tuple[str, ...]:
        """The sub-layers this placement adapts: keys ('attn', 'ffn') of a ``targets.BOTTLENECK_TARGETS`` layout."""
        return SUBLAYERS[self.config]

    def size_for(self, d: int) -> int:
        """The bottleneck size m for a sub-layer of output size d.

        Raises:
            ConfigError: reduction_factor leaves a bottleneck smaller than 1.
        """
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        m = int(d // self.reduction_factor)
        if m < 1:
            raise ConfigError(
                f"reduction_factor={self.reduction_factor!r} leaves a bottleneck of size {d} // "
                f"{self.reduction_factor} = {m} for hidden size {d}; use a reduction_factor <= {d} or set bottleneck_size"
            )
        return m


def _out_features(module: nn.Module, width: int | None = None) -> int:
    """The output size of ``module``. A whole block with no weight of its own: ``width`` (the model's hidden size)
    for a mixture of experts' block (its output goes to the residual add), else its last linear layer's (an MLP's
    down projection)."""
    shape = linear_shape(module)
    if shape is not None:
        return shape[1]
    if isinstance(module, nn.Embedding):  # its weight is (vocab, dim): the vocabulary is no output size
        return module.embedding_dim
    if hasattr(module, "weight") and module.weight.dim() == 2:
        return int(module.weight.shape[0])
    if not hasattr(module, "weight"):
        if width is not None and fused_experts(module):
            return width
        shapes = [shape for sub in module.modules() if (shape := linear_shape(sub)) is not None]
        if shapes:
            return shapes[-1][1]
    raise ConfigError(f"bottleneck: cannot tell the output size of a {type(module).__name__}")


class BottleneckLayer(DeltaLayer):
    """Wraps a sub-layer's output projection; each adapter adds s * up(f(down(h))) to its output h."""

    adapter_attrs = (
        "adapter_down",
        "adapter_up",
        "adapter_ln_before",
        "adapter_ln_after",
        "adapter_fusion",
        "adapter_scale",
        "adapter_gate",
    )
    supports_row_adapters = True

    def __init__(self, base_layer: nn.Module, width: int | None = None) -> None:
        super().__init__(base_layer)
        self.out_features = _out_features(base_layer, width)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_ln_before = nn.ModuleDict()
        self.adapter_ln_after = nn.ModuleDict()
        self.adapter_fusion = nn.ModuleDict()  # filled by methods/fusion.py: module(h, deltas) -> combined term
        self.adapter_gate = nn.ModuleDict()  # use_gating: a Linear(d, 1) per adapter
        self.adapter_scale = nn.ParameterDict()  # a learned s ('learned': (1,), 'channel': (d,)), starting at 1
        self.adapter_act = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    @property
    def weight(self) -> torch.Tensor:
        # Modeling code reads the wrapped projection's weight (T5 checks ``self.wo.weight.dtype``). A whole block
        # (an MoE block) has none: its first parameter, for the dtype and device of the adapter.
        base = self.base_layer
        while isinstance(base, DeltaLayer) and hasattr(base, "base_layer"):
            base = base.base_layer
        return base.weight if hasattr(base, "weight") else next(base.parameters())

    def add(
        self,
        name: str,
        m: int,
        act: str,
        ln_before: bool,
        ln_after: bool,
        scaling: float | str,
        dropout: float,
        init: bool | str,
        gating: bool = False,
    ) -> None:
        """Add adapter ``name`` with bottleneck size ``m``."""
        d = self.out_features
        w = self.weight
        kw = {"device": w.device, "dtype": w.dtype if w.is_floating_point() else torch.float32}
        down = nn.Linear(d, m, **kw)
        up = nn.Linear(m, d, **kw)
        gate = nn.Linear(d, 1, **kw) if gating else None  # made (drawn) after up, as the library's
        if init in ("bert", "mam_adapter"):  # the adapters library's, drawn in its order: W_down, then W_up
            with torch.no_grad():
                if init == "bert":
                    nn.init.normal_(down.weight, std=0.02)
                    nn.init.normal_(up.weight, std=0.02)
                else:
                    nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
                    nn.init.zeros_(up.weight)
                nn.init.zeros_(down.bias)
                nn.init.zeros_(up.bias)
        elif init is not False:
            with torch.no_grad():
                # Houlsby's init: zero-mean normal, std 1e-2, truncated at two standard deviations.
                nn.init.trunc_normal_(down.weight, std=1e-2, a=-2e-2, b=2e-2)
                nn.init.zeros_(down.bias)
                if init == "houlsby":
                    nn.init.trunc_normal_(up.weight, std=1e-2, a=-2e-2, b=2e-2)
                else:  # W_up = 0: the adapter is exactly the identity at the start
                    nn.init.zeros_(up.weight)
                nn.init.zeros_(up.bias)
        if gate is not None and init not in (False, "houlsby"):  # the library leaves a 'houlsby' gate as made
            with torch.no_grad():
                nn.init.normal_(gate.weight, std=0.02)
                nn.init.zeros_(gate.bias)
        if gate is not None:
            self.adapter_gate[name] = gate
        self.adapter_down[name] = down
        self.adapter_up[name] = up
        if ln_before:
            self.adapter_ln_before[name] = nn.LayerNorm(d, **kw)
        if ln_after:
            self.adapter_ln_after[name] = nn.LayerNorm(d, **kw)
        self.adapter_act[name] = _activation(act)
        self.adapter_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if isinstance(scaling, str):
            self.adapter_scale[name] = nn.Parameter(torch.ones(d if scaling == "channel" else 1, **kw))
        self.scaling[name] = 1.0 if isinstance(scaling, str) else scaling

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.scaling.pop(name, None)
        for container in (self.adapter_act, self.adapter_dropout):
            if name in container:
                del container[name]

    def bottleneck_names(self) -> list[str]:
        """The plain (not fusion) adapters this layer holds."""
        return list(self.adapter_down.keys())

    def fusion_weights(self, name: str) -> torch.Tensor | None:
        """Fusion ``name``'s mean attention over its adapters (N,) in the last forward; None if none ran."""
        return self.adapter_fusion[name].last_weights if name in self.adapter_fusion else None

    def delta(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """Adapter ``name``'s term s * up(f(down(h))) (after its optional LayerNorms), same shape as h."""
        if name not in self.adapter_down:
            raise KeyError(f"bottleneck adapter {name!r} is not in this layer (was it deleted?)")
        x = self.adapter_ln_before[name](h) if name in self.adapter_ln_before else h
        up = self.adapter_up[name]
        z = up(self.adapter_act[name](self.adapter_down[name](x.to(up.weight.dtype)))) * self.scaling[name]
        z = z * self.adapter_scale[name] if name in self.adapter_scale else z
        z = self.adapter_dropout[name](z)  # before LN_a, as the adapters library's Adapter.forward
        if name in self.adapter_gate:  # one gate per sequence: the mean over its positions (dim 1), as there
            gate = torch.sigmoid(self.adapter_gate[name](h.to(up.weight.dtype)))
            z = z * (gate.mean(1, keepdim=True) if gate.dim() > 2 else gate)
        return (self.adapter_ln_after[name](z) if name in self.adapter_ln_after else z).to(h.dtype)

    def _term(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """What adapter or fusion ``name`` adds to the sub-layer output h."""
        if name in self.adapter_fusion:
            fusion = self.adapter_fusion[name]
            deltas = torch.stack([self.delta(a, h) for a in fusion.adapter_names], dim=-2)  # (..., N, d)
            return fusion(h, deltas)
        return self.delta(name, h)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)
        if isinstance(h, tuple):  # a block that returns more (GPT-OSS's MoE block: output, router scores)
            return (self._add(h[0]), *h[1:])
        return self._add(h)

    def _add(self, h: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return h
        if h.shape[-1] != self.out_features:  # a block whose output size was guessed from its last linear layer
            raise ValueError(
                f"bottleneck: {type(self.base_layer).__name__} returns size {h.shape[-1]}, not the "
                f"{self.out_features} its adapters were made for; target its output projection instead"
            )
        if self.row_adapters is not None:
            return self._routed(h)
        out = h
        for name in self.active_adapters:
            out = out + self._term(name, h)
        return out

    def _routed(self, h: torch.Tensor) -> torch.Tensor:
        """A mixed-adapter batch (``row_adapters``): each adapter's term computed on its own rows only."""
        out = h
        for name, rows in self.row_adapters.groups(h.shape[0], h.device):
            if name not in self.adapter_down and name not in self.adapter_fusion:
                continue
            if rows is None:
                out = out + self._term(name, h)
            else:
                out = out.index_add(0, rows, self._term(name, h.index_select(0, rows)))
        return out


def _existing(module: nn.Module) -> BottleneckLayer | None:
    """The BottleneckLayer at or inside (through other layers' base_layer) ``module``, if any."""
    while isinstance(module, DeltaLayer):
        if isinstance(module, BottleneckLayer):
            return module
        module = getattr(module, "base_layer", None)
    return None


def inject(model: nn.Module, config: BottleneckConfig, adapter_name: str) -> list[nn.Module]:
    """Add bottleneck adapter ``adapter_name`` after each sub-layer the config places it at.

    Everything is checked (targets found, bottleneck size >= 1) before the model is touched.
    """
    plan: list[tuple[str, BottleneckLayer, bool, int]] = []
    for name in locate(model, config):
        module = model.get_submodule(name)
        layer = _existing(module)
        new = layer is None
        if new:
            layer = BottleneckLayer(module, width(model))  # a plain module, or another method's layer whole
        plan.append((name, layer, new, config.size_for(layer.out_features)))
    for name, layer, new, m in plan:
        if new:
            layer.training = layer.base_layer.training
            set_submodule(model, name, layer)
        layer.add(
            adapter_name,
            m,
            config.non_linearity,
            config.ln_before,
            config.ln_after,
            config.scaling,
            config.adapter_dropout,
            config.init_weights,
            config.use_gating,
        )
        # the new adapter's own and the containers in the model's mode; the others' modes kept (peft 0.22's)
        for part in (p for p in layer.children() if p is not layer.base_layer):
            part.training = layer.training
            if isinstance(part, nn.ModuleDict) and adapter_name in part:
                part[adapter_name].train(layer.training)
    return [layer for _, layer, _, _ in plan]


CONFIG, INJECT = BottleneckConfig, inject
