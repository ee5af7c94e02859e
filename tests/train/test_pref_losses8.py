"""Two TRL 1.16 options deltatune refused: KTO's ``loss_type: apo_zero_unpaired`` and DPO's ``ld_alpha`` (LD-DPO),
each against TRL's own loss code on the same per-token log-probs (a stand-in for TRL's fused-LM-head model, as in
test_dpo_losses7.py): the loss and its gradient with respect to every per-token log-prob to 1e-6; then each through
deltatune's trainer and TRL's on a real batch of a tiny model with a LoRA that is not zero."""

from types import SimpleNamespace

import pytest
import torch
import trl
from datasets import Dataset
from tiny import save_tiny, tokenizer
from transformers import AutoModelForCausalLM, TrainingArguments

import deltatune as dt
from deltatune.config import ConfigError
from deltatune.data.preference import PairCollator
from deltatune.train import build
from deltatune.train.config import AlignArgs
from deltatune.train.dpo import DPOTrainer, dpo_loss
from deltatune.train.kto import KTOCollator, KTOTrainer, kto_loss
from deltatune.train.logprobs import reference_logprobs, summed

PAIRS = [
    {"prompt": "what is your name", "chosen": " my name is delta", "rejected": " i will not say"},
    {"prompt": "hello there friend", "chosen": " hi", "rejected": " go away now please you"},
]
ROWS = [
    {"prompt": "what is your name", "completion": " my name is delta", "label": True},
    {"prompt": "hello there friend", "completion": " go away now please you", "label": False},
    {"prompt": "how are you", "completion": " fine thanks", "label": True},
    {"prompt": "tell me", "completion": " no", "label": False},
]
B, T, BETA = 6, 10, 0.3


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def model(base) -> dt.DeltaModel:
    torch.manual_seed(0)
    config = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), config)
    with torch.no_grad():  # the policy is no longer the reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.eval()


class Given:
    """A stand-in for TRL's fused-LM-head model: the given per-token log-probs, zero metrics."""

    def __init__(self, per_token: torch.Tensor) -> None:
        self.per_token = per_token

    def __call__(self, **_) -> SimpleNamespace:
        z = torch.zeros_like(self.per_token)
        return SimpleNamespace(log_probs=self.per_token, entropy=z, mean_logits=z, is_top1=z.bool())


def token_batch(seed: int, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(completion mask (rows, T), per-token log-probs (rows, T-1) as an fp64 leaf, reference sums (rows,)):
    prompts of 1-3 tokens, completions of 1 to the rest."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, 4, (rows,), generator=g)
    length = torch.stack([torch.randint(1, T - int(p) + 1, (1,), generator=g)[0] for p in prompt])
    pos = torch.arange(T)
    mask = ((pos >= prompt[:, None]) & (pos < (prompt + length)[:, None])).long()
    per_token = (-3 * torch.rand(rows, T - 1, generator=g, dtype=torch.float64)) * mask[:, 1:]
    ref = per_token.sum(1) + 4 * torch.randn(rows, generator=g, dtype=torch.float64)
    return mask, per_token.requires_grad_(), ref


@pytest.fixture(scope="module")
def trl_kto(base, tmp_path_factory):
    args = trl.KTOConfig(str(tmp_path_factory.mktemp("trl")), report_to=[], use_cpu=True, bf16=False,
                         per_device_train_batch_size=2, loss_type="apo_zero_unpaired")  # fmt: skip
    trainer = trl.KTOTrainer(model=AutoModelForCausalLM.from_pretrained(base), args=args,
                             train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer())  # fmt: skip
    trainer.precompute_ref_logps = True
    return trainer


@pytest.mark.parametrize("seed, weights", [(1, (1.0, 1.0)), (2, (1.3, 0.7)), (3, (0.0, 2.0))])
def test_apo_zero_unpaired_loss_and_gradient_equal_trl(trl_kto, seed, weights):
    mask, per_token, ref = token_batch(seed, B)
    label = torch.tensor([True, False, True, True, False, False])
    trl_kto.beta, (trl_kto.desirable_weight, trl_kto.undesirable_weight) = BETA, weights
    inputs = {"input_ids": torch.zeros(B, T, dtype=torch.long), "attention_mask": torch.ones(B, T).long(),
              "completion_mask": mask, "label": label, "ref_logps": ref}  # fmt: skip
    expected = trl_kto._compute_loss(Given(per_token), inputs, False)
    (want,) = torch.autograd.grad(expected, per_token)
    losses, rewards = kto_loss(per_token.sum(1), ref, label, 5.0, BETA, *weights, "apo_zero_unpaired")  # (kl unused)
    (got,) = torch.autograd.grad(losses.mean(), per_token)
    assert losses.mean().item() == pytest.approx(expected.item(), abs=1e-6) and want.abs().max() > 1e-3
    assert torch.allclose(got, want, atol=1e-6)
    mode = "train" if trl_kto.model.training else "eval"
    assert trl_kto._metrics[mode]["kl"][-1] == 0.0  # (TRL logs no reference point for it)


def test_recipes_take_apo_zero_unpaired_for_kto_only():
    raw = {"stage": "kto", "model": {"name_or_path": "x"}, "data": {"train": "t.jsonl"}}
    assert build({**raw, "align": {"loss_type": "apo_zero_unpaired"}}).align.loss_type == "apo_zero_unpaired"
    assert build({**raw, "align": {"loss_type": "kto"}}).align.loss_type == "kto"
    for stage, loss, message in [("kto", "bco_pair", "align.loss_type for stage kto must be kto or apo_zero_unpaired"),
                                 ("kto", ["sigmoid", "sft"], "for stage kto must be"),
                                 ("dpo", "apo_zero_unpaired", "align.loss_type must be one of sigmoid, ipo")]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            build({**raw, "stage": stage, "align": {"loss_type": loss}})
    from deltatune.train.config import ignored_keys

    assert ignored_keys(build({**raw, "align": {"loss_type": "apo_zero_unpaired"}})) == []


def test_apo_zero_unpaired_trainer_equals_trl(base, model, tmp_path):
    """TRL's KTOTrainer with apo_zero_unpaired (no KL pass) and deltatune's on TRL's batch: loss and logged metrics."""
    args = trl.KTOConfig(str(tmp_path), per_device_train_batch_size=len(ROWS), report_to=[], use_cpu=True,
                         bf16=False, loss_type="apo_zero_unpaired", beta=BETA, desirable_weight=1.2)  # fmt: skip
    trainer = dt.trl_trainer(trl.KTOTrainer)(model=model, args=args, train_dataset=Dataset.from_list(ROWS),
                                             ref_model=AutoModelForCausalLM.from_pretrained(base),
                                             processing_class=tokenizer())  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    assert "KL_input_ids" not in batch
    with torch.no_grad():
        expected = trainer.compute_loss(model, batch).item()
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items() if "/" in k or k == "kl"}
    rows = []
    for i, label in enumerate(batch["label"].tolist()):
        real = batch["attention_mask"][i].bool()
        ids, completion = batch["input_ids"][i][real].tolist(), batch["completion_mask"][i][real].tolist()
        n = completion.index(1)
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * n + ids[n:],
                     "n_prompt": n, "desirable": bool(label)})  # fmt: skip
    collated = KTOCollator(tokenizer().pad_token_id, 64, kl=False)(rows)
    assert collated["input_ids"].shape[0] == len(ROWS)  # no mismatched pairs
    ours = KTOTrainer(model=model, args=TrainingArguments(str(tmp_path / "dt"), report_to=[], use_cpu=True),
                      align=AlignArgs(beta=BETA, loss_type="apo_zero_unpaired", desirable_weight=1.2))  # fmt: skip
    model.train()  # (logged while training; the tiny llama and the LoRA have no dropout)
    with torch.no_grad():
        got = ours.compute_loss(model, collated).item()
    model.eval()
    assert got == pytest.approx(expected, abs=2e-5) and abs(expected - 0.5 * 1.1) > 1e-3  # (not the start's value)
    assert len(logged) == 8 and {k: ours._stats[k][0] for k in logged} == pytest.approx(logged, abs=2e-5)


@pytest.fixture(scope="module")
def trl_dpo(base, tmp_path_factory):
    """A TRL DPOTrainer whose settings each test sets; ``Given`` stands in for its model and reference model."""
    args = trl.DPOConfig(str(tmp_path_factory.mktemp("trl_dpo")), report_to=[], use_cpu=True, bf16=False,
                         per_device_train_batch_size=2)  # fmt: skip
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(base), args=args,
                             train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer())  # fmt: skip
    trainer.precompute_ref_logps = False
    return trainer


LD_CASES = [("sigmoid", 0.5), ("sigmoid", 0.0), ("sigmoid", 1.0), ("ipo", 0.3), ("sigmoid_norm", 0.7), ("aot", 0.5),
            (["sigmoid", "sft"], 0.5), (["robust", "bco_pair", "sft"], 0.2)]  # fmt: skip


@pytest.mark.parametrize("loss_type, alpha", LD_CASES)
def test_ld_dpo_loss_and_gradient_equal_trl(trl_dpo, loss_type, alpha):
    """LD-DPO's weighted sums of the policy's and the reference's per-token log-probs (the reference's also as TRL
    precomputes them), through dpo_loss, against TRL's _compute_loss: loss and gradient to 1e-6."""
    seed = 100 + LD_CASES.index((loss_type, alpha))
    mask, per_token, _ = token_batch(seed, 2 * B)
    _, ref_token, _ = token_batch(seed, 2 * B)  # (the same lengths, other log-probs)
    ref_token = (ref_token.detach() + 0.5 * torch.randn(ref_token.shape, dtype=torch.float64)) * mask[:, 1:]
    kinds = [loss_type] if isinstance(loss_type, str) else loss_type
    trl_dpo.beta, trl_dpo.loss_types, trl_dpo.loss_weights, trl_dpo.ld_alpha = BETA, kinds, [1.0] * len(kinds), alpha
    trl_dpo.label_smoothing, trl_dpo.ref_model = 0.2 * ("robust" in kinds), Given(ref_token)
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T).long(),
              "completion_mask": mask}  # fmt: skip
    expected = trl_dpo._compute_loss(Given(per_token), inputs, False)
    (want,) = torch.autograd.grad(expected, per_token)
    labels = torch.where(mask.bool(), 1, -100)
    policy, ref, counts = summed(per_token, labels, alpha), summed(ref_token, labels, alpha), mask[:, 1:].sum(1)
    assert torch.allclose(torch.cat(trl_dpo.compute_ref_log_probs(Given(ref_token), inputs)), ref, atol=1e-12)
    losses, _, _ = dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], BETA, loss_type, 0.2 * ("robust" in kinds),
                            counts[:B], counts[B:], sft_chosen=per_token[:B].sum(1))  # fmt: skip
    (got,) = torch.autograd.grad(losses.mean(), per_token)
    assert losses.mean().item() == pytest.approx(expected.item(), abs=1e-6) and want.abs().max() > 1e-3
    on = mask[:, 1:].bool()  # (elsewhere the stand-in's zeros are no token's log-prob)
    assert torch.allclose(got[on], want[on], atol=1e-6)
    assert (counts[:B] != counts[B:]).any()  # pairs with a tail that the weight sees
    if alpha < 1:  # (the weighting counts)
        assert not torch.allclose(policy, per_token.sum(1))


def test_ld_alpha_in_recipes():
    raw = {"stage": "dpo", "model": {"name_or_path": "x"}, "data": {"train": "t.jsonl"}}
    assert build({**raw, "align": {"ld_alpha": 0.5}}).align.ld_alpha == 0.5
    assert build(raw).align.ld_alpha is None
    with pytest.raises(ConfigError, match=r"align.ld_alpha must be in \[0, 1\] \(or null: off\), got 1.5"):
        build({**raw, "align": {"ld_alpha": 1.5}})
    from deltatune.train.config import ignored_keys

    assert ignored_keys(build({**raw, "stage": "kto", "align": {"ld_alpha": 0.5}})) == [("align.ld_alpha", "dpo")]


@pytest.mark.parametrize("precompute", [False, True])
def test_ld_dpo_trainer_equals_trl(base, model, tmp_path, precompute):
    """TRL's DPOTrainer with ld_alpha and deltatune's on a real batch (sigmoid + sft), the reference computed each
    step or precomputed before training by each trainer."""
    kinds, alpha = ["sigmoid", "sft"], 0.4
    args = trl.DPOConfig(str(tmp_path), per_device_train_batch_size=2, report_to=[], use_cpu=True, bf16=False,
                         loss_type=kinds, beta=BETA, ld_alpha=alpha, precompute_ref_log_probs=precompute)  # fmt: skip
    trainer = dt.trl_trainer(trl.DPOTrainer)(model=model, args=args, train_dataset=Dataset.from_list(PAIRS),
                                             ref_model=AutoModelForCausalLM.from_pretrained(base),
                                             processing_class=tokenizer())  # fmt: skip
    inputs = next(iter(trainer.get_train_dataloader()))
    model.eval()
    with torch.no_grad():
        expected = trainer.compute_loss(model, inputs).item()
    labels = torch.where(inputs["completion_mask"].bool(), inputs["input_ids"], -100)
    seqs = []
    for i in range(4):
        real = inputs["attention_mask"][i].bool()
        seqs.append({"input_ids": inputs["input_ids"][i][real].tolist(), "labels": labels[i][real].tolist()})
        seqs[-1]["attention_mask"] = [1] * len(seqs[-1]["input_ids"])
    pairs = [{"chosen": seqs[i], "rejected": seqs[2 + i]} for i in range(2)]
    collate = PairCollator(tokenizer().pad_token_id)
    ours = DPOTrainer(model=model, args=TrainingArguments(str(tmp_path / "dt"), report_to=[], use_cpu=True),
                      align=AlignArgs(beta=BETA, loss_type=kinds, ld_alpha=alpha, precompute_ref=precompute),
                      train_dataset=pairs, data_collator=collate)  # fmt: skip
    with torch.no_grad():
        got = ours.compute_loss(model, collate(ours.train_dataset)).item()
        plain = ours.compute_loss(model, collate(pairs), return_outputs=True)  # (no ref columns: computed here)
    assert got == pytest.approx(expected, abs=2e-5) and plain[0].item() == pytest.approx(expected, abs=2e-5)
    lm = collate(pairs)
    with torch.no_grad():
        ld, sums = reference_logprobs(model, model, lm, alpha), reference_logprobs(model, model, lm)
    assert (ld - sums).abs().max() > 1e-2  # the pairs' tails weigh less in the reference too
