"""Stage ``pt``: (continued) pre-training of a causal LM on plain text, cut into blocks of ``data.max_length``."""

from __future__ import annotations

from ..data.tasks import Collator, encode_pt
from .config import RunConfig
from .prepared import Prepared, _rows, data_columns


def prepare_pt(cfg: RunConfig, tok) -> Prepared:
    from ..data.encode import format_note
    from ..data.formats import read_samples

    train_rows, eval_rows = _rows(cfg)
    d = cfg.data
    # Checked as plain text (a chat or preference file is refused naming its format), then read as it is.
    cols = {**data_columns(d), "text": d.text_column}
    samples = read_samples(train_rows, cols, d.format, d.tags, "pt")
    if eval_rows:
        read_samples(eval_rows, cols, d.format, d.tags, "pt")
    train = _bos_first(encode_pt(train_rows, tok, d.text_column, d.max_length), tok)
    ev = _bos_first(encode_pt(eval_rows, tok, d.text_column, d.max_length), tok) if eval_rows else None
    notes = [
        format_note(samples, d.format is not None),
        f"{len(train.examples)} training blocks of {d.max_length} tokens",
    ]
    return Prepared(
        train.examples,
        ev.examples if ev else None,
        Collator(tok.pad_token_id),
        None,
        None,
        notes=notes,
        loss_only=True,
    )


def _bos_first(encoded, tok):
    """LLaMA-Factory's packed pre-training blocks: a tokenizer that adds a BOS (``add_bos_token``: Llama's, Mistral's)
    gets it as each block's first id, over the text's id there (its ``result["input_ids"][i][0] = bos_token_id``);
    the texts are joined with EOS and tokenised without special tokens, so no block would start as the model does."""
    bos = tok.bos_token_id if getattr(tok, "add_bos_token", False) else None
    if bos is not None:
        for ex in encoded.examples:
            ex["input_ids"][0] = ex["labels"][0] = bos
    return encoded
