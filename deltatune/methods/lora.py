"""LoRA (Hu et al., 2021; arXiv:2106.09685), with rsLoRA (Kalajdzievski, 2023) and DoRA (Liu et al., 2024).

A frozen weight W (d_out x d_in) gets a trainable low-rank update: h = W x + s * B A x, with A (r x d_in),
B (d_out x r) and s = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)). Init: A Kaiming-uniform as in the paper,
B = 0, so the model starts exactly as the base. Merging sets W <- W + s * B A (zero added latency); unmerging
subtracts it again. DoRA splits the merged weight into a magnitude m (d_out, trained) and a direction:
W' = m * (W + s B A) / ||W + s B A||_row, the norm treated as a constant in the backward pass (as in the paper and
PEFT). m starts as ||W||_row, so the model again starts as the base.

Layers: ``nn.Linear``, transformers' GPT-2 ``Conv1D`` (weights stored transposed), ``nn.Embedding`` (A gathers rows
like an embedding) and ``nn.Conv2d`` (A a conv with the base kernel, B a 1x1 conv). Module and key names are PEFT's,
so adapters move between deltatune and PEFT unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, DeltaConfig, check_positive_int, check_range, check_regex
from ..layer import DeltaLayer, DequantizedLinear, linear_shape, set_submodule
from ..targets import LORA_TARGETS, pattern_value, resolve_targets
from . import _lora_init as inits
from ._dora import add_dora, dora, merge_weight, place_linear, unmerge_weight
from ._dora_layers import conv_dora, embedding_scale, init_magnitude
from ._lora_gather import gathered
from .quant import is_quantized


@dataclass
class LoraConfig(DeltaConfig):
    """LoRA: a trainable low-rank update B A on each target weight."""

    method = "lora"
    peft_type = "LORA"

    r: int = 8
    """Rank of the update B A."""
    lora_alpha: float = 8
    """The update is scaled by lora_alpha / r (by lora_alpha / sqrt(r) with use_rslora)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input, in [0, 1). 0 skips it (and its copy of x) entirely."""
    fan_in_fan_out: bool = False
    """Weights stored as (d_in, d_out). Set automatically for GPT-2 style Conv1D layers."""
    bias: str = "none"
    """Which biases train with the adapter: 'none', 'all' (every bias in the model), 'lora_only'."""
    use_rslora: bool = False
    """Rank-stabilised scaling lora_alpha / sqrt(r) (Kalajdzievski, 2023)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (Liu et al., 2024): a trained magnitude per output row."""
    init_lora_weights: bool | str = True
    """True: A Kaiming-uniform, B zero (starts as the base). 'gaussian': A ~ N(0, 1/r), B zero.
    False: both random (the adapter changes outputs from the start; for tests). 'pissa', 'pissa_niter_K', 'olora':
    A and B from the base weight's SVD / QR, the base left as the residual (methods/_lora_init.py)."""
    layers_to_transform: list[int] | int | None = None
    """Only adapt the blocks with these indices."""
    layers_pattern: list[str] | str | None = None
    """Name of the block list that layers_to_transform indexes ('layers', 'h', ...); guessed if None."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: {regex matched at the end of the module name: r}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module lora_alpha overrides, keyed like rank_pattern."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted, matched like target_modules."""
    lora_bias: bool = False
    """A trained bias on lora_B (saved as lora_B.bias; scaled with the update, merged into the base bias), as peft."""
    eva_config: dict | None = None
    """peft's EVA settings (init_lora_weights='eva'), kept as a peft file gives them; deltatune draws no EVA init."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        check_range("lora_alpha", self.lora_alpha, 0, None, low_open=True)
        check_range("lora_dropout", self.lora_dropout, 0.0, 1.0)
        for key in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias", "rank_pattern", "alpha_pattern"):  # fmt: skip
            if not isinstance(value := getattr(self, key), dict if key.endswith("pattern") else bool):
                raise ConfigError(f"{key} must be a {'dict' if key.endswith('pattern') else 'bool'}, got {value!r}")
        layers = self.layers_to_transform
        if layers is not None and not all(type(i) is int for i in (layers if isinstance(layers, list) else [layers])):
            raise ConfigError(f"layers_to_transform must be a block index or a list of them, got {layers!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        inits.check_init(self.init_lora_weights, self.lora_bias, self.use_dora)
        for key, value in self.rank_pattern.items():
            check_regex("rank_pattern key", key)
            check_positive_int(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            check_regex("alpha_pattern key", key)
            check_range(f"alpha_pattern[{key!r}]", value, 0, None, low_open=True)

    def for_loading(self) -> LoraConfig:  # the file holds the weights (PiSSA's and OLoRA's residual is drawn again)
        return inits.for_loading(self)

    def trainable_base_parameters(self, model: nn.Module) -> list[str]:
        """Base parameters trained and saved with the adapter: the biases, when ``bias`` asks for them."""
        return inits.bias_parameters(self.bias, model)


class _LoraBase(DeltaLayer):
    """Per-adapter state shared by the LoRA layer types (scaling, dropout, DoRA magnitude, merge cache)."""

    adapter_attrs = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    supports_row_adapters, merge_state, merge_checks = True, ("_dora_norm",), (inits.check_bias_merge,)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self._dora_norm: dict[str, torch.Tensor] = {}  # the row norms a DoRA merge divided by, for unmerge

    def _add_common(self, name: str, r: int, alpha: float, dropout: float, rslora: bool) -> None:
        self.scaling[name] = alpha / math.sqrt(r) if rslora else alpha / r  # rsLoRA: alpha / sqrt(r)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        inits.settle(self, name, restore=True)  # a refused load: the base weight its init replaced comes back
        self.scaling.pop(name, None)
        if name in self.lora_dropout:
            del self.lora_dropout[name]

    def import_state(self, name: str, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        super().import_state(name, prefix, tensors)
        inits.settle(self, name, restore=False)  # the file passed its checks: the residual stays

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
        plain = isinstance(self, LoraLinear) and inits.lora_b_bias(self) is None  # (the batched path has no biases)
        if plain and (out := gathered(self, x, result)) is not None:
            return out  # every row's own adapter in two batched matmuls (methods/_lora_gather.py)
        for name, rows in self.row_adapters.groups(x.shape[0], x.device):
            if name not in self.scaling:  # BASE_ROW, or an adapter this layer does not hold
                continue
            if rows is None:
                result = self._add(name, x, result).to(result.dtype)
            else:
                part = self._add(name, x.index_select(0, rows), result[rows])
                result = result.index_copy(0, rows, part.to(result.dtype))
        return result

    def _merge_weights(self, name: str, base: torch.Tensor | None = None, safe: bool | None = None) -> None:
        safe = self.safe_merged.get(name, False) if safe is None else safe
        inits.check_bias_merge(self, name)
        self._dequantize_base()
        weight = self._weight
        delta = self.delta_weight(name, merging=True)
        if name in self.lora_magnitude_vector:  # DoRA: W' = m (W + s B A) / ||W0 + s B A||, the norm kept for unmerge
            # The norm is of the base without the adapters merged before (W0), as the forward computes it (peft's
            # _unmerged_base_weight, which merges them back with this merge's safe_merge); W itself holds them.
            merge_weight(self, name, weight, delta, self._unmerged_base(safe) if base is None else base)
        elif safe and not isinstance(self.base_layer, DequantizedLinear):  # peft's bitsandbytes merge: plain's sum
            weight.add_(delta.to(weight.dtype))  # peft's safe merge: an fp32 delta rounded to a bf16 W, then added
        else:
            weight.add_(delta)  # peft's plain merge: added in fp32, rounded once
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
        weight = self._weight
        delta = self.delta_weight(name, merging=True)
        if name in self.lora_magnitude_vector:
            unmerge_weight(self, name, weight, delta)
        else:  # the delta rounded, then subtracted: peft's unmerge (its merge adds, then rounds)
            weight.sub_(delta.to(weight.dtype))
        inits.add_bias(self, name, -1)

    _rows_dim, _dora = 0, staticmethod(dora)  # the stored weight's dimension that indexes outputs; DoRA's update


def _factors(A: torch.Tensor, B: torch.Tensor, merging: bool) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """A, B as ``delta_weight`` multiplies them, and the delta's dtype. ``merging`` (PEFT's get_delta_weight): on CPU
    half-precision factors multiply and scale in float32, the delta rounded once to their dtype."""
    if merging and A.device.type == "cpu" and A.dtype in (torch.float16, torch.bfloat16):
        return A.float(), B.float(), A.dtype
    return A, B, A.dtype


class LoraLinear(_LoraBase):
    """LoRA around an ``nn.Linear`` or a GPT-2 ``Conv1D`` (``fan_in_fan_out``: weight stored (d_in, d_out))."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self._rows_dim = 1 if fan_in_fan_out else 0
        self.in_features, self.out_features, _ = linear_shape(base_layer)

    def add(self, name: str, r: int, alpha: float, dropout: float, rslora: bool, dora: bool, init: bool | str,
            bias: bool = False) -> None:  # fmt: skip
        self._add_common(name, r, alpha, dropout, rslora)
        weight = self._weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)  # drawn as peft's: in fp32 on the CPU, then
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=bias)  # moved (a bf16 draw rounds differently)
        if inits.is_from_base(init):  # PiSSA / OLoRA: the base weight becomes the residual
            inits.init_from_base(self, name, init)
        else:
            inits.reset(self.lora_A[name].weight, self.lora_B[name].weight, init, r)
        inits.reset_bias(self.lora_B[name], init)
        place_linear(self, name, dtype, dora)  # moved to the base's device and dtype, DoRA's m = ||W + s B A||

    def delta_weight(self, name: str, merging: bool = False) -> torch.Tensor:
        A, B, dtype = _factors(self.lora_A[name].weight, self.lora_B[name].weight, merging)
        delta = ((B @ A) * self.scaling[name]).to(dtype)  # (d_out, d_in)
        return delta.T if self.fan_in_fan_out else delta


class LoraEmbedding(_LoraBase):
    """LoRA on an ``nn.Embedding``: A (r x vocab) is looked up like an embedding, then B (dim x r)."""

    _rows_dim = 1  # DoRA's norm: per embedding dimension, over the vocabulary (as peft's)

    def add(self, name: str, r: int, alpha: float, dropout: float, rslora: bool, dora: bool, init: bool | str,
            bias: bool = False) -> None:  # fmt: skip
        self._add_common(name, r, alpha, dropout, rslora)
        weight = self._weight
        num, dim = weight.shape
        A, B = torch.randn(r, num), torch.randn(dim, r)  # as peft's: in fp32 on the CPU, then moved
        inits.reset(A, B, init, r, a_zero=True)
        self.lora_embedding_A[name] = nn.Parameter(A.to(weight.device, weight.dtype))
        self.lora_embedding_B[name] = nn.Parameter(B.to(weight.device, weight.dtype))
        if dora:  # m: one per embedding dimension, the norm over the vocabulary (peft's DoraEmbeddingLayer)
            self.lora_magnitude_vector[name] = init_magnitude(self, name)

    def delta_weight(self, name: str, merging: bool = False) -> torch.Tensor:
        A, B, dtype = _factors(self.lora_embedding_A[name], self.lora_embedding_B[name], merging)
        rounded = merging and name not in self.lora_magnitude_vector  # peft's DoRA merges the delta unrounded
        return ((B @ A).T * self.scaling[name]).to(self._weight.dtype if rounded else dtype)  # (vocab, dim), as peft

    def _add(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        after_a = F.embedding(x, self.lora_embedding_A[name].T, base.padding_idx, base.max_norm, base.norm_type,
                              base.scale_grad_by_freq, base.sparse)  # (..., r)  # fmt: skip
        out = after_a @ self.lora_embedding_B[name].T
        dora = embedding_scale(self, name) if name in self.lora_magnitude_vector else None  # m / ||W + s dW||
        out = (out if dora is None else dora * out) * self.scaling[name]
        if (scale := getattr(base, "embed_scale", None)) is not None:  # Gemma's, a scaled BART's: (W + dW)[x] * scale
            out = out * torch.as_tensor(scale, dtype=self._weight.dtype, device=out.device).to(out.dtype)  # as peft
        return result + out if dora is None else dora * result + out


class LoraConv2d(_LoraBase):
    """LoRA on an ``nn.Conv2d``: A is a conv with the base kernel/stride/padding into r channels, B a 1x1 conv."""

    _dora, merge_checks = staticmethod(conv_dora), (inits.check_bias_merge, inits.check_conv_merge)

    def add(self, name: str, r: int, alpha: float, dropout: float, rslora: bool, dora: bool, init: bool | str,
            bias: bool = False) -> None:  # fmt: skip
        base: nn.Conv2d = self.base_layer
        self._add_common(name, r, alpha, dropout, rslora)
        w = base.weight
        # A sees the input exactly as the base kernel does (dilation, padding mode too), so B A merges into W.
        kw = dict(stride=base.stride, padding=base.padding, dilation=base.dilation, padding_mode=base.padding_mode)
        self.lora_A[name] = nn.Conv2d(base.in_channels, r, base.kernel_size, bias=False, **kw)  # drawn as Linear's
        self.lora_B[name] = nn.Conv2d(r, base.out_channels, (1, 1), (1, 1), groups=base.groups, bias=bias)  # as peft
        inits.reset(self.lora_A[name].weight, self.lora_B[name].weight, init, r)
        inits.reset_bias(self.lora_B[name], init)
        self.lora_A[name].to(w.device, w.dtype), self.lora_B[name].to(w.device, w.dtype)
        if dora:  # m stored (1, c_out, 1, 1), as peft's DoraConv2dLayer
            self.lora_magnitude_vector[name] = init_magnitude(self, name)

    def delta_weight(self, name: str, merging: bool = False) -> torch.Tensor:
        inits.check_conv_merge(self, name)
        A, B, dtype = _factors(self.lora_A[name].weight, self.lora_B[name].weight, merging)  # (r, c_in, kh, kw), B 1x1
        if A.shape[2:] == (1, 1):
            delta = (B.flatten(1) @ A.flatten(1)).unsqueeze(2).unsqueeze(3)
        else:
            delta = F.conv2d(A.permute(1, 0, 2, 3), B).permute(1, 0, 2, 3)  # (c_out, c_in, kh, kw)
        return (delta * self.scaling[name]).to(dtype)


LORA_LAYERS = (LoraLinear, LoraEmbedding, LoraConv2d)


def _wrap(module: nn.Module, name: str) -> _LoraBase:
    kind = type(module).__name__
    if isinstance(module, nn.Embedding):
        if type(module).forward is not nn.Embedding.forward and not hasattr(module, "embed_scale"):
            raise ConfigError(f"lora: {name} ({kind}) is an embedding whose forward is not a lookup of its input "
                              "(a learned positional embedding computes positions from it), so LoRA's update would "
                              "not be the merged weight's; leave it out of target_modules")  # fmt: skip
        return LoraEmbedding(module)
    if isinstance(module, nn.Conv2d):
        return LoraConv2d(module)
    shape = linear_shape(module)
    if shape is not None:
        return LoraLinear(module, fan_in_fan_out=shape[2])
    raise ConfigError(
        f"lora: target {name} is a {kind}; LoRA adapts nn.Linear, GPT-2 Conv1D, nn.Embedding and nn.Conv2d layers"
    )


def inject(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[nn.Module]:
    """Wrap every target module in a LoRA layer (or add to an existing one) and add adapter ``adapter_name``. Targets
    (DoRA's among them) are checked before the model is touched."""
    if config.init_lora_weights in inits.LOADS_ONLY:
        raise ConfigError(f"init_lora_weights={config.init_lora_weights!r} is peft's; deltatune draws True, False, "
                          "'gaussian', 'orthogonal', 'pissa' or 'olora' (an adapter peft saved with it loads)")  # fmt: skip
    names = resolve_targets(model, config, LORA_TARGETS, "lora")
    plan: list[tuple[str, _LoraBase, bool]] = []
    for name in names:
        module = model.get_submodule(name)
        if adapter_name in getattr(module, "modules_to_save", ()):  # trained in full: not a target (PEFT's rule)
            continue
        if isinstance(module, DeltaLayer) and not isinstance(module, LORA_LAYERS):
            raise ConfigError(f"lora: {name} is already adapted by {type(module).__name__}; LoRA cannot wrap it")
        layer = module if isinstance(module, LORA_LAYERS) else _wrap(module, name)
        base = layer.base_layer
        if config.use_dora and not is_quantized(base) and not base.weight.is_floating_point():
            raise ConfigError(f"lora: use_dora is not supported on {name} ({type(base).__name__}); DoRA adapts "
                              "full-precision layers, leave it out of target_modules")  # fmt: skip
        if (r := pattern_value(config.rank_pattern, name, config.r)) % getattr(base, "groups", 1):  # as peft
            raise ConfigError(f"lora: {name} is a Conv2d with groups={base.groups}; r={r} must be a multiple of it")
        inits.check_target(layer, name, config, r)
        plan.append((name, layer, layer is not module))
    inits.check_base_kept(model, adapter_name, [(n, layer) for n, layer, _ in plan], config.init_lora_weights)
    layers: list[nn.Module] = []
    for name, layer, new in plan:
        if new:
            set_submodule(model, name, layer)
        r = pattern_value(config.rank_pattern, name, config.r)
        alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
        layer._keep_base = getattr(config, "_loading", False)  # (a load that fails puts the base back)
        layer.add(adapter_name, r, alpha, config.lora_dropout, config.use_rslora, config.use_dora,
                  config.init_lora_weights, config.lora_bias)  # fmt: skip
        layers.append(layer)
    return layers


CONFIG, INJECT = LoraConfig, inject
MODEL_FUNCTIONS = {"convert_to_plain_lora": inits.convert_to_plain_lora}  # model.convert_to_plain_lora(initial, out)
