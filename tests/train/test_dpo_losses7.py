"""The DPO loss types TRL 1.16's DPOTrainer has beyond sigmoid/ipo/hinge/robust/apo_zero, and its multi-loss (a list
of loss types summed with ``loss_weights``, MPO's sigmoid + bco_pair + sft), against TRL's own loss code.

TRL has no loss function apart from its trainer, so its ``_compute_loss`` runs on a stand-in model that returns
given per-token log-probs (random, zero off the response, of responses of different lengths) with the reference's
summed log-probs in the batch (``precompute_ref_log_probs``): the loss and its gradient with respect to every
per-token log-prob must equal deltatune's ``dpo_loss`` on the same numbers. The last test runs both trainers on a
real batch of a tiny model for the MPO list, to check that ``align`` reaches the loss."""

from types import SimpleNamespace

import pytest
import torch
import trl
from datasets import Dataset
from tiny import save_tiny, tokenizer
from transformers import AutoModelForCausalLM, TrainingArguments

import deltatune as dt
from deltatune.config import ConfigError
from deltatune.train import build
from deltatune.train.config import AlignArgs
from deltatune.train.dpo import DPOTrainer, dpo_loss
from deltatune.train.logprobs import response_logprobs

PAIRS = [
    {"prompt": "what is your name", "chosen": " my name is delta", "rejected": " i will not say"},
    {"prompt": "hello there friend", "chosen": " hi", "rejected": " go away now please you"},
]
B, T, BETA = 6, 10, 0.3


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def trl_dpo(base, tmp_path_factory):
    """A TRL DPOTrainer whose loss settings each test sets (its model is never called: ``Given`` stands in)."""
    args = trl.DPOConfig(str(tmp_path_factory.mktemp("trl")), report_to=[], use_cpu=True, bf16=False,
                         per_device_train_batch_size=2)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(base)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(PAIRS),
                             processing_class=tokenizer())  # fmt: skip
    trainer.precompute_ref_logps = True
    return trainer


class Given:
    """A stand-in for TRL's fused-LM-head model: the given per-token log-probs, zero metrics."""

    def __init__(self, per_token: torch.Tensor) -> None:
        self.per_token = per_token

    def __call__(self, **_) -> SimpleNamespace:
        z = torch.zeros_like(self.per_token)
        return SimpleNamespace(log_probs=self.per_token, entropy=z, mean_logits=z, is_top1=z.bool())


def batch(seed: int, dtype: torch.dtype = torch.float64, spread: float = 4.0):
    """(TRL's inputs, per-token policy log-probs (2B, T-1) as a leaf, reference sums (2B,), response token counts
    (2B,)): prompts of 1-3 tokens, responses of 1 to the rest, chosen rows first; log-ratios of std ``spread``."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, 4, (2 * B,), generator=g)
    length = torch.stack([torch.randint(1, T - int(p) + 1, (1,), generator=g)[0] for p in prompt])
    pos = torch.arange(T)
    mask = ((pos >= prompt[:, None]) & (pos < (prompt + length)[:, None])).long()
    per_token = (-3 * torch.rand(2 * B, T - 1, generator=g, dtype=dtype)) * mask[:, 1:]
    ref = per_token.sum(1) + spread * torch.randn(2 * B, generator=g, dtype=dtype)
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T).long(),
              "completion_mask": mask, "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}  # fmt: skip
    return inputs, per_token.requires_grad_(), ref, mask[:, 1:].sum(1)


CASES = [
    ("exo_pair", None, 1e-3, 0.05), ("exo_pair", None, 0.2, 0.05), ("nca_pair", None, 0.0, 0.05),
    ("sppo_hard", None, 0.0, 0.05), ("aot", None, 0.0, 0.05), ("aot", None, 0.1, 0.05),
    ("aot_unpaired", None, 0.1, 0.05), ("apo_down", None, 0.0, 0.05), ("discopop", None, 0.0, 0.05),
    ("discopop", None, 0.0, 0.7), ("sigmoid_norm", None, 0.0, 0.05), ("bco_pair", None, 0.0, 0.05),
    ("sft", None, 0.0, 0.05), (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.0, 0.05),
    (["ipo", "hinge", "apo_zero"], None, 0.0, 0.05), (["robust", "discopop"], [0.5, 2.0], 0.1, 0.3),
]  # fmt: skip


@pytest.mark.parametrize("loss_type, weights, eps, tau", CASES)
def test_loss_and_gradient_equal_trl(trl_dpo, loss_type, weights, eps, tau):
    check(trl_dpo, loss_type, weights, eps, tau, len(CASES) + CASES.index((loss_type, weights, eps, tau)))


@pytest.mark.parametrize("f, alpha, dtype", [("forward_kl", 0.5, torch.float64), ("js_divergence", 0.5, torch.float64),
                                             ("alpha_divergence", 0.3, torch.float32),  # (TRL's takes no fp64)
                                             ("alpha_divergence", 1.0, torch.float64)])  # fmt: skip
@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("ipo", 0.0), ("exo_pair", 0.1), ("discopop", 0.0),
                                            (["robust", "sigmoid_norm", "hinge", "sft"], 0.2)])  # fmt: skip
def test_f_divergences_equal_trl(trl_dpo, f, alpha, dtype, loss_type, eps):
    check(trl_dpo, loss_type, None, eps, 0.5, 7, f, alpha, dtype, spread=1.0)  # (forward_kl's exp(-u) grows fast)


def check(trl_dpo, loss_type, weights, eps, tau, seed, f="reverse_kl", alpha=0.5, dtype=torch.float64,
          spread=4.0) -> None:  # fmt: skip
    """TRL's loss and gradient against ``dpo_loss``'s on ``batch(seed)`` (to 1e-6, relative in fp32)."""
    kinds = [loss_type] if isinstance(loss_type, str) else loss_type
    trl_dpo.beta, trl_dpo.loss_types, trl_dpo.label_smoothing = BETA, kinds, eps
    trl_dpo.loss_weights, trl_dpo.args.discopop_tau = weights or [1.0] * len(kinds), tau
    trl_dpo.f_divergence_type, trl_dpo.f_alpha_divergence_coef = f, alpha
    inputs, per_token, ref, counts = batch(seed, dtype, spread)
    expected = trl_dpo._compute_loss(Given(per_token), inputs, False)
    (want,) = torch.autograd.grad(expected, per_token)
    policy = per_token.sum(1)
    losses, _, _ = dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], BETA, loss_type, eps, counts[:B], counts[B:],
                            weights, tau, f, alpha)  # fmt: skip
    (got,) = torch.autograd.grad(losses.mean(), per_token)
    rel = 1e-6 if dtype == torch.float32 else 0
    assert torch.isfinite(expected) and losses.mean().item() == pytest.approx(expected.item(), abs=1e-6, rel=rel)
    on = inputs["completion_mask"][:, 1:].bool()  # (elsewhere the stand-in's zeros are no token's log-prob)
    assert torch.allclose(got[on], want[on], atol=1e-6, rtol=rel) and want.abs().max() > 1e-3
    assert (counts[:B] != counts[B:]).any()  # responses of different lengths: the per-token losses see it


@pytest.mark.parametrize("align, message", [
    ({"loss_type": "exo_pairs"}, "align.loss_type must be one of sigmoid, ipo, hinge, robust, apo_zero, exo_pair"),
    ({"loss_type": ["sigmoid", "sftt"]}, "align.loss_type must be one of"),
    ({"loss_type": []}, "align.loss_type must be one of"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "align.loss_weights must be 2 numbers"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, "x"]}, "align.loss_weights must be 2 numbers"),
    ({"loss_type": "exo_pair"}, "align.label_smoothing must be in (0, 0.5) for exo_pair, got 0.0"),
    ({"loss_type": "nca_pair", "label_smoothing": 0.1}, "align.label_smoothing is for the sigmoid and robust losses; "
     "align.loss_type is nca_pair: drop one of them (exo_pair, aot, aot_unpaired read it too)"),
    ({"loss_type": "discopop", "discopop_tau": 0}, "align.discopop_tau must be > 0, got 0"),
    ({"f_divergence_type": "js"}, "align.f_divergence_type must be one of reverse_kl, forward_kl, js_divergence"),
    ({"f_divergence_type": "forward_kl", "loss_type": ["sigmoid", "bco_pair"]}, "other than reverse_kl only with"),
])  # fmt: skip
def test_recipe_refusals_name_the_key(align, message):
    raw = {"stage": "dpo", "model": {"name_or_path": "x"}, "data": {"train": "t.jsonl"}, "align": align}
    with pytest.raises(ConfigError) as info:
        build(raw)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_recipe_takes_a_weighted_list():
    raw = {"stage": "dpo", "model": {"name_or_path": "x"}, "data": {"train": "t.jsonl"},
           "align": {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1], "discopop_tau": 0.1}}  # fmt: skip
    a = build(raw).align
    assert (a.loss_type, a.loss_weights, a.discopop_tau) == (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1], 0.1)
    assert build({**raw, "align": {"loss_type": "exo_pair", "label_smoothing": 1e-3}}).align.loss_type == "exo_pair"


def test_mpo_trainer_equals_trl_on_a_real_batch(base, tmp_path):
    """MPO's list through deltatune's DPOTrainer (align as a recipe gives it) and TRL's, a LoRA that is not zero."""
    torch.manual_seed(0)
    config = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    kinds, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    args = trl.DPOConfig(str(tmp_path), per_device_train_batch_size=2, report_to=[], use_cpu=True, bf16=False,
                         loss_type=kinds, loss_weights=weights, beta=0.3)  # fmt: skip
    trainer = dt.trl_trainer(trl.DPOTrainer)(model=model, args=args, train_dataset=Dataset.from_list(PAIRS),
                                             ref_model=AutoModelForCausalLM.from_pretrained(base),
                                             processing_class=tokenizer())  # fmt: skip
    inputs = next(iter(trainer.get_train_dataloader()))
    model.eval()
    with torch.no_grad():
        expected = trainer.compute_loss(model, inputs).item()
    labels = torch.where(inputs["completion_mask"].bool(), inputs["input_ids"], -100)
    lm = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "labels": labels}
    ours = DPOTrainer(model=model, args=TrainingArguments(str(tmp_path / "dt"), report_to=[], use_cpu=True),
                      align=AlignArgs(beta=0.3, loss_type=kinds, loss_weights=weights))  # fmt: skip
    with torch.no_grad():
        got = ours.compute_loss(model, lm).item()
        sft = -response_logprobs(model, lm)[0][:2].sum() / (labels[:2, 1:] != -100).sum()
    assert got == pytest.approx(expected, abs=2e-5) and sft.item() > 1  # (the sft term counts)
