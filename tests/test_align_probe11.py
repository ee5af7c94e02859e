"""Probe 11 of the preference stages against TRL 1.16: SimPO as TRL's CPOTrainer with loss_type simpo (its cpo_alpha
NLL term, its label_smoothing, its metric names), the recipe keys under TRL's names (align.cpo_alpha,
align.loss_type simpo, align.precompute_ref_log_probs), and one-line refusals of what is not built.

TRL runs on the same tiny Llama, LoRA (not zero) and batch as deltatune: loss and the gradient of every LoRA weight
compared by max abs diff."""

import warnings

import pytest
import torch
from datasets import Dataset
from tiny import save_tiny, tokenizer
from transformers import AutoModelForCausalLM, TrainingArguments

import deltatune as dt
from deltatune.config import ConfigError
from deltatune.train import build
from deltatune.train.config import AlignArgs
from deltatune.train.dpo import DPOTrainer
from deltatune.train.simpo import SimPOTrainer, simpo_loss

with warnings.catch_warnings():  # TRL keeps CPO in trl.experimental, which warns on import
    warnings.simplefilter("ignore")
    from trl.experimental.cpo import CPOConfig, CPOTrainer

PAIRS = [
    {"prompt": "what is your name", "chosen": " my name is delta", "rejected": " i will not say"},
    {"prompt": "hello there friend", "chosen": " hi", "rejected": " go away now please you"},
]
ATOL = 2e-5  # fp32 sums in another order (TRL's full log-softmax against deltatune's chunked one)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def model(base) -> dt.DeltaModel:
    return _lora(base)


def _lora(base: str) -> dt.DeltaModel:
    torch.manual_seed(0)
    config = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), config)
    with torch.no_grad():  # a trained-looking adapter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _pad(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)


def _lm_batch(batch) -> dict[str, torch.Tensor]:
    """TRL CPO's separate chosen / rejected rows as deltatune's pair batch: chosen rows, then rejected, one width."""
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    out = {}
    for key, pad in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
        out[key] = torch.cat([_pad(batch[f"{s}_{key}"], width, pad) for s in ("chosen", "rejected")])
    return out


@pytest.mark.parametrize("cpo_alpha, eps, gamma, alpha", [(1.0, 0.0, 0.5, 0.0), (0.5, 0.2, 0.7, 0.0),
                                                          (0.0, 0.1, 0.3, 0.25)])  # fmt: skip
def test_simpo_equals_trl_cpo_simpo_loss_gradient_and_metrics(model, tmp_path, cpo_alpha, eps, gamma, alpha):
    args = CPOConfig(str(tmp_path), per_device_train_batch_size=2, report_to=[], use_cpu=True, bf16=False,
                     loss_type="simpo", beta=2.0, simpo_gamma=gamma, cpo_alpha=cpo_alpha, label_smoothing=eps,
                     alpha=alpha)  # fmt: skip
    trl = dt.trl_trainer(CPOTrainer)(model=model, args=args, train_dataset=Dataset.from_list(PAIRS),
                                     processing_class=tokenizer())  # fmt: skip
    batch = next(iter(trl.get_train_dataloader()))
    model.train()  # (the tiny llama and the LoRA have no dropout)
    model.zero_grad(set_to_none=True)
    expected, metrics = trl.get_batch_loss_metrics(model, batch)
    expected.backward()
    want = _grads(model)
    ours = SimPOTrainer(model=model, args=TrainingArguments(str(tmp_path / "dt"), report_to=[], use_cpu=True),
                        align=AlignArgs(beta=2.0, simpo_gamma=gamma, cpo_alpha=cpo_alpha, label_smoothing=eps,
                                        alpha=alpha))  # fmt: skip
    got = ours.compute_loss(model, _lm_batch(batch))
    got.backward()
    grads = _grads(model)
    assert abs(got.item() - expected.item()) < ATOL
    assert want.keys() == grads.keys() and len(want) == 8
    scale = max(v.abs().max().item() for v in want.values())
    # (AlphaPO's p^-alpha, p ~ e^-10 here, makes dloss/dlogp ~ 30: the log-probs' fp32 rounding grows as much; the
    # formula agrees with TRL's cpo_loss to 4e-15 on float64 tensors; by hand: test_alphapo_by_hand)
    assert max((want[k] - grads[k]).abs().max().item() for k in want) < (5e-5 if alpha else 1e-5) * max(1.0, scale)
    assert scale > 1e-2  # (a gradient that is there)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):  # fmt: skip
        # (AlphaPO's rewards carry the same p^-alpha growth of the log-probs' rounding: 2.7e-5 on this AMD EPYC)
        assert ours._stats[key][0] == pytest.approx(metrics[key], abs=5e-5 if alpha else ATOL), key
    # nll_loss: TRL logs 0 where cpo_alpha is 0 (it skips the term); deltatune the chosen responses' NLL all the same
    if cpo_alpha:
        assert ours._stats["nll_loss"][0] == pytest.approx(metrics["nll_loss"], abs=ATOL)
    assert ours._stats["nll_loss"][0] > 1 and {"logits/chosen", "logits/rejected"} <= ours._stats.keys()


def test_simpo_label_smoothing_by_hand():
    """beta = 2, gamma = 0.5, eps = 0.25 on one pair of mean log-probs -1 and -2: x = 2 * 1 - 0.5 = 1.5;
    -0.75 log sigmoid(1.5) - 0.25 log sigmoid(-1.5) = 0.75 * 0.201413 + 0.25 * 1.701413 = 0.576413."""
    losses, _, _ = simpo_loss(torch.tensor([-2.0]), torch.tensor([-6.0]), torch.tensor([2]), torch.tensor([3]),
                              beta=2.0, gamma=0.5, label_smoothing=0.25)  # fmt: skip
    assert losses.item() == pytest.approx(0.576413, abs=1e-6)


def test_alphapo_by_hand():
    """alpha = 0.5, beta = 2, gamma = 0.5, mean log-probs a = -1 and -2: the reward (1 - p^-alpha) / alpha of
    p = e^a is (1 - e^(-alpha a)) / alpha, times beta: chosen 4 (1 - e^0.5) = -2.594885, rejected
    4 (1 - e^1) = -6.873127; x = 4.278242 - 0.5 = 3.778242, -log sigmoid(x) = 0.022605."""
    losses, chosen, rejected = simpo_loss(torch.tensor([-2.0]), torch.tensor([-6.0]), torch.tensor([2]),
                                          torch.tensor([3]), beta=2.0, gamma=0.5, alpha=0.5)  # fmt: skip
    assert chosen.item() == pytest.approx(-2.594885, abs=1e-6) and rejected.item() == pytest.approx(
        -6.873127, abs=1e-6
    )
    assert losses.item() == pytest.approx(0.022605, abs=1e-6)


RAW = {"model": {"name_or_path": "x"}, "data": {"train": "t.jsonl"}}


def test_recipes_take_trls_simpo_keys():
    a = build({**RAW, "stage": "simpo", "align": {"loss_type": "simpo", "cpo_alpha": 1.0, "label_smoothing": 0.1,
                                                  "simpo_gamma": 0.3}}).align  # fmt: skip
    assert (a.loss_type, a.cpo_alpha, a.label_smoothing, a.simpo_gamma) == ("simpo", 1.0, 0.1, 0.3)
    assert build({**RAW, "stage": "simpo", "align": {"alpha": 0.3}}).align.alpha == 0.3
    assert build({**RAW, "stage": "simpo"}).align.cpo_alpha == 0.0  # (the SimPO paper's loss; TRL's CPO default: 1)


@pytest.mark.parametrize("stage, align, message", [
    ("simpo", {"loss_type": "hinge"}, "align.loss_type for stage simpo must be simpo"),
    ("simpo", {"loss_type": "ipo"}, "TRL's CPO losses sigmoid, hinge and ipo are not built, got 'ipo'"),
    ("simpo", {"cpo_alpha": -1}, "align.cpo_alpha must be >= 0, got -1"),
    ("simpo", {"label_smoothing": 0.5}, "align.label_smoothing must be in [0, 0.5)"),
    ("dpo", {"loss_type": "simpo"}, "align.loss_type must be one of sigmoid"),
    ("dpo", {"alpha": 0.2}, "align.alpha (AlphaPO, TRL's CPO alpha) is for stages simpo and cpo only, got 0.2 on dpo"),
    ("dpo", {"rpo_alpha": 0.5}, "unknown key 'align.rpo_alpha'"),  # (TRL 1.16 has no rpo_alpha: loss_type sft)
    ("dpo", {"reference_free": True}, "unknown key 'align.reference_free'"),  # (nor reference_free)
])  # fmt: skip
def test_refusals_name_the_key_in_one_line(stage, align, message):
    with pytest.raises(ConfigError) as info:
        build({**RAW, "stage": stage, "align": align})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_precompute_ref_log_probs_is_trls_name_for_precompute_ref(model, tmp_path):
    tok = tokenizer()
    rows = []
    for p in PAIRS:
        ids = {s: tok(p["prompt"] + p[s])["input_ids"] for s in ("chosen", "rejected")}
        n = len(tok(p["prompt"])["input_ids"])
        rows.append({s: {"input_ids": v, "attention_mask": [1] * len(v), "labels": [-100] * n + v[n:]}
                     for s, v in ids.items()})  # fmt: skip
    from deltatune.data.preference import PairCollator

    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True, per_device_eval_batch_size=2)
    refs, sizes, collate = [], [], PairCollator(tok.pad_token_id)

    def counted(examples):  # (the pairs of each reference forward)
        sizes.append(len(examples))
        return collate(examples)

    aligns = AlignArgs(precompute_ref=True), AlignArgs(precompute_ref_log_probs=True)
    for align in (*aligns, AlignArgs(precompute_ref_log_probs=True, precompute_ref_batch_size=1)):
        t = DPOTrainer(model=model, args=args, train_dataset=rows, data_collator=counted, align=align)
        refs.append([(ex["ref_chosen_logp"], ex["ref_rejected_logp"]) for ex in t.train_dataset])
    assert refs[0] == refs[1] and all(c < 0 and r < 0 for c, r in refs[0])
    assert sizes == [2, 2, 1, 1]
    # one pair per forward (TRL's precompute_ref_batch_size): no padding, the same sums to fp32 rounding
    assert torch.tensor(refs[2]).sub(torch.tensor(refs[0])).abs().max() < 1e-5
    assert build({**RAW, "stage": "dpo", "align": {"precompute_ref_batch_size": 16}}).align.precompute_ref_batch_size
    with pytest.raises(ConfigError, match=r"align.precompute_ref_batch_size must be >= 1 \(or null\), got 0"):
        build({**RAW, "stage": "dpo", "align": {"precompute_ref_batch_size": 0}})


@pytest.fixture(scope="module")
def trl_dpo(base, model, tmp_path_factory):
    """TRL's DPOTrainer on the LoRA model, the base as its reference, and its batch of PAIRS; each case sets the
    loss attributes its config would."""
    import trl

    args = trl.DPOConfig(str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=2, report_to=[],
                         use_cpu=True, bf16=False)  # fmt: skip
    trainer = dt.trl_trainer(trl.DPOTrainer)(model=model, args=args, train_dataset=Dataset.from_list(PAIRS),
                                             ref_model=AutoModelForCausalLM.from_pretrained(base),
                                             processing_class=tokenizer())  # fmt: skip
    return trainer, next(iter(trainer.get_train_dataloader()))


DPO_CASES = [  # (loss_type, extra align keys)
    *[(k, {}) for k in ("sigmoid", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
                        "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")],
    ("robust", {"label_smoothing": 0.2}), ("exo_pair", {"label_smoothing": 0.1}), ("aot", {"label_smoothing": 0.1}),
    (["sigmoid", "bco_pair", "sft"], {"loss_weights": [0.8, 0.2, 1.0]}),
    ("sigmoid", {"ld_alpha": 0.5}), ("ipo", {"ld_alpha": 0.3}),
    ("sigmoid", {"f_divergence_type": "js_divergence"}), ("hinge", {"f_divergence_type": "forward_kl"}),
    ("discopop", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
    (["robust", "sft"], {"label_smoothing": 0.1}),
]  # fmt: skip
# (use_weighting needs TRL's trainer built with it: tests/train/test_pref_probe9.py compares it)


@pytest.mark.parametrize("loss_type, extra", DPO_CASES)
def test_every_dpo_loss_type_equals_trl_on_a_real_batch_with_gradients(trl_dpo, model, tmp_path, loss_type, extra):
    trainer, batch = trl_dpo
    kinds = [loss_type] if isinstance(loss_type, str) else loss_type
    align = AlignArgs(beta=0.3, loss_type=loss_type, **extra)
    trainer.beta, trainer.loss_types, trainer.label_smoothing = 0.3, kinds, align.label_smoothing
    trainer.loss_weights = align.loss_weights or [1.0] * len(kinds)
    trainer.ld_alpha = align.ld_alpha
    trainer.f_divergence_type, trainer.f_alpha_divergence_coef = align.f_divergence_type, align.f_alpha_divergence_coef
    model.train()
    model.zero_grad(set_to_none=True)
    expected = trainer.compute_loss(model, batch)
    expected.backward()
    want = _grads(model)
    labels = torch.where(batch["completion_mask"].bool(), batch["input_ids"], -100)
    lm = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
    ours = DPOTrainer(model=model, args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True), align=align)
    got = ours.compute_loss(model, lm)
    got.backward()
    grads = _grads(model)
    assert abs(got.item() - expected.item()) < ATOL * max(1.0, abs(expected.item())), (got.item(), expected.item())
    assert want.keys() == grads.keys() and len(want) == 8
    scale = max(1.0, max(v.abs().max().item() for v in want.values()))
    assert max((want[k] - grads[k]).abs().max().item() for k in want) < 1e-5 * scale
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"):  # fmt: skip
        assert ours._stats[key][0] == pytest.approx(metrics[key], abs=1e-4), key


def test_orpo_logs_logits_per_side_as_trl_names_them(model, tmp_path):
    """ORPO's logits/chosen and logits/rejected: the mean logit over the vocabulary, over each side's response tokens
    (as DPO's), by hand from the model's logits; with the rest of TRL's ORPO names (nll_loss aside: see orpo.py)."""
    from deltatune.train.orpo import ORPOTrainer

    tok = tokenizer()
    pairs = [(tok(p["prompt"] + p[s])["input_ids"], len(tok(p["prompt"])["input_ids"])) for s in ("chosen", "rejected")
             for p in PAIRS]  # fmt: skip
    width = max(len(ids) for ids, _ in pairs)
    ids = torch.tensor([v + [0] * (width - len(v)) for v, _ in pairs])
    mask = torch.tensor([[1] * len(v) + [0] * (width - len(v)) for v, _ in pairs])
    labels = torch.tensor([[-100] * n + v[n:] + [-100] * (width - len(v)) for v, n in pairs])
    ours = ORPOTrainer(model=model, args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True),
                       align=AlignArgs(beta=0.3))  # fmt: skip
    model.train()
    with torch.no_grad():
        ours.compute_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].mean(-1)
    on = labels[:, 1:] != -100
    for side, rows in (("chosen", slice(0, 2)), ("rejected", slice(2, None))):
        want = logits[rows][on[rows]].mean().item()
        assert ours._stats[f"logits/{side}"][0] == pytest.approx(want, abs=1e-5)
    trl_names = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected", "logits/chosen", "logits/rejected", "log_odds_ratio", "log_odds_chosen"}  # fmt: skip
    assert trl_names <= ours._stats.keys()


ROWS = [
    {"prompt": "what is your name", "completion": " my name is delta", "label": True},
    {"prompt": "hello there friend", "completion": " go away now please you", "label": False},
    {"prompt": "how are you", "completion": " fine thanks", "label": True},
    {"prompt": "tell me", "completion": " no", "label": False},
]


@pytest.mark.parametrize("loss_type, wd, wu", [("kto", 1.2, 0.8), ("kto", 1.0, 1.0), ("apo_zero_unpaired", 0.7, 1.5)])
def test_kto_equals_trl_on_a_real_batch_with_gradients(base, model, tmp_path, loss_type, wd, wu):
    import trl

    from deltatune.train.kto import KTOTrainer

    args = trl.KTOConfig(str(tmp_path), per_device_train_batch_size=4, report_to=[], use_cpu=True, bf16=False,
                         beta=0.3, desirable_weight=wd, undesirable_weight=wu, loss_type=loss_type)  # fmt: skip
    trainer = dt.trl_trainer(trl.KTOTrainer)(model=model, args=args, train_dataset=Dataset.from_list(ROWS),
                                             ref_model=AutoModelForCausalLM.from_pretrained(base),
                                             processing_class=tokenizer())  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    model.zero_grad(set_to_none=True)
    expected = trainer.compute_loss(model, batch)
    expected.backward()
    want = _grads(model)
    kl = loss_type == "kto"
    seqs = [(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])]
    if kl:
        seqs.append((batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"]))
    width = max(ids.shape[1] for ids, _, _ in seqs)
    lm = {"input_ids": torch.cat([_pad(ids, width, 0) for ids, _, _ in seqs]),
          "attention_mask": torch.cat([_pad(m, width, 0) for _, m, _ in seqs]),
          "labels": torch.cat([_pad(torch.where(c.bool(), ids, -100), width, -100) for ids, _, c in seqs]),
          "desirable": batch["label"].bool()}  # fmt: skip
    align = AlignArgs(beta=0.3, desirable_weight=wd, undesirable_weight=wu, loss_type=loss_type)
    ours = KTOTrainer(model=model, args=TrainingArguments(str(tmp_path / "dt"), report_to=[], use_cpu=True),
                      align=align)  # fmt: skip
    got = ours.compute_loss(model, lm)
    got.backward()
    grads = _grads(model)
    assert abs(got.item() - expected.item()) < ATOL
    assert want.keys() == grads.keys() and len(want) == 8
    assert max((want[k] - grads[k]).abs().max().item() for k in want) < 1e-5
    assert max(v.abs().max().item() for v in want.values()) > 1e-3
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                "logits/chosen", "logits/rejected", "entropy"):  # fmt: skip
        assert ours._stats[key][0] == pytest.approx(metrics[key], abs=1e-4), key


def test_dpo_eval_metrics_carry_trls_eval_names(base, tmp_path):
    """TRL's DPOTrainer.evaluate reports eval_rewards/chosen, /rejected, /margins, /accuracies: deltatune's eval (of
    dpo, orpo and simpo: one compute_metrics) reports them too, with the same values on the same pairs."""
    import trl
    from transformers import EvalPrediction

    from deltatune.train.dpo import _metrics

    model = _lora(base)  # (its own: TRL's trainers patch the model they are given)
    args = trl.DPOConfig(str(tmp_path / "trl"), per_device_eval_batch_size=2, report_to=[], use_cpu=True, bf16=False,
                         beta=0.3)  # fmt: skip
    trainer = dt.trl_trainer(trl.DPOTrainer)(model=model, args=args, train_dataset=Dataset.from_list(PAIRS),
                                             ref_model=AutoModelForCausalLM.from_pretrained(base),
                                             processing_class=tokenizer())  # fmt: skip
    batch = next(iter(trainer.get_eval_dataloader(trainer.train_dataset)))
    model.eval()
    theirs = trainer.evaluate(eval_dataset=trainer.train_dataset)
    labels = torch.where(batch["completion_mask"].bool(), batch["input_ids"], -100)
    lm = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
    ours = DPOTrainer(model=model, args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True),
                      align=AlignArgs(beta=0.3))  # fmt: skip
    with torch.no_grad():
        _, scores = ours.compute_loss(model, lm, return_outputs=True)
    got = {f"eval_{k}": v for k, v in _metrics(EvalPrediction(scores.numpy(), None)).items()}
    names = [f"eval_rewards/{k}" for k in ("chosen", "rejected", "margins", "accuracies")]
    assert theirs["eval_rewards/margins"] != 0
    assert {k: got[k] for k in names} == pytest.approx({k: theirs[k] for k in names}, abs=2e-5)


def test_kto_eval_metrics_carry_trls_eval_names():
    """[reward, desirable] predictions of rows 0.5, 1.5 (desirable) and -1.0 (undesirable): chosen 1.0, rejected -1.0,
    margin 2.0, under deltatune's names and TRL's."""
    from transformers import EvalPrediction

    from deltatune.train.kto import _metrics

    got = _metrics(EvalPrediction(torch.tensor([[0.5, 1.0], [1.5, 1.0], [-1.0, 0.0]]).numpy(), None))
    assert got == {"reward_desirable": 1.0, "reward_undesirable": -1.0, "margin": 2.0, "rewards/chosen": 1.0,
                   "rewards/rejected": -1.0, "rewards/margins": 2.0}  # fmt: skip


@pytest.mark.parametrize("key", ["precompute_ref", "precompute_ref_log_probs"])
def test_check_reference_takes_either_precompute_name(base, key):
    """A DPO run whose method trains the base in place (full) is sound with its reference precomputed: TRL's name,
    align.precompute_ref_log_probs, is accepted as deltatune's is (HEAD refused it); neither: one line."""
    from deltatune.train.checks import check_reference

    full = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), dt.FullConfig())
    raw = {**RAW, "stage": "dpo", "method": {"name": "full"}}
    check_reference(build({**raw, "align": {key: True}}), full, training=True)
    with pytest.raises(ConfigError, match="method.name=full: stage dpo scores the policy against the base"):
        check_reference(build({**raw, "align": {key: True}}), full, training=False)
    with pytest.raises(ConfigError, match=r"or align.precompute_ref: true to score it once"):
        check_reference(build(raw), full, training=True)
