"""Session 58's lead probes: the mends of probe 23's reviews (board, PPO, caption, towers, LoRA), each failing before."""

from __future__ import annotations

import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(__file__))

from test_board_probe11 import write_run  # noqa: E402

from deltatune.board import runs  # noqa: E402


def _went_back() -> list[dict]:
    rows = [{"loss": 10.0 - s, "step": s} for s in range(1, 11)]
    return rows + [{"loss": 20.0 + s, "step": s} for s in (6, 7, 8)]


def test_a_log_that_went_back_is_purged_once_while_it_does_not_change(tmp_path, monkeypatch):
    """The run's page polls each second; a log that went back in steps was purged again at every poll (0.56 s on a
    200,000-row log). Now the purged rows are kept while the log's rows are the very rows purged before; a line
    appended, or the log rewritten, purges again."""
    run = write_run(tmp_path, "r", _went_back())
    calls = []
    real = runs.purged
    monkeypatch.setattr(runs, "purged", lambda rows: calls.append(len(rows)) or real(rows))
    first = runs.detail(str(tmp_path), "r", points=0)
    second = runs.detail(str(tmp_path), "r", points=0)
    assert calls == [13] and second["history"] == first["history"]
    assert [h["step"] for h in first["history"]] == [1, 2, 3, 4, 5, 6, 7, 8]
    with open(run / "log_history.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"loss": 0.5, "step": 7}) + "\n")  # back again: the new row counts
    third = runs.detail(str(tmp_path), "r", points=0)
    assert calls == [13, 14] and [(h["step"], h["loss"]) for h in third["history"]][-2:] == [(6, 26.0), (7, 0.5)]
    (run / "log_history.jsonl").write_text(json.dumps({"loss": 9.0, "step": 1}) + "\n", encoding="utf-8")
    assert [h["loss"] for h in runs.detail(str(tmp_path), "r", points=0)["history"]] == [9.0]


def test_a_log_that_begins_with_a_bom_keeps_its_first_row(tmp_path):
    """A log another tool wrote with a UTF-8 BOM lost its first row (json's "Unexpected UTF-8 BOM")."""
    run = write_run(tmp_path, "r")
    rows = [{"loss": 2.0, "step": 1}, {"loss": 1.0, "step": 2}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (run / "log_history.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert runs.history(str(run)) == rows
    (run / "log_history.jsonl").write_bytes(b"\xef\xbb\xbf" + text.splitlines()[0].encode() + b"\n")
    assert runs._last_step(str(run)) == 1  # (the listing's step, read from the log's end: 0 before)


def test_lora_layers_to_transform_as_a_tuple_adapts_the_blocks_peft_adapts():
    """peft takes ``layers_to_transform=(0, 2)`` and adapts blocks 0 and 2; deltatune refused it ("must be a block
    index or a list of them"). It is stored as a list, as its JSON file writes it (freeze probe 23's diff)."""
    import copy

    import pytest

    import deltatune as dt
    from deltatune.layer import DeltaLayer
    from tests.tiny import tiny_model

    peft = pytest.importorskip("peft")
    base = tiny_model("llama", num_hidden_layers=3)
    kw = dict(r=2, target_modules=["q_proj"], layers_to_transform=(0, 2))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    ours = dt.get_delta_model(copy.deepcopy(base), dt.LoraConfig(**kw))
    want = sorted(
        n.removeprefix("base_model.model.")
        for n, m in theirs.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    )
    assert len(want) == 2
    assert sorted(n.removeprefix("base_model.") for n, m in ours.named_modules() if isinstance(m, DeltaLayer)) == want
    assert ours.peft_config["default"].layers_to_transform == [0, 2]
    from deltatune.config import ConfigError

    for odd in ((), (True,)):  # (peft: () adapts no block, where [] is every block; (True,) block 1): named as written
        with pytest.raises(ConfigError, match=rf"layers_to_transform must be .*, got {re.escape(repr(odd))}$"):
            dt.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=odd)


def test_data_inspect_of_ppo_prompts_refuses_a_template_the_tokenizer_cannot_write_as_training_does(tmp_path):
    """``data inspect --stage ppo --template chatml`` on a word vocabulary counted the rendered [UNK]s without a
    word, where the PPO run refuses them (1aa48c7) and ``--stage sft`` refuses them (review of probe 23)."""
    import pytest
    from tiny import word_tokenizer

    from deltatune.data.inspect import inspect
    from deltatune.data.load import DataError

    word_tokenizer().save_pretrained(tmp_path / "tok")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "w0 w1 w2"}) + "\n", encoding="utf-8")
    for template in ("chatml", "alpaca"):
        with pytest.raises(DataError, match=rf"^data.template={template}: the tokenizer has no tokens for"):
            inspect(str(tmp_path / "p.jsonl"), str(tmp_path / "tok"), stage="ppo", template=template, show=1)
    assert "prompts longer than" in inspect(str(tmp_path / "p.jsonl"), str(tmp_path / "tok"), stage="ppo", show=1)


def test_the_start_key_of_weights_loaded_as_the_defaults_is_the_defaults_key():
    """``model.quantization: {}`` loads no quantization and ``model.dtype: auto`` the dtype it resolves to: their
    start key was another than the run of the same weights' (a resume sampled its start evaluation again)."""
    from test_ppo_probe23 import _key

    from deltatune.train.models import resolved_dtype

    assert _key(quantization={}) == _key()
    assert (
        _key(dtype="auto")
        == _key(dtype=resolved_dtype("auto"))
        == (_key() if resolved_dtype("auto") == "float32" else _key(dtype="bfloat16"))
    )


def test_llama4s_patch_tokens_are_image_tokens():
    """Llama4Processor writes one <|image|> (its image_token_id) and <|patch|> x N per image; the model puts the image
    features at its config's image_token_id, the <|patch|> id (200092 beside <|image|>'s 200090 in Meta's
    tokenizer), so the load check (27e145f) refused every real Llama 4 and its patches counted as text toward
    data.max_length (review of probe 23: a stubbed Llama4Processor, torchvision being absent here)."""
    from tiny import word_tokenizer

    from deltatune.train.caption_batch import VLMProcessor

    tok = word_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|image|>", "<|patch|>"]})
    image, patch = tok.convert_tokens_to_ids(["<|image|>", "<|patch|>"])

    class Llama4Like:  # (the attributes transformers' Llama4Processor sets)
        def __init__(self):
            self.tokenizer, self.image_processor = tok, object()
            self.image_token, self.image_token_id, self.img_patch_token = "<|image|>", image, "<|patch|>"
            self.image_token_ids = [image]

        def __call__(self, text=None, images=None):
            raise AssertionError("not called")

    assert VLMProcessor(Llama4Like()).image_ids == {image, patch}


def _glm4v():
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    vision = dict(depth=1, hidden_size=32, num_heads=4, intermediate_size=37, out_hidden_size=32, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2)  # fmt: skip
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, vocab_size=64)  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(
        AutoConfig.for_model("glm4v", vision_config=vision, text_config=text)
    )


def test_a_run_begun_before_its_model_type_had_towers_resumes_as_it_trained(tmp_path):
    """GLM-4V (and the other types given towers in session 58) adapted every tower before: such a run's --resume
    failed on its checkpoint's vision-tower tensors ("does not belong to any module of this model"), or a target list
    reaching the vision tower was refused. Its checkpoint's targets tell it: it goes on untowered, as it trained; a
    run begun with the towers resumes with them (review of 4ae336a)."""
    import deltatune as dt
    from deltatune import towers

    asked = dt.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear")
    old = dt.get_delta_model(_glm4v(), asked)  # (as start_model built it before: no towers for glm4v)
    old.save_pretrained(str(tmp_path / "old"))
    model = _glm4v()
    assert towers.resolve(model, asked, None, towers.saved_config(str(tmp_path / "old"))) is asked
    assert towers.counts(dt.get_delta_model(_glm4v(), asked)) == {"language": 6, "projector": 4, "vision": 5}
    config = towers.resolve(model, asked, None, None)  # a new run: the language tower alone
    new = dt.get_delta_model(_glm4v(), config)
    assert towers.counts(new) == {"language": 6}
    new.save_pretrained(str(tmp_path / "new"))
    again = towers.resolve(_glm4v(), asked, None, towers.saved_config(str(tmp_path / "new")))
    assert again is not asked and again.target_modules == config.target_modules
    reaching = dt.LoraConfig(r=2, target_modules=["proj", "q_proj"])  # (vision's attn.proj: refused for a new run)
    dt.get_delta_model(_glm4v(), reaching).save_pretrained(str(tmp_path / "list"))
    import pytest

    from deltatune.config import ConfigError

    with pytest.raises(ConfigError):
        towers.resolve(_glm4v(), reaching, None, None)
    assert towers.resolve(_glm4v(), reaching, None, towers.saved_config(str(tmp_path / "list"))) is reaching


def test_a_0d_token_delta_is_one_line_and_a_keyless_empty_dict_is_refused():
    """446ca49 skipped a zero-row trainable_tokens_delta by len(): a 0-d tensor of that name raised TypeError ("len()
    of a 0-d tensor") instead of the file's one line; {"": []} read as none where its key names no module (review)."""
    import pytest
    import torch

    import deltatune as dt
    from deltatune.files import AdapterLoadError, match_tensors

    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    with pytest.raises(AdapterLoadError, match="does not belong to any module"):
        match_tensors({key: torch.tensor(1.0)}, {}, {}, "f.safetensors")
    assert match_tensors({key: torch.zeros(0, 4)}, {}, {}, "f.safetensors") == {}
    for spec in ({"": []}, {1: []}):
        with pytest.raises(dt.ConfigError):
            dt.LoraConfig(trainable_token_indices=spec)


def test_an_ia3_or_bottleneck_file_loads_beside_a_pissa_lora_and_set_adapter_in_a_disabled_block_holds(tmp_path):
    """e7855d6 refused a new (IA)^3 / bottleneck adapter beside a PiSSA residual, and refused loading such a FILE too
    (peft loads it; a pair trained before could no longer load); 06ba7b9's disable_adapter block put back the flags
    of before it, so a set_adapter inside it left the old adapter trainable, the new one frozen (peft: the active
    one trains) (review)."""
    import copy

    import pytest

    import deltatune as dt
    from tests.tiny import tiny_model

    base = tiny_model("llama")
    pissa = dt.get_delta_model(
        copy.deepcopy(base), dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa")
    )
    pissa.save_pretrained(str(tmp_path / "pissa"))
    for name, config in (("ia3", dt.IA3Config(target_modules=["k_proj"])), ("bn", dt.BottleneckConfig())):
        dt.get_delta_model(copy.deepcopy(base), config).save_pretrained(str(tmp_path / name))
        model = dt.DeltaModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "pissa"))
        with pytest.raises(dt.ConfigError, match="initialised from the base"):  # (a new one: refused, as before)
            model.add_adapter("new", config)
        model.load_adapter(str(tmp_path / name), adapter_name=name)
        assert name in model.peft_config
    model = dt.get_delta_model(copy.deepcopy(base), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("y", dt.LoraConfig(r=2, target_modules=["q_proj"]))
    with model.disable_adapter():
        model.set_adapter("y")
    trains = {n: any(p.requires_grad for k, p in model.named_parameters() if f".{n}." in k) for n in ("default", "y")}
    assert trains == {"default": False, "y": True}
