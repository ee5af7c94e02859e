"""Probe 18 of the command line, ``info`` and ``data inspect``: the pre-training figures checked against what
``encode_pt`` trains on, and a pipe closed by its reader (``deltatune data inspect F | head``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from tiny import save_tiny

from deltatune.data.inspect import inspect
from deltatune.data.load import read_rows
from deltatune.data.tasks import encode_pt

TEXTS = ["the cat sat on the mat", "a dog ran", "big red house"]


def test_inspect_pt_counts_the_eos_closing_each_row_and_the_blocks_training_makes(tmp_path):
    """``encode_pt`` closes every row with the EOS before it cuts blocks; inspect's "N tokens in all" was the texts'
    tokens alone (12 here, training's stream 15), so its blocks could not be worked out from it. Now the stream's
    count, the blocks and the remainder dropped, each as training makes them."""
    from transformers import AutoTokenizer

    model = save_tiny(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(model)
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    texts = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS)
    stream = texts + len(TEXTS)  # one EOS after each row
    assert (texts, stream) == (12, 15)  # hand count: 6 + 3 + 3 words, each one WordPiece token
    for size in (4, 5, 16):
        out = inspect(str(data), model, max_length=size)
        blocks = len(encode_pt(read_rows(str(data)), tok, "text", size).examples) if stream >= size else 0
        line = next(x for x in out.splitlines() if x.startswith("rows are joined"))
        assert f"{stream} tokens in all (an EOS closing each of the 3 rows)" in line, line
        if blocks:
            assert f", {blocks} blocks" in line, line
            left = stream - blocks * size
            assert (f"the last {left} tokens (short of a block) dropped" in line) is bool(left), line
        else:
            assert "fewer than one block: training refuses the file" in line, line
    assert [blocks_of(inspect(str(data), model, max_length=s)) for s in (4, 5)] == [3, 3]


def blocks_of(report: str) -> int:
    return int(re.search(r", (\d+) blocks", report)[1])


def test_output_piped_into_head_ends_quietly(tmp_path):
    """``deltatune data inspect F --rows 3000 | head -1`` printed "deltatune data: error: [Errno 32] Broken pipe" and
    exited 2 (a usage error). A reader that closes the pipe has what it wanted: nothing on stderr, 141 (128 +
    SIGPIPE, what a shell shows for ``yes | head``), and no "Exception ignored" from the interpreter's last flush."""
    data = tmp_path / "big.jsonl"
    data.write_text("".join(json.dumps({"text": "word " * 50}) + "\n" for _ in range(3000)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "deltatune.cli", "data", "inspect", str(data), "--rows", "3000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout.readline().decode().startswith(f"file: {data}")
    proc.stdout.close()  # head -1 exits
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert err == ""


def test_info_percent_is_peft_print_trainable_parameters_figure(tmp_path):
    """info's "% of total" divided by the base's parameters alone (lora 0.091 on the tiny llama, 1,792 / 1,968,928);
    peft's print_trainable_parameters (and LLaMA-Factory's count_parameters) divides by every parameter of the adapted
    model, the adapter's too: 1,792 / 1,970,720 = 0.0909. Now peft's figure, to its 4 decimals."""
    import peft
    from transformers import AutoModelForCausalLM

    from deltatune.info import describe

    model = save_tiny(tmp_path / "m")
    out = describe(model)
    rows = {r.split("|")[1].strip(): r.split("|")[2:4] for r in out.splitlines() if r.startswith("| ")}
    for name, config in [
        ("lora", peft.LoraConfig(task_type="CAUSAL_LM")),
        ("ia3", peft.IA3Config(task_type="CAUSAL_LM")),
    ]:
        ref = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model), config)
        trainable, everything = ref.get_nb_trainable_parameters()
        assert [c.strip() for c in rows[name]] == [f"{trainable:,d}", f"{100 * trainable / everything:.4f}"], name
    assert rows["lora"][1].strip() == "0.0909"  # 1,792 / 1,970,720; it read 0.091 (1,792 / 1,968,928)


def test_a_trailing_comma_is_named_at_its_line_and_column(tmp_path):
    """A JSON list spread over lines with a comma after its last item read ``t.json:4: not valid JSON (Expecting
    value)``: the line of the ``]`` after it, no column. Now the comma's line and column, said as a trailing comma (as
    Python 3.13's json names it), in a .json and a .jsonl row; other faults read as before."""
    import pytest

    from deltatune.data.load import DataError

    cases = [
        (
            "t.json",
            '[\n  {"text": "a"},\n  {"text": "b"},\n]\n',
            "t.json:3: not valid JSON (a trailing comma at column 16",
        ),
        ("o.json", '{"text": "a",\n}\n', "o.json:1: not valid JSON (a trailing comma at column 13"),
        ("t.jsonl", '{"text": "a"}\n{"text": "b",}\n', "t.jsonl:2: not valid JSON (a trailing comma at column 13"),
        (
            "n.json",
            '[{"text": "a"}\n{"text": "b"}]\n',
            "n.json:2: not valid JSON (Expecting ',' delimiter at column 1)",
        ),
        ("e.json", '[{"text": }]', "e.json:1: not valid JSON (Expecting value at column 11)"),
    ]
    for name, text, message in cases:
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError) as err:
            read_rows(str(tmp_path / name))
        assert str(err.value).startswith(f"{tmp_path / name}{message[len(name) :]}"), str(err.value)
        line, column = (int(x) for x in re.search(r":(\d+): .* column (\d+)", str(err.value)).groups())
        if "trailing" in message:
            assert text.splitlines()[line - 1][column - 1] == ","  # the comma itself


def test_a_missing_local_data_path_is_named_missing_not_sent_to_the_hub(tmp_path, monkeypatch):
    """A missing folder or extensionless path (``/data/train``, ``./data/train``) went to the datasets hub: 8-11 s of
    importing datasets, then "is not a local file and could not be loaded from the datasets hub (is the hub reachable
    from here? ...): FileNotFoundError". A path can be no hub name (the rule check_model_path reads a model name by):
    now one line naming it missing, the hub not asked; an owner/name still goes to the hub."""
    import pytest

    import deltatune.data.load as load
    from deltatune.data.load import DataError, Row

    asked = []
    monkeypatch.setattr(load, "_hub", lambda name, limit: asked.append(name) or [Row({"text": "x"}, f"{name}[0]")])
    for spec in [str(tmp_path / "gone"), "./gone/train", "data/gone/train", "~/gone"]:
        with pytest.raises(
            DataError, match=rf"^data path '{re.escape(spec)}' does not exist \(no such file or folder\)$"
        ):
            read_rows(spec)
    assert asked == []
    assert read_rows("owner/name:test")[0].source == "owner/name:test[0]" and asked == ["owner/name:test"]


def test_a_utf16_or_utf32_file_is_named_so(tmp_path):
    """A file saved as UTF-16 (Windows Notepad's "Unicode") read "t.jsonl:1: not UTF-8 text (byte 0xff at column 1)":
    true, but not what it is. Now its encoding, read from its byte-order mark (as Python's own codecs name it)."""
    import codecs

    import pytest

    from deltatune.data.load import DataError

    for name, encoding, bom, kind in [
        ("t.jsonl", "utf-16-le", codecs.BOM_UTF16_LE, "UTF-16"),
        ("t.csv", "utf-16-be", codecs.BOM_UTF16_BE, "UTF-16"),
        ("u.jsonl", "utf-32-le", codecs.BOM_UTF32_LE, "UTF-32"),
    ]:
        text = '{"text": "a"}\n' if name.endswith("jsonl") else "text\na\n"
        (tmp_path / name).write_bytes(bom + text.encode(encoding))
        with pytest.raises(DataError) as err:
            read_rows(str(tmp_path / name))
        assert str(err.value) == (
            f"{tmp_path / name}: {kind} text (it starts with that byte-order mark), not UTF-8; save the file as UTF-8"
        )
        assert (tmp_path / name).read_bytes().decode(encoding.replace("-le", "").replace("-be", "")) == text


def test_train_parses_without_building_its_help():
    """Every ``deltatune train RECIPE`` built train's --help epilog while parsing (the recipe keys and every method's
    fields: torch and all methods imported, 4 s), before main's Ctrl-C handling: a Ctrl-C then printed a 20-line
    traceback through importlib. Now the epilog is built for -h / --help alone; the help still lists the keys."""
    code = (
        "import sys; from deltatune.cli_parser import _parser; p = _parser(['train', 'r.yaml', 'train.lr=1']); "
        "t = p.commands['train']; print('torch' in sys.modules, t.epilog is None, "
        "'recipe keys' in _parser(['train', '-h']).commands['train'].epilog)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True", "True"]


def test_ctrl_c_while_the_recipe_is_read_does_not_send_the_user_to_resume(tmp_path, monkeypatch, capsys):
    """Reading a recipe imports torch (4-15 s); a Ctrl-C then printed "interrupted; --resume continues from its newest
    checkpoint" for a run with no folder, let alone a checkpoint (--resume then refused: there is no run). Now it says
    the recipe was not read and nothing written; exit 130, no file made."""
    import deltatune.train
    from deltatune.cli import main

    def reading(path, overrides):
        raise KeyboardInterrupt

    monkeypatch.setitem(vars(deltatune.train), "load_recipe", reading)  # (setattr would import torch first)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "r.yaml"]) == 130
    assert capsys.readouterr().err == "deltatune train: interrupted before its recipe was read; nothing written\n"
    assert list(tmp_path.iterdir()) == []


def test_info_on_a_run_folder_with_no_adapter_yet_names_it_a_run(tmp_path, capsys):
    """A run folder stopped before its first save (run.yaml, log_history.jsonl, no adapter_config.json) read "model
    ...: the folder holds no config.json", as if it were a broken model. Now it is named a run folder (a saved run's
    adapter_config.json was named already), one line, exit 2, nothing written."""
    from deltatune.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.yaml").write_text("stage: sft\nmodel: {name_or_path: minilm}\n")
    (run / "log_history.jsonl").write_text("")
    assert main(["info", str(run)]) == 2
    assert capsys.readouterr().err == (
        f"deltatune info: error: '{run}' is a run folder (run.yaml) with no adapter saved in it yet; info describes a "
        "base model: its base is 'minilm'\n"
    )
    assert sorted(p.name for p in run.iterdir()) == ["log_history.jsonl", "run.yaml"]


def test_info_on_a_run_folder_with_checkpoints_points_at_the_newest(tmp_path, capsys):
    """A run folder with checkpoint-N/ (each an adapter: the Trainer's save_pretrained into it) and no adapter at its
    top yet read "with no adapter saved in it yet" (false) and asked the user for the base its run.yaml names. Now
    the newest checkpoint by step (10, not '2' by name) and the base from run.yaml; a run.yaml without it still asks."""
    from deltatune.cli import main

    run = tmp_path / "run"
    for step in (2, 10):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "adapter_config.json").write_text('{"base_model_name_or_path": "minilm"}')
    (run / "checkpoint-12").mkdir()  # being written (no adapter yet): not named
    (run / "run.yaml").write_text("stage: sft\nmodel: {name_or_path: minilm}\n")
    assert main(["info", str(run)]) == 2
    newest = run / "checkpoint-10"
    assert capsys.readouterr().err == (
        f"deltatune info: error: '{run}' is a run folder (run.yaml) with its adapter in checkpoints alone so far (the "
        f"newest: '{newest}'); info describes a base model: its base is 'minilm'\n"
    )
    assert main(["info", str(newest)]) == 2  # the folder named is the adapter info names as one
    assert capsys.readouterr().err.endswith("is an adapter folder (adapter_config.json); info describes a base "
                                            "model: its base is 'minilm'\n")  # fmt: skip
    (run / "run.yaml").write_text("stage: sft\n")
    assert main(["info", str(run)]) == 2
    assert capsys.readouterr().err.endswith("info describes a base model: give the run's model.name_or_path\n")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-10", "checkpoint-12", "checkpoint-2", "run.yaml"]


_TRAIN_CHILD = r"""
import os, select, sys, time, types
import deltatune.cli as cli, deltatune.train as train_pkg, deltatune.train.config as train_config

out, when = sys.argv[1], sys.argv[2]
cfg = types.SimpleNamespace(output=types.SimpleNamespace(dir=out, samples=False), stage="sft")
vars(train_pkg)["load_recipe"] = lambda path, overrides: cfg
train_config.ignored_keys = lambda cfg: []


def reader_gone():  # the step line read, the pipe closed by its reader (head -1)
    poll = select.poll()
    poll.register(sys.stdout.fileno(), select.POLLOUT)
    while not any(events & select.POLLERR for _, events in poll.poll(0)):
        time.sleep(0.01)


def train(cfg, **kwargs):
    os.makedirs(os.path.join(out, "checkpoint-10"))
    print("step 10 loss 1.0", flush=True)
    reader_gone()
    if when == "mid":  # the next step's line
        print("step 20 loss 0.9", flush=True)
    return {"eval_loss": 0.9}  # finished: the summary's lines come after


vars(train_pkg)["train"] = train
sys.exit(cli.main(["train", "r.yaml"]))
"""


def _train_piped_into_head(out, when, stderr=subprocess.PIPE):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered, as a user's
    proc = subprocess.Popen(
        [sys.executable, "-c", _TRAIN_CHILD, str(out), when], stdout=subprocess.PIPE, stderr=stderr, env=env
    )
    assert proc.stdout.readline().decode() == "step 10 loss 1.0\n"
    proc.stdout.close()  # head -1 exits
    err = proc.stderr.read().decode() if proc.stderr else ""
    return proc.wait(timeout=60), err


def test_a_finished_train_whose_reader_left_is_not_sent_to_resume(tmp_path):
    """``deltatune train r.yaml | head -5``: the summary, samples, "adapter ... written to" and the metrics are printed
    after train() returned. A reader gone by then read "stopped: its output's reader left; --resume continues from its
    newest checkpoint" (--resume refuses a finished run), or, the summary short enough to sit in stdout's buffer until
    exit, "Exception ignored ... BrokenPipeError" and exit 120. Now it says the run finished and where its results
    are; a run stopped mid-way by its reader still names --resume."""
    rc, err = _train_piped_into_head(tmp_path / "done", "finished")
    assert (rc, err) == (
        141,
        "deltatune train: finished; its output's reader left before the summary (metrics.json and report.md are in "
        f"{tmp_path / 'done'})\n",
    )
    rc, err = _train_piped_into_head(tmp_path / "mid", "mid")
    assert (rc, err) == (
        141,
        "deltatune train: stopped: its output's reader left; --resume continues from its newest checkpoint\n",
    )


def test_train_piped_with_its_stderr_into_head_ends_with_141(tmp_path):
    """``deltatune train r.yaml 2>&1 | head -1``: stderr is the same gone pipe, so the "reader left" line raised a
    second BrokenPipeError inside the except (a traceback nobody sees, exit 1). Now that line is dropped: 141, as
    with stdout alone."""
    for when in ("mid", "finished"):
        assert _train_piped_into_head(tmp_path / when, when, stderr=subprocess.STDOUT) == (141, ""), when


def test_a_wrong_closer_after_a_comma_is_no_trailing_comma(tmp_path):
    """``[1,}`` and ``{"a": 1, ]`` were named "a trailing comma" at the comma. Python 3.13's json names a trailing comma
    only where the closer after it closes what it is in (``]`` in a list, ``}`` in an object); here the closer is the
    fault, and the message is json's own at it, as on 3.11 (its column: the closer's). A real one still reads so."""
    import pytest

    from deltatune.data.load import DataError

    cases = [
        ("c.json", '{"text": "x", "b": [1,}\n', 23),  # hand count: the '}' is the 23rd character
        ("d.jsonl", '{"text": "x",  ]\n', 16),
        ("e.json", '[{"text": "x"},\n}\n', 1),
    ]
    for name, text, column in cases:
        (tmp_path / name).write_text(text)
        with pytest.raises(json.JSONDecodeError) as ref:
            json.loads(text)
        assert (ref.value.colno, text.splitlines()[ref.value.lineno - 1][column - 1]) == (column, text.rstrip()[-1])
        with pytest.raises(DataError) as err:
            read_rows(str(tmp_path / name))
        where = f"{tmp_path / name}:{ref.value.lineno}"
        assert str(err.value) == f"{where}: not valid JSON ({ref.value.msg} at column {column})", str(err.value)
    (tmp_path / "t.json").write_text('{"text": "x", "b": [1,]}\n')
    with pytest.raises(DataError, match=r"t\.json:1: not valid JSON \(a trailing comma at column 22: "):
        read_rows(str(tmp_path / "t.json"))


def test_train_help_abbreviated_lists_the_recipe_keys():
    """argparse takes --h, --he and --hel for --help (no other flag of train's starts so), but only -h and --help
    built the epilog: ``deltatune train --hel`` showed the flags without the recipe keys. Now each shows the same help
    as --help, checked against argparse's own reading of the abbreviation."""
    code = (
        "import contextlib, io, sys; from deltatune.cli_parser import _parser\n"
        "for flag in ['--help', '--hel', '--he', '--h', '-h']:\n"
        "    out = io.StringIO(); p = _parser(['train', flag])\n"
        "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit): p.parse_args(['train', flag])\n"
        "    print(flag, out.getvalue().startswith('usage: deltatune train'), 'recipe keys' in out.getvalue())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:-1] == [f"{flag} True True" for flag in ["--help", "--hel", "--he", "--h", "-h"]]


def test_utf16_without_a_byte_order_mark_is_named(tmp_path):
    """UTF-16 saved without a byte-order mark decodes as UTF-8 (ASCII letters and NULs): a .jsonl read "not valid
    JSON (Expecting property name enclosed in double quotes at column 2)" (little-endian), a .csv's columns were read
    as 't\\x00e\\x00x\\x00t\\x00', a .txt trained on NULs; with a letter outside ASCII, "not UTF-8 text (byte 0xe9
    ...)". Now each is refused at the first NUL's line, naming the likely cause; a NUL in a UTF-8 file is named at its
    line too."""
    import pytest

    from deltatune.data.load import DataError

    texts = {"t.jsonl": '{"text": "a"}\n', "t.json": '[{"text": "a"}]\n', "t.csv": "text\na\n", "t.txt": "a b\n"}
    texts |= {"u.jsonl": '{"text": "caf\u00e9"}\n', "u.tsv": "text\tlabel\ncaf\u00e9\t1\n"}
    for name, text in texts.items():
        for encoding in ("utf-16-le", "utf-16-be"):
            (tmp_path / name).write_bytes(text.encode(encoding))
            assert (tmp_path / name).read_bytes().decode(encoding) == text  # no byte-order mark
            with pytest.raises(DataError) as err:
                read_rows(str(tmp_path / name))
            assert str(err.value) == (
                f"{tmp_path / name}:1: NUL bytes: UTF-16 without a byte-order mark? save the file as UTF-8"
            ), (name, encoding)
    stray = "a NUL byte in the text (a damaged or binary file?); remove it"  # (UTF-8 text: no UTF-16 advice)
    (tmp_path / "n.jsonl").write_text('{"text": "a"}\n\n{"text": "b\x00"}\n')
    with pytest.raises(DataError, match=rf"n\.jsonl:3: {re.escape(stray)}$"):
        read_rows(str(tmp_path / "n.jsonl"))
    (tmp_path / "n.txt").write_text("one\ntwo\x00\n")
    with pytest.raises(DataError, match=rf"n\.txt:2: {re.escape(stray)}$"):
        read_rows(str(tmp_path / "n.txt"))
