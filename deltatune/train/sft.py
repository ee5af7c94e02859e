"""Stage ``sft``: supervised fine-tuning of a causal LM on conversations in any format deltatune reads
(data/formats.py), rendered with the chat template; the loss is on the response tokens only. Optional packing."""

from __future__ import annotations

from ..data.encode import encode_sft_samples
from ..data.load import DataError
from ..data.tasks import Collator, pack
from .config import RunConfig
from .prepared import Prepared, _encode_splits, read_splits


def prepare_sft(cfg: RunConfig, tok) -> Prepared:
    d = cfg.data
    train_s, eval_s, template, notes = read_splits(cfg, tok, "sft")

    def enc(samples):
        return encode_sft_samples(
            samples, tok, template, d.max_length, d.truncation, d.mask_history, d.train_on_prompt
        )

    kept = " to their last turn (data.mask_history)" if d.mask_history else ""
    train, ev = _encode_splits(enc, train_s, eval_s, d.max_length, notes, kept)
    weight0 = "their last answer (data.mask_history trains it alone)" if d.mask_history else "every answer"
    for split, e in (("train", train), ("eval", ev)):
        if e is not None and e.dropped:
            notes.append(
                f"{e.dropped} {split} rows were dropped: no response token fits within data.max_length"
                + _first(e.first_dropped)
            )
        if e is not None and e.unweighted:
            notes.append(
                f"{e.unweighted} {split} rows were dropped: {weight0} has weight 0 (nothing to train)"
                + _first(e.first_unweighted)
            )
    for what, verb, e in (
        ("training row", "train", train),
        ("eval row", "score", ev),
    ):  # (an eval split of none: a run with no eval loss)
        if e is not None and not e.examples:
            why = [f"{e.dropped} with none within data.max_length={d.max_length}{_first(e.first_dropped, ',')}"]
            why = why * bool(e.dropped)
            why += [
                f"{e.unweighted} with {weight0.split(' (')[0]} weighted 0{_first(e.first_unweighted, ',')}"
            ] * bool(e.unweighted)
            counts = "; ".join(why) or "no rows"
            out = "leave data.eval (and train.eval_steps, eval_on_start) out"
            way = ["raise data.max_length"] * bool(e.dropped) + [out]
            raise NoRowLeft(  # (data.eval: HARMLESS, so a run resumed can leave it out)
                f"no {what} has a response token to {verb} ({counts})" + f"; {', or '.join(way)}" * (e is ev), counts
            )
    train_ex = train.examples
    if d.packing:
        train_ex = pack(train_ex, d.max_length)
        notes.append(
            f"{len(train.examples)} training examples packed into {len(train_ex)} blocks of at most "
            f"{d.max_length} tokens"
        )
    return Prepared(
        train_ex, ev.examples if ev else None, Collator(tok.pad_token_id), None, None, notes=notes, loss_only=True
    )


def _first(source: str, lead: str = ";") -> str:
    """The first dropped row named after a count (`` ; the first: t.jsonl:3``), where the rows name their source."""
    return f"{lead} the first: {source}" if source else ""


class NoRowLeft(DataError):
    """No row of a split has a response token left; ``why`` (the counts) for ``deltatune eval`` to word its own
    refusal (the file it scores is read as data.train)."""

    def __init__(self, message: str, why: str = ""):
        super().__init__(message)
        self.why = why

    def __reduce__(self):  # (pickled and copied with its counts: a process pool, Ray)
        return (type(self), (str(self), self.why))
