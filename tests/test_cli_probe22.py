"""Probe 22 of the command line: Ctrl-C while ``train --help`` imports, overrides with an empty key part or bytes
that are not UTF-8, an unknown short flag beside a missing command, ``deltatune data`` without its command."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import pytest

from deltatune.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_ctrl_c_while_train_help_builds_is_one_line_and_130(monkeypatch, capsys):
    """``train --help`` builds its epilog (importing torch and every method, seconds) before main's try: Ctrl-C there
    printed the traceback of wherever the import was and exited -2 (killed by SIGINT), not a shell's 130."""
    import deltatune.cli_parser as cli_parser

    def slow_import():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_parser, "_train_help", slow_import)
    try:
        with pytest.raises(SystemExit) as exc:
            main(["train", "--help"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C while the parser was built escaped main: a traceback, exit -2")
    assert exc.value.code == 130
    assert capsys.readouterr().err == "deltatune: interrupted\n"
    with pytest.raises(KeyboardInterrupt):  # --debug: the traceback, as for a command
        main(["--debug", "train", "--help"])


def test_ctrl_c_during_train_help_in_a_real_process():
    """The same through the installed entry point: a real SIGINT while ``deltatune train --help`` imports."""
    code = "import sys; from deltatune.cli import main; print('ready', file=sys.stderr, flush=True); sys.exit(main())"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "train", "--help"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stderr.readline() == "ready\n"  # (deltatune.cli imported: a loaded machine took over 0.6 s)
    time.sleep(0.2)  # (into the epilog's imports, which take seconds)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    if proc.returncode == 0:
        pytest.skip("the help was printed before the signal came (a fast machine)")
    assert (proc.returncode, err) == (130, "deltatune: interrupted\n")


@pytest.mark.parametrize(
    "override, says",
    [
        ("=1", "override '=1' names no key"),
        (".lr=1", "override '.lr=1' has an empty part in its key '.lr'"),
        ("train.=1", "override 'train.=1' has an empty part in its key 'train.'"),
        ("train..lr=1", "override 'train..lr=1' has an empty part in its key 'train..lr'"),
    ],
)
def test_an_override_with_an_empty_key_part_is_named(tmp_path, capsys, override, says):
    """They read "unknown key '' in r.yaml; valid keys: stage, method, ..." or "unknown key 'train.'" and every one
    of the section's 70 keys, naming the recipe file, which does not hold them."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stage: sft\n", encoding="utf-8")
    assert main(["train", str(recipe), override]) == 2
    assert capsys.readouterr().err == (
        f"deltatune train: error: {says}; write section.key=value (e.g. train.lr=1e-4)\n"
    )


def test_an_override_that_is_not_utf8_is_refused_before_anything_is_written(tmp_path, capsys):
    """``output.dir=$'run\\xff'`` (Python's argv keeps the byte as the surrogate \\udcff): the run folder was made,
    the tokenizer's save then raised UnicodeEncodeError (a traceback, exit 1) and the folder was left half-written.
    Refused in one line, with the byte shown, before the recipe is read; nothing is made."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stage: sft\n", encoding="utf-8")
    out = os.fsdecode(os.fsencode(str(tmp_path)) + b"/run\xff")
    assert "\udcff" in out  # (what sys.argv holds for the byte 0xff)
    for argv in (
        ["train", str(recipe), f"output.dir={out}"],
        ["eval", "--adapter", str(tmp_path), f"output.dir={out}"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err == (
            f"deltatune {argv[0]}: error: override 'output.dir={tmp_path}/run\\xff' is not UTF-8 text; a run's "
            "recipe is written as UTF-8 (run.yaml, the tokenizer's files)\n"
        )
    assert os.listdir(tmp_path) == ["r.yaml"]


def test_a_merge_out_that_is_not_utf8_is_refused_before_the_merge(tmp_path, capsys):
    """``merge --out $'merged\xff'`` merged, then the tokenizer's save raised UnicodeEncodeError (a traceback, exit
    1). Refused in one line before anything loads."""
    out = os.fsdecode(os.fsencode(str(tmp_path)) + b"/merged\xff")
    assert main(["merge", "--adapter", str(tmp_path), "--out", out]) == 2
    assert capsys.readouterr().err == (
        f"deltatune merge: error: --out '{tmp_path}/merged\\xff' is not UTF-8 text; the tokenizer saves only under "
        "UTF-8 paths\n"
    )
    assert os.listdir(tmp_path) == []


def test_an_unknown_short_flag_beside_a_missing_command_is_named(capsys):
    """``deltatune -x`` said only "the following arguments are required: command" (argparse refuses the missing
    command first); a long one near a flag was already named with its nearest (--verison: --version)."""
    assert _refused(["-x"], capsys) == (
        "deltatune: error: the following arguments are required: command; unrecognized arguments: -x"
    )
    assert _refused(["--verison"], capsys).endswith("unrecognized argument --verison: did you mean --version?")
    assert _refused(["data", "--foo"], capsys) == (
        "deltatune data: error: the following arguments are required: {inspect}; unrecognized arguments: --foo"
    )


def test_data_without_its_command_names_the_choices_not_a_variable(capsys):
    """``deltatune data`` said "the following arguments are required: data_command" (the parser's variable)."""
    assert _refused(["data"], capsys) == "deltatune data: error: the following arguments are required: {inspect}"


def test_parse_keeps_overrides_after_flags_and_names_unknown_flags(capsys):
    """What main did before parse moved to cli_parser (probe 22, cli.py at its line limit), kept as it was."""
    from deltatune.cli_parser import parse

    args = parse(["train", "r.yaml", "--overwrite", "train.lr=1e-3"])
    assert isinstance(args, argparse.Namespace)
    assert (args.recipe, args.overwrite, args.overrides) == ("r.yaml", True, ["train.lr=1e-3"])
    with pytest.raises(SystemExit):
        parse(["train", "r.yaml", "--overwite"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "deltatune train: error: unrecognized arguments: --overwite; did you mean --overwrite?"
    )


def test_an_unknown_key_from_an_override_is_named_as_the_overrides(tmp_path, capsys):
    """``train.lrr=1`` read "unknown key 'train.lrr' in r.yaml": the file holds no such key. HfArgumentParser names
    the arguments it did not use; here the override that gave the key is named, and a key of the file by the file."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stage: sft\ntrain: {lr: 1.0e-4}\n", encoding="utf-8")
    for override, says in (
        ("train.lrr=1", "unknown key 'train.lrr' in override 'train.lrr=1'; did you mean 'lr'?"),
        ("foo.bar=1", "unknown key 'foo' in override 'foo.bar=1'; valid keys: stage, method, model, data, train, "
         "align, output"),
        ("train.learning_rate=1", "unknown key 'train.learning_rate' in override 'train.learning_rate=1': "
         "learning_rate (TrainingArguments', SFTConfig's) is train.lr in a recipe"),
    ):  # fmt: skip
        assert main(["train", str(recipe), override]) == 2
        assert capsys.readouterr().err == f"deltatune train: error: {says}\n"
    recipe.write_text("stage: sft\ntrain: {lrr: 1.0e-4}\n", encoding="utf-8")
    assert main(["train", str(recipe), "train.lr=1"]) == 2
    assert (
        capsys.readouterr().err == f"deltatune train: error: unknown key 'train.lrr' in {recipe}; did you mean 'lr'?\n"
    )


@pytest.mark.parametrize(
    "text, says",
    [
        ("stage: sft\nyes: 2\n", "unknown key True in {recipe} (YAML read the key as the bool True); valid keys: "
         "stage, method, model, data, train, align, output"),
        ("stage: sft\ntrain:\n  1: 2\n", "unknown key 'train.1' in {recipe} (YAML read the key as the int 1); valid "
         "keys: epochs, max_steps,"),
    ],
)  # fmt: skip
def test_a_recipe_key_yaml_reads_as_a_number_or_bool_is_one_line(tmp_path, capsys, text, says):
    """YAML 1.1 reads the keys ``1:``, ``yes:``, ``on:`` as an int or a bool: difflib's nearest-key search raised
    "TypeError: 'int' object is not iterable" (a traceback, exit 1) where an unknown key is one line (exit 2)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text, encoding="utf-8")
    assert main(["train", str(recipe)]) == 2
    assert capsys.readouterr().err.startswith("deltatune train: error: " + says.format(recipe=recipe))
