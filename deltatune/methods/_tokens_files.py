"""``trainable_token_indices`` that names no token, as peft reads it (``_trainable_tokens.check_indices``).

peft 0.21.2 and 0.22.0 take ``{}``, ``[]``, ``()`` and ``{"embed_tokens": []}``: ``{}`` adds no token layer; the
others wrap the embedding with no row to train, save ``[]`` (or the dict) and a zero-row ``trainable_tokens_delta``
tensor, and compute as the base embedding. deltatune reads them all as none (no layer), and a dict's empty entries
as absent; the zero-row tensor of such a file is skipped on loading (files.match_tensors).
"""

from __future__ import annotations

from typing import Any


def empty(ids: Any) -> bool:
    """Whether ``ids`` is an empty list or tuple of token ids (peft's: no row trains)."""
    return isinstance(ids, (list, tuple)) and not ids


def no_tokens(spec: Any) -> bool:
    """Whether the ``trainable_token_indices`` ``spec`` names no token: None, {}, [], () or a dict of empty lists."""
    return spec is None or empty(spec) or (isinstance(spec, dict) and all(empty(ids) for ids in spec.values()))
