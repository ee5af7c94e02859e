"""LoftQ: LoRA-fine-tuning-aware quantisation (Li, Yu, Liang, He, Karampatziakis, Chen, Zhao, 2023; arXiv:2310.08659).

A quantised base Q leaves an error W - Q that a LoRA adapter starting at B A = 0 never sees. LoftQ starts the adapter
at that error instead: for T rounds, Q = q(W - L R) and L R = the top-r SVD of W - Q, so the model starts at
Q + s B A ~= W rather than at Q. Two ways in, both peft 0.21.2's operation for operation on the CPU:

- ``init_lora_weights="loftq"`` with ``loftq_config={"loftq_bits": 4 or 8, "loftq_iter": T}`` on a full-precision
  base (peft's ``loftq_init``): q is bitsandbytes' NF4 (blocks of 64, fp32 constants, as peft calls it) or its
  row-wise int8, and the base weight becomes the dequantised Q in its own dtype; quantise that base afterwards.
- ``replace_lora_weights_loftq(model, model_path)`` on a model whose linear layers ``quantize`` already made 4-bit
  (the recipe's QLoRA; peft's function of that name, one round): W is read from the checkpoint's safetensors, Q is the
  layer's own 4-bit weight (double quantisation and either backend included), and A, B come from W - Q.

Where deltatune differs on purpose: peft splits the singular values as L = U sqrt(S), R = sqrt(S) V^T whatever the
scaling s = lora_alpha / r, so Q + s B A ~= W only when s = 1 (at s = 2 the model starts at Q + 2 (W - Q)_r, no nearer
W than Q). deltatune splits S / s, as its PiSSA does: at s = 1 the numbers are peft's to the bit, at any s the model
starts at Q + (W - Q)_r. A GPT-2 ``Conv1D`` is quantised and factored as the (d_out, d_in) weight it stands for (as
``quantize`` stores it); peft factors the stored (d_in, d_out) weight, so its adapter has the wrong shape (its forward
fails) or, square, starts at the transposed error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from .quant import _available, _backend, _dequantize_weight, _is_4bit_layer

BITS = (4, 8)
"""peft 0.21.2 quantises with bitsandbytes' NF4 and int8 only ("Only nf4 and int8 quantization is supported");
its own 2-bit NFQuantizer went with peft 0.20."""


@dataclass
class LoftQConfig:
    """peft's ``LoftQConfig``: ``LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(4, 1))``; a dict
    ``{"loftq_bits": 4, "loftq_iter": 1}`` does the same (the form a saved adapter_config.json holds)."""

    loftq_bits: int = 4
    """Bits of the quantised base: 4 (NF4) or 8 (int8)."""
    loftq_iter: int = 1
    """Alternating rounds of quantise-then-SVD, >= 1."""


def settings(loftq_config: Any) -> dict[str, int]:
    """``loftq_config`` (a dict or a ``LoftQConfig``) as peft's dict, checked: ConfigError naming the key at fault."""
    if not loftq_config:
        raise ConfigError("`loftq_config` must be specified when `init_lora_weights` is 'loftq' (as peft): "
                          "loftq_config={'loftq_bits': 4, 'loftq_iter': 1}")  # fmt: skip
    value = loftq_config if isinstance(loftq_config, dict) else getattr(loftq_config, "__dict__", None)
    if not isinstance(value, dict) or set(value) - {"loftq_bits", "loftq_iter"}:
        raise ConfigError(f"loftq_config takes the keys 'loftq_bits' and 'loftq_iter', got {loftq_config!r}")
    bits, rounds = value.get("loftq_bits", 4), value.get("loftq_iter", 1)
    if type(bits) is not int or bits not in BITS:
        raise ConfigError(f"loftq_config['loftq_bits'] must be 4 (nf4) or 8 (int8), got {bits!r} (as peft: "
                          "'Only nf4 and int8 quantization is supported')")  # fmt: skip
    if type(rounds) is not int or rounds <= 0:
        raise ConfigError(f"loftq_config['loftq_iter'] must be an int >= 1, got {rounds!r} (as peft)")
    return {"loftq_bits": bits, "loftq_iter": rounds}


def check_layer(layer: nn.Module, name: str, loftq_config: Any) -> dict[str, int]:
    """ConfigError, before the model changes, where adapter init 'loftq' cannot run on ``layer`` (a LoRA layer at
    ``name``); else the checked settings, which ``init_layer`` uses."""
    cfg = settings(loftq_config)
    kind = type(layer).__name__
    if kind != "LoraLinear":  # peft calls its loftq_init without the config there: a TypeError
        raise ConfigError(f"lora: init_lora_weights='loftq' is not defined for {name} ({kind.removeprefix('Lora')}), "
                          "as in peft; leave it out of target_modules")  # fmt: skip
    if not _available("bitsandbytes"):
        raise ConfigError("lora: init_lora_weights='loftq' quantises with bitsandbytes, which is not installed "
                          "(pip install bitsandbytes); or quantize() the base and call replace_lora_weights_loftq")  # fmt: skip
    return cfg


def _quantized(res: torch.Tensor, bits: int, device: torch.device) -> torch.Tensor:
    """q(res) dequantised in fp32: peft's bitsandbytes calls (NF4 without double quantisation, or row-wise int8)."""
    bnb = _backend("bitsandbytes")
    if bits == 4:
        q = bnb.nn.Params4bit(res.to("cpu"), requires_grad=False, compress_statistics=False, quant_type="nf4")
        q = q.to(res.device)
        return bnb.functional.dequantize_4bit(q.data, q.quant_state)
    q = bnb.nn.Int8Params(res.to("cpu"), requires_grad=False).to(device)
    return bnb.functional.int8_vectorwise_dequant(q.data, q.SCB).to(res.device)


def _factors(res: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with s L R = the top-r SVD of ``res``: peft's ``_low_rank_decomposition`` with S / s for S."""
    U, S, Vh = torch.linalg.svd(res, full_matrices=False)
    if scaling != 1:
        S = S / scaling
    return U @ (torch.sqrt(torch.diag(S)[:, 0:r])), torch.sqrt(torch.diag(S)[0:r, :]) @ Vh


@torch.no_grad()
def loftq_init(
    weight: torch.Tensor, num_bits: int, reduced_rank: int, num_iter: int = 1, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q, A, B) for a (d_out, d_in) weight: Q dequantised in the weight's dtype, A (r, d_in) and B (d_out, r) in
    fp32 with Q + scaling B A ~= W. peft's ``loftq_init`` on the weight's device (peft's runs on CUDA)."""
    dtype = weight.dtype
    weight = weight.to(torch.float32)
    res = weight.clone()
    for i in range(num_iter):
        dequantized = _quantized(res, num_bits, weight.device)
        res = weight - dequantized
        last = i + 1 == num_iter
        L, R = _factors(res, reduced_rank, scaling if last else 1.0)
        if last:
            break
        res = weight - torch.mm(L, R)
    return dequantized.to(dtype), R, L


def init_layer(layer: nn.Module, name: str, cfg: dict[str, int]) -> None:
    """Adapter ``name`` of a ``LoraLinear`` from LoftQ: A, B set, the base weight replaced by Q (its own dtype)."""
    base, A, B = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    weight = base.weight.T.contiguous() if layer.fan_in_fan_out else base.weight  # blocks as quantize() cuts them
    q, lora_a, lora_b = loftq_init(weight, cfg["loftq_bits"], A.out_features, cfg["loftq_iter"], layer.scaling[name])
    A.weight.data, B.weight.data = lora_a, lora_b
    base.weight.data = (q.T if layer.fan_in_fan_out else q).contiguous()


# -- replace_lora_weights_loftq -----------------------------------------------------------------------------
def _checkpoint(model: nn.Module, model_path: str | os.PathLike[str] | None) -> Callable[[str], torch.Tensor]:
    """A reader of the base checkpoint's tensors by name: ``model_path`` (a model.safetensors file, or a folder with
    one or with a sharded index), else the base's ``_name_or_path`` (a folder, or a hub id in the local cache)."""
    from safetensors import safe_open

    if model_path is None:
        source = getattr(getattr(model, "config", None), "_name_or_path", None)
        if not source:
            raise ValueError("replace_lora_weights_loftq: the base is not a transformers model with a path; pass "
                             "model_path, the folder (or file) of its model.safetensors")  # fmt: skip
        if not os.path.isdir(source):
            from huggingface_hub import snapshot_download

            try:
                source = snapshot_download(source, local_files_only=True)
            except Exception as exc:  # (not cached, or not a hub id)
                raise ValueError(f"replace_lora_weights_loftq: {source!r} is neither a folder nor in the local hub "
                                 f"cache ({type(exc).__name__}); pass model_path") from None  # fmt: skip
        model_path = source
    path = str(model_path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    files: dict[str, str] = {}
    if os.path.isfile(path) or os.path.isfile(os.path.join(path, "model.safetensors")):
        file = path if os.path.isfile(path) else os.path.join(path, "model.safetensors")
        with safe_open(file, framework="pt") as f:
            files = dict.fromkeys(f.keys(), file)
    elif os.path.isfile(index := os.path.join(folder, "model.safetensors.index.json")):
        with open(index, encoding="utf-8") as f:
            files = {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
    else:
        raise FileNotFoundError(f"replace_lora_weights_loftq: no model.safetensors (or sharded index) at {path}")
    prefix = getattr(model, "base_model_prefix", "") or ""

    def read(key: str) -> torch.Tensor:
        for k in (key, key.removeprefix(prefix + ".")):  # peft's retry: the key without the base model prefix
            if k in files:
                with safe_open(files[k], framework="pt") as f:
                    return f.get_tensor(k)
        raise KeyError(f"replace_lora_weights_loftq: {key!r} is not in the checkpoint {path}")

    return read


@torch.no_grad()
def replace_lora_weights_loftq(
    model: nn.Module,
    model_path: str | os.PathLike[str] | None = None,
    adapter_name: str = "default",
    callback: Callable[[nn.Module, str], bool] | None = None,
) -> None:
    """peft's ``replace_lora_weights_loftq`` for a DeltaModel on a 4-bit base (``quantize``'s layers, either backend,
    or transformers' bitsandbytes ones): each LoRA layer's A and B become the top-r SVD of W - Q, W read from the
    checkpoint (safetensors), Q the layer's 4-bit weight, split so that Q + s B A ~= W (module docstring).

    ``callback(model, name)`` after each layer, as peft's: False puts that layer's A and B back. Without a callback
    every layer is computed before any is written, so an error leaves the model as it was.

    Raises:
        ValueError: no LoRA layer of ``adapter_name`` on a 4-bit base, or no checkpoint to read W from.
        FileNotFoundError, KeyError: the checkpoint lacks the file or a layer's weight.
    """
    base_model = getattr(model, "base_model", model)
    layers = [(n, m) for n, m in base_model.named_modules()
              if adapter_name in getattr(m, "lora_A", {}) and _is_4bit_layer(getattr(m, "base_layer", None))]  # fmt: skip
    if not layers:
        raise ValueError(f"replace_lora_weights_loftq: no LoRA layer of adapter {adapter_name!r} on a 4-bit base "
                         "(quantize() the base before adding the adapter)")  # fmt: skip
    read = _checkpoint(base_model, model_path)
    todo = []
    for name, layer in layers:
        qbase = layer.base_layer
        weight = read(f"{name}.weight").to(torch.float32)
        if getattr(qbase, "conv1d", False) or getattr(getattr(qbase, "source_cls", None), "__name__", "") == "Conv1D":
            weight = weight.T  # the checkpoint stores a Conv1D's weight (d_in, d_out)
        q = _dequantize_weight(qbase.weight, getattr(qbase, "backend", "bitsandbytes")).to(torch.float32)
        if weight.shape != q.shape:
            raise ValueError(f"replace_lora_weights_loftq: {name}.weight in the checkpoint is {tuple(weight.shape)}, "
                             f"the 4-bit layer stands for {tuple(q.shape)}: another model's checkpoint?")  # fmt: skip
        L, R = _factors(weight.to(q.device) - q, layer.lora_A[adapter_name].out_features, layer.scaling[adapter_name])
        todo.append((name, layer, R, L))
        if callback is None:
            continue
        A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        before = A.data, B.data
        A.data, B.data = R.to(A.dtype), L.to(B.dtype)
        if not callback(model, name):
            A.data, B.data = before
    if callback is None:
        for _, layer, R, L in todo:
            A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            A.data, B.data = R.to(A.dtype), L.to(B.dtype)
