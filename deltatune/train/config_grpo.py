"""The GRPO rollouts' generation settings (align.generation_kwargs, top_k, min_p, repetition_penalty) and their build
checks: each value built and checked as transformers' generate would at the first rollout. Split from
``config_align.py`` (which re-exports these names) for room."""

from __future__ import annotations

import math
import re
from typing import Any

from ..config import ConfigError

AlignArgs = Any  # (config_align.AlignArgs: named here without importing it, which imports this module)

GENERATION_OWNED = ("max_new_tokens", "max_length", "num_return_sequences", "num_beams", "eos_token_id",
                    "pad_token_id", "return_dict_in_generate", "stop_strings")  # fmt: skip
"""GenerationConfig settings the GRPO loop sets itself (the completions' length, count, end and shape; stop_strings
needs the tokenizer passed to generate, which the loop does not): refused in align.generation_kwargs."""
_WARPERS = {"temperature": ("TemperatureLogitsWarper", 1.0), "top_k": ("TopKLogitsWarper", 0),
            "top_p": ("TopPLogitsWarper", 1.0), "min_p": ("MinPLogitsWarper", None),
            "typical_p": ("TypicalLogitsWarper", 1.0), "epsilon_cutoff": ("EpsilonLogitsWarper", 0.0),
            "eta_cutoff": ("EtaLogitsWarper", 0.0), "repetition_penalty": ("RepetitionPenaltyLogitsProcessor", 1.0),
            "no_repeat_ngram_size": ("NoRepeatNGramLogitsProcessor", 0)}  # fmt: skip
"""The sampling settings that transformers checks only when generate builds its logits processors (the first
rollout), or never where the value switches the processor off (typical_p 2.0 read as off): each one's processor and
its value that means off; ``_check_generation`` builds the processor for any other value."""


def grpo_sampling(a: AlignArgs) -> dict[str, Any]:
    """GRPO's GenerationConfig settings beyond the temperature and top_p, as TRL's GRPOTrainer passes them: top_k,
    min_p, repetition_penalty, then align.generation_kwargs over them."""
    return {"top_k": a.top_k, "min_p": a.min_p, "repetition_penalty": a.repetition_penalty,
            **(a.generation_kwargs or {})}  # fmt: skip


def _validate_sampling(a: AlignArgs) -> None:
    if type(a.top_k) is not int or a.top_k < 0:
        raise ConfigError(f"align.top_k must be an integer >= 0 (0: all tokens), got {a.top_k!r}")
    if a.min_p is not None and not 0 <= a.min_p <= 1:
        raise ConfigError(f"align.min_p must be in [0, 1] (or null: off), got {a.min_p}")
    if a.repetition_penalty <= 0:
        raise ConfigError(f"align.repetition_penalty must be > 0 (1: none), got {a.repetition_penalty}")
    kw = a.generation_kwargs
    if kw is not None and (not isinstance(kw, dict) or not all(isinstance(k, str) for k in kw)):
        raise ConfigError(f"align.generation_kwargs must be a mapping of GenerationConfig settings, got {kw!r}")
    check_generation_ids(a)
    owned = sorted(set(kw or ()) & set(GENERATION_OWNED))
    if owned:
        raise ConfigError(f"align.generation_kwargs sets {', '.join(owned)}, which the GRPO loop sets itself "
                          "(align.max_new_tokens, align.num_generations, the EOS); drop it")  # fmt: skip
    _check_generation(a)


GENERATION_IDS = ("bad_words_ids", "sequence_bias", "forced_eos_token_id")
"""The align.generation_kwargs keys whose ids generate fails on (``check_generation_ids``; suppress_tokens: ignored)."""


def check_generation_ids(a: AlignArgs, vocab_size: int | None = None) -> None:
    """ConfigError naming the align.generation_kwargs key whose token ids are not whole numbers in [0, ``vocab_size``)
    (the model's vocabulary; None: not known yet, only >= 0), the first as written, or whose shape transformers'
    ``NoBadWordsLogitsProcessor`` / ``SequenceBiasLogitsProcessor`` refuse: generate fails at the first rollout."""
    import transformers.generation.logits_process as lp

    for key in GENERATION_IDS:
        value, where = (given := (a.generation_kwargs or {}).get(key)), f"align.generation_kwargs {key}"
        if key == "sequence_bias" and given is not None:  # {(ids...): bias} or [[ids, bias], ...]: ids, then bias
            pairs, seq = (list(given.items()) if isinstance(given, dict) else given), (list, tuple)
            if not isinstance(pairs, seq) or any(not isinstance(p, seq) or len(p) != 2 for p in pairs):
                raise ConfigError(f"{where} must be a mapping {{(ids...): bias}} or a list of [ids, bias] pairs "
                                  f"(e.g. [[[3, 4], -1.0]]), got {given!r}")  # fmt: skip
            value = [p[0] for p in pairs]
        ids, todo = [], [] if given is None else [value]
        while todo:  # (depth first, in the order written)
            v = todo.pop()
            todo.extend(reversed(v)) if isinstance(v, (list, tuple)) else ids.append(v)
        bad = [i for i in ids if type(i) is not int or i < 0 or vocab_size is not None and i >= vocab_size]
        if bad:
            limit = f"the model's vocabulary is 0 to {vocab_size - 1}" if vocab_size else "ids are whole numbers >= 0"
            raise ConfigError(f"{where}: {bad[0]!r} is no token id ({limit}); the first rollout fails on it")
        try:
            if key == "forced_eos_token_id" and given is not None:  # (generate's: max_length, then the ids)
                lp.ForcedEOSTokenLogitsProcessor(1, given)
            elif given is not None:
                (lp.SequenceBiasLogitsProcessor if key == "sequence_bias" else lp.NoBadWordsLogitsProcessor)(given)
        except (ValueError, TypeError, IndexError) as exc:
            hint = " (each bias a float, -1.0 not -1)" if key == "sequence_bias" else ""
            raise ConfigError(f"{where}: transformers' generate refuses it at the first rollout{hint}: "
                              f"{' '.join(str(exc).split())[:300]}") from None  # fmt: skip
        for bias in [p[1] for p in pairs] if key == "sequence_bias" and given is not None else []:
            if isinstance(bias, float) and (math.isnan(bias) or bias == math.inf):  # (-inf: the sequence banned)
                raise ConfigError(f"{where}: bias {bias} makes every sampling probability nan or inf, so the first "
                                  "rollout fails; a finite float, or -.inf to ban the sequence")  # fmt: skip


def _check_generation(a: AlignArgs) -> None:
    """The GenerationConfig of GRPO's rollouts (the loop's settings, then ``grpo_sampling``'s) built and checked as
    generate would at the first rollout: a key that is no GenerationConfig setting (which transformers keeps and
    ignores), a value its constructor, ``validate`` or a logits processor refuses, is a ConfigError naming the key."""
    import difflib

    import transformers.generation.logits_process as lp
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import BaseWatermarkingConfig

    known = [k for k in vars(GenerationConfig()) if not k.startswith("_") and k != "transformers_version"]
    for key in a.generation_kwargs or {}:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {near[0]!r}?" if near else "see transformers' GenerationConfig"
            raise ConfigError(f"align.generation_kwargs: {key!r} is not a GenerationConfig setting; {hint}")
    settings = {"max_new_tokens": a.max_new_tokens, "do_sample": True, "temperature": a.temperature, "top_k": 0,
                "top_p": a.top_p, **grpo_sampling(a)}  # fmt: skip
    kw, key = a.generation_kwargs or {}, None
    if kw.get("do_sample", True) is not True:
        raise ConfigError("align.generation_kwargs do_sample: GRPO samples each prompt's group of completions; "
                          "greedy ones are all alike, so every advantage is 0: drop it")  # fmt: skip
    mark = kw.get("watermarking_config")  # (GenerationConfig builds one from a dict, keeps an instance as given)
    if mark is not None and not isinstance(mark, (dict, BaseWatermarkingConfig)):
        raise ConfigError(f"align.generation_kwargs watermarking_config must be a mapping of transformers' "
                          f"WatermarkingConfig settings (or a WatermarkingConfig), got {mark!r}")  # fmt: skip
    if mark is not None:  # (built on its own first, as GenerationConfig builds it, so a refusal names it)
        from transformers import SynthIDTextWatermarkingConfig, WatermarkingConfig

        try:
            if not isinstance(mark, BaseWatermarkingConfig):  # (SynthID's has ngram_len, as transformers tells)
                mark = (SynthIDTextWatermarkingConfig if "ngram_len" in mark else WatermarkingConfig).from_dict(mark)
            mark.validate()
        except (ValueError, TypeError, AttributeError) as exc:
            why = " ".join(str(exc).split())
            raise ConfigError(f"align.generation_kwargs watermarking_config: transformers' generate refuses it at "
                              f"the first rollout: {why[:300]}") from None  # fmt: skip
    try:
        gen = GenerationConfig(**settings)
        try:  # (not strict: a minor flag transformers warns about, output_scores alone, trains as it does)
            gen.validate()
        except AttributeError as exc:  # (a watermarking_config's odd value: generate's own validate fails alike)
            raise ValueError(str(exc)) from exc
        for key, (warper, off) in _WARPERS.items():
            value = getattr(gen, key, off)
            if value is not None and value != off:  # (generate builds no processor for the off value: 1 is 1.0)
                getattr(lp, warper)(value)
    except (ValueError, TypeError) as exc:
        if key is None and (named := re.search(r"`(\w+)`", str(exc))):  # (validate's: the setting it names)
            key = named.group(1) if named.group(1) in kw or hasattr(a, named.group(1)) else None
        where = f"align.generation_kwargs {key}" if key in kw else f"align.{key}" if key else "align.generation_kwargs"
        why = " ".join(str(exc).split())
        raise ConfigError(f"{where}: transformers' generate refuses it at the first rollout (or, typical_p >= 1, "
                          f"ignores it): {why[:300]}") from None  # fmt: skip
