"""The lead's mends in session 57 (probe 22), each shown failing on the file before."""

from __future__ import annotations

import builtins
import json
import warnings

import pytest

from deltatune.config import ConfigError
from tests.tiny import save_tiny


def _own_code_folder(tmp_path) -> str:
    """A tiny Llama folder whose config names code of its own (auto_map), as a hub model with custom code."""
    folder = save_tiny(tmp_path / "own")
    config = json.loads((tmp_path / "own" / "config.json").read_text())
    config.update(model_type="mymodel", auto_map={"AutoConfig": "cfg.MyConfig"})
    (tmp_path / "own" / "config.json").write_text(json.dumps(config))
    (tmp_path / "own" / "cfg.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass MyConfig(LlamaConfig):\n    model_type = 'mymodel'\n"
    )
    return folder


@pytest.fixture
def questions(monkeypatch):
    """What transformers asked on stdin (trust_remote_code left None asks "[y/N]" and waits 15 s)."""
    asked: list[str] = []
    monkeypatch.setattr(builtins, "input", lambda q="": asked.append(q) or "n")
    return asked


def test_caption_model_kind_of_a_remote_code_folder_asks_nothing(tmp_path, questions):
    from deltatune.train.caption import model_kind

    assert model_kind(_own_code_folder(tmp_path)) == "encoder-decoder"  # (unread: the model loader names the problem)
    assert questions == []


def test_info_of_a_remote_code_folder_is_one_line_without_asking(tmp_path, questions):
    from deltatune.info import describe

    with pytest.raises(ConfigError, match="custom code"):
        describe(_own_code_folder(tmp_path))
    assert questions == []


@pytest.mark.parametrize("method", [None, {}], ids=["absent", "empty"])
def test_a_method_override_on_a_recipe_without_a_method_section_trains_lora(method):
    """A recipe without a method trains LoRA (build's default, LLaMA-Factory's finetuning_type); ``method.r=16``
    read "method.name is missing" where the recipe names none; a file's own nameless ``method: {r: 4}`` is still
    refused (tests/train/test_config.py)."""
    from deltatune.train.config import apply_overrides, build

    raw = {"stage": "sft"} if method is None else {"stage": "sft", "method": method}
    cfg = build(apply_overrides(raw, ["method.r=16"]))
    assert cfg.method == {"name": "lora", "r": 16} and cfg.method_config().r == 16
    assert build(apply_overrides({}, ["method.name=ia3"])).method == {"name": "ia3"}


@pytest.mark.parametrize(
    "overrides, says",
    [(["train={lrr: 1}"], "override 'train={lrr: 1}'"), (["train={lr: 1}", "train.lrr=2"], "override 'train.lrr=2'")],
)
def test_an_unknown_key_in_a_section_an_override_set_whole_is_named_by_it(overrides, says):
    """An override that replaces a whole section is named for the keys under it (the recipe's file was named, which
    held the key no more); of two, the last that set it."""
    from deltatune.train.config import apply_overrides, build

    with pytest.raises(ConfigError, match=f"unknown key 'train.lrr' in {says}"):
        build(apply_overrides({"train": {"lrr": 1}}, overrides), where="r.yaml", overrides=overrides)


def test_an_abbreviated_flag_beside_a_missing_command_is_not_called_unrecognized(capsys):
    """``deltatune --de`` is argparse's ``--debug`` (``deltatune --de info`` parses): the missing command's line
    named it an unrecognized argument."""
    from deltatune.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--de"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "required: command" in err and "--de" not in err.split("required: command")[1]


def test_a_reward_model_of_its_own_code_untrusted_is_one_line_without_asking(tmp_path, questions):
    """PPO's TokenRewardModel on a folder of its own code, untrusted: transformers' multi-line ValueError (what
    check_token_reward leaves to this load since 5bd2ced); now load_model's one line, named align.reward_model."""
    from deltatune.train.scorers import TokenRewardModel

    folder = _own_code_folder(tmp_path)
    with pytest.raises(ConfigError, match=rf"^align.reward_model '{folder}' runs its own code \(auto_map in its"):
        TokenRewardModel(folder)
    assert questions == []


def test_print_healthcheck_of_an_in_place_adapter_beside_a_lora_names_its_layer_types():
    """An in-place adapter (BitFit) listed beside a LoRA has no layer types: print_healthcheck printed its name over a
    line of blanks; it says "none (trained in place)"."""
    import deltatune as dt
    from tests.tiny import tiny_model

    model = dt.get_delta_model(tiny_model("bert"), dt.LoraConfig(r=2, target_modules=["query"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (BitFit beside a LoRA: which biases each trains)
        model.add_adapter("bf", dt.BitFitConfig())
    model.set_adapter("bf")
    printed: list[str] = []
    model.print_healthcheck(sink=printed.append, indent="    ")
    lines = printed[0].splitlines()
    assert all(line.strip() for line in lines[lines.index("Layer types:") :])
    assert "        none (trained in place)" in lines
