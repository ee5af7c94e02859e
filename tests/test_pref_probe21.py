"""Probe 21 of the preference stages (deltatune/train/kto.py, dpo.py, pairs.py) against TRL 1.16: a KTO row whose
prompt alone fills data.max_length is cut from the row already encoded (each such row was rendered and tokenized a
second time, as DPO's pairs were until probe 19), the ids unchanged."""

import json

import pytest
from test_pairs_probe18 import ROWS, _bert_raw, _llama_like
from tiny import smollm2_tokenizer

import deltatune.train.kto as kto
from deltatune.train.config import build


def _cfg(rows, tmp_path, stage: str, max_length: int, **train):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return build({"stage": stage, "model": {"name_or_path": "x"}, "train": {"batch_size": 2, **train},
                  "data": {"train": str(path), "max_length": max_length, "truncation": "truncate"}})  # fmt: skip


@pytest.mark.parametrize("make", [_llama_like, _bert_raw, smollm2_tokenizer])
@pytest.mark.parametrize("max_length", [4, 6])
def test_kto_row_whose_prompt_fills_max_length_is_encoded_once(make, max_length, tmp_path, monkeypatch):
    """Each KTO row is encoded once (HEAD encoded each row whose prompt fills max_length a second time: 12 calls
    for the 6 rows at max_length 4), and every row's ids and labels are what encoding it at max_length gives (HEAD's
    second encoding) where its prompt fills max_length, its first max_length tokens elsewhere (TRL's keep_start)."""
    import warnings

    from deltatune.data.sample import unpaired_examples
    from deltatune.train.prepared import read_splits

    tok, cfg = make(), _cfg(ROWS, tmp_path, "kto", max_length)
    calls, real = [], kto.encode_prompt_response

    def counted(*args, **kwargs):
        calls.append(args[4])
        return real(*args, **kwargs)

    monkeypatch.setattr(kto, "encode_prompt_response", counted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = kto.prepare_kto(cfg, tok).train
    samples, _, template, _ = read_splits(cfg, tok, "kto")
    rows = [(s, t) for s in samples for t in unpaired_examples([s])]
    rows = [r for r in rows if r[1][2]] + [r for r in rows if not r[1][2]]  # (TRL's order: the chosen, then rejected)
    assert len(calls) == len(rows) == len(got)
    fell_back = 0
    for (s, (prompt, completion, _)), mine in zip(rows, got, strict=True):
        whole = real(prompt, completion, tok, template, 1 << 62, s.tools, s.template_kwargs)[0]
        first = next(i for i, v in enumerate(whole["labels"]) if v != -100)
        if first < max_length:
            want = {k: v[:max_length] for k, v in whole.items()}
        else:
            want = real(prompt, completion, tok, template, max_length, s.tools, s.template_kwargs)[0]
            fell_back += 1
        assert {k: mine[k] for k in want} == want
        assert mine["completion_ids"] == whole["input_ids"][first:]
    assert fell_back >= 1


@pytest.mark.parametrize("weights", [[float("nan")], [float("inf")], [1.0, float("nan")]])
def test_dpo_loss_weights_that_are_no_finite_number_are_one_line(weights, tmp_path):
    """align.loss_weights of NaN (or inf) gives a NaN loss from the first step (TRL's DPOConfig does not check): the
    recipe is refused, naming the key, as any other non-finite align number is (HEAD accepted it)."""
    from deltatune.config import ConfigError

    kinds = ["sigmoid", "sft"][: len(weights)]
    with pytest.raises(ConfigError, match=r"align\.loss_weights must be \d numbers, one per align\.loss_type"):
        build(
            {"stage": "dpo", "model": {"name_or_path": "x"}, "data": {"train": str(tmp_path / "p.jsonl")},
             "align": {"loss_type": kinds, "loss_weights": weights}})  # fmt: skip


@pytest.mark.parametrize("key", ["precompute_ref", "precompute_ref_log_probs"])
def test_kto_full_fine_tune_with_a_precomputed_reference_is_accepted(key, tmp_path):
    """A KTO run whose method trains the base in place (full) is sound with its reference precomputed, as DPO's is:
    KTOTrainer scores every row and its mismatched pair under the base before the first step, and TRL's KTOTrainer
    takes precompute_ref_log_probs with a full model; HEAD refused it ('stage kto scores the policy against the
    base'), naming precompute_ref only for dpo. Evaluated later (no training) it is refused as DPO's."""
    from tiny import save_tiny
    from transformers import AutoModelForCausalLM

    import deltatune as dt
    from deltatune.config import ConfigError
    from deltatune.train.checks import check_reference

    base = save_tiny(tmp_path / "llama")
    full = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), dt.FullConfig())
    raw = {"stage": "kto", "model": {"name_or_path": base}, "method": {"name": "full"}, "train": {"batch_size": 2},
           "data": {"train": str(tmp_path / "rows.jsonl")}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"or align.precompute_ref: true to score it once"):
        check_reference(build(raw), full, training=True)
    with pytest.raises(ConfigError, match="method.name=full: stage kto scores the policy against the base"):
        check_reference(build({**raw, "align": {key: True}}), full, training=False)
    check_reference(build({**raw, "align": {key: True}}), full, training=True)


def test_kto_full_fine_tune_precomputed_reference_stays_the_base(tmp_path):
    """The soundness of the checks.py diff: a full fine-tune's KTOTrainer with align.precompute_ref_log_probs scores
    its reference (rows and mismatched pairs) before any weight moves, so after the weights change its loss, every
    gradient and TRL's metrics equal TRL's KTOTrainer with the starting base as a separate reference model."""
    import warnings

    import torch
    import trl
    from datasets import Dataset
    from test_align_probe11 import ATOL, _grads
    from test_dpo_probe12 import _args, _kto_batch
    from test_pref_probe14 import KTO_ROWS
    from tiny import save_tiny
    from transformers import AutoModelForCausalLM

    import deltatune as dt
    from deltatune.train.models import load_tokenizer
    from deltatune.train.table import prepare

    base = save_tiny(tmp_path / "llama")
    rows = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}],
             "label": good} for p, c, good in KTO_ROWS]  # fmt: skip
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build({"stage": "kto", "model": {"name_or_path": base}, "method": {"name": "full"},
                 "train": {"report_to": ["none"], "batch_size": 4}, "data": {"train": str(path)},
                 "align": {"precompute_ref_log_probs": True}, "output": {"dir": str(tmp_path / "run")}})  # fmt: skip
    ours = prepare(cfg, load_tokenizer(base))
    model = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), dt.FullConfig())
    trainer = ours.trainer_class(model=model, args=_args(tmp_path / "dt"), data_collator=ours.collator,
                                 train_dataset=ours.train)  # fmt: skip
    torch.manual_seed(0)
    with torch.no_grad():  # (as training would move them)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    args = trl.KTOConfig(str(tmp_path / "trl"), per_device_train_batch_size=4, report_to=[], use_cpu=True, bf16=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = dt.trl_trainer(trl.KTOTrainer)(model=model, args=args, processing_class=load_tokenizer(base),
                                                train_dataset=Dataset.from_list(rows),
                                                ref_model=AutoModelForCausalLM.from_pretrained(base))  # fmt: skip
    batch = theirs.data_collator([theirs.train_dataset[i] for i in range(4)])
    model.train()
    expected = theirs.compute_loss(model, batch)
    expected.backward()
    want = _grads(model)
    mine = trainer.data_collator(trainer.train_dataset[:4])
    for key, value in _kto_batch(batch).items():
        assert torch.equal(mine[key], value), key
    got = trainer.compute_loss(model, mine)
    got.backward()
    assert abs(got.item() - expected.item()) < ATOL, (got.item(), expected.item())
    grads = _grads(model)  # (every base weight's: 21)
    assert grads.keys() == want.keys() and len(want) == 21
    assert max((want[k] - grads[k]).abs().max().item() for k in want) < 1e-5
    for key, value in {k: v[-1] for k, v in theirs._metrics["train"].items()}.items():
        if key != "num_tokens":
            assert trainer._stats[key][-1] == pytest.approx(value, abs=1e-5, rel=1e-5), key


@pytest.mark.parametrize("stage", ["orpo", "simpo", "cpo"])
def test_a_pair_side_cut_to_no_answer_token_names_its_row(stage, tmp_path):
    """orpo / simpo / cpo split each side at its own prompt (TRL's CPO and ORPO tokenize_row): "hel" + "lo world" merges
    into the token "hello", so the chosen answer starts a token before the rejected one, and at a max_length that
    ends there the rejected side keeps no answer token. Refused in one line naming the file and line (HEAD: 'a train
    pair has no response token within data.max_length=5', no row named); nothing is refused at one more token."""
    from deltatune.data.load import DataError
    from deltatune.train.table import prepare

    tok = smollm2_tokenizer()
    rows = [{"prompt": "hello", "chosen": " a b", "rejected": " c"},
            {"prompt": "The sky is hel", "chosen": "lo world", "rejected": " there now"}]  # fmt: skip
    n = len(tok("The sky is hel", add_special_tokens=False)["input_ids"])  # (4; the BOS before them makes 5)
    cfg = _cfg(rows, tmp_path, stage, n + 1)
    cfg.data.template = "raw"
    with pytest.raises(
        DataError, match=rf"rows.jsonl:2: the rejected answer has no token within data.max_length={n + 1}"
    ):
        prepare(cfg, tok)
    cfg.data.max_length = n + 2
    assert len(prepare(cfg, tok).train) == 2
