"""The generation engine: one base model, many adapters, concurrent requests gathered into mixed batches.

Scheduling. One worker thread owns the model. It waits for a request, then gathers more for at most
``max_wait_s`` (bounded wait) up to ``max_batch_size`` rows, and splits them into groups that can share a forward
pass:

- every row whose adapter routes rows (LoRA, IA3, bottleneck adapters; see ``DeltaModel.mixed_batch``) and every
  base-model row go into ONE mixed batch, each row computing with its own adapter (``adapter_names=[...]``);
- the rows of an adapter that cannot route rows (the token methods: prompt tuning, P-tuning, prefix tuning) form
  a batch of their own with that adapter active.

Each group decodes step by step with a KV cache: a left-padded prefill, then one token per row per step. A row
that finishes (EOS, ``max_tokens``, a stop string, or its client gone) leaves the batch at once: its rows of the
cache are dropped (``Cache.batch_select_indices``). The mixed batch is continuously batched: between two steps,
waiting requests that can route rows join it (prefilled on their own, their cache left-padded and appended to the
running one) up to ``max_batch_size`` rows. A token-method batch runs batch-at-a-time (its requests wait for the
next batch), since its adapter is the model's active one for the whole batch. Once a request for another group is
waiting, nothing more joins, so the running batch drains and that request is not starved.

Per-row sampling keeps answers independent of the batch: each row's penalties and ``min_tokens`` count its own
tokens; greedy rows take the argmax; sampled rows scale by their temperature, keep their top-k, top-p and min-p cut,
and draw from their own ``torch.Generator`` seeded by the request's seed. Positions are ``cumsum(mask) - 1`` (the same
as transformers' ``generate``), so a left-padded row sees the same positions as when served alone.
"""

from __future__ import annotations

import inspect
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data.templates import stop_ids
from ..layer import quiet_deletes
from ..train.chat import _end_marker
from ..train.runs import run_template
from .detok import Detokenizer
from .kvcache import _joinable, _merge, _trim
from .logprob_names import logprob_row as _logprob_row
from .logprob_names import logprobs_json as logprobs_json  # noqa: F401 (served from here before)
from .logprob_names import prompt_row
from .sampling import Penalties, _generator, _pick, default_temperature

BASE = "base"
"""The model name under which the plain base model is served."""
_BASE_ROW = "__base__"  # DeltaModel's row name for the base model
UNLOADED = "it is not served any more"


class RequestError(ValueError):
    """A request the engine refuses; ``status`` and ``code`` become the HTTP error."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def shown(value: Any) -> str:
    """A request's value as an error quotes it: its repr, cut as pydantic cuts an ``input_value`` past 50 characters
    (the first 25, "...", the last 24), so a 400 does not send a huge value back whole."""
    text = repr(value)
    return text if len(text) <= 50 else f"{text[:25]}...{text[-24:]}"


@dataclass
class Request:
    """One completion to compute: prompt ids, adapter and sampling settings.

    ``emit`` is called from the engine thread with ``(text_delta, None)`` for each piece of new text and once with
    ``(text_delta, finish_reason)`` at the end (``finish_reason`` "stop", "length", "cancelled" or "error: ...").
    """

    prompt_ids: list[int]
    adapter: str
    max_tokens: int
    emit: Callable[[str, str | None], None]
    temperature: float | None = 0.0  # None: the base's generation config's (``Engine.submit`` fills it in)
    top_p: float | None = None  # None: the base's generation config's (as generate), else 1
    top_k: int | None = None  # None: the config's (else 50, generate's default); 0 or -1: no top-k (vLLM's)
    min_p: float | None = None  # None: the config's
    repetition_penalty: float | None = None  # None: the config's
    frequency_penalty: float = 0.0  # OpenAI's, over the tokens this row generated (as vLLM)
    presence_penalty: float = 0.0
    min_tokens: int = 0  # no EOS and no stop string before this many tokens (vLLM's)
    logit_bias: dict[int, float] | None = None  # {token id: added to its logit} (OpenAI's)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)  # vLLM's: tokens that end the answer (not EOS's)
    # The chat template's end of a turn, for a chat it rendered (Engine.turn_end): it ends the answer as the
    # generation config's EOS ids do (deltatune chat's stop; LLaMA-Factory's API adds its template's stop words)
    end_ids: frozenset[int] = frozenset()
    allowed_token_ids: list[int] | None = None  # vLLM's: the only tokens that may be generated (None: any)
    bad_words_ids: list[list[int]] = field(default_factory=list)  # vLLM's bad_words, tokenized (fields.bad_words_ids)
    include_stop_str_in_output: bool = False  # vLLM's: the stop string, or stop token's text, ends the answer's text
    skip_special_tokens: bool = True  # vLLM's: special tokens left out of the text
    spaces_between_special_tokens: bool = True  # vLLM's: false joins added tokens in a row where kept (detok)
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # the alternatives per token to report with each token's log-probability (None: no)
    prompt_logprobs: bool = False  # the prompt's tokens' too (a completion's echo)
    token_ids_as_names: bool = False  # vLLM's return_tokens_as_token_ids: logprobs name tokens "token_id:<id>"
    prompt_top: int | None = None  # vLLM's prompt_logprobs: the alternatives per prompt token (None: not asked)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # filled by the engine
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    whole: int = 0  # the text's length at the last token after which it did not end inside a character
    stop_from: int = 0  # where a stop string may end at the earliest: the text of the first min_tokens tokens
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or stop token id that ended it (None: EOS, length)
    detok: Detokenizer | None = None
    penalties: Penalties | None = None  # the row's tokens so far for its penalties (sampling.adjusted keeps it)
    prompt_rows: list[dict[int, tuple[float, int]] | None] = field(default_factory=list)  # {token: (logprob, rank)}
    # (token, its log-probability (None: a prompt's first token), [(token, log-probability)] the most likely first)
    logprob_rows: list[tuple[int, float | None, list[tuple[int, float]]]] = field(default_factory=list)


class Engine:
    """Serve ``model`` (a DeltaModel on a causal LM) with ``tokenizer``; requests go through ``submit``.

    Args:
        model: the DeltaModel holding every adapter; the engine puts it in eval mode and never trains it.
        tokenizer: the base model's tokenizer.
        max_batch_size: the most rows decoded together.
        max_wait_s: how long the first request of a batch waits for others to join it.
    """

    def __init__(self, model: Any, tokenizer: Any, max_batch_size: int = 32, max_wait_s: float = 0.01) -> None:
        if getattr(model.config, "is_encoder_decoder", False) or not hasattr(model.base_model, "generate"):
            raise ValueError("deltatune serve serves causal language models (decoder-only) only")
        if max_batch_size < 1 or not max_wait_s >= 0:  # a batch of 0 rows would leave every request waiting
            raise ValueError(f"max_batch_size must be >= 1 and max_wait_s >= 0, got {max_batch_size} and {max_wait_s}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.lock = threading.RLock()  # held while the model computes or its adapters change
        self.pending: queue.Queue[Request] = queue.Queue()
        self.running = 0  # rows in the batch being decoded
        self.batches = 0  # batches decoded so far
        self.cancelled = 0  # rows dropped from a running batch because their client went away
        self.joined = 0  # requests that joined a running batch (continuous batching)
        self._aside: list[Request] = []  # taken from the queue while joining, but for another batch
        self._retrying = 0  # a failed batch's halves running (_answered): nothing joins them
        self._routes: dict[str, bool] = {}
        # The built-in chat template each adapter's run trained with (its recipe's data.template), which its chat
        # requests are rendered with; an adapter not named here is prompted through the tokenizer's template.
        self.templates: dict[str, str] = {}
        self.paths: dict[str, str] = {}  # each adapter's folder (vLLM's ``root`` in /v1/models)
        # The ids that end each adapter's answers besides ``eos_ids``: the end marker its run's template trained in
        # the EOS's place (chatml's <|im_end|> with a tokenizer that has no EOS); they apply to its rows alone.
        self.stops: dict[str, set[int]] = {}
        # Such a marker written in several tokens (no id to stop on): stopped on as text, as deltatune chat does
        self.markers: dict[str, str] = {}
        self._turn_end: list[int | None] = []  # the tokenizer's chat template's end of a turn, once read
        self._changes_waiting = 0  # adapter loads/unloads waiting for the lock
        self._count_lock = threading.Lock()
        self.gen = getattr(model, "generation_config", None)  # its repetition_penalty and top_k apply (_pick)
        eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
        eos = tokenizer.eos_token_id if eos is None else eos
        eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos), 0)
        # vLLM's: the tokenizer's EOS ends a row with stop_reason null, the generation config's other EOS ids are
        # stop_token_ids (stop_reason: the id), none of them under ignore_eos; all of them are all_stop_token_ids,
        # which min_tokens masks, under ignore_eos too (update_from_generation_config).
        self.eos_ids = eos | ({tokenizer.eos_token_id} - {None})
        # transformers 5.24 renamed the forward's cache argument to ``cache`` (and warns on ``past_key_values``).
        params = inspect.signature(model.get_base_model().forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="deltatune-serve-engine", daemon=True)
        self._thread.start()

    # -- adapters -------------------------------------------------------------------------------------------
    def adapters(self) -> list[str]:
        """The served model names: the base, then every adapter."""
        return [BASE, *self.model.peft_config]

    def routes_rows(self, name: str) -> bool:
        """Whether the adapter can share a mixed batch with others (its method routes rows)."""
        if name == BASE:
            return True
        with self.lock:  # the check routes the layers for a moment: never while adapters change
            if name not in self._routes:
                try:
                    with self.model.mixed_batch([name]):
                        self._routes[name] = True
                except ValueError:
                    self._routes[name] = False
            return self._routes[name]

    def load_adapter(self, name: str, path: str) -> None:
        """Load the adapter saved at ``path`` as ``name`` (between batches)."""
        with self._changing():  # checked under the lock: two loads of one name give the second a 409
            if name == BASE or name in self.model.peft_config:
                raise RequestError(f"an adapter named {shown(name)} is served already", 409, "adapter_exists", "name")
            check_servable(self.model, path, name)
            template = run_template(path)  # read before loading: a run.yaml that cannot be read changes nothing
            self.model.load_adapter(path, name)
            self.model.eval()
            self.paths[name] = path
            if template is not None:
                self.templates[name] = template
                extra = set(stop_ids(self.tokenizer, template)) - self.eos_ids  # chatml's <|im_end|> with no EOS
                if extra:
                    self.stops[name] = extra
                marker = None if extra else _end_marker(self.tokenizer, template)
                if marker:
                    self.markers[name] = marker

    def unload_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (between batches); requests still waiting for it fail with 404."""
        with self._changing(), quiet_deletes():  # (under the lock: a second unload of a name 404s; no peft warning)
            if name not in self.model.peft_config:
                raise RequestError(f"no adapter named {shown(name)} is served", 404, "model_not_found", "name")
            try:
                self.model.delete_adapter(name)
            except ValueError as exc:  # another adapter (a fusion) computes with it
                raise RequestError(str(exc), 409, "adapter_in_use", "name") from None
            self._routes.pop(name, None)
            self.templates.pop(name, None)
            self.stops.pop(name, None)
            self.markers.pop(name, None)
            self.paths.pop(name, None)

    def eos_of(self, adapter: str) -> set[int]:
        """The ids that end ``adapter``'s answers as EOS does: ``eos_ids``, and its run's template's (``stops``)."""
        return _eos_of(self, adapter)

    def turn_end(self) -> int | None:
        """The special token the tokenizer's chat template ends an assistant's turn with (``deltatune chat``'s
        ``_turn_end_id``), where the generation config's EOS ids hold it not already; None where there is none."""
        if not self._turn_end:
            from ..train.chat import _turn_end_id

            end = _turn_end_id(self.tokenizer)
            self._turn_end.append(None if end in self.eos_ids else end)
        return self._turn_end[0]

    @contextmanager
    def _changing(self) -> Iterator[None]:
        """Hold the model's lock to change its adapters. Meanwhile the running batch takes no newcomers, so it
        ends (and frees the lock) even under steady load."""
        with self._count_lock:
            self._changes_waiting += 1
        try:
            with self.lock:
                yield
        finally:
            with self._count_lock:
                self._changes_waiting -= 1

    # -- requests -------------------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request; its ``emit`` callback receives the text as it is generated (after ``close``: an error)."""
        if request.temperature is None:
            request.temperature = default_temperature(self.gen)
        if self._stop.is_set():  # closed: answered at once (vLLM's engine, shut down, refuses new requests)
            return self._shut(request)
        self.pending.put(request)
        if self._stop.is_set():  # closed meanwhile: answered here (close answers what was queued before)
            self._drain()

    def close(self) -> None:
        """Stop the worker thread after the current batch; requests still waiting end with an error."""
        self._stop.set()
        try:
            self._drain()  # the running batch finds no newcomers, so it ends (under steady load it never did)
        finally:  # a client's emit that raised: the worker is stopped all the same
            self._thread.join(timeout=30)
            self._drain()  # and the requests it set aside (a worker still running answers them as it stops)

    def _drain(self) -> None:
        """Answer every queued request, and once the worker has stopped those it set aside, with the shutdown."""
        waiting: list[Request] = []
        if not self._thread.is_alive():  # never written while the worker runs: it may be taking them
            waiting, self._aside = self._aside, []
        while True:
            try:
                self._shut(waiting.pop(0) if waiting else self.pending.get_nowait())
            except queue.Empty:
                return

    @staticmethod
    def _shut(r: Request) -> None:
        r.finish_reason = "error: the server is shutting down"
        if not r.cancelled.is_set():  # its client gone (after a forced exit, the server's loop closed): none to tell
            r.emit("", r.finish_reason)

    def _loop(self) -> None:
        try:
            self._serve()
        finally:  # what it set aside for a next batch (close's join may have timed out: nobody else answers them)
            aside, self._aside = self._aside, []
            for r in aside:
                self._shut(r)

    def _serve(self) -> None:
        while not self._stop.is_set():
            if self._aside:
                batch, self._aside = self._aside[: self.max_batch_size], self._aside[self.max_batch_size :]
            else:
                try:
                    batch = [self.pending.get(timeout=0.05)]
                except queue.Empty:
                    continue
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    batch.append(self.pending.get(timeout=remaining) if remaining > 0 else self.pending.get_nowait())
                except queue.Empty:
                    break
            with self.lock:  # adapters are loaded and unloaded between these batches, never during them
                for group in self._groups(batch):
                    self._answered(group)

    def _answered(self, group: list[Request]) -> None:
        """Decode ``group``; a failed batch answers its own requests with the error and the server goes on. A batch
        whose prefill failed (no row has a token yet: one long prompt out of memory) tries each half alone, and so
        on down to the row at fault: a few batches more, not one per row."""
        try:
            return self._run(group)
        except Exception as exc:  # left before a retry: its traceback's frames hold the failed batch's tensors
            error = f"error: {type(exc).__name__}: {exc}"
        if len(group) > 1 and not any(r.output_ids or r.finish_reason for r in group):
            for r in group:
                r.logprob_rows.clear()  # its prompt's, if they were scored before the failure
            half = len(group) // 2
            self._retrying += 1  # nothing joins a half: under steady load it never ended and the other half waited
            try:
                self._answered(group[:half])
                return self._answered(group[half:])
            finally:
                self._retrying -= 1
        for r in group:
            if r.finish_reason is None:
                r.finish_reason = error
                r.emit("", r.finish_reason)

    def _groups(self, batch: list[Request]) -> list[list[Request]]:
        mixed: list[Request] = []
        alone: dict[str, list[Request]] = {}
        for r in batch:
            if r.cancelled.is_set():
                r.finish_reason = "cancelled"
                r.emit("", "cancelled")
            elif r.adapter != BASE and r.adapter not in self.model.peft_config:
                r.finish_reason = f"error: adapter {r.adapter!r} was unloaded; {UNLOADED}"
                r.emit("", r.finish_reason)
            elif self.routes_rows(r.adapter):
                mixed.append(r)
            else:
                alone.setdefault(r.adapter, []).append(r)
        # The mixed batch last: while it runs, requests for token adapters wait aside and stop further joins.
        return [g for g in (*alone.values(), mixed) if g]

    # -- decoding -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _run(self, rows: list[Request]) -> None:
        """Decode ``rows`` together until every row has finished; in a mixed batch, waiting requests join it."""
        with self.lock:
            self.batches += 1
            mixed = self.routes_rows(rows[0].adapter)
            if not mixed:
                self.model.set_adapter(rows[0].adapter)
            device = next(self.model.parameters()).device
            # ``rows`` grows in place as requests join, so the caller's error handler answers them all.
            generators = [_generator(r.seed, device) if r.temperature > 0 else None for r in rows]
            cache, mask, logits = self._prefill(rows, mixed, device)
            live = list(range(len(rows)))
            try:
                while True:
                    tokens = [self._choose(logits[j], rows[i], generators[i]) for j, i in enumerate(live)]
                    keep = [j for j, i in enumerate(live) if not self._advance(rows[i], tokens[j], logits[j])]
                    if len(keep) < len(live):  # finished rows leave the batch, and its cache
                        if keep:
                            index = torch.tensor(keep, device=device)
                            cache.batch_select_indices(index)
                            mask = mask[index]
                        live, tokens = [live[j] for j in keep], [tokens[j] for j in keep]
                    if mixed and len(live) < self.max_batch_size and _joinable(cache):
                        new = self._joiners(self.max_batch_size - len(live))
                        if new:  # continuous batching: prefill the newcomers alone, then merge their cache in
                            first = len(rows)
                            rows += new
                            generators += [_generator(r.seed, device) if r.temperature > 0 else None for r in new]
                            try:
                                new_cache, new_mask, new_logits = self._prefill(new, True, device)
                            except Exception as exc:  # out of memory for a long prompt: the newcomers alone fail
                                del rows[first:], generators[first:]
                                for r in new:  # several: a batch of their own next, each half tried if it fails
                                    r.logprob_rows.clear()
                                    if len(new) > 1:
                                        self._aside.append(r)
                                    else:
                                        r.finish_reason = f"error: {type(exc).__name__}: {exc}"
                                        r.emit("", r.finish_reason)
                                new = []
                        if new:
                            picked = [self._choose(new_logits[j], r, generators[first + j]) for j, r in enumerate(new)]
                            stay = [j for j, r in enumerate(new) if not self._advance(r, picked[j], new_logits[j])]
                            self.joined += len(new)
                            if stay:
                                index = torch.tensor(stay, device=device)
                                new_cache.batch_select_indices(index)
                                new_mask = new_mask[index]
                                if live:
                                    mask = _merge(cache, mask, new_cache, new_mask)
                                else:
                                    cache, mask = new_cache, new_mask
                                live += [first + j for j in stay]
                                tokens += [picked[j] for j in stay]
                    if not live:
                        break
                    if mixed:
                        mask = _trim(cache, mask)
                    self.running = len(live)
                    mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
                    names = [rows[i].adapter for i in live] if mixed else None
                    logits = self._forward(torch.tensor(tokens, device=device)[:, None], mask, cache, names)
            finally:
                self.running = 0

    def _prefill(self, rows: list[Request], mixed: bool, device: torch.device) -> tuple[Any, torch.Tensor, Any]:
        """Run the rows' prompts, left-padded, through the model: (cache, mask, last logits (rows, vocab))."""
        from transformers import DynamicCache

        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: the new tokens of every row line up on the right
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        cache = DynamicCache()
        self.running = len(rows)
        logits = self._forward(ids, mask, cache, [r.adapter for r in rows] if mixed else None)
        for r in rows:
            if r.prompt_logprobs or r.prompt_top is not None:  # each prompt token's given the tokens before it
                x = torch.tensor([r.prompt_ids], device=device)
                names = {"adapter_names": [_row_name(r.adapter)]} if mixed else {}
                every = self.model(input_ids=x, attention_mask=torch.ones_like(x), **names).logits[0]
                # A token adapter's virtual tokens come first; each row goes to float32 alone (no second copy).
                every = every[-len(r.prompt_ids) :]
                if r.prompt_top is not None:  # vLLM's prompt_logprobs
                    r.prompt_rows = [None] + [
                        prompt_row(every[i], t, r.prompt_top) for i, t in enumerate(r.prompt_ids[1:])
                    ]
                if r.prompt_logprobs:  # a completion's echo
                    r.logprob_rows[:0] = [(r.prompt_ids[0], None, [])] + [
                        _logprob_row(every[i], t, r.logprobs or 0) for i, t in enumerate(r.prompt_ids[1:])
                    ]
        return cache, mask, logits

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache: Any, adapters: list[str] | None) -> Any:
        """One forward pass over the new ``ids`` (rows, new tokens); the last position's logits, in float32."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]  # as transformers' generate computes them
        kwargs: dict[str, Any] = dict(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        kwargs[self._cache_arg] = cache
        if adapters is not None:
            kwargs["adapter_names"] = [_row_name(a) for a in adapters]
        return self.model(**kwargs).logits[:, -1, :].float()  # (rows, vocab)

    def _joiners(self, n: int) -> list[Request]:
        """Up to ``n`` waiting requests that may join the running mixed batch. Others wait aside (first in the next
        batch); once one waits aside, nothing more joins, so the running batch drains and it is not starved."""
        out: list[Request] = []
        while len(out) < n and not self._aside and not self._changes_waiting and not self._retrying:
            try:
                r = self.pending.get_nowait()
            except queue.Empty:
                break
            if r.cancelled.is_set() or (r.adapter != BASE and r.adapter not in self.model.peft_config):
                self._aside.append(r)  # answered by _groups at the next batch
            elif self.routes_rows(r.adapter):
                out.append(r)
            else:
                self._aside.append(r)
        return out

    def _choose(self, logits: torch.Tensor, r: Request, g: torch.Generator | None) -> int | None:
        """The row's next token (``_pick``), or None when its logits cannot be sampled from (an adapter gone to NaN):
        that row alone ends with an error, the rest of its batch goes on."""
        try:
            return _pick(logits, r, g, self.gen, _eos_of(self, r.adapter) | r.end_ids)
        except FloatingPointError as exc:
            r.finish_reason = f"error: model {r.adapter!r}: {exc}"
            return None

    def _advance(self, r: Request, token: int | None, logits: torch.Tensor | None = None) -> bool:
        """Add ``token`` to the row (with its log-probability under ``logits``, where asked), send its new text; True
        when the row has finished (None: it failed)."""
        if token is None:
            r.emit("", r.finish_reason)
            return True
        if r.cancelled.is_set():
            r.finish_reason = "cancelled"
            self.cancelled += 1
            r.emit("", "cancelled")
            return True
        if r.max_tokens == 0:  # a completion's echo alone: the prompt scored, nothing generated (as vLLM)
            r.finish_reason = "length"
            r.emit("", "length")
            return True
        r.output_ids.append(token)
        if r.logprobs is not None and logits is not None:
            r.logprob_rows.append(_logprob_row(logits, token, r.logprobs))
        if r.detok is None:
            r.detok = Detokenizer(self.tokenizer, r.prompt_ids, r.skip_special_tokens, r.spaces_between_special_tokens)
        # vLLM's check_stop: EOS (not under ignore_eos; the generation config's other EOS ids are stop_token_ids
        # there, with their stop_reason, and so are an adapter's template's), then the request's stop_token_ids
        if (token in _eos_of(self, r.adapter) or token in r.end_ids) and not r.ignore_eos:
            r.finish_reason, r.stop_reason = "stop", None if token == self.tokenizer.eos_token_id else token
        elif token in r.stop_token_ids:
            r.finish_reason, r.stop_reason = "stop", token
        # vLLM's DecodeStream gives no text for a token after which the text ends inside a character (U+FFFD): it
        # holds it (the space before a split emoji too) until a token completes it, and checks stop strings in the
        # text it gave; an answer that ends there (max_tokens, a stop token) ends with the text before that token.
        if r.finish_reason is None or r.include_stop_str_in_output:  # a stop token's text: with include_stop_str
            text = r.detok.text(r.output_ids)
            r.whole = r.whole if text.endswith("\ufffd") else len(text)
            r.text = text[: r.whole]
        if r.finish_reason is None:
            if len(r.output_ids) <= r.min_tokens:  # vLLM's: a stop string must end in text after them
                r.stop_from = len(r.text)
            # The adapter's end marker (as EOS: stop_reason null), then the first stop string in the request's
            # order that the new text completes (vLLM's check_stop_strings)
            marker = _marker_of(self, r)
            stops = [(marker, None)] * bool(marker) + [(s, s) for s in r.stop]
            hit = next(
                ((k, s, why) for s, why in stops if (k := r.text.find(s, max(r.stop_from - len(s) + 1, 0))) >= 0), None
            )
            if hit is not None:
                cut = hit[0] + len(hit[1]) if r.include_stop_str_in_output else hit[0]
                r.text, r.finish_reason, r.stop_reason = r.text[:cut], "stop", hit[2]
            elif len(r.output_ids) >= r.max_tokens:
                r.finish_reason = "length"
        if r.finish_reason is not None:
            r.emit(r.text[r.sent :], r.finish_reason)
            r.sent = len(r.text)
            return True
        # Hold back a partly decoded character's token, and before it what may still turn into a stop string.
        end = r.whole
        held = [*r.stop, *filter(None, [_marker_of(self, r)])]
        end -= 0 if r.include_stop_str_in_output else max((len(s) - 1 for s in held), default=0)
        if end > r.sent:
            r.emit(r.text[r.sent : end], None)
            r.sent = end
        return False


def check_servable(model: Any, path: str, name: str) -> None:
    """Refuse, before loading, an adapter of another task than text generation (a classifier's), or one that trains
    base parameters in place (BitFit, freeze, full fine-tuning, LoRA with biases): loading it would overwrite the
    base every served model shares. ``model`` None checks the first only (before the base is loaded).

    Raises:
        ValueError: the adapter is of that kind (the message says what to do instead).
    """
    from .. import load_config

    config = load_config(path)
    if config.task_type not in (None, "CAUSAL_LM"):
        raise ValueError(
            f"adapter {name!r} is a {config.task_type} adapter; serve generates text, with causal language models' "
            "adapters ('deltatune eval' scores a classifier)"
        )
    if model is None:
        return
    from ..status import trains_base

    if trains_base(config, model.get_base_model()):
        raise ValueError(
            f"adapter {name!r} ({config.method}) changes the base model's own parameters, which every served model "
            "shares; merge it ('deltatune merge') and serve the merged model as the base instead"
        )


def _eos_of(engine: Any, adapter: str) -> set[int]:
    """``Engine.eos_of``, for an engine-like object too (``stops`` optional)."""
    extra = getattr(engine, "stops", {}).get(adapter)
    return engine.eos_ids | extra if extra else engine.eos_ids


def _marker_of(engine: Any, r: Request) -> str | None:
    """The end marker that ends ``r`` as text (``Engine.markers``, optional; none under ignore_eos)."""
    return None if r.ignore_eos else getattr(engine, "markers", {}).get(r.adapter)


def _row_name(adapter: str) -> str:
    return _BASE_ROW if adapter == BASE else adapter
