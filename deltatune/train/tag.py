"""Stage ``tag``: token classification (BIO tags, e.g. named entities). Rows of words with one tag each; eval
reports entity-level F1, precision and recall (and per-token accuracy)."""

from __future__ import annotations

from ..config import ConfigError
from ..data.load import DataError
from ..data.tasks import Collator, encode_tag, split_off
from ..data.templates import IGNORE_INDEX
from . import metrics as M
from .config import RunConfig
from .prepared import Prepared, _encode_splits, _logits, _rows
from .trainer import TokenLossTrainer


def _bio_labels(tags: list) -> list[str]:
    """ "O" first, then B-/I- for every entity type seen (both, even when the data shows only one of them), then
    any other tag seen (IOBES's E- and S-, a tag without a prefix). Tags written in lower case (b-per, i-per, o) keep
    their case: B-per and I-per beside them were two classes no tag named."""
    seen = {str(t) for t in tags}
    outside = "o" if "o" in seen and "O" not in seen else "O"
    kinds = sorted({(k, p.islower()) for p, dash, k in (t.partition("-") for t in seen - {"O", "o"}) if dash})
    names = [outside, *[f"{p}-{k}" for k, lower in kinds for p in (("b", "i") if lower else ("B", "I"))]]
    return names + sorted(seen - set(names))


def _base_config(cfg: RunConfig):
    """The base model's config at its model.revision; None where it does not load (the model loader names it)."""
    from .model_files import base_config

    m = cfg.model
    return base_config(m.name_or_path, m.trust_remote_code, m.revision)


PREFIX_SPACE_TYPES = ("bloom", "gpt2", "roberta", "deberta")
"""The model types whose tokenizer run_ner loads with ``add_prefix_space=True``. It has an effect only where the
tokenizer's class takes the argument and builds its byte-level pre-tokenizer from it (transformers 5's
GPT2Tokenizer, RobertaTokenizer, DebertaTokenizer): a TokenizersBackend (bloom's, and a gpt2 model's whose
tokenizer_config names no such class) keeps its tokenizer.json's pre-tokenizer, so run_ner reads the words as it
does without."""


def prefix_space(tok, config) -> bool:
    """Set ``tok`` (in place) as run_ner loads it for ``config``'s model with ``add_prefix_space=True``: its ByteLevel
    pre-tokenizer (and RoBERTa's post-processor) with the prefix space, ``add_prefix_space`` true in what it saves,
    so the run's folder and a merged model encode as the run trained (run_ner saves its tokenizer so). Returns
    whether it applies (``PREFIX_SPACE_TYPES``, a class that takes the argument, a ByteLevel pre-tokenizer)."""
    import inspect
    import json

    from tokenizers import pre_tokenizers, processors

    backend = getattr(tok, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    if (
        getattr(config, "model_type", None) not in PREFIX_SPACE_TYPES
        or "add_prefix_space" not in inspect.signature(type(tok).__init__).parameters
        or not isinstance(pre, pre_tokenizers.ByteLevel)
    ):
        return False
    if not pre.add_prefix_space:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(
            add_prefix_space=True, trim_offsets=pre.trim_offsets, use_regex=pre.use_regex
        )
    post = json.loads(backend.to_str()).get("post_processor") or {}
    if post.get("type") == "RobertaProcessing" and not post.get("add_prefix_space"):  # (RobertaTokenizer's __init__)
        backend.post_processor = processors.RobertaProcessing(
            tuple(post["sep"]), tuple(post["cls"]), trim_offsets=post["trim_offsets"], add_prefix_space=True
        )
    tok.add_prefix_space = True
    tok.init_kwargs["add_prefix_space"] = True  # (tokenizer_config.json's, as run_ner's saved tokenizer has it)
    return True


def _trained_without_prefix_space(cfg: RunConfig, tok) -> bool:
    """Whether this repeats a run begun before it read the words with the prefix space (no ``tag_prefix_space``
    mark): ``deltatune eval``'s (``trained_run`` the run folder or checkpoint it evaluates: a checkpoint of an
    unfinished run holds no tokenizer, so ``tok`` is the base's), or a ``--resume``'s (``output.dir``; run sets
    ``trained_run`` True or False on a resume only). That run evaluates and resumes with the token ids it trained
    with."""
    import os

    from .runs import prefix_space_trained, run_folder

    trained = vars(cfg).get("trained_run")
    run_dir = trained if isinstance(trained, str) else cfg.output.dir if "trained_run" in vars(cfg) else None
    folders = [getattr(tok, "name_or_path", None), run_dir]
    return any(
        isinstance(f, str) and os.path.isdir(f) and run_folder(f) and not prefix_space_trained(f) for f in folders
    )


def _model_tags(config) -> list[str] | None:
    """The base model's own tags in its head's order (config.json's id2label), None where it names none
    (transformers' LABEL_0, LABEL_1, ...) or has no config."""
    id2label = getattr(config, "id2label", None) or {}
    if sorted(id2label) != list(range(len(id2label))):
        return None
    names = [str(id2label[i]) for i in range(len(id2label))]
    return None if names == [f"LABEL_{i}" for i in range(len(names))] else names


def _refuse_bool_tags(rows: list, column: str) -> None:
    """Refuse a tag true / false: Python's True == 1 made it the tag of id 1 of data.labels silently (B-per, say), and
    without data.labels the column read as "integer tag ids". datasets reads no such JSON column (arrow: "changed
    from number to boolean"), so run_ner never sees one. Refuse an empty tag "" too: a class of its own, which
    seqeval cannot score (IndexError in get_entities).

    Raises:
        DataError: the first such row, named.
    """
    for r in rows:
        tags = r.get(column, required=False)
        bad = next((t for t in tags if isinstance(t, bool)), None) if isinstance(tags, list) else None
        if bad is not None:
            raise DataError(f"{r.source}: tag {str(bad).lower()} in column {column!r} is a boolean; write the tag's "
                            "name (B-per, O, ...) or, with data.labels, its id")  # fmt: skip
        if isinstance(tags, list) and "" in tags:  # a class "" of its own, which seqeval cannot score (IndexError)
            raise DataError(f"{r.source}: tag {tags.index('') + 1} in column {column!r} is empty text; write the "
                            "tag's name (B-per, O, ...)")  # fmt: skip


def prepare_tag(cfg: RunConfig, tok) -> Prepared:
    if not getattr(tok, "is_fast", True):  # its words' tokens are found through word ids or offsets: a fast one's
        raise ConfigError(
            f"model {cfg.model.name_or_path!r}: stage tag needs a fast (Rust) tokenizer to align each word's tag with "
            f"its first sub-token; {type(tok).__name__} is a Python one (transformers' run_ner refuses it likewise)"
        )
    train_rows, eval_rows = _rows(cfg)
    d = cfg.data
    base = _base_config(cfg)
    if not _trained_without_prefix_space(cfg, tok):
        prefix_space(tok, base)  # (in place: the run saves this tokenizer)
    _refuse_bool_tags([*train_rows, *(eval_rows or [])], d.tags_column)
    if d.labels:
        at = next((i for i, x in enumerate(d.labels) if not isinstance(x, str) or not x), None)
        if at is not None:  # seqeval reads a tag's prefix and type from its text: a number failed at the first eval
            raise ConfigError(
                f"data.labels[{at}] is {d.labels[at]!r}, not a tag's name: stage tag scores entities from the names "
                "(O, B-per, I-per, ...) in tag-id order, as seqeval reads them; quote a name YAML reads as a number"
            )
        names = list(d.labels)
    else:
        tagged = [(r, t) for r in train_rows + (eval_rows or []) for t in (r.get(d.tags_column) or [])]
        ids = next((r for r, t in tagged if isinstance(t, (int, float))), None)  # 3.0: through pandas (with a NaN)
        if ids is not None:  # (datasets' ClassLabel column as exported: conll2003's ner_tags)
            raise DataError(
                f"{ids.source}: {d.tags_column!r} holds integer tag ids; set data.labels to their BIO names in id "
                "order (e.g. [O, B-person, I-person, ...]) so entities can be scored"
            )
        tags = [t for _, t in tagged]
        names = _bio_labels(tags)
        # run_ner: a base whose head was trained on these tags (its id2label names them all) keeps its order, so its
        # trained head scores each tag as it learned it (in deltatune's order its class ids were another tag's)
        own = _model_tags(base)
        if own and len(set(own)) == len(own) and set(own) in (set(names), {str(t) for t in tags}):
            names = own
    if len(names) < 2:  # one class: the loss is 0 from the start, and the run would report success
        raise DataError(
            f"every tag in {d.tags_column!r} is {names[0] if names else 'absent'!r}: one class, nothing to learn "
            "(set data.labels if the entity tags are named elsewhere)"
        )
    mapping: dict = {name: i for i, name in enumerate(names)} | {i: i for i in range(len(names))}
    held = split_off(train_rows, d.val_size, cfg.train.seed, bool(d.eval))  # after the tags are read from all rows
    train_rows, eval_rows = held[0], eval_rows if held[1] is None else held[1]

    def enc(rows):
        return encode_tag(
            rows,
            tok,
            d.tokens_column,
            d.tags_column,
            mapping,
            d.max_length,
            d.truncation,
            d.label_all_tokens,
        )

    notes: list[str] = []
    train, ev = _encode_splits(enc, train_rows, eval_rows, d.max_length, notes)
    for split, e in (("train", train), ("eval", ev)):
        if e is not None and e.dropped:
            notes.append(f"{e.dropped} {split} rows were dropped: no word with a token to tag (an empty row?)")
    if not train.examples:
        raise DataError(f"{d.train}: no row has a word with a token to tag")

    # run_ner's --return_entity_level_metrics (off by default, as there); eval_f1 stays the overall F1 either way
    by_type = d.return_entity_level_metrics

    def compute(p) -> dict[str, float]:
        preds = _logits(p.predictions).argmax(-1)
        pred_tags, true_tags = [], []
        for pr, lab in zip(preds, p.label_ids):
            keep = lab != IGNORE_INDEX
            pred_tags.append([names[i] for i in pr[keep]])
            true_tags.append([names[i] for i in lab[keep]])
        pred_seq, true_seq = M.one_sequence(pred_tags), M.one_sequence(true_tags)  # (as seqeval reads the rows)
        prf = M.entity_prf([pred_seq], [true_seq])
        flat = [(a, b) for ps, ts in zip(pred_tags, true_tags) for a, b in zip(ps, ts)]
        out = {
            "f1": prf["f1"],
            "precision": prf["precision"],
            "recall": prf["recall"],
            "accuracy": sum(a == b for a, b in flat) / max(len(flat), 1),
        }
        if by_type:  # run_ner's keys: <type>_precision, <type>_recall, <type>_f1, <type>_number
            out |= {
                f"{k}_{n}": v
                for k, got in M.entity_prf_by_type([pred_seq], [true_seq]).items()
                for n, v in got.items()
            }
        return out

    splits = (train.examples, ev.examples if ev and ev.examples else None)
    collator = Collator(tok.pad_token_id)  # the loss: over the whole step's tagged tokens (TokenLossTrainer)
    return Prepared(*splits, collator, compute, "eval_f1", names, notes=notes, trainer_class=TokenLossTrainer)
