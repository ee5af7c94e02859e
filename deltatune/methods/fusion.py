"""AdapterFusion (Pfeiffer, Kamath, Rücklé, Cho, Gurevych, 2021; arXiv:2005.00247), over bottleneck adapters.

Stage 1 trains N bottleneck adapters (methods/bottleneck.py), one per task. Stage 2 freezes the base and all of them
and learns, at every sub-layer where they sit, how much of each adapter's output to use for the target task.
With h (d) the sub-layer's output and o_i = adapter i's term (d) at that position, as it adds it: after its dropout,
its gate (``use_gating``) and its ``ln_after``, where the adapters library fuses the scaled up-projection before
them (the same term when none is set):

    q = W_q h + b_q,   k_i = W_k o_i + b_k,   v_i = W_v o_i
    a = softmax_i(dropout(q . k_i) / T)          (attention over the N adapters, per token)
    h' = h + sum_i a_i v_i

The dropout on the logits q . k_i (training only) is the adapters library's: ``dropout_prob``, or the model's
``attention_probs_dropout_prob`` (BERT's 0.1; 0 for a model without one). ``dropout_prob=0.0`` is no dropout, where the
library's ``dropout_prob or attention_probs_dropout_prob`` falls back to the model's.

Only W_q, W_k, W_v and the biases b_q, b_k (3 d^2 + 2 d per sub-layer) train; W_v has no bias, as the adapters
library's BertFusion (``value_bias=True`` adds one, b_v: fusions saved before it became an option). Init: W_q, W_k
~ N(0, 0.02^2), biases 0,
W_v = I: the fused term starts as a weighted average of the adapters' terms (close to the plain average, since the
small W_q, W_k give near-uniform attention). Nothing to merge.

A fusion over a single adapter is allowed: the softmax over one adapter is 1 and W_v = I, so it reproduces that
adapter exactly at the start, which is a useful check; W_v still trains (W_q and W_k then get no gradient).
``DeltaModel.fusion_weights(name)`` returns the attention a of the last forward pass per sub-layer, averaged over
all token positions (padding included). ``add_fusion`` and ``fusion_weights`` live here and reach DeltaModel through
``MODEL_FUNCTIONS`` (the registry's generic hook), so model.py knows nothing of fusion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, DeltaConfig, check_range
from ..layer import DeltaLayer
from .bottleneck import BottleneckLayer, read_text_switches


@dataclass
class AdapterFusionConfig(DeltaConfig):
    """AdapterFusion: per-sub-layer attention over the outputs of trained bottleneck adapters."""

    method = "fusion"
    peft_type = "ADAPTER_FUSION"
    recipe_refusal = ("it combines bottleneck adapters already trained, which a recipe cannot load: train each with "
                      "method bottleneck, then fuse them in Python (model.add_fusion, docs/methods.md)")  # fmt: skip
    no_targets = "AdapterFusion sits where the bottleneck adapters it fuses (adapter_names) sit"

    adapter_names: list[str] = field(default_factory=list)
    """The bottleneck adapters to fuse, by their names in the model (they must be loaded first)."""
    temperature: float = 1.0
    """T: the attention logits q . k_i are divided by it (> 0)."""
    dropout_prob: float | None = None
    """Dropout on the attention logits q . k_i while training. None: the base model's attention_probs_dropout_prob
    (0 if it has none), as the adapters library's; 0.0 is none (the library's falls back to the model's there). A saved config without this field reads as 0 (no dropout, as
    fusions trained before it existed)."""
    value_bias: bool = False
    """A trainable bias b_v on W_v. False, as the adapters library's BertFusion (its value projection is bias-free);
    a saved config without this field is a fusion made when W_v always had one (its file holds ``value.bias``) and
    reads as True."""
    init_weights: bool = True
    """True: the paper's init (W_v = I, near-uniform attention). False: W_q, W_k ~ N(0, 1) and W_v = I + N(0, 0.3^2),
    a fusion that is far from the adapters' average from the start (so that tests comparing outputs can fail)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.adapter_names, str):
            self.adapter_names = [self.adapter_names]
        self.adapter_names = list(self.adapter_names)
        if not self.adapter_names:
            raise ConfigError(
                "adapter_names is empty: a fusion combines bottleneck adapters already in the model (add_fusion)"
            )
        dup = sorted({n for n in self.adapter_names if self.adapter_names.count(n) > 1})
        if dup:
            raise ConfigError(f"adapter_names lists {dup[0]!r} more than once: {self.adapter_names!r}")
        check_range("temperature", self.temperature, 0, None, low_open=True)
        for key in ("value_bias", "init_weights"):  # a string ("false") would switch it on
            if not isinstance(value := getattr(self, key), bool):
                raise ConfigError(f"{key} must be a bool, got {value!r}")
        if self.dropout_prob is not None:
            check_range("dropout_prob", self.dropout_prob, 0.0, 1.0)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter config") -> AdapterFusionConfig:
        """As ``DeltaConfig.from_dict``; a config saved before ``value_bias`` and ``dropout_prob`` existed had b_v
        (its file holds it) and no dropout; value_bias or init_weights given as text reads as it ran
        (``bottleneck.read_text_switches``)."""
        data = read_text_switches(
            {"value_bias": True, "dropout_prob": 0.0, **data}, ("value_bias", "init_weights"), source
        )
        return super().from_dict(data, source)

    def uses(self) -> list[str]:
        return list(self.adapter_names)


class Fusion(nn.Module):
    """Attention over adapter outputs at one sub-layer: fuse(h, deltas) -> sum_i a_i W_v o_i (+ b_v if asked)."""

    def __init__(
        self,
        d: int,
        adapter_names: list[str],
        temperature: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        init_weights: bool = True,
        value_bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.adapter_names = list(adapter_names)
        self.temperature = temperature
        self.query = nn.Linear(d, d, device=device, dtype=dtype)
        self.key = nn.Linear(d, d, device=device, dtype=dtype)
        self.value = nn.Linear(d, d, bias=value_bias, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout)  # on the logits, before the temperature, as BertFusion's
        with torch.no_grad():
            for lin in (self.query, self.key):
                nn.init.normal_(lin.weight, std=0.02)  # BERT's init, as Adapters' BertFusion
                nn.init.zeros_(lin.bias)
            # W_v = I exactly (Adapters adds 1e-6 off the diagonal; exact keeps a one-adapter fusion exact).
            nn.init.eye_(self.value.weight)
            if value_bias:
                nn.init.zeros_(self.value.bias)
            if not init_weights:
                for lin in (self.query, self.key):
                    nn.init.normal_(lin.weight, std=1.0)
                self.value.weight.add_(torch.randn_like(self.value.weight) * 0.3)
        self.last_weights: torch.Tensor | None = None  # (N,) mean attention of the last forward

    def forward(self, h: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """h: (..., d) the sub-layer output; deltas: (..., N, d) the adapters' terms. Returns the fused term (..., d)."""
        q = self.query(h.to(self.query.weight.dtype)).unsqueeze(-2)  # (..., 1, d)
        k = self.key(deltas.to(self.key.weight.dtype))  # (..., N, d)
        v = self.value(deltas.to(self.value.weight.dtype))  # (..., N, d)
        a = torch.softmax(self.dropout((q * k).sum(-1)) / self.temperature, dim=-1)  # (..., N)
        self.last_weights = a.detach().reshape(-1, a.shape[-1]).mean(0)
        return (a.unsqueeze(-1) * v).sum(-2).to(h.dtype)  # (..., d)


def _bottleneck_layers(model: nn.Module) -> list[tuple[str, BottleneckLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BottleneckLayer)]


def _check(model: nn.Module, config: AdapterFusionConfig, adapter_name: str) -> list[tuple[str, BottleneckLayer]]:
    """The layers to fuse at; ConfigError when a member is missing, not a bottleneck adapter, or placed differently."""
    if adapter_name in config.adapter_names:
        raise ConfigError(f"fusion: the fusion's own name {adapter_name!r} is among adapter_names")
    layers = _bottleneck_layers(model)
    others = [
        (n, m) for n, m in model.named_modules() if isinstance(m, DeltaLayer) and not isinstance(m, BottleneckLayer)
    ]
    sites: dict[str, set[str]] = {}
    for member in config.adapter_names:
        sites[member] = {path for path, layer in layers if member in layer.bottleneck_names()}
        if sites[member]:
            continue
        if any(member in layer.adapter_fusion for _, layer in layers):
            raise ConfigError(f"fusion: {member!r} is itself a fusion; only bottleneck adapters can be fused")
        kinds = sorted({type(m).__name__ for _, m in others if member in m.adapter_names})
        if kinds:
            raise ConfigError(
                f"fusion: {member!r} is not a bottleneck adapter (it lives in {', '.join(kinds)} layers); "
                "AdapterFusion only fuses bottleneck adapters"
            )
        present = sorted({a for _, layer in layers for a in layer.bottleneck_names()})
        raise ConfigError(
            f"fusion: no bottleneck adapter named {member!r} in the model; bottleneck adapters present: "
            f"{', '.join(present) or 'none'}"
        )
    first = config.adapter_names[0]
    for member in config.adapter_names[1:]:
        if sites[member] != sites[first]:
            raise ConfigError(
                f"fusion: adapters {first!r} ({len(sites[first])} sub-layers) and {member!r} ({len(sites[member])} "
                "sub-layers) do not sit at the same sub-layers (e.g. Houlsby and Pfeiffer placements); "
                "fused adapters must share their placement"
            )
    chosen = [(p, layer) for p, layer in layers if p in sites[first]]
    for path, layer in chosen:
        sizes = {a: layer.adapter_up[a].out_features for a in config.adapter_names}
        if len(set(sizes.values())) > 1 or layer.out_features not in sizes.values():
            raise ConfigError(
                f"fusion: at {path} the adapters' hidden sizes {sizes} differ from each other or from the "
                f"sub-layer's {layer.out_features}; were they made for different base models?"
            )
    return chosen


def inject(model: nn.Module, config: AdapterFusionConfig, adapter_name: str) -> list[nn.Module]:
    """Add fusion ``adapter_name`` over ``config.adapter_names`` at every sub-layer those adapters share.

    Everything is checked before the model is touched.
    """
    chosen = _check(model, config, adapter_name)
    dropout = config.dropout_prob
    if dropout is None:  # the adapters library's: the model's attention dropout, else none
        c = getattr(model, "config", None)
        c = c.get_text_config() if hasattr(c, "get_text_config") else c
        dropout = getattr(c, "attention_probs_dropout_prob", 0.0) or 0.0
    for _, layer in chosen:
        w = layer.weight
        dtype = w.dtype if w.is_floating_point() else torch.float32
        layer.adapter_fusion[adapter_name] = fusion = Fusion(
            layer.out_features,
            config.adapter_names,
            config.temperature,
            w.device,
            dtype,
            config.init_weights,
            config.value_bias,
            float(dropout),
        )
        fusion.train(layer.base_layer.training)  # the model's train/eval mode, as the adapters library's
    return [layer for _, layer in chosen]


def add_fusion(model: Any, adapter_names: list[str], name: str = "fusion", **config: Any) -> None:
    """AdapterFusion stage 2 on a DeltaModel (``model.add_fusion(...)``): add a fusion over trained bottleneck
    adapters and make it the active adapter.

    The base and the fused adapters are frozen; only the fusion layers train. Extra keyword arguments go to
    the fusion config (``temperature``, ``task_type``, ...).

    Raises:
        ValueError: an adapter in ``adapter_names`` does not exist.
        ConfigError: they are not bottleneck adapters, or do not sit at the same sub-layers.
    """
    names = model._check_names(adapter_names)  # one name as a string is a list of one
    model.add_adapter(name, AdapterFusionConfig(adapter_names=names, **config))
    model.set_adapter(name)


def fusion_weights(model: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    """A fusion's attention over its adapters in the last forward pass that ran through it (a pass with another
    adapter active or adapters disabled leaves them as they were; ``model.fusion_weights(name)`` on a DeltaModel):
    {sub-layer path: weights (N,)}.

    Each tensor is the softmax over the N fused adapters averaged over all token positions; it sums to 1.

    Raises:
        ValueError: ``adapter_name`` is not a fusion, or no forward pass has run through it yet.
    """
    model._check_names([adapter_name])
    out: dict[str, torch.Tensor] = {}
    for path, layer in model.base_model.named_modules():
        value = layer.fusion_weights(adapter_name) if isinstance(layer, BottleneckLayer) else None
        if value is not None:
            out[path] = value
    if not out:
        raise ValueError(
            f"{adapter_name!r} has no fusion weights: it is not an AdapterFusion, "
            "or no forward pass has run through it since it was added"
        )
    return out


def fusion_regularization_loss(model: Any, adapter_name: str | None = None) -> torch.Tensor:
    """The adapters library's fusion regulariser (its ``get_fusion_regularization_loss``, which its AdapterTrainer
    adds to the loss while a fusion trains): 0.01 * sum over sub-layers of ||I - W_v||_F^2, keeping W_v near the
    identity. ``model.fusion_regularization_loss(name)``; None: every fusion whose W_v trains.

    Raises:
        ValueError: ``adapter_name`` is not a fusion in the model.
    """
    values = [
        layer.adapter_fusion[name].value.weight
        for layer in model.base_model.modules()
        if isinstance(layer, BottleneckLayer)
        for name in layer.adapter_fusion
        if (
            name == adapter_name if adapter_name is not None else layer.adapter_fusion[name].value.weight.requires_grad
        )
    ]
    if adapter_name is not None and not values:
        raise ValueError(f"{adapter_name!r} is not an AdapterFusion in this model")
    loss = torch.zeros((), device=values[0].device if values else None)
    for w in values:
        eye = torch.eye(w.shape[0], device=w.device, dtype=w.dtype)
        loss = loss + 0.01 * (eye - w).float().pow(2).sum()
    return loss


def regularization_loss(model: Any) -> torch.Tensor | None:
    """The model-level regulariser deltatune's trainers backpropagate after each optimizer step (their
    ``Regularizer`` callback, as the adapters library's AdapterTrainerCallback does): the fusion regulariser while a
    fusion's W_v trains, None otherwise."""
    loss = fusion_regularization_loss(model)
    return loss if loss.requires_grad else None


MODEL_FUNCTIONS = {
    "add_fusion": add_fusion,
    "fusion_weights": fusion_weights,
    "fusion_regularization_loss": fusion_regularization_loss,
    "regularization_loss": regularization_loss,
}
"""Functions DeltaModel offers as its own methods (``model.add_fusion(...)``), found through the registry."""

CONFIG, INJECT = AdapterFusionConfig, inject
