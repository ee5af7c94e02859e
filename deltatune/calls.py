"""What a forward or generate call's tensors say about its rows, for mixed-adapter batches: the batch size, and the
first dimensions a layer may route by row (images counted per row by their tokens, relative-position tables shared
by every row). ``DeltaModel`` asks before it sets ``row_adapters`` on its layers (layer.RowAdapters).

Split from layer.py in session 46 (layer.py was at its 600-line limit); above layer, since it finds the model's
DeltaLayers on relative-position tables.
"""

from __future__ import annotations

import inspect
import itertools
import re
from typing import Any

import torch
from torch import nn

from .layer import DeltaLayer


def call_batch_size(args: tuple, kwargs: dict) -> int | None:
    """The batch size of a forward / generate call: its input ids, embeddings, first positional argument (the ids of
    ``generate(input_ids, pixel_values=...)``, not the images), images, or first tensor argument."""
    for key in ("input_ids", "inputs_embeds"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key].shape[0]
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
        return args[0].shape[0]
    if isinstance(kwargs.get("pixel_values"), torch.Tensor):
        return kwargs["pixel_values"].shape[0]
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


class CallSizes(frozenset):
    """``call_sizes``' answer: first dimensions a layer may route; ``refused``: none may (why); ``shared``: layers."""

    def __new__(cls, sizes=(), refused: dict[int, str] | None = None, shared=()) -> CallSizes:
        self = super().__new__(cls, sizes)
        self.refused, self.shared = dict(refused or {}), list(shared)
        return self


IMAGE_KEYS = ("pixel_values", "image_", "video")  # beside text, the first dimension counts images, not rows
SHARED_TABLE = re.compile(r"rel(ative)?_")  # a module named so (relative_attention_bias): one table for every row


def call_sizes(
    args: tuple, kwargs: dict, generating: nn.Module | None = None, model: nn.Module | None = None
) -> CallSizes:
    """The first dimensions of a call's tensors, and for a generate call of model ``generating`` each times its
    expansion (beams, or returned sequences): the batch sizes the call's layers may see. Beside text rows (``input_ids`` / ``inputs_embeds``) image tensors (``IMAGE_KEYS``) count images: they route as
    rows only where every row holds the same number, k per row in order, told by the image tokens in ``input_ids``
    (the config of ``model``, or ``generating``, names the token); otherwise their first dimension is ``refused``.
    The model's layers on relative-position tables (``SHARED_TABLE``) are ``shared``.
    """
    model = generating if generating is not None else model
    ids = kwargs.get("input_ids", args[0] if args else None)
    ids = ids if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and ids.dim() == 2 else None
    text = ids if ids is not None else kwargs.get("inputs_embeds")
    sizes, refused = set(), {}
    positional = _parameter_names(model, len(args)) if generating is None else [None] * len(args)
    for index, (key, value) in enumerate([*zip(positional, args), *kwargs.items()]):
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue
        sizes.add(n := value.shape[0])
        if not isinstance(text, torch.Tensor) or value is text:
            continue
        why = _unnamed_unmapped(index, value, text.shape[0], ids, model, kwargs) if key is None else None
        if why or (key and (why := _images_unmapped(n, key, text.shape[0], ids, model))):
            refused[n] = why
    if generating is not None:
        # As transformers resolves each: the keyword, else the call's generation config's, else the model's, else 1.
        given = kwargs.get("generation_config") or _positional_config(args)
        configs = (given, getattr(generating, "generation_config", None))
        expand = max(
            next((v for v in (kwargs.get(k), *(getattr(c, k, None) for c in configs)) if v is not None), 1) or 1
            for k in ("num_beams", "num_return_sequences")
        )
        sizes |= {n * expand for n in sizes}
        refused |= {n * expand: why for n, why in refused.items()}
    shared = [] if model is None else [
        (re.sub(r"^base_model\.", "", path), m)
        for path, m in model.named_modules()
        if isinstance(m, DeltaLayer) and SHARED_TABLE.match(re.sub(r"(\.base_layer)+$", "", path).rpartition(".")[2])
    ]  # fmt: skip
    return CallSizes(sizes - refused.keys(), refused, shared)


def _parameter_names(model: nn.Module | None, n: int) -> list[str | None]:
    """The names of a forward call's first ``n`` positional arguments (``model(ids, pixel_values)``: its images are
    told apart by row as keyword ones are), from the base model's signature; None where it does not say."""
    if not n:
        return []  # (the signature is read only for positional calls: a keyword call, the server's, costs nothing)
    forward = getattr(getattr(model, "get_base_model", lambda: model)(), "forward", None)
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return [None] * n
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in itertools.takewhile(lambda p: p.kind in kinds, params)][:n]
    return names + [None] * (n - len(names))


def _unnamed_unmapped(
    index: int,
    value: torch.Tensor,
    rows: int,
    ids: torch.Tensor | None,
    model: nn.Module | None,
    kwargs: dict[str, Any] | None = None,
) -> str | None:
    """Why positional argument ``index``, a tensor the base's signature does not name (``forward(*args, **kwargs)``),
    cannot route: its first dimension is not the ``rows`` and does not map k per row as the images or videos the
    ids hold would; or, a float tensor of ``rows``, images those ids hold unevenly (LLaVA rows [2, 0]: 2 images for
    2 rows). None for a tensor of the rows (a mask, position ids) or one that maps as the call's images."""
    n, config = value.shape[0], getattr(model, "config", None)
    kinds = {"pixel_values": _token(config, "image"), "pixel_values_videos": _token(config, "video")}
    given = kwargs or {}  # (images the call passes by keyword: an unnamed tensor does not hold those)
    held = [key for key, token in kinds.items() if not isinstance(given.get(key), torch.Tensor)
            and ids is not None and token is not None and (ids == token).any()]  # fmt: skip
    if n == rows and (not value.is_floating_point() or not held):
        return None
    if held and all(_images_unmapped(n, key, rows, ids, model) is None for key in held):  # (maps as every kind)
        return None
    return (
        f"adapter_names routes {rows} rows but positional argument {index} (a tensor of first dimension {n}) has "
        "no name in the base model's forward signature (forward(*args, **kwargs)), so whether it holds rows or "
        "images cannot be told; pass it by keyword (pixel_values=..., attention_mask=...)"
    )


def _positional_config(args: tuple) -> object | None:
    """A generation config passed by position (``generate(input_ids, GenerationConfig(num_beams=2))``, transformers'
    second parameter): its expansion counts as a keyword one's."""
    return next((a for a in args[1:2] if hasattr(a, "num_beams") and hasattr(a, "num_return_sequences")), None)


def _images_unmapped(n: int, key: str, rows: int, ids: torch.Tensor | None, model: nn.Module | None) -> str | None:
    """Why the ``n`` images of image tensor ``key`` cannot be told apart by row (of ``rows``; ``ids`` the call's input
    ids); None for any other tensor, or when every row holds the same number of them (k per row, in order)."""
    if not key.startswith(IMAGE_KEYS):
        return None
    kind = "video" if "video" in key else "image"
    token = _token(getattr(model, "config", None), kind)
    if (ids is None or token is None) and n == rows:
        return None  # no image tokens to count (BLIP): one image per row, as the tensors' sizes say
    if ids is None or token is None:
        what = "the call gives no input_ids" if ids is None else f"the model's config names no {kind} token"
        why = f"{what} to count each row's {kind}s by"
    else:
        counts = (ids == token).sum(1).tolist()
        total = sum(counts)
        if counts[0] > 0 and len(set(counts)) == 1 and n % len(counts) == 0:
            return None
        per_row = [c * n // total for c in counts] if total and total % n == 0 else None
        why = f"the rows hold {per_row} {kind}s" if per_row else f"the rows hold {counts} {kind} tokens"
    return (
        f"adapter_names routes {rows} rows but {key} holds {n} {kind}s that do not map to rows one to one or k per "
        f"row in order ({why}), so a layer seeing the {kind}s (a vision-tower adapter) cannot tell their rows; give "
        f"every row the same number of {kind}s, or run the rows with different adapters in separate calls"
    )


def _token(config: object, kind: str) -> int | None:
    """The id of the token that stands for one ``kind`` ("image" / "video") in the ids, as the config names it."""
    token = getattr(config, f"{kind}_token_id", None)
    return getattr(config, f"{kind}_token_index", None) if token is None else token
