"""Chat and instruction formatting, with the loss on assistant tokens only.

Rows come in the alpaca shape (instruction, input, output), the chat shape (a list of
{"role", "content"} messages) or the sharegpt shape ({"from", "value"} with human/gpt roles).
They become a list of messages, rendered with the tokenizer's own chat template when it has one,
else with a named built-in template. The labels are the token ids inside assistant turns (their
end-of-turn marker included, so the model learns to stop) and -100 everywhere else; a multi-turn
conversation trains on every assistant turn.
"""

from __future__ import annotations

from dataclasses import dataclass

from .load import DataError, Row

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Template:
    """A built-in chat format: one pattern per role (``{content}`` is replaced) and the assistant prefix."""

    system: str
    user: str
    assistant: str
    generation_prefix: str
    """What precedes the assistant's content; a prompt for generation ends with it."""


TEMPLATES: dict[str, Template] = {
    "chatml": Template(
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant="<|im_start|>assistant\n{content}<|im_end|>\n",
        generation_prefix="<|im_start|>assistant\n",
    ),
    "alpaca": Template(
        system="{content}\n\n",
        user="### Instruction:\n{content}\n\n",
        assistant="### Response:\n{content}\n\n",
        generation_prefix="### Response:\n",
    ),
    "plain": Template(system="{content}\n", user="{content}\n", assistant="{content}\n", generation_prefix=""),
}

_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "model": "assistant",
    "bot": "assistant",
}


def to_messages(row: Row, columns: dict[str, str]) -> list[dict[str, str]]:
    """The row as chat messages. ``columns`` maps roles of the recipe (messages, instruction, input, output,
    system) to the row's column names."""
    messages_col = columns.get("messages", "messages")
    if messages_col in row.data or "conversations" in row.data:
        raw = row.data.get(messages_col, row.data.get("conversations"))
        if not isinstance(raw, list) or not raw:
            raise DataError(f"{row.source}: column {messages_col!r} must be a non-empty list of messages")
        out = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                raise DataError(f"{row.source}: message {i} is not an object")
            role = m.get("role", m.get("from"))
            content = m.get("content", m.get("value"))
            if role not in _ROLES or not isinstance(content, str):
                raise DataError(
                    f"{row.source}: message {i} needs a known role (user/assistant/system, human/gpt) "
                    f"and a text content, got role={role!r}"
                )
            out.append({"role": _ROLES[role], "content": content})
        if not any(m["role"] == "assistant" for m in out):
            raise DataError(f"{row.source}: the conversation has no assistant message to learn from")
        return out
    instruction = row.get(columns.get("instruction", "instruction"))
    extra = row.get(columns.get("input", "input"), required=False)
    output = row.get(columns.get("output", "output"))
    system = row.get(columns.get("system", "system"), required=False)
    prompt = f"{instruction}\n\n{extra}" if extra else str(instruction)
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": prompt}, {"role": "assistant", "content": str(output)}]


def render(
    messages: list[dict[str, str]], tokenizer, template: str | None, add_generation_prompt: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as text, and the character spans [start, end) of every assistant turn.

    With ``template`` None the tokenizer's own chat template renders it (spans found by rendering
    each prefix, which must be a prefix of the whole); otherwise the named built-in template.
    """
    if template is None:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"the tokenizer has no chat template; set data.template to one of {', '.join(TEMPLATES)}")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            if not text.startswith(through) or not through.startswith(before):
                raise DataError(
                    "the tokenizer's chat template does not render conversations prefix by prefix, so "
                    "assistant turns cannot be located; set data.template to a built-in template"
                )
            spans.append((len(before), len(through)))
        return text, spans
    if template not in TEMPLATES:
        raise DataError(f"unknown template {template!r}; built-in templates: {', '.join(TEMPLATES)}")
    t = TEMPLATES[template]
    eos = tokenizer.eos_token or ""
    text, spans = "", []
    for m in messages:
        if m["role"] == "assistant":
            prefix, suffix = t.assistant.split("{content}")
            text += prefix
            start = len(text)
            # The end-of-sequence token closes each answer, so generation learns where to stop.
            text += m["content"] + eos
            spans.append((start, len(text)))
            text += suffix
        else:
            text += getattr(t, m["role"]).format(content=m["content"])
    if add_generation_prompt:
        text += t.generation_prefix
    return text, spans


def encode_chat(messages: list[dict[str, str]], tokenizer, template: str | None) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 outside assistant turns) of a conversation, untruncated."""
    text, spans = render(messages, tokenizer, template)
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("SFT masking needs a fast tokenizer (with offset mapping)")
    enc = tokenizer(text, add_special_tokens=template is not None, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = []
    for tok_id, (start, end) in zip(ids, enc["offset_mapping"]):
        inside = end > start and any(s <= start and end <= e for s, e in spans)
        labels.append(tok_id if inside else IGNORE_INDEX)
    return ids, labels
