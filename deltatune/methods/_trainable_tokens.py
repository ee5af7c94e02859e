"""Trainable tokens: LoRA's ``trainable_token_indices`` (peft 0.21.2's TrainableTokensLayer and its wrapper).

Only the listed rows of an embedding matrix E (vocab x d) train: each adapter keeps their values V (k x d) as a
parameter, started as E[ids] (so the model starts as the base), and the layer computes with E' = E with rows ``ids``
replaced by V (``index_copy``: the gradient reaches V only; E stays frozen). Merging writes V into E's rows and
unmerging writes the kept originals back. A list of ids adapts the input embedding; a dict {module name: ids} the
modules whose names end with each key (peft's matching): embeddings, or an untied output embedding (``lm_head``).
When the model ties its output embedding to the input one (``tie_word_embeddings``), the output layer gets a tied
layer that reads the input layer's V and ids: the logits see the trained rows too, and nothing of it is saved.

Saved as peft saves it: ``<prefix><embedding path>.token_adapter.trainable_tokens_delta`` (V; "delta" is peft's
name for the replacement rows). Where deltatune differs from peft, on purpose: a refusal (ConfigError) for ids out
of range, negative or repeated (peft fails with an IndexError, a RuntimeError, or not at all for repeats; no id at
all is none, as peft trains none: _tokens_files.py), and for a module that is not an embedding (peft takes any
nn.Linear, e.g. an o_proj, and treats its output features as tokens). An output embedding's bias is added, as peft 0.22 adds it (0.21's F.linear dropped it).
Two active adapters with disjoint ids compute together (peft's set_adapter refuses the pair; its layer computes them).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..layer import DeltaLayer, ModulesToSave, set_submodule
from ._tokens_files import empty, no_tokens

KEY = "token_adapter.trainable_tokens_delta"
"""An adapter's saved tensor, relative to its layer (peft's TrainableTokensWrapper layout)."""


class TrainableTokens(DeltaLayer):
    """An embedding (or output embedding) whose listed rows train, one set of rows per adapter.

    ``trainable_tokens_delta[name]`` holds an adapter's rows; ``tied[name]``, the layer whose rows a tied output
    embedding reads (nothing of its own: not saved, not counted)."""

    adapter_attrs = ("trainable_tokens_delta", "tied")
    supports_row_adapters = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.trainable_tokens_delta = nn.ParameterDict()
        self.trainable_tokens_original: dict[str, torch.Tensor] = {}  # E[ids] as the adapter found it, for unmerge
        self.token_indices: dict[str, list[int]] = {}
        self.tied: dict[str, TrainableTokens] = {}  # a plain dict: the source layer is not a child of this one
        self.saves_tied: set[str] = set()  # tied adapters whose rows this layer saves too (peft's TRAINABLE_TOKENS)
        self.keys: dict[str, str] = {}  # an adapter's saved key where it is not KEY (the stand-alone method's)

    @property
    def weight(self) -> torch.Tensor:
        """What the layer computes with, as peft shows it: LoRA's adapters (peft's TrainableTokensWrapper) give the
        base weight with their active rows written in (differentiable in V), unless disabled or merged (the base's
        own, rows merged in or not); the stand-alone method's (peft's TrainableTokensLayer) the base weight."""
        names = [n for n in self.active_adapters if n not in self.keys]
        if self.disabled or self.merged or self.row_adapters is not None or not names:
            return self.base_layer.weight
        return self.weight_with(names)

    def add(self, name: str, ids: list[int], init_weights: bool = True, key: str = KEY) -> None:
        """Adapter ``name`` trains rows ``ids``, started as the base's (peft's init_weights=True) or drawn from
        N(0, 1) (init_weights=False, as peft: ``torch.randn`` in the weight's dtype and device)."""
        weight = self.base_layer.weight
        originals = weight[ids].detach().clone()
        values = originals.clone() if init_weights else torch.randn(originals.shape, dtype=weight.dtype,
                                                                       device=weight.device)  # fmt: skip
        self.token_indices[name] = list(ids)
        self._keyed(name, key)
        self.trainable_tokens_delta[name] = nn.Parameter(values, requires_grad=True)
        self.trainable_tokens_original[name] = originals

    def tie(self, name: str, source: TrainableTokens, saved: bool = False, key: str = KEY) -> None:
        """Adapter ``name`` reads its rows from ``source`` (the input embedding this output embedding is tied to);
        ``saved``: its file holds them under this layer's key too (peft's stand-alone method writes the tied
        layer's view of the shared ParameterDict; LoRA's wrapper writes nothing for it)."""
        self.tied[name] = source
        self._keyed(name, key)
        if saved:
            self.saves_tied.add(name)

    def export_state(self, name: str, prefix: str) -> dict[str, torch.Tensor]:
        if name in self.tied:
            return {prefix + self.keys.get(name, KEY): self._rows(name)[1]} if name in self.saves_tied else {}
        return super().export_state(name, prefix)

    def import_state(self, name: str, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        if name not in self.tied:  # a tied layer's copy is its source's rows, which the source imports
            super().import_state(name, prefix, tensors)

    def merge_agrees_with(self, other: nn.Module) -> bool:
        """Whether this layer and ``other``, which hold one weight, compute with what a merge writes into it: both
        read one layer's rows (one is that layer, or both are tied to it: T5's encoder and decoder embeddings and its
        output embedding) and hold none of their own besides (with ids of their own, each would see the other's rows
        once merged: refused, where peft merges them)."""

        def root(a: nn.Module) -> nn.Module | None:  # the layer whose rows ``a`` computes with
            if not isinstance(a, TrainableTokens) or (a.trainable_tokens_delta and a.tied):
                return None
            sources = {id(s): s for s in a.tied.values()}
            return a if not sources else next(iter(sources.values())) if len(sources) == 1 else None

        return root(self) is not None and root(self) is root(other)

    def _rows(self, name: str) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """(ids, trained rows, original rows) of adapter ``name``, its own or its tied source's."""
        layer = self.tied.get(name, self)
        return layer.token_indices[name], layer.trainable_tokens_delta[name], layer.trainable_tokens_original[name]

    def _keyed(self, name: str, key: str) -> None:
        if key != KEY:
            self.keys[name] = key

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        rows = self.trainable_tokens_delta
        return {self.keys.get(name, KEY): rows[name]} if name in rows else {}

    # peft's get_layer_status names the TrainableTokensLayer (inside LoRA's wrapper), and shows a tied layer's rows
    peft_class = "TrainableTokensLayer"

    @property
    def status_suffix(self) -> str:
        return "" if self.keys and len(self.keys) == len(self.adapter_names) else ".token_adapter"

    def status_parameters(self, name: str) -> dict[str, nn.Parameter]:
        return {self.keys.get(name, KEY): self._rows(name)[1]}

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.token_indices.pop(name, None)
        self.trainable_tokens_original.pop(name, None)
        self.saves_tied.discard(name)
        self.keys.pop(name, None)

    def check_active(self, names: list[str], path: str) -> None:
        """peft's ``_check_overlapping_tokens``: adapters (with those merged) whose ids overlap cannot act together."""
        seen: set[int] = set()
        for name in dict.fromkeys([*self.merged_adapters, *(n for n in names if n in self.adapter_names)]):
            ids = set(self._rows(name)[0])
            if seen & ids:
                raise ValueError(f"Token indices of adapter {name} are already defined and would result in undefined "
                                 f"merging behavior. Only disjunct token indices are currently supported ({path})")  # fmt: skip
            seen |= ids

    def weight_with(self, names: list[str]) -> torch.Tensor:
        """The base weight with each adapter's rows written in (peft's get_merged_weights: differentiable in V)."""
        W = self.base_layer.weight
        for name in names:
            ids, rows, _ = self._rows(name)
            W = W.index_copy(0, torch.tensor(ids).to(W.device), rows.to(W))
        return W

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.row_adapters is not None and not self.disabled and not self.merged:
            return self._routed(x, *args, **kwargs)
        names = self.active_adapters
        if self.disabled or self.merged or not names:  # as peft: a merged layer computes as its weight alone
            return self.base_layer(x, *args, **kwargs)
        self.check_active(names, type(self.base_layer).__name__)
        return self._compute(x, names, *args, **kwargs)

    def _routed(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """A mixed-adapter batch: each row with its adapter's rows (the base for BASE_ROW or an adapter this layer
        does not hold), as peft's TrainableTokensWrapper._mixed_batch_forward."""
        parts, order = [], []
        for name, rows in self.row_adapters.groups(x.shape[0], x.device):
            part = x if rows is None else x.index_select(0, rows)
            held = name in self.adapter_names
            out = self._compute(part, [name], *args, **kwargs) if held else self.base_layer(part, *args, **kwargs)
            if rows is None:
                return out
            parts.append(out)
            order.append(rows)
        return torch.cat(parts).index_select(0, torch.cat(order).argsort())

    def _compute(self, x: torch.Tensor, names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """peft's lookup (or output projection) with E' (E with the adapters' rows written in). A lookup builds no E'
        (a vocab-size copy per call): the base's lookup with the listed tokens' rows swapped in, equal to the bit in
        values and gradients. An output projection builds it (logits bit-equal to peft's, which a separate product
        for the listed columns is not)."""
        base = self.base_layer
        if not isinstance(base, nn.Embedding):  # an output embedding (lm_head): its bias kept, unlike peft's
            return F.linear(x, self.weight_with(names), base.bias)
        plain = base.max_norm is None and not base.scale_grad_by_freq and not base.sparse
        if plain and all(base.padding_idx not in self._rows(n)[0] for n in names):
            out = self._swapped(x, F.embedding(x, base.weight, base.padding_idx), names)
        else:  # max_norm renorms the looked-up rows, the others scale or route gradients by E''s rows: as peft
            W = self.weight_with(names)
            out = F.embedding(x, W, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                              base.sparse)  # fmt: skip
        if (scale := getattr(base, "embed_scale", None)) is not None:  # Gemma's scaled embedding, as peft
            out = out * torch.as_tensor(scale, dtype=out.dtype, device=out.device)
        return out

    def _swapped(self, x: torch.Tensor, out: torch.Tensor, names: list[str]) -> torch.Tensor:
        """``out`` (the base's lookup of ``x``) with each listed token's vector its adapter's row."""
        ids = torch.tensor([i for n in names for i in self._rows(n)[0]], dtype=x.dtype, device=x.device)
        rows = torch.cat([self._rows(n)[1] for n in names]).to(out)
        ids, order = ids.sort()
        at = torch.searchsorted(ids, x).clamp_(max=len(ids) - 1)
        hit = ids[at] == x
        return torch.where(hit.unsqueeze(-1), rows[order[at]], out)

    def _merge_weights(self, name: str) -> None:
        ids, rows, _ = self._rows(name)
        weight = self.base_layer.weight
        weight.index_copy_(0, torch.tensor(ids, device=weight.device), rows.to(weight))

    def _unmerge_weights(self, name: str) -> None:
        ids, _, originals = self._rows(name)
        weight = self.base_layer.weight
        weight.index_copy_(0, torch.tensor(ids, device=weight.device), originals.to(weight))


def check_ids(ids: Any, where: str, label: str = "trainable_token_indices", integral: bool = False) -> list[int]:
    """``ids`` as a list of distinct token ids (ConfigError naming ``label``/``where`` otherwise); with ``integral``,
    numpy's integers too (peft takes them), returned as ints (the caller stores the result: JSON has no numpy)."""

    def kind(i: Any) -> bool:
        return isinstance(i, numbers.Integral) and not isinstance(i, bool) if integral else type(i) is int

    if not isinstance(ids, (list, tuple)) or not all(kind(i) for i in ids):
        raise ConfigError(f"{label}{where} must be a list of token ids (ints), got {ids!r}")
    ids = [int(i) for i in ids]
    if not ids:
        raise ConfigError(f"{label}{where} is empty; list the token ids to train")
    if len(set(ids)) < len(ids):
        twice = next(i for i in ids if ids.count(i) > 1)
        raise ConfigError(f"{label}{where} lists token id {twice} twice")
    return list(ids)


def check_indices(spec: Any, integral: bool = False) -> dict[str, list[int]] | list[int] | None:
    """``trainable_token_indices`` checked: None (and {}, [], {"embed_tokens": []}: peft's none; a dict's empty entries
    dropped), a list of token ids, or {module name: ids}; a ConfigError for anything else, a repeated id, no name."""
    if no_tokens(spec):
        return None
    if isinstance(spec, (list, tuple)):
        return check_ids(spec, "", integral=integral)
    if not isinstance(spec, dict):
        raise ConfigError(
            "trainable_token_indices must be a list of token ids or a dict {embedding module name: [token ids]}, "
            f"got {spec!r}"
        )
    for key in spec:
        if not isinstance(key, str) or not key:
            raise ConfigError(f"trainable_token_indices keys must be module names, got {key!r}")
    return {key: check_ids(ids, f"[{key!r}]", integral=integral) for key, ids in spec.items() if not empty(ids)}


def _tied_names(model: nn.Module, embedding: nn.Module | None, path: str) -> list[str]:
    """The modules whose weight is the input embedding's (at ``path``), where the model's config ties them (peft's
    ``_get_module_names_tied_with_embedding``: ``tie_word_embeddings`` False means no tying); the outermost of a
    module and the layers wrapped around it. Compared by the base parameter under any adapter layers: a token
    layer's ``.weight`` is a fresh tensor while its LoRA adapter is active (peft's wrapper's view)."""
    if embedding is None or not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return []
    weight, names = _plain(embedding).weight, []
    for n, m in model.named_modules():
        inside = n == path or n.startswith(path + ".") or any(n.startswith(t + ".") for t in names)
        if not inside and getattr(_plain(m), "weight", None) is weight:
            names.append(n)
    return names


def _plain(module: nn.Module) -> nn.Module:
    """The base module under the adapter layers wrapped around ``module``."""
    while isinstance(module, DeltaLayer) and isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def _check_target(model: nn.Module, path: str, module: nn.Module, ids: list[int], name: str, label: str,
                  at: Callable[[str], nn.Module]) -> None:  # fmt: skip
    """ConfigError unless ``module`` at ``path`` can train rows ``ids`` for adapter ``name`` (``at``: the module at a
    path once the layers about to go in are in)."""
    kind = type(module).__name__
    if isinstance(module, ModulesToSave) or (
        isinstance(module, DeltaLayer) and not isinstance(module, TrainableTokens)
    ):
        raise ConfigError(f"{label} cannot be applied to {path}, already adapted by {kind}")
    if any(isinstance(at(path[:i]), DeltaLayer) for i in range(len(path)) if path[i] == "."):
        raise ConfigError(f"{label} names {path}, a module inside an adapter layer; name the embedding")
    if isinstance(module, TrainableTokens):
        if name in module.adapter_names:
            raise ConfigError(f"{label} names {path} twice (two keys match it)")
        module = module.base_layer
    output = getattr(model, "get_output_embeddings", lambda: None)()
    if isinstance(module, nn.Embedding):
        if type(module).forward is not nn.Embedding.forward and not hasattr(module, "embed_scale"):
            raise ConfigError(f"{label}: {path} ({kind}) does not look up its input (a learned "
                              "positional embedding computes positions from it); name a token embedding")  # fmt: skip
    elif not (isinstance(module, nn.Linear) and (module is output or getattr(output, "base_layer", None) is module)):
        raise ConfigError(f"{label}: {path} is a {kind}, not an embedding; name the input embedding "
                          "(or an untied output embedding, lm_head)")  # fmt: skip
    if not module.weight.is_floating_point():
        raise ConfigError(f"{label}: {path} stores its weight as {module.weight.dtype}")
    rows = module.weight.shape[0]
    if bad := [i for i in ids if not 0 <= i < rows]:
        raise ConfigError(f"{label}: token id {bad[0]} is out of range for {path} ({rows} rows)")


def add_tokens(model: nn.Module, config: Any, adapter_name: str,
               adapting: dict[str, nn.Module]) -> Callable[[], list[nn.Module]]:  # fmt: skip
    """Check ``config.trainable_token_indices`` against the model as it will be once ``adapting`` ({path: the LoRA
    layer about to wrap it}) is in, and return the step that wraps the modules it names and adds adapter
    ``adapter_name`` to them (peft's ``set_additional_trainable_modules``: the input embedding, or each dict key;
    then the output embedding tied to it). So a refusal comes before any layer (and PiSSA's residual) goes in.

    Raises:
        ConfigError: see ``check_indices`` and ``_check_target``; a key that matches no module (peft's words); a key
            that is also in modules_to_save (peft's words).
    """
    spec = check_indices(config.trainable_token_indices)
    if spec is None:
        return list
    embedding = getattr(model, "get_input_embeddings", lambda: None)()
    paths = {m: n for n, m in model.named_modules()}
    if isinstance(spec, list):
        spec = {paths.get(embedding, "embed_tokens"): spec}
    for key in spec:
        if key in (config.modules_to_save or []):
            raise ConfigError("The embedding layer is already marked to be trained fully, either specify "
                              f"`modules_to_save=[..., \"{key}\", ...]` or `trainable_tokens={{'{key}': x}}` but not "
                              "both.")  # fmt: skip
    return plan_tokens(model, spec, adapter_name, adapting=adapting)


def place_tokens(*args: Any, **kwargs: Any) -> list[nn.Module]:
    """``plan_tokens``'s checks and its step at once."""
    return plan_tokens(*args, **kwargs)()


def plan_tokens(model: nn.Module, spec: dict[str, list[int]], adapter_name: str, label: str = "trainable_token_indices",
                init_weights: bool = True, save_tied: bool = False, saved_as: str = KEY,
                adapting: dict[str, nn.Module] | None = None) -> Callable[[], list[nn.Module]]:  # fmt: skip
    """The step that wraps the modules whose names end with each key of ``spec`` and adds adapter ``adapter_name``
    training the key's ids there; then ties the output embedding to the input one where the model ties them (LoRA's
    ``trainable_token_indices`` and the stand-alone method share this). ``label`` names the config field in the
    refusals; ``save_tied``: the tied layers save the rows under their own key too, and ``saved_as`` is the saved
    tensor's name in each layer (peft's stand-alone files: ``trainable_tokens_delta``, no wrapper). Everything is
    checked here, before the step, against the model with ``adapting`` ({path: a layer that will wrap it}) in."""
    adapting = adapting or {}

    def at(path: str) -> nn.Module:
        return adapting[path] if path in adapting else model.get_submodule(path)

    embedding = getattr(model, "get_input_embeddings", lambda: None)()
    emb_path = next((n for n, m in model.named_modules() if m is embedding), "")
    if isinstance(embedding, TrainableTokens):
        embedding = embedding.base_layer
    tied = _tied_names(model, embedding, emb_path)
    skip: set[str] = set()
    if len(spec) > 1 and tied:  # peft: a key for a tied module with the embedding's ids is left to the tying
        keys = [k for k in spec if emb_path.endswith(k) or any(t.endswith(k) or k in t.split(".") for t in tied)]
        if len(keys) >= 2 and all(spec[k] == spec[keys[0]] for k in keys):
            skip = set(keys) & set(tied)
        elif len(keys) >= 2:
            tied = []  # peft: different ids on tied layers, each trains its own rows, no tying
    plan: list[tuple[str, nn.Module, list[int]]] = []
    for key, ids in spec.items():
        if key in skip:
            continue
        found = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if n.endswith(key)]
        if not found:
            raise ConfigError(f"{label}: Target modules {{{key!r}}} not found in the base model. "
                              "Please check the target modules and try again.")  # fmt: skip
        for path, module in found:
            _check_target(model, path, at(path), ids, adapter_name, label, at)
            plan.append((path, module, ids))
    wraps_embedding = any(m is embedding or getattr(m, "base_layer", None) is embedding for _, m, _ in plan)
    tied = [t for t in tied if wraps_embedding and t not in {p for p, _, _ in plan}]
    for path in tied:
        if isinstance(module := at(path), DeltaLayer) and not isinstance(module, TrainableTokens):
            raise ConfigError(f"{label} cannot be tied to {path} (the output embedding), already "
                              f"adapted by {type(module).__name__}")  # fmt: skip

    def place() -> list[nn.Module]:
        layers: list[nn.Module] = []
        for path, module, ids in plan:
            layer = module if isinstance(module, TrainableTokens) else TrainableTokens(module)
            if layer is not module:
                set_submodule(model, path, layer)
            layer.add(adapter_name, ids, init_weights, saved_as)
            layers.append(layer)
        source = next(lay for lay in layers if lay.base_layer is embedding) if tied else None
        for path in tied:
            module = model.get_submodule(path)
            layer = module if isinstance(module, TrainableTokens) else TrainableTokens(module)
            if layer is not module:
                set_submodule(model, path, layer)
            layer.tie(adapter_name, source, save_tied, saved_as)
            layers.append(layer)
        return layers

    return place
