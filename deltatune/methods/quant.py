"""4-bit NormalFloat (NF4) base weights for QLoRA (Dettmers, Pagnoni, Holtzman, Zettlemoyer, 2023; arXiv:2305.14314).

Each linear weight W (d_out x d_in) is cut into blocks of 64 consecutive values along a row. A block keeps its absmax
c and 64 4-bit indices q into the NF4 code book (16 quantiles of N(0, 1) scaled to [-1, 1], zero included):
W ~= c * NF4[q]. Double quantisation stores the constants c themselves in 8 bits, in blocks of 256 with one fp32
scale per block: 4 + 8/64 + 32/(64*256) = 4.127 bits, about 0.516 bytes per parameter (plus a few bytes per layer).

The 4-bit weights never train: an adapter on top (LoRA wraps ``Linear4bit`` as it wraps ``nn.Linear``) does. Forward
dequantises W to ``compute_dtype`` on the fly and drops it again; backward dequantises once more, so no full-precision
copy of W is kept. Merging dequantises W to ``compute_dtype``, adds the adapter's update and leaves a plain
``nn.Linear`` (``merge_quantized`` also reports the error that introduced, and can quantise the result again).

The kernels come from a library, chosen by ``backend``: torchao's ``NF4Tensor`` (CPU and CUDA, pure PyTorch) or
bitsandbytes' ``Params4bit`` (CUDA kernels; CPU kernels from 0.50). "auto" takes bitsandbytes when it is installed
and torchao otherwise: measured on CPU, docs/BENCHMARKS.md "QLoRA backend"; bitsandbytes is the reference QLoRA
implementation on CUDA. Models that transformers quantised with ``BitsAndBytesConfig(load_in_4bit=True)`` work too:
LoRA wraps their ``bnb.nn.Linear4bit`` layers directly, and ``merge_quantized`` dequantises them.

This file holds the 4-bit format (backends, ``Linear4bit``) and its memory accounting; quant_tools.py what is done
with a model: ``quantize``, ``prepare_for_kbit_training``, ``merge_quantized``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..layer import DequantizedLinear, logical_numel

BLOCK_SIZE = 64
"""Weights per absmax constant (the paper's block size)."""
SCALER_BLOCK_SIZE = 256
"""Absmax constants per 8-bit block in double quantisation (the paper's block size)."""
BACKENDS = ("torchao", "bitsandbytes")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
_NF4_MODULES = ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor")
_INSTALL = {"torchao": "pip install 'deltatune[quant]' (torchao)", "bitsandbytes": "pip install bitsandbytes"}


class QuantizationError(ValueError):
    """The model cannot be quantised (or merged) as asked. The message says why; the model was not changed."""


# -- backends -------------------------------------------------------------------------------------------------
def _backend(name: str) -> Any:
    """The module that implements ``name``: torchao's nf4 tensor module, or bitsandbytes. ImportError if missing."""
    paths = _NF4_MODULES if name == "torchao" else ("bitsandbytes",)
    for path in paths:
        with contextlib.suppress(ImportError):
            return importlib.import_module(path)
    raise ImportError(f"quantisation backend {name!r} is not installed: {_INSTALL[name]}")


def _available(name: str) -> bool:
    try:
        _backend(name)
    except ImportError:
        return False
    return True


def _bnb_runs_on(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    import bitsandbytes as bnb  # only called once bitsandbytes imported fine

    # CPU kernels: checked with 0.50 (tests/methods/test_quant.py); older releases are CUDA-only or experimental.
    version = tuple(int(p) for p in bnb.__version__.split(".")[:2] if p.isdigit())
    return device.type == "cpu" and version >= (0, 50)


def resolve_backend(backend: str, device: torch.device, double_quant: bool = True) -> str:
    """The backend ``quantize`` uses on ``device``: the named one; for "auto" bitsandbytes where it runs, else torchao.

    Raises:
        ImportError: the backend (for "auto": both) is not installed.
        ConfigError: the backend cannot do what is asked (torchao always double-quantises).
    """
    if backend == "auto":
        if _available("bitsandbytes") and _bnb_runs_on(device):
            return "bitsandbytes"
        if not double_quant:
            raise ConfigError(
                "double_quant=False needs backend 'bitsandbytes' (torchao always double-quantises), "
                f"which is not available on {device.type}: {_INSTALL['bitsandbytes']}"
            )
        if not _available("torchao"):
            raise ImportError(
                f"no quantisation backend is installed: {_INSTALL['torchao']}, or {_INSTALL['bitsandbytes']}"
            )
        return "torchao"
    _backend(backend)
    if backend == "torchao" and not double_quant:
        raise ConfigError(
            "double_quant=False is not available with backend 'torchao' (it always double-quantises); "
            "use backend='bitsandbytes'"
        )
    if backend == "bitsandbytes" and not _bnb_runs_on(device):
        raise ConfigError(f"backend 'bitsandbytes' does not run on {device.type} with this version; use 'torchao'")
    return backend


def _quantize_weight(weight: torch.Tensor, backend: str, double_quant: bool, quant_type: str = "nf4",
                     quant_storage: torch.dtype = torch.uint8) -> torch.Tensor:  # fmt: skip
    """W (d_out, d_in) as NF4: torchao's NF4Tensor (shape d_out x d_in) or bitsandbytes' packed Params4bit (NF4, or
    FP4, its bytes in ``quant_storage``, for a layer transformers loaded so)."""
    w = weight.detach().to(torch.float32).contiguous()  # quantise from fp32 so the constants keep full precision
    if backend == "torchao":
        n_blocks = w.numel() // BLOCK_SIZE
        # torchao needs whole scaler blocks: a layer whose block count is not a multiple of 256 (small layers) uses
        # the largest block dividing it. Each scaler block adds one fp32 scale: 4 bytes, so 16 KB of weights share
        # it at 256, 4 KB at 64 (a 64x64 layer), and only an odd block count costs much (4 bytes per 64 weights).
        nf4 = _backend("torchao").to_nf4(w, BLOCK_SIZE, math.gcd(n_blocks, SCALER_BLOCK_SIZE))
        # torchao codes a block of zeros by the code nearest 0/0 = nan (not NF4's 0), so it dequantised to its
        # constant's rounding error (0.0085 seen): give it code 7 (0.0) twice a byte, as bitsandbytes does.
        nf4.quantized_data.view(n_blocks, BLOCK_SIZE // 2)[(w.view(n_blocks, -1) == 0).all(1)] = 0x77
        return nf4
    bnb = _backend("bitsandbytes")
    kwargs = {"blocksize": BLOCK_SIZE, "compress_statistics": double_quant, "quant_type": quant_type}
    param = bnb.nn.Params4bit(w, requires_grad=False, quant_storage=quant_storage, **kwargs)
    return param.to(weight.device)  # Params4bit quantises when it is moved


def _dequantize_weight(weight: torch.Tensor, backend: str) -> torch.Tensor:
    """The fp32 (or the quantised tensor's own dtype) d_out x d_in weight a 4-bit tensor stands for."""
    if backend == "torchao":
        return weight.get_original_weight()
    bnb, state, data = _backend("bitsandbytes"), weight.quant_state, weight.data
    if getattr(state, "packing_format_for_cpu", False):  # bnb repacks CPU weights for inference; undo it to read them
        # (on a copy of the state: the inverse edits the state it is given, and the layer still holds packed bytes)
        data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, copy.copy(state))
    return bnb.functional.dequantize_4bit(data, state)


# -- the layer ----------------------------------------------------------------------------------------------
class Linear4bit(nn.Module):
    """A frozen linear layer with its weight in 4-bit NF4; computes in ``compute_dtype``, returns the input's dtype.

    It has ``in_features``, ``out_features``, ``weight`` and ``bias`` like ``nn.Linear``, so LoRA wraps it unchanged.
    ``dequantize()`` returns the plain layer it stands for (the protocol LoRA's merge uses).

    Args:
        weight: the quantised weight (an NF4Tensor or a bitsandbytes Params4bit), standing for d_out x d_in.
        bias: the bias (kept in full precision), or None.
        in_features: d_in.
        out_features: d_out.
        compute_dtype: the dtype the matrix product runs in.
        backend: "torchao" or "bitsandbytes", whichever made ``weight``.
        double_quant: whether the absmax constants are quantised too (recorded to quantise again alike).
        conv1d: the layer replaced a GPT-2 ``Conv1D`` (``merge_quantized`` puts one back).
        quant_type: "nf4", or "fp4" for a bitsandbytes layer loaded so (recorded to quantise again alike).
        quant_storage: the dtype bitsandbytes packs the bytes in (transformers' bnb_4bit_quant_storage), kept alike.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: nn.Parameter | None,
        in_features: int,
        out_features: int,
        compute_dtype: torch.dtype,
        backend: str,
        double_quant: bool = True,
        conv1d: bool = False,
        quant_type: str = "nf4",
        quant_storage: torch.dtype = torch.uint8,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.weight.requires_grad_(False)
        self.bias = bias
        self.compute_dtype = compute_dtype
        self.backend = backend
        self.double_quant = double_quant
        self.conv1d = conv1d
        self.quant_type, self.quant_storage = quant_type, quant_storage

    @classmethod
    def from_linear(cls, module: nn.Module, compute_dtype: torch.dtype, backend: str, double_quant: bool = True,
                    quant_type: str = "nf4", quant_storage: torch.dtype = torch.uint8) -> Linear4bit:  # fmt: skip
        """Quantise an ``nn.Linear`` (or a GPT-2 ``Conv1D``, whose weight is stored d_in x d_out)."""
        conv1d = type(module).__name__ == "Conv1D"
        weight = module.weight.T if conv1d else module.weight
        d_out, d_in = weight.shape
        w4 = _quantize_weight(weight, backend, double_quant, quant_type, quant_storage)
        return cls(
            w4, module.bias, d_in, d_out, compute_dtype, backend, double_quant, conv1d, quant_type, quant_storage
        )

    @classmethod
    def from_bnb(cls, module: nn.Module) -> Linear4bit:
        """Adopt a ``bitsandbytes.nn.Linear4bit`` (e.g. made by transformers' BitsAndBytesConfig); no copy of W."""
        weight = module.weight
        state = weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            bnb = _backend("bitsandbytes")
            weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(weight.data, state)
        compute = module.compute_dtype or torch.float32
        nested, quant_type = bool(weight.quant_state.nested), weight.quant_state.quant_type
        # transformers records the class a layer replaced: a GPT-2 Conv1D comes back as one when merged (else a
        # merged GPT-2 saved nn.Linear-shaped weights that transformers cannot load into its Conv1D layers)
        conv1d = getattr(getattr(module, "source_cls", None), "__name__", None) == "Conv1D"
        args = (module.in_features, module.out_features, compute, "bitsandbytes", nested, conv1d)
        return cls(weight, module.bias, *args, quant_type=quant_type, quant_storage=weight.data.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():  # modeling code cast it to ``self.weight.dtype``: the packed bytes' uint8
            raise QuantizationError(f"a 4-bit layer ({self.in_features} -> {self.out_features}) got a {x.dtype} input: "
                                    "the model casts activations to the layer's weight dtype; keep it unquantised "
                                    "(quantize skip_modules)")  # fmt: skip
        dtype = x.dtype
        x = x.to(self.compute_dtype)
        if self.backend == "torchao":
            # linear_nf4 saves the 4-bit weight for backward and dequantises it again there (no fp copy kept).
            out = _backend("torchao").linear_nf4(x, self.weight)
        else:
            out = _backend("bitsandbytes").matmul_4bit(x, self.weight, quant_state=self.weight.quant_state)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(dtype)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.backend == "bitsandbytes":  # W's constants beside it, as bitsandbytes' Linear4bit saves them
            for key, value in self.weight.quant_state.as_dict(packed=True).items():
                destination[f"{prefix}weight.{key}"] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        keys = [k for k in state_dict if k.startswith(prefix + "weight.")]  # W's constants: its quant state
        saved = {k.removeprefix(prefix + "weight."): state_dict.pop(k) for k in keys}
        super()._load_from_state_dict(state_dict, prefix, *args)
        if saved and self.backend == "bitsandbytes":
            qs = _backend("bitsandbytes").functional.QuantState
            self.weight.quant_state = qs.from_dict(saved, self.weight.device)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W (d_out x d_in) in ``dtype`` (default: the compute dtype)."""
        return _dequantize_weight(self.weight, self.backend).to(dtype or self.compute_dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """The ``nn.Linear`` this layer stands for, its weight in ``dtype`` (default: the compute dtype): a
        ``DequantizedLinear``, which computes as this layer did (in W's dtype, returning the input's), and ``unpack()``
        gives the plain layer: an ``nn.Linear``, or for a layer made from a GPT-2 ``Conv1D`` the ``Conv1D`` again;
        its ``quant_settings`` (``from_linear``'s arguments) let ``merge_quantized`` quantise it again alike."""
        weight = self.dequantized_weight(dtype)
        plain = (_DequantizedConv1D if self.conv1d else DequantizedLinear)(
            self.in_features, self.out_features, bias=self.bias is not None, device=weight.device, dtype=weight.dtype
        )
        plain.weight = nn.Parameter(weight, requires_grad=False)
        settings = (self.compute_dtype, self.backend, self.double_quant, self.quant_type, self.quant_storage)
        plain.quant_settings = settings
        if self.bias is not None:
            plain.bias = nn.Parameter(self.bias.detach().to(weight.dtype), requires_grad=self.bias.requires_grad)
        return plain

    def unpack(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The layer as the base model had it before ``quantize`` (a GPT-2 ``Conv1D`` where it was one), W
        dequantised to ``dtype``: what ``merge_and_unload`` leaves in the merged model (layer.unpack_frozen_layers)."""
        return self.dequantize(dtype).unpack()

    def __deepcopy__(self, memo: dict) -> Linear4bit:
        # torchao's NF4Tensor copies itself by quantising its dequantised values again with the default block sizes,
        # which fails on small layers: copy the stored tensors instead.
        weight = self.weight
        if self.backend == "torchao":
            names, ctx = weight.__tensor_flatten__()
            inner = {n: getattr(weight, n).clone() for n in names}
            weight = type(weight).__tensor_unflatten__(inner, ctx, weight.shape, weight.stride())
        else:
            weight = copy.deepcopy(weight, memo)
        bias = copy.deepcopy(self.bias, memo)
        new = Linear4bit(weight, bias, self.in_features, self.out_features, self.compute_dtype, self.backend,
                         self.double_quant, self.conv1d, self.quant_type, self.quant_storage)  # fmt: skip
        memo[id(self)] = new
        return new.train(self.training)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self.quant_type}, backend={self.backend}, compute_dtype={str(self.compute_dtype).removeprefix('torch.')}"
        )


class _DequantizedConv1D(DequantizedLinear):
    """A dequantised 4-bit layer that was a GPT-2 ``Conv1D``, in ``nn.Linear``'s layout (the one LoRA merges into);
    ``unpack()`` gives the ``Conv1D`` back, so a merged GPT-2 saves and loads as the original architecture."""

    def unpack(self, dtype: torch.dtype | None = None) -> nn.Module:
        return _as_conv1d(self).to(dtype or self.weight.dtype)


def _as_conv1d(linear: nn.Linear) -> nn.Module:
    """transformers' GPT-2 ``Conv1D`` computing what ``linear`` computes (its weight stored d_in x d_out)."""
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(linear.out_features, linear.in_features).to(linear.weight.device, linear.weight.dtype)
    conv.weight = nn.Parameter(linear.weight.detach().T.contiguous(), requires_grad=False)
    if linear.bias is not None:
        conv.bias = linear.bias
    else:
        conv.bias = nn.Parameter(torch.zeros_like(linear.weight[:, 0]), requires_grad=False)
    return conv


def _is_bnb_4bit(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4") and type(module).__module__.startswith(
        "bitsandbytes"
    )


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a quantised layer: 4-bit (deltatune's ``Linear4bit`` or bitsandbytes') or bitsandbytes'
    8-bit ``Linear8bitLt`` (LoRA rounds its update to such a layer's output dtype before adding it, as peft's)."""
    return _is_4bit_layer(module) or (type(module).__name__ == "Linear8bitLt" and type(module).__module__.startswith(
        "bitsandbytes"))  # fmt: skip


def _is_4bit_layer(module: nn.Module) -> bool:
    return isinstance(module, Linear4bit) or _is_bnb_4bit(module)


def _quantized_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    return ((n, m) for n, m in model.named_modules() if _is_4bit_layer(m))


# -- memory ---------------------------------------------------------------------------------------------------
@dataclass
class MemoryFootprint:
    """Memory a model's parameters and buffers hold, 4-bit weights at their packed size."""

    total_bytes: int
    """Every parameter and buffer (shared storage once), quantised weights with their constants and code books."""
    quantized_bytes: int
    """The part held by 4-bit weights."""
    quantized_params: int
    """The parameters those 4-bit weights stand for."""
    params: int
    """All parameters, 4-bit ones counted as the values they stand for (not the bytes that pack them)."""


def _storage(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``: a wrapper subclass's (NF4Tensor) inner tensors; Params4bit's constants too."""
    if hasattr(type(t), "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return [x for n in names for x in _storage(getattr(t, n))]
    out = [t]
    state = getattr(t, "quant_state", None)
    while state is not None:  # bitsandbytes: absmax, code, offset, then the nested state of the absmax
        out += [x for x in (state.absmax, state.code, getattr(state, "offset", None)) if isinstance(x, torch.Tensor)]
        state = state.state2 if getattr(state, "nested", False) else None
    return out


def _is_4bit(t: torch.Tensor) -> bool:
    return getattr(t, "quant_state", None) is not None or type(t).__name__ == "NF4Tensor"


def memory_footprint(model: nn.Module) -> MemoryFootprint:
    """The bytes a model's parameters and buffers really hold (what ``deltatune info`` reports).

    A 4-bit weight counts its packed data, its (double-quantised) constants and its code book; storage shared by
    several tensors (tied embeddings, a code book cached by bitsandbytes) counts once.
    """
    seen: set[tuple[int, int]] = set()
    total = quantized = quantized_params = params = 0
    tensors = [(t, True) for t in model.parameters()] + [(b, False) for b in model.buffers()]
    counted: set[int] = set()
    for t, is_param in tensors:
        if id(t) in counted:
            continue
        counted.add(id(t))
        nbytes = 0
        for part in _storage(t):
            key = (part.untyped_storage().data_ptr(), part.storage_offset())
            if key in seen or part.device.type == "meta":
                continue
            seen.add(key)
            nbytes += part.numel() * part.element_size()
        total += nbytes
        if is_param:
            params += logical_numel(t)
        if _is_4bit(t):
            quantized += nbytes
            quantized_params += logical_numel(t)
    return MemoryFootprint(total, quantized, quantized_params, params)


__all__ = ["BLOCK_SIZE", "Linear4bit", "MemoryFootprint", "QuantizationError", "is_quantized", "memory_footprint",
           "resolve_backend"]  # fmt: skip
