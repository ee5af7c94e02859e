"""Review findings of probe 14 fixed by the lead: resume-harmless Trainer keys, a missing absolute model path, an
adapter config that is not UTF-8, a resumed preference run's paired metrics."""

from __future__ import annotations

import os

import pytest
import torch

from deltatune.config import ConfigError


@pytest.mark.parametrize("key, value", [("logging_first_step", True), ("eval_accumulation_steps", 4)])
def test_trainer_keys_that_change_no_training_are_harmless_on_resume(key, value):
    """train.logging_first_step and train.eval_accumulation_steps (recipe keys since 5847216) change what is logged
    or how evaluation batches are gathered, not the training: --resume takes them as logging_steps (it refused)."""
    from deltatune.train.runfolder import recipe_changes

    old = {"stage": "sft", "train": {"lr": 1e-3}}
    assert recipe_changes(old, {"stage": "sft", "train": {"lr": 1e-3, key: value}}) == []
    assert recipe_changes(old, {"stage": "sft", "train": {"lr": 2e-3, key: value}}) != []


def test_a_missing_absolute_model_path_is_named_a_missing_folder_not_a_hub_id(tmp_path):
    from deltatune.train.models import not_loaded

    gone = str(tmp_path / "gone")
    assert str(not_loaded(gone, OSError("x"))) == f"model {gone!r}: no such folder"
    assert "the hub could not provide it" in str(not_loaded("org/name", OSError("x")))


def test_an_adapter_config_that_is_not_utf8_is_one_line(tmp_path):
    from deltatune.config import read_config_file

    (tmp_path / "adapter_config.json").write_bytes(b'{"peft_type": "LORA\xff"}')
    with pytest.raises(
        ConfigError, match=r"adapter_config.json is not UTF-8 text \(byte 19\); an adapter config is JSON$"
    ):
        read_config_file(str(tmp_path))
    assert os.listdir(tmp_path) == ["adapter_config.json"]


def test_a_resumed_preference_run_pairs_its_evaluations_with_its_starts_scores(tmp_path, monkeypatch):
    """rm with eval_on_start: every later evaluation reports gained / lost / paired_p against the start's scores.
    Those were kept in memory only, so a --resume'd run's evaluations lacked them, and metric_for_best_model:
    paired_p (accepted up front since efccf61) failed at its first evaluation after the resume (review J). The
    scores are kept in the run folder now: the resumed run's last evaluation equals an uninterrupted run's."""
    import json
    import random

    from tiny import WORDS, save_tiny

    import deltatune.train.trainer as T
    from deltatune.train import build, train

    bert = save_tiny(tmp_path / "bert", "bert", "seq_cls", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.choices(WORDS, k=3)), "chosen": " ".join(rng.choices(WORDS, k=4)) + " good",
             "rejected": " ".join(rng.choices(WORDS, k=5))} for _ in range(24)]  # fmt: skip
    for name, part in (("t", rows[:16]), ("e", rows[16:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))

    def recipe(out: str) -> dict:
        return {"stage": "rm", "model": {"name_or_path": bert},
                "method": {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
                "data": {"train": str(tmp_path / "t.jsonl"), "eval": str(tmp_path / "e.jsonl"), "max_length": 24},
                "train": {"batch_size": 4, "lr": 5e-3, "seed": 0, "max_steps": 4, "eval_steps": 2, "save_steps": 2,
                          "eval_on_start": True, "load_best_model_at_end": True, "metric_for_best_model": "paired_p",
                          "greater_is_better": False, "report_to": ["none"]},
                "output": {"dir": str(tmp_path / out)}}  # fmt: skip

    whole = train(build(recipe("whole")))
    step = T.DeltaTrainer.training_step

    def stop_after_2(self, *a, **k):
        if self.state.global_step == 2:
            raise KeyboardInterrupt
        return step(self, *a, **k)

    monkeypatch.setattr(T.DeltaTrainer, "training_step", stop_after_2)
    with pytest.raises(KeyboardInterrupt):
        train(build(recipe("cut")))
    monkeypatch.setattr(T.DeltaTrainer, "training_step", step)
    resumed = train(build(recipe("cut")), resume=True)
    assert "eval_paired_p" in whole
    for key in ("eval_gained", "eval_lost", "eval_paired_p", "eval_loss"):
        assert resumed[key] == pytest.approx(whole[key], abs=1e-6), key


@pytest.mark.parametrize("sequence", ["disable merge enable", "merge disable enable", "disable merge fwd enable",
                                      "merge disable fwd enable", "disable merge", "merge disable", "merge disable fwd"])  # fmt: skip
def test_merging_while_disabled_computes_as_peft_at_every_step(sequence):
    """peft's merged layer that is disabled unmerges itself at its next forward, not before: enabled again before
    one, it computes merged (every merged adapter, active or not). acebc4f left disabled layers unmerged (0.279 off
    peft after disable, merge a+b, enable), and disabling unmerged at once (0.279 off after merge a+b, disable,
    enable; review K)."""
    import peft
    from tiny import tiny_inputs, tiny_model

    import deltatune as dt

    lora = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**lora), adapter_name="a")
    ours = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(**lora), adapter_name="a")
    theirs.add_adapter("b", peft.LoraConfig(**lora))
    ours.add_adapter("b", dt.LoraConfig(**lora))
    for name in ("a", "b"):
        dt.set_peft_model_state_dict(
            ours, peft.get_peft_model_state_dict(theirs, adapter_name=name), adapter_name=name
        )
    theirs.eval(), ours.eval()
    x = tiny_inputs("llama")["input_ids"]
    for model in (ours, theirs):
        model.set_adapter("a")
    assert (ours(input_ids=x).logits - theirs(input_ids=x).logits).abs().max() < 1e-6
    for step in sequence.split():
        for model in (ours, theirs):
            if step == "merge":
                model.merge_adapter(["a", "b"])
            elif step == "fwd":
                model(input_ids=x)
            else:
                getattr(model, f"{step}_adapter_layers")()
    got, want = ours(input_ids=x).logits, theirs(input_ids=x).logits  # (a forward after each step would unmerge)
    assert (got - want).abs().max() < 1e-5
    weights = [
        (n.replace("base_layer.", ""), p) for n, p in theirs.get_base_model().named_parameters() if "lora" not in n
    ]
    ours_w = dict((n.replace("base_layer.", ""), p) for n, p in ours.get_base_model().named_parameters())
    assert max((p - ours_w[n]).abs().max().item() for n, p in weights) < 1e-6  # the base weights too
    assert [m.merged_adapters for m in ours.modules() if hasattr(m, "merged_adapters")] == [
        m.merged_adapters for m in theirs.modules() if hasattr(m, "merged_adapters") and hasattr(m, "lora_A")
    ]


@pytest.fixture(scope="module")
def val_size_run(tmp_path_factory):
    """A cls run whose eval set is data.val_size of its train file (no data.eval), with drop_last and
    eval_accumulation_steps, and what its training's last evaluation said."""
    import json

    from tiny import save_tiny

    from deltatune.train import build, train

    tmp = tmp_path_factory.mktemp("vs")
    bert = save_tiny(tmp / "bert", "bert", "seq_cls", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    words = ["fine", "great", "warm", "dull", "grim", "cold", "kind", "flat"]
    rows = [{"text": f"a {w} film {i}", "label": int(w in ("dull", "grim", "cold", "flat"))}
            for i, w in enumerate(words * 2)]  # fmt: skip
    (tmp / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"stage": "cls", "model": {"name_or_path": bert},
              "method": {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
              "data": {"train": str(tmp / "t.jsonl"), "val_size": 6, "max_length": 16},
              "train": {"batch_size": 4, "eval_batch_size": 4, "max_steps": 2, "lr": 1e-2, "seed": 3,
                        "report_to": ["none"], "dataloader_drop_last": True, "eval_accumulation_steps": 2},
              "output": {"dir": str(tmp / "run")}}  # fmt: skip
    return tmp, train(build(recipe))


def test_deltatune_eval_of_a_val_size_run_scores_its_held_out_rows(val_size_run):
    """`deltatune eval` of a data.val_size run (no data.eval) refused 'data.train is not set' (review I); it holds
    the same rows out with the run's seed and scores them as the run's last evaluation did."""
    from deltatune.train.evaluation import evaluate

    tmp, trained = val_size_run
    again = evaluate(str(tmp / "run"))
    assert again["eval_loss"] == pytest.approx(trained["eval_loss"], abs=1e-6)
    assert again["eval_accuracy"] == trained["eval_accuracy"]


def test_eval_of_a_drop_last_run_on_fewer_rows_than_a_batch_is_one_line(val_size_run):
    """A dataloader_drop_last run evaluated on 2 rows with eval batches of 4 scored nothing and printed {} (review J)."""
    from deltatune.train.evaluation import evaluate

    tmp, _ = val_size_run
    (tmp / "two.jsonl").write_text('{"text": "a fine film", "label": 0}\n{"text": "a dull film", "label": 1}\n')
    with pytest.raises(ConfigError, match=r"drops an evaluation's last partial batch, and the 2 rows to score are "
                       r"fewer than one batch of 4 \(train.eval_batch_size\)"):  # fmt: skip
        evaluate(str(tmp / "run"), str(tmp / "two.jsonl"))


def test_eval_passes_the_runs_eval_accumulation_steps_to_the_trainer(val_size_run, monkeypatch):
    """(review J: the cls metrics are equal either way, so nothing showed whether `deltatune eval` passed it)"""
    import transformers

    from deltatune.train.evaluation import evaluate

    seen = []

    class Spy(transformers.TrainingArguments):
        def __post_init__(self):
            super().__post_init__()
            seen.append((self.eval_accumulation_steps, self.dataloader_drop_last))

    monkeypatch.setattr(transformers, "TrainingArguments", Spy)
    tmp, _ = val_size_run
    evaluate(str(tmp / "run"))
    assert seen == [(2, True)]


def test_load_peft_weights_names_the_subfolder_it_looked_in(tmp_path):
    import deltatune as dt

    with pytest.raises(FileNotFoundError, match=r"^no adapter_model.safetensors \(or adapter_model.bin\) at '.*/zz'$"):
        dt.load_peft_weights(str(tmp_path), subfolder="zz")


def test_add_weighted_adapter_weights_that_are_not_numbers_are_one_line():
    """A string weight failed deep in torch ("new(): invalid data type 'str'"); a bool is no weight either."""
    from tiny import tiny_model

    import deltatune as dt

    model = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="a")
    model.add_adapter("b", dt.LoraConfig(r=2, target_modules=["q_proj"]))
    for bad in (["1", 0.5], [True, 0.5]):
        with pytest.raises(TypeError, match=r"^add_weighted_adapter: weights must be numbers, one per adapter, got "):
            model.add_weighted_adapter(["a", "b"], bad, "ab")
        assert "ab" not in model.peft_config


def test_a_model_card_with_bad_yaml_metadata_is_one_line_and_left_as_it_is(tmp_path):
    """(review K: huggingface_hub's 8-line ParserError, no file named; peft's is the same)"""
    from tiny import tiny_model

    import deltatune as dt

    model = dt.get_delta_model(tiny_model("llama"), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    text = "---\nlicense: [mit\n---\n# card\n"
    (tmp_path / "README.md").write_text(text)
    with pytest.raises(ValueError, match=r"README.md:\d+: the model card's metadata \(its --- block\) is not valid"):
        model.create_or_update_model_card(str(tmp_path))
    assert (tmp_path / "README.md").read_text() == text


def test_a_model_with_a_pending_unmerge_pickles():
    """The lazy unmerge's hook was a local function: pickle / torch.save of a merged model after
    disable_adapter_layers failed (review N); peft's pickles."""
    import pickle

    from tiny import tiny_inputs, tiny_model

    import deltatune as dt

    model = dt.get_delta_model(
        tiny_model("llama"), dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    x = tiny_inputs("llama")["input_ids"]
    with torch.no_grad(), model.disable_adapter():
        want = model(input_ids=x).logits
    model.merge_adapter()
    model.disable_adapter_layers()
    again = pickle.loads(pickle.dumps(model))  # (before the hook fires)
    with torch.no_grad():
        for m in (again, model):
            assert (m(input_ids=x).logits - want).abs().max() < 1e-5


def test_bool_labels_under_named_classes_are_ids_again_and_huge_negative_ids_are_refused():
    """2aa0fed read a bool only as its text: a bool column with data.labels [neg, pos] (True: pos, as before it)
    became 'not in the label set'; and with negative labels allowed, the id-or-score guard looked at the largest
    value only, so a column of -4e9 passed (review N)."""
    from deltatune.data.load import DataError, Row
    from deltatune.data.tasks import class_of, label_map

    rows = [Row({"y": v}, f"f.jsonl:{i + 1}") for i, v in enumerate([True, False, True])]
    named = label_map(rows, "y", ["neg", "pos"])
    assert [class_of(r.get("y"), named) for r in rows] == [1, 0, 1]
    mixed = [Row({"y": v}, f"f.jsonl:{i + 1}") for i, v in enumerate([0, 1, True])]
    seen = label_map(mixed, "y", None)
    assert [class_of(r.get("y"), seen) for r in mixed] == [0, 1, 2]  # "True" a class of its own, as 2aa0fed made it
    huge = [Row({"y": v}, f"f.jsonl:{i + 1}") for i, v in enumerate([-4_000_000_000, 1])]
    with pytest.raises(DataError, match=r"^f.jsonl:1: label -4000000000 in column 'y' would be class id "):
        label_map(huge, "y", None)


def test_cls_ids_the_train_rows_lack_but_the_eval_file_has_are_classes(tmp_path):
    """recipes/trec-lora.yaml under a data.limit: train held ids {0,1,2,3,5}, the eval file a 4, refused 'not in the
    label set' once whole numbers became the sorted values seen (718ab0b; CI). Ids are read from both files, as the
    tag stage reads its tags; names in eval only stay refused (tests/test_stages_probe14.py)."""
    import json

    from tiny import tokenizer

    from deltatune.train import build
    from deltatune.train.cls import prepare_cls

    for name, labels in (("t", [0, 1, 3, 5, 0]), ("e", [4, 1])):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": f"q {y}", "label": y}) + "\n" for y in labels)
        )
    data = {"train": str(tmp_path / "t.jsonl"), "eval": str(tmp_path / "e.jsonl"), "max_length": 8}
    p = prepare_cls(build({"stage": "cls", "data": data}), tokenizer())
    assert p.labels == ["0", "1", "3", "4", "5"]
    assert [ex["labels"] for ex in p.eval] == [3, 1] and [ex["labels"] for ex in p.train] == [0, 1, 2, 4, 0]
