"""The surface a new user touches first: recipe values and overrides read as written (YAML 1.1's traps), keys the
stage does not read named, ``--version``, and an unknown flag named by its command."""

from __future__ import annotations

from pathlib import Path

import pytest

import deltatune
from deltatune.cli import main
from deltatune.train.config import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def test_keys_the_stage_does_not_read_are_named():
    """data.packing on a cls run trained unpacked, output.samples on a ppo or cls run wrote no samples, an align key
    on a cls run (or dpo's loss_type on kto) changed nothing: each was accepted and silently ignored."""
    from deltatune.train.config import ignored_keys

    sst2 = RECIPES / "sst2-lora.yaml"
    cfg = load_recipe(str(sst2), ["data.packing=true", "output.samples=3", "align.beta=0.5", "model.num_labels=2"])
    assert ignored_keys(cfg) == [
        ("data.packing", "sft"),
        ("output.samples", "pt, sft, dpo, kto, orpo, simpo, cpo"),
        ("align.beta", "dpo, grpo, kto, orpo, simpo, cpo"),
    ]  # model.num_labels: cls reads it
    ppo = load_recipe(str(RECIPES / "ppo.yaml"), ["output.samples=2", "align.loss_type=ipo"])
    assert ignored_keys(ppo) == [
        ("output.samples", "pt, sft, dpo, kto, orpo, simpo, cpo"),
        ("align.loss_type", "dpo, kto, grpo, simpo, cpo"),
    ]
    kto = load_recipe(str(RECIPES / "kto.yaml"), ["align.precompute_ref=true", "align.simpo_gamma=1.0",
                                                   "align.loss_weights=[1.0,2.0]"])  # fmt: skip
    assert ignored_keys(kto) == [("align.loss_weights", "dpo"), ("align.simpo_gamma", "simpo, cpo")]
    # PPO's and GRPO's own loops run no checkpointed forward: the memory asked for was not saved, silently
    grpo = load_recipe(str(RECIPES / "grpo-arithmetic.yaml"), ["model.gradient_checkpointing=true"])
    assert ignored_keys(grpo) == [
        (
            "model.gradient_checkpointing",
            "pt, sft, cls, tag, seq2seq, rm, dpo, kto, orpo, simpo, cpo, image_cls, caption, t2i",
        )
    ]
    # A key set to its default, or read by the stage, is not named; no shipped recipe sets a key its stage ignores.
    assert ignored_keys(load_recipe(str(sst2), ["data.packing=false", "align.beta=0.1"])) == []
    for path in sorted(RECIPES.glob("*.yaml")):
        assert ignored_keys(load_recipe(str(path))) == [], path.name


def test_train_prints_one_note_per_ignored_key(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(RECIPES.parent)
    rc = main(["train", "recipes/sst2-lora.yaml", "data.packing=true", f"data.train={tmp_path / 'none.jsonl'}",
               f"output.dir={tmp_path / 'run'}"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[0] == "deltatune train: note: data.packing is read by stage sft only; stage cls ignores it"
    assert err[1].startswith("deltatune train: error: data file") and len(err) == 2


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"deltatune {deltatune.__version__}"


def test_an_override_text_is_kept_as_typed():
    """YAML reads ' #' as the start of a comment: output.dir='runs/exp #2' trained into (and with --overwrite
    replaced) runs/exp, and data.train='my data #1.jsonl' read my data; quoted values and numbers read as before."""
    cfg = load_recipe(
        str(RECIPES / "sst2-lora.yaml"),
        [
            "output.dir=/tmp/my runs #2",
            "data.train=d #1.jsonl",
            "data.eval='e #1.jsonl'",
            "train.lr=1e-3 ",
            "stage=cls",
        ],
    )
    assert cfg.output.dir == "/tmp/my runs #2" and cfg.data.train == "d #1.jsonl" and cfg.data.eval == "e #1.jsonl"
    assert cfg.train.lr == 1e-3 and cfg.stage == "cls"
    # A quoted number is text where the key takes text (it was made 1000.0 and refused), a number where a number.
    cfg = load_recipe(
        str(RECIPES / "sst2-lora.yaml"), ["data.text_column='1e3'", "data.labels='1e3'", "train.lr='2e-3'"]
    )
    assert cfg.data.text_column == "1e3" and cfg.data.labels == ["1e3"] and cfg.train.lr == 2e-3


def test_an_exponent_without_a_dot_is_a_number_in_every_section(tmp_path):
    """PyYAML reads 1e3 as the text '1e3': train and align took it as the number, data.limit: 1e3 was refused as
    "must be int or null, got '1e3'"; a quoted text stays text where a key takes text."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "stage: sft\ndata: {limit: 1e3, max_length: 2.56e+2, text_column: '1e3'}\n"
        "train: {lr: 5e-4, max_steps: 1e2}\noutput: {samples: 2e0}\n"
    )
    cfg = load_recipe(str(recipe))
    assert cfg.data.limit == 1000 and type(cfg.data.limit) is int and cfg.data.max_length == 256
    assert cfg.data.text_column == "1e3" and cfg.output.samples == 2 and type(cfg.output.samples) is int
    assert cfg.train.lr == 5e-4 and cfg.train.max_steps == 100 and type(cfg.train.max_steps) is int


@pytest.mark.parametrize(
    ("argv", "said"),
    [(["train", "r.yaml", "--overwite"], "deltatune train: error: unrecognized arguments: --overwite; did you mean "
      "--overwrite?"),
     (["data", "inspect", "f.jsonl", "--max-lenght", "3"], "deltatune data inspect: error: unrecognized arguments: "
      "--max-lenght 3; did you mean --max-length?"),
     (["info", "minilm", "extra"], "deltatune info: error: unrecognized arguments: extra")],
)  # fmt: skip
def test_an_unknown_flag_is_named_by_its_command_with_the_nearest_flag(argv, said, capsys):
    """It was 'deltatune: error: unrecognized arguments: --overwite' under the top-level usage."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1] == said


def test_a_number_yaml_reads_in_another_base_is_refused_naming_it(tmp_path):
    """YAML 1.1 reads a plain 0042 as octal (seed: 0042 trained with seed 34, in a recipe or as train.seed=0042) and
    1:30 as base-60 90, silently; quoted, or without the leading 0, it is the number it shows. 07 and 0:30 read as
    written (and stay accepted)."""
    from deltatune.config import ConfigError

    recipe = tmp_path / "r.yaml"
    recipe.write_text("stage: cls\ntrain: {seed: 0042}\n")
    with pytest.raises(ConfigError, match=r"^.*r\.yaml:2: 0042 reads as the octal number 34 in YAML 1\.1; write it "):
        load_recipe(str(recipe))
    recipe.write_text("stage: cls\ndata: {labels: [a, b]}\ntrain: {save_steps: 1:30}\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:3: 1:30 reads as the base-60 number 90 in YAML 1\.1; quote it$"):
        load_recipe(str(recipe))
    with pytest.raises(ConfigError, match=r"^override 'train.seed=010': 010 reads as the octal number 8 in YAML 1\.1"):
        load_recipe(str(RECIPES / "sst2-lora.yaml"), ["train.seed=010"])
    recipe.write_text("stage: cls\ntrain: {seed: '0042', save_steps: 07}\ndata: {train: '1:30'}\n")
    cfg = load_recipe(str(recipe), ["data.eval=0:30", "train.max_steps=9"])
    assert (cfg.train.seed, cfg.train.save_steps, cfg.data.train, cfg.data.eval) == (42, 7, "1:30", "0:30")
    assert cfg.train.max_steps == 9


def test_the_reward_centring_coefficient_is_a_recipe_key_the_rm_trainer_gets(monkeypatch):
    """TRL's RewardTrainer takes center_rewards_coefficient; the recipe key reaches deltatune's, is refused below 0
    and is named as ignored outside stage rm."""
    from deltatune.config import ConfigError
    from deltatune.train import reward
    from deltatune.train.config import ignored_keys

    rm = RECIPES / "hh-rlhf-rm.yaml"
    cfg = load_recipe(str(rm), ["align.center_rewards_coefficient=0.01"])
    split = type("Split", (), {"examples": []})()  # no data read: the test is about the key's way to the trainer
    monkeypatch.setattr(reward, "encode_pair_splits", lambda *a, **k: (split, None, []))
    monkeypatch.setattr(reward, "_margins", lambda *a: None)
    monkeypatch.setattr(reward, "_base_config", lambda *a: None)
    tok = type("Tok", (), {"pad_token_id": 0})()
    keywords = reward.prepare_rm(cfg, tok).trainer_class.keywords
    assert keywords == {"center_rewards_coefficient": 0.01, "disable_dropout": True}  # (TRL's RewardConfig default)
    assert ignored_keys(cfg) == []
    with pytest.raises(ConfigError, match="align.center_rewards_coefficient must be >= 0"):
        load_recipe(str(rm), ["align.center_rewards_coefficient=-1"])
    dpo = load_recipe(str(RECIPES / "hh-rlhf-dpo.yaml"), ["align.center_rewards_coefficient=0.01"])
    assert ignored_keys(dpo) == [("align.center_rewards_coefficient", "rm")]


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_an_empty_recipe_is_the_defaults(tmp_path, text):
    """An empty or comment-only recipe has no YAML node: the trap check read None (AttributeError)."""
    path = tmp_path / "r.yaml"
    path.write_text(text)
    from deltatune.train import build

    assert load_recipe(str(path)) == build({})
