"""Rows -> token ids and labels, per stage; packing; the collator.

Each ``encode_*`` returns a list of examples (dicts of int lists, or an int label) and a count of
rows that were longer than ``max_length``. What happens to those is the recipe's choice
(``data.truncation``): "truncate" cuts them (and the report counts them) or "refuse" stops with the
first one's file and line.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .formats import NUMBER
from .load import DataError, Row
from .templates import IGNORE_INDEX


@dataclass
class Encoded:
    examples: list[dict[str, Any]]
    truncated: int = 0
    dropped: int = 0
    """Rows left with nothing to learn from after truncation (SFT: the prompt fills max_length)."""
    cut_sources: int = 0
    cut_targets: int = 0
    """seq2seq: rows whose source, and whose target, was cut (``truncated`` counts a row once)."""
    unweighted: int = 0
    """SFT: rows dropped whatever the length, every answer weighted 0 (OpenAI's ``weight``): nothing trains."""
    first_dropped: str = ""
    first_unweighted: str = ""
    """SFT: the first row (its source) counted in ``dropped``, and in ``unweighted``, for the notes to name."""


def _fit(
    ids: list[int],
    max_length: int,
    row: Row,
    truncation: str,
    counter: list[int] | None,
    limit: str = "data.max_length",
) -> int:
    """How many tokens to keep; counts (when ``counter`` is given) or refuses over-long rows."""
    if len(ids) <= max_length:
        return len(ids)
    if truncation == "refuse":
        raise DataError(
            f"{row.source}: {len(ids)} tokens, more than {limit}={max_length} "
            "(set data.truncation=truncate to cut such rows)"
        )
    if counter is not None:
        counter[0] += 1
    return max_length


MAX_CLASSES = 1_000_000
"""An id past this is refused: a column of such numbers is an id or a score column, not classes."""


def label_map(
    rows: Sequence[Row], column: str, labels: list[str] | None, values: list[Any] | None = None, stage: str = "cls"
) -> dict[Any, int]:
    """Label value -> class id. Without ``labels``, the distinct values seen, sorted, are the classes 0, 1, ... in
    that order (run_glue's ``label_list.sort()`` and ``label_to_id``): whole numbers sorted as numbers (ids 0..k-1
    stay themselves; {1, 2} are two classes, not three with an empty class 0), names sorted as text. With
    ``labels``, a name maps to its index. ``values``: the rows' labels when they are not ``row.get(column)``;
    ``stage``: the stage named in a refusal.

    Raises:
        DataError: a label is NaN, or a whole number past ``MAX_CLASSES`` (an id or a score?). A negative whole number
            is a class as any other (run_glue sorts [-1, 1] into the classes 0 and 1).
    """
    values = [r.get(column) for r in rows] if values is None else values
    for row, v in zip(rows, values):
        _check_label(row, column, v, stage)
    if labels:
        names: dict[Any, int] = {name: i for i, name in enumerate(labels)}
        numbers = {class_id(name): i for i, name in reversed(list(enumerate(labels)))}
        numbers.pop(None, None)
        if numbers:  # classes named by numbers: a value is a name, and 1, 1.0 and "1.0" all name the class "1"
            return numbers | names  # (as run.yaml records the classes of a column of 1.0 / 2.0: "1", "2")
        return names | {i: i for i in range(len(labels))}  # else a whole number is an id
    # Ids may come as ints (JSON), as whole floats (1.0: pandas writes an int column with a gap as floats) or as
    # their text (CSV/TSV, where every value is text): "10" sorts after "2" as the number it is (run_classification
    # sorts the text, "10" < "2"), and a JSONL train file and a CSV eval file agree on the classes.
    ids = [class_id(v) for v in values]
    if all(i is not None for i in ids):
        top = max(ids, key=abs)  # type: ignore[type-var]  (-4e9: as far from a class count as 4e9)
        if abs(top) >= MAX_CLASSES:
            row = rows[ids.index(top)]
            raise DataError(
                f"{row.source}: label {values[ids.index(top)]!r} in column {column!r} would be class id {top:,}: "
                f"more than {MAX_CLASSES:,}; is the column an id or a score?"
            )
        return {i: k for k, i in enumerate(sorted(set(ids)))}  # type: ignore[type-var]
    names = sorted({str(v) for v in values})
    return {name: i for i, name in enumerate(names)}


def split_off(rows: Sequence[Any], val_size: float, seed: int, has_eval: bool = False) -> tuple[list, list | None]:
    """The rows as (train, validation): ``val_size`` of them (a fraction in (0, 1), or a count >= 1) held out as
    datasets' ``train_test_split(test_size=val_size, seed=seed)`` holds them out (LLaMA-Factory's ``val_size``;
    run_image_classification's ``train_val_split``): numpy's ``default_rng(seed).permutation``, its first
    ceil(val_size * n) the validation rows, the rest the train rows, in that order. ``val_size`` 0: (rows, None).

    Raises:
        ConfigError: ``val_size`` with data.eval, or a value that is neither.
        DataError: too few rows to leave one on each side.
    """
    from ..config import ConfigError

    if not val_size:
        return list(rows), None
    if has_eval:
        raise ConfigError(f"data.val_size={val_size} splits a validation set off data.train, but data.eval is set; "
                          "give one or the other")  # fmt: skip
    whole = float(val_size).is_integer() and val_size >= 1
    if isinstance(val_size, bool) or not (whole or 0 < val_size < 1):
        raise ConfigError(f"data.val_size must be a fraction in (0, 1) or a count of rows >= 1, got {val_size!r}")
    n = len(rows)
    n_val = int(val_size) if whole else math.ceil(val_size * n)
    if not 0 < n_val < n:
        raise DataError(f"data.val_size={val_size} holds out {n_val} of the {n} training rows; leave at least one "
                        "on each side")  # fmt: skip
    import numpy as np

    order = np.random.default_rng(seed).permutation(n).tolist()
    return [rows[i] for i in order[n_val:]], [rows[i] for i in order[:n_val]]


def class_names(mapping: dict[Any, int], labels: list[str] | None) -> list[str]:
    """The classes of a ``label_map`` in id order: ``labels`` when given, else the values seen, as text."""
    if labels:
        return [str(x) for x in labels]
    named = {v: str(k) for k, v in mapping.items()}
    return [named.get(i, str(i)) for i in range(max(mapping.values()) + 1)]


def class_of(label: Any, mapping: dict[Any, int]) -> int | None:
    """The class id of one label value under a ``label_map`` (a name, an id, or an id as text); None if none."""
    # a bool: its name first ("True", a class of [0, 1, True]), else the id it is (labels [neg, pos]: True is pos)
    keys = (str(label), label) if isinstance(label, bool) else (label, str(label), class_id(label))
    for key in keys:
        if key is not None and key in mapping:
            return mapping[key]
    return None


def csv_number(text: str) -> float | None:
    """A CSV or TSV field's text as the number pandas (datasets' CSV reader, which TRL and run_glue read through) types
    it: ``formats.NUMBER`` between ASCII spaces and tabs (1e400: inf); None for text ('1_000', '٣', '\xa02', 'nan')."""
    s = text.strip(" \t")
    return float(s) if NUMBER.fullmatch(s) else None


_NA = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
                 "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})  # fmt: skip
"""pandas' default missing values (its STR_NA_VALUES, and ''): datasets' CSV reader gives None for them."""
_INF, _INT = re.compile(r"[-+]?inf(inity)?", re.IGNORECASE), re.compile(r"[-+]?\d+", re.ASCII)


def _whole(cells: list[str], missing: bool) -> bool | None:
    """A column of whole numbers as pandas types it: ints (True) where each fits int64, or each uint64 and none is
    missing; else text (None), its missing values too (datasets: text, or an ArrowInvalid past uint64). False: not
    all whole (floats)."""
    if not all(_INT.fullmatch(c.strip(" \t")) for c in cells):
        return False
    values = [int(c) for c in cells]
    if all(-(2**63) <= v < 2**63 for v in values):
        return not missing
    return None if missing or not all(0 <= v < 2**64 for v in values) else True


def csv_typed(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Each row's columns as datasets' CSV builder (pandas' type inference, per column of each .csv / .tsv file, of
    the rows read: after data.limit and a row range) gives them to TRL: a missing value (``_NA``) None; a column of
    whole numbers ints (none missing; past int64 text, unless each fits uint64), of numbers (or inf) floats, of true /
    false in any case (TrUe) bools; else text. A row of another file as it is."""
    out = [dict(r.data) for r in rows]
    files: dict[str, list[dict[str, Any]]] = {}
    for r, data in zip(rows, out):
        if r.source.rpartition(":")[0].lower().endswith((".csv", ".tsv")):
            files.setdefault(r.source.rpartition(":")[0], []).append(data)
    for group in files.values():
        for col in group[0]:
            cells = [d[col] for d in group if isinstance(d.get(col), str) and d[col] not in _NA]
            nums = {c: float(c) if _INF.fullmatch(c) else csv_number(c) for c in cells}
            if None not in nums.values():
                whole = _whole(cells, len(cells) < len(group))
                if whole is None:
                    continue  # (whole numbers past int64: the text as read, missing values too)
                typed: dict[str, Any] = {c: int(c) if whole else v for c, v in nums.items()}
            else:
                bools = all(c.lower() in ("true", "false") for c in cells)
                typed = {c: c.lower() == "true" if bools else c for c in cells}
            for d in group:
                if isinstance(d.get(col), str):
                    d[col] = typed.get(d[col])  # (a missing value: None)
    return out


def class_id(value: Any) -> int | None:
    """A label that is a whole number (1, 1.0, "1", "1.0"; text as ``csv_number`` reads it) as its class id; None
    for a class name."""
    if isinstance(value, str):
        value = csv_number(value)
        if value is None:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        return None
    return int(value)


def _check_label(row: Row, column: str, value: Any, stage: str = "cls") -> None:
    number = value
    if isinstance(value, str):
        if not value.strip():  # a blank CSV cell: a class named "" would sort before every other
            raise DataError(f"{row.source}: label in column {column!r} is empty")
        number = csv_number(value)
        if number is None and value.strip().lstrip("+-").lower() != "nan":  # (NaN text: refused below, as before)
            return  # a class name
        number = math.nan if number is None else number
    if not isinstance(number, (bool, int, float, str)):  # a list (multi-label) or an object
        raise DataError(
            f"{row.source}: label in column {column!r} is a {type(value).__name__}; stage {stage} trains one "
            "class per row: a class name (text) or a class id (a whole number); a list of them is a multi-label row "
            "(text classification only: stage cls)"
        )
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        return
    if math.isnan(number):
        raise DataError(f"{row.source}: label in column {column!r} is NaN (an empty or missing value?)")


def check_room(tokenizer, max_length: int, pair: bool = False) -> None:
    """Refuse a ``max_length`` that leaves no token of a row's text beside the special tokens the tokenizer adds
    (BERT's [CLS] and [SEP]: 2), or, for a text pair (3), no token of each text: a tokenizer asked to cut a row so
    short logs an error and returns it uncut (6 tokens at data.max_length=1, counted as truncated), keeps its special
    tokens alone, or (a pair at 4: [CLS] a [SEP] [SEP]) drops one text whole. A tokenizer that cannot count them
    is not checked.

    Raises:
        ConfigError: the limit named, with the tokenizer's count and the least limit that fits.
    """
    try:  # (a tokenizer that cannot count them, or a stand-in without the method: no check)
        special = int(tokenizer.num_special_tokens_to_add(pair=pair))
    except (AttributeError, TypeError, ValueError, NotImplementedError):
        return
    what = "text pair (data.text_pair_column)" if pair else "row"
    refuse_no_room("data.max_length", max_length, special, what, 2 if pair else 1)


def refuse_no_room(key: str, limit: int, special: int, what: str, texts: int = 1) -> None:
    """ConfigError naming ``key`` where ``limit`` leaves no token of each of ``texts`` texts beside the ``special``
    tokens the tokenizer adds to each ``what`` (cls and tag: check_room; seq2seq's source and target), with the
    least limit that fits."""
    from ..config import ConfigError

    if not special or limit >= special + texts:
        return
    alone = f"cut to {special} it keeps {'them' if special > 1 else 'it'} alone"
    if texts > 1:  # (transformers' longest_first cuts one text to nothing before the other: a pair needs a token more)
        alone = f"cut to {special + 1} it drops one text whole, to {special} it keeps the special tokens alone"
    raise ConfigError(f"{key}={limit}: the tokenizer adds {special} special token{'s' if special > 1 else ''} to each "
                      f"{what}, which leaves no room for {'one token of each text' if texts > 1 else 'its text'} "
                      f"({alone}; below, it cuts nothing); set {key} to {special + texts} or more")  # fmt: skip


def encode_cls(
    rows: Sequence[Row],
    tokenizer,
    text_column: str,
    label_column: str,
    labels: dict[Any, int],
    max_length: int,
    truncation: str = "truncate",
    text_pair_column: str | None = None,
    problem: str = "single_label",
) -> Encoded:
    """Sequence classification: ``input_ids`` (+ mask, token types) and ``labels``: a class id; for ``problem``
    "regression" the row's number (``labels`` unused); for "multi_label" a multi-hot list of floats, one per class
    of ``labels`` (transformers' problem types)."""
    check_room(tokenizer, max_length, bool(text_pair_column))
    out, counter = [], [0]
    for row in rows:
        text = row.text(text_column)
        pair = row.text(text_pair_column) if text_pair_column else None
        enc = tokenizer(text, pair)
        keep = _fit(enc["input_ids"], max_length, row, truncation, counter)
        if keep < len(enc["input_ids"]):
            enc = tokenizer(text, pair, truncation=True, max_length=max_length)
        label = row.get(label_column)
        if problem == "regression":
            target: Any = regression_target(row, label_column)
        elif problem == "multi_label":
            hot = [0.0] * (max(labels.values()) + 1)
            for one in label_list(row, label_column):
                hot[_class_in(row, label_column, one, labels)] = 1.0
            target = hot
        else:
            target = _class_in(row, label_column, label, labels)
        out.append({**{k: list(v) for k, v in enc.items()}, "labels": target})
    return Encoded(out, counter[0])


def _class_in(row: Row, column: str, label: Any, labels: dict[Any, int]) -> int:
    _check_label(row, column, label)  # an eval file's list or object, which no class map holds (unhashable)
    cid = class_of(label, labels)
    if cid is None:
        raise DataError(
            f"{row.source}: label {label!r} in column {column!r} is not in the label set "
            f"{sorted({str(k) for k in labels})}"
        )
    return cid


def label_list(row: Row, column: str) -> list[Any]:
    """A multi-label row's labels (a list of class names or ids; a single one counts as a list of one).

    Raises:
        DataError: a label named twice in one row (a multi-hot vector such as [0, 1, 1] read as ids names 1 twice).
    """
    value = row.get(column)
    values = value if isinstance(value, list) else [value]
    for v in values:
        _check_label(row, column, v)
    keys = [str(class_id(v)) if class_id(v) is not None else str(v) for v in values]
    if len(set(keys)) < len(keys):
        raise DataError(
            f"{row.source}: label list {value!r} in column {column!r} names a class twice; a multi-label row lists "
            "its classes (names or ids), not a multi-hot vector"
        )
    return values


def regression_target(row: Row, column: str) -> float:
    """A regression row's label (model.num_labels 1): a finite number, or its text (CSV).

    Raises:
        DataError: a label that is not a number, or is NaN or infinite.
    """
    value = row.get(column)
    number = None
    if not isinstance(value, bool) and isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        number = csv_number(value)
    if number is None or not math.isfinite(number):
        raise DataError(
            f"{row.source}: label {value!r} in column {column!r} is not a finite number; a regression "
            "(model.num_labels 1) reads a number per row"
        )
    return number


def tag_row(row: Row, tokens_column: str, tags_column: str) -> tuple[list, list]:
    """A tagging row's words and tags; DataError naming the row unless they are lists of equal length."""
    words, tags = row.get(tokens_column), row.get(tags_column)
    if not isinstance(words, list) or not isinstance(tags, list) or len(words) != len(tags):
        raise DataError(f"{row.source}: {tokens_column!r} and {tags_column!r} must be lists of equal length")
    for column, values in ((tokens_column, words), (tags_column, tags)):
        if any(v is None or isinstance(v, (list, dict)) for v in values):  # would train as the text "None"
            raise DataError(f"{row.source}: {column!r} holds a null, list or object; give one word and one tag each")
    return words, tags


def encode_tag(
    rows: Sequence[Row],
    tokenizer,
    tokens_column: str,
    tags_column: str,
    labels: dict[str, int],
    max_length: int,
    truncation: str = "truncate",
    label_all_tokens: bool = False,
) -> Encoded:
    """Token classification: words are split into sub-tokens; the first sub-token of each word carries the
    word's tag, the rest (and special tokens) are -100; with ``label_all_tokens`` (run_ner's) the rest carry it too,
    a B- tag as its I- (where ``labels`` has one). A row left without a tagged token (no words, or none that
    tokenizes) is dropped and counted: alone in a batch its loss would be 0/0, NaN."""
    check_room(tokenizer, max_length)
    out, counter, dropped = [], [0], 0
    split = _splits_words_as_text(tokenizer)
    inside = {
        i: labels.get(f"I-{k[2:]}", i) if k.startswith("B-") else i for k, i in labels.items() if isinstance(k, str)
    }
    for row in rows:
        words, tags = tag_row(row, tokens_column, tags_column)
        enc, word_ids = _words(tokenizer, [str(w) for w in words], split)
        keep = _fit(enc["input_ids"], max_length, row, truncation, counter)
        if keep < len(enc["input_ids"]):
            enc, word_ids = _words(tokenizer, [str(w) for w in words], split, truncation=True, max_length=max_length)
        token_labels, previous = [], None
        for word in word_ids:
            if word is None or (word == previous and not label_all_tokens):
                token_labels.append(IGNORE_INDEX)
            elif word == previous:  # a later sub-token of the word: its tag, B- as I- (run_ner's b_to_i_label)
                token_labels.append(inside.get(token_labels[-1], token_labels[-1]))
            else:
                tag = tags[word]
                key = tag if tag in labels else str(tag)
                if key not in labels:
                    names = [k for k in labels if isinstance(k, str)]  # the map also takes ids: show the names
                    raise DataError(f"{row.source}: tag {tag!r} is not in the label set {names}")
                token_labels.append(labels[key])
            previous = word
        if all(label == IGNORE_INDEX for label in token_labels):
            dropped += 1
            continue
        out.append({**{k: list(v) for k, v in enc.items()}, "labels": token_labels})
    return Encoded(out, counter[0], dropped)


def _splits_words_as_text(tokenizer) -> bool:
    """Whether words given one by one (``is_split_into_words``) become the tokens of the text they make. A byte-level
    BPE (GPT-2's, Llama 3's, Qwen's, SmolLM's) drops each word's leading space there ("appro", "ach" for the
    "Ġapproach" it learned), so its words are read from the text instead."""
    words = ["in", "approaching", "weather"]
    try:
        return tokenizer(words, is_split_into_words=True)["input_ids"] == tokenizer(" ".join(words))["input_ids"]
    except (TypeError, ValueError):
        return True


def _words(tokenizer, words: list[str], split: bool, **kw: Any) -> tuple[Any, list[int | None]]:
    """The words' tokens and each token's word index (None for special tokens)."""
    if split:
        enc = tokenizer(words, is_split_into_words=True, **kw)
        return enc, enc.word_ids()
    enc = tokenizer(" ".join(words), return_offsets_mapping=True, **kw)
    starts, at = [], 0
    for w in words:
        starts.append(at)
        at += len(w) + 1
    ids = [None if s == e else bisect.bisect_right(starts, e - 1) - 1 for s, e in enc.pop("offset_mapping")]
    return enc, ids


def encode_pt(rows: Sequence[Row], tokenizer, text_column: str, block_size: int) -> Encoded:
    """Continued pre-training: all texts tokenised, joined with EOS, cut into blocks of ``block_size``
    (the remainder shorter than a block is dropped)."""
    stream: list[int] = []
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    for row in rows:
        stream.extend(tokenizer(row.text(text_column), add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    blocks = [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]
    if not blocks:
        # the file, not its line (nor its item: "pt.json:1 (item 0)", a list written on one line)
        where = re.sub(r"(:\d+(?: \(item \d+\))?|\[\d+\])$", "", rows[0].source) if rows else "the data"
        raise DataError(
            f"{where}: the text holds {len(stream)} tokens, fewer than one block of data.max_length={block_size} "
            "(the remainder shorter than a block is dropped, as transformers' run_clm drops it)"
        )
    return Encoded([{"input_ids": b, "attention_mask": [1] * len(b), "labels": list(b)} for b in blocks])


def references(row: Row) -> list[str] | None:
    """``row``'s ``references`` column, the texts the eval scores its generation against (each ROUGE against its
    best one); None where it has none (absent, or ``[]``: the target is scored).

    Raises:
        DataError: a value that is not a non-empty list of texts (a text, numbers, an empty text); the row named.
    """
    refs = row.data.get("references")
    if refs in (None, []):
        return None
    if not (isinstance(refs, list) and all(isinstance(r, str) and r.strip() for r in refs)):
        raise DataError(f"{row.source}: column 'references' must be a non-empty list of texts (the eval scores "
                        f"each generation against its best one), got {repr(refs)[:60]}")  # fmt: skip
    return refs


def encode_seq2seq(
    rows: Sequence[Row],
    tokenizer,
    source_column: str,
    target_column: str,
    max_length: int,
    max_target_length: int,
    truncation: str = "truncate",
    source_prefix: str = "",
    scored: bool = True,
) -> Encoded:
    """Conditional generation: the source (after ``source_prefix``, run_summarization's "summarize: " for T5) as
    encoder input, the target's ids as labels. ``scored``: the split's generations are scored (the eval split), so
    its ``references`` column is read; a train split's is not (nothing reads it there).

    Raises:
        DataError: a source or target empty or white space alone (run_summarization leaves an empty one out without
            a word, and keeps white space alone, its ``if text and summary`` being true; here either would train
            the EOS alone, or a target from the prefix alone), or, where ``scored``, a ``references`` column that is
            not a list of texts (the eval would score against the target instead; ``[]`` is no list, the target is
            scored, as before probe 16); the row and column named.
    """
    out, counter, cut = [], [0], [0, 0]
    for row in rows:
        for column in (source_column, target_column):
            if not row.text(column).strip():
                raise DataError(f"{row.source}: column {column!r} is empty; a seq2seq row needs a source and a target")
        if scored:
            references(row)
        source = source_prefix + row.text(source_column)
        src = tokenizer(source)
        tgt = tokenizer(text_target=row.text(target_column))["input_ids"]
        over = len(src["input_ids"]) > max_length or len(tgt) > max_target_length
        keep = _fit(src["input_ids"], max_length, row, truncation, None)
        keep_t = _fit(tgt, max_target_length, row, truncation, None, "data.max_target_length")
        counter[0] += over  # a row is counted once, however many of its parts were cut
        cut[0] += keep < len(src["input_ids"])
        cut[1] += keep_t < len(tgt)
        # Cut by the tokenizer, which keeps the end token (as the evaluation's generation tokenizes the source); a
        # target cut without it would teach the model never to stop.
        if keep < len(src["input_ids"]):
            src = tokenizer(source, truncation=True, max_length=keep)
        if keep_t < len(tgt):
            tgt = tokenizer(text_target=row.text(target_column), truncation=True, max_length=keep_t)["input_ids"]
        out.append({"input_ids": src["input_ids"], "attention_mask": src["attention_mask"], "labels": tgt})
    return Encoded(out, counter[0], cut_sources=cut[0], cut_targets=cut[1])


def pack(examples: list[dict[str, Any]], block_size: int) -> list[dict[str, Any]]:
    """Pack short causal-LM examples into blocks of at most ``block_size`` tokens (greedy, in order).

    Position ids restart at 0 for every example; with no attention mask, transformers' masking then
    keeps each example attending only to itself. The first label of each example is -100, since the
    token before it belongs to another example; so the packed loss equals the unpacked loss.
    """
    blocks: list[dict[str, Any]] = []
    cur: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        n = len(ex["input_ids"])
        if cur["input_ids"] and len(cur["input_ids"]) + n > block_size:
            blocks.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": []}
        cur["input_ids"] += ex["input_ids"]
        cur["labels"] += [IGNORE_INDEX, *ex["labels"][1:]]
        cur["position_ids"] += list(range(n))
    if cur["input_ids"]:
        blocks.append(cur)
    return blocks


class Collator:
    """Pads a list of examples into a batch: ids with the pad id, masks and token types with 0, token labels and
    position ids with -100 / 0. Scalar labels are stacked."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for key in examples[0]:
            values = [ex[key] for ex in examples]
            if not isinstance(values[0], list):
                batch[key] = torch.tensor(values)
                continue
            length = max(len(v) for v in values)
            if self.pad_to_multiple_of:
                length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
            fill = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)
            batch[key] = torch.tensor([v + [fill] * (length - len(v)) for v in values])
        return batch
