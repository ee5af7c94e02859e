"""The board in a real browser: Debian's headless Chromium driven by Playwright (never ``playwright install``).

A tiny run trains while its page is open, and the loss curve on the page grows; the compare view shows two runs'
metrics and recipe differences; the playground answers with an adapter and the base side by side, equal to the
API's own answers. Screenshots go to ``test-artefacts/board/`` (or $DELTATUNE_TEST_ARTEFACTS/board)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.request

import pytest
from board_helpers import ARTEFACTS
from serving import Server, make_adapters
from tiny import save_tiny

from deltatune.board import create_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Chromium (apt-get install chromium)")
SHOTS = os.path.join(ARTEFACTS, "board")


@pytest.fixture(scope="module")
def browser():
    os.makedirs(SHOTS, exist_ok=True)
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def recipe(model: str, data: str, out: str, **train_args) -> dict:
    return {
        "stage": "cls",
        "model": {"name_or_path": model},
        "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
        "data": {"train": data, "max_length": 32},
        "train": {"batch_size": 8, "lr": 1e-2, "seed": 3, "logging_steps": 1, "report_to": ["none"], **train_args},
        "output": {"dir": out},
    }


def test_the_loss_curve_grows_while_a_run_trains(browser, tmp_path, monkeypatch):
    from deltatune.train import build, train
    from deltatune.train.trainer import DeltaTrainer

    # A tiny run on a quiet machine can finish 30 steps between two looks at the page (seen: counts [17, 30]);
    # a quarter second per step keeps it slower than the page's 150 ms poll, so the growth is always seen.
    step = DeltaTrainer.training_step

    def slow_step(self, *args, **kwargs):
        time.sleep(0.25)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(DeltaTrainer, "training_step", slow_step)

    base = save_tiny(tmp_path / "bert", "bert", "seq_cls", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    words = ["good", "bad", "fine", "awful", "great", "poor", "nice", "dull"]
    rows = [{"text": f"a {w} {words[(i * 3) % 8]} film number {i}", "label": i % 2} for i, w in enumerate(words * 8)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = tmp_path / "runs"
    runs.mkdir()
    server = Server(create_app(str(runs)))
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    failure: list[BaseException] = []

    def run() -> None:
        try:
            train(build(recipe(base, str(data), str(runs / "live"), max_steps=30)))
        except BaseException as exc:  # re-raised in the test's thread
            failure.append(exc)

    try:
        page.goto(server.url + "/?poll=150#runs")
        page.wait_for_selector("#runs-table, main p.muted")
        t0 = time.monotonic()
        trainer = threading.Thread(target=run)
        trainer.start()
        page.wait_for_selector('tr[data-run="live"] a', timeout=120_000)
        page.click('tr[data-run="live"] a')
        counts = []
        while trainer.is_alive():
            points = page.get_attribute("#loss-chart", "data-points") if page.query_selector("#loss-chart") else None
            if points is not None and (not counts or int(points) != counts[-1]):
                counts.append(int(points))
                if len(counts) == 3:
                    page.screenshot(path=os.path.join(SHOTS, "run-training.png"), full_page=True)
            time.sleep(0.05)
        trainer.join()
        print(f"training took {time.monotonic() - t0:.1f} s; chart point counts seen: {counts}")
        assert not failure, failure
        page.wait_for_selector("#run-status.status-finished", timeout=30_000)
        logged = [json.loads(line) for line in (runs / "live" / "log_history.jsonl").read_text().splitlines()]
        losses = sum("loss" in row for row in logged)
        page.wait_for_function(f"document.querySelector('#loss-chart').dataset.points == '{losses}'", timeout=10_000)
        page.screenshot(path=os.path.join(SHOTS, "run-finished.png"), full_page=True)
    finally:
        page.close()
        server.stop()
    assert losses == 30
    growing = [c for c in counts if 0 < c < losses]
    assert len(growing) >= 2 and growing == sorted(growing), counts  # seen growing while the run trained
    assert not errors


def test_compare_and_playground(browser, tmp_path):
    from deltatune.serve import build_engine
    from deltatune.serve.app import create_app as serve_app

    runs = tmp_path / "runs"
    for name, lr, losses in (("first", 0.01, [2.0, 1.5, 1.0]), ("second", 0.001, [2.0, 1.8, 1.7])):
        folder = runs / name
        folder.mkdir(parents=True)
        (folder / "run.yaml").write_text(
            f"stage: cls\nmodel: {{name_or_path: tiny}}\nmethod: {{name: lora, r: 4}}\ntrain: {{lr: {lr}}}\n"
        )
        (folder / "log_history.jsonl").write_text(
            "".join(json.dumps({"loss": v, "step": i + 1}) + "\n" for i, v in enumerate(losses))
        )
        (folder / "metrics.json").write_text(json.dumps({"train_loss": sum(losses) / 3, "eval_accuracy": lr * 50}))
    base, folders = make_adapters(str(tmp_path / "serve"))
    engine = build_engine(base, {"lora": folders["lora"]}, max_wait_ms=5)
    server = Server(create_app(str(runs), serve_app=serve_app(engine, max_tokens=16)))
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(server.url + "/#runs")
        page.check('input[data-run="first"]')
        page.check('input[data-run="second"]')
        page.click("#compare-button")
        page.wait_for_selector("#recipe-diff")
        diff = page.inner_text("#recipe-diff")
        assert "train.lr" in diff and "0.01" in diff and "0.001" in diff and "method.r" not in diff
        assert page.get_attribute("#compare-loss", "data-points") == "6"
        assert "eval_accuracy" in page.inner_text("#compare-metrics")
        page.screenshot(path=os.path.join(SHOTS, "compare.png"), full_page=True)

        page.click("#nav-play")
        page.wait_for_selector("#adapter-picker")
        page.select_option("#adapter-picker", "lora")
        page.fill("#prompt", "the cat sat")
        page.fill("#max-tokens", "6")
        page.click("#send")
        page.wait_for_selector('[data-model="lora"] .answer, [data-model="lora"] .error')
        page.wait_for_selector('[data-model="base"] .answer, [data-model="base"] .error')
        shown = {m: page.inner_text(f'[data-model="{m}"] p') for m in ("lora", "base")}
        page.screenshot(path=os.path.join(SHOTS, "playground.png"), full_page=True)
        want = {m: api_answer(server, m, "the cat sat", 6) for m in ("lora", "base")}
    finally:
        page.close()
        server.stop()
        engine.close()
    assert shown == want and want["lora"] != want["base"]
    assert not errors


def api_answer(server: Server, model: str, prompt: str, max_tokens: int) -> str:
    """The served API's own answer (through the serve app the board mounts at /serve)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    req = urllib.request.Request(
        f"{server.url}/serve/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())["choices"][0]["message"]["content"]
