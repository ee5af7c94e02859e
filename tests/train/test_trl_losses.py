"""The preference losses against TRL's trainers on the same batch: TRL tokenizes and collates a few rows, computes
its loss with a DeltaModel whose LoRA is not zero (so the policy differs from the reference), and deltatune's loss
functions, fed log-probs that deltatune computes from TRL's tokens, must give the same number.

Where the two differ on purpose the test says so: TRL's ORPO takes its NLL term over the prompt and the response
(deltatune, as the ORPO paper's L_SFT, over the response), and TRL's CPO adds an NLL term to SimPO by default
(``cpo_alpha=1``; the SimPO paper has none, so it is 0 here), and TRL's GRPO multiplies the KL term by the
importance ratio by default (``use_bias_correction_kl``, after DeepSeek-V3.2; deltatune keeps the GRPO paper's
k3 term, which TRL gives with it off)."""

import contextlib
import math
import warnings

import pytest
import torch
import trl
from datasets import Dataset
from tiny import grpo_batch, save_tiny, tokenizer
from transformers import AutoModelForCausalLM, TrainingArguments

import deltatune as dt
from deltatune.train.config import AlignArgs
from deltatune.train.dpo import DPOTrainer, dpo_loss
from deltatune.train.grpo import grpo_loss
from deltatune.train.kto import kl_reference_point, kto_loss
from deltatune.train.logprobs import response_logprobs, token_logprobs
from deltatune.train.orpo import orpo_loss
from deltatune.train.simpo import simpo_loss

with warnings.catch_warnings():  # TRL keeps ORPO and CPO in trl.experimental, which warns on import
    warnings.simplefilter("ignore")
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

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
# fp32 sums over a few tokens in another order (TRL's fused LM head against deltatune's chunked log-softmax)
ATOL = 2e-5


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def model(base) -> dt.DeltaModel:
    torch.manual_seed(0)
    config = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), config)
    with torch.no_grad():  # a trained-looking adapter: the policy is no longer the reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.eval()


def trl_batch(model, cls, config, rows, tmp_path, ref_model=None, reward_funcs=None, **kwargs):
    """A TRL trainer over ``rows`` (one batch of them all; ``ref_model`` where the loss has a reference,
    ``reward_funcs`` for GRPO) and that batch."""
    args = config(str(tmp_path), per_device_train_batch_size=len(rows), report_to=[], use_cpu=True, bf16=False,
                  **kwargs)  # fmt: skip
    extra = {"ref_model": ref_model} if ref_model is not None else {}
    extra |= {"reward_funcs": reward_funcs} if reward_funcs is not None else {}
    trainer = dt.trl_trainer(cls)(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                  processing_class=tokenizer(), **extra)  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    return trainer, batch


def logps(model, ids, attention_mask, labels, adapter: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """deltatune's (summed response log-probs, response token counts), with the adapter on or off."""
    batch = {"input_ids": ids, "attention_mask": attention_mask, "labels": labels}
    with torch.no_grad():
        if adapter:
            return response_logprobs(model, batch)
        with model.disable_adapter():
            return response_logprobs(model, batch)


def completion_labels(ids, completion_mask):
    return torch.where(completion_mask.bool(), ids, -100)


# (TRL's sigmoid ignores label_smoothing since its cDPO form moved to "robust"; deltatune's sigmoid keeps cDPO,
# checked by hand in test_dpo.py)
@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2),
                                           ("apo_zero", 0.0)])  # fmt: skip
def test_dpo_equals_trl(base, model, tmp_path, loss_type, eps):
    ref = AutoModelForCausalLM.from_pretrained(base)  # TRL's reference: the base, as deltatune's adapter-off model
    trainer, batch = trl_batch(model, trl.DPOTrainer, trl.DPOConfig, PAIRS, tmp_path, ref, loss_type=[loss_type],
                               beta=0.3, label_smoothing=eps)  # fmt: skip
    with torch.no_grad():
        expected = trainer.compute_loss(model, batch).item()
    labels = completion_labels(batch["input_ids"], batch["completion_mask"])
    (policy, counts), (reference, _) = (logps(model, batch["input_ids"], batch["attention_mask"], labels, on)
                                        for on in (True, False))  # fmt: skip
    (pc, pr), (rc, rr), (nc, nr) = policy.chunk(2), reference.chunk(2), counts.chunk(2)
    assert (nc != nr).any()  # responses of different lengths: IPO's per-token averages matter
    losses, _, _ = dpo_loss(pc, pr, rc, rr, 0.3, loss_type, eps, chosen_tokens=nc, rejected_tokens=nr)
    assert losses.mean().item() == pytest.approx(expected, abs=ATOL)
    assert abs(expected - math.log(2)) > 0.01  # not the value at the start
    ours = DPOTrainer(model=model, args=TrainingArguments(str(tmp_path / "dt"), report_to=[], use_cpu=True),
                      align=AlignArgs(beta=0.3, loss_type=loss_type, label_smoothing=eps))  # fmt: skip
    model.train()  # (logged while training; the tiny llama and the LoRA have no dropout)
    with torch.no_grad():
        ours.compute_loss(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                                  "labels": labels})  # fmt: skip
    model.eval()
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items() if k.startswith(("rewards/", "logps/"))}
    assert len(logged) == 6 and {k: ours._stats[k][0] for k in logged} == pytest.approx(logged, abs=ATOL)


def test_kto_equals_trl(base, model, tmp_path):
    ref = AutoModelForCausalLM.from_pretrained(base)
    trainer, batch = trl_batch(model, trl.KTOTrainer, trl.KTOConfig, ROWS, tmp_path, ref, beta=0.3,
                               desirable_weight=1.2, undesirable_weight=0.8)  # fmt: skip
    with torch.no_grad():
        expected = trainer.compute_loss(model, batch).item()
    rows = completion_labels(batch["input_ids"], batch["completion_mask"])
    mismatched = completion_labels(batch["KL_input_ids"], batch["KL_completion_mask"])
    policy, _ = logps(model, batch["input_ids"], batch["attention_mask"], rows)
    reference, _ = logps(model, batch["input_ids"], batch["attention_mask"], rows, adapter=False)
    z0 = kl_reference_point(logps(model, batch["KL_input_ids"], batch["KL_attention_mask"], mismatched)[0],
                            logps(model, batch["KL_input_ids"], batch["KL_attention_mask"], mismatched, False)[0])  # fmt: skip
    assert z0 > 0  # the reference point takes part
    losses, rewards = kto_loss(policy, reference, batch["label"].bool(), z0, 0.3, 1.2, 0.8)
    assert losses.mean().item() == pytest.approx(expected, abs=ATOL)
    good = batch["label"].bool()  # what TRL logs under the names deltatune's KTOTrainer logs them by
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items() if "/" in k and "logits" not in k}  # (eval mode)
    want = {"rewards/chosen": rewards[good].mean(), "rewards/rejected": rewards[~good].mean(),
            "logps/chosen": policy[good].mean(), "logps/rejected": policy[~good].mean()}  # fmt: skip
    want["rewards/margins"] = want["rewards/chosen"] - want["rewards/rejected"]
    assert logged == {k: pytest.approx(v.item(), abs=ATOL) for k, v in want.items()}


def test_orpo_odds_ratio_term_equals_trl(model, tmp_path):
    trainer, batch = trl_batch(model, ORPOTrainer, ORPOConfig, PAIRS, tmp_path, beta=0.3)
    with torch.no_grad():
        expected, metrics = trainer.get_batch_loss_metrics(model, batch)
    (pc, nc), (pr, nr) = (logps(model, batch[f"{s}_input_ids"], batch[f"{s}_attention_mask"], batch[f"{s}_labels"])
                          for s in ("chosen", "rejected"))  # fmt: skip
    loss, log_or, _, _ = orpo_loss(pc, pr, nc, nr, 0.3)
    nll = -pc.sum() / nc.sum()
    assert log_or.mean().item() == pytest.approx(float(metrics["log_odds_chosen"]), abs=ATOL)
    assert (loss - nll).item() == pytest.approx(expected.item() - float(metrics["nll_loss"]), abs=ATOL)
    # TRL's NLL is over the prompt's tokens too (after the first), deltatune's over the response's
    ids, mask = batch["chosen_input_ids"], batch["chosen_attention_mask"]
    whole, _ = logps(model, ids, mask, torch.where(mask.bool(), ids, -100))
    tokens = mask[:, 1:].sum()
    assert float(metrics["nll_loss"]) == pytest.approx(-(whole.sum() / tokens).item(), abs=ATOL)
    assert abs(float(metrics["nll_loss"]) - nll.item()) > 0.01


def test_simpo_equals_trl_cpo_without_its_nll_term(model, tmp_path):
    trainer, batch = trl_batch(model, CPOTrainer, CPOConfig, PAIRS, tmp_path, loss_type="simpo", beta=2.0,
                               simpo_gamma=0.7, cpo_alpha=0.0)  # fmt: skip
    with torch.no_grad():
        expected = trainer.compute_loss(model, batch).item()
    (pc, nc), (pr, nr) = (logps(model, batch[f"{s}_input_ids"], batch[f"{s}_attention_mask"], batch[f"{s}_labels"])
                          for s in ("chosen", "rejected"))  # fmt: skip
    losses, _, _ = simpo_loss(pc, pr, nc, nr, 2.0, 0.7)
    assert losses.mean().item() == pytest.approx(expected, abs=ATOL)


@pytest.mark.parametrize("trl_type, loss_norm", [("grpo", "sequence"), ("bnpo", "token")])
def test_grpo_equals_trl(model, tmp_path, trl_type, loss_norm):
    """Four completions of different lengths after four prompts; old log-probs off the policy's so that the ratio
    is clipped somewhere, a reference (the adapter off) so that the KL term counts, a sampling temperature."""
    b, temperature = grpo_batch(model.config.vocab_size), 0.7
    g, n, p, t, prompts, completions, mask, advantages, labels, ids = (
        b[k] for k in ("g", "n", "p", "t", "prompts", "completions", "mask", "advantages", "labels", "ids"))  # fmt: skip

    def logps(adapter: bool) -> torch.Tensor:  # as the GRPO loop takes them: at the sampling temperature
        with torch.no_grad(), contextlib.nullcontext() if adapter else model.disable_adapter():
            return token_logprobs(model(input_ids=ids).logits.float() / temperature, labels)[:, p - 1 :]

    policy, reference = logps(True), logps(False)
    old = policy + 0.3 * torch.randn(policy.shape, generator=g)
    trainer, _ = trl_batch(model, trl.GRPOTrainer, trl.GRPOConfig, [{"prompt": "hi"}] * n, tmp_path,
                           reward_funcs=lambda completions, **_: [0.0] * len(completions), loss_type=trl_type,
                           beta=0.04, epsilon=0.2, temperature=temperature, num_generations=n,
                           max_completion_length=t, use_bias_correction_kl=False)  # fmt: skip
    inputs = {"prompt_ids": prompts, "prompt_mask": torch.ones_like(prompts), "completion_ids": completions,
              "completion_mask": mask, "advantages": advantages, "old_per_token_logps": old,
              "ref_per_token_logps": reference}  # fmt: skip
    with torch.no_grad():
        expected = trainer._compute_loss(model, inputs).item()
    loss, stats = grpo_loss(policy, old, advantages, mask, 0.2, 0.04, reference, loss_norm)
    assert stats["clipped"] > 0 and stats["kl"] > 0
    assert loss.item() == pytest.approx(expected, abs=1e-6)
