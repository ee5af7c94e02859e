"""How one row of a served batch picks its next token: the request's sampling settings, each left unset the base's
generation config's, applied in vLLM's order (min_tokens and logit_bias, then the repetition, frequency and presence
penalties, then greedy argmax or temperature, top-k, top-p, min-p and a draw from the row's own generator). One
step differs from vLLM's V1 sampler on purpose: min-p comes after top-k and top-p, as transformers' ``generate``
orders them (vLLM applies it before), so a base's generation config setting both samples as ``generate`` does; it
matters only where a row sets both top-p and min-p (docs/serve.md)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch

MAX_TEMP = 1e-2
"""vLLM's SamplingParams._MAX_TEMP: a temperature in (0, 0.01) is raised to it (logits / 1e-300 overflow)."""


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def default_temperature(gen: Any) -> float:
    """The temperature of a request that leaves it unset: greedy (0) where the generation config says
    ``do_sample: false`` (as ``generate``), else the config's temperature (as ``generate`` and vLLM), else 1
    (OpenAI's default; ``generate`` decodes greedily there, vLLM samples at 1). The config's temperature follows a
    request's rules, as vLLM's SamplingParams applies them to it: 0 is greedy, one in (0, 0.01) samples at 0.01.

    Raises:
        ValueError: the config's temperature is no number or lies outside [0, 2] (vLLM refuses every request that
            leaves it unset; under ``do_sample: false`` it is greedy here, as ``generate``, where vLLM refuses it).
    """
    if getattr(gen, "do_sample", None) is False:
        return 0.0
    raw = getattr(gen, "temperature", None)
    try:
        t = 1.0 if raw is None else float(raw)
    except (TypeError, ValueError):
        t = float("nan")  # (no number: named below, as the config's)
    if not 0.0 <= t <= 2.0:  # NaN too
        raise ValueError(
            f"temperature is left unset and the model's generation config sets {raw!r}, not a number in [0.0, 2.0]; "
            "send a temperature in [0, 2]"
        )
    return t if not t else max(t, MAX_TEMP)


def _setting(r: Any, gen: Any, key: str) -> Any:
    """The request's own ``key``, else the generation config's (None where neither sets it)."""
    value = getattr(r, key, None)
    return getattr(gen, key, None) if value is None else value


def adjusted(logits: torch.Tensor, r: Any, gen: Any = None, eos: Collection[int] = ()) -> torch.Tensor:
    """The row's logits after the settings that change greedy's pick too, in vLLM's order (a new tensor: the
    reported log-probabilities stay the model's own): every token but the ``allowed_token_ids`` masked (vLLM's), and
    the last token of each of the ``bad_words`` whose other tokens end the answer so far (vLLM's), the
    ``eos`` ids and the request's ``stop_token_ids`` masked
    while fewer than ``min_tokens`` tokens are generated (transformers' MinNewTokensLengthLogitsProcessor, vLLM's
    all_stop_token_ids; EOS under ``ignore_eos`` too, as vLLM), ``logit_bias``
    added (OpenAI's), ``repetition_penalty`` over the prompt and the answer so far (transformers'
    RepetitionPenaltyLogitsProcessor, vLLM's: a positive logit divided by it, a negative one multiplied), then
    OpenAI's ``frequency_penalty`` times each token's count in the answer so far and ``presence_penalty`` once per
    token in it subtracted (vLLM's: the prompt does not count). The row's tokens for the penalties are kept on it
    (``r.penalties``, a ``Penalties``): the one thing of its inputs it changes."""
    allowed = getattr(r, "allowed_token_ids", None)
    if allowed:  # vLLM's allowed_token_ids: every other token masked, first
        keep = torch.tensor(allowed, device=logits.device)
        logits = torch.full_like(logits, float("-inf")).index_copy(0, keep, logits[keep])
    banned = [w[-1] for w in getattr(r, "bad_words_ids", None) or () if _ends_with(r.output_ids, w[:-1])]
    if banned:  # vLLM's bad_words: a word's last token, where the answer ends with the tokens before it
        logits = logits.index_fill(0, torch.tensor(banned, device=logits.device), float("-inf"))
    # vLLM's all_stop_token_ids: EOS too under ignore_eos (update_from_generation_config adds it regardless)
    stops = set(eos) | set(getattr(r, "stop_token_ids", None) or ())
    if stops and len(r.output_ids) < (getattr(r, "min_tokens", 0) or 0):
        logits = logits.index_fill(0, torch.tensor(sorted(stops), device=logits.device), float("-inf"))
    bias = getattr(r, "logit_bias", None)
    if bias:
        ids = torch.tensor(list(bias), device=logits.device)
        logits = logits.index_add(0, ids, torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device))
    penalty = _setting(r, gen, "repetition_penalty") or 1.0
    frequency, presence = getattr(r, "frequency_penalty", 0) or 0, getattr(r, "presence_penalty", 0) or 0
    if penalty != 1.0 or ((frequency or presence) and r.output_ids):
        state = getattr(r, "penalties", None)
        if not (isinstance(state, Penalties) and state.fits(r, logits)):
            state = r.penalties = Penalties(r, logits)
        state.update(r.output_ids)
        if penalty != 1.0:  # over the row's tokens alone (a full-vocabulary where cost 20 times as much)
            score = logits[state.seen]
            logits = logits.index_copy(0, state.seen, torch.where(score < 0, score * penalty, score / penalty))
        if (frequency or presence) and r.output_ids:  # two subtractions, as vLLM rounds them
            out = state.out
            score = logits[out] - state.counts[out].to(logits.dtype) * frequency if frequency else logits[out]
            logits = logits.index_copy(0, out, score - presence if presence else score)
    return logits


class Penalties:
    """A row's tokens so far, for its penalties (``Request.penalties``): ``seen``, the ids of the prompt and the
    answer, ``out`` the answer's, each once (index tensors grown by the new ids alone), and ``counts`` each token's
    count in the answer over the vocabulary; brought up to date with the answer's new tokens (built again from the
    whole prompt and answer at each step, a long row's penalties cost O(n) host work per token). Built again where
    the row's prompt or answer is another list or the answer got shorter (a list changed in place is not seen: the
    engine only appends). The counts are float32 whatever the logits' dtype (bf16 counted no further than 256)."""

    def __init__(self, r: Any, logits: torch.Tensor) -> None:
        self.prompt, self.output, self.n, dev = r.prompt_ids, r.output_ids, 0, logits.device
        self.known, self.out_known = set(r.prompt_ids), set()
        self.seen = torch.tensor(list(self.known), dtype=torch.long, device=dev)
        self.out = torch.zeros(0, dtype=torch.long, device=dev)
        self.counts, self.dtype = torch.zeros(logits.shape, dtype=torch.float32, device=dev), logits.dtype

    def fits(self, r: Any, logits: torch.Tensor) -> bool:
        """Whether this state is ``r``'s: its very lists, the answer not shorter, logits of the same shape and kind."""
        counts = self.counts
        same = r.prompt_ids is self.prompt and r.output_ids is self.output and len(r.output_ids) >= self.n
        return same and (counts.shape, self.dtype, counts.device) == (logits.shape, logits.dtype, logits.device)

    def update(self, output_ids: list[int]) -> None:
        """Count the answer's ids past the last update (and add the new ones to ``seen`` / ``out``)."""
        if self.n >= len(output_ids):
            return
        fresh = output_ids[self.n :]
        new = torch.tensor(fresh, dtype=torch.long, device=self.counts.device)
        self.counts.index_add_(0, new, torch.ones(len(fresh), dtype=self.counts.dtype, device=new.device))
        self.n = len(output_ids)
        if not self.out_known.issuperset(fresh):
            self.out_known.update(fresh)
            self.out = torch.cat([self.out, _others(new, self.out)])
        if not self.known.issuperset(fresh):
            self.known.update(fresh)
            self.seen = torch.cat([self.seen, _others(new, self.seen)])


def _others(new: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``new``'s ids that ``kept`` lacks, each once (one new id: known to be new)."""
    if len(new) == 1:
        return new
    new = new.unique()
    return new[~torch.isin(new, kept)]


def _ends_with(ids: list[int], tail: list[int]) -> bool:
    return not tail or (len(ids) >= len(tail) and ids[-len(tail) :] == tail)


def _pick(logits: torch.Tensor, r: Any, g: torch.Generator | None, gen: Any = None, eos: Collection[int] = ()) -> int:
    """The next token of one row: argmax when greedy, else a draw from the tempered top-k, top-p, min-p
    distribution, both of the ``adjusted`` logits. Each setting the request leaves unset is the base's generation
    config's, applied as ``generate`` applies it (vLLM's too): ``repetition_penalty`` always, ``top_k``, ``top_p``
    and ``min_p`` when sampling.

    Every token masked: token 0, as vLLM's sampler gives it.

    Raises:
        FloatingPointError: NaN logits (+inf, sampling; greedy takes its argmax, as generate): no token to choose.
    """
    logits = adjusted(logits, r, gen, eos)
    if g is None and bool(torch.isnan(logits).any()):  # argmax takes a NaN for the largest: garbage as text
        raise FloatingPointError("its logits are NaN, so no token can be chosen")
    if not bool((logits > float("-inf")).any() | torch.isnan(logits).any()):
        # The settings (allowed_token_ids, bad_words, min_tokens' stop tokens) mask every token at this step: token 0,
        # as vLLM's sampler takes it, greedy (the argmax of all -inf) or sampled (its softmax all NaN, whose argmax
        # is the first). A mask that leaves nothing at the first token is a 400 before (app._first_token_possible).
        return 0
    if g is None:
        return int(logits.argmax())
    logits = logits / r.temperature
    top_k = _setting(r, gen, "top_k")
    top_k = 50 if top_k is None else top_k  # generate's global default, where the model's config leaves it unset
    if 0 < top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < logits.topk(top_k).values[-1], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if not bool(torch.isfinite(probs).all()):  # torch.multinomial would fail the whole batch
        raise FloatingPointError("its logits are not finite (NaN or inf), so no token can be sampled")
    top_p = _setting(r, gen, "top_p")
    top_p = 1.0 if top_p is None else top_p
    if top_p < 1.0:
        # Nucleus, as transformers' TopPLogitsWarper and vLLM's top-p compute it: the logits sorted ascending, those
        # whose cumulative probability stays within 1 - top_p dropped, the top token always kept (the same sort, so
        # among tied logits the same ones stay: bf16 logits tie often)
        sorted_logits, order = logits.sort(descending=False)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[-1] = False
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    min_p = _setting(r, gen, "min_p")
    if min_p:  # tokens less likely than min_p times the top token's probability are dropped (the top one stays)
        probs = torch.softmax(logits, dim=-1)  # of the tokens top-p kept, as MinPLogitsWarper after it
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=g))
