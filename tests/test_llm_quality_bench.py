"""benchmarks/llm_quality.py: its scoring against sacrebleu / rouge-score by hand, and its method table (the runs
themselves are minutes each: the numbers come from the script, not the suite)."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")
llm_quality = pytest.importorskip("llm_quality")


def test_scores_are_the_reference_implementations_and_agree_with_ours_on_easy_text():
    preds = ["the cat sat on the mat", "a dog ran in the park today"]
    refs = [["the cat sat on the mat"], ["a dog ran in the park", "a dog ran in the park today"]]
    s = llm_quality.score(preds, refs)
    assert s["bleu"] == pytest.approx(100.0) and s["rougeL"] == pytest.approx(100.0)
    assert s["own_bleu"] == pytest.approx(100.0) and s["own_rougeL"] == pytest.approx(100.0)
    # ROUGE-L by hand: "the cat sat" vs "the cat sat on the mat": LCS 3, P 1, R 0.5, F 2/3
    s = llm_quality.score(["the cat sat"], [["the cat sat on the mat"]])
    assert s["rougeL"] == pytest.approx(200 / 3) and s["own_rougeL"] == pytest.approx(200 / 3)


@pytest.mark.parametrize("method", llm_quality.METHODS)
def test_every_method_has_a_config_on_each_side_it_runs(method):
    assert llm_quality.configs(method, "deltatune", "unused").task_type == "CAUSAL_LM"
    if importlib.util.find_spec("peft") is None or method in llm_quality.NO_PEFT:
        return
    assert llm_quality.configs(method, "peft", "unused").task_type == "CAUSAL_LM"


def test_an_unknown_method_is_one_line(capsys):
    assert llm_quality.main(["--methods", "lora,nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown method nope; choose from full, lora, lora-all-linear," in err


def test_method_names_are_the_test_matrix_names():
    """Every name is a registry method, optionally ``-variant``; the 4-bit, rsLoRA and DoRA rows are LoRA's."""
    import deltatune.registry

    assert all(name.split("-", 1)[0] in deltatune.registry.names() for name in llm_quality.METHODS)
    assert {"lora-4bit", "lora-rslora", "lora-dora", "prefix_tuning", "prefix_tuning-v2"} <= set(llm_quality.METHODS)
    assert llm_quality.configs("prefix_tuning", "deltatune", "unused").prefix_projection
    assert not llm_quality.configs("prefix_tuning-v2", "deltatune", "unused").prefix_projection


def test_the_sweep_keeps_each_methods_lowest_dev_loss_and_says_which_run_failed():
    rows = [
        {"method": "lora", "lr": 1e-3, "dev_loss": 2.5},
        {"method": "lora", "lr": 3e-3, "dev_loss": 2.1},
        {"method": "lora", "lr": 9e-3, "dev_loss": 2.4},
        {"method": "ia3", "lr": 1e-2, "dev_loss": 3.0},
        {"method": "ia3", "side": "deltatune", "error": "RuntimeError: out of memory"},
        {"method": "ia3", "lr": 9e-2, "dev_loss": 2.9},
    ]
    table, best = llm_quality._sweep_table(rows)
    assert best == {"lora": 3e-3, "ia3": 9e-2}
    assert "| lora | 2.5000 (0.001) | 2.1000 (0.003) | 2.4000 (0.009) | 0.003 |" in table
    assert "RuntimeError: out of memory" in table.splitlines()[-1]


@pytest.mark.skipif(not os.path.isdir(llm_quality.DATA), reason="../shared/data is not beside the repository")
def test_a_sweep_with_lr_from_centres_on_its_rates_and_the_table_on_the_lr_table_otherwise(tmp_path, monkeypatch):
    ran: list[tuple[str, str, list[str]]] = []

    def lr(flags: list[str]) -> float:
        return float(next(f for f in flags if f.startswith("--lr=")).split("=")[1])

    def fake_run(jobs, parallel):
        ran.extend(jobs)
        return [{"method": m, "lr": lr(f), "dev_loss": 1.0} for m, _, f in jobs]

    monkeypatch.setattr(llm_quality, "_run", fake_run)
    best = tmp_path / "best.json"
    best.write_text('{"bottleneck-pfeiffer": 0.009}')
    args = ["--sweep", "--methods", "bottleneck-pfeiffer,freeze", "--out", str(tmp_path / "s.md")]
    assert llm_quality.main([*args, "--lr-from", str(best)]) == 0
    rates = {m: [] for m in ("bottleneck-pfeiffer", "freeze")}
    for method, _, flags in ran:
        rates[method].append(lr(flags))
    assert rates["bottleneck-pfeiffer"] == pytest.approx([0.003, 0.009, 0.027])
    base = llm_quality.LR["freeze"]
    assert rates["freeze"] == pytest.approx([base / 3, base, base * 3])
    assert "the best of " + str(best) in (tmp_path / "s.md").read_text()


@pytest.mark.skipif(not os.path.isdir(llm_quality.DATA), reason="../shared/data is not beside the repository")
def test_the_run_wide_switches_reach_every_worker(monkeypatch):
    ran: list[tuple[str, str, list[str]]] = []

    def fake_run(jobs, parallel):
        ran.extend(jobs)
        return [{"method": m, "side": s, "error": "not run"} for m, s, _ in jobs]

    monkeypatch.setattr(llm_quality, "_run", fake_run)
    switches = ["--peft-prefix-mlp-once", "--autocast", "--rank=4", "--threads=1"]
    assert llm_quality.main(["--methods", "prefix_tuning,lora", "--steps", "3", *switches]) == 1
    assert sorted((m, s) for m, s, _ in ran) == [
        ("base", "deltatune"),
        *((m, s) for m in ("lora", "prefix_tuning") for s in ("deltatune", "peft")),
    ]
    for _, _, flags in ran:
        assert set(switches) <= set(flags) and "--steps=3" in flags


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (None, "No such file"),
        ("{not json", "not JSON"),
        ('["lora"]', "not an object of method: lr"),
        ('{"lora-typo": 0.001}', "unknown method 'lora-typo'"),
        ('{"lora": -0.001}', "lora: the lr must be a positive number, got -0.001"),
        ('{"lora": "fast"}', "lora: the lr must be a positive number, got 'fast'"),
    ],
)
def test_a_bad_lr_from_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch, text, said):
    monkeypatch.setattr(llm_quality, "_run", lambda jobs, parallel: pytest.fail("ran with a bad --lr-from"))
    path = tmp_path / "best.json"
    if text is not None:
        path.write_text(text)
    assert llm_quality.main(["--methods", "lora", "--lr-from", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--lr-from {path}: " in err and said in err


@pytest.mark.skipif(not os.path.isdir(llm_quality.DATA), reason="../shared/data is not beside the repository")
def test_a_budget_larger_than_the_train_file_is_one_line(capsys):
    assert llm_quality.main(["--methods", "lora", "--steps", "1000", "--batch", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "are 8064, e2e_nlg/train.jsonl has 2000" in err


@pytest.mark.parametrize("side", ["deltatune", "peft"])
def test_rank_sets_every_lora_rows_r_and_alpha_and_nothing_else(side):
    if side == "peft" and importlib.util.find_spec("peft") is None:
        pytest.skip("peft is not installed")
    for method in ("lora", "lora-all-linear", "lora-4bit", "lora-rslora", "lora-dora"):
        plain, ranked = (llm_quality.configs(method, side, "unused", rank) for rank in (None, 32))
        assert (plain.r, plain.lora_alpha, ranked.r, ranked.lora_alpha) == (8, 16, 32, 64)
        assert ranked.target_modules == plain.target_modules and ranked.use_rslora == plain.use_rslora
    assert vars(llm_quality.configs("ia3", side, "unused", 32)) == vars(llm_quality.configs("ia3", side, "unused"))


@pytest.mark.parametrize(
    "option, value, low",
    [("--rank", "0", 1), ("--steps", "0", 1), ("--eval-rows", "0", 1), ("--jobs", "0", 1), ("--seed", "-1", 0)],
)
def test_a_count_out_of_range_is_refused_before_any_work(capsys, option, value, low):
    """--steps 0 ran every worker into a ZeroDivisionError and --eval-rows 0 into a ValueError, each after loading
    the model; --jobs 0 and --seed -1 ran too. Now argparse's error naming the option, before anything runs."""
    with pytest.raises(SystemExit) as exit_:
        llm_quality.main(["--methods", "lora", option, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err[-1].endswith(f"argument {option}: must be at least {low}, got {value}")


@pytest.mark.parametrize("method", ["prefix_tuning", "prefix_tuning-v2", "prompt_tuning", "p_tuning"])
def test_peft_token_methods_generate_as_peft_forwards_once_the_cache_is_renamed(method):
    """peft's own ``generate`` for its token methods, after ``peft_generate_compat``, answers token for token as a
    greedy loop of full forward passes through peft's model (without it, on transformers 5.24, prefix tuning answers
    as the plain base and prompt tuning re-prepends its tokens each step). The base's own next-token predictions on
    the loop's text differ from it, so the virtual tokens matter and the test can fail."""
    peft = pytest.importorskip("peft")
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    config = llm_quality.configs(method, "peft", "unused")
    if method == "prompt_tuning":  # the text init needs a real tokenizer; the random init is the same code path
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg).eval(), config)
    llm_quality.peft_generate_compat(model)
    ids = torch.randint(3, 64, (1, 7))
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.mul_(30)  # virtual tokens loud enough to change the answer
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        loop = ids
        for _ in range(8):
            logits = model(input_ids=loop, attention_mask=torch.ones_like(loop)).logits
            loop = torch.cat([loop, logits[:, -1:].argmax(-1)], 1)
        with model.disable_adapter():
            base = model.get_base_model()(input_ids=loop).logits[:, 6:-1].argmax(-1)
    assert out[0, 7:].tolist() == loop[0, 7:].tolist()
    assert base[0].tolist() != loop[0, 7:].tolist()


def test_peft_generate_compat_leaves_peft_s_other_methods_alone():
    peft = pytest.importorskip("peft")
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), llm_quality.configs("lora", "peft", "unused"))
    before = model.base_model_prepare_inputs_for_generation
    llm_quality.peft_generate_compat(model)
    assert model.base_model_prepare_inputs_for_generation is before


def _prefix_runs(steps: int = 3):
    """deltatune's prefix tuning (MLP) and peft's from the same weights, trained ``steps`` AdamW steps on one tiny
    Llama's batches: (deltatune, peft, peft with ``peft_prefix_mlp_once``), each as (losses, prefix parameters)."""
    peft = pytest.importorskip("peft")
    import torch
    import transformers

    import deltatune as dt

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, use_cache=False)  # fmt: skip
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    batches = [torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(s)) for s in range(steps)]
    config = dict(num_virtual_tokens=5, encoder_hidden_size=48, prefix_projection=True, task_type="CAUSAL_LM")
    twin = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), peft.PrefixTuningConfig(**config))
    start = {k.split("default.")[-1]: v.detach().clone() for k, v in twin.prompt_encoder.named_parameters()}

    def run(side: str, once: bool = False):
        model = transformers.LlamaForCausalLM(cfg)
        model.load_state_dict(base.state_dict())
        if side == "peft":
            model = peft.get_peft_model(model, peft.PrefixTuningConfig(**config))
            if once:
                llm_quality.peft_prefix_mlp_once(model)
        else:
            model = dt.get_delta_model(model, dt.PrefixTuningConfig(**config))
        named = {k: p for k, p in model.named_parameters() if p.requires_grad}
        short = {k.split("default.")[-1]: p for k, p in named.items()}
        assert sorted(short) == sorted(start)
        with torch.no_grad():
            for k, p in short.items():
                p.copy_(start[k])
        opt = torch.optim.AdamW(named.values(), lr=1e-2)
        losses = []
        for ids in batches:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses, {k: p.detach().clone() for k, p in short.items()}

    return run("deltatune"), run("peft"), run("peft", once=True)


def test_peft_prefix_tuning_with_its_mlp_run_once_per_step_trains_as_deltatune_s_to_the_bit():
    """deltatune runs the prefix MLP once per step and expands it over the batch; peft runs it per batch row. The
    same function (the first losses agree), but not the same gradient sums (the trained parameters differ in the last
    bits here); after ``peft_prefix_mlp_once`` every loss and every trained parameter is deltatune's to the bit."""
    import torch

    (ours, mine), (theirs, their), (once, onces) = _prefix_runs()
    assert ours == once
    assert all(torch.equal(mine[k], onces[k]) for k in mine)
    assert ours[0] == pytest.approx(theirs[0], abs=1e-6)
    assert all(torch.allclose(mine[k], their[k], atol=1e-4) for k in mine)
    assert not all(torch.equal(mine[k], their[k]) for k in mine)


def test_peft_prefix_mlp_once_leaves_peft_s_other_methods_alone():
    peft = pytest.importorskip("peft")
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    v2 = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), v2)
    encoder = model.prompt_encoder["default"]
    llm_quality.peft_prefix_mlp_once(model)
    assert "forward" not in vars(encoder)
