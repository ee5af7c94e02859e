"""Stage ``seq2seq``: an encoder-decoder (T5, BART) on source/target rows; eval adds greedy generations scored
with run_summarization's metrics (ROUGE-1, ROUGE-2, ROUGE-L, ROUGE-Lsum, the generations' mean length) and BLEU-4
against the target (or the row's ``references``)."""

from __future__ import annotations

from functools import partial

import torch

from ..config import ConfigError
from ..data.load import Row
from ..data.tasks import Collator, Encoded, encode_seq2seq, references, refuse_no_room, split_off
from ..loss import token_loss
from . import metrics as M
from .config import RunConfig
from .prepared import Prepared, _rows
from .trainer import TokenLossTrainer


def prepare_seq2seq(cfg: RunConfig, tok) -> Prepared:
    train_rows, eval_rows = _rows(cfg)
    held = split_off(train_rows, cfg.data.val_size, cfg.train.seed, bool(cfg.data.eval))
    train_rows, eval_rows = held[0], eval_rows if held[1] is None else held[1]
    d = cfg.data
    check_room(tok, d.max_length, d.max_target_length, d.source_prefix)

    def enc(rows, scored=True):
        return encode_seq2seq(
            rows,
            tok,
            d.source_column,
            d.target_column,
            d.max_length,
            d.max_target_length,
            d.truncation,
            d.source_prefix,
            scored,  # the references column is read where the generations are scored: the eval rows
        )

    train, ev = enc(train_rows, scored=False), enc(eval_rows) if eval_rows else None
    notes = [_cut_note(split, e, d.max_length, d.max_target_length) for split, e in (("train", train), ("eval", ev))]
    notes = [n for n in notes if n]
    if note := _prefix_note(cfg):
        notes.append(note)
    new_tokens = cfg.train.generation_max_new_tokens
    # run_summarization generates up to the target length (val_max_target_length); a shorter cap cuts predictions.
    # A target's closing special token (T5's and BART's EOS, BERT's SEP) need not be generated: its text is whole
    # without it (a target of the cap plus its EOS was counted as cut).
    specials = set(getattr(tok, "all_special_ids", None) or [])
    if ev and (longer := sum(_needed(ex["labels"], specials) > new_tokens for ex in ev.examples)):
        notes.append(
            f"{longer} of the {len(ev.examples)} eval targets are longer than train.generation_max_new_tokens="
            f"{new_tokens} tokens: their generations stop there, which lowers ROUGE-L and BLEU"
        )
    return Prepared(
        train.examples,
        ev.examples if ev else None,
        Collator(tok.pad_token_id),
        None,
        "eval_rougeL",
        eval_rows=eval_rows,
        notes=notes,
        loss_only=True,
        # T5's and BART's own loss is a mean per micro-batch; train.label_smoothing_factor as Seq2SeqTrainer's
        trainer_class=partial(TokenLossTrainer, loss=partial(token_loss, label_smoothing=smoothing))
        if (smoothing := cfg.train.label_smoothing_factor)
        else TokenLossTrainer,
    )


def _needed(labels: list[int], specials: set[int]) -> int:
    """The new tokens a generation needs to hold a target's whole text: its labels but the closing special tokens
    (T5's </s>, mBART's </s> and language code)."""
    n = len(labels)
    while n and labels[n - 1] in specials:
        n -= 1
    return n


def check_room(tok, max_length: int, max_target_length: int, source_prefix: str = "") -> None:
    """ConfigError naming the key when data.max_length (data.max_target_length) is no more than the special tokens
    the tokenizer adds to each source (target), data.source_prefix's tokens counted with the source's: none of the
    text fits. Cut to exactly the special tokens, the tokenizer keeps them alone (a row of nothing to read or
    learn); below, it cuts nothing at all (it logs an error and returns the whole text), so every row went through
    longer than the limit: ``tasks.refuse_no_room``, cls's and tag's message. A side the tokenizer cannot encode so
    (a stand-in without ``text_target``) is not checked: encoding tells. (``tasks.check_room`` asks the tokenizer's
    ``num_special_tokens_to_add``; here the empty text is encoded, after the prefix, as each row is.)"""
    special = _count(tok, "")
    prefix = source_prefix.rstrip()  # (its trailing space merges into a row's first word: T5's '▁', BART's 'Ġ')
    prefixed = _count(tok, prefix) if prefix else special
    target = _count(tok, None)
    for key, limit, what, fixed, specials in (
        ("data.max_length", max_length, "source", prefixed, special),
        ("data.max_target_length", max_target_length, "target", target, target),
    ):
        if fixed is None or specials is None:
            continue
        if fixed <= specials:
            refuse_no_room(key, limit, specials, what)
        elif limit <= fixed:  # (data.source_prefix: its tokens take the room too)
            raise ConfigError(
                f"{key}={limit}: the tokenizer adds {specials} special token{'s' if specials != 1 else ''} and "
                f"data.source_prefix {source_prefix!r} {fixed - specials} more to each {what}, which leaves no room "
                f"for its text (cut to {fixed} or fewer tokens, a source keeps no token of its text); set {key} to "
                f"{fixed + 1} or more"
            )


def _count(tok, text: str | None) -> int | None:
    """The ids the tokenizer gives ``text`` (None: an empty target, ``text_target``); None when it cannot."""
    try:
        return len((tok(text) if text is not None else tok(text_target=""))["input_ids"])
    except Exception:  # (not this check's to name: encoding the rows tells)
        return None


# run_summarization warns when one of these runs without --source_prefix
T5_CHECKPOINTS = tuple(f"google-t5/t5-{size}" for size in ("small", "base", "large", "3b", "11b"))


def _prefix_note(cfg: RunConfig) -> str | None:
    """The report's line for a T5 checkpoint run with no data.source_prefix, as run_summarization warns."""
    name = cfg.model.name_or_path
    if cfg.data.source_prefix or name not in T5_CHECKPOINTS + tuple(n.split("/")[1] for n in T5_CHECKPOINTS):
        return None
    return (
        f"the model is T5 ({name}) and data.source_prefix is empty: T5 was trained with a task prefix before each "
        'source, e.g. "summarize: " (run_summarization warns the same); set data.source_prefix to use one'
    )


def _cut_note(split: str, enc: Encoded | None, max_length: int, max_target_length: int) -> str | None:
    """The report's line for rows cut, naming the limit each part passed (a target's is data.max_target_length)."""
    if not enc or not enc.truncated:
        return None
    parts = [f"{n} {what} longer than {key}={limit}" for n, what, key, limit in (
        (enc.cut_sources, "sources", "data.max_length", max_length),
        (enc.cut_targets, "targets", "data.max_target_length", max_target_length)) if n]  # fmt: skip
    return f"{enc.truncated} {split} rows were truncated ({', '.join(parts)} tokens)"


@torch.no_grad()
def generation_metrics(model, tok, rows: list[Row], cfg: RunConfig, batch_size: int = 16) -> dict[str, float]:
    """run_summarization's ``compute_metrics`` of greedy (or beam search: train.generation_num_beams) generations
    against the targets, as fractions (its figures / 100): ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum (means over the
    rows of rouge-score's F with its stemmer, the texts stripped and, for Lsum, one sentence a line), ``gen_len`` (the
    mean count of generated ids other than the pad id), and corpus BLEU-4 (sacrebleu's). A row with a
    ``references`` list scores each ROUGE against its best reference, as rouge-score's ``score_multi``."""
    d = cfg.data
    refs = [_references(r, d.target_column) for r in rows]  # (all checked before any generation)
    check_positions(cfg, model)
    refs = [[as_decoded(tok, t) for t in texts] for texts in refs]
    was_training = model.training
    model.eval()
    preds, lengths = [], []
    pad = getattr(tok, "pad_token_id", None)
    device = next(p for p in model.parameters()).device
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        enc = tok(
            [d.source_prefix + str(r.get(d.source_column)) for r in chunk],
            return_tensors="pt",
            padding=True,
            padding_side="right",  # as the run's batches (Collator); left padding moves BART's learned positions
            truncation=True,
            max_length=d.max_length,
        )
        out = model.generate(
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            max_new_tokens=cfg.train.generation_max_new_tokens,
            do_sample=False,
            # run_summarization's --num_beams (its generation_num_beams); 1, the default: greedy
            num_beams=cfg.train.generation_num_beams,
        )
        preds += tok.batch_decode(out, skip_special_tokens=True)
        # run_summarization's gen_len: np.count_nonzero(pred != pad_token_id) per generated row (the EOS counts; the
        # decoder start counts unless it is the pad (T5's is); the padding after a row's EOS does not)
        lengths += [int((row != pad).sum()) if pad is not None else len(row) for row in out]
    model.train(was_training)
    # run_summarization's ROUGE: rouge-score's with use_stemmer=True ("runs" and "running" match "run"), each row's
    # prediction against its best reference; rougeLsum on the texts one sentence a line (``M.sentences``)
    rows_scores = [M.rouge_scores(p, rs, stem=True) for p, rs in zip(preds, refs)]
    scores = {
        f"eval_{key}": sum(r[key] for r in rows_scores) / max(len(preds), 1)
        for key in ("rouge1", "rouge2", "rougeL", "rougeLsum")
    }
    scores["eval_gen_len"] = sum(lengths) / max(len(lengths), 1)
    return {**scores, "eval_bleu": M.bleu(preds, refs)}


def positions(model, part: str) -> int | None:
    """The positions of an encoder-decoder's ``part`` (``"encoder"``, ``"decoder"``) where they are a fixed table
    (BART's learned ones, less its offset of 2); None where they have no limit (T5's relative positions; FSMT's
    sinusoidal table, which ``make_weight`` grows to a longer input; ProphetNet's encoder, which clamps them).
    ProphetNet's decoder: its table less 2 and the pad id (its positions start after the pad id, and its predicting
    streams read one past the main stream's). A warm-started EncoderDecoderModel: its halves' configs' context."""
    for name, module in model.named_modules() if isinstance(model, torch.nn.Module) else ():
        tail = name.split(".")[-2:]
        if tail == [part, "position_embeddings"] and type(module).__name__.endswith("ProphetNetPositionalEmbeddings"):
            return None if part == "encoder" else module.num_embeddings - 2 - (module.padding_idx or 0)
        if tail == [part, "embed_positions"] and isinstance(module, torch.nn.Embedding):
            if hasattr(module, "make_weight"):
                return None
            return module.num_embeddings - int(getattr(module, "offset", 0) or 0)
    sub = getattr(getattr(model, "config", None), part, None)  # an EncoderDecoderModel's halves (BERT2BERT, GPT-2)
    if hasattr(sub, "get_text_config"):
        from ..targets import context_length

        return context_length(sub)
    return None


def virtual_tokens(model) -> tuple[int, str]:
    """The active token adapter's virtual tokens and the part whose positions they take: prompt tuning's and
    P-tuning's go in front of the encoder's input (``"encoder"``); prefix tuning's (and P-tuning v2's) into the
    decoder's self-attention cache, which moves its positions (``"decoder"``); (0, ``"encoder"``) for any other
    method, as peft's and deltatune's forwards both place them (deltatune refuses as many as the positions)."""
    configs = getattr(model, "peft_config", None)
    config = configs.get(getattr(model, "active_adapter", None)) if isinstance(configs, dict) else None
    n = getattr(config, "num_virtual_tokens", 0) or 0
    where = getattr(config, "virtual_tokens_in", None)  # (DeltaConfig's hook)
    if where is None:  # a PeftModel's config: peft's prefix tuning fills the cache
        where = "cache" if str(getattr(config, "peft_type", "")).endswith("PREFIX_TUNING") else "input"
    return n, "decoder" if where == "cache" else "encoder"


def check_positions(cfg: RunConfig, model, prepared: Prepared | None = None) -> None:
    """ConfigError naming the key when the longest source (data.max_length), the longest target
    (data.max_target_length) or the eval's generations (train.generation_max_new_tokens: the decoder reads its start
    and all new tokens but the last) run past a BART-style encoder's or decoder's positions, with a token adapter's
    virtual tokens where they land (``virtual_tokens``): each failed deep inside torch ("IndexError: index out of
    range in self"; deltatune's token adapters' "positions needed" ValueError), the generations only after the whole
    training (checked with ``prepared`` where it has eval rows, or without it, before the generations). A generation
    that stops early reads fewer positions; the check takes the worst case, one that never stops. First
    ``check_decoder_start``."""
    check_decoder_start(cfg, model)
    encoder, decoder = positions(model, "encoder"), positions(model, "decoder")
    n, where = virtual_tokens(model)
    splits = [(s, e) for s, e in (("train", prepared.train), ("eval", prepared.eval)) if e] if prepared else []
    for part, limit, column, key, value in (
        ("encoder", encoder, "input_ids", "data.max_length", cfg.data.max_length),
        ("decoder", decoder, "labels", "data.max_target_length", cfg.data.max_target_length),
    ):
        virtual = n if where == part else 0
        extra = f" and the adapter's {virtual} virtual tokens" if virtual else ""
        for split, examples in splits if limit is not None else ():
            if (longest := max(len(ex[column]) for ex in examples)) + virtual > limit:
                what = "source" if part == "encoder" else "target"
                raise ConfigError(
                    f"{key}={value}: the longest {split} {what} is {longest} tokens{extra}, more than the model's "
                    f"{part}'s {limit} positions; set {key} to {limit - virtual} or less"
                )
    new, virtual = cfg.train.generation_max_new_tokens, n if where == "decoder" else 0
    if decoder is not None and new + virtual > decoder and (prepared is None or prepared.eval):  # (no eval: none)
        extra = f" and the adapter's {virtual} virtual tokens" if virtual else ""
        raise ConfigError(
            f"train.generation_max_new_tokens={new}: the eval's generations can read up to {new} positions{extra}, "
            f"more than the model's decoder's {decoder} (one that has not stopped by then fails, after the whole "
            f"training); set train.generation_max_new_tokens to {decoder - virtual} or less"
        )


def check_decoder_start(cfg: RunConfig, model) -> None:
    """ConfigError naming the model's config when it has no ``decoder_start_token_id`` and its decoder inputs need
    one (T5's and BART's shift of the labels; mBART's, which starts from the target's language code, does not), as
    run_summarization refuses such a model up front: the first training step failed inside transformers."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prepare = getattr(base, "prepare_decoder_input_ids_from_labels", None)
    if prepare is None or getattr(getattr(base, "config", None), "decoder_start_token_id", None) is not None:
        return
    token = (getattr(base.config, "pad_token_id", None) or 0) + 1  # (a label other than the pad: mBART's reads it)
    try:
        prepare(labels=torch.full((1, 2), token, dtype=torch.long))
    except (ValueError, TypeError, AttributeError):
        # T5's "has to be defined" (AttributeError: a T5Config without the key, which T5Config does not declare);
        # BART's "can't assign a NoneType"
        kept = getattr(getattr(base, "generation_config", None), "decoder_start_token_id", None)
        where = (
            f" (its generation_config.json has decoder_start_token_id={kept}: copy it there)"
            if kept is not None
            else ""
        )
        raise ConfigError(
            f"model {cfg.model.name_or_path}: its config has no decoder_start_token_id, the id its decoder's input "
            "starts from (the labels shifted right after it; T5 uses the pad id, BART the EOS id): set it in the "
            f"model's config.json{where} (run_summarization refuses such a model too)"
        ) from None
    except Exception:  # (some other failure: not this check's to name; the run's own step tells)
        return


def as_decoded(tok, text: str) -> str:
    """``text`` as the tokenizer gives it back: its target ids decoded without the special tokens, as
    run_summarization and run_translation decode the labels they score the generations against (an uncased
    tokenizer's lower case, a character it has no id for left out), so that a generation equal to the target scores
    1; not cut at data.max_target_length (the whole target is scored: ``prepare_seq2seq`` notes a generation cap
    below it)."""
    return tok.decode(tok(text_target=text)["input_ids"], skip_special_tokens=True)


def _references(row: Row, target_column: str) -> list[str]:
    """The texts ``row``'s generation is scored against: its ``references`` list, else its target.

    Raises:
        DataError: a ``references`` value that is not a non-empty list of texts, as training's eval split refuses it
            (``tasks.references``: ``deltatune eval --data`` reads its file as a train split, whose references are
            not checked: a text there was scored against the target instead, a list of numbers as their reprs).
    """
    return references(row) or [str(row.get(target_column))]
