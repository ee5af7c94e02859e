"""LoRA's initialisations, those drawn at random and those computed from the base weight, the conversion of a
trained PiSSA / OLoRA adapter into a plain LoRA, and the checks of lora_bias (a bias on lora_B, as peft's).

PiSSA (Meng et al., 2024; arXiv:2404.02948) takes the top r singular triplets of W: with W = V S U^T,
B = V_r sqrt(S_r / s), A = sqrt(S_r / s) U_r^T, and the base becomes the residual W - s B A, so the model starts as
the base. ``"pissa_niter_K"`` draws the triplets with ``torch.svd_lowrank`` (K subspace iterations, the global torch
RNG). OLoRA (Büyükakyüz, 2024; arXiv:2406.01775) takes W = Q R: B = Q_r, A = R_r, base W - s B A. Both are peft
0.21.2's ``pissa_init`` / ``olora_init`` operation for operation, so the same seed gives the same numbers.

The trained adapter then needs the residual base. ``convert_to_plain_lora`` writes what peft's
``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes: W_res + s B A = W + s (B A - B0 A0), a
plain LoRA of rank 2r, A' = [A; A0], B' = [B, -B0], which loads on the original base.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import CONFIG_NAME, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, ConfigError, DeltaConfig
from ..layer import DeltaLayer, NotMergeable
from . import _loftq, _quant_olora

LOADS_ONLY = ("mica", "eva")  # peft's inits that leave the base as it is, not drawn here: their files are plain LoRA
FROM_BASE = ("pissa", "olora")  # computed from the base weight, which they change (pissa_niter_K too)
DRAWN = (True, False, "gaussian", "orthogonal", "pissa", "olora", "loftq")
ANY_CASE = ("gaussian", "olora", "mica")  # peft compares these three lower-cased ("OLoRA", "Gaussian" draw there)


def canonical_init(init: object) -> object:
    """``init`` as deltatune compares it: peft's any-case names ("OLoRA", "Gaussian", "MICA") lower-cased."""
    return init.lower() if isinstance(init, str) and init.lower() in ANY_CASE else init


def is_from_base(init: object) -> bool:
    """Whether ``init`` is PiSSA (exact or ``pissa_niter_K``), OLoRA or LoftQ."""
    return isinstance(init, str) and (init in ("olora", "loftq") or init.startswith("pissa"))


def check_init(init: object, lora_bias: bool = False, use_dora: bool = False, loftq_config: object = None) -> None:
    """ConfigError unless ``init`` is an init_lora_weights deltatune draws (or a peft one whose files load), and
    ``lora_bias`` goes with it as peft's LoraConfig allows; ``loftq_config`` (when given) checked for 'loftq'."""
    if init == "loftq" and loftq_config is not None:
        _loftq.settings(loftq_config)
    elif loftq_config and init != "loftq":  # peft's words (a forgotten init_lora_weights='loftq' is told)
        warnings.warn("`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.",
                      stacklevel=4)  # fmt: skip
    if lora_bias and init not in (True, False):  # peft's LoraConfig refuses these two
        raise ConfigError(f"lora_bias=True is only supported with init_lora_weights=True or False, got {init!r}")
    if lora_bias and use_dora:
        raise ConfigError("lora_bias=True is not supported with use_dora (as peft)")
    if (type(init) is bool or isinstance(init, str)) and init in DRAWN + LOADS_ONLY:
        return  # (not 0 or 1: peft's truthiness test took 0 as False, deltatune's `is False` drew it as True)
    if isinstance(init, str) and init.startswith("pissa_niter_"):
        if init.removeprefix("pissa_niter_").isdigit():
            return  # peft's int() would take "-1", which svd_lowrank refuses deep inside torch
        raise ConfigError(f"init_lora_weights={init!r}: 'pissa_niter_K' takes a number of iterations K >= 0")
    why = (": that init of peft's changes the base weights from data (CorDA); deltatune draws 'pissa', "
           "'pissa_niter_K', 'olora' and 'loftq'") if str(init).split("_")[0] == "corda" else ""  # fmt: skip
    raise ConfigError(f"init_lora_weights must be True, False, 'gaussian', 'orthogonal', 'pissa', 'pissa_niter_K', "
                      f"'olora' or 'loftq', got {init!r}{why}")  # fmt: skip


def loaded_init(data: dict, source: str) -> dict:
    """An adapter_config.json dict whose init_lora_weights is 0 or 1 (deltatune saved a number as given before it
    refused them; peft saves a 0, which it draws as False) with False / True there, said once: the weights come from
    the file. A config a user makes still refuses a number (``check_init``)."""
    if type(init := data.get("init_lora_weights")) is not int or init not in (0, 1):
        return data
    warnings.warn(f"{source}: init_lora_weights={init} (a number, as older files hold) is read as {bool(init)}",
                  stacklevel=4)  # fmt: skip
    return dict(data, init_lora_weights=bool(init))


def warn_conversion(init: object, rslora: bool, patterns: object) -> None:
    """peft's early word that rsLoRA with rank_pattern / alpha_pattern rules out the conversion of a PiSSA / OLoRA
    adapter (``convert_to_plain_lora`` refuses it once trained). ``init`` is compared after ``canonical_init``, so
    "OLoRA" warns here too, where peft's case-sensitive test (``== "olora"``) says nothing though its conversion
    refuses it as well: not peft's warnings to the letter."""
    if rslora and patterns and isinstance(init, str) and (init.startswith("pissa") or init == "olora"):
        warnings.warn("Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern and post-training conversion of "
                      "modified base weights PiSSA/CorDA/OLoRA/LoRA-GA means that you won't be able to pass "
                      "`path_initial_model_for_weight_conversion` to `save_pretrained` to restore the initial values "
                      "of the base weights; if you intend to do this, please ensure not to use rslora or "
                      "rank_pattern/alpha_pattern.", stacklevel=4)  # fmt: skip


def reset(A: torch.Tensor, B: torch.Tensor, init: bool | str, r: int, a_zero: bool = False) -> None:
    """Initialise A and B in place (torch.nn.init works without grad). For Embedding the roles flip (A zero, B
    normal), as in PEFT, which draws an embedding so for every init but False (PiSSA and OLoRA included)."""
    if init is False:
        return
    nn.init.zeros_(A if a_zero else B)
    if a_zero:
        nn.init.normal_(B)
    elif init == "gaussian":
        nn.init.normal_(A, std=1 / r)
    elif init == "orthogonal":  # peft's orthogonal_init: B A = 0 from two halves of one random orthogonal Q
        Q, _ = torch.linalg.qr(torch.randn(r, r))
        with torch.no_grad():
            A.copy_(torch.randn(A.shape[1], r // 2).mm(Q[0::2, :]).T / 10.0)
            B.copy_(torch.randn(r // 2, B.shape[0]).T.mm(Q[1::2, :]) / 10.0)
    else:  # kaiming_uniform_ with a=sqrt(5) is nn.Linear's own init, which the LoRA reference code uses for A
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))


def check_target(layer: nn.Module, name: str, config: DeltaConfig, r: int) -> None:
    """ConfigError, before the model is touched, where ``config`` (a LoraConfig) cannot adapt ``layer`` at ``name``:
    lora_bias on an embedding, a base-computed init where peft's is not defined or would compute wrongly."""
    init, kind = config.init_lora_weights, type(layer).__name__
    if config.lora_bias and kind == "LoraEmbedding":  # peft: "lora_bias=True is not supported for Embedding."
        raise ConfigError(f"lora: lora_bias=True is not supported on {name}, an embedding (as peft)")
    if init == "loftq":  # (the checked loftq_config travels to init_from_base on the layer)
        layer.__dict__["_loftq"] = cfg = _loftq.check_layer(layer, name, getattr(config, "loftq_config", None))
        config.loftq_config = cfg  # peft's LoftQConfig as the dict its __post_init__ (and a saved file) has
    if kind == "LoraEmbedding" or not (is_from_base(init) or init == "orthogonal"):
        return  # peft draws an embedding's adapter as for True and leaves its weight alone
    base = layer.base_layer
    if kind == "LoraConv2d":  # peft: "Unknown initialization init_lora_weights='pissa'"
        raise ConfigError(f"lora: init_lora_weights={init!r} is not defined for {name} (Conv2d), as in peft; "
                          "leave it out of target_modules")  # fmt: skip
    if init == "orthogonal":  # peft: "Orthogonal initialization requires the LoRA rank to be even, got 3 instead."
        if r % 2:
            raise ConfigError(
                f"lora: init_lora_weights='orthogonal' on {name} needs an even rank, got r={r} (as peft)"
            )
        return
    weight = base.weight
    four = init == "olora" and _quant_olora.applies(base)  # peft requantises the residual: _quant_olora.py
    if not four and (
        weight.dtype not in (torch.float32, torch.float16, torch.bfloat16)
        or callable(getattr(base, "dequantize", None))
    ):
        raise ConfigError(f"lora: init_lora_weights={init!r} needs a float32/float16/bfloat16 base weight; {name} is "
                          f"{type(base).__name__} ({weight.dtype}): initialise on the full-precision base, then "
                          "quantize the residual it leaves")  # fmt: skip
    if not four and not weight.isfinite().all():  # peft: PiSSA's SVD fails, earlier layers rewritten; OLoRA goes on
        raise ConfigError(f"lora: init_lora_weights={init!r} on {name}: its base weight holds NaN or inf values, "
                          "which the factors and the residual would spread; fix or leave out that weight")  # fmt: skip
    if init == "olora" and layer.fan_in_fan_out:
        raise ConfigError(f"lora: init_lora_weights='olora' on {name}, a GPT-2 Conv1D: peft's olora_init factors the "
                          "stored (d_in, d_out) weight as if it were (d_out, d_in) (its forward then fails, or a "
                          "square one starts away from the base); use 'pissa'")  # fmt: skip
    shape = (base.out_features, base.in_features) if four else tuple(weight.shape)  # (4-bit: not the packed one)
    if r > (rank := min(shape)):
        raise ConfigError(f"lora: r={r} on {name} exceeds its weight's rank bound {rank} ({shape}); "
                          f"init_lora_weights={init!r} takes r <= {rank} factors")  # fmt: skip


def check_base_kept(model: nn.Module, adapter_name: str, targets: list[tuple[str, nn.Module]], init: object) -> None:
    """ConfigError where a base-computed init would change what another computes with, before the model changes:
    another adapter on the model (peft warns and goes on; its outputs change), an adapter added beside one whose init
    left the residual, or a weight another module shares (tied input and output embeddings: peft's changes that
    module too, and a tiny GPT-2 starts 0.24 off its base)."""
    for path, module in model.named_modules():
        others = [n for n in module.adapter_names if n != adapter_name] if isinstance(module, DeltaLayer) else []
        if mutated := [n for n in others if n in getattr(module, "_from_base", ())]:
            raise ConfigError(f"lora: adapter {mutated[0]!r} was initialised from the base (PiSSA / OLoRA) and left "
                              f"{path} as its residual, which a new adapter would compute with; convert it to a plain "
                              "LoRA first (convert_to_plain_lora) and load that on the original base")  # fmt: skip
        if others and is_from_base(init):
            raise ConfigError(f"lora: init_lora_weights={init!r} writes a residual into the base weights, which adapter "
                              f"{others[0]!r} on {path} computes with (peft warns and goes on); load it on its own "
                              "base, or convert it to a plain LoRA (convert_to_plain_lora)")  # fmt: skip
    if not is_from_base(init):
        return
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for name, layer in targets:
        shared = [o for o in owners.get(id(layer.base_layer.weight), []) if not o.startswith(name + ".")]
        if shared and type(layer).__name__ == "LoraLinear":
            raise ConfigError(f"lora: init_lora_weights={init!r} on {name}, whose weight is also {shared[0]} (tied "
                              "embeddings): the residual would change that module too; load the base with "
                              "tie_word_embeddings=False, or leave it out of target_modules")  # fmt: skip


def for_loading(config: DeltaConfig) -> DeltaConfig:
    """LoraConfig.for_loading: peft's inits that leave the base alone drawn as True; PiSSA / OLoRA drawn again, as
    peft's load does (the residual of the base given), the replaced base weights kept until the file's tensors are
    in (``settle``), so that a refused load leaves the model as it was."""
    if config.init_lora_weights in LOADS_ONLY:
        loading = config.replace(init_lora_weights=True)
    else:
        loading = config.replace()
        loading._loading = True
    # the config the model keeps: what the load finds (fan_in_fan_out at a Conv1D) is said there too
    loading._stored = config
    return loading


def bias_parameters(bias: str, model: nn.Module) -> list[str]:
    """The base parameters LoRA's ``bias`` option trains and saves: peft's rule, a parameter named "bias" or "x.bias"
    (not DeBERTa's q_bias, v_bias); "lora_only": those of the adapted layers."""
    if bias == "none":
        return []
    names = []
    for name, _ in model.named_parameters():
        if not (name == "bias" or name.endswith(".bias")) or ".lora_" in name:
            continue
        if bias == "all" or name.endswith("base_layer.bias"):
            names.append(name)
    return names


def settle(layer: nn.Module, name: str, restore: bool) -> None:
    """Drop the base weight a load's init replaced (the load went through), or put it back (``restore``)."""
    original = layer.__dict__.get("_pre_init", {}).pop(name, None)
    if isinstance(original, nn.Parameter) and restore:  # a 4-bit weight OLoRA replaced (_quant_olora.py)
        _quant_olora.restore(layer.base_layer, original)
    elif original is not None and restore:
        layer.base_layer.weight.data = original


def reset_bias(lora_b: nn.Module, init: bool | str) -> None:
    """Zero lora_B's bias (lora_bias) unless init is False, which keeps nn.Linear's draw, as peft."""
    if lora_b.bias is not None and init is not False:
        nn.init.zeros_(lora_b.bias)


def lora_b_bias(layer: nn.Module, name: str | None = None) -> torch.Tensor | None:
    """Adapter ``name``'s lora_B bias (lora_bias), or None; without a name, any adapter's in ``layer``."""
    names = [name] if name is not None else list(layer.lora_B)
    return next((b for n in names if n in layer.lora_B and (b := layer.lora_B[n].bias) is not None), None)


def check_bias_merge(layer: nn.Module, name: str) -> None:
    """NotMergeable (peft's words; a RuntimeError there), before any weight is written, where adapter ``name`` has a
    lora_B bias and the base layer none."""
    if lora_b_bias(layer, name) is not None and layer.bias is None:
        raise NotMergeable("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")


def check_conv_merge(layer: nn.Module, name: str) -> None:
    """NotMergeable where the base Conv2d is grouped: B A is not a kernel of W's shape (peft's NotImplementedError)."""
    if layer.base_layer.groups > 1:
        raise NotMergeable(f"adapter {name!r} is on a grouped Conv2d, which peft cannot merge either")


def add_bias(layer: nn.Module, name: str, sign: int) -> None:
    """Merge (sign 1) or unmerge (-1) adapter ``name``'s lora_B bias: b +/-= s * b_B in the base bias's dtype, as
    peft's merges (safe or not) and unmerge."""
    if (bias := lora_b_bias(layer, name)) is not None:
        layer.base_layer.bias.add_(bias * layer.scaling[name] * sign)


def init_from_base(layer: nn.Module, name: str, init: str) -> None:
    """PiSSA, OLoRA or LoftQ for adapter ``name`` of a ``LoraLinear``: A and B (float32) from the base weight, which
    becomes the residual W - s B A (LoftQ: the quantised Q) in its own dtype. peft's pissa_init / olora_init /
    loftq_init, step for step (LoftQ: methods/_loftq.py)."""
    original = layer.base_layer.weight.data  # (replaced, not written into: kept while a load may fail)
    if init == "olora" and _quant_olora.applies(layer.base_layer):  # the 4-bit weight itself replaced
        original = _quant_olora.olora(layer, name)
    else:
        with torch.no_grad():
            _init_from_base(layer, name, init)
    if layer.__dict__.pop("_keep_base", False):
        layer.__dict__.setdefault("_pre_init", {})[name] = original
    layer.__dict__.setdefault("_from_base", set()).add(name)  # (check_base_kept)


def _init_from_base(layer: nn.Module, name: str, init: str) -> None:
    base, A, B = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    scaling, r, dtype = layer.scaling[name], A.out_features, base.weight.dtype
    if init == "loftq":
        _loftq.init_layer(layer, name, layer.__dict__.pop("_loftq"))
        return
    if init == "olora":  # peft factors the stored weight as it is (check_target refuses Conv1D)
        weight = base.weight.to(torch.float32)
        Q, R = torch.linalg.qr(weight.data)
        A.weight.data, B.weight.data = R[:r].contiguous(), Q[:, :r].contiguous()
        residual = weight.data - scaling * B.weight @ A.weight
    else:
        weight = base.weight.to(torch.float32)
        weight = weight.T if layer.fan_in_fan_out else weight
        if init == "pissa":  # W = V S U^T
            V, S, Uh = torch.linalg.svd(weight.data, full_matrices=False)
            Vr, Sr, Uhr = V[:, :r], S[:r], Uh[:r]
        else:
            Vr, Sr, Ur = torch.svd_lowrank(weight.data, r, niter=int(init.removeprefix("pissa_niter_")))
            Uhr = Ur.t()
        Sr /= scaling
        A.weight.data = torch.diag(torch.sqrt(Sr)) @ Uhr
        B.weight.data = Vr @ torch.diag(torch.sqrt(Sr))
        residual = weight.data - scaling * B.weight.data @ A.weight.data
        residual = residual.to(dtype)
        residual = residual.T if layer.fan_in_fan_out else residual
    base.weight.data = residual.to(dtype)


def read_initial(initial: str | os.PathLike[str] | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``initial``: a dict as it is, or the folder an adapter was saved to right after its init (its
    adapter_model.safetensors, else peft's adapter_model.bin, read as peft reads it); FileNotFoundError naming the
    file where it holds neither."""
    if isinstance(initial, dict):
        return initial
    path, pickled = os.path.join(initial, WEIGHTS_NAME), os.path.join(initial, PICKLE_WEIGHTS_NAME)
    if not os.path.isfile(path) and os.path.isfile(pickled):
        return dict(torch.load(pickled, map_location="cpu", weights_only=True))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is not a file (the folder the adapter was saved to after its init)")
    return load_file(path)


def convert_to_plain_lora(
    model: nn.Module, initial: str | os.PathLike[str] | dict[str, torch.Tensor], out_dir: str | os.PathLike[str],
    adapter_name: str = "default",
) -> None:  # fmt: skip
    """Write adapter ``adapter_name`` of ``model`` (a DeltaModel with a PiSSA / OLoRA adapter, trained) to ``out_dir``
    as the plain LoRA that peft's ``save_pretrained(out_dir, path_initial_model_for_weight_conversion=initial)``
    writes: rank 2r, A' = [A; A0], B' = [B, -B0], lora_alpha doubled (times sqrt 2 with rsLoRA; rank_pattern and
    alpha_pattern doubled), init_lora_weights True, so it loads on the original base. ``initial``: the folder the
    adapter was saved to right after its init (its config is rewritten with init_lora_weights True, as peft's), or
    its tensors. Other tensors (heads trained in full, biases) are written as they are; an adapter on an embedding
    (which its init left alone) is padded with zeros to rank 2r.

    Raises:
        ConfigError: rsLoRA with rank_pattern or alpha_pattern (peft refuses it), or a DoRA adapter.
        FileNotFoundError: ``initial`` holds neither adapter_model.safetensors nor adapter_model.bin.
    """
    config = model.peft_config[adapter_name]
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ConfigError("convert_to_plain_lora: not supported with rank_pattern or alpha_pattern together with "
                          "use_rslora (peft's path_initial_model_for_weight_conversion refuses it)")  # fmt: skip
    if config.use_dora:
        raise ConfigError(
            f"convert_to_plain_lora: adapter {adapter_name!r} is DoRA, whose update no plain LoRA equals"
        )
    if config.init_lora_weights == "loftq":  # peft warns that its conversion is for PiSSA / CorDA / OLoRA, and goes on
        raise ConfigError(f"convert_to_plain_lora: adapter {adapter_name!r} is LoftQ: its base is the quantised Q, "
                          "not W minus the initial adapter, so no plain LoRA on W equals it; save Q with it")  # fmt: skip
    start = read_initial(initial)
    if not isinstance(initial, dict):
        _write(initial, None, config.replace(init_lora_weights=True))
    tensors = model.adapter_state_dict(adapter_name)
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        value = value.detach()
        if key.endswith(("lora_A.weight", "lora_B.weight")) and key in start:
            lora_a = key.endswith("lora_A.weight")
            other = start[key].to(value.device)  # torch.cat promotes mixed dtypes, as in peft
            out[key] = torch.cat([value, other] if lora_a else [value, -other], dim=0 if lora_a else 1)
        elif key.endswith(("lora_embedding_A", "lora_embedding_B")):
            lora_a = key.endswith("lora_embedding_A")
            out[key] = torch.cat([value, torch.zeros_like(value)], dim=0 if lora_a else 1)
        else:
            out[key] = value
    scale = math.sqrt(2) if config.use_rslora else 2
    plain = config.replace(
        init_lora_weights=True, inference_mode=True, r=config.r * 2, lora_alpha=config.lora_alpha * scale,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()},
    )  # fmt: skip
    path = getattr(getattr(model.base_model, "config", None), "_name_or_path", None) or None
    _write(out_dir, out, plain.replace(base_model_name_or_path=plain.base_model_name_or_path or path))


def _write(folder: str | os.PathLike[str], tensors: dict[str, torch.Tensor] | None, config: DeltaConfig) -> None:
    """``adapter_model.safetensors`` (unless None) and ``adapter_config.json`` as ``files.write_adapter`` writes them
    (methods do not import files.py), each renamed into place once written."""
    os.makedirs(folder, exist_ok=True)
    text = json.dumps(dict(sorted(config.to_dict().items())), indent=2)
    writes = [(CONFIG_NAME, lambda f: Path(f).write_text(text, encoding="utf-8"))]
    if tensors is not None:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        writes.append((WEIGHTS_NAME, lambda f: save_file(tensors, f, {"format": "pt"})))
    mask = os.umask(0)
    os.umask(mask)
    for name, write in writes:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, 0o666 & ~mask)  # mkstemp's 0600 would hide the adapter from other users
            os.replace(tmp, os.path.join(folder, name))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
