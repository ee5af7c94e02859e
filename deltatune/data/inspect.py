"""``deltatune data inspect FILE``: what a stage would train on, before any training.

Prints the detected format, the row count, token-length percentiles, how many rows ``data.max_length`` would cut,
and the first rows rendered as the stage renders them, with the trained tokens between [[ and ]].
"""

from __future__ import annotations

from ..config import ConfigError
from .formats import FORMATS, STAGE_FORMATS, StageFormatError, _llamafactory_columns, _stage_hint, detect, read_samples
from .load import DataError, Row, read_rows
from .sample import refuse_multimodal
from .templates import IGNORE_INDEX, check_markers

_DEFAULT_STAGE = {"text": "pt", "prompt": "ppo", "unpaired": "kto"}


def default_stage(data_format: str) -> str:
    """The stage a format is most often trained with (sft for conversations, dpo for preference pairs)."""
    if data_format in _DEFAULT_STAGE:
        return _DEFAULT_STAGE[data_format]
    return "sft" if data_format in STAGE_FORMATS["sft"] else "dpo"


def percentile(values: list[int], q: float) -> int:
    """The nearest-rank percentile: the smallest value with at least q% of the values at or below it."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n q / 100), at least the first
    return ordered[int(rank) - 1]


def inspect(
    path: str,
    model: str | None = None,
    stage: str | None = None,
    max_length: int = 512,
    template: str | None = None,
    data_format: str | None = None,
    columns: dict[str, str] | None = None,
    tags: dict[str, str] | None = None,
    show: int = 2,
) -> str:
    """The inspection report of one data file, as text.

    Args:
        path: the data file.
        model: a model folder (or name deltatune resolves) whose tokenizer counts and renders; None renders with the
            built-in chatml template and counts no tokens.
        stage: the stage to render for (default: the format's usual stage).
        max_length: ``data.max_length``: rows longer are counted as truncated.
        template: ``data.template``.
        data_format: ``data.format`` (default: detected).
        columns: ``data.columns``.
        tags: ``data.tags``.
        show: how many rows to render.

    Raises:
        DataError: the file or a row is bad (file:line and field named), or the stage does not read the format.
    """
    from .encode import (
        _refuse_unrendered,
        choose_template,
        format_note,
        lm_example,
        prompt_ids,
        rendered,
        scored_example,
        sft_example,
    )

    if show < 0:
        raise ConfigError(f"--rows must be >= 0, got {show}")
    if max_length < 1:
        raise ConfigError(f"--max-length must be >= 1, got {max_length}")
    given, data_format = data_format, "messages" if data_format == "openai" else data_format  # (LLaMA-Factory's)
    if data_format is not None and data_format not in FORMATS:
        raise ConfigError(f"--format {data_format!r} is not a known format; formats: {', '.join(FORMATS)}")
    if stage is not None and stage not in STAGE_FORMATS and stage not in COLUMN_STAGES:
        raise ConfigError(  # seq2seq, grpo and the image stages read their columns as they are
            f"--stage {stage}: data inspect reads the stages of text, chat or preference rows "
            f"({', '.join(STAGE_FORMATS)}) and of labelled columns ({', '.join(COLUMN_STAGES)})"
        )
    rows = read_rows(path)
    stage = stage or (None if data_format else column_stage(rows[0]))
    if stage in COLUMN_STAGES:
        given = next(
            (flag for flag, v in (("--template", template), ("--format", data_format)) if v is not None), None
        )
        if given:  # (they were ignored: the report read as if the file had been rendered with them)
            raise ConfigError(
                f"{given}: stage {stage} reads the {' and '.join(COLUMN_STAGES[stage])} columns as they are, with no "
                f"chat template or data format; drop {given}"
            )
        return _labelled(path, rows, stage, model, max_length, show)
    mapped = _llamafactory_columns(dict(columns or {}), rows, data_format)  # (LLaMA-Factory's keys, as training)
    fmt = data_format or detect(rows[0], mapped)
    stage = stage or default_stage(fmt)
    skipped: list[str] = []
    try:  # (a format the stage reads only reshaped, as LLaMA-Factory's KTO and PPO rows, is read_samples' to tell)
        samples = read_samples(rows, columns, given, tags, stage, skipped)  # (openai: its converter's turn order)
    except StageFormatError:  # (the first row's format; a bad row's own error passes as it is)
        own = column_stage(rows[0])  # (a classification file given --stage sft: the stage that reads it named)
        raise DataError(
            f"{path}: stage {stage} does not read the {fmt} format; it reads {', '.join(STAGE_FORMATS[stage])}"
            + _stage_hint(fmt, stage, mapped)
            + (f"; its {' and '.join(COLUMN_STAGES[own])} columns are stage {own}'s (--stage {own})" if own else "")
        ) from None
    if not samples:  # (every row a bad pair: the report has no row to show)
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        raise DataError(f"{path}: every row is a bad pair (an empty or non-assistant response, chosen == rejected, or "
                        "a ranking conversation LLaMA-Factory drops): nothing to show, and training would refuse the "
                        f"file (data.bad_pairs=skip would leave no row): {shown}")  # fmt: skip
    fmt = samples[0].format
    refuse_multimodal(samples, stage)
    lines = [
        f"file: {path}",
        format_note(samples, data_format, stage).replace("data format:", "format:").replace("data.format", "--format"),
        f"rows: {len(samples) + len(skipped)}",
        f"stage: {stage}",
    ]
    if skipped:
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        lines.append(
            f"bad pairs (an empty or non-assistant response, chosen == rejected, or a ranking conversation "
            f"LLaMA-Factory drops): {len(skipped)}, refused unless "
            f"data.bad_pairs=skip: {shown}"
        )
    if model is None:
        tok, template = _NoTokenizer(), template or "chatml"
        if template == "raw" and fmt != "text":  # the rows data.template=raw refuses in training, refused here
            choose_template(samples, tok, template, stage)
        lines.append(
            "template: none (pre-training reads the text as it is)"
            if fmt == "text"
            else f"template: none (data.template=raw: {_RAW}; give --model for its EOS and token counts)"
            if template == "raw"
            else f"template: the built-in {template} template (give --model for its chat template and token counts)"
        )
    else:
        from ..train.models import load_tokenizer

        tok = load_tokenizer(model)
        asked, template = template, choose_template(samples, tok, template, stage) if fmt != "text" else template
        if fmt == "text":
            how = "none (pre-training reads the text as it is)"
        elif template == "raw":
            why = "data.template=raw" if asked == "raw" else "the tokenizer has no chat template"
            how = f"none ({why}: {_RAW})"
        else:
            how = "the tokenizer's chat template" if template is None else f"the built-in {template} template"
        lines.append(f"template: {how}")
        counts, lost, unweighted = [], 0, 0
        for s in samples:
            if fmt == "text":
                counts.append(len(tok(s.text, add_special_tokens=False)["input_ids"]))
            elif stage == "ppo":  # PPO reads the prompt alone (its markers checked as training checks them)
                check_markers(tok, template)
                counts.append(len(prompt_ids(s, tok, template, 10**9)))
            elif stage == "sft":
                ids, labels = sft_example(s, tok, template)
                counts.append(len(ids))
                if all(label == IGNORE_INDEX for label in labels):  # every answer of OpenAI's weight 0
                    _refuse_unrendered(s, False, template)  # (as training refuses it: no answer rendered)
                    unweighted += 1
                else:
                    lost += all(
                        label == IGNORE_INDEX for label in labels[:max_length]
                    )  # as encode_sft_samples drops it
            elif s.chosen is None and s.completion is None:
                counts.append(0)
            else:
                encode = scored_example if stage == "rm" else lm_example
                responses = [s.chosen, s.rejected] if s.chosen is not None else [s.completion]
                counts.append(max(len(encode(s, r, tok, template, 10**9)[0]["input_ids"]) for r in responses))
        if any(counts):
            eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id  # as encode_pt joins rows
            lines += _length_lines(counts, max_length, "text" if fmt == "text" else stage, eos is not None)
        if lost:
            lines.append(f"rows left out of training: {lost} (no response token within data.max_length={max_length})")
        if unweighted:
            lines.append(f"rows left out of training: {unweighted} (every answer has weight 0, nothing to learn)")
    from .encode import mark

    for s in samples[:show]:
        lines += ["", f"--- {s.source} (trained tokens between [[ and ]])"]
        for part, text, spans in rendered(s, tok, template, stage):
            if fmt == "text" and len(text) > 1000:  # a document (a whole .txt file is one): its start
                text, spans = text[:1000] + " ...", [(0, 1000)]
            lines += [f"[{part}]", mark(text, spans)]
    return "\n".join(lines)


COLUMN_STAGES = {"cls": ("text", "label"), "tag": ("tokens", "ner_tags")}
"""The stages whose rows are labelled columns (their recipe defaults, data.text_column and so on)."""


def column_stage(row: Row) -> str | None:
    """``cls`` for a row of text and label (sst2, trec), ``tag`` for words and their tags (wnut17), else None."""
    return next((s for s, cols in COLUMN_STAGES.items() if all(c in row.data for c in cols)), None)


def _labelled(path: str, rows: list[Row], stage: str, model: str | None, max_length: int, show: int) -> str:
    """The report of a classification file: its classes (or tags) and how often each occurs, lengths, first rows."""
    from collections import Counter

    from .tasks import class_names, class_of, label_map, tag_row

    first, second = COLUMN_STAGES[stage]
    if stage == "cls":
        mapping = label_map(rows, second, None)
        names = class_names(mapping, None)
        counts = Counter(names[class_of(r.get(second), mapping)] for r in rows)  # type: ignore[index]
        texts = [r.text(first) for r in rows]
    else:
        for r in rows:
            tag_row(r, first, second)
        counts = Counter(str(t) for r in rows for t in r.get(second))
        names = sorted(counts)
    what, kind = ("classes", "sequence") if stage == "cls" else ("tags", "token")
    shares = "; ".join(f"{n}: {counts[n]:,} ({100 * counts[n] / max(1, sum(counts.values())):.1f}%)" for n in names)
    lines = [
        f"file: {path}",
        f"format: {first} + {second} ({kind} classification), detected from the columns",
        f"rows: {len(rows)}",
        f"stage: {stage}",
        f"{what} ({len(names)}): {shares}",
    ]
    if stage == "tag":
        words = [len(r.get(first)) for r in rows]
        lines.append(f"words per row: p50 {percentile(words, 50)}, p90 {percentile(words, 90)}, max {max(words)}")
    if model is not None:
        from ..train.models import load_tokenizer

        tok = load_tokenizer(model)
        if stage == "cls":
            lengths = [len(tok(t)["input_ids"]) for t in texts]
        else:
            lengths = [len(tok([str(w) for w in r.get(first)], is_split_into_words=True)["input_ids"]) for r in rows]
        lines += _length_lines(lengths, max_length, stage)
    for r in rows[:show]:
        lines += ["", f"--- {r.source}"]
        if stage == "cls":
            lines += [f"[{first}]", r.text(first) or "", f"[{second}] {r.get(second)}"]
        else:
            lines.append(" ".join(f"{w}/{t}" for w, t in zip(r.get(first), r.get(second))))
    return "\n".join(lines)


def _length_lines(lengths: list[int], max_length: int, stage: str, eos: bool = False) -> list[str]:
    """Token counts per row and what ``data.max_length`` does to them: pre-training joins the rows, each closed by
    ``eos`` where the tokenizer has one, and cuts blocks (no row is cut; the remainder short of a block dropped, as
    ``encode_pt``), PPO keeps a long prompt's end, the other stages cut or refuse a row."""
    p = {q: percentile(lengths, q) for q in (50, 90, 99, 100)}
    over = sum(n > max_length for n in lengths)
    what = "prompt tokens" if stage == "ppo" else "tokens"
    if stage == "text":
        total = sum(lengths) + eos * len(lengths)
        blocks, left = divmod(total, max_length)
        cut = (
            f"rows are joined and cut into blocks of data.max_length={max_length}: {total} tokens in all"
            + (f" (an EOS closing each of the {len(lengths)} rows)" if eos else "")
            + (f", {blocks} blocks" if blocks else ", fewer than one block: training refuses the file")
            + (f", the last {left} tokens (short of a block) dropped" if blocks and left else "")
        )
    elif stage == "ppo":
        cut = f"prompts longer than data.max_length={max_length}: {over} (their beginning cut, or refused with truncation=refuse)"
    else:
        cut = f"rows longer than data.max_length={max_length}: {over} (cut, or refused with truncation=refuse)"
    return [f"{what} per row: p50 {p[50]}, p90 {p[90]}, p99 {p[99]}, max {p[100]}", cut]


_RAW = "plain prompt and response texts, each answer closed by the EOS, as TRL renders standard rows"


class _NoTokenizer:
    """Stands in for a tokenizer when none is given: the built-in templates read only its EOS text."""

    eos_token = ""
    chat_template = None
