"""Probe 12 of ``deltatune board`` and the CLI (a hostile tester): HEAD requests, TensorBoard's relative and wall
x axes over the log rows' wall_time, TensorBoard's dots (a series of one point only), and the CLI's help, version,
bad inputs and exit codes."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "serve"))

from fastapi.testclient import TestClient  # noqa: E402
from test_board_probe11 import CHROMIUM, FAKE_DOM, run_js, write_run  # noqa: E402

from deltatune.board import create_app  # noqa: E402

NODE = pytest.mark.skipif(shutil.which("node") is None, reason="needs node")
PATHS = ("/", "/static/app.js", "/api/runs", "/api/run?name=a", "/api/config", "/api/run?name=nope", "/static/x.js")


def test_head_is_answered_as_get_without_a_body(tmp_path):
    """``curl -I``, a monitor's check and a browser's probe send HEAD: the board answered 405 to every route. Now the
    GET's status and headers (its Content-Length too), no body; a refused origin is refused for HEAD as for GET."""
    from serving import Server

    write_run(tmp_path, "a", [{"loss": 1.0, "step": 1}])
    client = TestClient(create_app(str(tmp_path)), base_url="http://127.0.0.1")
    for path in PATHS:
        get, head = client.get(path), client.head(path)
        assert (head.status_code, head.content) == (get.status_code, b""), path
        assert head.headers["content-length"] == get.headers["content-length"] == str(len(get.content)), path
        assert head.headers["content-type"] == get.headers["content-type"], path
    evil = {"Origin": "http://evil.example"}
    assert client.head("/api/runs", headers=evil).status_code == client.get("/api/runs", headers=evil).status_code
    assert client.get("/api/runs", headers=evil).status_code == 403
    assert client.post("/api/runs").status_code == 405  # still GET (and HEAD) only
    server = Server(create_app(str(tmp_path)))  # and over a real socket (uvicorn), as curl -I sees it
    try:
        with urllib.request.urlopen(urllib.request.Request(server.url + "/api/runs", method="HEAD"), timeout=10) as r:
            assert r.status == 200 and r.read() == b"" and int(r.headers["Content-Length"]) > 10
    finally:
        server.stop()


@NODE
def test_only_a_series_of_one_point_gets_a_dot_as_in_tensorboard():
    """Series under 40 points had a dot on every point. TensorBoard (line_chart_v2/lib/series_line_view.ts) draws a
    line of width 2 and no dots, and a circle of radius 4 only where a run of finite points is one point long (a line
    of one point is invisible). Chart geometry: x 1..2 on 52..548 px, y 0..1 on 230..22 px; [1, 0] smoothed at 0.6
    is [1, 0.375] (230 - 0.375 * 208 = 152)."""
    got = run_js(
        f"({FAKE_DOM}, [0.6, 0].map(w => (settings.smoothing = w, chart('loss', "
        "[{label: 'a', points: [[1, 1], [2, 0]]}, {label: 'b', points: [[1.5, 0.5]]}, "
        "{label: 'c', points: Array.from({length: 30}, (_, i) => [1 + i / 29, i % 2])}]).kids"
        ".filter(k => k.tag === 'circle').map(k => k.attrs))))"
    )
    for dots in got:  # smoothed and not: the one-point series alone, at (1.5, 0.5)
        assert dots == [{"cx": "300", "cy": "126", "r": "4", "fill": "#d62728", "data-dot": "b"}]


@NODE
def test_the_relative_and_wall_axes_read_each_rows_wall_time():
    """No time axis: TensorBoard offers step, relative and wall. Rows now carry ``wall_time`` (seconds since 1970);
    relative counts from the run's first row with a time; a row without one (an older log) is left out of those axes
    only; wall_time is an axis, never charted as a metric; the chosen axis is kept across page loads."""
    history = [
        {"loss": 2.0, "epoch": 0.5, "step": 1},  # an older line without a time (a log resumed across versions)
        {"loss": 1.5, "epoch": 1.0, "step": 2, "wall_time": 1000.0},
        {"eval_loss": 1.2, "epoch": 1.0, "step": 2, "wall_time": 1003.5},
        {"loss": 1.0, "epoch": 1.5, "step": 3, "wall_time": 1010.25},
    ]
    import json

    h = json.dumps(history)
    got = run_js(
        f"['step', 'epoch', 'relative', 'wall'].map(x => (settings.x = x, [seriesOf({h}, 'loss'), "
        f"seriesOf({h}, 'eval_loss')])).concat([metricKeys({h})], "
        "[['relative', [0, 42, 300, 7200 * 1.5]], ['step', [3, 12.5]]].map(([x, v]) => (settings.x = x, "
        "v.map(t => tick(t, 9)))))"
    )
    step, epoch, relative, wall, keys, rel_ticks, step_ticks = got
    assert step == [[[1, 2.0], [2, 1.5], [3, 1.0]], [[2, 1.2]]]
    assert epoch == [[[0.5, 2.0], [1.0, 1.5], [1.5, 1.0]], [[1.0, 1.2]]]
    assert relative == [[[0, 1.5], [10.25, 1.0]], [[3.5, 1.2]]]
    assert wall == [[[1000.0, 1.5], [1010.25, 1.0]], [[1003.5, 1.2]]]
    assert keys == ["eval_loss", "loss"]  # no wall_time chart
    assert rel_ticks == ["0 s", "42 s", "5 min", "3 h"] and step_ticks == [3, 12.5]
    stored = json.dumps(json.dumps({"smoothing": 0.5, "x": "relative"}))
    assert run_js("settings", stored) == {"smoothing": 0.5, "x": "relative"}
    assert run_js("settings", json.dumps(json.dumps({"x": "hours"})))["x"] == "step"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Chromium")
def test_the_page_switches_to_relative_time_and_says_when_a_log_has_no_times(tmp_path):
    """In a browser: the x axis list offers step, epoch, relative, wall; relative labels its ticks in seconds; a run
    whose log has no times says so on its charts instead of drawing nothing."""
    playwright = pytest.importorskip("playwright.sync_api")
    from serving import Server

    rows = [{"loss": 2.0 - s / 10, "epoch": s / 4, "step": s, "wall_time": 1.7e9 + 2.5 * s} for s in range(1, 9)]
    write_run(tmp_path, "timed", rows)
    write_run(tmp_path, "old", [{k: v for k, v in r.items() if k != "wall_time"} for r in rows])
    server = Server(create_app(str(tmp_path)))
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
            page = browser.new_page()
            page.goto(server.url + "/?poll=100000#run/timed")
            page.wait_for_selector("#x-axis")
            options = page.evaluate("[...document.querySelectorAll('#x-axis option')].map(o => o.value)")
            assert options == ["step", "epoch", "relative", "wall"]
            page.select_option("#x-axis", "relative")
            page.wait_for_function("document.querySelector('#loss-chart').dataset.x === 'relative'")
            ticks = page.evaluate("[...document.querySelectorAll('#loss-chart text')].map(t => t.textContent)")
            assert "0 s" in ticks and "17.5 s" in ticks and "relative" in ticks  # 8 rows 2.5 s apart
            assert page.get_attribute("#loss-chart", "data-points") == "8"
            page.goto(server.url + "/?poll=100000#run/old")
            page.wait_for_function("document.querySelector('#loss-chart') && location.hash === '#run/old'")
            page.wait_for_function("document.querySelector('#loss-chart').textContent.includes('older log')")
            assert page.get_attribute("#loss-chart", "data-points") == "0"
            browser.close()
    finally:
        server.stop()


# -- the CLI ------------------------------------------------------------------------------------------------------


def _refused(argv: list[str], capsys) -> str:
    """The one error line of ``deltatune ARGV``, asserting argparse's exit 2."""
    from deltatune.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage:") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_a_mistyped_command_or_choice_names_the_nearest(capsys):
    """``deltatune trian`` said "invalid choice" and listed the commands; now the nearest is named too, as Python 3.14's
    suggest_on_error does (--dtype bf16: bfloat16; a word near nothing: no guess)."""
    assert _refused(["trian", "r.yaml"], capsys).endswith("invalid choice: 'trian' (choose from 'train', 'eval', "
                                                           "'generate', 'chat', 'merge', 'info', 'data', 'serve', "
                                                           "'board'); did you mean 'train'?")  # fmt: skip
    assert _refused(["data", "inspct", "x"], capsys).endswith("did you mean 'inspect'?")
    assert _refused(["serve", "--dtype", "bf16"], capsys).endswith("did you mean 'bfloat16'?")
    assert "did you mean" not in _refused(["zzzz"], capsys)


def test_train_without_a_recipe_names_the_recipe_alone(capsys):
    """``deltatune train`` said "the following arguments are required: recipe, overrides": overrides are optional
    (argparse takes a nargs="*" positional without a default as required)."""
    assert _refused(["train"], capsys) == "deltatune train: error: the following arguments are required: recipe"
    from deltatune.cli_parser import _parser

    assert _parser(["train"]).parse_args(["train", "r.yaml"]).overrides == []
    assert _parser(["eval"]).parse_args(["eval", "--adapter", "x"]).overrides == []


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--adapter", "{runs}/idnetity"],
        ["generate", "--adapter", "{runs}/idnetity", "--prompt", "hi"],
        ["chat", "--adapter", "{runs}/idnetity"],
        ["merge", "--adapter", "{runs}/idnetity", "--out", "{runs}/merged"],
    ],
)
def test_a_missing_adapter_folder_is_named_missing_with_the_nearest_name(argv, tmp_path, capsys):
    """A typo in --adapter read "holds no run.yaml" (eval) or "no adapter_config.json at" (generate, chat, merge), as
    if the folder were there but wrong; now it is named as missing, with the nearest folder beside it; nothing is
    written."""
    from deltatune.cli import main

    (tmp_path / "identity").mkdir()
    runs = str(tmp_path)
    assert main([a.format(runs=runs) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"deltatune {argv[0]}: error: --adapter '{runs}/idnetity' does not exist; did you mean '{runs}/identity'?\n"
    )
    assert sorted(os.listdir(tmp_path)) == ["identity"]
    assert main(["eval", "--adapter", str(tmp_path / "zz" / "q")]) == 2  # a parent missing too: no guess
    assert capsys.readouterr().err.endswith(f"--adapter '{tmp_path / 'zz' / 'q'}' does not exist\n")


def test_help_and_version_answer_at_once_and_true(capsys):
    """Every command's --help exits 0 and lists its flags; --version is the installed distribution's."""
    from importlib.metadata import version

    from deltatune.cli import main
    from deltatune.cli_parser import _parser

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"deltatune {version('deltatune')}\n"
    for command in _parser([]).commands:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        out = capsys.readouterr().out
        assert exit_.value.code == 0 and out.startswith(f"usage: deltatune {command}"), command


def test_ctrl_c_before_the_first_checkpoint_does_not_send_the_user_to_resume(tmp_path, monkeypatch, capsys):
    """Ctrl-C before a run's first step (no folder is kept then; after it one is: tests/test_diffusion_probe12.py)
    said "--resume continues from its newest checkpoint", and --resume then refused: "does not exist; there is no
    run to continue". Now the line says there is nothing to resume; after a checkpoint it still points to --resume.
    Exit 130 both times."""
    from types import SimpleNamespace

    import deltatune.train
    import deltatune.train.config
    from deltatune.cli import main

    out = tmp_path / "run"
    recipe = str(tmp_path / "r.yaml")  # read by the stand-in below (the real reading imports torch: 15 s here)
    cfg = SimpleNamespace(stage="cls", output=SimpleNamespace(dir=str(out)))

    def interrupted(cfg, **kwargs):
        raise KeyboardInterrupt

    names = vars(deltatune.train)  # (setattr would read the lazy names first: the import of torch)
    monkeypatch.setitem(names, "load_recipe", lambda path, overrides: cfg)
    monkeypatch.setitem(names, "train", interrupted)
    monkeypatch.setattr(deltatune.train.config, "ignored_keys", lambda cfg: [])
    assert main(["train", recipe]) == 130
    assert capsys.readouterr().err == "deltatune train: interrupted before its first checkpoint; nothing to resume\n"
    (out / "checkpoint-2").mkdir(parents=True)
    assert main(["train", recipe]) == 130
    assert capsys.readouterr().err == "deltatune train: interrupted; --resume continues from its newest checkpoint\n"


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--serve", "127.0.0.1:8000"], "--serve '127.0.0.1:8000': give the serve process's URL, e.g. http://"),
        (["--serve", "localhost"], "--serve 'localhost': give the serve process's URL"),
        (["--serve-key", "k"], "--serve-key is the key of the serve process named by --serve: give --serve URL too"),
        (["--serve", "http://127.0.0.1:8000", "--model", "m"], "--serve names a running serve process and --model"),
    ],
)
def test_the_board_refuses_a_playground_named_twice_or_half(flags, words, tmp_path, capsys):
    """--serve without http:// started the board, and every playground call answered 502 "unknown url type"; --serve
    with --model silently dropped --serve; --serve-key alone was ignored. Now one line each, before anything starts
    (and before a model loads)."""
    from deltatune.board import check_board
    from deltatune.cli import main

    assert main(["board", "--runs", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltatune board: error: ") and words in err and err.count("\n") == 1
    with socket.socket() as probe:  # a free port (0 is refused: the board would listen where it names no port)
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    check_board(str(tmp_path), "127.0.0.1", free, "http://127.0.0.1:8000/v1", "key")  # the openai client's form: taken
    check_board(str(tmp_path), "127.0.0.1", free, None, None, True)


@pytest.mark.parametrize(
    "flags, words, wrong",
    [
        (["--serve", "http://127.0.0.1:8000", "--adapter", "x"], "--serve names a running serve process and --adapter "
         "starts one in the board: give one", "--model"),
        (["--serve-key", "k", "--model", "x"], "--serve-key is the key of a serve process named by --serve; the engine "
         "--model starts in the board takes none: drop --serve-key", "give --serve"),
    ],
)  # fmt: skip
def test_the_boards_playground_refusals_name_the_flags_given(flags, words, wrong, tmp_path, capsys):
    """--serve with --adapter (no --model) was refused naming --model, which the user did not give; --serve-key with
    --model said "give --serve URL too", which was then refused (--serve with --model). Each line is true now."""
    from deltatune.cli import main

    assert main(["board", "--runs", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err == f"deltatune board: error: {words}\n" and wrong not in err


@pytest.mark.parametrize(
    "argv, want",
    [
        (["generate", "--adapter", "a", "--dtype", "bf16"], "unrecognized arguments: --dtype bf16\n"),
        (
            ["generate", "--adaptr", "x"],
            "required: --adapter; unrecognized argument --adaptr: did you mean --adapter?\n",
        ),
        (["generate", "--prompt", "p", "--adaptr=x"], "unrecognized argument --adaptr: did you mean --adapter?\n"),
        (
            ["generate", "--adapter", "a", "--promt", "p"],
            "unrecognized arguments: --promt p; did you mean --prompt?\n",
        ),
    ],
)
def test_a_mistyped_flag_names_its_nearest_flag_only_when_near(argv, want, capsys):
    """generate --dtype bf16 suggested --adapter (difflib's 0.6 cutoff); --adaptr x said only "required: --adapter"
    (argparse refuses the missing flag before the unknown one is seen). Now a cutoff of 0.8 and the nearest flag
    beside the missing one."""
    from deltatune.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("usage: deltatune generate") and err.endswith(want), err
