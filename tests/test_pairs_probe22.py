"""Probe 22 of the preference pairs' data path against TRL 1.16 (trl/trainer/dpo_trainer.py, trl/data_utils.py):
conversational rows (a system turn, several turns, an implicit prompt) through SmolLM2's chat template as TRL's
``_prepare_dataset`` and collator; each row's summed log-probs the same in a batch of rows of very different lengths
as alone. (Implicit string pairs are split at the last shared whitespace, not at TRL's first differing character:
docs/data-formats.md.)"""

import json
import types

import pytest
import torch
from tiny import VOCAB, smollm2_tokenizer, tiny_model

from deltatune.data.preference import PairCollator
from deltatune.data.templates import IGNORE_INDEX
from deltatune.train.config import build
from deltatune.train.logprobs import sequence_logprobs
from deltatune.train.pairs import encode_pair_splits


def _dpo_sides(tok, rows, max_length, tmp_path, template=None):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"train": str(path), "max_length": max_length, "truncation": "truncate"}
    cfg = build({"stage": "dpo", "model": {"name_or_path": "x"},
                 "data": {**data, **({"template": template} if template else {})}})  # fmt: skip
    return encode_pair_splits(cfg, tok, causal=True)[0].examples


def _trl_sides(tok, rows, max_length, tmp_path) -> list[dict[str, tuple[list[int], list[bool]]]]:
    """TRL's DPOTrainer: ``_prepare_dataset`` (extract_prompt, EOS, tokenize) then its collator's keep_start cut."""
    from datasets import Dataset
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path), max_length=max_length, report_to=[], use_cpu=True, bf16=False)
    ds = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tok), Dataset.from_list(rows), tok, args, "t")
    assert len(ds) == len(rows)
    return [{side: ((r["prompt_ids"] + r[f"{side}_ids"])[:max_length],
                    ([False] * len(r["prompt_ids"]) + [True] * len(r[f"{side}_ids"]))[:max_length])
             for side in ("chosen", "rejected")} for r in ds]  # fmt: skip


def _assert_trls(mine, ref):
    for i, (m, r) in enumerate(zip(mine, ref, strict=True)):
        for side in ("chosen", "rejected"):
            ids, trained = r[side]
            assert m[side]["input_ids"] == ids, (i, side)
            assert [lab != IGNORE_INDEX for lab in m[side]["labels"]] == trained, (i, side)


Q = [{"role": "user", "content": "What colour is a ripe lemon?"}]
CONV = [
    {"prompt": Q, "chosen": [{"role": "assistant", "content": "Yellow."}],
     "rejected": [{"role": "assistant", "content": "Purple, mostly."}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, *Q, {"role": "assistant", "content": "Hm?"},
                {"role": "user", "content": "Lemon colour?"}],
     "chosen": [{"role": "assistant", "content": "Yellow."}],
     "rejected": [{"role": "assistant", "content": "Yellow, sometimes green."}]},
]  # fmt: skip


@pytest.mark.parametrize("max_length", [10**4, 50])
@pytest.mark.parametrize("implicit", [False, True])
def test_conversational_rows_are_trls_through_the_chat_template(implicit, max_length, tmp_path):
    """Conversational rows (a system turn, several turns; explicit or implicit prompt) through SmolLM2's chat
    template: ids and trained tokens equal TRL's DPOTrainer's (the prompt with the generation prompt, split at the
    shorter common prefix of both sides, each side's first max_length tokens)."""
    tok = smollm2_tokenizer()
    rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in CONV]
    rows = rows if implicit else CONV
    _assert_trls(_dpo_sides(tok, rows, max_length, tmp_path), _trl_sides(tok, rows, max_length, tmp_path))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_rows_log_probs_are_the_same_in_a_batch_of_other_lengths(family):
    """Right padding changes no row's summed label log-probs: pairs of 3 to 50 tokens scored together equal each
    pair scored alone (fp32: to rounding; bf16 autocast: to bf16's rounding of other kernel shapes)."""
    g = torch.Generator().manual_seed(0)

    def side(n: int, prompt: int) -> dict[str, list[int]]:
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        return {"input_ids": ids, "attention_mask": [1] * n, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]}

    pairs = [{"chosen": side(40, 10), "rejected": side(5, 2)}, {"chosen": side(3, 1), "rejected": side(50, 30)}]
    model, collate = tiny_model(family).eval(), PairCollator(0)
    for dtype, tol in ((None, 1e-4), (torch.bfloat16, 5e-3)):
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            together = sequence_logprobs(model, collate(pairs))
            alone = [sequence_logprobs(model, collate([p])) for p in pairs]
        want = torch.stack([a[i] for i in (0, 1) for a in alone])
        assert torch.allclose(together, want, atol=tol, rtol=0), (dtype, (together - want).abs().max())
