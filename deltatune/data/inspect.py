"""``deltatune data inspect FILE``: what a stage would train on, before any training.

Prints the detected format, the row count, token-length percentiles, how many rows ``data.max_length`` would cut,
and the first rows rendered as the stage renders them, with the trained tokens between [[ and ]].
"""

from __future__ import annotations

from ..config import ConfigError
from .formats import FORMATS, STAGE_FORMATS, detect, read_samples
from .load import DataError, read_rows
from .sample import refuse_multimodal

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
    from .encode import choose_template, lm_example, rendered, scored_example, sft_example

    if show < 0:
        raise ConfigError(f"--rows must be >= 0, got {show}")
    if max_length < 1:
        raise ConfigError(f"--max-length must be >= 1, got {max_length}")
    if data_format is not None and data_format not in FORMATS:
        raise ConfigError(f"--format {data_format!r} is not a known format; formats: {', '.join(FORMATS)}")
    if stage is not None and stage not in STAGE_FORMATS:  # cls, tag, seq2seq, grpo, images read their columns as is
        raise ConfigError(
            f"--stage {stage}: data inspect renders the stages that read text, chat or preference rows "
            f"({', '.join(STAGE_FORMATS)})"
        )
    rows = read_rows(path)
    fmt = data_format or detect(rows[0], columns)
    stage = stage or default_stage(fmt)
    if fmt not in STAGE_FORMATS[stage]:
        raise DataError(
            f"{path}: stage {stage} does not read the {fmt} format; it reads {', '.join(STAGE_FORMATS[stage])}"
        )
    skipped: list[str] = []
    samples = read_samples(rows, columns, data_format, tags, stage, skipped)
    refuse_multimodal(samples, stage)
    shape = "" if fmt in ("text", "alpaca") else " (conversational)" if samples[0].conversational else " (standard)"
    lines = [
        f"file: {path}",
        f"format: {fmt}{shape}, {'set by --format' if data_format else 'detected from the rows'}",
        f"rows: {len(samples) + len(skipped)}",
        f"stage: {stage}",
    ]
    if skipped:
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        lines.append(
            f"bad pairs (an empty response, or chosen == rejected): {len(skipped)}, refused unless "
            f"data.bad_pairs=skip: {shown}"
        )
    if model is None:
        tok, template = _NoTokenizer(), template or "chatml"
        lines.append(
            f"template: the built-in {template} template (give --model for its chat template and token counts)"
        )
    else:
        from ..train.models import load_tokenizer

        tok = load_tokenizer(model)
        template = choose_template(samples, tok, template, stage) if fmt != "text" else template
        if fmt == "text":
            how = "none (pre-training reads the text as it is)"
        elif template == "raw":
            how = "none (the tokenizer has no chat template; plain prompt and response texts)"
        else:
            how = "the tokenizer's chat template" if template is None else f"the built-in {template} template"
        lines.append(f"template: {how}")
        counts = []
        for s in samples:
            if fmt == "text":
                counts.append(len(tok(s.text, add_special_tokens=False)["input_ids"]))
            elif stage == "sft" or s.chosen is None and s.completion is None:
                counts.append(len(sft_example(s, tok, template)[0]) if stage == "sft" else 0)
            else:
                encode = scored_example if stage == "rm" else lm_example
                responses = [s.chosen, s.rejected] if s.chosen is not None else [s.completion]
                counts.append(max(len(encode(s, r, tok, template, 10**9)[0]["input_ids"]) for r in responses))
        if any(counts):
            p = {q: percentile(counts, q) for q in (50, 90, 99, 100)}
            lines.append(f"tokens per row: p50 {p[50]}, p90 {p[90]}, p99 {p[99]}, max {p[100]}")
            over = sum(c > max_length for c in counts)
            lines.append(
                f"rows longer than data.max_length={max_length}: {over} (cut, or refused with truncation=refuse)"
            )
    if fmt == "text":
        return "\n".join(lines)
    from .encode import mark

    for s in samples[:show]:
        lines += ["", f"--- {s.source} (trained tokens between [[ and ]])"]
        for part, text, spans in rendered(s, tok, template, stage):
            lines += [f"[{part}]", mark(text, spans)]
    return "\n".join(lines)


class _NoTokenizer:
    """Stands in for a tokenizer when none is given: the built-in templates read only its EOS text."""

    eos_token = ""
    chat_template = None
