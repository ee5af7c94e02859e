"""Ninth pass over the preference stages against TRL 1.16: DPO's ``use_weighting`` (WPO), which deltatune refused;
pairs cut by ``data.max_length`` split at the shared prompt and then cut as TRL's collator cuts them; KTO's
mismatched (KL) rows forwarded without a gradient graph, as TRL's."""

import json
import warnings
from types import SimpleNamespace

import pytest
import torch
import trl
from datasets import Dataset
from tiny import save_tiny, tokenizer
from transformers import AutoModelForCausalLM, TrainingArguments

import deltatune as dt
from deltatune.config import ConfigError
from deltatune.data.load import DataError
from deltatune.data.preference import PairCollator
from deltatune.train.config import AlignArgs
from deltatune.train.dpo import DPOTrainer, dpo_loss, wpo_weights
from deltatune.train.logprobs import summed, token_logprobs

PAIRS = [
    {"prompt": "what is your name", "chosen": " my name is delta", "rejected": " i will not say"},
    {"prompt": "hello there friend", "chosen": " hi", "rejected": " go away now please you"},
]
B, T, V, BETA = 4, 9, 11, 0.3


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


def align(**kw) -> AlignArgs:
    """AlignArgs with ``use_weighting`` set on it (config.py declares no such field yet)."""
    wpo = kw.pop("use_weighting", False)
    a = AlignArgs(**kw)
    a.use_weighting = wpo
    return a


class Logits:
    """A stand-in for TRL's fused-LM-head model over given logits: its per-token log-probs (0 off the completion, as
    TRL's) and log sum_v p_v^2, both differentiable through the logits in fp64."""

    def __init__(self, logits: torch.Tensor, mask: torch.Tensor) -> None:
        self.logits, self.mask = logits, mask

    def __call__(self, input_ids, **_) -> SimpleNamespace:
        logp = torch.log_softmax(self.logits[:, :-1], -1)
        picked = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1) * self.mask[:, 1:]
        z = torch.zeros_like(picked)
        return SimpleNamespace(log_probs=picked, entropy=z, mean_logits=z, is_top1=z.bool(),
                               log_sum_sq_probs=torch.logsumexp(2 * logp, -1).detach())  # fmt: skip


def logit_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids (2B, T), completion mask, logits (2B, T, V) as an fp64 leaf, reference sums (2B,))."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, 4, (2 * B,), generator=g)
    length = torch.stack([torch.randint(1, T - int(p) + 1, (1,), generator=g)[0] for p in prompt])
    pos = torch.arange(T)
    mask = ((pos >= prompt[:, None]) & (pos < (prompt + length)[:, None])).long()
    ids = torch.randint(0, V, (2 * B, T), generator=g)
    logits = (torch.randn(2 * B, T, V, generator=g, dtype=torch.float64)).requires_grad_()
    ref = -2 * mask.sum(1) + torch.randn(2 * B, generator=g, dtype=torch.float64)
    return ids, mask, logits, ref


@pytest.fixture(scope="module")
def trl_dpo(base, tmp_path_factory):
    args = trl.DPOConfig(str(tmp_path_factory.mktemp("trl_dpo")), report_to=[], use_cpu=True, bf16=False,
                         per_device_train_batch_size=2, use_weighting=True)  # fmt: skip
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(base), args=args,
                             train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer())  # fmt: skip
    trainer.precompute_ref_logps = True
    return trainer


WPO_CASES = [("sigmoid", None, "reverse_kl"), ("ipo", None, "reverse_kl"), ("sigmoid_norm", None, "js_divergence"),
             (["sigmoid", "bco_pair"], None, "reverse_kl"), ("sigmoid", 0.5, "reverse_kl"),
             ("apo_zero", None, "reverse_kl")]  # fmt: skip


@pytest.mark.parametrize("loss_type, ld_alpha, divergence", WPO_CASES)
def test_wpo_loss_and_gradient_equal_trl(trl_dpo, loss_type, ld_alpha, divergence):
    """WPO's weights from deltatune's chunked log-probs of the same logits, through dpo_loss, against TRL's
    _compute_loss with use_weighting: the loss and its gradient with respect to every logit, to 1e-6."""
    ids, mask, logits, ref = logit_batch(200 + WPO_CASES.index((loss_type, ld_alpha, divergence)))
    kinds = [loss_type] if isinstance(loss_type, str) else loss_type
    trl_dpo.beta, trl_dpo.loss_types, trl_dpo.loss_weights = BETA, kinds, [1.0] * len(kinds)
    trl_dpo.ld_alpha, trl_dpo.f_divergence_type, trl_dpo.label_smoothing = ld_alpha, divergence, 0.0
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
              "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}  # fmt: skip
    expected = trl_dpo._compute_loss(Logits(logits, mask), inputs, False)
    (want,) = torch.autograd.grad(expected, logits)
    labels = torch.where(mask.bool(), ids, -100)
    stats = {}
    per_token = token_logprobs(logits, labels, stats)
    policy, counts = summed(per_token, labels, ld_alpha), mask[:, 1:].sum(1)
    weights = wpo_weights(per_token, labels, stats["log_sum_sq_probs"])
    losses, _, _ = dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], BETA, loss_type, 0.0, counts[:B], counts[B:],
                            f_divergence=divergence, weights=weights)  # fmt: skip
    (got,) = torch.autograd.grad(losses.mean(), logits)
    assert losses.mean().item() == pytest.approx(expected.item(), abs=1e-6) and want.abs().max() > 1e-3
    assert torch.allclose(got, want, atol=1e-6)
    assert weights.max() < 0.95 and weights.std() > 1e-3  # (a weight that changes the loss, pair by pair)


def test_wpo_refuses_aot_as_trl():
    for kinds in ("aot", ["sigmoid", "aot_unpaired"]):
        with pytest.raises(ConfigError, match="align.use_weighting .WPO. does not apply to align.loss_type aot"):
            DPOTrainer(model=torch.nn.Linear(1, 1), args=TrainingArguments("/tmp/x", report_to=[], use_cpu=True),
                       align=align(loss_type=kinds, use_weighting=True))  # fmt: skip


def trl_batch_as_pairs(inputs) -> list[dict]:
    """TRL's collated batch (2B rows, completion_mask) as deltatune's pairs."""
    labels = torch.where(inputs["completion_mask"].bool(), inputs["input_ids"], -100)
    seqs, n = [], len(inputs["input_ids"]) // 2
    for i in range(2 * n):
        real = inputs["attention_mask"][i].bool()
        ids = inputs["input_ids"][i][real].tolist()
        seqs.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels[i][real].tolist()})
    return [{"chosen": seqs[i], "rejected": seqs[n + i]} for i in range(n)]


@pytest.mark.parametrize("precompute", [False, True])
def test_wpo_trainer_equals_trl(base, model, tmp_path, precompute):
    """TRL's DPOTrainer with use_weighting and deltatune's on a real batch of a tiny model, in eval mode (TRL
    weighs there too) and while training (the logged metrics too)."""
    args = trl.DPOConfig(str(tmp_path), per_device_train_batch_size=2, report_to=[], use_cpu=True, bf16=False,
                         beta=BETA, use_weighting=True, precompute_ref_log_probs=precompute)  # fmt: skip
    trainer = dt.trl_trainer(trl.DPOTrainer)(model=model, args=args, train_dataset=Dataset.from_list(PAIRS),
                                             ref_model=AutoModelForCausalLM.from_pretrained(base),
                                             processing_class=tokenizer())  # fmt: skip
    inputs = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        expected = trainer.compute_loss(model.eval(), inputs).item()
    pairs, collate = trl_batch_as_pairs(inputs), PairCollator(tokenizer().pad_token_id)
    ours = DPOTrainer(model=model, args=TrainingArguments(str(tmp_path / "dt"), report_to=[], use_cpu=True),
                      align=align(beta=BETA, use_weighting=True, precompute_ref=precompute),
                      train_dataset=pairs, data_collator=collate)  # fmt: skip
    plain = DPOTrainer(model=model, args=TrainingArguments(str(tmp_path / "p"), report_to=[], use_cpu=True),
                       align=align(beta=BETA))  # fmt: skip
    with torch.no_grad():
        got = ours.compute_loss(model, collate(ours.train_dataset)).item()
        unweighted = plain.compute_loss(model, collate(pairs)).item()
        model.train()  # (the tiny llama and the LoRA have no dropout)
        trained = ours.compute_loss(model, collate(ours.train_dataset)).item()
        model.eval()
    assert got == pytest.approx(expected, abs=2e-5) and trained == pytest.approx(expected, abs=2e-5)
    assert abs(unweighted - expected) > 3e-3  # (the weights change it)


CUT_ROWS = [("what is your name", "my name is delta and i am here to help you today", "no"),
            ("hello there friend how are you doing on this fine day", "hi", "go away now please"),
            ("tell me", "a story", "nothing")]  # fmt: skip
CUT_CONVERSATIONAL = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
                       "rejected": [{"role": "assistant", "content": r}]} for p, c, r in CUT_ROWS]  # fmt: skip


def prepared_dpo(base: str, tmp_path, max_length: int, **data):
    from deltatune.train import build
    from deltatune.train.models import load_tokenizer
    from deltatune.train.table import prepare

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CUT_CONVERSATIONAL))
    cfg = build({"stage": "dpo", "model": {"name_or_path": base}, "train": {"report_to": ["none"]},
                 "data": {"train": str(path), "max_length": max_length, **data},
                 "output": {"dir": str(tmp_path / "run")}})  # fmt: skip
    return prepare(cfg, load_tokenizer(base))


@pytest.mark.parametrize("max_length", [36, 30])
def test_cut_pairs_have_trls_tokens_and_loss(base, model, tmp_path, max_length):
    """Prompts of 27, 34 and 25 tokens, sides of 46/35, 42/45 and 34/33: at 36 two pairs are cut, at 30 TRL drops
    the second (its prompt fills max_length; deltatune keeps its old cut of it, and says so). deltatune kept each
    side's end (the prompt's start cut, the whole answer kept); TRL 1.16's DPOTrainer keeps each side's first
    max_length tokens: now the same tokens, labels and loss."""
    prep = prepared_dpo(base, tmp_path, max_length)
    args = trl.DPOConfig(str(tmp_path / "trl"), per_device_train_batch_size=3, report_to=[], use_cpu=True,
                         bf16=False, beta=BETA, max_length=max_length)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = dt.trl_trainer(trl.DPOTrainer)(model=model, args=args, ref_model=AutoModelForCausalLM.from_pretrained(
            base), train_dataset=Dataset.from_list(CUT_CONVERSATIONAL), processing_class=prep_tokenizer(base))  # fmt: skip
    batch = theirs.data_collator([theirs.train_dataset[i] for i in range(len(theirs.train_dataset))])
    trained = prep.train if max_length == 36 else [prep.train[0], prep.train[2]]
    assert trl_batch_as_pairs(batch) == trained and len(prep.train) == 3
    assert max(len(p["chosen"]["input_ids"]) for p in prep.train) == max_length
    note = f"1 train pairs have a prompt that alone fills data.max_length={max_length}, which TRL drops (DPO) or trains with an empty answer (ORPO, CPO)"
    assert any(n.startswith(note) for n in prep.notes) == (max_length == 30)
    with torch.no_grad():
        expected = theirs.compute_loss(model.eval(), batch).item()
        ours = DPOTrainer(model=model, args=TrainingArguments(str(tmp_path / "dt"), report_to=[], use_cpu=True),
                          align=align(beta=BETA))  # fmt: skip
        got = ours.compute_loss(model, prep.collator(trained)).item()
    assert got == pytest.approx(expected, abs=2e-5)


def prep_tokenizer(base: str):
    from deltatune.train.models import load_tokenizer

    return load_tokenizer(base)


def test_cut_pairs_refused_under_truncation_refuse(base, tmp_path):
    with pytest.raises(DataError, match=r"rows.jsonl:1: longer than data.max_length=36 tokens"):
        prepared_dpo(base, tmp_path, 36, truncation="refuse")


def test_a_pair_trl_drops_keeps_the_prompts_end(base, tmp_path):
    """At 20 every prompt alone fills max_length: TRL would drop every pair (and train on nothing); deltatune keeps
    the cut of its other stages (the prompt's end, the answers' start), as before, and names them in the report."""

    prep = prepared_dpo(base, tmp_path, 20)
    assert "3 train pairs have a prompt that alone fills data.max_length=20" in " ".join(prep.notes)
    assert all(len(p[k]["input_ids"]) == 20 and p[k]["labels"][-1] != -100 for p in prep.train for k in p)


def test_a_cut_pair_splits_at_the_shared_prompt_first_as_trl(tmp_path):
    """Byte-level BPE: the chosen ' Hello' takes the generation prompt's last space, the rejected '42' does not, so
    TRL starts both answers at that ' ' (the shorter common prefix), then cuts each side at max_length. A pair whose
    longer side was cut kept each side's own split in deltatune (the rejected answer one token short)."""
    from transformers import AutoTokenizer
    from trl.data_utils import common_prefix_length

    from deltatune.train import build
    from deltatune.train.models import resolve_path
    from deltatune.train.pairs import encode_pair_splits

    try:
        tok = AutoTokenizer.from_pretrained(resolve_path("smollm2"))
    except ConfigError as exc:
        pytest.skip(str(exc))
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'user' %}User: {{ m.content }}\n{% else %}Assistant: "
                         "{{ m.content }}{{ eos_token }}\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}Assistant: {% endif %}")  # fmt: skip
    prompt = [{"role": "user", "content": "Hi"}]
    chosen = [{"role": "assistant", "content": "Hello there."}]
    rejected = [{"role": "assistant", "content": "42 is it, and that is all there is to say about it, friend."}]
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")

    def ids(messages, **kw):
        return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])

    p, pc, pr = ids(prompt, add_generation_prompt=True), ids(prompt + chosen), ids(prompt + rejected)
    n = min(common_prefix_length(p, pc), common_prefix_length(p, pr))
    max_length = len(pc) + 2
    assert tok.decode(pr[n : n + 1]) == " " and len(pr) > max_length  # the case the test is about
    cfg = build({"stage": "dpo", "model": {"name_or_path": "x"}, "train": {"report_to": ["none"]},
                 "data": {"train": str(path), "max_length": max_length}, "output": {"dir": str(tmp_path / "run")}})  # fmt: skip
    train = encode_pair_splits(cfg, tok, causal=True)[0]
    (pair,) = train.examples
    assert train.truncated == 1
    for side, full in (("chosen", pc), ("rejected", pr)):
        assert pair[side]["input_ids"] == full[:max_length]
        assert pair[side]["labels"] == [-100] * n + full[n:max_length]


KTO_ROWS = [("what is your name", " my name is delta", True), ("hello there friend", " go away now please you", False),
            ("how are you", " fine thanks", True), ("tell me a story", " no", False)]  # fmt: skip


def test_kto_mismatched_rows_run_without_a_graph_and_give_the_same_loss(model, tmp_path):
    """KTO's mismatched (KL) rows set z0, which takes no gradient; deltatune forwarded them with the rows, with
    grad (a graph over twice the rows for nothing). Now they run under no_grad, as TRL's _compute_kl_logps: the loss
    and every gradient equal the joint forward's to 1e-6, and only the rows' own forward holds a graph."""
    from deltatune.train.kto import KTOCollator, KTOTrainer, kl_reference_point, kto_loss
    from deltatune.train.logprobs import reference_logprobs, sequence_logprobs

    tok = tokenizer()
    rows = []
    for prompt, completion, good in KTO_ROWS:
        p, c = tok(prompt)["input_ids"], tok(completion, add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": p + c, "attention_mask": [1] * (len(p) + len(c)), "labels": [-100] * len(p) + c,
                     "n_prompt": len(p), "desirable": good})  # fmt: skip
    batch = KTOCollator(tok.pad_token_id, 64)(rows)
    ours = KTOTrainer(model=model, args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True),
                      align=AlignArgs(beta=BETA, desirable_weight=1.2))  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    calls = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda m, i, out: calls.append((len(out), out.requires_grad))
    )
    model.train()
    try:
        loss = ours.compute_loss(model, batch)
    finally:
        hook.remove()
    got = torch.autograd.grad(loss, params)
    n, lm = len(rows), {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    policy, policy_kl = sequence_logprobs(model, lm).chunk(2)  # (the joint forward, with grad)
    ref, ref_kl = reference_logprobs(model, model, lm).chunk(2)
    kl = kl_reference_point(policy_kl, ref_kl)
    joint = kto_loss(policy, ref, batch["desirable"], kl, BETA, 1.2)[0].mean()
    want = torch.autograd.grad(joint, params)
    model.eval()
    assert kl > 0.01 and loss.item() == pytest.approx(joint.item(), abs=1e-6)
    assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want)) and max(w.abs().max() for w in want) > 1e-3
    assert sorted(calls) == [(n, False), (n, True), (2 * n, False)]  # the KL rows, the rows, the reference of both


@pytest.mark.parametrize("max_length", [36, 1000])
def test_kto_cut_rows_have_trls_loss(base, model, tmp_path, max_length):
    """KTO on the preference rows unpaired (6 rows; at 36, three cut): deltatune kept each row's end and paired a
    row with its neighbour's cut completion; TRL 1.16's KTOTrainer keeps each row's first max_length tokens and
    pairs it with the neighbour's whole completion, cut after the new prompt. Now the same eval loss (and z0)."""
    from deltatune.train.models import load_tokenizer
    from deltatune.train.run import _training_args
    from deltatune.train.table import prepare

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CUT_CONVERSATIONAL))
    cfg = dt.train.build({"stage": "kto", "model": {"name_or_path": base}, "align": {"beta": BETA},
                          "data": {"train": str(path), "eval": str(path), "max_length": max_length},
                          "train": {"batch_size": 2, "eval_batch_size": 2, "report_to": ["none"]},
                          "output": {"dir": str(tmp_path / "run")}})  # fmt: skip
    tok = load_tokenizer(base)
    prep = prepare(cfg, tok)
    assert sum(len(e["input_ids"]) == max_length for e in prep.train) == (3 if max_length == 36 else 0)
    ours = prep.trainer_class(model=model, args=_training_args(cfg, prep, str(tmp_path / "run")),
                              train_dataset=prep.train, eval_dataset=prep.eval, data_collator=prep.collator,
                              compute_metrics=prep.compute_metrics).evaluate()  # fmt: skip
    args = trl.KTOConfig(str(tmp_path / "trl"), per_device_train_batch_size=2, per_device_eval_batch_size=2,
                         report_to=[], use_cpu=True, bf16=False, beta=BETA, max_length=max_length)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = dt.trl_trainer(trl.KTOTrainer)(model=model, ref_model=AutoModelForCausalLM.from_pretrained(base),
                                                args=args, train_dataset=Dataset.from_list(CUT_CONVERSATIONAL),
                                                eval_dataset=Dataset.from_list(CUT_CONVERSATIONAL),
                                                processing_class=tok).evaluate()  # fmt: skip
    assert theirs["eval_kl"] > 0.01
    assert ours["eval_loss"] == pytest.approx(theirs["eval_loss"], abs=2e-6)


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> tuple[str, dt.DeltaModel]:
    """A tiny Mixtral (4 experts, 2 per token, router_aux_loss_coef 0.05) and a LoRA policy on it."""
    from transformers import MixtralConfig, MixtralForCausalLM

    tok, path = tokenizer(), str(tmp_path_factory.mktemp("moe"))
    config = MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           router_aux_loss_coef=0.05, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                           eos_token_id=tok.sep_token_id)  # fmt: skip
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    config = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    policy = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(path), config)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return path, policy.eval()


def test_dpo_on_a_mixture_of_experts_adds_the_router_loss_as_trl(moe, tmp_path):
    """TRL 1.16's DPOTrainer adds router_aux_loss_coef times the load-balancing loss of the policy's forward (the
    architecture's own coefficient, where the config declares output_router_logits): 0.824964 here, where deltatune
    gave 0.723555 (the DPO loss alone). Now equal, and aux_loss logged as TRL logs it."""
    path, model = moe
    args = trl.DPOConfig(str(tmp_path), per_device_train_batch_size=2, report_to=[], use_cpu=True, bf16=False,
                         beta=BETA)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = dt.trl_trainer(trl.DPOTrainer)(model=model, args=args, train_dataset=Dataset.from_list(PAIRS),
                                                ref_model=AutoModelForCausalLM.from_pretrained(path),
                                                processing_class=tokenizer())  # fmt: skip
    batch = next(iter(theirs.get_train_dataloader()))
    with torch.no_grad():
        expected = theirs.compute_loss(model, batch).item()
    pairs, collate = trl_batch_as_pairs(batch), PairCollator(tokenizer().pad_token_id)
    ours = DPOTrainer(model=model, args=TrainingArguments(str(tmp_path / "dt"), report_to=[], use_cpu=True),
                      align=align(beta=BETA))  # fmt: skip
    model.train()  # (logged while training; no dropout here)
    with torch.no_grad():
        got = ours.compute_loss(model, collate(pairs)).item()
    model.eval()
    assert ours.router_coef == 0.05 and got == pytest.approx(expected, abs=2e-5)
    assert ours._stats["aux_loss"][0] == pytest.approx(theirs._metrics["eval"]["aux_loss"][-1], abs=1e-5)
    assert 0.05 * ours._stats["aux_loss"][0] > 0.05


def test_kto_on_a_mixture_of_experts_adds_the_router_loss_as_trl(moe, tmp_path):
    """The same for TRL's KTOTrainer: the load-balancing loss of the rows' forward (not their mismatched pairs')."""
    from deltatune.train.models import load_tokenizer
    from deltatune.train.run import _training_args
    from deltatune.train.table import prepare

    path, model = moe
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in CUT_CONVERSATIONAL))
    cfg = dt.train.build({"stage": "kto", "model": {"name_or_path": path}, "align": {"beta": BETA},
                          "data": {"train": str(rows), "eval": str(rows), "max_length": 64},
                          "train": {"batch_size": 2, "eval_batch_size": 2, "report_to": ["none"]},
                          "output": {"dir": str(tmp_path / "run")}})  # fmt: skip
    tok = load_tokenizer(path)
    prep = prepare(cfg, tok)
    ours = prep.trainer_class(model=model, args=_training_args(cfg, prep, str(tmp_path / "run")),
                              train_dataset=prep.train, eval_dataset=prep.eval, data_collator=prep.collator,
                              compute_metrics=prep.compute_metrics).evaluate()  # fmt: skip
    args = trl.KTOConfig(str(tmp_path / "trl"), per_device_train_batch_size=2, per_device_eval_batch_size=2,
                         report_to=[], use_cpu=True, bf16=False, beta=BETA, max_length=64)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = dt.trl_trainer(trl.KTOTrainer)(model=model, ref_model=AutoModelForCausalLM.from_pretrained(path),
                                                args=args, train_dataset=Dataset.from_list(CUT_CONVERSATIONAL),
                                                eval_dataset=Dataset.from_list(CUT_CONVERSATIONAL),
                                                processing_class=tok).evaluate()  # fmt: skip
    assert theirs["eval_aux_loss"] > 1.0
    assert ours["eval_loss"] == pytest.approx(theirs["eval_loss"], abs=2e-6)


def test_num_tokens_is_logged_as_trl(base, model, tmp_path):
    """TRL's DPOTrainer and KTOTrainer log ``num_tokens``, the training tokens seen so far (the real tokens of every
    training micro-batch: a DPO pair's both sides, a KTO batch's rows without their mismatched pairs); deltatune
    logged none. Now the same running total."""
    from deltatune.train.kto import KTOCollator, KTOTrainer

    args = trl.DPOConfig(str(tmp_path), per_device_train_batch_size=2, report_to=[], use_cpu=True, bf16=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = dt.trl_trainer(trl.DPOTrainer)(model=model, args=args, train_dataset=Dataset.from_list(PAIRS),
                                                ref_model=AutoModelForCausalLM.from_pretrained(base),
                                                processing_class=tokenizer())  # fmt: skip
    batch = next(iter(theirs.get_train_dataloader()))
    ours = DPOTrainer(model=model, args=TrainingArguments(str(tmp_path / "dt"), report_to=[], use_cpu=True),
                      align=align())  # fmt: skip
    collated = PairCollator(tokenizer().pad_token_id)(trl_batch_as_pairs(batch))
    model.train()
    try:
        with torch.no_grad():
            for _ in range(2):
                theirs.compute_loss(model, batch)
                ours.compute_loss(model, collated)
        total = [2.0 * batch["attention_mask"].sum().item()]
        assert ours._stats["num_tokens"] == theirs._metrics["train"]["num_tokens"] == total
        kto = KTOTrainer(model=model, args=TrainingArguments(str(tmp_path / "k"), report_to=[], use_cpu=True),
                         align=AlignArgs())  # fmt: skip
        rows = [{**s, "n_prompt": s["labels"].index(next(x for x in s["labels"] if x != -100)), "desirable": i % 2 == 0}
                for i, s in enumerate(p[k] for p in trl_batch_as_pairs(batch) for k in ("chosen", "rejected"))]  # fmt: skip
        kto_batch = KTOCollator(tokenizer().pad_token_id, 64)(rows)
        with torch.no_grad():
            kto.compute_loss(model, kto_batch)
        assert kto._stats["num_tokens"] == [float(sum(len(r["input_ids"]) for r in rows))]
    finally:
        model.eval()
