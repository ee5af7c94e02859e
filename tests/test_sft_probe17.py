"""SFT probe 17: LLaMA-Factory's sharegpt turn order (its SharegptDatasetConverter's accept tags) and the other SFT /
pre-training data paths against LLaMA-Factory and TRL."""

from __future__ import annotations

import pytest

from deltatune.data.formats import read_samples
from deltatune.data.load import DataError, Row


def _lf_sharegpt_keeps(turns: list[str], ranking: bool = False) -> bool:
    """LLaMA-Factory's SharegptDatasetConverter, its role checks transcribed: a system tag only as the first turn,
    then human/observation at even and gpt/function_call at odd positions, an even count (odd for a ranking row)."""
    if turns and turns[0] == "system":
        turns = turns[1:]
    accept = (("human", "observation"), ("gpt", "function_call"))
    return all(t in accept[i % 2] for i, t in enumerate(turns)) and len(turns) % 2 == int(ranking)


CALL = '{"name": "f", "arguments": {}}'
ORDERS = {
    "system mid-conversation": ["human", "gpt", "system", "human", "gpt"],
    "two system turns": ["system", "system", "human", "gpt"],
    "two human turns": ["human", "human", "gpt"],
    "two gpt turns": ["human", "gpt", "gpt"],
    "gpt after a function_call": ["human", "function_call", "gpt"],
    "two observations": ["human", "function_call", "observation", "observation", "gpt"],
    "plain": ["system", "human", "gpt", "human", "gpt"],
    "a tool round": ["human", "function_call", "observation", "gpt"],
    "an observation first": ["observation", "gpt"],
}


@pytest.mark.parametrize("name", ORDERS)
def test_sharegpt_rows_llamafactory_drops_are_refused_naming_the_turn_and_the_rest_read(name):
    """HEAD read a system tag mid-conversation as a system message and trained rows whose turns do not alternate
    (two human turns, two gpt turns, gpt after a function_call), which LLaMA-Factory's converter drops ('Invalid role
    tag', 'Skipping this abnormal example'). Now such a row is refused in one line naming file:line and the turn; the
    rows LLaMA-Factory keeps read as before."""
    turns = ORDERS[name]
    conv = [{"from": t, "value": CALL if t == "function_call" else f"text {i}"} for i, t in enumerate(turns)]
    row = Row({"conversations": conv, "tools": '[{"name": "f", "parameters": {}}]'}, "t.jsonl:3")
    if _lf_sharegpt_keeps(turns):
        [s] = read_samples([row], {}, stage="sft")
        assert [m["role"] for m in s.messages][-1] == "assistant"
        return
    with pytest.raises(DataError) as e:
        read_samples([row], {}, stage="sft")
    msg = str(e.value)
    prompt_side = [t in ("human", "observation") for t in turns]
    bad = next(i for i in range(1, len(turns)) if turns[i] == "system" or prompt_side[i] == prompt_side[i - 1])
    assert msg.startswith(f"t.jsonl:3: conversations[{bad}].from: ") and "LLaMA-Factory" in msg and "\n" not in msg


def test_a_greeting_still_trains_and_custom_tags_are_named():
    """Kept on purpose (dc7cdf5): a conversation opening with a gpt turn trains (LLaMA-Factory drops it). With
    data.tags the refusal names the file's own tags."""
    greet = Row({"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "q"},
                                   {"from": "gpt", "value": "a"}]}, "t.jsonl:1")  # fmt: skip
    [s] = read_samples([greet], {}, stage="sft")
    assert [m["role"] for m in s.messages] == ["assistant", "user", "assistant"]
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    row = Row({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"},
                            {"role": "assistant", "content": "a"}]}, "t.jsonl:2")  # fmt: skip
    with pytest.raises(
        DataError,
        match=r"^t\.jsonl:2: messages\[1\]\.role: a 'user' turn after a 'user' turn; "
        r"sharegpt turns alternate between 'user' or 'observation' and 'assistant' or 'function_call'",
    ):
        read_samples([row], {}, None, tags, "sft")


# -- pt: LLaMA-Factory's packed pre-training blocks open with the BOS of a tokenizer that adds one --------------------


def _word_tok(add_bos: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", *"abcdefgh"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]", add_bos_token=add_bos)  # fmt: skip


def _lf_pretrain_blocks(texts: list[str], tok, block_size: int) -> list[list[int]]:
    """LLaMA-Factory's PretrainDatasetProcessor with packing (its default for stage pt), transcribed: each text + EOS,
    tokenised without special tokens, chained, cut into whole blocks; with add_bos_token each block's first id is
    replaced by the BOS."""
    ids = [i for t in texts for i in tok(t + tok.eos_token, add_special_tokens=False)["input_ids"]]
    total = len(ids) // block_size * block_size
    blocks = [ids[i : i + block_size] for i in range(0, total, block_size)]
    if getattr(tok, "add_bos_token", False):
        for b in blocks:
            b[0] = tok.bos_token_id
    return blocks


@pytest.mark.parametrize("add_bos", [True, False])
def test_pt_blocks_equal_llamafactorys_packed_pretraining_blocks(tmp_path, add_bos):
    """HEAD never wrote a BOS in a pt block: a Llama / Mistral tokenizer (add_bos_token) trained blocks opening
    mid-text, where LLaMA-Factory's pt puts its BOS as each block's first id (ids differed at position 0 of every
    block: 'c' for '[BOS]'). A tokenizer without add_bos_token (GPT-2's, SmolLM2's) is unchanged."""
    import json

    from deltatune.train.config import build
    from deltatune.train.pt import prepare_pt

    texts = ["a b c d e", "f g", "h a b c d e f g h", "a"]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = build({"stage": "pt", "model": {"name_or_path": "unused"},
                 "data": {"train": str(tmp_path / "t.jsonl"), "max_length": 4}})  # fmt: skip
    tok = _word_tok(add_bos)
    prepared = prepare_pt(cfg, tok)
    want = _lf_pretrain_blocks(texts, tok, 4)
    assert [ex["input_ids"] for ex in prepared.train] == want
    assert [ex["labels"] for ex in prepared.train] == want  # (LLaMA-Factory's collator copies the ids)
    assert (want[1][0] == tok.bos_token_id) is add_bos


# -- chat / generate: a built-in template's prompt is the beginning of what training encoded -----------------------


@pytest.mark.parametrize("template", ["chatml", "alpaca", "plain"])
def test_a_built_in_templates_chat_prompt_is_the_start_of_the_trained_row(template):
    """HEAD tokenised the rendered prompt with the tokenizer's specials on both ends: a BERT-style tokenizer (the
    MiniLM one of the tiny models) put its closing [SEP], the EOS, after the assistant header, where training has the
    answer's first token (prompt '... assistant [SEP]', trained '... assistant ok'). Now the prompt is the trained
    ids up to the first trained label, as LLaMA-Factory's chat encodes the turn its training encoded."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import tokenizer

    from deltatune.data.encode import sft_example
    from deltatune.data.sample import Sample
    from deltatune.train.chat import prompt_ids

    # (the word vocabulary has no chatml or alpaca markers: data.template refuses them there, templates probe 22)
    for tok in (tokenizer(), *([_word_tok(True)] if template == "plain" else [])):
        s = Sample("x:1", "alpaca", [{"role": "user", "content": "a b c"}, {"role": "assistant", "content": "d e"}])
        ids, labels = sft_example(s, tok, template)
        first = next(i for i, x in enumerate(labels) if x != -100)
        assert prompt_ids(tok, "a b c", template=template) == ids[:first]


@pytest.mark.parametrize("template", ["chatml", "alpaca"])
def test_a_built_in_templates_ppo_prompt_is_the_start_of_the_trained_row(template):
    """The PPO / inspect prompt (data.encode.prompt_ids) has the same closing [SEP] after the assistant header as the
    chat prompt had (see the test above); equal to the trained ids up to the first trained label with the diff."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import tokenizer

    from deltatune.data.encode import prompt_ids, sft_example
    from deltatune.data.sample import Sample

    tok = tokenizer()
    s = Sample("x:1", "alpaca", [{"role": "user", "content": "a b c"}, {"role": "assistant", "content": "d e"}])
    ids, labels = sft_example(s, tok, template)
    first = next(i for i, x in enumerate(labels) if x != -100)
    assert (
        prompt_ids(Sample("x:1", "prompt", [{"role": "user", "content": "a b c"}]), tok, template, 99) == ids[:first]
    )


def test_a_raw_runs_chat_prompt_is_the_start_of_its_trained_row():
    """data.template=raw (TRL's plain prompt + completion + EOS): the chat / generate prompt is '[CLS] a b c', the ids
    before the completion, as the raw PPO prompt opens (docs/data-formats.md); HEAD sent '[CLS] a b c [SEP]'."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import tokenizer

    from deltatune.data.encode import sft_example
    from deltatune.train.chat import prompt_ids

    tok = tokenizer()
    [s] = read_samples([Row({"prompt": "a b c", "completion": " d e"}, "x:1")], {}, stage="sft")
    ids, labels = sft_example(s, tok, "raw")
    first = next(i for i, x in enumerate(labels) if x != -100)
    assert prompt_ids(tok, "a b c", template="raw") == ids[:first] == tok("a b c")["input_ids"][:-1]


def test_a_sharegpt_ranking_conversation_ending_with_a_gpt_turn_is_refused():
    """LLaMA-Factory's converter drops a ranking row whose conversation has an even count ('Invalid message count'):
    its responses would follow a gpt turn. deltatune reads it (the prompt ending with an assistant turn, continued as a
    prefill); with the diff it is refused naming the last turn."""
    row = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}],
           "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}  # fmt: skip
    assert not _lf_sharegpt_keeps(["human", "gpt"], ranking=True) and _lf_sharegpt_keeps(["human"], ranking=True)
    with pytest.raises(DataError, match=r"^t\.jsonl:2: conversations\[1\]\.from: the conversation ends with a 'gpt'"):
        read_samples([Row(row, "t.jsonl:2")], {}, stage="dpo")


def test_an_empty_sharegpt_system_turn_is_no_system_prompt_as_llamafactory_reads_it():
    """LLaMA-Factory reads a leading system tag's value as the row's system prompt, and "" as none (its templates
    then write their default system: ``system or default_system``; an empty one writes no system block). HEAD kept an
    empty system message, which Qwen2.5's template rendered as an empty system block instead of its default one. Now
    the row renders as the same row without the tag."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import tokenizer, trl_template

    from deltatune.data.encode import sft_example

    tok = tokenizer()
    tok.chat_template = trl_template("qwen2_5")
    turns = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    [with_tag] = read_samples(
        [Row({"conversations": [{"from": "system", "value": ""}, *turns]}, "t:1")], {}, stage="sft"
    )
    [without] = read_samples([Row({"conversations": turns}, "t:2")], {}, stage="sft")
    assert (
        with_tag.messages
        == without.messages
        == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    )
    ids, labels = sft_example(with_tag, tok, None)
    assert (ids, labels) == sft_example(without, tok, None)
    assert "you are qwen, created by alibaba cloud" in tok.decode(ids).replace(" ,", ",")  # (the template's default)
    with pytest.raises(DataError, match=r"^t:3: column 'conversations' holds an empty system turn alone"):
        read_samples([Row({"conversations": [{"from": "system", "value": ""}]}, "t:3")], {}, stage="sft")


def test_an_empty_sharegpt_system_turn_leaves_the_system_column_unread():
    """LLaMA-Factory takes the system prompt from a leading system tag, else the system column: a row with both reads
    the tag ("" here: none, the template's default). deltatune puts the column's in its place."""
    turns = [{"from": "system", "value": ""}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    [s] = read_samples([Row({"conversations": turns, "system": "col"}, "t:1")], {}, stage="sft")
    assert s.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


# -- review of probe 17: ranking rows LLaMA-Factory drops, a run read without a template prompted as it trained ------


def _ranking(conv, openai: bool = False) -> dict:
    a, b = ({"role": "assistant", "content": x} if openai else {"from": "gpt", "value": x} for x in ("a", "b"))
    return {"messages" if openai else "conversations": conv, "chosen": a, "rejected": b}


def test_a_ranking_conversation_of_one_object_ending_with_a_gpt_turn_is_refused_in_one_line():
    """A conversation given as one object (read as a one-turn list) crashed with KeyError(-1) on the refusal's
    ``items[-1]``; LLaMA-Factory's converter drops it (one turn: an even count after no system)."""
    assert not _lf_sharegpt_keeps(["gpt"], ranking=True)
    with pytest.raises(DataError, match=r"^t:4: conversations\[0\]\.from: the conversation ends with a 'gpt' turn"):
        read_samples([Row(_ranking({"from": "gpt", "value": "x"}), "t:4")], {}, stage="dpo")
    [s] = read_samples([Row(_ranking({"from": "human", "value": "q"}), "t:5")], {}, stage="dpo")
    assert (s.messages, s.chosen) == ([{"role": "user", "content": "q"}], [{"role": "assistant", "content": "a"}])


RANKING = {  # sharegpt turns (the OpenAI rows' roles: user, assistant, tool)
    "ends with gpt": (["human", "gpt"], False),
    "a system turn alone": (["system"], False),
    "openai: ends with assistant": (["user", "assistant"], True),
    "openai: a system message alone": (["system"], True),
    "plain": (["human"], False),
    "a tool round": (["human", "function_call", "observation"], False),
    "openai: plain": (["system", "user"], True),
}


def test_ranking_rows_llamafactory_drops_are_left_out_by_bad_pairs_skip_and_the_rest_read():
    """LLaMA-Factory's sharegpt and openai converters drop a ranking row whose conversation (less a leading system
    turn) has an even count, so the responses would follow an answer or nothing. HEAD refused a sharegpt one ending
    with a gpt turn as a plain DataError, which data.bad_pairs=skip could not leave out (a human-tag response, which
    LLaMA-Factory drops too, it skips), and read a system turn alone and an OpenAI row ending with an assistant
    message. Now each is a bad pair: refused in one line, or with skip left out; the rows it keeps read as before."""
    openai_tag = {"user": "human", "assistant": "gpt", "tool": "observation", "system": "system"}
    rows, keeps = [], []
    for i, (turns, openai) in enumerate(RANKING.values()):
        if openai:
            conv = [{"role": r, "content": f"t{k}"} for k, r in enumerate(turns)]
        else:
            conv = [{"from": r, "value": CALL if r == "function_call" else f"t{k}"} for k, r in enumerate(turns)]
        rows.append(Row({**_ranking(conv, openai), "tools": '[{"name": "f", "parameters": {}}]'}, f"t:{i}"))
        keeps.append(_lf_sharegpt_keeps([openai_tag.get(t, t) for t in turns], ranking=True))
    for row, keep in zip(rows, keeps):
        if not keep:
            with pytest.raises(DataError, match=r"^t:\d: \w+\[\d\]\.\w+: the conversation ends with an? '\w+' turn "):
                read_samples([row], {}, stage="dpo")
    skipped: list[str] = []
    got = read_samples(rows, {}, stage="dpo", skipped=skipped)
    assert skipped == [r.source for r, k in zip(rows, keeps) if not k] == ["t:0", "t:1", "t:2", "t:3"]
    assert [s.source for s in got] == ["t:4", "t:5", "t:6"]
    assert [s.messages[-1]["role"] for s in got] == ["user", "tool", "user"]


def test_a_turn_out_of_order_is_named_with_its_article():
    """'a 'observation' turn' read 'an 'observation' turn'."""
    row = Row({"conversations": [{"from": "human", "value": "q"}, {"from": "observation", "value": "r"},
                                 {"from": "gpt", "value": "a"}]}, "t:1")  # fmt: skip
    with pytest.raises(DataError, match=r"^t:1: conversations\[1\]\.from: an 'observation' turn after a 'human' turn"):
        read_samples([row], {}, stage="sft")


def _no_template_bert():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import tokenizer

    tok = tokenizer()
    tok.chat_template = None
    return tok


def test_a_run_read_without_a_template_is_prompted_as_its_ppo_prompt_opens():
    """A run read without a template (rm / dpo / ppo on plain-string rows, a tokenizer without a chat template:
    choose_template's raw; its recipe's data.template null) was prompted by generate and chat with BERT's closing
    [SEP] ('[CLS] a b c [SEP]'), where its rows and its PPO prompt open '[CLS] a b c'. --raw (and a seq2seq source,
    T5's closing </s>) keeps the tokenizer's own encoding; a tokenizer adding nothing (SmolLM2's) is unchanged."""
    from deltatune.data.encode import RAW, encode_lm
    from deltatune.data.encode import prompt_ids as ppo_prompt_ids
    from deltatune.data.sample import Sample
    from deltatune.train.chat import prompt_ids

    tok = _no_template_bert()
    ppo = ppo_prompt_ids(Sample("x:1", "prompt", [{"role": "user", "content": "a b c"}]), tok, RAW, 99)
    trained, _ = encode_lm(tok, "a b c", " d e", 99)  # (TRL's tokenizer(prompt + response + EOS))
    assert prompt_ids(tok, "a b c") == ppo == trained["input_ids"][:4] == tok("a b c")["input_ids"][:-1]
    assert prompt_ids(tok, "a b c", raw=True) == tok("a b c")["input_ids"]  # (--raw, seq2seq: [SEP] / </s> kept)
    smol = _word_tok(False)  # no specials of its own
    assert prompt_ids(smol, "a b c") == prompt_ids(smol, "a b c", raw=True) == smol("a b c")["input_ids"]


def test_a_run_read_without_a_template_shows_samples_and_chats_with_its_ppo_prompt(tmp_path, monkeypatch):
    """The report's output.samples and ``deltatune chat`` of such a run sent '[CLS] ... [SEP]'; now '[CLS] ...', the
    run's PPO prompt. A pt run's samples and chat --raw keep the tokenizer's encoding."""
    import io
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import tiny_model

    from deltatune.data.encode import RAW
    from deltatune.data.encode import prompt_ids as ppo_prompt_ids
    from deltatune.train import chat
    from deltatune.train.config import build

    tok, model = _no_template_bert(), tiny_model("llama")
    seen: list[list[int]] = []
    monkeypatch.setattr(chat, "generate", lambda m, t, ids, **kw: seen.append(list(ids)) or "x")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"chosen": "Say cat. cat", "rejected": "Say cat. dog"}) + "\n")
    cfg = build({"stage": "dpo", "model": {"name_or_path": "unused"}, "data": {"train": str(path)},
                 "output": {"samples": 1, "sample_tokens": 1}})  # fmt: skip
    chat.run_samples(model, tok, cfg)  # (a plain transformers model: its active_adapters is a method)
    [s] = read_samples([Row({"chosen": "Say cat. cat", "rejected": "Say cat. dog"}, "d:1")], {}, stage="dpo")
    want = ppo_prompt_ids(s, tok, RAW, 99)
    assert seen == [want, want] and want[-1] != tok.sep_token_id
    seen.clear()
    assert chat.repl(model, tok, stdin=io.StringIO("Say cat.\n"), stdout=io.StringIO(), max_new_tokens=1) == 0
    assert chat.repl(model, tok, raw=True, stdin=io.StringIO("Say cat.\n"), stdout=io.StringIO()) == 0
    assert seen == [want, tok("Say cat.")["input_ids"]]
