"""``Sample``: one row of any data format (data/formats.py) in the one structure every stage reads, and what the
stages ask of a list of them (multimodal rows refused by the text stages and placed for the caption stage, KTO's
unpaired view)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .load import DataError

REASONING = ("reasoning_content", "thinking")
"""An assistant message's reasoning trace, as chat templates read it (Qwen3 and GLM: reasoning_content; gpt-oss:
thinking)."""

Message = dict[str, Any]
"""``{"role": system|user|assistant|tool, "content": str}``, an assistant's ``tool_calls`` as transformers'
chat templates read them (``[{"type": "function", "function": {"name", "arguments": dict}}]``)."""

AS_WRITTEN = "as_written"
"""A message key holding the text as the file wrote it, where ``content`` was cut from a longer string (an implicit
prompt's pair): the plain-text rendering (``encode.RAW``) joins these, chat templates read ``content``."""

AUDIO_MARKER = "<audio>"
"""LLaMA-Factory's audio placeholder: no stage reads audio, so a row holding it is refused (its mm_plugin refuses a
marker without an audio to pair it with), not trained as the text ``<audio>``."""
_MARKERS = ("<image>", "<video>", AUDIO_MARKER)
IMAGE_MARKER = "<image>"
"""Where an image goes in a message's text (LLaMA-Factory's and LLaVA's marker)."""


@dataclass
class Sample:
    """One row in the internal structure every stage reads.

    ``messages`` is the whole conversation for the SFT formats (every assistant turn trains) and the prompt for
    the others; ``completion``, ``chosen`` and ``rejected`` are the response messages that follow it.
    """

    source: str
    """``file:line`` of the row."""
    format: str
    messages: list[Message]
    completion: list[Message] | None = None
    chosen: list[Message] | None = None
    rejected: list[Message] | None = None
    label: bool | None = None
    """unpaired (KTO): whether the completion is desirable."""
    text: str | None = None
    """text: the document."""
    conversational: bool = True
    """False when the row's prompt and responses were plain strings (TRL's standard shape)."""
    tools: list[dict] | None = None
    """JSON schemas of the tools the row's assistant may call."""
    images: list[str] = field(default_factory=list)
    """Image paths (or URLs) of a multimodal row, for the vision stages."""
    videos: list[str] = field(default_factory=list)
    template_kwargs: dict[str, Any] | None = None
    """The row's ``chat_template_kwargs`` (TRL's column): extra variables the chat template reads (Qwen3's
    ``enable_thinking``), passed to ``apply_chat_template`` wherever the row is rendered."""
    written: str | None = None
    """The row's own format where the stage reshaped it (``format`` is then what the stage reads): a KTO
    conversation with a label read as unpaired, a PPO conversation as prompt."""

    def sft(self) -> tuple[list[Message], int]:
        """(conversation, index of the first message whose assistant turns train)."""
        if self.completion is not None:
            return self.messages + self.completion, len(self.messages)
        return self.messages, 0


def says_something(m: Message) -> bool:
    """Whether a message holds anything to train: text, tool calls, or a reasoning trace (an assistant turn of
    Qwen3's data may think and answer nothing; its template renders the think block, and TRL trains it)."""
    return bool(m["content"].strip() or m.get("tool_calls") or any((m.get(k) or "").strip() for k in REASONING))


def as_written(m: Message) -> str:
    """A message's text as the file wrote it (``formats.AS_WRITTEN``), else its content: what the plain-text
    rendering (no chat template) joins."""
    return m.get(AS_WRITTEN, m["content"])


def refuse_multimodal(samples: Sequence[Sample], stage: str) -> None:
    """DataError naming the first row with images or videos (columns or ``<image>`` markers): the text stages
    cannot read them; stage caption reads them (``place_images``)."""
    for s in samples:
        texts = [m["content"] for part in (s.messages, s.completion, s.chosen, s.rejected) for m in part or []]
        marked = next((mk for mk in _MARKERS for t in texts + [s.text or ""] if mk in t), None)
        # An <audio> marker on the prompt side (user, system and tool turns) is refused: no stage reads audio, and
        # LLaMA-Factory's multimodal plugins refuse an unpaired one. An answer (assistant, chosen, rejected,
        # completion) may mention the HTML tag, as may pre-training text: LLaMA-Factory's BasePlugin (text-only
        # models) counts no marker. (An audios column: _media refuses it.)
        asked = [m["content"] for part in (s.messages, s.completion, s.chosen, s.rejected) for m in part or []
                 if m["role"] != "assistant"]  # fmt: skip
        if any(AUDIO_MARKER in t for t in asked):
            raise DataError(f"{s.source}: an {AUDIO_MARKER} marker (LLaMA-Factory's audio placeholder) in a prompt "
                            "turn; no stage reads audio (an answer may mention the tag)")  # fmt: skip
        if s.images or s.videos or marked in _MARKERS[:2]:
            what = (
                f"{len(s.images)} image(s)"
                if s.images
                else f"{len(s.videos)} video(s)"
                if s.videos
                else f"a {marked} marker"
            )
            raise DataError(
                f"{s.source}: a multimodal row ({what}); stage {stage} trains on text only and would ignore the "
                "images; the vision stages (image_cls, caption) read image rows"
            )


def place_images(s: Sample) -> tuple[list[Message], int]:
    """The row's conversation and first trained message (``Sample.sft``), with one ``<image>`` marker per image of
    ``s.images``: the row's own markers, or, when it has none, all of them at the start of the first user turn
    (LLaMA-Factory's rule).

    Raises:
        DataError: videos; markers and images that do not pair up; no image; markers without a user turn to hold
            them (the row named).
    """
    conversation, start = s.sft()
    if s.videos or any("<video>" in m["content"] for m in conversation):
        raise DataError(f"{s.source}: a row with videos; stage caption reads images only")
    if any(AUDIO_MARKER in m["content"] for m in conversation):
        raise DataError(f"{s.source}: an {AUDIO_MARKER} marker (LLaMA-Factory's audio placeholder); stage caption "
                        "reads images only")  # fmt: skip
    conversation = [dict(m) for m in conversation]
    marked = sum(m["content"].count(IMAGE_MARKER) for m in conversation)
    if not s.images:
        raise DataError(f"{s.source}: the row has no image (an 'images' column); stage caption trains on image rows")
    if marked == 0:
        first = next((m for m in conversation if m["role"] == "user"), None)
        if first is None:
            raise DataError(f"{s.source}: the row has images but no user turn to hold them")
        first["content"] = IMAGE_MARKER * len(s.images) + "\n" + first["content"]
    elif marked != len(s.images):
        raise DataError(
            f"{s.source}: {marked} {IMAGE_MARKER} marker(s) in the messages for {len(s.images)} image(s) in the "
            "images column; give one marker per image (or none: the images then open the first user turn)"
        )
    return conversation, start


def unpaired_examples(samples: Sequence[Sample]) -> list[tuple[list[Message], list[Message], bool]]:
    """(prompt messages, completion messages, desirable) per row, for the KTO stage.

    Unpaired rows give one triple each; preference rows give two (chosen: True, rejected: False), as TRL's KTO
    reads paired data.

    Raises:
        DataError: a row of a format that holds no completion (the first such row is named).
    """
    out = []
    for s in samples:
        if s.format == "unpaired":
            out.append((s.messages, s.completion, bool(s.label)))
        elif s.chosen is not None and s.rejected is not None:
            out += [(s.messages, s.chosen, True), (s.messages, s.rejected, False)]
        else:
            raise DataError(f"{s.source}: a {s.format} row holds no completion with a label; KTO reads "
                            "prompt + completion + label (or preference pairs)")  # fmt: skip
    return out
