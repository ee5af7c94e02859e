"""DeltaModel: a base model plus named adapters of any registered method.

It injects, switches, disables, merges, saves and loads through the registry and the DeltaLayer protocol
(deltatune.layer), with no per-method branches. ``forward`` and ``generate`` pass through to the base model;
attributes it does not have are read from the base model, so a DeltaModel can stand where the transformers model stood
(Trainer, pipelines, ``model.config``). Files use PEFT's layout: ``adapter_config.json`` +
``adapter_model.safetensors`` per adapter, the "default" adapter at the top of the folder and any other in a
sub-folder of its own name.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from . import adapter_io, loss, registry, status
from . import healthcheck as health
from .calls import call_batch_size, call_sizes
from .config import DeltaConfig, json_fields
from .files import PushToHub, check_adapter_name, upcast_adapter
from .layer import (
    BASE_ROW,
    DeltaLayer,
    ModulesToSave,
    RowAdapters,
    base_parameters,
    check_not_shared,
    enable_checkpointing,
    quiet_deletes,
    replace_module,
    unpack_frozen_layers,
    unwrapped_name,
)
from .targets import add_modules_to_save, from_file


class DeltaModel(nn.Module, PushToHub):
    """A frozen base model with one or more named adapters.

    Args:
        model: any ``transformers.PreTrainedModel`` (or ``nn.Module`` for methods that only need module names).
        config: the first adapter's config, or None to wrap with no adapter yet.
        adapter_name: the first adapter's name.
        fused_loss: on a causal LM with transformers' default loss, compute the cross-entropy with
            ``deltatune.loss.causal_lm_loss`` (same loss, gradient written in the forward pass: less time and memory
            for large vocabularies); removed again on unload. Off by default: the library leaves the user's model
            as it is; deltatune's trainers turn it on for the runs they own.
    """

    def __init__(
        self,
        model: nn.Module,
        config: DeltaConfig | None = None,
        adapter_name: str = "default",
        *,
        fused_loss: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(model, DeltaModel):
            raise TypeError("model is already a DeltaModel; use add_adapter to add another adapter")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (e.g. a transformers model), got {type(model).__name__}")
        self.base_model = model
        self.peft_config: dict[str, DeltaConfig] = {}
        self.active_adapters: list[str] = []
        self._base_trainables: dict[str, list[str]] = {}  # adapter -> base parameters it trains and saves
        self._copies: dict[str, list[str]] = {}  # adapter -> base parameters its file held copies of (saved again)
        if config is not None:
            self.add_adapter(adapter_name, config)
        if fused_loss:
            loss.install(model)

    # -- pass-through --------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward. ``adapter_names=[...]`` (one name per row, ``"__base__"`` for the plain base
        model) makes each row of the batch compute with its own adapter instead of the active ones, in inference
        and in training (each row's gradient reaches only its adapter); see ``mixed_batch``."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        with self.mixed_batch(adapter_names, call_batch_size(args, kwargs), call_sizes(args, kwargs, model=self)):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's generate; ``adapter_names=[...]`` as in ``forward`` (beams follow their row)."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            return self.base_model.generate(*args, **kwargs)
        with self.mixed_batch(adapter_names, call_batch_size(args, kwargs), call_sizes(args, kwargs, self.base_model)):
            return self.base_model.generate(*args, **kwargs)

    @contextmanager
    def mixed_batch(self, adapter_names: list[str], batch_size: int | None = None, sizes=None) -> Iterator[None]:
        """Within the block row i of every batch computes with adapter ``adapter_names[i]`` alone.

        ``"__base__"`` rows compute as the base model. Only active adapters train (their parameters require grad).
        A layer seeing each row repeated k times in place (generate's beams) repeats the names alike; one seeing
        a first dimension not in ``sizes`` (a set: the call's tensors', from forward and generate) is refused.

        Raises:
            TypeError: ``adapter_names`` is not a list of strings.
            ValueError: an unknown name; a length other than ``batch_size``; an adapter merged into the base
                weights (unmerge first); inside ``disable_adapter``; gradient checkpointing while training; or an
                adapter whose method cannot route rows (token methods, or methods that train the base in place).
        """
        names = status.check_rows(self, adapter_names, batch_size)
        layers = [layer for _, layer in self._layers()]
        saved = [(layer, layer.row_adapters, layer.disabled) for layer in layers]
        rows = RowAdapters(names, sizes)
        try:
            for layer in layers:
                layer.row_adapters = rows  # one that cannot route rows holds none of these (checked): computes as base
                layer.disabled = layer.disabled or not layer.supports_row_adapters
            yield
        finally:
            for layer, previous, disabled in saved:
                layer.row_adapters = previous
                layer.disabled = disabled

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
        try:
            return getattr(self.base_model, name)
        except AttributeError:
            # A method's functions on the model (its MODEL_FUNCTIONS), which the registry finds: no method named here
            function = registry.model_function(name) if not name.startswith("_") else None
            if function is None:
                raise
            return functools.partial(function, self)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """torch's full state dict; the plain ``transformers.Trainer``'s save is refused (use ``deltatune.Trainer``)."""
        caller = sys._getframe(1)
        if caller.f_code.co_name == "_save" and caller.f_globals.get("__name__") == "transformers.trainer":
            raise TypeError(
                "deltatune: transformers.Trainer cannot save a DeltaModel (it would write the whole model's state "
                "dict); use deltatune.Trainer, a drop-in subclass that saves the adapter"
            )
        return super().state_dict(*args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        # TRL's trainers put a fused LM head on the model they are given, where they expect a transformers model
        code = getattr(getattr(value, "__func__", None), "__code__", None) if name == "forward" else None
        if code is not None and f"{os.sep}trl{os.sep}" in code.co_filename:
            raise TypeError(
                "deltatune: TRL's trainers know only peft's model class and would patch the DeltaModel wrapper; use "
                "deltatune.trl_trainer(SFTTrainer) (or DPOTrainer, ...), which patches the base and saves the adapter"
            )
        super().__setattr__(name, value)

    def get_base_model(self) -> nn.Module:  # the wrapped model (with the adapter layers in it)
        return self.base_model

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **options) -> None:
        """Turn on the base model's activation checkpointing, non-reentrant unless asked otherwise (the reentrant one
        needs the frozen embedding's outputs to require grad); ``options`` (transformers' ``every_n_layers``,
        ``offload``) pass through. ``gradient_checkpointing_enable`` is peft's name."""
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        enable_checkpointing(self.base_model, kwargs, **options)
        if kwargs["use_reentrant"] and hasattr(self.base_model, "enable_input_require_grads"):
            self.base_model.enable_input_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **options) -> None:
        """peft's name (and transformers' old one) for :meth:`activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **options)

    # -- adapters --------------------------------------------------------------------------------------
    @property
    def active_adapter(self) -> str:
        """The first active adapter's name (PEFT's attribute)."""
        if not self.active_adapters:
            raise ValueError("no adapter is active")
        return self.active_adapters[0]

    def _layers(self) -> list[tuple[str, DeltaLayer]]:
        return [(n, m) for n, m in self.base_model.named_modules() if isinstance(m, DeltaLayer)]

    def add_adapter(
        self,
        adapter_name: str,
        config: DeltaConfig | None = None,
        low_cpu_mem_usage: bool = False,
        *,
        peft_config: DeltaConfig | None = None,
        autocast_adapter_dtype: bool = False,
        _tensors: dict | None = None,
        _source: str = "",
        _heads: bool = True,
    ) -> None:
        """Inject a new adapter. The first adapter becomes active; later ones wait for ``set_adapter``.
        ``autocast_adapter_dtype=True`` (peft's default) keeps a float16 / bfloat16 base's adapter layers in float32.
        ``low_cpu_mem_usage`` (peft's, third as in peft) is accepted; the initial weights are drawn as usual.
        ``peft_config=`` is peft's name for ``config`` (``add_adapter(adapter_name=..., peft_config=...)``).

        Raises:
            ValueError: an adapter named ``adapter_name`` exists.
            ConfigError: the config does not fit the model (e.g. target_modules match nothing).
            AdapterLoadError: (when loading) the saved tensors do not fit. In every case the model is unchanged.
        """
        if (config is None) == (peft_config is None):
            raise TypeError("add_adapter takes one config: config= (or peft's name for it, peft_config=)")
        config = _from_peft(config if peft_config is None else peft_config)
        if not isinstance(config, DeltaConfig):
            raise TypeError(f"config must be a DeltaConfig (a method's config class), got {type(config).__name__}")
        check_adapter_name(adapter_name)
        if adapter_name == BASE_ROW:
            raise ValueError(f"adapter name {BASE_ROW!r} is reserved for base-model rows in mixed batches")
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} exists already; delete it or choose another name")
        status.check_bias(self.peft_config, adapter_name, config)  # (peft's rule: one adapter trains the biases)
        method = registry.method_of(config)
        grads = {p: p.requires_grad for p in self.base_model.parameters()}
        kept = status.base_tensors(self)  # (a refusal of weights trained in place after an init rewrote the base)
        config = config.replace()  # our own copy: the caller's object is never changed
        undo = getattr(method.module, "PREPARE", lambda *_: lambda: None)(self.base_model, config)  # reshape first
        try:
            # Heads first: a module trained in full is no target (PEFT's order), so the first adapter sees the model
            # as every later one does, with the head already wrapped.
            # a file names its own heads; inject_adapter_in_model adds none (task_type is a PeftModel's, as peft's)
            # a saved config's names this model lacks are passed over (kept in the config), as peft loads such a file
            names = [n for n, _ in self.base_model.named_modules()]
            present = [t for t in config.modules_to_save or [] if any(n.endswith(t) for n in names)]
            heads = config if _tensors is None else config.replace(modules_to_save=present or None)
            add_modules_to_save(self.base_model, adapter_name, heads, heads=_heads and _tensors is None)
            with from_file() if _tensors is not None else nullcontext():  # (a file's targets: read as it trained)
                method.inject(self.base_model, config if _tensors is None else config.for_loading(), adapter_name)
            self.peft_config[adapter_name] = config
            # Unwrapped names: later adapters may wrap (or unwrap) the modules that hold these parameters.
            trained = config.trainable_base_parameters(self.base_model)
            self._base_trainables[adapter_name] = list(map(unwrapped_name, trained))
            status.check_shared_base(self, adapter_name)  # (base weights trained in place: one set too)
            if _tensors is not None:
                self._import(adapter_name, _tensors, _source)
        except BaseException:
            self._remove(adapter_name)
            undo()  # the model's own structure back (a method's PREPARE, e.g. stacked copies of its layers)
            for p, flag in grads.items():
                p.requires_grad_(flag)
            status.put_back(kept)
            raise
        if not self.active_adapters:
            self.active_adapters = [adapter_name]
        status.apply_active(self, keep=True, new=adapter_name)
        status.train_modes(
            self, [adapter_name] if config.inference_mode else [], True
        )  # (others' modes kept: peft 0.22)
        if autocast_adapter_dtype:
            upcast_adapter([layer for _, layer in self._layers()], adapter_name)

    def _remove(self, adapter_name: str) -> None:
        """Delete an adapter everywhere (quietly); layers left with no adapter give back their original module."""
        for path, layer in reversed(self._layers()):
            if adapter_name in layer.adapter_names or not layer.adapter_names:
                with quiet_deletes():
                    layer.delete_adapter(adapter_name)
                if not layer.adapter_names:
                    original = layer.original_module if isinstance(layer, ModulesToSave) else layer.unwrap()
                    replace_module(self.base_model, path, original)
        self.peft_config.pop(adapter_name, None)
        self._base_trainables.pop(adapter_name, None)
        self._copies.pop(adapter_name, None)
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from the model; when it was active, peft's choice becomes active (``status.delete``), with
        peft's warning when it was the only one. ValueError: another adapter ``uses`` it, or it is merged (unmerge
        first, as PEFT)."""
        self._check_names([adapter_name])
        if any(adapter_name in names for _, names in self._merged()):
            raise ValueError(f"adapter {adapter_name!r} is merged into the base weights; unmerge_adapter() first")
        if users := [n for n, c in self.peft_config.items() if adapter_name in c.uses()]:
            raise ValueError(f"adapter {adapter_name!r} is used by {users[0]!r} ({self.peft_config[users[0]].method}); "
                             f"delete {users[0]!r} first")  # fmt: skip
        status.delete(self, adapter_name)

    def _check_names(self, names: str | list[str], together: bool = False) -> list[str]:
        """``names`` (a name or a list) as a list of this model's adapters (that every layer lets act ``together``)."""
        listed = [names] if isinstance(names, str) else names
        if not isinstance(listed, (list, tuple)) or not all(isinstance(n, str) for n in listed):
            raise TypeError(f"adapter names must be a name or a list of names, got {names!r}")
        for name in listed:
            if name not in self.peft_config:
                known = ", ".join(self.peft_config) or "none"
                raise ValueError(f"unknown adapter {name!r}; adapters in this model: {known}")
        for path, layer in self._layers() if together else []:
            layer.check_active(list(dict.fromkeys(listed)), path)
        return list(listed)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make one adapter (or several, whose outputs add up) the active one(s). Only active adapters train.

        As peft's: the active adapters' parameters then require grad, one loaded for inference (``load_adapter(
        is_trainable=False)``) too, unless ``inference_mode=True`` freezes them (their dropout then in eval mode, as peft
        0.22); the others are frozen. A merged model is unmerged first, with peft's warning (a merged adapter acts
        through the base weights, and could not train); ``merge_adapter`` merges the new ones."""
        names = list(dict.fromkeys(self._check_names(adapter_name)))  # once each: twice counted twice unmerged
        if not names:
            raise ValueError("set_adapter needs at least one adapter name (disable_adapter() computes as the base)")
        if not isinstance(inference_mode, bool):
            raise TypeError(f"inference_mode must be True or False, got {inference_mode!r}")
        if any(merged for _, merged in self._merged()):  # as peft, whichever adapters: a merged one would not train
            warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.", stacklevel=2)
            self.unmerge_adapter()
        self.active_adapters = names
        status.apply_active(self, inference_mode=inference_mode)  # (the active ones' dropout modes too: peft 0.22)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """peft's: turn the named adapters' parameters' ``requires_grad`` on (or off), active or not (``status``)."""
        status.set_requires_grad(self, adapter_names, requires_grad)

    def enable_adapter_layers(self) -> None:
        """peft's: every layer acts again; the active adapters' parameters train (``status.enable_layers``)."""
        status.enable_layers(self, True)

    def disable_adapter_layers(self) -> None:
        """peft's: the model computes as the base model until ``enable_adapter_layers``; merged adapters are
        unmerged, no adapter parameter trains (``disable_adapter`` is the block form)."""
        status.enable_layers(self, False)

    @property
    def modules_to_save(self) -> set[str] | None:
        """peft's: the ``modules_to_save`` of every adapter's config together, None when none has any. A task type's
        head is the module the model has (peft lists both of its guesses, ``classifier`` and ``score``)."""
        names = {n for c in self.peft_config.values() for n in getattr(c, "modules_to_save", None) or ()}
        return names or None

    @property
    def has_active_enabled_adapter(self) -> bool:
        """peft's: some adapter is active and the layers are not disabled (by ``disable_adapter`` or
        ``disable_adapter_layers``; peft's answers True after the latter, a flag it does not read)."""
        layers = [layer for _, layer in self._layers()]
        return bool(self.active_adapters) and not (layers and all(layer.disabled for layer in layers))

    @property
    def active_peft_config(self) -> DeltaConfig:
        """The first active adapter's config (peft's)."""
        return self.peft_config[self.active_adapter]

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes as the base model (merged adapters are unmerged meanwhile, and merged
        again after it: peft's stay unmerged after a forward in its block, so its merged adapters that are not active
        stop counting; tests/test_matrix.py pins this one)."""
        with self._unmerged(), status.adapters_frozen(self):
            saved = [(layer, layer.disabled) for _, layer in self._layers()]  # nested blocks: each restores its own
            for layer, _ in saved:
                layer.disabled = True
            try:
                yield
            finally:
                for layer, was in saved:
                    layer.disabled = was

    @contextmanager
    def _unmerged(self, into: Iterable[torch.Tensor] | None = None) -> Iterator[None]:
        """Within the block no adapter is merged (none merged ``into`` those tensors); merged again after it."""
        ids = None if into is None else {id(t) for t in into}  # only those: unmerge + merge rounds a bf16 weight
        merged = [(lay, n) for lay, n in self._merged() if ids is None or any(id(p) in ids for p in lay.parameters())]
        records = [layer.merge_record() for layer, _ in merged]  # each merge redone as it was made (its scale, say)
        for layer, name in [(layer, name) for layer, names in merged for name in reversed(names)]:
            layer.unmerge(name)
        try:
            yield
        finally:
            for (layer, names), record in zip(merged, records):
                for name in names:
                    layer.merge_again(name, record)

    def _merged(self) -> list[tuple[DeltaLayer, list[str]]]:
        return [(layer, list(layer.merged_adapters)) for _, layer in self._layers() if layer.merged_adapters]

    # -- merging ----------------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the active (or the named) adapters into the base weights (no names: each layer's own active ones, as
        peft's). Idempotent. A disabled layer (``disable_adapter_layers``) is merged too and unmerges itself at its next
        forward while disabled, as peft's.

        Raises:
            TypeError: a method whose math cannot be merged (e.g. a token method; tried first); nothing is merged.
            ValueError: a layer to merge shares its weight with another module (tied input and output embeddings),
                which merging would change too; with ``safe_merge`` (PEFT's), a merged weight not finite. Nothing merged.
        """
        names = self._check_names(self.active_adapters if adapter_names is None else adapter_names, together=True)
        names = list(dict.fromkeys(names))  # once each: a name listed twice is merged once, not warned about as merged
        own = [(m, m.active_adapters if adapter_names is None else names) for _, m in self._layers()]
        take = {id(m): [n for n in ns if n in m.adapter_names] for m, ns in own}  # (as peft's layers merge)
        layers = [m for _, m in self._layers() if take[id(m)]]
        check_not_shared(self.base_model, layers)
        for layer in layers:  # a layer type's own refusals (a bias to merge into a base without one), before any write
            for check in getattr(layer, "merge_checks", ()):
                for name in take[id(layer)]:
                    check(layer, name)
        for layer in layers if safe_merge else []:  # every layer tried (and undone) before any is merged
            layer.check_merge(take[id(layer)])
        done = self._merged()
        try:  # layers of methods that cannot merge first: they refuse before a weight is written (unmerging rounds)
            for layer in sorted(layers, key=lambda m: type(m)._merge_weights is not DeltaLayer._merge_weights):
                for name in take[id(layer)]:
                    layer.merge_as(name, safe_merge)
                status.unmerge_at_next_forward(layer)
        except TypeError:  # this call's merges taken off (the last ones each layer holds); earlier ones stay
            before = {id(layer): merged for layer, merged in done}
            for layer in layers:
                for name in reversed([n for n in layer.merged_adapters if n not in before.get(id(layer), ())]):
                    layer.unmerge(name)
            raise

    def unmerge_adapter(self, force_reshard: bool = False) -> None:
        """Undo every merge, restoring the base weights (``force_reshard``: peft 0.22's, for FSDP2 shards; none here)."""
        for _, layer in self._layers():
            for name in reversed(list(layer.merged_adapters)):
                layer.unmerge(name)

    def merge_and_unload(self, adapter_names: list[str] | None = None, *, progressbar: bool = False,
                         safe_merge: bool = False, dequantize: bool = True) -> nn.Module:  # fmt: skip
        """Merge the active (or named) adapters and return the plain base model with no deltatune module left.

        The returned model holds the merged weights (and the adapter's copies of modules_to_save); save it with
        ``save_pretrained`` and load it with plain transformers. This DeltaModel is empty afterwards.

        A 4-bit base (``deltatune.quantize``) comes back in full precision, every layer, adapted or not
        (``dequantize=False`` keeps the unadapted ones in 4 bits, which transformers cannot save);
        ``deltatune.merge_quantized`` also measures the error the merge made, or quantises the result again.
        ``safe_merge``, ``progressbar`` (ignored) and ``adapter_names=[]`` (merging none) as in PEFT.
        """
        names = self._check_names(self.active_adapters if adapter_names is None else adapter_names)
        own = adapter_names is None  # each layer's own active adapters, a head's own copy too (peft)
        for path, head in [(p, x) for p, x in self._layers() if isinstance(x, ModulesToSave)]:
            head.check_active(head.active_adapters if own else names, path)  # two copies of one head: refused first
        self.merge_adapter(adapter_names, safe_merge)  # (None: each layer's own; after disable_adapter_layers too)
        for _, layer in self._layers():  # a head trained in full: the merged adapter's copy, else the original (peft)
            layer.set_adapters(layer.active_adapters if own and isinstance(layer, ModulesToSave) else names)
            layer.disabled = False  # (after disable_adapter_layers too, as peft)
        model = adapter_io.untie_diverged(self._unload())  # peft's: diverged embeddings untied in the config
        if dequantize:
            unpack_frozen_layers(model)
        return model

    def unload(self) -> nn.Module:
        """Remove every adapter without merging; returns the base model with its original weights, a module trained in
        full (``modules_to_save``) too: its original, as peft 0.22 (0.21: the active copy; merge_and_unload keeps it)."""
        self.unmerge_adapter()
        for _, layer in self._layers():
            layer.set_adapters([])
        return self._unload()

    def _unload(self) -> nn.Module:
        for path, layer in reversed(self._layers()):
            replace_module(self.base_model, path, layer.unwrap())
        loss.uninstall(self.base_model)
        self.peft_config.clear()
        self.active_adapters = []
        self._base_trainables.clear()
        self._copies.clear()
        return self.base_model

    # -- saving and loading (deltatune/adapter_io.py: PEFT's files and state dicts) -----------------------
    adapter_state_dict = adapter_io.adapter_state_dict
    _import = adapter_io.import_tensors
    save_pretrained = adapter_io.save_pretrained
    create_or_update_model_card = adapter_io.create_or_update_model_card
    load_adapter = adapter_io.load_adapter
    load_adapter_weights = adapter_io.load_adapter_weights

    def _base_params(self, name: str) -> dict[str, nn.Parameter]:
        return base_parameters(self.base_model, self._base_trainables.get(name, []))

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike[str], adapter_name: str = "default",
                        is_trainable: bool = False, config: DeltaConfig | None = None,
                        autocast_adapter_dtype: bool = False, ephemeral_gpu_offload: bool = False,
                        low_cpu_mem_usage: bool = False, key_mapping: dict[str, str] | None = None,
                        **kwargs: Any) -> DeltaModel:  # fmt: skip
        """Wrap ``model`` and load the adapter saved at ``model_id`` (see ``load_adapter``, which documents the other
        arguments; peft's positional order); ``config`` (peft's) is used instead of the folder's
        ``adapter_config.json`` (the caller's object is left unchanged)."""
        config = _from_peft(config)
        if config is not None and not isinstance(config, DeltaConfig):
            raise ValueError(f"config must be a DeltaConfig (a method's config class), got {type(config).__name__}")
        wrapped = cls(model)
        options = dict(autocast_adapter_dtype=autocast_adapter_dtype, ephemeral_gpu_offload=ephemeral_gpu_offload,
                       low_cpu_mem_usage=low_cpu_mem_usage, key_mapping=key_mapping)  # fmt: skip
        wrapped.load_adapter(model_id, adapter_name, is_trainable=is_trainable, _config=config,
                             _caller="from_pretrained", **options, **kwargs)  # fmt: skip
        return wrapped

    # -- status (peft's fields and values: status.py; peft 0.22's healthcheck: healthcheck.py) -------------
    get_layer_status = status.layer_status  # peft's: each adapter layer's status (status.TunerLayerStatus)
    get_model_status = status.model_status  # peft's: the model's adapter status summed up (status.TunerModelStatus)
    healthcheck = health.healthcheck
    print_healthcheck = health.print_healthcheck

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), counting each shared tensor once."""
        return status.count_parameters(self)

    def print_trainable_parameters(self) -> None:
        """Print trainable and total parameter counts, as PEFT does."""
        trained, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trained:,d} || all params: {total:,d} || trainable%: {100 * trained / total:.4f}")


def _from_peft(config: Any) -> Any:
    """A peft config object (one of peft's config classes) as deltatune's, read from the adapter_config.json it would
    save (its ``to_dict`` through ``config.json_fields``: paths as strings, sets as lists), so peft's calls run as
    written; anything else as given."""
    if type(config).__module__.split(".")[0] != "peft" or not callable(getattr(config, "to_dict", None)):
        return config
    source = f"peft's {type(config).__name__}"
    return registry.config_from_dict(json_fields(config.to_dict(), source), source=source)


def get_delta_model(
    model: nn.Module,
    config: DeltaConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = False,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
    *,
    fused_loss: bool = False,
) -> DeltaModel:
    """Wrap ``model`` with a new adapter of the method ``config`` belongs to; the base is frozen. peft's
    ``get_peft_model`` positional order; ``fused_loss`` (see ``DeltaModel``) is keyword-only, so a call ported from
    peft with ``mixed`` fourth means ``mixed``.

    ``autocast_adapter_dtype=True``: peft's ``get_peft_model`` default, a float16 / bfloat16 base's adapter layers kept
    in float32 (their initial values the same as peft's); deltatune's default, False, keeps the base's dtype.
    ``mixed`` (peft's ``PeftMixedModel``, adapters of several methods in one model) is accepted: every DeltaModel may
    mix methods. ``revision`` (peft's: the base model's revision) is recorded in the config (``adapter_io.with_revision``).
    ``low_cpu_mem_usage`` (peft's: meta-device tensors for a load to fill) is accepted; the initial weights are drawn.
    Example::

        model = dt.get_delta_model(base, config)  # config: any method's, e.g. dt.<Method>Config(...)
    """
    for flag, value in (("mixed", mixed), ("low_cpu_mem_usage", low_cpu_mem_usage)):
        if not isinstance(value, bool):
            raise TypeError(f"get_delta_model: {flag} must be True or False, got {value!r}")
    config = adapter_io.with_revision(_from_peft(config), revision)
    wrapped = DeltaModel(model, config, adapter_name, fused_loss=fused_loss)
    if autocast_adapter_dtype:
        upcast_adapter([layer for _, layer in wrapped._layers()], adapter_name)
    return wrapped


def inject_adapter_in_model(
    peft_config: DeltaConfig,
    model: torch.nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> torch.nn.Module:
    """peft's ``inject_adapter_in_model``: the adapter's layers put into ``model`` itself (no wrapper), which is
    returned, its base parameters frozen and the adapter's trainable. A second call on the same model adds another
    adapter and makes it the active one (the earlier ones keep their ``requires_grad``, as peft's). ``get_peft_model_state_dict`` /
    ``set_peft_model_state_dict`` read and write the model's adapters, keyed by module path as peft's.

    ``low_cpu_mem_usage`` is accepted (the initial weights are drawn: the CPU has no meta-device saving to make).
    ``state_dict`` (peft's): its keys, not the config's ``target_modules``, say which modules get the adapter (its
    values are not loaded); the config records them (``adapter_io.targets_of_state_dict``).
    The config's ``task_type`` adds no head copy (peft's ``PeftModelFor...`` classes add those, this function does
    not); the modules the config's ``modules_to_save`` names are trained in full, as in peft.
    """
    peft_config = _from_peft(peft_config)
    if not isinstance(peft_config, DeltaConfig):
        raise TypeError(
            f"peft_config must be a DeltaConfig (a method's config class), got {type(peft_config).__name__}"
        )
    if state_dict is not None:
        peft_config = adapter_io.targets_of_state_dict(model, peft_config, state_dict)
    if isinstance(model, DeltaModel):
        raise TypeError("inject_adapter_in_model takes the plain model; use add_adapter on a DeltaModel")
    held = model.__dict__.get(adapter_io.INJECTED)
    if held is not None:  # as peft's new tuner: the new adapter active and trainable, every other flag as it was
        grads = {p: p.requires_grad for p in model.parameters()}
        held.add_adapter(adapter_name, peft_config, _heads=False)
        held.set_adapter(adapter_name)
        for p, flag in grads.items():
            p.requires_grad_(flag)
        return model
    wrapped = DeltaModel(model)
    wrapped.add_adapter(adapter_name, peft_config, _heads=False)
    model.__dict__[adapter_io.INJECTED] = wrapped  # a plain attribute: no submodule, so no cycle in the module tree
    model.__dict__.setdefault("peft_config", wrapped.peft_config)  # peft's tuner sets it on the model too
    return model
