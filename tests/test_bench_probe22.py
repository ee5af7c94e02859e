"""The benchmark harness's measurement (probe 22): the order of the sides, reports written whole, bad options.

benchmarks/bench.py, bench_worker.py, interleaved.py, scaling.py, fused_loss.py, logprobs.py and common.py; each test
drives the script's own functions with tiny shapes or a fake clock (no figure here is a speed).
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import statistics
import sys
import types
import weakref

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(BENCHMARKS, "bench.py")), reason="no benchmarks/")


def _script(name: str):
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    return importlib.import_module(name)


# -- bench.py: the sides' order -------------------------------------------------------------------------------
def test_bench_pairs_alternate_abba_so_a_steady_drift_favours_neither_side(monkeypatch):
    """bench.py ran deltatune, peft, deltatune, peft: peft one process later every time, so a machine slowing down
    steadily (the docs saw peft's step go 2.0 s -> 2.6-3.4 s within an hour) read as peft being slower. Each process
    here takes 100 ms + 10 ms per process before it (a linear drift, nothing else): with 2 repeats the medians were
    110 vs 120 ms (d/p 0.92); A B B A gives 115 vs 115."""
    bench = _script("bench")
    order: list[str] = []

    def worker(spec):
        order.append(spec["side"])
        step = 100.0 + 10.0 * (len(order) - 1)
        return {"step_ms": step, "peak_mem_mib": 1.0}, None

    monkeypatch.setattr(bench, "_worker", worker)
    settings = bench.Settings(configs=["minilm"], methods=["lora", "bottleneck-houlsby"], warmup=1, steps=1,
                              infer_steps=1, repeats=2, startup_repeats=0, threads=1, device="cpu", quick=True)  # fmt: skip
    cells = bench.measure_methods(settings, log=lambda text: None)
    assert order == ["deltatune", "peft", "peft", "deltatune", "deltatune", "deltatune"]
    d, p = cells["minilm", "lora", "deltatune"], cells["minilm", "lora", "peft"]
    assert d.median("step_ms") == p.median("step_ms") == 115.0
    order.clear()
    bench.measure_methods(bench.Settings(**{**settings.__dict__, "repeats": 3, "methods": ["full"]}), lambda t: None)
    assert order == ["deltatune", "torch", "torch", "deltatune", "deltatune", "torch"]


# -- interleaved.py: who runs after whom ----------------------------------------------------------------------
def test_interleaved_rounds_balance_who_runs_after_whom(monkeypatch):
    """interleaved.py rotated its order (full, deltatune, peft, floor; deltatune, peft, floor, full; ...), which keeps
    the cyclic order: deltatune ran right after full fine-tuning (the step that frees the most memory) in 3 of every
    4 rounds, peft in 1 (first in its round, after the round before). On a fake clock where a call right after
    "full" costs 5 ms more, the medians were deltatune 15 vs peft 10 ms; with a Williams design both are 10."""
    inter = _script("interleaved")
    clock = types.SimpleNamespace(t=0.0, last=None)

    def call(name):
        def run():
            clock.t += 0.010 + (0.005 if clock.last == "full" else 0.0)
            clock.last = name

        return run

    monkeypatch.setattr(inter, "time", types.SimpleNamespace(perf_counter=lambda: clock.t))
    names = ["full", "deltatune", "peft", "floor"]
    times = inter._rounds({n: call(n) for n in names}, rounds=8)
    assert all(len(times[n]) == 8 for n in names)
    d, p = statistics.median(times["deltatune"]), statistics.median(times["peft"])
    assert d == pytest.approx(10) and p == pytest.approx(10)
    for n in range(2, 7):  # each item in each position, and right after each other item, equally often
        rows = _script("common").balanced_orders(n)
        assert all(sorted(row) == list(range(n)) for row in rows)
        positions = {(row[i], i) for row in rows for i in range(n)}
        assert len(positions) == n * n and len(rows) % n == 0
        pairs = [(row[i], row[i + 1]) for row in rows for i in range(n - 1)]
        counts = {pair: pairs.count(pair) for pair in pairs}
        assert len(counts) == n * (n - 1) and len(set(counts.values())) == 1, (n, counts)


# -- reports written whole, and refused before measuring ------------------------------------------------------
def test_a_report_that_fails_to_write_leaves_the_old_file(tmp_path):
    """common.emit wrote with Path.write_text, which empties the file before it writes: a write that failed (here,
    text that does not encode; a full disk or an interrupt alike) lost the previous report and left an empty file.
    bench.py wrote its --out and --json the same way."""
    common = _script("common")
    out = tmp_path / "report.md"
    out.write_text("the old report\n", encoding="utf-8")
    with pytest.raises(UnicodeEncodeError):
        common.emit("a new report \ud800\n", str(out))
    assert out.read_text(encoding="utf-8") == "the old report\n"
    assert sorted(os.listdir(tmp_path)) == ["report.md"]  # no temporary file left
    common.emit("a new report\n", str(out))
    assert out.read_text(encoding="utf-8") == "a new report\n" and sorted(os.listdir(tmp_path)) == ["report.md"]


@pytest.mark.parametrize("script", ["interleaved", "mixed_batch"])
def test_in_process_scripts_refuse_an_unwritable_out_before_measuring(monkeypatch, capsys, script):
    """interleaved.py and mixed_batch.py checked --out only when writing it, after the whole measurement: a
    traceback then, and the report lost."""
    module = _script(script)

    def build(*args, **kwargs):
        raise AssertionError("measured before checking --out")

    monkeypatch.setattr(module, "build", build)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--quick", "--out", "/nonexistent/report.md"])
    assert exit_.value.code == 2
    assert "--out '/nonexistent/report.md': '/nonexistent' is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize(("script", "argv", "said"), [
    ("fused_loss", ["--quick", "--rounds", "-1"], "argument --rounds: must be at least 1, got -1"),
    ("logprobs", ["--quick", "--rounds", "-1"], "argument --rounds: must be at least 1, got -1"),
    ("logprobs", ["--quick", "--threads", "-2"], "argument --threads: must be at least 1, got -2"),
    ("scaling", ["--quick", "--part", "adapters", "--threads", "-1"], "argument --threads: must be at least 1, got -1"),
    ("scaling", ["--quick", "--part", "adapters", "--counts", "4,8"], "--counts: the first is the single-adapter"),
    ("scaling", ["--part", "adapters", "--rows", "8", "--counts", "1,16"], "--counts: 16 adapters in a batch of --rows 8"),
])  # fmt: skip
def test_bad_options_are_one_line_before_measuring(capsys, script, argv, said):
    """--rounds -1 ran fused_loss.py and logprobs.py into statistics' "no median for empty data" after building the
    model; --threads -1 into torch's RuntimeError; scaling.py --counts 4,8 reported k=4 as "1.00 of the single
    adapter", and --counts 1,16 with 8 rows labelled a batch spread over 8 adapters as k=16."""
    module = _script(script)
    with pytest.raises(SystemExit) as exit_:
        module.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and said in err and "Traceback" not in err


def test_scaling_worker_killed_without_a_word_is_one_line(monkeypatch):
    """A length worker killed by the kernel (out of memory) writes nothing to stderr: scaling.py then failed on
    ``[][-1]`` with an IndexError instead of naming the variant and length."""
    scaling = _script("scaling")
    done = types.SimpleNamespace(returncode=-9, stderr="", stdout="")
    monkeypatch.setattr(scaling.subprocess, "run", lambda *a, **k: done)
    args = types.SimpleNamespace(lengths=[16], variants=["lora peft"], steps=1, dtype="float32", quick=True, threads=1)
    with pytest.raises(SystemExit, match=r"^scaling.py: lora peft at 16: exit status -9$"):
        scaling.run_lengths(args)


# -- bench_worker.py: CUDA's clock and peak -------------------------------------------------------------------
def test_cuda_peak_window_starts_after_garbage_is_collected(monkeypatch):
    """On CPU the worker collected garbage before starting the peak window, on CUDA not: tensors held only by a
    reference cycle (a replaced base, a dropped model) counted in peft's and deltatune's CUDA peak alike, as much as
    the cycle held, whenever the collector had not run yet."""
    bw = _script("bench_worker")
    seen: list[bool] = []

    class Held:
        pass

    held = Held()
    held.cycle = held  # only the collector frees it
    gone = weakref.ref(held)
    del held
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: seen.append(gone() is None))
    was = gc.isenabled()
    gc.disable()
    try:
        assert bw._reset_peak(torch.device("cuda")) is True
    finally:
        if was:
            gc.enable()
    assert seen == [True]


def test_injection_is_timed_between_device_syncs(monkeypatch):
    """bench_worker synchronised the device around every timed training step, forward and merge, but read the clock
    right after get_delta_model / get_peft_model: on CUDA the adapters' initialisation kernels were still running,
    and their time fell into the next timed step's synchronisation instead."""
    pytest.importorskip("peft")
    bw = _script("bench_worker")
    import deltatune

    log: list[str] = []
    real_inject, real_clock = deltatune.get_delta_model, bw.time.perf_counter

    def inject(*args, **kwargs):
        log.append("inject")
        return real_inject(*args, **kwargs)

    def clock():
        log.append("clock")
        return real_clock()

    monkeypatch.setattr(deltatune, "get_delta_model", inject)
    monkeypatch.setattr(bw, "_sync", lambda device: log.append("sync"))
    monkeypatch.setattr(bw, "time", types.SimpleNamespace(perf_counter=clock))
    spec = bw.Spec(config="llama-fp32", method="lora", side="deltatune", warmup=0, steps=1, infer_steps=1, quick=True)
    result = bw.measure(spec)
    at = log.index("inject")
    assert log[at - 2 : at] == ["sync", "clock"] and log[at + 1 : at + 3] == ["sync", "clock"], log[at - 3 : at + 4]
    assert result["inject_ms"] > 0


@pytest.mark.parametrize(("script", "argv", "said"), [
    ("qlora_backend", ["--repeats", "0", "--tokens", "8", "--dim", "64"], "argument --repeats: must be at least 1, got 0"),
    ("nf4_error", ["--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
    ("nf4_error", ["--blocks", "5"], "--blocks: no block 5; SmolLM2 has blocks 0-1"),
])  # fmt: skip
def test_side_scripts_bad_options_are_one_line(monkeypatch, capsys, script, argv, said):
    """qlora_backend.py --repeats 0 built both backends' layers and ran into ``min([])``; nf4_error.py --rounds 0 into
    its own ValueError, and --blocks naming no block of the model (SmolLM2 has 30) into "no median for empty data"
    after loading it. The model here is the tiny 2-block Llama of tests/tiny.py, standing in for SmolLM2."""
    from tiny import tiny_model

    import deltatune.train.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: tiny_model("llama"))
    module = _script(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and said in err and "Traceback" not in err


@pytest.mark.parametrize(("argv", "said"), [
    (["--quick", "--out", "{tmp}"], "--out '{tmp}' is a folder; give a file name"),
    (["--quick", "--threads", "0"], "argument --threads: must be at least 1, got 0"),
])  # fmt: skip
def test_fusion_refuses_a_folder_out_and_bad_counts_before_running(monkeypatch, capsys, tmp_path, argv, said):
    """fusion.py found a folder given as --out only when writing the report (IsADirectoryError after the ~15 min
    run; the report lost), and --threads 0 gave torch's RuntimeError traceback."""
    fusion = _script("fusion")

    def ran(*args, **kwargs):
        raise AssertionError("ran before checking the options")

    monkeypatch.setattr(fusion, "load_tokenizer", ran)
    with pytest.raises(SystemExit) as exit_:
        fusion.main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and said.format(tmp=tmp_path) in err and "Traceback" not in err


def test_scaling_orders_are_balanced(monkeypatch):
    """scaling.py ran the variants of each length in one fixed order ("lora deltatune" one process before "lora
    peft" at every length, so a drifting machine read as the same side's speed at every length) and rotated the
    adapter counts (k = 4 ran right after k = 1 in 3 of every 4 rounds, k = 1 never after k = 4)."""
    scaling = _script("scaling")
    ran: list[str] = []

    def run(cmd, **kwargs):
        spec = json.loads(cmd[-1])
        ran.append(spec["variant"])
        return types.SimpleNamespace(returncode=0, stderr="", stdout=json.dumps({**spec, "step_ms": 1, "peak_mib": 1}))

    monkeypatch.setattr(scaling.subprocess, "run", run)
    args = types.SimpleNamespace(lengths=[16, 32, 64], variants=["lora deltatune", "lora peft"], steps=1,
                                 dtype="float32", quick=True, threads=1)  # fmt: skip
    assert len(scaling.run_lengths(args)) == 6
    assert ran == ["lora deltatune", "lora peft", "lora peft", "lora deltatune", "lora deltatune", "lora peft"]

    seen: list[int] = []

    def passes(model, batch):
        def record(names):
            seen.append(len(set(names)))

        return record, lambda names: None

    monkeypatch.setattr(scaling.mixed_batch, "with_loras", lambda *a, **k: torch.nn.Linear(1, 1))
    monkeypatch.setattr(scaling.mixed_batch, "passes", passes)
    args = types.SimpleNamespace(quick=True, dtype="float32", rows=8, adapter_seq=4, counts=[1, 2, 4, 8], rounds=4)
    scaling.run_adapters(args)
    timed = [seen[i : i + 4] for i in range(4, len(seen), 4)]  # the rounds after the warm-up
    pairs = [(row[i], row[i + 1]) for row in timed for i in range(3)]
    assert len(timed) == 4 and {pairs.count(pair) for pair in pairs} == {1} and len(pairs) == 12


def test_gpu_script_runs_every_step_when_one_fails(tmp_path):
    """gpu.sh ran under ``set -e -o pipefail``: the first bench.py step that exited 1 (one cell without a successful
    process) ended the script, and the SmolLM2 and SFT steps of the lent GPU minutes never ran. A stand-in for
    python fails every bench.py step and passes the rest: all 4 steps run, both failures are named, exit status 1.
    An --out with a space was split into two words by the unquoted steps: refused in one line."""
    import subprocess

    fake = tmp_path / "python"
    fake.write_text('#!/bin/bash\necho "ran $2"\ncase "$*" in *bench.py*) exit 1 ;; esac\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    done = subprocess.run(["bash", "benchmarks/gpu.sh", "--out", str(out)], cwd=ROOT, env={**os.environ, "PY": str(fake)},
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1, done.stderr
    log = (out / "log.txt").read_text()
    assert log.count("exit status 1") == 2 and log.count("exit status 0") == 2
    assert "gpu.sh: 2 of 4 steps failed" in done.stderr and done.stderr.count("benchmarks/bench.py --configs") == 2
    bad = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run", "--out", str(tmp_path / "a b")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (
        bad.returncode == 2
        and bad.stderr.strip() == f"gpu.sh: error: --out '{tmp_path / 'a b'}': a folder name without spaces"
    )


def test_bench_refuses_a_warmup_of_zero(monkeypatch, capsys):
    """--warmup 0 was accepted: the first timed step then held AdamW's state allocation (and, on llama1b-compile,
    the whole torch.compile), and with --steps 1 or 2 that set-up was the figure, or half of it."""
    bench = _script("bench")

    def worker(spec):
        raise AssertionError("measured with --warmup 0")

    monkeypatch.setattr(bench, "_worker", worker)
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--configs", "minilm", "--methods", "lora", "--warmup", "0", "--steps", "1"])
    assert exit_.value.code == 2 and "argument --warmup: must be at least 1, got 0" in capsys.readouterr().err
    assert bench.run("minilm", "lora", warmup=0, steps=1, device="cpu") == 2
    assert "--warmup, --steps, --infer-steps and --repeats must be >= 1" in capsys.readouterr().err


def test_scaling_fits_no_growth_through_one_length():
    """scaling.py --lengths 512 fitted a + b*L through one point (least squares' minimum-norm pick of the infinitely
    many lines) and reported it as "linear (0% quadratic ...)"; two lengths give the line through both, exactly."""
    scaling = _script("scaling")
    assert scaling.growth([512], [100.0], "ms") == "one length: no fit"
    assert scaling.growth([512, 512], [100.0, 102.0], "ms") == "one length: no fit"
    assert (
        scaling.growth([500, 1000], [100.0, 150.0], "ms")
        == "linear (0% quadratic at L=1000): 50.0 + 100.00 x + 0.000 x^2 ms, x = L / 1000"
    )
