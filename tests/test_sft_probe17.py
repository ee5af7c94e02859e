"""SFT probe 17: LLaMA-Factory's sharegpt turn order (its SharegptDatasetConverter's accept tags) and the other SFT /
pre-training data paths against LLaMA-Factory and TRL."""

from __future__ import annotations

import pytest

from deltatune.data.formats import read_samples
from deltatune.data.load import DataError, Row


def _lf_sharegpt_keeps(turns: list[str]) -> bool:
    """LLaMA-Factory's SharegptDatasetConverter, its role checks transcribed: a system tag only as the first turn,
    then human/observation at even and gpt/function_call at odd positions, an even count (a non-ranking row)."""
    if turns and turns[0] == "system":
        turns = turns[1:]
    accept = (("human", "observation"), ("gpt", "function_call"))
    return all(t in accept[i % 2] for i, t in enumerate(turns)) and len(turns) % 2 == 0


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
