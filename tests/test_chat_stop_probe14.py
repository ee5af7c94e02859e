"""A tokenizer with no EOS trained under the built-in chatml learns to end answers with ``<|im_end|>``; chat and the
run's samples stop on it (they ran to max_new_tokens, the marker and what followed it decoded into the answer)."""

from __future__ import annotations

import torch

from deltatune.train import chat


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<|im_start|>", "<|im_end|>", "user", "assistant", "hi", "yo", "\n"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Split(r"(<\|im_start\|>|<\|im_end\|>|\n| )", behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    assert tok.eos_token_id is None
    return tok


def _model(tok, answer: list[int], eos=None):
    """A tiny Llama whose greedy answer is ``answer`` then "yo" forever, whatever the prompt; its generation config's
    EOS is ``eos``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = eos
    steps = {"n": 0}

    def force(_module, _inputs, logits):
        out = torch.full_like(logits, -1e4)
        at = steps["n"]  # (the prompt's forward gives the first new token)
        want = answer[at] if 0 <= at < len(answer) else tok.convert_tokens_to_ids("yo")
        out[:, -1, want] = 0.0
        steps["n"] += 1
        return out

    model.lm_head.register_forward_hook(force)
    return model


def test_chat_stops_on_chatml_end_marker_when_the_tokenizer_has_no_eos():
    tok = _tokenizer()
    hi, im_end = tok.convert_tokens_to_ids("hi"), tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    stopped = chat.generate(_model(tok, [hi, hi, im_end]), tok, ids, max_new_tokens=8, template="chatml")
    assert stopped == "hi hi"
    # without the template (the tokenizer's own, whose stops are the generation config's) nothing stops it
    ran_on = chat.generate(_model(tok, [hi, hi, im_end]), tok, ids, max_new_tokens=8)
    assert ran_on.split() == ["hi", "hi"] + ["yo"] * 5


def test_serve_stops_on_the_chatml_end_marker_of_an_adapter_trained_with_it(tmp_path):
    """An adapter whose run trained under chatml (data.template in its run.yaml) with a tokenizer that has no EOS:
    served, its answer stops on ``<|im_end|>`` (finish_reason stop), as chat's does; it ran to max_tokens."""
    import threading

    import yaml

    import deltatune as dt
    from deltatune.serve import Engine, Request

    tok = _tokenizer()
    hi, im_end = tok.convert_tokens_to_ids("hi"), tok.convert_tokens_to_ids("<|im_end|>")
    model = _model(tok, [hi, im_end] * 20)  # the engine's forwards are the steps: "hi", then the marker, ...
    lora = dt.DeltaModel(model, dt.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(str(tmp_path / "run"))
    (tmp_path / "run" / "run.yaml").write_text(yaml.safe_dump({"stage": "sft", "data": {"template": "chatml"}}))
    engine = Engine(dt.DeltaModel(_model(tok, [hi, im_end] * 20), fused_loss=False), tok)
    try:
        engine.load_adapter("tuned", str(tmp_path / "run"))
        done, ends = threading.Event(), []
        r = Request(tok("<|im_start|>user\nhi")["input_ids"], "tuned", 8,
                    lambda _t, f: f and (ends.append(f), done.set()))  # fmt: skip
        engine.submit(r)
        assert done.wait(60)
    finally:
        engine.close()
    assert r.output_ids == [hi, im_end] and ends == ["stop"]


def test_the_chat_loop_stops_on_the_chatml_end_marker_too():
    """``deltatune chat``'s loop (chat.repl) passed no template to generate: it ran to max_new_tokens (review I)."""
    import io

    tok = _tokenizer()
    hi, im_end = tok.convert_tokens_to_ids("hi"), tok.convert_tokens_to_ids("<|im_end|>")
    out = io.StringIO()
    model = _model(tok, [hi, hi, im_end])
    chat.repl(model, tok, stdin=io.StringIO("hi\n"), stdout=out, template="chatml", max_new_tokens=8)
    assert out.getvalue().splitlines()[-1] == "hi hi"


def test_deltatune_generate_stops_on_the_chatml_end_marker_too(tmp_path, monkeypatch, capsys):
    """``deltatune generate --adapter RUN`` of a run trained under chatml: the answer stops on the marker."""
    import yaml

    import deltatune.train.run_load as run_load
    from deltatune.cli import main

    tok = _tokenizer()
    hi, im_end = tok.convert_tokens_to_ids("hi"), tok.convert_tokens_to_ids("<|im_end|>")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.yaml").write_text(yaml.safe_dump({"stage": "sft", "data": {"template": "chatml"}}))
    (run / "adapter_config.json").write_text('{"peft_type": "LORA", "task_type": "CAUSAL_LM"}')
    monkeypatch.setattr(run_load, "load_generator", lambda *a, **k: (_model(tok, [hi, hi, im_end]), tok))
    assert main(["generate", "--adapter", str(run), "--prompt", "hi", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == "hi hi"
