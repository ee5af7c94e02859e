"""A row's text as vLLM's incremental detokenizer gives it: special tokens kept or skipped as the request's
``skip_special_tokens`` asks, and a first token's SentencePiece space kept. A SentencePiece decoder strips the space
of the first token it decodes ("▁Paris" alone is "Paris"); vLLM primes its decoder (tokenizers' ``DecodeStream``)
with the prompt, so after "The capital is" the answer is " Paris". Here an answer whose first token carries such a
space ("▁") is decoded after the prompt's last few tokens, whose text is cut off again. A WordPiece tokenizer's space
between words is no token's own: its answer is decoded alone, with no separator before its first word, where vLLM's
primed decoder would put one (docs/serve.md)."""

from __future__ import annotations

from typing import Any

_CONTEXT = (5, 24)  # the prompt tokens decoded before the answer: at least 5, more while they end inside a character


class Detokenizer:
    """The text of ``prompt_ids``' answer so far (``text``), decoded in the prompt's context."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip, self.prompt_ids = tokenizer, skip_special_tokens, prompt_ids
        self.context: list[int] | None = None  # None: the answer is decoded alone; set at its first token

    def _prime(self, first: int) -> list[int]:
        """The prompt tokens to decode before the answer: none unless its first token carries a SentencePiece
        space; then at least 5, more while their text ends inside a character (at most 24)."""
        piece = self.tokenizer.convert_ids_to_tokens(first)
        if not (isinstance(piece, str) and piece.startswith("\u2581")):
            return []
        prompt_ids = self.prompt_ids
        n, self.context, self.prefix = _CONTEXT[0], prompt_ids[-_CONTEXT[0] :], ""
        while True:
            self.prefix = self._decode(self.context)
            if not self.prefix.endswith("\ufffd") or n >= min(len(prompt_ids), _CONTEXT[1]):
                break
            n += 1
            self.context = prompt_ids[-n:]
        return self.context

    def _decode(self, ids: list[int]) -> str:
        # No clean-up of spaces: it may rewrite text already sent ("a ' b" -> "a'b"), so each decode must extend the
        # one before.
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def text(self, output_ids: list[int]) -> str:
        """The answer's text: decoded after the context, less the context's own text (the answer alone where the
        context's text does not stay a prefix, a prompt ending inside a character the answer completes)."""
        if not output_ids:
            return ""
        if self.context is None:
            self.context = self._prime(output_ids[0])
        if not self.context:
            return self._decode(output_ids)
        whole = self._decode(self.context + output_ids)
        return whole[len(self.prefix) :] if whole.startswith(self.prefix) else self._decode(output_ids)
