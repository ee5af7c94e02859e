"""GRPO against TRL 1.16's GRPOTrainer, round 6b: AdamW spares biases and norm weights as the HF Trainer's
create_optimizer; the context check counts a token adapter's virtual tokens."""

from __future__ import annotations

import json

from tiny import save_tiny, word_tokenizer

from deltatune.train.config import AlignArgs
from deltatune.train.grpo import GRPOLoop


def test_weight_decay_spares_biases_and_norm_weights_as_the_hf_trainer():
    """A bottleneck adapter with a layer norm: GRPO decayed its biases and norm weights (0.1 where TRL's, the HF
    Trainer's create_optimizer, has 0)."""
    import tempfile

    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

    import deltatune as dt

    tok = word_tokenizer()
    config = AutoConfig.for_model("llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=48, vocab_size=len(tok), pad_token_id=0,
                                  bos_token_id=2, eos_token_id=3, max_position_embeddings=64)  # fmt: skip
    model = dt.get_delta_model(AutoModelForCausalLM.from_config(config),
                               dt.BottleneckConfig(target_modules=["mlp"], bottleneck_size=4, ln_after=True))  # fmt: skip
    ours = GRPOLoop(model, tok, [], AlignArgs(), weight_decay=0.1).optimizer
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, weight_decay=0.1, report_to=[], use_cpu=True)
        hf = Trainer(model=model, args=args).create_optimizer()

    def decay(opt):
        return {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}

    assert decay(ours) == decay(hf)
    assert sorted(decay(ours).values()).count(0.0) == 8  # 2 layers x (2 biases, the norm's weight and bias)


def test_a_token_adapters_virtual_tokens_count_in_the_context_check(tmp_path, capsys):
    """GPT-2 with 48 positions, prompt tuning with 20 virtual tokens, prompts of at most 16 tokens and 28 new ones:
    16 + 28 = 44 passed the check, then sampling ran past position 48 (an error from the generation step, after the
    model loaded). Now refused before the model loads, naming the key and the virtual tokens, as PPO does."""
    from deltatune.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"tell me about the {w} cat"}) + "\n" for w in "abcd"))
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(json.dumps({
        "stage": "grpo", "model": {"name_or_path": save_tiny(tmp_path / "gpt2", "gpt2", "causal_lm", n_positions=48)},
        "method": {"name": "prompt_tuning", "num_virtual_tokens": 20},
        "data": {"train": str(prompts), "max_length": 16}, "train": {"max_steps": 1, "batch_size": 2},
        "align": {"reward_funcs": ["test_grpo:yes_fraction"], "max_new_tokens": 28, "num_generations": 2,
                  "mini_batch_size": 2},
        "output": {"dir": str(tmp_path / "run")},
    }))  # fmt: skip
    capsys.readouterr()  # (the tiny model's save)
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "align.max_new_tokens=28" in err and "the adapter's 20 virtual tokens" in err and "context of 48" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
