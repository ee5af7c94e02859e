"""Prompts and answers for ``deltatune generate`` and ``chat``, and the before/after samples a run prints.

A chat model is prompted the way it was trained: the tokenizer's chat template renders the conversation and adds
the assistant's generation prefix. Without one (a base model) the text goes in as it is, and the caller is told so
once. ``raw=True`` always sends the text as it is. Answers are the new tokens only, decoded without special tokens;
greedy unless a temperature is given.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext, suppress
from typing import Any

import torch

from ..config import ConfigError
from ..data.sample import REASONING
from ..data.templates import apply_chat_template, stop_ids

Messages = list[dict[str, Any]]
GENERATIVE = ("CAUSAL_LM", "SEQ_2_SEQ_LM")


class Conversation(list):
    """A conversation prompt (a list of messages) with its row's tool schemas and chat-template variables
    (``Sample.tools``, ``Sample.template_kwargs``), which ``prompt_ids`` renders with it, as the run trained."""

    def __init__(self, messages: Messages, tools: list[dict] | None = None, kwargs: dict[str, Any] | None = None):
        super().__init__(messages)
        self.tools, self.kwargs = tools, kwargs


def has_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def chat_templated(tok, raw: bool = False, template: str | None = None) -> bool:
    """Whether :func:`prompt_ids` renders a prompt through the tokenizer's own chat template (not ``raw``, no built-in
    ``template``): ``generate``'s ``templated``, its end-of-turn stop."""
    return not raw and template is None and has_template(tok)


def check_text(text: str | None, what: str) -> None:
    """ConfigError naming ``what`` when ``text`` holds bytes that are not UTF-8 (a terminal's or a file's in
    another encoding: Python hands them over as lone surrogates, which a tokenizer refuses with a traceback)."""
    try:
        (text or "").encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{what} holds bytes that are not UTF-8 text; give it in UTF-8") from None


def check_base(model, what: str) -> None:
    """ConfigError when ``model``'s adapter trained base weights in place (full, freeze, BitFit, LoRA biases): its
    adapter cannot be switched off, so there is no base answer to show."""
    trains_base, active = getattr(model, "_base_trainables", {}), getattr(model, "active_adapters", [])
    if any(trains_base.get(n) for n in (active if isinstance(active, list) else [])):  # (a plain model's: a method)
        raise ConfigError(f"{what}: the run trained the base model's own weights in place, so there is no base model "
                          "left to answer; load the base model on its own to compare")  # fmt: skip


def prompt_ids(
    tok,
    prompt: str | Messages,
    raw: bool = False,
    system: str | None = None,
    template: str | None = None,
    continue_final: bool = True,
) -> list[int]:
    """Token ids of ``prompt`` (a user message, or a whole conversation ending with a user or tool turn, or with an
    assistant turn to go on with, transformers' ``continue_final_message``) ready for generation: through
    ``template`` (a built-in one a run trained with, ``data.template``) when given, else the chat template when the
    tokenizer has one; the text as the tokenizer encodes it when ``raw`` (a seq2seq source keeps T5's closing
    ``</s>``), else, without a chat template, after its leading specials alone. ``continue_final`` false closes a final
    assistant turn and opens a new one (vLLM's chat default, ``add_generation_prompt``)."""
    for m in [{"content": prompt}] if isinstance(prompt, str) else prompt:
        check_text(m.get("content") if isinstance(m.get("content"), str) else None, "the prompt")
    tools, kwargs = getattr(prompt, "tools", None), getattr(prompt, "kwargs", None)  # (a Conversation's)
    check_text(system, "the system prompt")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None and (not messages or messages[0]["role"] != "system"):  # (a row's own one wins)
        messages = [{"role": "system", "content": system}, *messages]
    go_on = continue_final and bool(messages) and messages[-1]["role"] == "assistant"  # (a prefilled answer)
    if template is not None and not raw:
        from ..data.encode import prompt_text
        from ..data.preference import special_ends
        from ..data.templates import render

        # Continued as PPO's prompt continues it: the turns before it through the generation prompt, then its text
        text = (
            prompt_text(messages, tok, template, tools, kwargs)
            if go_on and isinstance(messages[-1]["content"], str)  # (else refused by render, naming the message)
            else render(messages, tok, template, add_generation_prompt=True, tools=tools, kwargs=kwargs)[0]
        )
        # The tokenizer's leading specials (Llama's BOS, BERT's [CLS]) as training put them before the conversation;
        # not its closing ones (BERT's [SEP]), which training has after the answer, not after the assistant header.
        return special_ends(tok)[0] + tok(text, add_special_tokens=False)["input_ids"]
    if raw or not has_template(tok):
        if not isinstance(prompt, str):
            raise ConfigError("a conversation needs a chat template; this tokenizer has none")
        if system is not None:  # (dropped without a word before; data.template=raw refuses it too)
            why = "--raw" if raw else "the tokenizer has no chat template"
            raise ConfigError(f"--system: the prompt goes as plain text ({why}), which has no place for a system "
                              "prompt; leave --system out, or put its text in the prompt")  # fmt: skip
        if raw:  # (--raw, a seq2seq model's source: the text as the tokenizer encodes it, T5's closing </s> too)
            return tok(prompt, add_special_tokens=True)["input_ids"]
        from ..data.preference import special_ends

        # As a run read without a template opens its rows (and its PPO prompt): the leading specials, BERT's [CLS],
        # not its closing [SEP], which training has after the answer.
        return special_ends(tok)[0] + tok(prompt, add_special_tokens=False)["input_ids"]
    more = {**(kwargs or {}), **({"tools": tools} if tools else {}), "tokenize": True, "return_dict": True}
    try:
        ids = apply_chat_template(tok, messages, add_generation_prompt=not go_on, continue_final_message=go_on, **more)
    except ValueError as exc:  # transformers' many lines (with the whole rendered chat): one, naming the message
        from ..data.encode import final_refusal

        raise (final_refusal(exc, f"messages[{len(messages) - 1}]") if go_on else exc) from None
    return list(ids["input_ids"])


def check_sampling(max_new_tokens: int, temperature: float, top_p: float | None, seed: int | None = None) -> None:
    """Raises ConfigError naming the option when a sampling setting is out of range, or ``top_p`` is given for a greedy
    decode (temperature 0), which would ignore it."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= temperature < float("inf"):
        raise ConfigError(f"--temperature must be a number >= 0 (0 decodes greedily), got {temperature}")
    if seed is not None and not -(2**63) <= seed < 2**64:  # torch's generators take no other
        raise ConfigError(f"--seed must be in [-2**63, 2**64), got {seed}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p}")
    if top_p is not None and temperature == 0:  # (ignored without a word before; transformers' generate warns)
        raise ConfigError(f"--top-p {top_p} applies to sampling, and --temperature 0 decodes greedily; give "
                          "--temperature > 0 too, or leave --top-p out")  # fmt: skip


def sampling_kwargs(temperature: float, top_p: float | None) -> dict[str, Any]:
    """``generate``'s sampling arguments: greedy at temperature 0, else sampling at ``temperature`` and ``top_p``
    (None: the model's generation config's, as ``generate`` takes it; Qwen2.5-Instruct's is 0.8)."""
    if temperature <= 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature} | ({} if top_p is None else {"top_p": top_p})


def generate(
    model: torch.nn.Module,
    tok,
    ids: Sequence[int],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int | None = None,
    num_beams: int = 1,
    template: str | None = None,
    templated: bool = False,
    stream: Callable[[str], None] | None = None,
) -> str:
    """The model's answer to the prompt ``ids``: greedy (``temperature`` 0) or sampled, new tokens only; it stops on
    the generation config's EOS ids and the tokenizer's EOS (as serve), and where the built-in ``template`` it trained with ends an answer (``templates.stop_ids``: chatml's
    ``<|im_end|>`` where the tokenizer has no EOS), and, when ``templated`` (the tokenizer's own chat template
    rendered the prompt: :func:`chat_templated`), where that template ends a turn (:func:`_turn_end_id`); not for a
    prompt sent as text (``--raw``, a stage-pt run's samples), which the template never framed. ``stream`` (a beam of
    one) is handed the answer's text as its tokens come (:class:`_Streamer`), the pieces adding up to the answer (where
    a tokenizer's decode took back text already streamed: a newline and the answer again). An encoder-decoder's
    answer is its decoder's tokens after the start token, as transformers' TextStreamer(skip_prompt=True) prints it.

    Raises:
        ConfigError: the prompt and ``max_new_tokens`` do not fit the model's context (a model with learned positions,
            GPT-2's, failed with an IndexError inside torch; others answered past what they were trained on).
    """
    check_sampling(max_new_tokens, temperature, top_p)
    over = overflow(model, len(ids), max_new_tokens)
    if over:
        raise ConfigError(over)
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    input_ids = torch.tensor([list(ids)], device=device)
    sampling = sampling_kwargs(temperature, top_p)
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    own = [] if own is None else own if isinstance(own, list) else [own]
    # Beside the generation config's own stops: the tokenizer's EOS, as serve, vLLM and LLaMA-Factory stop on it (a
    # base whose config names none ran on past it); the built-in template's end marker (stop_ids); the chat
    # template's end of a turn when it rendered the prompt (as LLaMA-Factory's stop words)
    decoder_only = not getattr(model.config, "is_encoder_decoder", False)
    turn_end = _turn_end_id(tok) if templated and decoder_only else None
    extra = [tok.eos_token_id, *(stop_ids(tok, template) if template is not None else []), turn_end]
    extra = list(dict.fromkeys(i for i in extra if i is not None and i not in own))
    if extra:
        sampling["eos_token_id"] = [*own, *extra]
    marker = _end_marker(tok, template)  # (None where the marker is one token: stop_ids gave its id)
    if marker:  # several tokens (no stop id): stopped on as text, as transformers' stop_strings (which fails on
        start = input_ids.shape[1] if decoder_only else 1  # (an encoder-decoder's criteria see its decoder's ids,
        sampling["stopping_criteria"] = _stop_on_text(tok, marker, start)  # after its start token; some vocabularies)
    streamer = _Streamer(tok, marker, stream) if stream is not None else None
    if streamer is not None:
        sampling["streamer"] = streamer
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            pad_token_id=tok.pad_token_id,
            **sampling,
        )
    new = out[0, input_ids.shape[1] if decoder_only else 1 :]  # (an encoder-decoder's: after its start token, which
    answer = tok.decode(new, skip_special_tokens=True)  # a tokenizer not its own may not take as special)
    answer = (answer.split(marker)[0] if marker else answer).strip()
    if streamer is not None and answer.startswith(streamer.sent):  # what the stream held back (a marker's opening)
        if answer[len(streamer.sent) :]:
            stream(answer[len(streamer.sent) :])
    elif streamer is not None:  # decode took back streamed text (a cleanup not foreseen): the answer on a new line
        stream("\n" + answer)
    return answer


# The ends of a text that transformers' clean_up_tokenization (clean_up_tokenization_spaces: WordPiece, Unigram) may
# still change with the next token by taking a blank back: " '" (of " ' ", " 's", " 'm"), " 'v", " 'r", " n", " n'",
# " n '" (" n ' t" -> "n't"); " ." and the like take back nothing streamed (a trailing blank is held anyway)
_CLEANUP_OPEN = re.compile(r" (?:n(?: ?')?|'[vr]?)$")


class _Streamer:
    """transformers' streamer protocol (``put`` / ``end``, as its TextStreamer, which transformers' ``chat`` and
    LLaMA-Factory's ``chat`` print answers with as they come): hands ``out`` the answer's new text after each token,
    as :func:`generate` will return it: special tokens skipped, cut at the text ``marker``, its leading blanks dropped,
    and held back: an unfinished character (U+FFFD), trailing blanks, an opening of the marker, an end the tokenizer's
    cleanup may take a blank back from (``_CLEANUP_OPEN``)."""

    def __init__(self, tok, marker: str | None, out: Callable[[str], None]) -> None:
        self.tok, self.marker, self.out = tok, marker, out
        self.cleans = bool(getattr(tok, "clean_up_tokenization_spaces", False))
        self.ids: list[int] = []
        self.sent, self.started, self.done = "", False, False

    def put(self, value: torch.Tensor) -> None:
        if not self.started:  # the prompt (an encoder-decoder's: its decoder's start token), as TextStreamer skips it
            self.started = True
            return
        self.ids += value.reshape(-1).tolist()
        if self.done:
            return
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if self.marker and self.marker in text:
            text, self.done = text.split(self.marker)[0], True
        elif self.marker:
            text = text[: len(text) - next((k for k in range(len(self.marker), 0, -1)
                                            if text.endswith(self.marker[:k])), 0)]  # fmt: skip
        text = text.rstrip("\ufffd").strip()
        if self.cleans:
            text = _CLEANUP_OPEN.sub("", text).rstrip()
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.out(text[len(self.sent) :])
            self.sent = text

    def end(self) -> None:
        pass


def _turn_end_id(tok) -> int | None:
    """The special token the tokenizer's chat template closes an assistant turn with (Qwen's and SmolLM2's
    ``<|im_end|>``, Llama 3's ``<|eot_id|>``, Gemma's ``<end_of_turn>``), which a model tuned on it ends its answers
    with though the generation config may stop on another (Qwen2.5's base: ``<|endoftext|>``); None where there is
    none or the template renders no plain exchange (with a system turn first, for one that wants it)."""
    if not has_template(tok):
        return None
    mark = "\u2063deltatune\u2063"  # (a text no template writes)
    exchange = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}]
    text = None
    for conversation in (exchange, [{"role": "system", "content": "hi"}, *exchange]):
        try:
            text = tok.apply_chat_template(conversation, tokenize=False)
            break
        except Exception:  # noqa: BLE001, S112 (a template that refuses it: with a system turn, else no extra stop)
            continue
    after = text.split(mark, 1)[1].lstrip() if isinstance(text, str) and mark in text else ""
    specials = sorted(
        (t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if t.special), key=len, reverse=True
    )
    end = next((t for t in specials if t and after.startswith(t)), None)
    return None if end is None else tok.convert_tokens_to_ids(end)


def _stop_on_text(tok, text: str, start: int):
    """A stopping criterion: a sequence is done once the last few of its new tokens (from ``start``) decode to hold
    ``text``; as many as ``text`` has characters or twice its own tokens, and two more (a model may write it in more,
    finer tokens than it encodes to: ``<``, ``|``, ``im``, ...)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    span = max(len(text), 2 * len(tok(text, add_special_tokens=False)["input_ids"])) + 2

    class StopOnText(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            tails = input_ids[:, max(start, input_ids.shape[1] - span) :]
            done = [text in tok.decode(row, skip_special_tokens=False) for row in tails]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopOnText()])


def _end_marker(tok, template: str | None) -> str | None:
    """The text of the built-in ``template``'s end-of-answer marker where it trains in the EOS's place (a tokenizer
    without one) and is more than one token, which ``templates.stop_ids`` gives no id for; else None."""
    from ..data.templates import TEMPLATES

    t = TEMPLATES.get(template or "")
    if t is None or tok.eos_token_id is not None or not t.suffix_trains:
        return None
    marker = t.assistant.split("{content}")[1].strip()
    return marker if len(tok(marker, add_special_tokens=False)["input_ids"]) > 1 else None


def overflow(model: torch.nn.Module, prompt: int, max_new_tokens: int) -> str | None:
    """Why a prompt of ``prompt`` tokens and ``max_new_tokens`` more do not fit ``model``'s context, or None when they
    do. An encoder-decoder's prompt is read by its encoder, its answer by its decoder (BART's learned positions
    each; T5's have no limit), a token adapter's virtual tokens by the part they land in (``seq2seq.virtual_tokens``:
    prompt tuning's the encoder, prefix tuning's the decoder)."""
    from ..targets import context_length

    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        from .seq2seq import positions, virtual_tokens

        n, where = virtual_tokens(model)
        for part, need, asked in (
            ("encoder", prompt, f"the prompt is {prompt} tokens"),
            (
                "decoder",
                max_new_tokens,
                f"--max-new-tokens {max_new_tokens} can read up to {max_new_tokens} positions",
            ),
        ):
            limit, virtual = positions(model, part), n if where == part else 0
            if limit is not None and need + virtual > limit:
                also = f" and the adapter's {virtual} virtual tokens" if virtual else ""
                return f"{asked}{also}: {need + virtual} positions, over the model's {part}'s {limit}"
        return None
    context = context_length(config) if config is not None else None
    # A token adapter's virtual tokens take positions too (a plain model's active_adapters is a method: none).
    configs, active = getattr(model, "peft_config", {}), getattr(model, "active_adapters", None)
    active = active if isinstance(active, list) else []
    virtual = max((getattr(configs[n], "num_virtual_tokens", 0) or 0 for n in active if n in configs), default=0)
    need = prompt + virtual + max_new_tokens
    if context is None or need <= context:
        return None
    asked = f" and --max-new-tokens {max_new_tokens}" + (
        f" and the adapter's {virtual} virtual tokens" if virtual else ""
    )
    return f"the prompt is {prompt} tokens{asked}: {need} positions, over the model's context of {context}"


def adapter_off(model: torch.nn.Module):
    """A context in which ``model`` answers as its base (a DeltaModel's adapter disabled; a plain model as is)."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if disable is not None else nullcontext()


def compare(model, tok, prompts: Sequence[str | Messages], **kwargs: Any) -> list[dict[str, str]]:
    """For each prompt, the base model's answer (adapter off) and the adapted model's, greedy unless sampled.

    Returns rows ``{"prompt", "base", "adapter"}``; ``kwargs`` go to :func:`prompt_ids` (raw, system) and
    :func:`generate` (max_new_tokens, temperature, ...)."""
    render = {k: kwargs.pop(k) for k in ("raw", "system", "template") if k in kwargs}
    own = chat_templated(tok, render.get("raw", False), render.get("template"))  # (its end-of-turn stop)
    was_training = model.training
    model.eval()
    rows = []
    try:
        check_base(model, "base")
        in_place = False
    except ConfigError:  # full, freeze, BitFit: the adapter cannot be switched off, so no base answers
        in_place = True
    try:
        for prompt in prompts:
            ids = prompt_ids(tok, prompt, **render)
            with adapter_off(model):
                base = (
                    "(none: the run trained the base model in place)"
                    if in_place
                    else generate(model, tok, ids, templated=own, **kwargs)
                )
            tuned = generate(model, tok, ids, template=render.get("template"), templated=own, **kwargs)  # (as trained)
            rows.append({"prompt": _last_user(prompt), "base": base, "adapter": tuned})
    finally:
        model.train(was_training)
    return rows


def _last_user(prompt: str | Messages) -> str:
    """The samples table's prompt: the last user message; after a tool's result (a prompt ending on a tool turn, one
    of a tool row's two samples), that result's opening too."""
    if isinstance(prompt, str):
        return prompt
    user = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
    if not prompt or prompt[-1]["role"] != "tool":
        return user
    result = prompt[-1].get("content")
    return f"{user} (after the tool result: {(result if isinstance(result, str) else str(result))[:80]})"


def markdown(rows: Sequence[dict[str, str]]) -> str:
    """The comparison as a markdown table (newlines and pipes escaped)."""

    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| prompt | base model | with the adapter |", "| --- | --- | --- |"]
    lines += [f"| {cell(r['prompt'])} | {cell(r['base'])} | {cell(r['adapter'])} |" for r in rows]
    return "\n".join(lines)


def side_by_side(rows: Sequence[dict[str, str]], width: int = 100) -> str:
    """The comparison for a terminal: each prompt, then the base's and the adapter's answer."""
    import textwrap

    out = []
    for r in rows:
        out.append(f"Q: {r['prompt']}")
        for label, key in (("base   ", "base"), ("adapter", "adapter")):
            text = textwrap.fill(r[key] or "(empty)", width, initial_indent="", subsequent_indent=" " * 11)
            out.append(f"  {label}: {text}")
    return "\n".join(out)


def eval_prompts(cfg, limit: int, raw: bool = False) -> list[str | Messages]:
    """The first ``limit`` prompts of the recipe's eval file (else its train file), as conversations: each row's
    prompt, or its conversation up to the last assistant turn. ``raw`` (a run that read its rows without a chat
    template): a one-message prompt as its text, as the file wrote it. Pre-training text (stage pt): the first line of
    each row, then (a document of one row, a .txt file) its next lines, its first 200 characters at most."""
    from ..data.formats import read_samples
    from ..data.load import read_rows
    from ..data.sample import as_written
    from .prepared import data_columns

    d = cfg.data
    spec = d.eval or d.train
    rows = read_rows(spec, d.text_column, limit)
    prompts: list[str | Messages] = []
    lines: list[list[str]] = []
    columns = {"text": d.text_column, **data_columns(d)}  # (pre-training text may sit in another column)
    for s in read_samples(rows, columns, d.format, d.tags):
        if s.text is not None:
            lines.append([_opening(line) for line in s.text.splitlines() if line.strip()])
            continue
        # As the run rendered them: an earlier turn's tool calls and reasoning, a tool result's name and call id
        msgs = [{k: v for k, v in m.items() if k in _KEPT} for m in s.messages]
        if s.completion is None and msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if raw and len(msgs) == 1 and msgs[0]["role"] == "user":
            prompts.append(as_written(s.messages[0]))
        elif msgs and msgs[-1]["role"] in ("user", "tool"):  # (after a tool's result the assistant answers)
            prompts.append(Conversation(msgs, s.tools, s.template_kwargs))
    prompts += [ls[0] for ls in lines if ls] + [line for ls in lines for line in ls[1:]]
    return prompts[:limit]


_KEPT = ("role", "content", "tool_calls", "name", "tool_call_id", *REASONING)


def _opening(line: str, most: int = 200) -> str:
    """A line of text as a prompt: its first ``most`` characters, cut at a word."""
    line = line.strip()
    return line if len(line) <= most else line[:most].rsplit(" ", 1)[0]


def run_samples(model, tok, cfg) -> list[dict[str, str]]:
    """The before/after answers a causal-LM run shows (``output.samples`` prompts, greedy), prompted as the run read
    its rows: pre-training text and rows read without a chat template (no data.template, none in the tokenizer) as
    plain text, the others through the run's template."""
    template = cfg.data.template  # the run's built-in template, as it trained (also where the tokenizer has none)
    raw = cfg.stage == "pt" or template is None and not has_template(tok)
    prompts = eval_prompts(cfg, cfg.output.samples, raw)
    sent_raw = cfg.stage == "pt"  # (a run read without a template: its rows' opening, prompt_ids' plain path)
    return compare(model, tok, prompts, max_new_tokens=cfg.output.sample_tokens, raw=sent_raw, template=template)


HELP = (
    "/reset (/clear) clears the history, /base toggles the adapter off and on, /help shows this, /quit (/exit) ends "
    "(Ctrl-D too)"
)


def repl(
    model,
    tok,
    system: str | None = None,
    raw: bool = False,
    stdin=None,
    stdout=None,
    template: str | None = None,
    prefix: str = "",
    **sampling: Any,
) -> int:
    """The chat loop: each line is a user message; the history is kept (raw mode: each line stands alone, after
    ``prefix``: a seq2seq run's data.source_prefix)."""
    import sys

    if stdin is None and hasattr(sys.stdin, "reconfigure"):  # a UTF-8 locale's stdin is strict: a line not in UTF-8
        sys.stdin.reconfigure(errors="surrogateescape")  # would end the chat; check_text refuses it alone instead
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    check_text(system, "--system")  # at once, not after the first message typed (which it ended the chat at)
    if system is not None and (raw or not (template or has_template(tok))):  # (as prompt_ids; dropped silently before)
        why = "--raw" if raw else "the tokenizer has no chat template"
        raise ConfigError(f"--system: the prompt goes as plain text ({why}), which has no place for a system prompt; "
                          "leave --system out, or put its text in the prompt")  # fmt: skip
    tty = stdin.isatty()
    # A terminal's line read by input() with readline: the arrow keys edit it and recall earlier lines (LLaMA-Factory's
    # chat imports readline for this; stdin.readline() wrote them into the message as ^[[D)
    edit = tty and stdin is sys.stdin and stdout is sys.stdout
    if edit:
        with suppress(ImportError):
            import readline  # noqa: F401
    history: Messages = []
    base = False
    if tty:
        print(f"deltatune chat: {HELP}", file=stdout)
    while True:
        if edit:
            try:
                line = input("base> " if base else "you> ") + "\n"
            except EOFError:
                line = ""
        else:
            if tty:
                print("base> " if base else "you> ", end="", file=stdout, flush=True)
            line = stdin.readline()
        if not line:  # EOF (Ctrl-D): the shell's prompt on a line of its own, not after "you> "
            if tty:
                print(file=stdout)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text in ("/reset", "/clear"):  # (transformers chat's !clear, LLaMA-Factory's clear)
            history = []
            print("(history cleared)", file=stdout)
            continue
        if text == "/help":
            print(f"({HELP})", file=stdout)
            continue
        if text == "/base":
            try:
                check_base(model, "/base")
            except ConfigError as exc:
                print(f"({exc})", file=stdout)
                continue
            base = not base
            print(f"(adapter {'off: the base model answers' if base else 'on'})", file=stdout)
            continue
        if text.startswith("/"):
            print(f"(unknown command {text!r}; {HELP})", file=stdout)
            continue
        kept, dropped, new_tokens = [], 0, sampling.get("max_new_tokens", 128)  # raw mode keeps no history
        try:
            check_text(text, "the line")
        except ConfigError as exc:  # skipped; the session goes on
            print(f"(not sent: {exc})", file=stdout, flush=True)
            continue
        if raw or not (template or has_template(tok)):
            ids = prompt_ids(tok, prefix + text, raw=raw)
        else:  # over the model's context the oldest exchanges go, as chat interfaces do with a long conversation
            kept = [*history, {"role": "user", "content": text}]
            ids = prompt_ids(tok, kept, system=system, template=template)
            while len(kept) > 1 and overflow(model, len(ids), new_tokens):
                kept, dropped = kept[2:], dropped + 1
                ids = prompt_ids(tok, kept, system=system, template=template)
        over = overflow(model, len(ids), new_tokens)
        if over:  # not sent, and the history as it was: the next message may fit
            print(f"(not sent: {over})", file=stdout, flush=True)
            continue
        history = kept
        if dropped:
            print(f"({dropped} oldest exchange(s) dropped: the conversation is over the model's context)", file=stdout)
        with adapter_off(model) if base else nullcontext():
            own = chat_templated(tok, raw, template)
            # stops as it trained; the answer written as its tokens come (as transformers' and LLaMA-Factory's chat)
            answer = generate(model, tok, ids, template=template, templated=own, stream=_writer(stdout), **sampling)
        if history:
            history.append({"role": "assistant", "content": answer})
        print(file=stdout, flush=True)


def _writer(stdout) -> Callable[[str], None]:
    """A stream writing each piece to ``stdout`` at once."""

    def write(piece: str) -> None:
        stdout.write(piece)
        stdout.flush()

    return write
