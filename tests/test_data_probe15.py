"""Data probe 15: TRL's per-row ``chat_template_kwargs`` (ids and labels against TRL 1.16's SFT and DPO tokenization
on SmolLM2's tokenizer with a template that reads two variables), TRL's dataset types one by one against its own
tokenization, stepwise supervision refused in one line, and LLaMA-Factory's dataset_info options."""

from __future__ import annotations

import json

import pytest

from deltatune.data.encode import lm_example, prompt_ids, sft_example
from deltatune.data.formats import read_samples
from deltatune.data.load import DataError, Row
from deltatune.data.templates import IGNORE_INDEX

# chatml whose system default and assistant header read two variables (Qwen3's enable_thinking writes an empty
# think block after the header); the generation tags let TRL's assistant_only_loss mark the trained tokens.
KW_TEMPLATE = (
    "{%- if messages[0].role != 'system' %}<|im_start|>system\n{{ persona | default('You are helpful.') }}"
    "<|im_end|>\n{%- endif %}"
    "{%- set think = '<think>\n</think>\n' if enable_thinking is defined and enable_thinking is false else '' %}"
    "{%- for m in messages %}{%- if m.role == 'assistant' %}<|im_start|>assistant\n{{ think }}"
    "{% generation %}{{ m.content }}<|im_end|>\n{% endgeneration %}"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{{ think }}{%- endif %}"
)
KW = {"enable_thinking": False, "persona": "Be terse."}


@pytest.fixture(scope="module")
def tok():
    from tiny import smollm2_tokenizer

    t = smollm2_tokenizer()
    t.chat_template = KW_TEMPLATE
    return t


def _read(row: dict, stage: str | None = "sft", **kw):
    return read_samples([Row(row, "t.jsonl:4")], kw.pop("columns", {}), stage=stage, **kw)[0]


def _trl_sft(example: dict, tok) -> tuple[list[int], list[int]]:
    """TRL 1.16's SFTTrainer tokenize_fn (conversational rows, assistant_only_loss for messages) as ids and labels."""
    from trl.data_utils import _tokenize, common_prefix_length

    kw = {"tools": example.get("tools"), **example.get("chat_template_kwargs", {})}
    if "prompt" in example:
        p = _tokenize(tok, example["prompt"], add_generation_prompt=True, **kw)["input_ids"]
        ids = _tokenize(tok, example["prompt"] + example["completion"], **kw)["input_ids"]
        n = common_prefix_length(p, ids)
        return ids, [IGNORE_INDEX] * n + ids[n:]
    out = _tokenize(tok, example["messages"], return_assistant_tokens_mask=True, **kw)
    return out["input_ids"], [i if m else IGNORE_INDEX for i, m in zip(out["input_ids"], out["assistant_masks"])]


Q = [{"role": "user", "content": "What colour is a ripe lemon?"}]
A = [{"role": "assistant", "content": "Yellow."}]
B = [{"role": "assistant", "content": "Purple."}]


@pytest.mark.parametrize("shape", ["messages", "prompt_completion"])
@pytest.mark.parametrize("as_json", [False, True])
def test_chat_template_kwargs_reach_the_template_as_trls_sft(tok, shape, as_json):
    """A row's chat_template_kwargs were dropped without a word: the template rendered its defaults (no think block,
    "You are helpful."), where TRL's SFTTrainer passes them to apply_chat_template."""
    example = {"messages": Q + A} if shape == "messages" else {"prompt": Q, "completion": A}
    example["chat_template_kwargs"] = KW
    ids, labels = sft_example(_read({**example, "chat_template_kwargs": json.dumps(KW) if as_json else KW}), tok, None)
    ref_ids, ref_labels = _trl_sft(example, tok)
    assert "<think>" in tok.decode(ids) and "Be terse." in tok.decode(ids)  # (the variables changed the text)
    assert ids == ref_ids and labels == ref_labels
    assert tok.decode([x for x in labels if x != IGNORE_INDEX]) == "Yellow.<|im_end|>\n"
    plain = sft_example(_read({k: v for k, v in example.items() if k != "chat_template_kwargs"}), tok, None)[0]
    assert plain == _trl_sft({k: v for k, v in example.items() if k != "chat_template_kwargs"}, tok)[0] != ids


def test_chat_template_kwargs_reach_dpo_and_ppo_as_trls(tok):
    """DPO's chosen/rejected ids and PPO's prompt ids render with the row's variables, as TRL's DPO tokenize_fn and
    maybe_apply_chat_template do (prompt ids = its prompt_ids cut to the common prefix)."""
    from trl.data_utils import _tokenize, common_prefix_length, maybe_apply_chat_template

    s = _read({"prompt": Q, "chosen": A, "rejected": B, "chat_template_kwargs": KW}, "dpo")
    p = _tokenize(tok, Q, add_generation_prompt=True, **KW)["input_ids"]
    for response, side in ((s.chosen, A), (s.rejected, B)):
        full = _tokenize(tok, Q + side, **KW)["input_ids"]
        n = common_prefix_length(p, full)
        ex, cut = lm_example(s, response, tok, None, 10**6)
        assert not cut and ex["input_ids"] == full
        assert ex["labels"] == [IGNORE_INDEX] * n + full[n:]
    s = _read({"prompt": Q, "chat_template_kwargs": KW}, "ppo")
    want = maybe_apply_chat_template({"prompt": Q, "chat_template_kwargs": KW}, tok)["prompt"]
    assert tok.decode(prompt_ids(s, tok, None, 10**6)) == want and want.endswith("</think>\n")


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("[1, 2]", "must be an object of template variables, got list"),
        ("{not json", "must be a JSON object, got '{not json'"),
        ({"add_generation_prompt": True}, r"chat_template_kwargs\.add_generation_prompt: the stage sets this"),
        ({"tools": []}, r"chat_template_kwargs\.tools: the stage sets this"),
    ],
)
def test_bad_chat_template_kwargs_are_one_line_naming_the_row(value, why):
    value = json.loads(value) if value == "[1, 2]" else value
    with pytest.raises(DataError, match=rf"^t\.jsonl:4: (column 'chat_template_kwargs' )?{why}"):
        _read({"messages": Q + A, "chat_template_kwargs": value})


# -- TRL's dataset types one by one, against TRL's own tokenization -----------------------------------------------


@pytest.fixture(scope="module")
def smol():
    from tiny import smollm2_tokenizer

    return smollm2_tokenizer()  # (its own chat template: chatml, no generation tags)


def _trl_pair(tok, prompt, response) -> tuple[list[int], list[int]]:
    """TRL 1.16's DPO / KTO tokenize_fn for one side: ids of prompt + response, labels from the common prefix."""
    from trl.data_utils import _tokenize, common_prefix_length

    if isinstance(prompt, list):
        p = _tokenize(tok, prompt, add_generation_prompt=True)["input_ids"]
        full = _tokenize(tok, prompt + response)["input_ids"]
    else:  # (TRL's add_eos first appends the EOS to a standard response)
        p, full = _tokenize(tok, prompt)["input_ids"], _tokenize(tok, prompt + response + tok.eos_token)["input_ids"]
    n = common_prefix_length(p, full)
    return full, [IGNORE_INDEX] * n + full[n:]


@pytest.mark.parametrize("conversational", [True, False])
@pytest.mark.parametrize("kind", ["explicit", "implicit", "unpaired"])
def test_preference_and_unpaired_rows_give_trls_ids_and_labels(smol, kind, conversational):
    """Each of TRL's preference shapes (explicit and implicit prompt; KTO's unpaired) as its DPO and KTO trainers
    tokenize them: conversational rows through the chat template, standard rows (under data.template=raw, which a
    tokenizer without a chat template gets by itself) as plain text + EOS. Implicit rows go through TRL's
    extract_prompt first, as its trainers do."""
    from trl.data_utils import extract_prompt

    from deltatune.data.encode import RAW, choose_template
    from deltatune.data.sample import unpaired_examples

    p, a, b = (Q, A, B) if conversational else ("What colour is a ripe lemon?", " Yellow.", " Purple.")
    row = {"prompt": p, "chosen": a, "rejected": b}
    if kind == "implicit":
        row = {"chosen": Q + A, "rejected": Q + B} if conversational else {"chosen": p + a, "rejected": p + b}
    if kind == "unpaired":
        row = {"prompt": p, "completion": a, "label": True}
    stage = "kto" if kind == "unpaired" else "dpo"
    s = _read(row, stage)
    template = choose_template([s], smol, None if conversational else RAW, stage)
    ref = extract_prompt(row) if kind == "implicit" else row
    for (prompt, response, _), side in zip(unpaired_examples([s]), ("chosen", "rejected", "completion")):
        want_ids, want_labels = _trl_pair(smol, ref["prompt"], ref[side if side in ref else "completion"])
        ex, _ = lm_example(s.__class__(s.source, s.format, prompt, conversational=s.conversational), response,
                           smol, template, 10**6)  # fmt: skip
        assert ex["input_ids"] == want_ids and ex["labels"] == want_labels, side


@pytest.mark.parametrize("conversational", [True, False])
def test_prompt_only_rows_give_trls_prompt(smol, conversational):
    """PPO's prompt ids: TRL's maybe_apply_chat_template (the generation prompt) for a conversational prompt, the
    text itself for a standard one under data.template=raw."""
    from trl.data_utils import maybe_apply_chat_template

    from deltatune.data.encode import RAW

    row = {"prompt": Q if conversational else "The sky is"}
    want = smol(maybe_apply_chat_template(row, smol)["prompt"])["input_ids"]
    assert prompt_ids(_read(row, "ppo"), smol, None if conversational else RAW, 10**6) == want


@pytest.mark.parametrize("kind", ["messages", "prompt_completion"])
def test_sft_conversational_rows_give_trls_ids(smol, kind):
    """Language modeling (messages) and prompt-completion rows, conversational: TRL's SFT ids; the labels are the
    completion (TRL's completion_mask) and, for messages, the assistant turn through its <|im_end|>\\n."""
    row = {"messages": Q + A} if kind == "messages" else {"prompt": Q, "completion": A}
    ids, labels = sft_example(_read(row), smol, None)
    from trl.data_utils import _tokenize

    ref_ids = _trl_sft(row, smol)[0] if kind == "prompt_completion" else _tokenize(smol, Q + A)["input_ids"]
    assert ids == ref_ids
    if kind == "prompt_completion":
        assert labels == _trl_sft(row, smol)[1]
    assert smol.decode([x for x in labels if x != IGNORE_INDEX]) == "Yellow.<|im_end|>\n"


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_raw_template_gives_trls_plain_sft_of_a_standard_prompt_completion_row(smol, train_on_prompt):
    """data.template=raw: a standard prompt-completion row as TRL's SFTTrainer tokenizes it (prompt + completion +
    EOS, no chat template; the completion from the common prefix); without it the row is wrapped in the chat
    template on purpose (LLaMA-Factory's rule; was the only way until probe 15: 'raw' was an unknown template)."""
    from trl.data_utils import _tokenize, common_prefix_length

    from deltatune.data.encode import RAW, choose_template, encode_sft_samples, rendered

    row = {"prompt": "The sky is", "completion": " blue."}
    s = _read(row)
    assert choose_template([s], smol, RAW, "sft") == RAW
    ids, labels = sft_example(s, smol, RAW, train_on_prompt=train_on_prompt)
    full = _tokenize(smol, "The sky is blue." + smol.eos_token)["input_ids"]
    n = common_prefix_length(_tokenize(smol, "The sky is")["input_ids"], full)
    assert ids == full and labels == (full if train_on_prompt else [IGNORE_INDEX] * n + full[n:])
    assert smol.decode(full[n:]) == " blue.<|im_end|>"
    enc = encode_sft_samples([s], smol, RAW, 4, mask_history=True)  # TRL's cut: the first max_length tokens
    assert enc.examples[0]["input_ids"] == full[:4]
    text, spans = rendered(s, smol, RAW, "sft")[0][1:]
    assert text[spans[0][0] : spans[0][1]] == " blue.<|im_end|>"
    from deltatune.train.chat import prompt_ids as chat_prompt_ids  # a raw run's model prompted as it trained

    assert chat_prompt_ids(smol, "The sky is", template=RAW) == _tokenize(smol, "The sky is")["input_ids"]


@pytest.mark.parametrize(
    ("row", "stage", "why"),
    [
        ({"prompt": Q, "completion": A}, "sft", "this conversational prompt_completion row needs a chat template"),
        ({"messages": Q + A}, "sft", "this conversational messages row needs a chat template"),
        ({"prompt": Q, "chosen": A, "rejected": B}, "dpo", "this conversational preference row needs a chat"),
    ],
)
def test_raw_template_refuses_a_row_it_cannot_render_in_one_line(smol, row, stage, why):
    from deltatune.data.encode import RAW, choose_template

    with pytest.raises(DataError, match=rf"^t\.jsonl:4: data\.template=raw renders TRL's standard rows .*{why}"):
        choose_template([_read(row, stage)], smol, RAW, stage)


@pytest.mark.parametrize("prompt", ["Which is larger, 9.8 or 9.11?", Q])
@pytest.mark.parametrize("stage", ["sft", "dpo", "ppo", None])
def test_stepwise_supervision_is_refused_in_one_line(prompt, stage):
    """TRL's stepwise-supervision rows (prompt, completions, labels) were read by stage ppo as prompt-only rows
    without a word, and refused elsewhere as "the prompt format"; no stage trains a process reward model."""
    row = {"prompt": prompt, "completions": ["11 > 8.", "So 9.11 is larger."], "labels": [True, False]}
    with pytest.raises(DataError, match=r"^t\.jsonl:4: a stepwise-supervision row \(prompt, completions, labels"):
        _read(row, stage)
    want = prompt if isinstance(prompt, str) else prompt[0]["content"]
    assert _read(row, "ppo", data_format="prompt").messages[0]["content"] == want  # (the way to its prompt)


# -- LLaMA-Factory's dataset_info options ---------------------------------------------------------------------------


def test_a_sharegpt_response_of_the_human_tag_is_named_not_called_empty():
    """A ranking row whose chosen is a human turn was refused as "column 'chosen' is empty" (LLaMA-Factory's converter
    finds its role tag invalid: the response must be of the assistant or function tag)."""
    row = {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "human", "value": "a"},
           "rejected": {"from": "gpt", "value": "b"}}  # fmt: skip
    with pytest.raises(
        DataError, match=r"^t\.jsonl:4: column 'chosen': a response must be an assistant turn, got user \(data\.bad"
    ):
        _read(row, "dpo")
    row["chosen"] = {"from": "function_call", "value": '{"name": "f", "arguments": {}}'}  # (the function tag: a call)
    s = _read({**row, "tools": '[{"name": "f", "parameters": {}}]'}, "dpo")
    assert s.chosen[0]["tool_calls"][0]["function"]["name"] == "f"


def test_an_audio_row_is_refused_in_one_line():
    """LLaMA-Factory's audios column was dropped without a word: the row trained as text, its <audio> marker literal
    (data.columns still refuses an 'audios' key as unknown: probe 11)."""
    row = {"messages": [{"role": "user", "content": "<audio>What is said?"}, *A], "audios": ["a.wav"]}
    with pytest.raises(DataError, match=r"^t\.jsonl:4: column 'audios': an audio row; no stage reads audio"):
        _read(row)
    assert _read({"messages": Q + A, "audios": []}).messages == Q + A


def test_a_completion_of_a_user_turn_is_named_not_called_a_conversation_without_an_answer():
    """A conversational completion holding a user turn was refused as "the conversation has no assistant message to
    learn from", naming neither the column nor the turn."""
    row = {"prompt": Q, "completion": [{"role": "user", "content": "x"}]}
    with pytest.raises(DataError, match=r"^t\.jsonl:4: completion: the response must end with an assistant message$"):
        _read(row)


# -- review of probe 15 (each test failed on the files before its fix) -------------------------------------------


def _trl_standard_pair(tok, prompt: str, chosen: str, rejected: str):
    """TRL 1.16's DPOTrainer on a standard row: add_eos (where absent), tokenize prompt + response whole, split both
    sides at the shorter common prefix with the tokenized prompt."""
    from trl.data_utils import _tokenize, common_prefix_length

    eos = tok.eos_token
    p = _tokenize(tok, prompt)["input_ids"]
    fulls = [_tokenize(tok, prompt + (r if r.endswith(eos) else r + eos))["input_ids"] for r in (chosen, rejected)]
    n = min(common_prefix_length(p, f) for f in fulls)
    return [(f, [IGNORE_INDEX] * n + f[n:]) for f in fulls]


RAW_PAIRS = [
    ("The sky is ", "blue.", "red."),  # the prompt's trailing space merges into the answer's first token
    ("The sky is bl", "ue.", "ack."),  # a word split across the boundary
    ("Q?", " A.<|im_end|>", " B."),  # a response already ending with EOS gets no second one
    ("What colour is a lemon?", " Yellow.", " Purple."),
]


@pytest.mark.parametrize(("prompt", "chosen", "rejected"), RAW_PAIRS)
def test_raw_preference_rows_give_trls_dpo_kto_and_reward_ids(smol, prompt, chosen, rejected):
    """data.template=raw (and a tokenizer with no chat template) tokenized prompt and response apart and always
    appended EOS: "The sky is " + "blue." trained [' ', 'blue'] where TRL trains ' blue', and " A.<|im_end|>" ended
    with two EOS. Now the ids and labels are TRL 1.16's DPO, KTO and Reward trainers' (exact equality)."""
    from trl.data_utils import _tokenize, common_prefix_length

    from deltatune.data.encode import RAW, choose_template, encode_pair_samples, scored_example

    s = _read({"prompt": prompt, "chosen": chosen, "rejected": rejected}, "dpo")
    assert choose_template([s], smol, RAW, "dpo") == RAW
    ex = encode_pair_samples([s], smol, RAW, 10**6, "truncate", True, shared_prompt=True).examples[0]
    for side, (ids, labels) in zip(("chosen", "rejected"), _trl_standard_pair(smol, prompt, chosen, rejected)):
        assert ex[side]["input_ids"] == ids and ex[side]["labels"] == labels, side
    for side, response in (("chosen", chosen), ("rejected", rejected)):  # rm: the whole text, EOS once
        got = scored_example(s, getattr(s, side), smol, RAW, 10**6)[0]["input_ids"]
        eos = smol.eos_token
        assert got == _tokenize(smol, prompt + (response if response.endswith(eos) else response + eos))["input_ids"]
    k = _read({"prompt": prompt, "completion": chosen, "label": True}, "kto")
    got = lm_example(k, k.completion, smol, RAW, 10**6)[0]
    full = _tokenize(smol, prompt + (chosen if chosen.endswith(smol.eos_token) else chosen + smol.eos_token))
    n = common_prefix_length(_tokenize(smol, prompt)["input_ids"], full["input_ids"])
    assert got["input_ids"] == full["input_ids"] and got["labels"] == [IGNORE_INDEX] * n + full["input_ids"][n:]


def test_raw_preference_rows_are_cut_keeping_the_answer(smol):
    """An over-long raw pair keeps the end of the prompt and at least half of max_length of the answer's start
    (TRL's split, deltatune's cut)."""
    from deltatune.data.preference import encode_lm

    whole, _ = encode_lm(smol, "one two three four five six seven", " eight nine ten.", 10**6)
    first = next(i for i, x in enumerate(whole["labels"]) if x != IGNORE_INDEX)
    assert smol.decode(whole["input_ids"][first:]) == " eight nine ten.<|im_end|>"
    cut, was_cut = encode_lm(smol, "one two three four five six seven", " eight nine ten.", 6)
    assert was_cut and cut["input_ids"] == whole["input_ids"][first - 3 : first + 3]
    assert cut["labels"] == [IGNORE_INDEX] * 3 + whole["input_ids"][first : first + 3]


def test_raw_grpo_refuses_a_conversational_prompt_in_one_line(smol):
    """GRPO under data.template=raw joined a conversational prompt's texts ("You are terse.What is 2+2?") where
    sft, dpo and ppo refuse such rows; a string prompt is still the tokenizer's ids."""
    from deltatune.train.grpo import encode_prompts

    conv = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}]
    with pytest.raises(
        DataError, match=r"^g\.jsonl:1: data\.template=raw renders TRL's standard rows .*'prompt' hold"
    ):
        encode_prompts([Row({"prompt": conv}, "g.jsonl:1")], smol, "prompt", 512, "truncate", template="raw")
    items, _ = encode_prompts([Row({"prompt": "The sky is"}, "g.jsonl:2")], smol, "prompt", 512, "truncate", "raw")
    assert items[0].ids == smol("The sky is")["input_ids"]


def test_raw_render_refuses_a_system_prompt_in_one_line(smol):
    """chat / generate under a raw run joined a system prompt to the text with no separator ("Be brief.Hello")."""
    from deltatune.data.templates import ChatTemplateError, render

    with pytest.raises(ChatTemplateError, match=r"^data\.template=raw renders plain text .* no place for a system"):
        render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}], smol, "raw", True)
    assert render([{"role": "user", "content": "Hello"}], smol, "raw", True) == ("Hello", [])


@pytest.fixture(scope="module")
def qwen3(smol):
    """SmolLM2's tokenizer with TRL 1.16's real Qwen3 template (enable_thinking false writes the empty think block
    in the generation prompt, "\\n\\n" after it, which the whole conversation tokenizes otherwise)."""
    import copy
    import pathlib

    import trl

    t = copy.deepcopy(smol)
    t.chat_template = (pathlib.Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja").read_text()
    return t


@pytest.mark.parametrize("kw", [{"enable_thinking": False}, {"enable_thinking": True}, None])
def test_qwen3_enable_thinking_prompt_completion_and_dpo_give_trls_labels(qwen3, kw):
    """A conversational prompt-completion row (sft) and a preference row (dpo, kto) under Qwen3's enable_thinking
    false: TRL trains from the token common prefix ("\\n\\nYellow.<|im_end|>\\n"), deltatune trained from the answer's
    characters ("Yellow.<|im_end|>\\n"; 2 label positions differed). Now equal to TRL (exact)."""
    from trl.data_utils import _tokenize, common_prefix_length

    from deltatune.data.encode import choose_template, encode_pair_samples

    extra = {"chat_template_kwargs": kw} if kw is not None else {}
    row = {"prompt": Q, "completion": A, **extra}
    ids, labels = sft_example(_read(row), qwen3, None)
    assert (ids, labels) == _trl_sft(row, qwen3)
    if kw == {"enable_thinking": False}:
        assert qwen3.decode([x for x in labels if x != IGNORE_INDEX]) == "\n\nYellow.<|im_end|>\n"
    s = _read({"prompt": Q, "chosen": A, "rejected": B, **extra}, "dpo")
    ex = encode_pair_samples([s], qwen3, choose_template([s], qwen3, None, "dpo"), 10**6, "truncate", True, True)
    k = kw or {}
    p = _tokenize(qwen3, Q, add_generation_prompt=True, **k)["input_ids"]
    fulls = [_tokenize(qwen3, Q + r, **k)["input_ids"] for r in (A, B)]
    n = min(common_prefix_length(p, f) for f in fulls)
    for side, full in zip(("chosen", "rejected"), fulls):
        assert ex.examples[0][side]["input_ids"] == full and ex.examples[0][side]["labels"] == [-100] * n + full[n:]
    kto = _read({"prompt": Q, "completion": A, "label": True, **extra}, "kto")
    got = lm_example(kto, kto.completion, qwen3, None, 10**6)[0]
    n = common_prefix_length(p, fulls[0])
    assert got["labels"] == [-100] * n + fulls[0][n:]


def test_qwen3_enable_thinking_false_messages_differ_from_trls_training_template_on_purpose(qwen3):
    """Kept on purpose (docs/data-formats.md): a messages row under enable_thinking false trains the answer only,
    its empty think block left with the generation prompt that writes it at inference; TRL's assistant_only_loss
    swaps in qwen3_training.jinja, which tags the think block too (ids equal, 10 of 30 label positions differ)."""
    import pathlib

    import trl
    from trl.data_utils import _tokenize

    kw = {"enable_thinking": False}
    ids, labels = sft_example(_read({"messages": Q + A, "chat_template_kwargs": kw}), qwen3, None)
    training = (pathlib.Path(trl.__file__).parent / "chat_templates" / "qwen3_training.jinja").read_text()
    out = _tokenize(qwen3, Q + A, return_assistant_tokens_mask=True, chat_template=training, **kw)
    theirs = [i if m else IGNORE_INDEX for i, m in zip(out["input_ids"], out["assistant_masks"])]
    assert ids == out["input_ids"]
    assert qwen3.decode([x for x in labels if x != IGNORE_INDEX]) == "Yellow.<|im_end|>\n"
    assert qwen3.decode([x for x in theirs if x != IGNORE_INDEX]) == "<think>\n\n</think>\n\nYellow.<|im_end|>\n"
    assert sum(a != b for a, b in zip(labels, theirs)) == 10 and len(labels) == len(theirs) == 30


def test_a_human_tag_ranking_response_is_skipped_under_bad_pairs_skip():
    """data.bad_pairs=skip left such a row out before 3622734 (read as an empty response); it became a hard error."""
    row = {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "human", "value": "a"},
           "rejected": {"from": "gpt", "value": "b"}}  # fmt: skip
    skipped: list[str] = []
    assert read_samples([Row(row, "t.jsonl:4")], {}, stage="dpo", skipped=skipped) == []
    assert skipped == ["t.jsonl:4"]


def test_audio_columns_are_refused_in_a_text_row_and_through_data_columns():
    """A pt text row with an audios column trained as text, and data.columns {audios: ...} was an unknown key, so
    LLaMA-Factory's mapping of its audio column could not reach the refusal."""
    with pytest.raises(DataError, match=r"^t\.jsonl:4: column 'audios': an audio row; no stage reads audio"):
        _read({"text": "hello", "audios": ["a.wav"]}, "pt")
    row = {"instruction": "hi", "output": "yo", "aud": ["a.wav"]}
    with pytest.raises(DataError, match=r"^t\.jsonl:4: column 'aud': an audio row; no stage reads audio"):
        _read(row, columns={"audios": "aud"})


def test_chat_template_kwargs_null_text_and_transformers_own_arguments():
    """JSON text "null" was refused as NoneType while a real null was accepted; transformers 5's
    sanitize_control_tokens (an apply_chat_template argument) passed as a template variable."""
    row = {"messages": Q + A}
    assert _read({**row, "chat_template_kwargs": "null"}).template_kwargs is None
    with pytest.raises(DataError, match=r"^t\.jsonl:4: chat_template_kwargs\.sanitize_control_tokens: the stage sets"):
        _read({**row, "chat_template_kwargs": {"sanitize_control_tokens": False}})


def test_data_inspect_names_data_template_raw_as_asked(smol, tmp_path):
    """`data inspect --template raw` said "the tokenizer has no chat template" with a model that has one, and "the
    built-in raw template" without --model; the --template help named chatml, alpaca and plain only."""
    from deltatune.cli_parser import _parser
    from deltatune.data.inspect import inspect

    path = tmp_path / "pc.jsonl"
    path.write_text('{"prompt": "The sky is", "completion": " blue."}\n')
    alone = inspect(str(path), stage="sft", template="raw")
    assert (
        "template: none (data.template=raw: plain prompt and response texts" in alone and "built-in raw" not in alone
    )
    with_model = inspect(str(path), model=smol.name_or_path, stage="sft", template="raw")
    assert "template: none (data.template=raw: plain prompt" in with_model and "has no chat template" not in with_model
    assert "The sky is[[ blue.<|im_end|>]]" in with_model
    top = next(a for a in _parser([])._actions if a.choices and "data" in a.choices).choices["data"]
    di = top.commands["inspect"]
    assert "plain or raw" in next(a.help for a in di._actions if "--template" in a.option_strings)


def test_raw_reward_rows_are_shown_as_trained(smol):
    """data inspect / the run report showed a decoder's raw rm row through its pair template (no EOS) where it trains
    on prompt + response + EOS."""
    from deltatune.data.encode import RAW, rendered, scored_example

    s = _read({"prompt": "The sky is ", "chosen": "blue.", "rejected": "red."}, "rm")
    (_, text, spans), _ = rendered(s, smol, RAW, "rm")
    assert text == "The sky is blue.<|im_end|>" and spans == []
    assert smol(text)["input_ids"] == scored_example(s, s.chosen, smol, RAW, 10**6)[0]["input_ids"]


# -- review 15z: the common-prefix rule under mask_history and in a cut DPO pair; data inspect --template raw ----


@pytest.fixture(scope="module")
def bos(smol):
    """SmolLM2's tokenizer made Llama-like: a BOS before every encoding, and a template of its own that writes it
    (its generation prompt's "\\n\\n" tokenizes otherwise before an answer, so TRL trains it)."""
    import copy

    from tokenizers import processors

    t = copy.deepcopy(smol)
    t.bos_token = "<|endoftext|>"
    t.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", 0)]
    )
    t.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n\n{{ m['content'] }}<|im_end|>"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n\n{% endif %}"
    )
    return t


def test_mask_history_keeps_the_common_prefix_rule_of_a_one_turn_prompt_completion_row(bos):
    """83a2135 skipped the common-prefix step under data.mask_history: the default trained "\\n\\nYellow.<|im_end|>"
    (TRL's), mask_history "Yellow.<|im_end|>", on a row whose only answer is the last turn. Now both equal TRL's."""
    row = {"prompt": Q, "completion": A}
    want = _trl_sft(row, bos)
    assert bos.decode([x for x in want[1] if x != IGNORE_INDEX]) == "\n\nYellow.<|im_end|>"
    for mask_history in (False, True):
        assert sft_example(_read(row), bos, None, mask_history=mask_history) == want, mask_history
    ids, labels = sft_example(_read(row), bos, None, mask_history=True, train_on_prompt=True)
    assert labels == ids == want[0]  # (every token, the "\n\n" too)
    # a completion of several turns: mask_history trains its last assistant turn only, from that turn's answer
    two = {"prompt": Q, "completion": [{"role": "assistant", "content": "Hm."}, {"role": "user", "content": "?"}, *A]}
    labels = sft_example(_read(two), bos, None, mask_history=True)[1]
    assert bos.decode([x for x in labels if x != IGNORE_INDEX]) == "Yellow.<|im_end|>"


def test_a_cut_dpo_pair_splits_at_the_shorter_prompt_as_the_whole_pair(bos):
    """A DPO pair cut to data.max_length skipped the shared split, so each side split at its own common prefix
    (chosen trained ' Yellow.<|im_end|>', rejected '\\n\\nPurple.'); TRL splits at the shorter one always. Now the
    pair is split whole (TRL's ids and labels, exact), then cut: each side keeps its answer's start."""
    from trl.data_utils import _tokenize, common_prefix_length

    from deltatune.data.encode import choose_template, encode_pair_samples

    s = _read({"prompt": Q, "chosen": [{"role": "assistant", "content": " Yellow."}], "rejected": B}, "dpo")
    template = choose_template([s], bos, None, "dpo")
    p = _tokenize(bos, Q, add_generation_prompt=True)["input_ids"]
    fulls = [_tokenize(bos, Q + [{"role": "assistant", "content": r}])["input_ids"] for r in (" Yellow.", "Purple.")]
    n = min(common_prefix_length(p, f) for f in fulls)
    whole = encode_pair_samples([s], bos, template, 10**6, "truncate", True, True).examples[0]
    for side, full in zip(("chosen", "rejected"), fulls):
        assert whole[side]["input_ids"] == full and whole[side]["labels"] == [IGNORE_INDEX] * n + full[n:]
    enc = encode_pair_samples([s], bos, template, 10, "truncate", True, True)
    assert enc.truncated == 1
    trained = {k: bos.decode([x for x in v["labels"] if x != IGNORE_INDEX]) for k, v in enc.examples[0].items()}
    assert trained == {"chosen": "\n\n Yellow.<|im_end|>", "rejected": "\n\nPurple."}
    for side in ("chosen", "rejected"):  # the prompt's end and the answer's start, a slice of the whole
        got, all_of = enc.examples[0][side], whole[side]
        f = next(i for i, x in enumerate(got["labels"]) if x != IGNORE_INDEX)
        assert got["input_ids"] == all_of["input_ids"][n - f : n - f + 10]
        assert got["labels"] == all_of["labels"][n - f : n - f + 10]


@pytest.mark.parametrize(
    ("row", "what"),
    [
        ({"messages": Q + A}, "conversational messages"),
        ({"prompt": Q, "completion": A}, "conversational prompt_completion"),
    ],
)
def test_data_inspect_raw_without_a_model_refuses_what_training_refuses(tmp_path, row, what):
    """`data inspect --template raw` with no --model never ran the raw refusal: a messages row crashed (IndexError
    from raw_text), a conversational prompt-completion row was shown ("Hi[[Yo]]") though training refuses it."""
    from deltatune.data.inspect import inspect

    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(
        DataError, match=rf"^{path}:1: data\.template=raw renders TRL's standard rows .*this {what} row"
    ):
        inspect(str(path), stage="sft", template="raw")
    path.write_text('{"prompt": "Hi", "completion": " Yo"}\n')
    assert inspect(str(path), stage="sft", template="raw").endswith("[conversation]\nHi[[ Yo]]")


def test_rendered_spans_show_the_tokens_the_common_prefix_trains(bos, qwen3):
    """data inspect / the run report marked the answer's characters only ("Yellow.<|im_end|>") where 83a2135 trains
    from the token common prefix ("\\n\\nYellow.<|im_end|>"): the spans now cover the trained tokens' text, in sft
    (with and without mask_history) and in a kto completion, as the labels (Qwen3's think block too)."""
    from deltatune.data.encode import mark, rendered

    def trained(tok, s, stage, **kw):
        return ["".join(text[a:b] for a, b in spans) for _, text, spans in rendered(s, tok, None, stage, **kw)]

    s = _read({"prompt": Q, "completion": A})
    for mh in (False, True):
        labels = sft_example(s, bos, None, mask_history=mh)[1]
        assert trained(bos, s, "sft", mask_history=mh) == [bos.decode([x for x in labels if x != IGNORE_INDEX])]
    assert trained(bos, s, "sft") == ["\n\nYellow.<|im_end|>"]
    kto = _read({"prompt": Q, "completion": A, "label": True}, "kto")
    assert trained(bos, kto, "kto") == ["\n\nYellow.<|im_end|>"]
    labels = sft_example(s, qwen3, None)[1]  # (Qwen3's last answer gets an empty think block: TRL trains it)
    assert trained(qwen3, s, "sft") == [qwen3.decode([x for x in labels if x != IGNORE_INDEX])]
    assert trained(qwen3, s, "sft")[0].startswith("<think>")
    whole = rendered(s, bos, None, "sft", train_on_prompt=True)[0]
    assert mark(whole[1], whole[2]) == "[[" + whole[1] + "]]"


def test_a_system_prompt_sent_as_plain_text_is_refused_in_one_line(smol):
    """generate --raw --system / a model with no chat template dropped --system without a word (prompt_ids sent the
    prompt alone); data.template=raw refuses it (bb6ca0c). Now one line, and the prompt alone still goes as it is."""
    import copy

    from deltatune.config import ConfigError
    from deltatune.train.chat import prompt_ids as chat_prompt_ids

    bare = copy.deepcopy(smol)
    bare.chat_template = None
    for tok, kw, why in ((smol, {"raw": True}, "--raw"), (bare, {}, "the tokenizer has no chat template")):
        with pytest.raises(ConfigError, match=rf"^--system: the prompt goes as plain text \({why}\), which has no "):
            chat_prompt_ids(tok, "Hello", system="Be brief.", **kw)
        assert chat_prompt_ids(tok, "Hello", **kw) == smol("Hello")["input_ids"]
