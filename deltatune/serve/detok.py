"""A row's text as vLLM's incremental detokenizer gives it: special tokens kept or skipped as the request's
``skip_special_tokens`` asks, and a first token's SentencePiece space kept. A SentencePiece decoder strips the space
of the first token it decodes ("▁Paris" alone is "Paris"); vLLM primes its decoder (tokenizers' ``DecodeStream``)
with the prompt, so after "The capital is" the answer is " Paris". Here an answer whose first token carries such a
space ("▁") is decoded after the prompt's last few tokens (the first token that is not a skipped special one
decides), whose text is cut off again. So is a WordPiece (BERT) answer whose first token goes on a word ("##s"): after
"the cat" it is "s", as vLLM's primed decoder gives it (alone it decoded to "##s"). A WordPiece answer that starts a
word is decoded alone, with no separator before it, where vLLM's primed decoder puts one (" sat"; docs/serve.md).
A prompt of token ids that ends inside a character primes the decoder too: the answer's first text is that character
whole, its first bytes the prompt's, as vLLM's DecodeStream gives it (it was U+FFFD)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_CONTEXT = (5, 24)  # the prompt tokens decoded before the answer: at least 5, more while they end inside a character
_WINDOW = 6  # the tokens before the last step's end that the next step's new text is decoded after (vLLM's 5, + 1)


class Detokenizer:
    """The text of ``prompt_ids``' answer so far (``text``), decoded in the prompt's context."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self.tokenizer, self.skip, self.prompt_ids = tokenizer, skip_special_tokens, prompt_ids
        # vLLM's FastIncrementalDetokenizer: with special tokens kept and no spaces between them, an added token
        # right after another is its raw text (a WordPiece decoder's " [SEP]" after "[CLS]" is "[SEP]")
        self.joined = set() if skip_special_tokens or spaces_between_special_tokens else _added(tokenizer)
        self.context: list[int] | None = None  # None: the answer is decoded alone; set at its first token
        # ``_grown``'s state: the ids decoded last (how many, the last one), their text, the last tokens with text
        self._n, self._id, self._text, self._window, self._all = 0, -1, "", [], True
        self._dropped: dict[int, bool] = {}  # ``_drops``' answers
        self._lead = 0  # the answer's first tokens that ``decode`` drops

    def _prime(self, first: int) -> list[int]:
        """The prompt tokens to decode before the answer: none unless its first token carries a SentencePiece
        space or goes on a WordPiece word, or the prompt ends inside a character (token ids cut mid-character,
        which the answer completes); then at least 5, more while their text ends inside a character (at most 24).
        ``prefix``: their text up to the character left incomplete, which vLLM's primed DecodeStream still holds
        and gives with the answer's first text (" 😀" where the prompt ends in " " and the emoji's first bytes)."""
        piece = self.tokenizer.convert_ids_to_tokens(first)
        spaced = isinstance(piece, str) and piece.startswith(("\u2581", _continues(self.tokenizer)))
        prompt_ids = self.prompt_ids
        if not spaced and not self._decode(prompt_ids[-_CONTEXT[1] :], _CONTEXT[1]).endswith("\ufffd"):
            return []
        n, self.context, self.prefix = _CONTEXT[0], prompt_ids[-_CONTEXT[0] :], ""
        while True:
            self.prefix = self._decode(self.context, len(self.context))  # no cut inside the prompt, as vLLM's
            if not self.prefix.endswith("\ufffd") or n >= min(len(prompt_ids), _CONTEXT[1]):
                break
            n += 1
            self.context = prompt_ids[-n:]
        clean = len(self.context)  # the prompt's last tokens that leave a character incomplete are the answer's
        while clean and self.prefix.endswith("\ufffd"):
            clean -= 1
            self.prefix = self._decode(self.context[:clean], clean)
        return self.context

    def _skipped(self) -> set[int]:
        """The special tokens that decode to no text (none unless ``skip_special_tokens``)."""
        if not self.skip:
            return set()
        if not hasattr(self, "_special"):
            added = (
                getattr(self.tokenizer, "added_tokens_decoder", None) or {}
            )  # tokenizers skips those marked special
            special = (
                {t for t, a in added.items() if getattr(a, "special", False)} if isinstance(added, dict) else set()
            )
            self._special = special | set(getattr(self.tokenizer, "all_special_ids", None) or ())
        return self._special

    def _decode(self, ids: list[int], start: int = 0) -> str:
        # No clean-up of spaces: it may rewrite text already sent ("a ' b" -> "a'b"), so each decode must extend the
        # one before.
        # An added token after another one of the answer (``start``: where it begins; vLLM primes its decoder with
        # the prompt without that rule) starts a piece decoded on its own: no space before it.
        cuts = [i for i in range(start + 1, len(ids)) if ids[i] in self.joined and ids[i - 1] in self.joined]
        pieces = zip([0, *cuts], [*cuts, len(ids)])
        decode = self.tokenizer.decode
        return "".join(
            decode(ids[a:b], skip_special_tokens=self.skip, clean_up_tokenization_spaces=False) for a, b in pieces
        )

    def _drops(self, token: int) -> bool:
        """Whether ``decode`` leaves ``token`` out before decoding (a special token under ``skip_special_tokens``,
        which tokenizers and transformers both drop from the ids first): its text alone differs with the flag."""
        if not self.skip or token not in self._skipped():
            return False
        if token not in self._dropped:
            kept = self.tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            gone = self.tokenizer.decode([token], skip_special_tokens=True, clean_up_tokenization_spaces=False)
            self._dropped[token] = bool(kept) and not gone
        return self._dropped[token]

    def _grown(self, output_ids: list[int], context: Sequence[int] = ()) -> str:
        """``_decode(context + output_ids, len(context))`` in time linear in the new tokens, not in the whole answer
        (decoded whole at each token, a long answer's text cost O(n^2)): where the ids extend those decoded last (as
        long, the same last id), the new text is that of the last ``_WINDOW`` tokens with text and the new ones, less
        that of those tokens alone (vLLM's incremental detokenisation, decoders being local; its prefix offset stays
        at the last token that gave text, so a run of skipped special tokens, which ``decode`` drops first, costs
        nothing); decoded whole where that cannot be read off (the window's text ends inside a character or is no
        prefix, added tokens joined without spaces)."""
        c, n = len(context), self._n
        size = c + len(output_ids)
        text = None
        if n and not self.joined and size >= n and (context[n - 1] if n <= c else output_ids[n - 1 - c]) == self._id:
            new = [t for t in (output_ids[n - c :] if n >= c else [*context[n:], *output_ids]) if not self._drops(t)]
            window, decode, text = self._window, self.tokenizer.decode, self._text
            if new and self._all:  # the window holds every token with text: the whole text
                text = decode(window + new, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)
            elif new:
                head = decode(window, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)
                tail = decode(window + new, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)
                text = (
                    text + tail[len(head) :]
                    if head and not head.endswith("\ufffd") and tail.startswith(head)
                    else None
                )
            if text is not None and not text.endswith("\ufffd"):
                self._window, self._all = (window + new)[-_WINDOW:], self._all and len(window) + len(new) <= _WINDOW
        if text is None:
            ids = [*context, *output_ids]
            text = self._decode(ids, c)
            if not text.endswith("\ufffd"):  # the last _WINDOW tokens with text, the run of dropped ones after
                i, window = size, []
                while i and len(window) < _WINDOW:
                    i -= 1
                    window[:0] = [] if self._drops(ids[i]) else [ids[i]]
                self._window, self._all = window, not any(not self._drops(t) for t in ids[:i])
        if size and not text.endswith("\ufffd"):  # the next step's window starts after a whole character
            self._n, self._id, self._text = size, (output_ids or context)[-1], text
        return text

    def text(self, output_ids: list[int]) -> str:
        """The answer's text: decoded after the context, less the context's own text (the answer alone where the
        context's text does not stay a prefix). ``output_ids`` is one answer growing, as the engine appends to it: a
        replaced answer is known by its length and last decoded id alone."""
        if not output_ids:
            return ""
        if self.context is None:
            # The first token with text decides: a skipped special token before it adds none (vLLM's DecodeStream,
            # primed with the prompt, keeps the next word's space after a skipped <unk> or </s>).
            while self._lead < len(output_ids) and self._drops(output_ids[self._lead]):
                self._lead += 1
            if self._lead == len(output_ids):  # nothing but tokens decode drops
                return ""
            first = next((t for t in output_ids if t not in self._skipped()), None)
            if first is None:
                return self._decode(output_ids)
            self.context = self._prime(first)
        if not self.context:
            return self._grown(output_ids)
        whole = self._grown(output_ids, self.context)
        return whole[len(self.prefix) :] if whole.startswith(self.prefix) else self._decode(output_ids)


def _added(tokenizer: Any) -> set[int]:
    """The tokenizer's added tokens' ids (vLLM's ``get_added_tokens_decoder``: special or not)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None)
    return set(decoder) if isinstance(decoder, dict) else set(getattr(tokenizer, "all_special_ids", ()) or ())


def _continues(tokenizer: Any) -> str:
    """The prefix of a token that goes on a word ("##"), where the tokenizer's decoder is WordPiece's; else "\u2581"
    (the SentencePiece space, which ``_prime`` checks already)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    prefix = getattr(decoder, "prefix", None) if type(decoder).__name__ == "WordPiece" else None
    return prefix if isinstance(prefix, str) and prefix else "\u2581"
