"""Delta-tuning methods against peft 0.21.2 (probe 14): IA3 on nn.Conv2d / nn.Conv3d (peft's IA3 Conv2d / Conv3d;
deltatune refused them), forward, every gradient, merge / unmerge and the adapter file both ways."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_inputs, tiny_model
from torch import nn

import deltatune as dt

peft = pytest.importorskip("peft")


class _Convs(nn.Module):
    """A conv net: Conv2d (grouped or not), Conv3d and a 1x1 Conv2d into a linear head."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c2 = nn.Conv2d(4, 8, (3, 1), padding=(1, 0), groups=groups)
        self.c3 = nn.Conv3d(8, 6, (1, 2, 2))
        self.c2b = nn.Conv2d(6, 6, 1)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c2(x)  # (B, 8, L, 1)
        h = self.c3(h.unsqueeze(2).repeat(1, 1, 2, 1, 2))  # (B, 6, 2, L - 1, 1)
        h = self.c2b(h.flatten(2).unsqueeze(-1))
        return self.head(h.mean((2, 3)))


def _pair(groups: int, feedforward: list[str]):
    kw = dict(target_modules=["c2", "c3", "c2b"], feedforward_modules=feedforward, init_ia3_weights=False)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(_Convs(groups), peft.IA3Config(**kw))
    torch.manual_seed(0)
    ours = dt.get_delta_model(_Convs(groups), dt.IA3Config(**kw))
    return theirs, ours


def _adapter(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n.split("model.")[-1].replace(".weight", ""): p for n, p in model.named_parameters() if "ia3_l" in n}


@pytest.mark.parametrize(("groups", "feedforward"), [(1, ["c2b", "c3"]), (2, ["c2"]), (2, [])])
def test_ia3_conv_matches_peft(groups, feedforward):
    theirs, ours = _pair(groups, feedforward)
    t, o = _adapter(theirs), _adapter(ours)
    assert t.keys() == o.keys() and all(torch.equal(t[k], o[k]) for k in t)  # same draws, peft's shapes
    assert o["c2.ia3_l.default"].shape == ((1, 4, 1, 1) if "c2" in feedforward else (1, 8, 1, 1))
    assert o["c3.ia3_l.default"].shape == ((1, 8, 1, 1, 1) if "c3" in feedforward else (1, 6, 1, 1, 1))
    x = torch.randn(2, 4, 9, 1, generator=torch.Generator().manual_seed(3))
    lt, lo = theirs(x), ours(x)
    assert (lt - lo).abs().max().item() == 0.0
    lt.pow(2).mean().backward()
    lo.pow(2).mean().backward()
    assert max((t[k].grad - o[k].grad).abs().max().item() for k in t) == 0.0
    with torch.no_grad():
        ref = ours(x)
        theirs.merge_adapter(safe_merge=True)
        ours.merge_adapter(safe_merge=True)
        bt, bo = theirs.base_model.model, ours.base_model
        for name in ("c2", "c3", "c2b"):  # merged kernels and biases are peft's
            a, b = bt.get_submodule(name).base_layer, bo.get_submodule(name).base_layer
            assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias), name
        assert (ours(x) - ref).abs().max().item() < 1e-6
        ours.unmerge_adapter()
        assert (ours(x) - ref).abs().max().item() < 1e-6


def test_ia3_conv_file_both_ways(tmp_path):
    theirs, ours = _pair(2, ["c2"])
    x = torch.randn(2, 4, 9, 1, generator=torch.Generator().manual_seed(3))
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        from_ours = peft.PeftModel.from_pretrained(_Convs(2), tmp_path / "ours")
        from_theirs = dt.DeltaModel.from_pretrained(_Convs(2), tmp_path / "theirs")
        assert torch.equal(from_ours(x), ours(x)) and torch.equal(from_theirs(x), theirs(x))


def test_ia3_conv_mixed_batch_rows():
    """Each row of a mixed batch equals its adapter alone (the vectors laid channels-first)."""
    _, ours = _pair(1, ["c2b"])
    ours.add_adapter("other", dt.IA3Config(target_modules=["c2", "c2b"], feedforward_modules=["c2b"],
                                           init_ia3_weights=False))  # fmt: skip
    x = torch.randn(3, 4, 9, 1, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        alone = {}
        for name in ("default", "other"):
            ours.set_adapter(name)
            alone[name] = ours(x)
        with ours.disable_adapter():
            alone["__base__"] = ours(x)
        rows = ["other", "__base__", "default"]
        with ours.mixed_batch(rows):
            mixed = ours(x)
    for i, name in enumerate(rows):
        assert (mixed[i] - alone[name][i]).abs().max().item() < 1e-6, name


def test_ia3_nn_conv1d_refused_as_peft():
    """peft's IA3 takes no nn.Conv1d (a ValueError); ours one clear line naming the target."""
    model = nn.Sequential(nn.Conv1d(4, 4, 3))
    with pytest.raises(ValueError, match="not supported"):
        peft.get_peft_model(model, peft.IA3Config(target_modules=["0"], feedforward_modules=[]))
    with pytest.raises(dt.ConfigError, match=r"ia3: target 0 is a Conv1d; IA3 adapts nn.Linear, GPT-2 Conv1D"):
        dt.get_delta_model(nn.Sequential(nn.Conv1d(4, 4, 3)), dt.IA3Config(target_modules=["0"],
                                                                          feedforward_modules=[]))  # fmt: skip


def _greedy_seq2seq(model, inputs: dict, steps: int = 4) -> torch.Tensor:
    dec = torch.zeros(inputs["input_ids"].shape[0], 1, dtype=torch.long)
    for _ in range(steps):
        logits = model(**inputs, decoder_input_ids=dec).logits[:, -1]
        dec = torch.cat([dec, logits.argmax(-1, keepdim=True)], 1)
    return dec


def test_t5_prefix_generate_is_peft_forward_not_peft_generate(tmp_path):
    """Kept on purpose: T5 prefix tuning's generate here equals peft's own forward run greedily step by step;
    peft 0.21.2's generate differs from that on row 1 (its cached decoding drops the prefix alignment); 0.22's equals it."""
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_model("t5"), peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM",
                                                                            num_virtual_tokens=3)).eval()  # fmt: skip
    theirs.save_pretrained(tmp_path)
    ours = dt.DeltaModel.from_pretrained(tiny_model("t5"), tmp_path).eval()
    inputs = tiny_inputs("t5")
    inputs.pop("decoder_input_ids")
    with torch.no_grad():
        reference = _greedy_seq2seq(theirs, inputs)
        assert torch.equal(_greedy_seq2seq(ours, inputs), reference)
        assert torch.equal(ours.generate(**inputs, max_new_tokens=4, do_sample=False), reference)
        theirs_generate = theirs.generate(**inputs, max_new_tokens=4, do_sample=False)
        # peft 0.22 passes the prefix under transformers' `cache` name: its generate is its forward's, as ours
        assert torch.equal(theirs_generate, reference) is (tuple(map(int, peft.__version__.split(".")[:2])) >= (0, 22))


@pytest.mark.parametrize("kwargs", [dict(num_beams=3, num_return_sequences=2), dict(do_sample=False)])
def test_prompt_tuning_generate_left_padded_beams(kwargs):
    """Prompt tuning's generate (left padding, beams) equals the base generating from [P ; embeddings] with the
    prompt's mask ones: the positions continue after the prompt, as the base's own generate counts them."""
    torch.manual_seed(0)
    ours = dt.get_delta_model(tiny_model("gpt2"), dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    ours.eval()
    base = tiny_model("gpt2")
    prompt = [p for n, p in ours.named_parameters() if p.requires_grad][0].detach()
    inputs = tiny_inputs("gpt2")
    inputs["attention_mask"][0, :2] = 0
    embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(inputs["input_ids"])], 1)
    mask = torch.cat([torch.ones(2, 3, dtype=torch.long), inputs["attention_mask"]], 1)
    with torch.no_grad():
        reference = base.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=4, pad_token_id=0,
                                  **kwargs)  # fmt: skip
        mine = ours.generate(**inputs, max_new_tokens=4, pad_token_id=0, **kwargs)
    assert torch.equal(mine[:, 7:], reference)


def test_prompt_tuning_text_init_keeps_the_tokenizers_specials_as_peft():
    """A tokenizer that adds specials ([CLS] ... [SEP], as a BOS-adding one) gives P those rows too, as peft:
    the text's ids as the tokenizer returns them, cut or repeated to the virtual tokens."""
    from tiny import minilm_path
    from transformers import AutoTokenizer

    path = str(minilm_path())
    ids = AutoTokenizer.from_pretrained(path)("the cat sat")["input_ids"]
    assert len(ids) == 5 and ids[0] == 101 and ids[-1] == 102  # [CLS] the cat sat [SEP]
    kw = dict(task_type="CAUSAL_LM", prompt_tuning_init="TEXT", prompt_tuning_init_text="the cat sat",
              tokenizer_name_or_path=path)  # fmt: skip
    for virtual in (3, 7):
        theirs = peft.get_peft_model(tiny_model("llama", vocab_size=30522), peft.PromptTuningConfig(
            num_virtual_tokens=virtual, **kw))  # fmt: skip
        ours = dt.get_delta_model(tiny_model("llama", vocab_size=30522), dt.PromptTuningConfig(
            num_virtual_tokens=virtual, **kw))  # fmt: skip
        table = [p for n, p in ours.named_parameters() if p.requires_grad][0]
        words = ours.get_input_embeddings().weight
        assert torch.equal(table, theirs.prompt_encoder["default"].embedding.weight)
        assert torch.equal(table, words[(ids * 2)[:virtual]])


def _tt_loop(model, inputs: dict, steps: int = 3) -> torch.Tensor:
    ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"]
    for _ in range(steps):
        nxt = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
        types = torch.cat([types, types[:, -1:]], 1)  # as transformers' generate extends them
    return ids


@pytest.mark.parametrize("name", ["prompt", "prefix", "p_tuning"])
def test_causal_token_type_ids_kept_where_peft_drops_them(tmp_path, name):
    """Kept on purpose: GPT-2 adds wte(token_type_ids) to its inputs, and here they reach it (the virtual tokens
    typed 0); peft 0.21.2's causal-LM prompt learning warns and drops them, so its logits are ours without them."""
    configs = {
        "prompt": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "prefix": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "p_tuning": peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=8),
    }
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_model("gpt2"), configs[name]).eval()
    theirs.save_pretrained(tmp_path)
    ours = dt.DeltaModel.from_pretrained(tiny_model("gpt2"), tmp_path).eval()
    inputs = tiny_inputs("gpt2")
    inputs["token_type_ids"] = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]])
    plain = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    with torch.no_grad():
        with pytest.warns(UserWarning, match="Token type ids are not supported"):
            dropped = theirs(**inputs).logits[:, -7:]
        assert (ours(**plain).logits - dropped).abs().max().item() == 0.0
        assert (ours(**inputs).logits - dropped).abs().max().item() > 0.1  # the types change GPT-2's inputs
        if name == "prompt":  # the base on [P; embeddings] with the virtual tokens typed 0 (typed 1: 0.002 off)
            base = tiny_model("gpt2").eval()
            prompt = next(p for n, p in ours.named_parameters() if p.requires_grad or "prompt" in n).detach()
            embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(inputs["input_ids"])], 1)
            ref = base(
                inputs_embeds=embeds,
                attention_mask=torch.cat([torch.ones(2, 3, dtype=torch.long), inputs["attention_mask"]], 1),
                token_type_ids=torch.cat([torch.zeros(2, 3, dtype=torch.long), inputs["token_type_ids"]], 1),
            )
            assert (ours(**inputs).logits[:, -7:] - ref.logits[:, 3:]).abs().max().item() < 1e-6
        generated = ours.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(generated, _tt_loop(ours, inputs))
