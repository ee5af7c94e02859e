"""Samples (``sample.Sample``) -> token ids for sft, rm, dpo and ppo, through one chat template.

Which template renders a stage's rows (``choose_template``):

- ``data.template`` set: that built-in template (chatml, alpaca, plain), or ``raw``: TRL's rendering of standard
  (string) rows with no chat template (``raw.py``; sft's prompt + completion + EOS too);
- else the tokenizer's own chat template, when it has one;
- else (rm, dpo, ppo only, and only for plain-string rows) ``RAW``: the prompt and response texts as they are,
  the encoding these stages used before chat templates (``preference.encode_lm`` / ``encode_scored``).

The labels of a causal LM are the token ids of the response's assistant turns (their end-of-turn marker
included) and -100 elsewhere, found from the character spans of those turns in the rendered text: the
same rule for an SFT conversation, a DPO response and a KTO completion. A reward model scores the whole rendered
conversation (the score is read at its last token). PPO samples after the rendered prompt and its generation
prompt (the assistant header), as at inference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..config import ConfigError
from .formats import read_samples
from .load import DataError, Row
from .preference import _no_eos_after, cut_lm, encode_lm, encode_scored, special_ends
from .raw import raw_refusal, raw_sft, raw_text
from .sample import Message, Sample, as_written
from .tasks import Encoded, _fit
from .templates import IGNORE_INDEX, TEMPLATES, ChatTemplateError, apply_chat_template, has_tool_support, render
from .tools import refusal

RAW = "raw"
"""No template: plain prompt and response strings, encoded as before chat templates."""

_F = TypeVar("_F", bound=Callable[..., Any])


def _named(fn: _F) -> _F:
    """A chat template's refusal of sample ``s`` (the first argument) names the row it came from."""

    @functools.wraps(fn)
    def wrapper(s: Sample, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(s, *args, **kwargs)
        except (ChatTemplateError, RecursionError) as exc:  # (a row nested too deep for transformers' rendering)
            if not s.source or (why := refusal(exc, s)) is None:  # (deltatune's own recursion: raised as it is)
                raise
            raise DataError(why if why.startswith(f"{s.source}: ") else f"{s.source}: {why}") from None  # (once)

    return wrapper  # type: ignore[return-value]


def _uses_tools(s: Sample) -> bool:
    msgs = [m for part in (s.messages, s.completion, s.chosen, s.rejected) for m in part or []]
    return bool(s.tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in msgs)


def _plain_pair(s: Sample) -> bool:
    """A row of one user prompt and one-message string responses (TRL's standard shape)."""
    return not s.conversational and len(s.messages) == 1 and s.messages[0]["role"] == "user" and not _uses_tools(s)


def choose_template(
    samples: Sequence[Sample], tokenizer, template: str | None, stage: str, pair_scorer: bool = False
) -> str | None:
    """The template that renders ``samples``: a built-in name, None (the tokenizer's own), or ``RAW``.

    Args:
        samples: the rows of a split.
        tokenizer: the model's tokenizer.
        template: ``data.template``.
        stage: the stage (sft needs a template; rm, dpo and ppo fall back to RAW for plain strings).
        pair_scorer: an encoder reward model, which reads plain-string pairs through its own pair template
            ([CLS] prompt [SEP] response [SEP]) as ``RewardScorer`` scores them in PPO.

    Raises:
        DataError: an unknown template; conversational rows and no template; tool calls and no template with tool
            support (the row named).
    """
    if template == RAW:  # TRL's plain rendering of standard rows, asked for
        bad = next((s for s in samples if raw_refusal(s, stage, _plain_pair(s))), None)
        if bad is not None:
            raise DataError(raw_refusal(bad, stage, False))
        return RAW
    if template is not None and template not in TEMPLATES:
        raise DataError(f"unknown template {template!r}; built-in templates: {', '.join(TEMPLATES)}, {RAW}")
    if pair_scorer and template is None and all(_plain_pair(s) for s in samples):
        return RAW
    if template is None and not getattr(tokenizer, "chat_template", None) and stage != "sft":
        bad = next((s for s in samples if not _plain_pair(s)), None)
        if bad is None:
            return RAW
        raise DataError(f"{bad.source}: a conversational row needs a chat template, and the tokenizer has none; set "
                        f"data.template to one of {', '.join(TEMPLATES)}")  # fmt: skip
    tooled = next((s for s in samples if _uses_tools(s)), None)
    if tooled is not None:
        if template is not None:
            raise DataError(f"{tooled.source}: the row has tool calls or tools, and data.template={template} has no "
                            "tool support; leave data.template unset to use a tokenizer chat template that renders "
                            "tools")  # fmt: skip
        if getattr(tokenizer, "chat_template", None) and not has_tool_support(tokenizer):
            raise DataError(f"{tooled.source}: the row has tool calls or tools, and the tokenizer's chat template has "
                            "no tool support (it never reads 'tools' or 'tool_calls'); use a model whose template "
                            "renders tools")  # fmt: skip
    return template


def _add_special(template: str | None) -> bool:
    # A tokenizer's chat template writes its own BOS (Llama's does); a built-in template does not.
    return template is not None


@_named
def sft_example(
    s: Sample, tokenizer, template: str | None, mask_history: bool = False, train_on_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """Ids and labels of an SFT sample: every assistant turn trains (only the completion's for prompt_completion).

    LLaMA-Factory's options: ``mask_history`` trains the last assistant turn only; ``train_on_prompt`` trains every
    token, the prompts and the template's markers too, but no answer that would not train without it (an earlier
    one under ``mask_history``, one weighted 0: LLaMA-Factory keeps a masked answer at -100 under it)."""
    return _sft(s, tokenizer, template, mask_history, train_on_prompt)[:2]


@_named
def _sft(
    s: Sample, tokenizer, template: str | None, mask_history: bool, train_on_prompt: bool
) -> tuple[list[int], list[int], list[int]]:
    """``sft_example``'s ids and labels, and the answers' labels (the labels without ``train_on_prompt``)."""
    from .templates import encode_chat

    if template == RAW:
        return raw_sft(s, tokenizer, train_on_prompt)
    conversation, start = _trained_from(s, mask_history)
    ids, answers = encode_chat(conversation, tokenizer, template, s.tools, start, True, s.template_kwargs)
    if s.format == "prompt_completion" and start == s.sft()[1]:  # (mask_history: the completion is the last turn)
        answers = _from_the_common_prefix(tokenizer, template, s.messages, s.tools, s.template_kwargs, ids, answers)
    if not train_on_prompt:
        return ids, answers, answers
    every = answers
    if mask_history or any(m.get("weight") == 0 for m in conversation):  # every answer, trained or not
        every = encode_chat(_unweighted(conversation), tokenizer, template, s.tools, s.sft()[1], True,
                            s.template_kwargs)[1]  # fmt: skip
    return ids, [IGNORE_INDEX if a == IGNORE_INDEX != e else i for i, e, a in zip(ids, every, answers)], answers


def _from_the_common_prefix(
    tokenizer, template: str | None, prompt: list[Message], tools, kwargs: dict[str, Any] | None, ids, labels
) -> list[int]:
    """``labels`` trained from where ``ids`` and the prompt rendered with its generation prompt part, where that is
    before the answer's span: TRL 1.16's SFT (prompt-completion), DPO and KTO trainers split a conversational row at
    ``common_prefix_length``. Qwen3's template with enable_thinking false ends its generation prompt with
    ``</think>`` and a ``"\n\n"`` token that the whole conversation tokenizes otherwise, so that token trains."""
    n, first = _prompt_split(tokenizer, template, prompt, tools, kwargs, ids, labels)
    return labels if n >= first else [*labels[:n], *ids[n:first], *labels[first:]]


def _prompt_split(
    tokenizer, template: str | None, prompt: list[Message], tools, kwargs: dict[str, Any] | None, ids, labels
) -> tuple[int, int]:
    """(where ``ids`` and the prompt rendered with its generation prompt part, the first trained label)."""
    first = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))
    if first == len(labels) or not prompt or prompt[-1]["role"] == "assistant":
        return first, first
    head = render(prompt, tokenizer, template, True, tools, len(prompt), kwargs=kwargs)[0]
    p = tokenizer(head, add_special_tokens=_add_special(template))["input_ids"]
    n = 0
    while n < min(len(p), first) and p[n] == ids[n]:
        n += 1
    return n, first


def _unweighted(conversation: list[Message]) -> list[Message]:
    return [{k: v for k, v in m.items() if k != "weight"} for m in conversation]


def _refuse_unrendered(s: Sample, mask_history: bool, template: str | None) -> None:
    """Refuses ``s`` when no token trains and an assistant turn is weighted to train: the chat template wrote none of
    its answers, or (RAW) the completion tokenized to nothing (TRL 1.16's SFTTrainer raises for it under
    assistant_only_loss, and drops such a prompt-completion row without a word); only answers weighted 0 leave a row
    with nothing to train, counted as ``unweighted``."""
    conversation, start = _trained_from(s, mask_history)
    if any(m["role"] == "assistant" and m.get("weight") != 0 for m in conversation[start:]):
        raise DataError(
            f"{s.source}: the completion adds no token after the prompt, so nothing would train; fix or drop the row"
            if template == RAW
            else f"{s.source}: the chat template renders none of the row's assistant answers, so nothing would "
            "train; use a template that writes the assistant turns (or set data.template to a built-in template)"
        )


def _trained_from(s: Sample, mask_history: bool) -> tuple[list[Message], int]:
    """``s.sft()``, its first trained message moved to the last assistant turn under ``mask_history``."""
    conversation, start = s.sft()
    if mask_history:
        start = max(start, max((i for i, m in enumerate(conversation) if m["role"] == "assistant"), default=0))
    return conversation, start


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LLaMA-Factory's split of ``cutoff_len`` between a prompt (source) and its answer (target), each kept from its
    start: a short answer whole, else a short prompt whole, else both in proportion to their lengths."""
    if target_len * 2 < cutoff_len:
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target_len = cutoff_len - source_len
    else:
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    return min(max(cutoff_len - new_target_len, 0), source_len), new_target_len


def _turns(s: Sample, tokenizer, template: str | None, n: int) -> list[tuple[int, int, int]]:
    """Under ``mask_history``: each turn of the ``n`` ids as (source start, target start, target end), LLaMA-Factory's
    (prompt, response) pairs: a target is a run of answer tokens, its source what comes between it and the answer
    before it (the first from 0, the system prompt with it); tokens after the last answer close the last target."""
    from .templates import encode_chat

    every = encode_chat(_unweighted(s.sft()[0]), tokenizer, template, s.tools, 0, True, s.template_kwargs)[1]
    out, src = [], 0
    for i in range(n):
        trained = every[i] != IGNORE_INDEX
        if trained and (i == 0 or every[i - 1] == IGNORE_INDEX):
            out.append((src, i, i))
        if trained:
            out[-1] = (*out[-1][:2], i + 1)
            src = i + 1
    return out[:-1] + [(*out[-1][:2], n)]


def _fill_from_the_last(
    ids: list[int], labels: list[int], turns: list[tuple[int, int, int]], max_length: int
) -> tuple[list[int], list[int]]:
    """LLaMA-Factory's mask_history cut: the turns from the last back, each cut by ``infer_seqlen`` to what
    ``max_length`` leaves (its source's start and its target's start), until nothing is left."""
    out_ids: list[int] = []
    out_labels: list[int] = []
    total = 0
    for s0, t0, t1 in reversed(turns):
        if total >= max_length:
            break
        ns, nt = infer_seqlen(t0 - s0, t1 - t0, max_length - total)
        out_ids = ids[s0 : s0 + ns] + ids[t0 : t0 + nt] + out_ids
        out_labels = labels[s0 : s0 + ns] + labels[t0 : t0 + nt] + out_labels
        total += ns + nt
    return out_ids, out_labels


def _lm(
    tokenizer,
    template: str | None,
    prompt: list[Message],
    response: list[Message],
    tools,
    max_length: int,
    kwargs: dict[str, Any] | None = None,
) -> tuple[dict[str, list[int]], bool]:
    """Causal-LM inputs of prompt + response, labels on the response's assistant turns; whether it was cut.

    Over-long rows keep the end of the prompt and as much of the response as fits (at least half of
    ``max_length`` when the response is that long), as ``preference.encode_lm`` does.
    """
    from .templates import encode_chat

    ids, labels = encode_chat(prompt + response, tokenizer, template, tools, len(prompt), kwargs=kwargs)
    labels = _from_the_common_prefix(tokenizer, template, prompt, tools, kwargs, ids, labels)
    return cut_lm({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, max_length)


@_named
def lm_example(
    s: Sample, response: list[Message], tokenizer, template: str | None, max_length: int, own_specials: bool = True
) -> tuple[dict[str, list[int]], bool]:
    """Causal-LM inputs of ``s``'s prompt followed by ``response`` (a chosen, rejected or KTO completion), labels
    -100 outside the response's assistant turns; whether the row was cut to ``max_length``."""
    return encode_prompt_response(s.messages, response, tokenizer, template, max_length, s.tools, s.template_kwargs,
                                  own_specials)  # fmt: skip


def encode_prompt_response(
    prompt: list[Message],
    response: list[Message],
    tokenizer,
    template: str | None,
    max_length: int,
    tools: list[dict] | None = None,
    template_kwargs: dict[str, Any] | None = None,
    own_specials: bool = True,
) -> tuple[dict[str, list[int]], bool]:
    """Causal-LM inputs of ``prompt`` messages followed by ``response`` messages (e.g. one triple of
    ``sample.unpaired_examples``), rendered with ``template`` (from ``choose_template``; ``template_kwargs``: the
    row's ``chat_template_kwargs``), labels -100 outside the response's assistant turns; whether the row was cut to
    ``max_length``."""
    if template == RAW:
        return encode_lm(tokenizer, as_written(prompt[0]), as_written(response[0]), max_length, own_specials)
    return _lm(tokenizer, template, prompt, response, tools, max_length, template_kwargs)


@_named
def scored_example(
    s: Sample, response: list[Message], tokenizer, template: str | None, max_length: int
) -> tuple[dict[str, list[int]], bool]:
    """Reward-model inputs of the prompt and ``response``: the rendered conversation (or, RAW, the tokenizer's pair
    template); over-long inputs lose the start of the prompt first."""
    if template == RAW:
        return encode_scored(tokenizer, as_written(s.messages[0]), as_written(response[0]), max_length)
    text, _ = render(s.messages + response, tokenizer, template, tools=s.tools, kwargs=s.template_kwargs, scored=True)
    enc = {k: list(v) for k, v in tokenizer(text, add_special_tokens=_add_special(template)).items()}
    n = len(enc["input_ids"])
    if n <= max_length:
        return enc, False
    return {k: v[n - max_length :] for k, v in enc.items()}, True


@_named
def prompt_ids(s: Sample, tokenizer, template: str | None, max_length: int) -> list[int]:
    """PPO: the prompt's ids, rendered with the generation prompt (the assistant header) so sampling continues as
    the assistant; the end is kept when it is longer than ``max_length``."""
    if template == RAW:  # opened as the raw rows trained (``encode_lm``): the tokenizer's leading specials, BERT's
        head = special_ends(tokenizer)[0]  # [CLS] too (only a BOS until probe 16), no closing [SEP] (its EOS)
        ids = tokenizer(as_written(s.messages[0]), add_special_tokens=False)["input_ids"]
        return head + ids[max(0, len(ids) - (max_length - len(head))) :]
    head = special_ends(tokenizer)[0] if _add_special(template) else []  # (not BERT's closing [SEP]: train.chat's)
    text = prompt_text(s.messages, tokenizer, template, s.tools, s.template_kwargs, s.source)
    ids = head + tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[max(0, len(ids) - max_length) :]


def prompt_text(messages: list[Message], tokenizer, template: str | None, tools=None, kwargs=None, where="") -> str:
    """The prompt rendered for sampling (PPO's, GRPO's, chat's, serve's): through the generation prompt, or, where it
    ends with an assistant turn (a prefill), continuing it, as TRL's ``maybe_apply_chat_template``
    (``continue_final_message``); ``where``, a row's file:line, names it in a refusal (``final_refusal``)."""
    n, go_on = len(messages), messages[-1].get("role") == "assistant"
    if template is None:  # (the stages check that the tokenizer has a chat template)
        kw = {**(kwargs or {}), **({"tools": tools} if tools else {})}
        try:
            return apply_chat_template(tokenizer, messages, where, tokenize=False, add_generation_prompt=not go_on,
                                       continue_final_message=go_on, **kw)  # fmt: skip
        except ValueError as exc:
            raise final_refusal(exc, f"{where}: messages[{n - 1}]" if where else f"messages[{n - 1}]") from None
    if not go_on:  # (else continued: a built-in template's generation prompt is its assistant prefix)
        return render(messages, tokenizer, template, True, tools, n, kwargs=kwargs)[0]
    return render(messages[:-1], tokenizer, template, True, tools, n, kwargs=kwargs)[0] + messages[-1]["content"]


def final_refusal(exc: ValueError, where: str) -> ValueError:
    """transformers' continue_final_message ValueError (the whole rendered chat in it) as one line after ``where``."""
    if isinstance(exc, DataError) or "continue_final_message is set but the final message does not" not in str(exc):
        return exc
    return ConfigError(f"{where}: the chat template does not write this final assistant message as it is, so the "
                       "answer cannot go on from it")  # fmt: skip


# -- what the report and ``deltatune data inspect`` show ---------------------------------------------------


def mark(text: str, spans: Sequence[tuple[int, int]], left: str = "[[", right: str = "]]") -> str:
    """``text`` with each trained span [start, end) wrapped in ``left`` ... ``right``."""
    out, at = [], 0
    for start, end in spans:
        out += [text[at:start], left, text[start:end], right]
        at = end
    return "".join([*out, text[at:]])


@_named
def rendered(
    s: Sample, tokenizer, template: str | None, stage: str, mask_history: bool = False, train_on_prompt: bool = False
) -> list[tuple[str, str, list[tuple[int, int]]]]:
    """What ``stage`` trains on for ``s``: (part, text, trained character spans) per sequence (sft: one, with
    ``sft_example``'s options; rm, dpo, kto: chosen and rejected; ppo: the prompt, nothing trained in it)."""
    if stage == "ppo":
        if template == RAW:
            return [("prompt", as_written(s.messages[0]), [])]
        return [("prompt", prompt_text(s.messages, tokenizer, template, s.tools, s.template_kwargs), [])]
    if s.text is not None:
        return [("text", s.text, [(0, len(s.text))])]
    if stage == "sft" and template == RAW:
        prompt, text = raw_text(s, tokenizer)
        return [("conversation", text, [(0 if train_on_prompt else len(prompt), len(text))])]
    if stage == "sft":
        conversation, start = _trained_from(s, mask_history)
        text, spans = render(conversation, tokenizer, template, False, s.tools, start, True, s.template_kwargs)
        if s.format == "prompt_completion" and start == s.sft()[1] and not train_on_prompt:
            spans = _from_the_split(s, tokenizer, template, conversation, start, True, text, spans)
        if train_on_prompt:  # every character but the answers left out (earlier ones under mask_history, weight 0)
            every = render(_unweighted(conversation), tokenizer, template, False, s.tools, s.sft()[1], True,
                           s.template_kwargs)[1]  # fmt: skip
            edges = [0, *[x for span in every if span not in spans for x in span], len(text)]
            spans = [(a, b) for a, b in zip(edges[::2], edges[1::2]) if a < b]
        return [("conversation", text, spans)]
    responses = ([("chosen", s.chosen), ("rejected", s.rejected)] if s.chosen is not None
                 else [("completion", s.completion or [])])  # fmt: skip
    out = []
    for part, response in responses:
        if template == RAW:  # the text the model reads: the tokenizer's pair template (rm), or prompt + answer + EOS
            p, r = as_written(s.messages[0]), as_written(response[0])
            eos = tokenizer.eos_token  # encode_lm closes the answer with it, as TRL's add_eos
            if stage == "rm" and not (eos and _no_eos_after(tokenizer)):  # an encoder's pair template
                out.append((part, tokenizer.decode(tokenizer(p, r)["input_ids"]), []))
                continue
            r += eos if eos and not r.endswith(eos) else ""
            if stage == "rm":  # a decoder's: the text whole, the score read at its EOS
                out.append((part, p + r, []))
                continue
            out.append((part, p + r, [(len(p), len(p) + len(r))]))
            continue
        text, spans = render(s.messages + response, tokenizer, template, False, s.tools, len(s.messages),
                             kwargs=s.template_kwargs, scored=stage == "rm")  # fmt: skip
        if stage != "rm":
            spans = _from_the_split(s, tokenizer, template, s.messages + response, len(s.messages), False, text, spans)
        out.append((part, text, [] if stage == "rm" else spans))
    return out


def _from_the_split(s: Sample, tokenizer, template, conversation, start, stop, text, spans) -> list[tuple[int, int]]:
    """``spans`` with the first one moved back over the tokens that train before the answer's text (the rendered
    prompt's last tokens that the whole conversation tokenizes otherwise: ``_from_the_common_prefix``)."""
    from .templates import encode_chat

    if not spans or not hasattr(tokenizer, "decode"):  # (data inspect without --model: no tokens)
        return spans
    ids, labels = encode_chat(conversation, tokenizer, template, s.tools, start, stop, s.template_kwargs)
    n, first = _prompt_split(tokenizer, template, conversation[:start], s.tools, s.template_kwargs, ids, labels)
    extra = tokenizer.decode(ids[n:first]) if n < first else ""
    (a, b), rest = spans[0], spans[1:]
    return [(a - len(extra), b), *rest] if extra and text[a - len(extra) : a] == extra else spans


def format_note(samples: Sequence[Sample], forced: bool | str | None, stage: str | None = None) -> str:
    """The report line naming the data format (``forced``: data.format, or whether it was given); a format the
    stage reshaped (LLaMA-Factory's KTO and PPO rows) is named as given and as the stage reads it."""
    s = samples[0]
    shape = "" if s.format in ("text", "alpaca") else " (conversational)" if s.conversational else " (standard)"
    given = "messages" if forced == "openai" else forced
    if isinstance(given, str) and given != s.format and not given.startswith(s.format.split("_")[0]):
        return f"data format: {forced}, set by data.format; read by stage {stage or 'this'} as {s.format}{shape}"
    how = "set by data.format" if forced else "detected from the rows"
    if s.written and not forced:  # a conversation the stage reshaped: named as the rows hold it, as a forced one is
        return f"data format: {s.written}, {how}; read by stage {stage or 'this'} as {s.format}{shape}"
    return f"data format: {s.format}{shape}, {how}"


def first_row_note(
    split: str,
    s: Sample,
    tokenizer,
    template: str | None,
    stage: str,
    mask_history: bool = False,
    train_on_prompt: bool = False,
) -> str:
    """The report note showing the first row of a split as rendered, trained spans between [[ and ]] (sft: with
    ``sft_example``'s options)."""
    how = {RAW: "no chat template (plain text)", None: "the tokenizer's chat template"}.get(
        template, f"the built-in {template} template")  # fmt: skip
    what = {"rm": "the reward is read at the last token", "ppo": "the policy samples its response after it"}.get(
        stage, "trained tokens between [[ and ]]")  # fmt: skip
    lines = [f"first {split} row ({s.source}) as rendered with {how}; {what}:"]
    for part, text, spans in rendered(s, tokenizer, template, stage, mask_history, train_on_prompt):
        lines += ["", f"  {part}:", "", "  ```text", *["  " + line for line in mark(text, spans).split("\n")], "  ```"]
    return "\n".join(lines)


def lengths(examples: Sequence[dict[str, Any]]) -> list[int]:
    """Token lengths of encoded examples (the longer sequence of a pair)."""
    out = []
    for ex in examples:
        if "chosen" in ex:
            out.append(max(len(ex["chosen"]["input_ids"]), len(ex["rejected"]["input_ids"])))
        else:
            out.append(len(ex["input_ids"]))
    return out


def encode_pair_samples(
    samples: Sequence[Sample],
    tokenizer,
    template: str | None,
    max_length: int,
    truncation: str,
    causal: bool,
    shared_prompt: bool = False,
):
    """Each preference sample as ``{"chosen": inputs, "rejected": inputs}`` (``lm_example`` when ``causal``, else
    ``scored_example``); rows cut to ``max_length`` are counted, or refused with ``truncation="refuse"``.
    ``shared_prompt`` (DPO): both answers start where the earlier one does, as TRL's DPOTrainer splits a pair at the
    shorter of its two prompt lengths (``' Hello'`` taking the prompt's last space makes the other side's answer
    start at that ``' '``); ORPO's and SimPO's trainers split each side at its own."""

    encode = lm_example if causal else scored_example
    if causal and not shared_prompt:  # orpo, simpo, cpo: raw rows without the tokenizer's own specials, as TRL's
        encode = functools.partial(lm_example, own_specials=False)
    shared_prompt = shared_prompt and causal
    out, truncated = [], 0
    for s in samples:
        whole = 10**9 if shared_prompt else max_length  # (DPO: split the whole pair, then cut each side)
        chosen, cut_c = encode(s, s.chosen, tokenizer, template, whole)
        rejected, cut_r = encode(s, s.rejected, tokenizer, template, whole)
        if shared_prompt:
            _answers_from_the_shorter_prompt(chosen, rejected)
            (chosen, cut_c), (rejected, cut_r) = (
                cut_lm(x, max_length, _lead(tokenizer, template, x)) for x in (chosen, rejected)
            )
        if (cut_c or cut_r) and truncation == "refuse":
            raise DataError(
                f"{s.source}: longer than data.max_length={max_length} tokens "
                "(set data.truncation=truncate to cut such rows)"
            )
        truncated += cut_c or cut_r
        out.append({"chosen": chosen, "rejected": rejected})
    return Encoded(out, truncated)


def _lead(tokenizer, template: str | None, ex: dict[str, list[int]]) -> int:
    """How many leading special tokens a cut keeps: RAW's (``encode_lm``'s: the tokenizer's own, BERT's [CLS],
    Llama's BOS, before the answer); none through a chat template (``_lm``'s)."""
    if template != RAW:
        return 0
    head = special_ends(tokenizer)[0]
    first = next((i for i, lab in enumerate(ex["labels"]) if lab != IGNORE_INDEX), len(ex["labels"]))
    return len(head) if ex["input_ids"][: len(head)] == head and len(head) <= first else 0


def _answers_from_the_shorter_prompt(*sides: dict[str, list[int]]) -> None:
    firsts = [next((i for i, lab in enumerate(x["labels"]) if lab != IGNORE_INDEX), len(x["labels"])) for x in sides]
    n = min(firsts)
    if all(x["input_ids"][:n] == sides[0]["input_ids"][:n] for x in sides):
        for x, first in zip(sides, firsts):
            x["labels"][n:first] = x["input_ids"][n:first]


def scorer_template(recipe: dict[str, Any], tokenizer, encoder: bool) -> str | None:
    """The template a finished reward run (its run.yaml ``recipe``) rendered its pairs with, so scoring in PPO
    renders (prompt, response) the same way: data.template when set; else RAW for an encoder or a tokenizer with
    no chat template (plain-string pairs); else the tokenizer's own (None)."""
    template = (recipe.get("data") or {}).get("template")
    if template is not None:
        return template
    return RAW if encoder or not getattr(tokenizer, "chat_template", None) else None


def score_inputs(tokenizer, template: str | None, prompt: str, response: str, max_length: int) -> dict[str, list[int]]:
    """Reward-model inputs of one (prompt, response) text pair rendered as a user turn and an assistant turn with
    ``template`` (RAW: the tokenizer's pair template), as ``scored_example`` encodes them in training."""
    s = Sample("", "preference", [{"role": "user", "content": prompt}], conversational=False)
    return scored_example(s, [{"role": "assistant", "content": response}], tokenizer, template, max_length)[0]


def encode_sft(
    rows: Sequence[Row],
    tokenizer,
    columns: dict[str, str],
    template: str | None,
    max_length: int,
    truncation: str = "truncate",
) -> Encoded:
    """Instruction / chat tuning: loss on assistant tokens only (rows in any SFT format, ``formats.read_samples``)."""
    return encode_sft_samples(read_samples(rows, columns, stage="sft"), tokenizer, template, max_length, truncation)


def encode_sft_samples(
    samples: Sequence[Any],
    tokenizer,
    template: str | None,
    max_length: int,
    truncation: str = "truncate",
    mask_history: bool = False,
    train_on_prompt: bool = False,
) -> Encoded:
    """SFT samples (``formats.Sample``) -> ids and labels on the assistant turns (the completion's only, for
    prompt_completion rows); rows left with no trained token after truncation are dropped and counted in ``dropped``.
    ``mask_history`` and ``train_on_prompt`` as ``sft_example``'s; an over-long row keeps its first ``max_length``
    tokens, under ``mask_history`` its turns from the last back, as LLaMA-Factory encodes them: each turn's prompt
    start and answer start as its ``infer_seqlen`` splits what ``max_length`` leaves (the last turn whole where it
    fits, earlier ones cut). A row whose answers would train nothing at any length is counted in ``unweighted``
    (every answer weighted 0; the last, under ``mask_history``), whatever ``train_on_prompt``; one whose answers
    are weighted to train but not rendered (``_refuse_unrendered``) raises DataError naming it."""
    out, counter, dropped, unweighted, first = [], [0], 0, 0, {"dropped": "", "unweighted": ""}
    for s in samples:
        ids, labels, answers = _sft(s, tokenizer, template, mask_history, train_on_prompt)
        if all(label == IGNORE_INDEX for label in answers):
            _refuse_unrendered(s, mask_history, template)
            unweighted += 1
            first["unweighted"] = first["unweighted"] or s.source
            continue
        keep = _fit(ids, max_length, Row({}, s.source), truncation, counter)
        if mask_history and keep < len(ids) and template != RAW:  # (RAW: one completion, cut as TRL cuts it)
            ids, labels = _fill_from_the_last(ids, labels, _turns(s, tokenizer, template, len(ids)), max_length)
        else:
            ids, labels = ids[:keep], labels[:keep]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            first["dropped"] = first["dropped"] or s.source
            continue
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return Encoded(out, counter[0], dropped, unweighted=unweighted, first_dropped=first["dropped"],
                   first_unweighted=first["unweighted"])  # fmt: skip
