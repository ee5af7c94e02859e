"""Probe 24 of run folders and the alpaca template: the built-in alpaca against LLaMA-Factory's ``alpaca`` (its
default system written where a row has none, a row's own system with no blank line after it: its
``register_template(name="alpaca", ...)`` and the chat template its ``_get_jinja_template`` installs), while a run
folder begun before (no ``alpaca_system`` mark) resumes, evaluates and serves with the alpaca it trained with."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from deltatune.data.templates import IGNORE_INDEX, encode_chat, render
from deltatune.train.config import build
from deltatune.train.runfolder import mark_run, recipe_changes, take_derived
from deltatune.train.runs import MARKS_FILE, old_run_data, read_recipe, run_template

LF_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
TURNS = [("Hi", "Hello."), ("What is 2+2?", "4, of course.")]


@pytest.fixture(scope="module")
def tok():
    from tiny import smollm2_tokenizer

    return smollm2_tokenizer()


def _lf_jinja(eos: str) -> str:
    """LLaMA-Factory's ``Template._get_jinja_template`` for its alpaca (prefix empty, default_system set, system slot
    ``{{content}}``, user slot ``### Instruction:\\n{{content}}\\n\\n### Response:\\n``, assistant slot
    ``{{content}}``, eos_token, ``\\n\\n``), as ``fix_jinja_template`` writes it (replace_jinja_template=True)."""
    esc = LF_SYSTEM.replace("'", "\\'")
    return (
        "{% set system_message = '" + esc + "' %}"
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% endif %}"
        "{% if system_message is defined %}{{ system_message }}{% endif %}"
        "{% for message in loop_messages %}{% set content = message['content'] %}"
        "{% if message['role'] == 'user' %}{{ '### Instruction:\n' + content + '\n\n### Response:\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ content + '" + eos + "' + '\n\n' }}{% endif %}{% endfor %}"
    )


def _lf_encode_text(system: str | None, turns) -> str:
    """LLaMA-Factory's ``Template._encode`` for alpaca as text: ``system or default_system`` before the first user
    slot (so "" writes the default too), each assistant slot ``content + eos + "\\n\\n"``."""
    text = system or LF_SYSTEM
    for q, a in turns:
        text += f"### Instruction:\n{q}\n\n### Response:\n{a}<|im_end|>\n\n"
    return text


def _messages(system: str | None, turns) -> list[dict]:
    out = [] if system is None else [{"role": "system", "content": system}]
    for q, a in turns:
        out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return out


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_alpaca_ids_are_llamafactorys_chat_template_ids(tok, system):
    """The ids of LLaMA-Factory's alpaca chat template (what its exported tokenizer renders) on SmolLM2: HEAD wrote
    no default system (19 tokens short) and a blank line after a row's system ("Be brief.\\n\\n### ...")."""
    messages = _messages(system, TURNS)
    want = tok.apply_chat_template(messages, chat_template=_lf_jinja(tok.eos_token), tokenize=False)
    want_ids = tok(want, add_special_tokens=False)["input_ids"]
    ids, labels = encode_chat(messages, tok, "alpaca")
    assert tok.decode(ids) == want
    assert ids == want_ids
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]  # (each answer through its EOS, as before)
    assert trained == tok.encode("Hello.<|im_end|>4, of course.<|im_end|>", add_special_tokens=False)


@pytest.mark.parametrize("system", [None, "", "Be brief."])
def test_alpaca_text_is_llamafactorys_encode_text(tok, system):
    """``Template._encode``: ``system or default_system`` (an empty system writes the default, as no system does)."""
    assert render(_messages(system, TURNS), tok, "alpaca")[0] == _lf_encode_text(system, TURNS)
    prompt = render(_messages(system, TURNS[:1])[:-1], tok, "alpaca", add_generation_prompt=True)[0]
    assert prompt == (system or LF_SYSTEM) + "### Instruction:\nHi\n\n### Response:\n"  # (encode_oneturn's prompt)


def _old_text(system: str | None, turns) -> str:
    """HEAD's alpaca (before the mark): no default system, a system prompt then a blank line."""
    text = f"{system}\n\n" if system else ""
    for q, a in turns:
        text += f"### Instruction:\n{q}\n\n### Response:\n{a}<|im_end|>\n\n"
    return text


def _run_folder(tmp_path, marked: bool):
    """A stopped sft run with data.template alpaca: run.yaml and a checkpoint; marked as a run begun now, or not (a
    run begun before the mark existed)."""
    out = tmp_path / ("new" if marked else "old")
    (out / "checkpoint-2").mkdir(parents=True)
    recipe = {
        "stage": "sft",
        "model": {"name_or_path": str(tmp_path / "base")},
        "method": {"name": "lora", "r": 2},
        "data": {"train": str(tmp_path / "t.jsonl"), "template": "alpaca"},
        "output": {"dir": str(out)},
    }
    (out / "run.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    if marked:
        mark_run(str(out))
    return out, recipe


@pytest.mark.parametrize("marked", [False, True])
def test_a_run_begun_before_the_mark_resumes_evaluates_and_serves_with_its_alpaca(tok, tmp_path, marked):
    """An unmarked run folder reads data.template alpaca as it trained (alpaca_v0) where resume (take_derived, after
    the recipe comparison, which names no change), eval (old_run_data) and chat / generate / serve (run_template)
    read it; a run begun now (mark_run) reads LLaMA-Factory's."""
    out, recipe = _run_folder(tmp_path, marked)
    cfg = build(recipe)
    old, note = old_run_data(yaml.safe_load((out / "run.yaml").read_text()), str(out))
    assert note == "" and recipe_changes(old, recipe) == []
    take_derived(cfg, str(out))
    for_template = {
        "resume": cfg.data.template,
        "eval": build(old).data.template,
        "serve": run_template(str(out)),
        "checkpoint": run_template(str(out / "checkpoint-2")),
        "scorer, captioner": read_recipe(str(out))["data"]["template"],  # (a reward run in PPO, generate --image)
    }
    want = "alpaca" if marked else "alpaca_v0"
    assert for_template == dict.fromkeys(for_template, want)
    for system in (None, "Be brief."):
        messages = _messages(system, TURNS)
        ids = encode_chat(messages, tok, cfg.data.template)[0]
        text = _lf_encode_text(system, TURNS) if marked else _old_text(system, TURNS)
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
    # the resumed run's run.yaml, rewritten with the recipe it resumes with (--resume-changed), compares the same
    again = {**recipe, "data": {**recipe["data"], "template": cfg.data.template}}
    assert recipe_changes(old_run_data(again, str(out))[0], recipe) == []
    marks = out / MARKS_FILE
    assert (json.loads(marks.read_text(encoding="utf-8")).get("alpaca_system") if marked else marks.exists()) in (
        1,
        False,
    )


def test_an_old_alpaca_run_resumed_under_another_template_is_a_change(tmp_path):
    """The old alpaca is read as alpaca only against a recipe naming alpaca: chatml is named as the change it is."""
    out, recipe = _run_folder(tmp_path, marked=False)
    old = old_run_data(read_recipe(str(out)), str(out))[0]
    chatml = {**recipe, "data": {**recipe["data"], "template": "chatml"}}
    assert recipe_changes(old, chatml) == ["data.template: 'alpaca_v0' -> 'chatml'"]
    bnpo = {**recipe, "stage": "grpo", "align": {"loss_type": "bnpo", "mini_batch_size": 1}}  # (read as it trained)
    assert old_run_data(bnpo, str(out))[0]["data"]["template"] == "alpaca_v0"


# -- a run folder after a kill ---------------------------------------------------------------------------------


def _killed_overwrite(run, started: bool) -> None:
    """The folder as a run killed during ``--overwrite`` (kill -9, the kernel's OOM killer) leaves it: its lock
    (naming its pid, now dead), the old run moved aside and the new folder begun (its run.yaml; a checkpoint too
    where ``started``), no ``failed()`` run."""
    import socket
    import subprocess

    from deltatune.train.runfolder import Replacement

    dead = subprocess.Popen(["true"])
    dead.wait()
    r = Replacement(str(run), True)
    r.begin()
    (run / "run.yaml").write_text("stage: sft\n")
    if started:
        (run / "checkpoint-1").mkdir()
    lock = run.parent / f".{run.name}.lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": 0}))


def _old_run(run) -> dict[str, bytes]:
    (run / "checkpoint-4").mkdir(parents=True)
    files = {"run.yaml": b"stage: sft\ntrain: {lr: 0.1}\n", "checkpoint-4/adapter_model.safetensors": b"weights"}
    for name, data in files.items():
        (run / name).write_bytes(data)
    return files


def test_an_overwrite_killed_before_its_first_step_gets_the_old_run_back_under_the_next_lock(tmp_path):
    """``--overwrite`` promises the old run back where the new one fails before its first step (``Replacement``'s
    ``failed()``), which runs on an exception, not on a kill: the old run stayed hidden beside the folder
    (``.run.replaced-<pid>``) while the folder held the new run's start, which ``--resume`` refused (no checkpoint)
    and a second ``--overwrite`` deleted, the old run left hidden for good. Now the next command that takes the
    folder's lock puts it back: its last checkpoint is checkpoint-4 again (transformers' get_last_checkpoint)."""
    from transformers.trainer_utils import get_last_checkpoint

    from deltatune.train.runfolder import RunLock

    run = tmp_path / "run"
    files = _old_run(run)
    _killed_overwrite(run, started=False)
    aside = tmp_path / f".run.replaced-{os.getpid()}"
    assert aside.is_dir() and not (run / "checkpoint-4").exists()
    lock = RunLock(str(run)).acquire()  # (the dead run's lock is stale: taken over)
    lock.release()
    assert {n: (run / n).read_bytes() for n in files} == files
    assert not aside.exists()
    assert get_last_checkpoint(str(run)) == str(run / "checkpoint-4")


def test_an_overwrite_killed_after_its_first_checkpoint_keeps_the_new_run(tmp_path):
    """Once the new run wrote a checkpoint it had started (``failed()`` keeps it then): the folder stays the new
    run's, its checkpoint the last (get_last_checkpoint); the old run is not put over it."""
    from transformers.trainer_utils import get_last_checkpoint

    from deltatune.train.runfolder import RunLock

    run = tmp_path / "run"
    _old_run(run)
    _killed_overwrite(run, started=True)
    lock = RunLock(str(run)).acquire()
    lock.release()
    assert (run / "run.yaml").read_text() == "stage: sft\n"
    assert get_last_checkpoint(str(run)) == str(run / "checkpoint-1")
    assert (tmp_path / f".run.replaced-{os.getpid()}").is_dir()  # (left as it was: the user's to delete)


def test_an_output_dir_linking_to_nothing_is_refused_before_anything_loads(tmp_path):
    """A dangling link passed ``check_output_path`` (os.path.exists reads it as nothing there), and the run failed
    after loading the model and data, where ``Replacement.begin`` made the folder: FileExistsError, a traceback (as
    transformers' own os.makedirs(output_dir) raises it). Now one line naming the link and its target."""
    from deltatune.config import ConfigError
    from deltatune.train.runfolder import check_output_path

    out = tmp_path / "out"
    out.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"^output\.dir '.*out' is a link to '.*nowhere', which does not exist"):
        check_output_path(str(out))
    (tmp_path / "nowhere").mkdir()
    check_output_path(str(out))  # (a link to a folder is a folder)


# -- review of probe 24 --------------------------------------------------------------------------------------------


def _lf_encode_ids(tok, system: str | None, turns) -> list[int]:
    """LLaMA-Factory's ``Template._encode`` for alpaca as ids: each slot element tokenised on its own
    (``_convert_elements_to_ids``): the system slot, each user slot, each answer, its EOS, the ``\\n\\n`` after it."""
    enc = tok.encode
    ids = enc(system or LF_SYSTEM, add_special_tokens=False)
    for q, a in turns:
        ids += enc(f"### Instruction:\n{q}\n\n### Response:\n", add_special_tokens=False)
        ids += enc(a, add_special_tokens=False) + [tok.eos_token_id] + enc("\n\n", add_special_tokens=False)
    return ids


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_alpaca_ids_differ_from_llamafactorys_per_slot_encode_only_at_its_blank_lines(tok, system):
    """Kept: deltatune tokenises the rendered conversation whole, as LLaMA-Factory's exported chat template is
    tokenised (and TRL tokenises a chat template's text); LLaMA-Factory's trainer tokenises each slot apart, so its
    default system ends in one token "\\n\\n" where the whole text has two "\\n", and so does the "\\n\\n" after each
    answer's EOS but the last. The same text; one token more at each such seam, nowhere else."""
    messages = _messages(system, TURNS)
    ids = encode_chat(messages, tok, "alpaca")[0]
    lf = _lf_encode_ids(tok, system, TURNS)
    assert tok.decode(ids) == tok.decode(lf)
    seams = (system is None) + len(TURNS) - 1  # (the default system's blank line; each inner answer's)
    assert len(ids) - len(lf) == seams
    pair = tok.encode("\n", add_special_tokens=False) * 2
    one = tok.encode("\n\n", add_special_tokens=False)
    merged, i = [], 0
    while i < len(ids):  # each seam's two "\n" tokens before "###" as LLaMA-Factory's one
        if (
            ids[i : i + 2] == pair
            and i
            and ids[i - 1] in (tok.eos_token_id, *tok.encode(".", add_special_tokens=False))
        ):
            merged, i = merged + one, i + 2
        else:
            merged, i = merged + [ids[i]], i + 1
    assert merged == lf


def test_alpaca_v0_is_one_name():
    """templates.OLD_ALPACA (the template) and runs.OLD_ALPACA (what an unmarked run's run.yaml reads as) agree."""
    from deltatune.data import templates
    from deltatune.train import runs

    assert runs.OLD_ALPACA == templates.OLD_ALPACA and runs.OLD_ALPACA in templates.TEMPLATES


def test_a_run_resumed_changed_into_alpaca_trains_llamafactorys_alpaca(tok, tmp_path):
    """An unmarked run that trained chatml, resumed with alpaca (--resume-changed): take_derived set alpaca_v0 (it
    read the mark, not run.yaml's chatml); it trains LLaMA-Factory's alpaca now, and once run.yaml is rewritten with
    it (run.py's write_run_file) chat and serve read that alpaca too."""
    from deltatune.train.runs import write_run_file

    out, recipe = _run_folder(tmp_path, marked=False)
    chatml = {**recipe, "data": {**recipe["data"], "template": "chatml"}}
    (out / "run.yaml").write_text(yaml.safe_dump(chatml), encoding="utf-8")
    old = old_run_data(read_recipe(str(out)), str(out))[0]
    assert recipe_changes(old, recipe) == ["data.template: 'chatml' -> 'alpaca'"]
    cfg = build(recipe)
    take_derived(cfg, str(out))
    assert cfg.data.template == "alpaca"
    write_run_file(str(out), recipe)
    assert run_template(str(out)) == read_recipe(str(out))["data"]["template"] == "alpaca"
    ids = encode_chat(_messages(None, TURNS), tok, cfg.data.template)[0]
    assert ids == tok(_lf_encode_text(None, TURNS), add_special_tokens=False)["input_ids"]


def test_a_run_recorded_with_alpaca_v0_resumes_with_it_under_alpaca(tmp_path):
    """A run begun now whose recipe named alpaca_v0, resumed with alpaca: recipe_changes names no change (the two
    are one), so it must go on with alpaca_v0, as it trained, not switch to LLaMA-Factory's unnamed."""
    out, recipe = _run_folder(tmp_path, marked=True)
    v0 = {**recipe, "data": {**recipe["data"], "template": "alpaca_v0"}}
    (out / "run.yaml").write_text(yaml.safe_dump(v0), encoding="utf-8")
    assert recipe_changes(old_run_data(read_recipe(str(out)), str(out))[0], recipe) == []
    cfg = build(recipe)
    take_derived(cfg, str(out))
    assert cfg.data.template == "alpaca_v0"


def test_a_ppo_or_grpo_overwrite_killed_mid_run_is_not_put_back_over(tmp_path, capsys):
    """PPO and GRPO keep the old run aside until they end (no first-step callback): one killed at step 400 of 500
    (no checkpoint yet) holds its log_history.jsonl with 400 rows, which the next lock deleted, putting the old run
    back. Now the folder holding more than a run's start is left, the old run named where it is."""
    from deltatune.train.runfolder import RunLock

    run = tmp_path / "run"
    _old_run(run)
    _killed_overwrite(run, started=False)
    (run / "log_history.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    RunLock(str(run)).acquire().release()
    assert (run / "log_history.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n'
    assert (tmp_path / f".run.replaced-{os.getpid()}" / "checkpoint-4").is_dir()
    assert f".run.replaced-{os.getpid()}" in capsys.readouterr().err


def test_a_killed_start_with_its_empty_log_and_tensorboard_folder_is_put_back_over(tmp_path):
    """What a run writes before its first step (an empty log_history.jsonl, TensorBoard's runs/) is its start."""
    from deltatune.train.runfolder import RunLock

    run = tmp_path / "run"
    files = _old_run(run)
    _killed_overwrite(run, started=False)
    (run / "log_history.jsonl").write_text("")
    (run / "runs" / "Dec08").mkdir(parents=True)
    RunLock(str(run)).acquire().release()
    assert {n: (run / n).read_bytes() for n in files} == files


def test_a_put_back_that_fails_releases_the_lock(tmp_path, monkeypatch):
    """An error inside the put-back escaped acquire with the lock held (train takes it outside its try)."""
    import shutil

    from deltatune.train.runfolder import RunLock

    run = tmp_path / "run"
    _old_run(run)
    _killed_overwrite(run, started=False)

    def boom(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(shutil, "rmtree", boom)
    lock = RunLock(str(run))
    with pytest.raises(PermissionError):
        lock.acquire()
    assert not lock.held and not (tmp_path / ".run.lock").exists()


def test_an_out_linking_to_nothing_is_refused_before_the_work(tmp_path, monkeypatch):
    """merge / export --out onto a dangling link: staging_folder let it by and publish_folder failed after the work
    with NotADirectoryError. Now one line before: a relative target also shown as the path it names; a loop of
    links named as a loop (it read as "does not exist")."""
    from deltatune.config import ConfigError
    from deltatune.train.runfolder import check_output_path
    from deltatune.train.staging import staging_folder

    monkeypatch.chdir(tmp_path)
    os.symlink("nowhere", "out")
    with pytest.raises(ConfigError, match=r"^--out 'out' is a link to 'nowhere' \(.*/nowhere\), which does not exist"):
        staging_folder("out", True).__enter__()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # (no staging folder left)
    os.symlink("b", "a")
    os.symlink("a", "b")
    with pytest.raises(ConfigError, match=r"^output\.dir 'a' is a link to 'b', a loop of links"):
        check_output_path("a")


def test_an_overwrite_killed_after_its_step_0_evaluation_is_put_back_over(tmp_path):
    """train.eval_on_start logs its evaluation (step 0) before the first step: an --overwrite killed at its first
    step then held more than a start (review 2, nit D) and the old run stayed aside, named; now it is put back as
    without eval_on_start. A log with a step's row (step 1) still holds a run begun."""
    from deltatune.train.runfolder import RunLock

    for rows, back in (('{"eval_loss": 2.25, "step": 0}\n', True), ('{"step": 0}\n{"loss": 0.5, "step": 1}\n', False)):
        run = tmp_path / ("back" if back else "kept")
        files = _old_run(run)
        _killed_overwrite(run, started=False)
        (run / "log_history.jsonl").write_text(rows)
        RunLock(str(run)).acquire().release()
        assert (run / "log_history.jsonl").exists() is not back
        assert ({n: (run / n).read_bytes() for n in files if (run / n).exists()} == files) is back  # (else aside)
        assert (tmp_path / f".{run.name}.replaced-{os.getpid()}").exists() is not back


def test_a_new_run_killed_between_its_marks_and_its_run_yaml_leaves_a_folder_train_takes(tmp_path):
    """A fresh folder killed after mark_run, before run.yaml, held only deltatune_marks.json: train and
    train --overwrite then refused it, "holds files that are not a deltatune run" (review 2, nit E). The next lock
    empties it (its marks only); a folder with any other file is left, and refused as before."""
    from deltatune.train.run import _check_output
    from deltatune.train.runfolder import RunLock

    run, other = tmp_path / "k", tmp_path / "mine"
    for folder in (run, other):
        folder.mkdir()
        mark_run(str(folder))
    (other / "notes.txt").write_text("a user's file")
    for folder in (run, other):
        RunLock(str(folder)).acquire().release()
    assert os.listdir(run) == [] and _check_output(str(run), False, False) == (None, [])
    assert sorted(os.listdir(other)) == [MARKS_FILE, "notes.txt"]
    with pytest.raises(Exception, match="not a deltatune run"):
        _check_output(str(other), True, False)


def test_a_refused_resume_into_alpaca_leaves_the_folders_marks_as_they_were(tmp_path):
    """take_derived runs before the checks of a --resume (the data files, the model): it added the alpaca mark to
    an unmarked chatml run resumed into alpaca, so a refused command (a data file missing) changed the folder
    (review 2, nit C). The mark now comes with the run.yaml that records alpaca (write_run_file), after them."""
    from deltatune.train.runs import write_run_file

    out, recipe = _run_folder(tmp_path, marked=False)
    chatml = {**recipe, "data": {**recipe["data"], "template": "chatml"}}
    (out / "run.yaml").write_text(yaml.safe_dump(chatml), encoding="utf-8")
    marks = (out / MARKS_FILE).read_bytes() if (out / MARKS_FILE).exists() else None
    cfg = build(recipe)
    take_derived(cfg, str(out))
    assert cfg.data.template == "alpaca"
    assert ((out / MARKS_FILE).read_bytes() if (out / MARKS_FILE).exists() else None) == marks
    write_run_file(str(out), recipe)
    assert run_template(str(out)) == "alpaca"
