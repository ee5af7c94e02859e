"""What every injected module shares: per-adapter state keyed by name, activation, merge, save keys.

A method's layer subclasses ``DeltaLayer`` (one level, no deeper) and lists in ``adapter_attrs`` the ``nn.ModuleDict``
/ ``nn.ParameterDict`` attributes that hold one entry per adapter name. With that, ``DeltaModel`` can switch, disable,
delete, save and load any method's adapters without knowing which method it is. Saved keys follow PEFT: the attribute
path with the adapter name removed (``lora_A.default.weight`` -> ``lora_A.weight``).

``ModulesToSave`` is the one layer that is not a method: it keeps a full trainable copy of a module
(a new classification head) per adapter, as PEFT's ModulesToSaveWrapper does, with the same keys.

Mixed-adapter batches: for one call ``DeltaModel`` sets ``row_adapters`` (a ``RowAdapters``: one adapter name
per row of the batch) on every layer. A layer with ``supports_row_adapters`` then computes each row with that
row's adapter instead of the active ones; ``None`` (the default) is the normal behaviour.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from .torch_modules import (  # noqa: F401 (re-exported: the methods import only config, layer and targets)
    checkpointing,
    enable_checkpointing,
    linear_shape,
    logical_numel,
    replace_module,
    set_submodule,
)

BASE_ROW = "__base__"
"""The name that sends a row of a mixed-adapter batch through the plain base model (PEFT's)."""


class RowAdapters:
    """Which adapter each row of a batch computes with, for one call (``DeltaModel(..., adapter_names=...)``).

    ``names[i]`` is row i's adapter, ``BASE_ROW`` for the plain base model. A layer may see the batch expanded
    with each row repeated k times in place (generate's beams and returned sequences, or a model that flattens
    (batch, seq) into rows): row j of such a batch is row j // k of the call.
    """

    def __init__(self, names: Sequence[str], sizes: Collection[int] | None = None) -> None:
        """``sizes``: ``call_sizes``' answer. ValueError: rows with different adapters, one of ``sizes.shared``'s."""
        self.names = tuple(names)
        self.sizes = frozenset(sizes) if sizes else None
        """The first dimensions a layer may route (the call's tensors', and generate's expansion of them); None: any
        multiple of the rows."""
        self.refused: dict[int, str] = dict(getattr(sizes, "refused", {}))  # first dimensions none may route: why
        for path, layer in getattr(sizes, "shared", ()) if len(set(self.names)) > 1 else ():
            if held := [name for name in dict.fromkeys(self.names) if name in layer.adapter_names]:
                raise ValueError(
                    f"adapter_names routes {len(self.names)} rows but adapter {held[0]!r} adapts {path}, which "
                    "computes one table of relative positions for every row, not the call's rows, so rows with "
                    "different adapters cannot be told apart there; give every row the same adapter, or leave "
                    f"{path.rpartition('.')[2]} out of the adapter's target_modules"
                )
        # Per (batch, device): computed once per call, not once per layer (``nonzero`` waits for the device).
        self._codes: dict[tuple[int, torch.device], tuple[list[str], torch.Tensor]] = {}
        self._groups: dict[tuple[int, torch.device], list[tuple[str, torch.Tensor | None]]] = {}

    def codes(self, batch: int, device: torch.device) -> tuple[list[str], torch.Tensor]:
        """The distinct names (in order of first use) and each row's index into them, a (batch,) tensor.

        Raises:
            ValueError: rows with different adapters, and ``batch`` not a multiple of them or not one of ``sizes``
                (the layer computes on something all rows share, e.g. relative positions), or one of ``refused``.
        """
        key = (batch, device)
        if key not in self._codes:
            n, unique = len(self.names), list(dict.fromkeys(self.names))
            if len(unique) == 1:  # one adapter for every row: whatever the layer computes on is theirs
                self._codes[key] = unique, torch.zeros(batch, dtype=torch.long, device=device)
                return self._codes[key]
            if batch in self.refused:
                raise ValueError(self.refused[batch])
            if self.sizes is None and batch % n:
                raise ValueError(
                    f"adapter_names gives {n} rows but a layer sees a batch of {batch}, not a multiple of {n}; "
                    "give one adapter name per row of the batch"
                )
            if self.sizes is not None and (batch not in self.sizes or batch % n):
                raise ValueError(
                    f"adapter_names routes {n} rows but a layer computes on {batch} that are not the call's rows "
                    "(positions or relative positions every row shares), so rows with different adapters cannot be "
                    "told apart there; leave that module out of the adapters' targets"
                )
            index = {name: i for i, name in enumerate(unique)}
            codes = torch.tensor([index[name] for name in self.names], device=device)
            self._codes[key] = unique, codes.repeat_interleave(batch // n)  # (batch,)
        return self._codes[key]

    def groups(self, batch: int, device: torch.device) -> list[tuple[str, torch.Tensor | None]]:
        """(adapter name, its row indices) per distinct name of a batch of ``batch`` rows; None: all rows."""
        key = (batch, device)
        if key not in self._groups:
            unique, codes = self.codes(batch, device)
            one = len(unique) == 1
            self._groups[key] = [(n, None if one else (codes == i).nonzero().flatten()) for i, n in enumerate(unique)]
        return self._groups[key]


def row_names(adapter_names: Any, batch_size: int | None, known: Sequence[str]) -> list[str]:
    """``adapter_names`` checked as one adapter name per row (of ``known``, or ``BASE_ROW``) of a ``batch_size``
    batch (None: any).

    Raises:
        TypeError: not a list of strings.
        ValueError: empty, another length than ``batch_size``, an unknown name.
    """
    if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
        per_row = 'adapter_names must be a list with one adapter name per row ("__base__" for the base model)'
        raise TypeError(f"{per_row}, got {adapter_names!r}")
    names = list(adapter_names)
    if not names:
        raise ValueError("adapter_names is empty; give one adapter name per row of the batch")
    if batch_size is not None and len(names) != batch_size:
        raise ValueError(
            f"adapter_names has {len(names)} names but the batch has {batch_size} rows; give one adapter name "
            'per row ("__base__" for the base model)'
        )
    for name in dict.fromkeys(names):
        if name != BASE_ROW and name not in known:
            raise ValueError(
                f"unknown adapter {name!r} in adapter_names; adapters in this model: {', '.join(known) or 'none'} "
                '(and "__base__" for the base model)'
            )
    return names


class NotMergeable(TypeError):
    """A method whose delta cannot be folded into the base weights (a token method, an adapter with modules of its
    own). A TypeError, as peft raises; ``why`` is the reason without the API advice, for the command line."""

    def __init__(self, why: str) -> None:
        super().__init__(f"{why} (keep the adapter, or unload() it)")
        self.why = why


class DeltaLayer(nn.Module):
    """Base of every module a method injects.

    Subclasses set ``adapter_attrs`` and implement ``forward`` (and ``merge``/``unmerge`` where the
    math allows). A layer that wraps a base module keeps it as ``self.base_layer``.
    """

    adapter_attrs: tuple[str, ...] = ()
    """Names of the ModuleDict / ParameterDict attributes holding one entry per adapter."""
    merge_state: tuple[str, ...] = ()
    """Names of dict attributes a merge writes besides the weights (put back after ``check_merge``'s trial)."""
    supports_row_adapters: bool = False
    """``forward`` honours ``row_adapters`` (mixed-adapter batches). DeltaModel refuses to route rows to an
    adapter held by a layer without it, and disables such a layer for a routed call that does not use it."""

    def __init__(self, base_layer: nn.Module | None = None) -> None:
        super().__init__()
        if base_layer is not None:
            self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self._asked: list[str] = []  # the names last made active, held here or not (peft's layer's active list)
        self.merged_adapters: list[str] = []
        self.safe_merged: dict[str, bool] = {}  # whether each adapter was last merged with PEFT's safe_merge
        self.disabled = False
        self.row_adapters: RowAdapters | None = None  # set by DeltaModel for the length of a mixed-batch call

    # -- bookkeeping -------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer holds."""
        return list(dict.fromkeys(key for attr in self.adapter_attrs for key in getattr(self, attr)))

    merged = property(lambda self: bool(self.merged_adapters), doc="peft's: whether any adapter is merged here")

    def set_adapters(self, names: list[str]) -> None:
        """Make ``names`` (those of them this layer holds) the active adapters, in that order."""
        self.active_adapters = [n for n in names if n in self.adapter_names]
        self._asked = list(names)  # (as peft's layers keep them, for delete_adapter's choice)

    active_adapter = property(lambda self: list(self.active_adapters), doc="peft's: the active adapters, a list")
    disable_adapters = property(lambda self: self.disabled, doc="peft's: whether the layer computes as its base")

    def get_base_layer(self) -> nn.Module:
        """peft's: the bottom of the ``base_layer`` chain (a layer without one: itself)."""
        base = getattr(self, "base_layer", self)
        return base.get_base_layer() if isinstance(base, DeltaLayer) and base is not self else base

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """peft's (a layer driven on its own; DeltaModel drives its layers through status.py): these adapters active,
        trainable unless ``inference_mode`` (their dropout then in eval mode), the others frozen (or ValueError)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.check_active(names, type(self).__name__)
        for n, p in ((a, p) for a in self.adapter_names for p in self.adapter_parameters(a).values()):
            p.requires_grad_(n in names and not inference_mode)
        for d, n in ((d, n) for d in self.children() if isinstance(d, nn.ModuleDict) for n in names if n in d):
            d[n].train(self.training and not inference_mode)  # (peft's set_training)
        self.set_adapters(names)

    def enable_adapters(self, enabled: bool) -> None:
        """peft's: enabled, ``set_adapter`` of the active adapters; disabled, no adapter trains (dropout modes left as
        they are) and the layer computes as its base (merged adapters unmerged now; peft's LoRA unmerges at its next
        forward)."""
        if enabled:
            self.set_adapter(self._asked)
        elif self.merged_adapters:
            self.unmerge()
        for p in () if enabled else (p for n in self.adapter_names for p in self.adapter_parameters(n).values()):
            p.requires_grad_(False)
        self.disabled = not enabled

    def check_active(self, names: list[str], path: str) -> None:
        """ValueError when ``names`` cannot be active together on this layer (the layer at ``path``); they can by
        default, their outputs adding up."""

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """This adapter's parameters, keyed as PEFT saves them (relative to this layer)."""
        out: dict[str, nn.Parameter] = {}
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if name not in container:
                continue
            entry = container[name]
            if isinstance(entry, nn.Parameter):
                out[attr] = entry
            else:
                for pname, p in entry.named_parameters():
                    out[f"{attr}.{pname}"] = p
        return out

    def export_state(self, name: str, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors saved for adapter ``name``, keyed as in adapter_model.safetensors.

        ``prefix`` is ``"base_model.model.<path of this layer>."``. A layer whose saved form differs from
        its parameters (a folded reparametrisation) overrides this and ``import_state``.
        """
        return {prefix + k: p for k, p in self.adapter_parameters(name).items()}

    def import_state(self, name: str, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors (keys as ``export_state`` gives them, shapes already checked) into the adapter."""
        with torch.no_grad():
            for k, p in self.adapter_parameters(name).items():
                p.copy_(tensors[prefix + k])

    def training_state(self, name: str) -> dict[str, torch.Tensor]:
        """What going on training adapter ``name`` needs beyond its saved tensors: nothing, unless the saved form is
        folded (a token encoder's own tensors); saved beside the adapter, read back by ``load_adapter_weights``."""
        return {}

    def stage_training_state(self, name: str, state: dict[str, torch.Tensor] | None) -> None:
        """Have the next ``import_state`` of ``name`` restore ``state`` (``training_state``'s tensors; None: none)."""
        if state:
            raise ValueError(f"adapter {name!r} of {type(self).__name__} keeps no training state")

    def successor(self, name: str) -> list[str]:
        """peft's layer's choice of active adapters once ``name`` is deleted: the others made active with it, else
        the first left here by name (``delete_adapter`` warns then), else none."""
        return [n for n in self._asked if n != name] or sorted(n for n in self.adapter_names if n != name)[:1]

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter's entries (unmerging it first). When it was active, ``successor``'s choice becomes active,
        with peft's warning where that is an adapter first made active now (none within ``quiet_deletes``)."""
        if name in self.merged_adapters:  # (only then: a token layer's unmerge refuses any name)
            self.unmerge(name)
        if name not in self._asked and name not in self.active_adapters:
            return self._delete_entries(name)
        new = self.successor(name)
        if new and new[0] not in self._asked:  # (the others active with it: no warning, as peft's)
            warn_deleted(name, new[0], stacklevel=2)
        self._delete_entries(name)
        self.set_adapter(new)

    def _delete_entries(self, name: str) -> None:
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if name in container:
                del container[name]

    # -- merging -----------------------------------------------------------------------------------
    def merge(self, name: str | bool | None = None, adapter_names: list[str] | None = None, safe_merge=False) -> None:
        """Fold adapter ``name`` into the base weights. Idempotent: merging a merged (or absent) adapter does
        nothing; the bookkeeping is here, the math in the method's ``_merge_weights``. Without a name, peft's layer
        ``merge(safe_merge=False, adapter_names=None)``: the named adapters (None: the active ones) in turn."""
        if name is None or isinstance(name, bool):  # (peft's first positional parameter is safe_merge)
            safe_merge = name or safe_merge
            names = self.active_adapters if adapter_names is None else adapter_names
            if isinstance(names, str):
                raise TypeError(f"adapter_names should be a list of strings, got {names!r}.")
            if safe_merge:
                self.check_merge(list(names))
            for n in [n for n in names if n in self.adapter_names]:
                self.merge_as(n, bool(safe_merge))
            return
        if name in self.merged_adapters or name not in self.adapter_names:
            return
        with torch.no_grad():
            self._merge_weights(name)
        self.merged_adapters.append(name)

    def merge_as(self, name: str, safe: bool) -> None:
        """``merge(name)`` as PEFT's with ``safe_merge=safe``, kept in ``safe_merged`` for ``_merge_weights`` and redos.
        An adapter merged already is left as it is and warned about, per adapter (PEFT's ``check_adapters_to_merge``:
        per layer, 'All adapters are already merged, nothing to do.', or 'Already following adapters were merged ...
        You are now additionally merging ...', which deltatune leaves out). A name listed twice in one call on a fresh
        model is merged once and warned about at its second listing (PEFT merges it twice, silently)."""
        if name in self.merged_adapters:  # (merge_adapter called twice, or a name listed twice in one call)
            warnings.warn(f"adapter {name!r} is already merged, nothing to do", UserWarning, stacklevel=3)
        self.safe_merged[name] = self.safe_merged.get(name, False) if name in self.merged_adapters else safe
        self.merge(name)

    def merge_record(self) -> dict[str, dict[str, Any]]:
        """The ``merge_state`` dicts as they are now, for ``merge_again`` after an unmerge (a LoRA's: the scale each
        merge was made at, which its unmerge forgets)."""
        return {attr: dict(getattr(self, attr)) for attr in self.merge_state}

    def merge_again(self, name: str, record: dict[str, dict[str, Any]]) -> None:
        """Merge ``name`` again as it was merged when ``record`` (``merge_record``'s) was taken; an adapter deleted or
        merged since is left as it is (no record left behind for a new adapter of its name)."""
        if name in self.merged_adapters or name not in self.adapter_names:
            return
        for attr, held in record.items():
            if name in held:
                getattr(self, attr)[name] = held[name]
        self.merge(name)

    def check_merge(self, names: list[str]) -> None:
        """PEFT's ``safe_merge``: ValueError (PEFT's words) when merging ``names`` in turn leaves a base weight or bias
        that is not finite. The merge is tried and undone from a copy of the base layer's tensors, exactly."""
        if (base := getattr(self, "base_layer", None)) is None:
            return  # nothing to check: the merge itself refuses (token methods) or copies a module (modules_to_save)
        packed = callable(getattr(base, "dequantize", None))  # a 4-bit base, not written into: the merge replaces it
        params, merged = dict(base.named_parameters()), list(self.merged_adapters)
        kept = {} if packed else {k: p.detach().clone() for k, p in params.items()}
        state = {a: dict(getattr(self, a)) for a in ("safe_merged", *self.merge_state)}  # (DoRA's norms, say)
        try:
            for name in [n for n in names if n in self.adapter_names and n not in merged]:
                self.merge_as(name, True)
                if bad := [k for k, p in self.base_layer.named_parameters() if not p.isfinite().all()]:
                    # IA3's bias: "merged bias", as PEFT says; an MHA's in_proj_weight / out_proj.weight: "weights"
                    what = "weights" if any(k.endswith("weight") for k in bad) else "bias"
                    raise ValueError(f"NaNs detected in the merged {what}. The adapter {name} seems to be broken")
        finally:
            self.base_layer, self.merged_adapters = base, merged
            for k, value in kept.items():
                params[k].detach().copy_(value)
            for a, value in state.items():
                setattr(self, a, value)

    def unmerge(self, name: str | None = None) -> None:
        """Undo ``merge(name)``, restoring the base weights. Idempotent. The adapters merged after it come out first
        and go back in after (a DoRA merge rescales the whole weight, so only the last merged one can be undone).
        Without a name, peft's layer ``unmerge()``: every merged adapter, the last merged first."""
        if name is None:
            if not self.merged_adapters:
                warnings.warn("Already unmerged. Nothing to do.", UserWarning, stacklevel=2)
            for n in reversed(list(self.merged_adapters)):
                self.unmerge(n)
            return
        if name not in self.merged_adapters:
            return
        later = self.merged_adapters[self.merged_adapters.index(name) + 1 :]
        with torch.no_grad():
            for n in [*reversed(later), name]:
                self._unmerge_weights(n)
            self.merged_adapters = [n for n in self.merged_adapters if n not in later and n != name]
        for n in later:
            self.merge(n)

    def _dequantize_base(self) -> None:
        """Merging writes into W. A base layer that stores W packed (4-bit, methods/quant.py) offers ``dequantize()``,
        the plain layer it stands for (a ``DequantizedLinear``, computing in the 4-bit layer's compute dtype as that
        layer did), which replaces it for good: unmerge then restores the dequantised W."""
        if callable(dequantize := getattr(self.base_layer, "dequantize", None)):
            self.base_layer = dequantize()
        elif not self.base_layer.weight.is_floating_point():
            stored = f"{type(self.base_layer).__name__}, whose weight is stored as {self.base_layer.weight.dtype}"
            raise TypeError(f"cannot merge into {stored}; for 4-bit models use deltatune.merge_quantized")

    def _merge_weights(self, name: str) -> None:
        """Fold adapter ``name`` into the base weights (called without grad, once per merge)."""
        what = f"adapter {name!r} ({type(self).__name__}) adds a computation of its own"
        raise NotMergeable(f"{what} and cannot be merged into the base weights")

    def _unmerge_weights(self, name: str) -> None:
        """Undo ``_merge_weights(name)``."""
        raise TypeError(f"{type(self).__name__} cannot be merged into the base weights")

    def unwrap(self) -> nn.Module | None:
        """The plain module to leave in this layer's place once its adapters are merged (None: remove)."""
        return getattr(self, "base_layer", None)


_QUIET = ContextVar("quiet_deletes", default=False)


@contextmanager
def quiet_deletes() -> Iterator[None]:
    """Within the block a layer's ``delete_adapter`` does not warn (DeltaModel's own deletes: the model warns once for
    a ``delete_adapter``, and not at all for a rollback or a server's unload)."""
    token = _QUIET.set(True)
    try:
        yield
    finally:
        _QUIET.reset(token)


def warn_deleted(name: str, new: str, stacklevel: int = 1) -> None:
    """peft's warning that deleting active adapter ``name`` made ``new`` active (none within ``quiet_deletes``)."""
    if not _QUIET.get():
        said = f"Adapter {name} was active which is now deleted. Setting active adapter to {new}."
        warnings.warn(said, stacklevel=stacklevel + 1)


class ModulesToSave(DeltaLayer):
    """A full trainable copy of ``original_module`` per adapter (PEFT's ModulesToSaveWrapper layout)."""

    adapter_attrs = ("modules_to_save",)
    supports_row_adapters = True

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()

    def add(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module).requires_grad_(True)

    def delete_adapter(self, name: str) -> None:  # no choice of its own: peft's wrapper takes it from the caller
        self.active_adapters, self._asked = [n for n in self.active_adapters if n != name], []
        super().delete_adapter(name)

    # peft's wrapper's: the active copy's name (none active: an empty list)
    active_adapter = property(lambda self: self.active_adapters[0] if self.active_adapters else [])

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if unknown := [n for n in names if n not in self.modules_to_save]:  # (peft's wrapper's words)
            raise ValueError(f"Adapter {unknown[0]} not found in {set(self.modules_to_save)}")
        super().set_adapter(names, inference_mode)

    def check_active(self, names: list[str], path: str) -> None:
        if len(held := [n for n in names if n in self.modules_to_save]) > 1:  # as PEFT's ModulesToSaveWrapper refuses
            raise ValueError(_several_copies(held, repr(path)))

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        # PEFT saves the copy under the wrapped module's own name: "classifier.weight".
        return {k.removeprefix("modules_to_save."): v for k, v in super().adapter_parameters(name).items()}

    def _current(self, strict: bool = True) -> nn.Module:
        """The module that computes: the active adapter's copy (several active ones cannot add up: ValueError
        unless not ``strict``, which gives the first), else the original."""
        if self.disabled or not self.active_adapters:
            return self.original_module
        if strict and len(self.active_adapters) > 1:  # several active to train in mixed batches: rows pick one
            raise ValueError(_several_copies(self.active_adapters, type(self.original_module).__name__))
        return self.modules_to_save[self.active_adapters[0]]

    def forward(self, *args, **kwargs):
        if self.row_adapters is None or self.disabled:
            return self._current()(*args, **kwargs)
        return self._routed(*args, **kwargs)

    def _routed(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each row through its adapter's copy (the original for BASE_ROW or an adapter without a copy here), with
        its rows of every argument that has them (``_rows_of``: a decoder block's mask, positions)."""
        parts, order = [], []
        for name, rows in self.row_adapters.groups(x.shape[0], x.device):
            own = name in self.modules_to_save  # nn.ModuleDict has no .get
            module = self.modules_to_save[name] if own else self.original_module
            if rows is None:
                return module(x, *args, **kwargs)
            cut = {k: self._rows_of(v, rows, x.shape[0], k) for k, v in (*enumerate(args), *kwargs.items())}
            positional = [cut.pop(i) for i in range(len(args))]
            out = module(x.index_select(0, rows), *positional, **cut)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"mixed-adapter batches need {type(module).__name__} to return a tensor")
            parts.append(out)
            order.append(rows)
        # Rows come out grouped by adapter; put them back in batch order.
        return torch.cat(parts).index_select(0, torch.cat(order).argsort())

    def _rows_of(self, value: Any, rows: torch.Tensor, batch: int, where: int | str) -> Any:
        """Argument ``where`` (``value``) for ``rows``: tensors of 2+ dimensions whose first is the ``batch`` cut (1-D
        ones, e.g. cache positions, every row shares), in tuples and lists too; ValueError for any other object (a
        key-value cache, which every row would share and the module writes into)."""
        if isinstance(value, torch.Tensor):
            return value.index_select(0, rows.to(value.device)) if value.dim() > 1 and len(value) == batch else value
        if type(value) in (tuple, list):
            return type(value)(self._rows_of(v, rows, batch, where) for v in value)
        if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
            return value
        raise ValueError(
            f"a mixed-adapter batch cannot split argument {where!r} of {type(self.original_module).__name__} "
            f"(modules_to_save), a {type(value).__name__} every row shares; call with use_cache=False, or one adapter"
        )

    # nothing to fold (named or not, as every layer's merge / unmerge): the copy replaces the original on unwrap
    merge = unmerge = lambda self, *args, **kwargs: None

    def unwrap(self) -> nn.Module:
        return self._current()

    def __getattr__(self, name: str):
        # Code that reads attributes of the wrapped module (``model.score.weight``, ``out_features``) still works.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._current(strict=False), name)


def _several_copies(names: list[str], module: str) -> str:
    return (
        f"adapters {names[0]!r} and {names[1]!r} each have their own copy of {module} (modules_to_save), which "
        "replaces the module, so they cannot act together: make one active, or give each row its own adapter "
        "with adapter_names=[...]"
    )


class DequantizedLinear(nn.Linear):
    """The plain layer a 4-bit layer's ``dequantize()`` gives, which a merge writes into (``_dequantize_base``): W in
    the 4-bit layer's compute dtype, computing as that layer did (input cast to W's dtype, output back to the input's),
    so a model merged in place runs as before, whatever its other weights' dtype. ``unpack(dtype)``: the plain
    ``nn.Linear`` in ``dtype`` (``unpack_frozen_layers``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)

    def unpack(self, dtype: torch.dtype | None = None) -> nn.Module:
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        for name in ("weight", "bias"):
            if (p := getattr(self, name)) is not None:
                setattr(plain, name, nn.Parameter(p.detach().to(dtype or p.dtype), requires_grad=p.requires_grad))
        return plain.train(self.training)


def unpack_frozen_layers(model: nn.Module) -> list[str]:
    """Replace each packed frozen layer, one offering ``unpack(dtype)`` (QLoRA's 4-bit linear layer, or one merged
    into and dequantised, a ``DequantizedLinear``), by the plain layer it stands for, its weight in the dtype of
    the model's other floating-point weights, so that transformers can save and load the model. Returns their paths.
    """
    packed = [(n, m) for n, m in model.named_modules() if callable(getattr(m, "unpack", None))]
    own = {id(p) for _, m in packed for p in m.parameters()}
    others = (p.dtype for p in model.parameters() if id(p) not in own and p.is_floating_point())
    dtype = next(others, torch.float32)
    for path, module in packed:
        set_submodule(model, path, module.unpack(dtype))
    return [n for n, _ in packed]


def unwrapped_name(name: str) -> str:
    """A base parameter's name as in the plain model: without the ``base_layer.`` of the deltatune layers around its
    module, which other adapters add and remove (``k_proj.base_layer.bias`` is ``k_proj.bias``)."""
    return re.sub(r"(\.base_layer)+\.", ".", name)


def base_parameters(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Parameter]:
    """The parameters of ``model`` with these unwrapped names (``unwrapped_name``), keyed by their current names."""
    wanted = set(names)
    return {n: p for n, p in model.named_parameters() if unwrapped_name(n) in wanted}


def check_not_shared(model: nn.Module, layers: list[DeltaLayer]) -> None:
    """Refuse to merge into a layer whose weight another module shares (tied input and output embeddings), unless
    the layer says each sharer computes with what the merge writes (``merge_agrees_with(other)``: trainable tokens'
    rows, read by a tied output embedding that holds none of its own, as peft)."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for layer in layers:
        weight = getattr(getattr(layer, "base_layer", None), "weight", None)
        shared = owners.get(id(weight), []) if isinstance(weight, torch.Tensor) else []
        others = [m for m in map(lambda n: _holder(model, n), shared) if m is not layer]
        if len(shared) > 1 and not (hasattr(layer, "merge_agrees_with") and all(map(layer.merge_agrees_with, others))):
            raise ValueError(
                f"cannot merge into {shared[0]}: the same weight is {', '.join(shared[1:])} (tied embeddings, or "
                "copies of one layer made by layer_replication), which merging would change too. Untie them (a base "
                "loaded with tie_word_embeddings=False and a copied output weight), or keep the adapter unmerged"
            )


def _holder(model: nn.Module, parameter: str) -> nn.Module:
    """The module that holds ``parameter`` (a dotted name), the adapter layer around it where one wraps it."""
    path = parameter.rpartition(".")[0]
    while path.endswith(".base_layer") or path == "base_layer":
        path = path.removesuffix("base_layer").removesuffix(".")
    return model.get_submodule(path)
