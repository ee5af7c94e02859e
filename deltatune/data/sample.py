"""``Sample``: one row of any data format (data/formats.py) in the one structure every stage reads, and what the
stages ask of a list of them (multimodal rows refused by the text stages, KTO's unpaired view)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .load import DataError

Message = dict[str, Any]
"""``{"role": system|user|assistant|tool, "content": str}``, an assistant's ``tool_calls`` as transformers'
chat templates read them (``[{"type": "function", "function": {"name", "arguments": dict}}]``)."""

_MARKERS = ("<image>", "<video>")


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

    def sft(self) -> tuple[list[Message], int]:
        """(conversation, index of the first message whose assistant turns train)."""
        if self.completion is not None:
            return self.messages + self.completion, len(self.messages)
        return self.messages, 0


def refuse_multimodal(samples: Sequence[Sample], stage: str) -> None:
    """DataError naming the first row with images or videos (columns or ``<image>`` markers): the text stages
    cannot read them; the vision stages (image_cls, caption) will."""
    for s in samples:
        texts = [m["content"] for part in (s.messages, s.completion, s.chosen, s.rejected) for m in part or []]
        marked = next((mk for mk in _MARKERS for t in texts + [s.text or ""] if mk in t), None)
        if s.images or s.videos or marked:
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
