"""``trainable_token_indices`` that names no token, as peft reads it (``_trainable_tokens.check_indices``).

peft 0.21.2 and 0.22.0 take ``{}``, ``[]``, ``()`` and ``{"embed_tokens": []}``: ``{}`` adds no token layer; ``[]``
(or the dict) wraps the embedding with no row to train and saves ``[]`` (or the dict) and a zero-row
``trainable_tokens_delta`` tensor; ``()`` indexes every row (``weight[()]``), saved as ``[]`` beside a full-size
tensor peft cannot load back. peft's forward fails on all of these (a float index). deltatune reads them all as none
(no layer), and a dict's empty entries as absent; the zero-row tensor of such a file is skipped on loading
(files.match_tensors); the full-size one is refused there, naming it.
"""

from __future__ import annotations

from typing import Any


def empty(ids: Any) -> bool:
    """Whether ``ids`` is an empty list or tuple of token ids (peft's: no row trains)."""
    return isinstance(ids, (list, tuple)) and not ids


def no_tokens(spec: Any) -> bool:
    """Whether the ``trainable_token_indices`` ``spec`` names no token: None, {}, [], () or a dict of empty lists."""
    return (
        spec is None
        or empty(spec)
        or (isinstance(spec, dict) and all(isinstance(k, str) and k and empty(ids) for k, ids in spec.items()))
    )  # (a key that is no module name is refused by check_indices, as before)
