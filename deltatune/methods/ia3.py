"""(IA)^3 (Liu, Tam, Muqeeth, Mohta, Huang, Bansal, Raffel, 2022; arXiv:2205.05638).

Infused Adapter by Inhibiting and Amplifying Inner Activations: a trained vector rescales activations
elementwise. For a target W (d_out x d_in) with bias b:

    attention keys / values (and any non-feed-forward target):  h = l * (W x + b),   l in R^{d_out}
    feed-forward targets (the second FFN projection):          h = W (l * x) + b,   l in R^{d_in}

Only the vectors l train; they start at 1, so the model starts as the base. Merging folds l into W (and into b
for output scaling): W <- W diag(l) or diag(l) W; unmerging divides it out again where l_i != 0 (by l itself:
PEFT divides by l + 1e-8, the same weights wherever that shift does not change the rounded quotient). Where l_i is 0
in W's dtype the merge zeroed weights that cannot be restored: unmerging leaves them as merged and warns, as PEFT
does (PEFT's l + 1e-8 gives 0 there too where l_i = 0, and never NaN).
On ``nn.Conv2d`` / ``nn.Conv3d`` (peft's IA3 Conv2d / Conv3d) l scales channels: shape (1, C, 1, 1[, 1]), C the
output channels, or the input channels of a feed-forward target (a grouped conv's weight takes it per group).
Several active adapters multiply their vectors. Module and key names are PEFT's (``ia3_l``), so adapters move
between deltatune and PEFT unchanged. ``model.add_weighted_adapter`` on (IA)^3 adapters is peft's: sum_i w_i l_i.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .. import targets as targets_module
from ..config import ConfigError, DeltaConfig, check_regex
from ..layer import DeltaLayer, ModulesToSave, NotMergeable, linear_shape, set_submodule
from ..targets import IA3_FEEDFORWARD, IA3_TARGETS, model_type, resolve_targets
from ._base_kept import refuse_beside_residual
from .quant import _is_bnb_4bit, is_quantized


@dataclass
class IA3Config(DeltaConfig):
    """(IA)^3: a trained vector scaling each target's output (or, for feed-forward targets, its input)."""

    method = "ia3"
    peft_type = "IA3"

    feedforward_modules: list[str] | str | None = None
    """Targets whose input (not output) is scaled: a list of name endings or a regex (PEFT's rule). None: the
    family default (deltatune.targets.IA3_FEEDFORWARD). Must be a subset of target_modules when both are lists."""
    fan_in_fan_out: bool = False
    """Weights stored as (d_in, d_out). Set per layer automatically: True for GPT-2 Conv1D, False for nn.Linear."""
    init_ia3_weights: bool = True
    """True: vectors start at 1 (the base model). False: random normal (changes outputs; for tests)."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted, matched like target_modules."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.feedforward_modules, (set, tuple)):
            self.feedforward_modules = sorted(self.feedforward_modules)
        if isinstance(self.feedforward_modules, str):
            check_regex("feedforward_modules", self.feedforward_modules)
        if not isinstance(self.init_ia3_weights, bool):
            raise ConfigError(f"init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ConfigError(
                    f"feedforward_modules must be a subset of target_modules, but {extra!r} are not in "
                    f"target_modules={self.target_modules!r}"
                )


def _is_feedforward(name: str, feedforward: list[str] | str) -> bool:
    # PEFT's rule, kept exactly for interchange: a regex must match the full name; a list entry only needs to end
    # the name (no "." boundary), so "output.dense" also marks BERT's "attention.output.dense" as feed-forward.
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, name) is not None
    return any(name.endswith(key) for key in feedforward)


def check_quantized_merge(layer: IA3Layer, name: str) -> None:
    """NotMergeable, before any weight is written, where the base is a bitsandbytes layer transformers loaded in 4 or
    8 bits (no ``dequantize()``): peft refuses to merge (IA)^3 there ("Cannot merge ia3 layers when the model is
    loaded in 8-bit mode"); ``merge_quantized`` dequantises such a model and merges it."""
    base = layer.base_layer
    if is_quantized(base) and not callable(getattr(base, "dequantize", None)):
        bits = "4-bit" if _is_bnb_4bit(base) else "8-bit"
        where = f" at {layer.path}" if isinstance(getattr(layer, "path", None), str) else ""
        raise NotMergeable(f"(IA)^3 adapter {name!r}{where} is on a bitsandbytes {bits} {type(base).__name__} "
                           f"({layer.in_features} -> {layer.out_features}): peft refuses it too ('Cannot merge ia3 "
                           f"layers when the model is loaded in {bits} mode'); deltatune.merge_quantized dequantises "
                           "the model and merges it")  # fmt: skip


class IA3Layer(DeltaLayer):
    """(IA)^3 around an ``nn.Linear`` or GPT-2 ``Conv1D`` (vectors ``ia3_l`` of shape (d_out, 1) or, feed-forward,
    (1, d_in)), or an ``nn.Conv2d`` / ``nn.Conv3d`` (shape (1, C, 1, 1[, 1]), channels as peft lays them out)."""

    adapter_attrs = ("ia3_l",)
    supports_row_adapters = True
    merge_checks = (check_quantized_merge,)  # peft refuses a bitsandbytes base

    def __init__(self, base_layer: nn.Module, is_feedforward: bool, fan_in_fan_out: bool) -> None:
        super().__init__(base_layer)
        self.is_feedforward = is_feedforward
        self.fan_in_fan_out = fan_in_fan_out
        conv = isinstance(base_layer, (nn.Conv2d, nn.Conv3d))
        self.conv_dims = base_layer.weight.dim() - 2 if conv else 0  # 0: a linear layer
        if conv:
            self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        else:
            self.in_features, self.out_features, _ = linear_shape(base_layer)
        self.ia3_l = nn.ParameterDict()

    @property
    def weight(self) -> torch.Tensor:
        # Modeling code reads the wrapped projection's weight (T5 checks ``self.wo.weight.dtype``).
        return self.base_layer.weight

    def add(self, name: str, init: bool) -> None:
        # PEFT's shapes: (1, d_in) scales the input of a feed-forward layer, (d_out, 1) the output of the others.
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        if self.conv_dims:  # peft's conv layout: channels on dim 1
            shape = (1, self.in_features if self.is_feedforward else self.out_features) + (1,) * self.conv_dims
        w = self.base_layer.weight
        dtype = w.dtype if w.is_floating_point() else torch.float32
        value = (
            torch.ones(shape, device=w.device, dtype=dtype)
            if init
            else torch.randn(shape, device=w.device, dtype=dtype)
        )
        self.ia3_l[name] = nn.Parameter(value)

    def _factor(self, name: str, l_: torch.Tensor | None = None) -> torch.Tensor:
        """l (or ``l_``, a tensor of its shape) laid out to multiply the stored weight: along d_in (feed-forward) or
        d_out."""
        l_ = self.ia3_l[name].detach() if l_ is None else l_
        if not self.conv_dims:
            return l_.T if self.fan_in_fan_out else l_
        if not self.is_feedforward:  # (C_out, 1, 1, ...) against the (C_out, C_in / groups, k...) kernel
            return l_.transpose(0, 1)
        groups = self.base_layer.groups
        if groups == 1:
            return l_
        # a grouped kernel holds C_in / groups input channels per row: each output row takes its group's slice
        per_in, per_out = self.in_features // groups, self.out_features // groups
        tail = (1,) * self.conv_dims
        return l_.reshape(groups, 1, per_in, *tail).expand(groups, per_out, per_in, *tail).reshape(-1, per_in, *tail)

    def _merge_weights(self, name: str) -> None:
        self._dequantize_base()  # merge_quantized's 4-bit layer (a bnb one adopted): dequantised, as LoRA's
        base = self.base_layer
        base.weight.mul_(self._factor(name))  # an fp32 l on a bf16 W: the product rounded once, as peft
        if not self.is_feedforward and getattr(base, "bias", None) is not None:
            base.bias.mul_(self.ia3_l[name].detach().reshape(base.bias.shape))

    def _unmerge_weights(self, name: str) -> None:
        base = self.base_layer
        # divided in l's own dtype and rounded once, as peft's unmerge (and this merge): an fp32 l rounded to a bf16 W's
        # dtype first took off another l than went in, and each merge / unmerge cycle drifted W further (bf16: 5e-3
        # after ten, peft's 2e-4)
        l_ = self.ia3_l[name].detach()
        factor = self._factor(name, l_)
        # l's entries that W's dtype holds as 0 (a tiny fp32 l on a fp16 W too): the merge zeroed those weights (or left
        # a subnormal), so they are left as merged, the same ones counted (on l itself, not its grouped layout) and
        # kept: dividing by the tiny l instead gave rough values, inf on fp16
        held_zero = l_.to(base.weight.dtype) == 0
        if zeros := int(held_zero.sum()):  # 0 / 0 would write NaN into W: what the merge zeroed stays 0
            warnings.warn(
                f"unmerging (IA)^3 adapter {name!r}: {zeros} entries of its vector are 0, so the weights the merge "
                "scaled by them cannot be restored and are left as merged (zeros stay 0, as with PEFT)",
                UserWarning,
                stacklevel=4,
            )
            factor = factor.masked_fill(self._factor(name, held_zero), 1)
        base.weight.div_(factor)
        if not self.is_feedforward and getattr(base, "bias", None) is not None:
            base.bias.div_(factor.reshape(base.bias.shape))

    def _row_scales(self, x: torch.Tensor) -> torch.Tensor | None:
        """A mixed-adapter batch (``row_adapters``): each row's vector (1 for rows of other adapters), shaped to
        multiply x (feed-forward) or the output row by row; None when no row uses an adapter of this layer."""
        unique, codes = self.row_adapters.codes(x.shape[0], x.device)
        held = [n for n in unique if n in self.ia3_l]
        if not held:
            return None
        vectors = [self.ia3_l[n].flatten() for n in held]
        table = torch.stack([torch.ones_like(vectors[0]), *vectors])  # (1 + adapters, d)
        lookup = torch.tensor([held.index(n) + 1 if n in held else 0 for n in unique], device=x.device)
        scales = table[lookup[codes]]  # (batch, d); the gather sends each row's gradient to its own vector
        if self.conv_dims:  # channels first: (batch, C, 1, 1[, 1])
            return scales.view(*scales.shape, *([1] * (x.dim() - 2)))
        return scales.view(scales.shape[0], *([1] * (x.dim() - 2)), scales.shape[1])

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_adapters is not None and not self.disabled:
            scale = self._row_scales(x)
        else:
            live = [] if self.disabled or self.merged else self.active_adapters  # merged: its weights alone (peft)
            scale = self.ia3_l[live[0]].flatten() if live else None
            for name in live[1:]:
                scale = scale * self.ia3_l[name].flatten()
            if scale is not None and self.conv_dims:  # channels first, in a batch or not: (C, 1, 1[, 1])
                scale = scale.view(-1, *([1] * self.conv_dims))
        if scale is None:
            return self.base_layer(x, *args, **kwargs)
        if self.is_feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * scale).to(result.dtype)


def inject(model: nn.Module, config: IA3Config, adapter_name: str) -> list[nn.Module]:
    """Wrap every target in an IA3Layer (or add to an existing one) and add adapter ``adapter_name``.

    Family defaults are written into ``config`` (target_modules, feedforward_modules), so the saved
    adapter_config.json says exactly what was adapted. Everything is checked before the model is touched.
    """
    refuse_beside_residual(model, "ia3")
    feedforward = config.feedforward_modules
    if feedforward is None:
        feedforward = IA3_FEEDFORWARD.get(model_type(model) or "", [])
    given = config.target_modules
    names = resolve_targets(model, config, IA3_TARGETS, "ia3")
    if given is None and isinstance(config.feedforward_modules, list) and isinstance(config.target_modules, list):
        extra = sorted(set(config.feedforward_modules) - set(config.target_modules))
        if extra:  # the config's own check ran before the default targets were known; its file would fail it on load
            config.target_modules = given
            raise ConfigError(
                f"ia3: feedforward_modules must be a subset of target_modules, but {extra!r} are not in this model's "
                f"default target_modules={IA3_TARGETS.get(model_type(model) or '')!r}; name target_modules too"
            )
    plan: list[tuple[str, IA3Layer, bool]] = []
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, IA3Layer):
            if module.is_feedforward != _is_feedforward(name, feedforward) and not targets_module._FROM_FILE.get():
                # the layer's kind would win (as peft's): a vector against this config, a file loading nowhere else. A
                # file saved so still loads on top of the adapters that set the kind (its shapes are that kind's)
                config.target_modules = given
                kinds = ("not feed-forward (output scaled)", "feed-forward (input scaled)")
                raise ConfigError(
                    f"ia3: {name} holds (IA)^3 adapters {kinds[module.is_feedforward]}; this config makes it "
                    f"{kinds[not module.is_feedforward]} (feedforward_modules={feedforward!r}); the "
                    "adapters of one layer share its kind: give feedforward_modules alike"
                )
            plan.append((name, module, False))
            continue
        if isinstance(module, DeltaLayer):
            raise ConfigError(f"ia3: {name} is already adapted by {type(module).__name__}; IA3 cannot wrap it")
        shape = linear_shape(module)
        conv = isinstance(module, (nn.Conv2d, nn.Conv3d))
        if not conv and (shape is None or not (isinstance(module, nn.Linear) or shape[2])):  # 4-bit: not scalable
            kind = type(module).__name__
            raise ConfigError(
                f"ia3: target {name} is a {kind}; IA3 adapts nn.Linear, GPT-2 Conv1D, nn.Conv2d and nn.Conv3d layers"
            )
        fan_in_fan_out = False if conv else shape[2]
        layer = IA3Layer(module, _is_feedforward(name, feedforward), fan_in_fan_out=fan_in_fan_out)
        layer.path = name  # (its place in the model, which a refusal names: check_quantized_merge)
        plan.append((name, layer, True))
    targets = config.target_modules
    if config.feedforward_modules is None and isinstance(targets, list) and not set(feedforward) <= set(targets):
        # The family default is no subset of the given targets (["k_proj", "v_proj"] on Llama): written as it is,
        # the saved config fails IA3Config's subset check (ours on save, PEFT's on load). Write instead the layers
        # it made feed-forward: none, or a regex of their full names (PEFT fullmatches a string).
        hits = [name for name, layer, _ in plan if layer.is_feedforward]
        feedforward = "|".join(re.escape(name) for name in hits) if hits else []
    elif isinstance(feedforward, list) and isinstance(targets, list) and not set(feedforward) <= set(targets):
        # "all-linear" (or a regex with layers_to_transform) is saved as the full names it adapts; ["down_proj"] is
        # then no subset of them and the file would fail the check on load: its feed-forward layers by full name.
        # An entry marking none of them (a typo, ["dwn_proj"]) would vanish from the file: refused (peft's suffix rule)
        unused = [k for k in feedforward if not any(_is_feedforward(n, [k]) for n, _, _ in plan)]
        if unused:
            config.target_modules = given
            raise ConfigError(
                f"ia3: feedforward_modules entries {unused!r} mark none of the layers target_modules={given!r} adapts"
            )
        feedforward = sorted(name for name, layer, _ in plan if layer.is_feedforward)
    config.feedforward_modules = feedforward
    for _, layer, new in plan:  # as peft's dispatch: a saved GPT-2 adapter says fan_in_fan_out true, a Linear's false
        if new and not isinstance(layer.base_layer, (nn.Conv2d, nn.Conv3d)):
            config.fan_in_fan_out = layer.fan_in_fan_out
    for name, layer, new in plan:
        if new:
            set_submodule(model, name, layer)
        layer.add(adapter_name, config.init_ia3_weights)
    return [layer for _, layer, _ in plan]


def add_weighted_adapter(model, adapters: list[str], weights: list[float], adapter_name: str, *args, **kwargs) -> None:
    """``model.add_weighted_adapter`` for (IA)^3 adapters, as peft's ``IA3Model.add_weighted_adapter``: a new adapter
    whose vector at each module is sum_i w_i l_i over the adapters that hold one there (not made active). Its config
    is the first adapter's with the union of the target_modules and of the feedforward_modules (regexes joined
    with "|", as peft). Adapters that are not (IA)^3 go to LoRA's ``add_weighted_adapter`` (_lora_combine.py).

    Raises:
        ValueError: an unknown adapter; ``adapter_name`` taken (peft returns without a word); LoRA's combination
            arguments; target_modules (or feedforward_modules) given as a list by one adapter and a regex by another
            (peft refuses them too); a weight count other than the adapters'; two adapters with their own copy of one
            module (modules_to_save), as peft; (IA)^3 adapters beside adapters of another method.
        TypeError: weights that are not numbers.
    """
    from ._lora_combine import _numbers
    from ._lora_combine import add_weighted_adapter as lora_add_weighted_adapter

    names = model._check_names(adapters)
    kinds = {n: model.peft_config[n].method for n in names}
    if "ia3" in kinds.values() and set(kinds.values()) != {"ia3"}:  # LoRA's line would say "combines LoRA adapters"
        ia3 = next(n for n, k in kinds.items() if k == "ia3")
        other = next(n for n, k in kinds.items() if k != "ia3")
        label = {"lora": "LoRA"}.get(kinds[other], kinds[other])
        raise ValueError(f"add_weighted_adapter: (IA)^3 and {label} adapters cannot be combined together ({ia3!r} is "
                         f"ia3, {other!r} is {kinds[other]})")  # fmt: skip
    if not names or set(kinds.values()) != {"ia3"}:  # LoRA's, which refuses a mix naming the first non-LoRA one
        return lora_add_weighted_adapter(model, adapters, weights, adapter_name, *args, **kwargs)
    if args or kwargs:
        raise ValueError(f"add_weighted_adapter: (IA)^3 adapters combine linearly (peft's IA3 takes adapters, weights "
                         f"and adapter_name only); got {', '.join([*map(repr, args), *kwargs])}")  # fmt: skip
    if adapter_name in model.peft_config:
        raise ValueError(f"add_weighted_adapter: an adapter named {adapter_name!r} exists already")
    weights = _numbers(weights)
    if len(weights) != len(names):
        raise ValueError(f"add_weighted_adapter: {len(names)} adapters and {len(weights)} weights; give one each")
    for path, layer in model._layers():
        if isinstance(layer, ModulesToSave) and len(held := [n for n in names if n in layer.adapter_names]) > 1:
            raise ValueError(f"add_weighted_adapter: adapters {held[0]!r} and {held[1]!r} each train their own "
                             f"copy of {path} (modules_to_save), which cannot be combined")  # fmt: skip
    configs = [model.peft_config[n] for n in names]
    joined = {}
    for key in ("target_modules", "feedforward_modules"):
        values = [getattr(c, key) or [] for c in configs]
        if key == "feedforward_modules" and len({isinstance(v, str) for v in values}) > 1:
            # inject wrote some as a regex of full names (a family default outside the targets): a list entry as
            # the regex of its rule (the name ends with it), so that the joined one marks the same layers
            values = [v if isinstance(v, str) else "|".join(f".*{re.escape(k)}" for k in v) or "(?!)" for v in values]
        if len({isinstance(v, str) for v in values}) > 1:
            regex = next(n for n, v in zip(names, values) if isinstance(v, str))
            listed = next(n for n, v in zip(names, values) if not isinstance(v, str))
            raise ValueError(f"add_weighted_adapter: {regex!r} gives {key} as a regex, {listed!r} as a list of "
                             "names; peft combines them only alike")  # fmt: skip
        strings = isinstance(values[0], str)
        joined[key] = "|".join(f"({v})" for v in values) if strings else sorted(set().union(*values))
    model.add_adapter(adapter_name, configs[0].replace(**joined))
    with torch.no_grad():
        for _, layer in model._layers():
            if isinstance(layer, IA3Layer) and adapter_name in layer.ia3_l:
                new = layer.ia3_l[adapter_name]
                new.zero_()
                for name, weight in zip(names, weights):
                    if name in layer.ia3_l:
                        new.add_(layer.ia3_l[name].detach() * weight)


CONFIG, INJECT = IA3Config, inject
MODEL_FUNCTIONS = {"add_weighted_adapter": add_weighted_adapter}  # found before _lora_combine's (a registry helper)
