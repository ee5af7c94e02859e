"""LoRA (Hu et al., 2021; arXiv:2106.09685), with rsLoRA (Kalajdzievski, 2023) and DoRA (Liu et al., 2024).

A frozen weight W (d_out x d_in) gets a trainable low-rank update: h = W x + s * B A x, with A (r x d_in),
B (d_out x r) and s = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)). Init: A Kaiming-uniform as in the paper,
B = 0, so the model starts exactly as the base. Merging sets W <- W + s * B A (zero added latency); unmerging
subtracts it again. DoRA splits the merged weight into a magnitude m (d_out, trained) and a direction:
W' = m * (W + s B A) / ||W + s B A||_row, the norm treated as a constant in the backward pass (as in the paper and
PEFT). m starts as ||W||_row, so the model again starts as the base.

Layers: ``nn.Linear``, transformers' GPT-2 ``Conv1D`` (weights stored transposed), ``nn.Embedding`` (A gathers rows
like an embedding) and ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (A a conv with the base kernel, B a 1-kernel conv;
methods/_lora_conv.py, which also holds the layers' shared base), and ``nn.MultiheadAttention`` (an update of its
in_proj_weight and one of its out_proj, methods/_lora_mha.py). Module and key names are PEFT's, so adapters move
between deltatune and PEFT unchanged, but for ``nn.MultiheadAttention``: the file loads in both, yet peft adds
out_proj's update twice (huggingface/peft#3774, open), so an adapter trained in peft computes differently here
(the same only while its out_proj B is zero; methods/_lora_mha.py).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, DeltaConfig, check_positive_int, check_range, check_regex
from ..layer import DeltaLayer, linear_shape, set_submodule
from ..targets import LORA_TARGETS, pattern_value, resolve_targets
from . import _lora_conv as convs
from . import _lora_init as inits
from . import _lora_mha as mha
from ._dora import place_linear
from ._dora_layers import embedding_scale, init_magnitude
from ._lora_conv import LoraConv1d, LoraConv2d, LoraConv3d, LoraConvNd, _factors, _LoraBase, conv_layer
from ._lora_gather import gathered
from ._lora_mha import LoraMultiheadAttention, mha_layer
from ._lora_replicate import PREPARE, check_map  # noqa: F401 (PREPARE: DeltaModel runs it before inject)
from ._trainable_tokens import add_tokens, check_indices
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
    """Weights stored as (d_in, d_out). Set automatically for GPT-2 style Conv1D layers (warned, as peft)."""
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
    layer_replication: list[list[int]] | None = None
    """[start, end) ranges of the base's layers stacked into a deeper model, e.g. [[0, 4], [2, 5]] (peft's); the copies
    share the base weights, each gets its own LoRA (methods/_lora_replicate.py)."""
    lora_bias: bool = False
    """A trained bias on lora_B (saved as lora_B.bias; scaled with the update, merged into the base bias), as peft."""
    eva_config: dict | None = None
    """peft's EVA settings (init_lora_weights='eva'), kept as a peft file gives them; deltatune draws no EVA init."""
    loftq_config: dict = field(default_factory=dict)
    """LoftQ's settings for init_lora_weights='loftq': {'loftq_bits': 4 or 8, 'loftq_iter': rounds} (or peft's
    LoftQConfig); the base becomes its quantised Q, the adapter the error's top-r SVD (methods/_loftq.py)."""
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    """Token ids whose input-embedding rows train (or {embedding module name: ids}), as peft's; a tied lm_head follows."""
    ensure_weight_tying: bool = False
    """peft's: tie the adapters of a tied embedding / lm_head. Accepted where nothing tied is adapted (peft then only
    warns); adapting a tied embedding or lm_head with it is refused (deltatune does not tie adapters)."""
    target_parameters: list[str] | None = None
    """peft's LoRA on bare parameters (fused MoE experts, through its ParamWrapper): only None or [] (refused)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        check_range("lora_alpha", self.lora_alpha, 0, None, low_open=True)
        check_range("lora_dropout", self.lora_dropout, 0.0, 1.0)
        for key in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias", "rank_pattern", "alpha_pattern"):  # fmt: skip
            if not isinstance(value := getattr(self, key), dict if key.endswith("pattern") else bool):
                raise ConfigError(f"{key} must be a {'dict' if key.endswith('pattern') else 'bool'}, got {value!r}")
        layers = self.layers_to_transform
        if isinstance(layers, tuple) and layers and all(type(i) is int for i in layers):  # (peft takes a tuple;
            # stored as a list, as JSON writes it; peft's () adapts nothing, refused below as written)
            self.layers_to_transform = layers = list(layers)
        if layers is not None and not all(type(i) is int for i in (layers if isinstance(layers, list) else [layers])):
            raise ConfigError(f"layers_to_transform must be a block index or a list of them, got {layers!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.layers_pattern and self.layers_to_transform is None:  # as peft's ValueError
            raise ConfigError(f"layers_pattern={self.layers_pattern!r} needs layers_to_transform (the block indices "
                              "it names); without it nothing is narrowed")  # fmt: skip
        if self.target_parameters:
            raise ConfigError(f"target_parameters={self.target_parameters!r} (peft's LoRA on nn.Parameter, e.g. fused "
                              "MoE experts) is not supported by deltatune; adapt the linear layers with target_modules")  # fmt: skip
        if not isinstance(self.ensure_weight_tying, bool):
            raise ConfigError(f"ensure_weight_tying must be a bool, got {self.ensure_weight_tying!r}")
        check_map(self.layer_replication)
        self.trainable_token_indices = check_indices(self.trainable_token_indices, integral=True)  # numpy ids: ints
        self.init_lora_weights = inits.canonical_init(self.init_lora_weights)  # peft's "OLoRA" is its "olora"
        inits.check_init(self.init_lora_weights, self.lora_bias, self.use_dora, self.loftq_config)
        if self.loftq_config and self.init_lora_weights != "loftq":
            self.loftq_config = {}  # ignored (check_init warned) and saved so, as peft's
        inits.warn_conversion(self.init_lora_weights, self.use_rslora, self.rank_pattern or self.alpha_pattern)
        for attr in ("rank_pattern", "alpha_pattern"):  # (re's TypeError named no field)
            if bad := [k for k in getattr(self, attr) if not isinstance(k, str)]:
                raise ConfigError(f"{attr} keys must be module name patterns (strings), got {bad[0]!r}")
        for key, value in self.rank_pattern.items():
            check_regex("rank_pattern key", key)
            check_positive_int(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            check_regex("alpha_pattern key", key)
            check_range(f"alpha_pattern[{key!r}]", value, 0, None, low_open=True)

    @classmethod
    def from_dict(cls, data: dict, source: str = "adapter config") -> LoraConfig:
        """DeltaConfig.from_dict; an older file's init_lora_weights 0 / 1 read as False / True (one warning)."""
        return super().from_dict(inits.loaded_init(data, source), source)

    def for_loading(self) -> LoraConfig:  # the file holds the weights (PiSSA's and OLoRA's residual is drawn again)
        return inits.for_loading(self)

    def trainable_base_parameters(self, model: nn.Module) -> list[str]:
        """Base parameters trained and saved with the adapter: the biases, when ``bias`` asks for them."""
        return inits.bias_parameters(self.bias, model)


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
        packed = getattr(weight, "quant_state", None) is not None  # bnb's 4-bit bytes, stored as bf16 too: no dtype
        dtype = weight.dtype if weight.is_floating_point() and not packed else torch.float32
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)  # drawn as peft's: in fp32 on the CPU, then
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=bias)  # moved (a bf16 draw rounds differently)
        if inits.is_from_base(init):  # PiSSA / OLoRA: the base weight becomes the residual
            inits.init_from_base(self, name, init)
        else:
            inits.reset(self.lora_A[name].weight, self.lora_B[name].weight, init, r)
        inits.reset_bias(self.lora_B[name], init)
        place_linear(self, name, dtype, dora)  # moved to the base's device and dtype, DoRA's m = ||W + s B A||

    def _gathered(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor | None:
        return gathered(self, x, result) if inits.lora_b_bias(self) is None else None  # (batched: no lora_B bias)

    def delta_weight(self, name: str, merging: bool = False) -> torch.Tensor:
        A, B, dtype = _factors(self.lora_A[name].weight, self.lora_B[name].weight, merging)
        delta = ((B @ A) * self.scaling[name]).to(dtype)  # (d_out, d_in)
        return delta.T if self.fan_in_fan_out else delta


class LoraEmbedding(_LoraBase):
    """LoRA on an ``nn.Embedding``: A (r x vocab) is looked up like an embedding, then B (dim x r)."""

    _rows_dim = 1  # DoRA's norm: per embedding dimension, over the vocabulary (as peft's)
    _merge_rounds = True  # peft's Embedding.merge adds get_delta_weight rounded to W's dtype (its DoRA: unrounded)

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
        return ((B @ A).T * self.scaling[name]).to(dtype)  # (vocab, dim) in the adapter's dtype, as peft's

    def _add(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        dora = embedding_scale(self, name) if name in self.lora_magnitude_vector else None  # m / ||W + s dW||
        after_a = F.embedding(x, self.lora_embedding_A[name].T, base.padding_idx, base.max_norm, base.norm_type,
                              base.scale_grad_by_freq, base.sparse)  # (..., r)  # fmt: skip
        out = after_a @ self.lora_embedding_B[name].T
        out = (out if dora is None else dora * out) * self.scaling[name]
        if (scale := getattr(base, "embed_scale", None)) is not None:  # Gemma's, a scaled BART's: (W + dW)[x] * scale
            out = out * torch.as_tensor(scale, dtype=self._weight.dtype, device=out.device).to(out.dtype)  # as peft
        return result + out if dora is None else dora * result + out


LORA_LAYERS = (LoraLinear, LoraEmbedding, LoraConvNd)
CONV_LAYERS = (LoraConv1d, LoraConv2d, LoraConv3d)  # (methods/_lora_conv.py; importers name them from here)
_ALL_LAYERS = (*LORA_LAYERS, LoraMultiheadAttention)  # (MHA's two updates: not one A, B that LORA_LAYERS' users read)


def _wrap(module: nn.Module, name: str) -> _LoraBase:
    kind = type(module).__name__
    if isinstance(module, nn.Embedding):
        if type(module).forward is not nn.Embedding.forward and not hasattr(module, "embed_scale"):
            raise ConfigError(f"lora: {name} ({kind}) is an embedding whose forward is not a lookup of its input "
                              "(a learned positional embedding computes positions from it), so LoRA's update would "
                              "not be the merged weight's; leave it out of target_modules")  # fmt: skip
        return LoraEmbedding(module)
    if (conv := conv_layer(module) or mha_layer(module)) is not None:
        return conv
    shape = linear_shape(module)
    if shape is not None:
        return LoraLinear(module, fan_in_fan_out=shape[2])
    raise ConfigError(
        f"lora: target {name} is a {kind}; LoRA adapts nn.Linear, GPT-2 Conv1D, nn.Embedding, nn.Conv1d/2d/3d and "
        "nn.MultiheadAttention layers"
    )


def inject(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[nn.Module]:
    """Wrap every target module in a LoRA layer (or add to an existing one) and add adapter ``adapter_name``. Targets
    (DoRA's among them) are checked before the model is touched."""
    if config.init_lora_weights in inits.LOADS_ONLY:
        raise ConfigError(f"init_lora_weights={config.init_lora_weights!r} is peft's; deltatune draws True, False, "
                          "'gaussian', 'orthogonal', 'pissa' or 'olora' (an adapter peft saved with it loads)")  # fmt: skip
    names = resolve_targets(model, config, LORA_TARGETS, "lora")
    _check_patterns(config, names)
    _check_tying(model, config, names)
    plan: list[tuple[str, _LoraBase, bool]] = []
    for name in names:
        module = model.get_submodule(name)
        if adapter_name in getattr(module, "modules_to_save", ()):  # trained in full: not a target (PEFT's rule)
            continue
        if isinstance(module, DeltaLayer) and not isinstance(module, _ALL_LAYERS):
            raise ConfigError(f"lora: {name} is already adapted by {type(module).__name__}; LoRA cannot wrap it")
        layer = module if isinstance(module, _ALL_LAYERS) else _wrap(module, name)
        mha.check_target(model, layer, name, config)  # (MultiheadAttention's, before its weight-less base is read)
        base = layer.base_layer
        if config.use_dora and not is_quantized(base) and not base.weight.is_floating_point():
            raise ConfigError(f"lora: use_dora is not supported on {name} ({type(base).__name__}); DoRA adapts "
                              "full-precision layers, leave it out of target_modules")  # fmt: skip
        convs.check_target(layer, name, config, r := pattern_value(config.rank_pattern, name, config.r))  # as peft
        inits.check_target(layer, name, config, r)
        plan.append((name, layer, layer is not module))
    inits.check_base_kept(model, adapter_name, [(n, layer) for n, layer, _ in plan], config.init_lora_weights)
    # trainable_token_indices (methods/_trainable_tokens.py): checked against the layers about to go in, before any
    # does (a refusal after PiSSA's residuals would need every original weight kept beside them)
    place_tokens = add_tokens(model, config, adapter_name, {n: layer for n, layer, _ in plan})
    _say_fan_in_fan_out(config, [layer for _, layer, new in plan if new])
    layers: list[nn.Module] = []
    loading = getattr(config, "_loading", False)
    for name, layer, new in plan:
        if new:
            set_submodule(model, name, layer)
        r = pattern_value(config.rank_pattern, name, config.r)
        alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
        layer._keep_base = loading  # (a load that fails puts the base back: _lora_conv's settle)
        layer.add(adapter_name, r, alpha, config.lora_dropout, config.use_rslora, config.use_dora,
                  config.init_lora_weights, config.lora_bias)  # fmt: skip
        layer.__dict__.pop("_keep_base", None)  # (read by init_from_base only)
        layers.append(layer)
    return layers + place_tokens()


def _say_fan_in_fan_out(config: LoraConfig, new: list[_LoraBase]) -> None:
    """Set ``config.fan_in_fan_out`` as peft's dispatch does for each new layer in turn (so a saved GPT-2 adapter says
    true, as peft's): True at a GPT-2 ``Conv1D``, False at a plain ``nn.Linear``. The layers read their own layout
    (``linear_shape``), so the field only tells; each change is warned about in peft's words."""
    said = [c for c in (config, getattr(config, "_stored", None)) if c is not None]  # a load's copy and the kept one
    for layer in new:
        base = layer.base_layer
        if isinstance(layer, LoraLinear) and layer.fan_in_fan_out:
            flag, why = True, "False but the target module is `Conv1D`. Setting fan_in_fan_out to True."
        elif isinstance(base, nn.Linear) and not is_quantized(base):
            flag, why = False, "True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False."
        else:
            continue
        if config.fan_in_fan_out != flag:
            warnings.warn(f"fan_in_fan_out is set to {why}", stacklevel=4)
        for c in said:
            c.fan_in_fan_out = flag


def _check_patterns(config: LoraConfig, names: list[str]) -> None:
    """peft's RuntimeWarning for rank_pattern / alpha_pattern keys that match no targeted module (ignored)."""
    for attr in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, attr)
        unmatched = sorted(k for k in patterns if not any(re.match(rf"(.*\.)?({k})$", n) for n in names))
        if unmatched:
            warnings.warn(f"lora: the following {attr} keys did not match any targeted module and were ignored: "
                          f"{unmatched}", RuntimeWarning, stacklevel=4)  # fmt: skip


def _check_tying(model: nn.Module, config: LoraConfig, names: list[str]) -> None:
    """ensure_weight_tying as peft's: a warning where nothing tied is adapted; a tied embedding / lm_head adapted
    (a target or in modules_to_save) is refused, as deltatune does not tie the two adapters."""
    if not config.ensure_weight_tying:
        return
    get_in, get_out = (getattr(model, f"get_{s}_embeddings", None) for s in ("input", "output"))
    ends = [getattr(m, "base_layer", m) for m in (get_in() if get_in else None, get_out() if get_out else None)]
    weights = [getattr(m, "weight", None) for m in ends]
    if weights[0] is None or weights[0] is not weights[1]:
        warnings.warn("lora: ensure_weight_tying is set, but no tied modules were found in the model", stacklevel=4)
        return
    adapted = [n for n in [*names, *(config.modules_to_save or [])] if n.split(".")[-1] in ("embed_tokens", "lm_head")]
    if not adapted:
        warnings.warn("lora: ensure_weight_tying is set, but no tied modules are in modules_to_save or "
                      "target_modules", stacklevel=4)  # fmt: skip
        return
    raise ConfigError(f"lora: ensure_weight_tying with {adapted[0]} adapted (its weight is tied to the other end's): "
                      "deltatune does not tie the adapters; set ensure_weight_tying=False or leave it out")  # fmt: skip


CONFIG, INJECT = LoraConfig, inject
MODEL_FUNCTIONS = {"convert_to_plain_lora": inits.convert_to_plain_lora}  # model.convert_to_plain_lora(initial, out)
