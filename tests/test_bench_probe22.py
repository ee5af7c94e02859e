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
    # the peak window's gc.collect: 0.2 s a call in a test process, 8 s of this test's 12
    monkeypatch.setattr(scaling.bw, "_reset_peak", lambda device: True)
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


# -- review of probe 22: drift at the default repeats, row boundaries, GPU-only lists, --out -----------------
def test_bench_default_repeats_is_even_so_a_steady_drift_favours_neither_side(monkeypatch):
    """A B B A cancels a steady drift in the medians only for an even --repeats: the default 3 ran d p p d d p, and
    with 100 ms + 10 ms per process before it the medians were deltatune 130 vs peft 120 ms (one process of drift
    for peft). The default is 4 (d/p 135 vs 135); an odd count keeps that one process, and --help says so."""
    bench = _script("bench")
    order: list[str] = []
    seen: dict = {}

    def worker(spec):
        order.append(spec["side"])
        return {"step_ms": 100.0 + 10.0 * (len(order) - 1), "peak_mem_mib": 1.0}, None

    def measure(settings, log):
        seen["cells"] = real(settings, log)
        return seen["cells"]

    real = bench.measure_methods
    monkeypatch.setattr(bench, "_worker", worker)
    monkeypatch.setattr(bench, "measure_methods", measure)
    monkeypatch.setattr(bench, "report", lambda *args, **kwargs: "")
    argv = ["--configs", "minilm", "--methods", "lora", "--startup-repeats", "0", "--device", "cpu"]
    assert bench.main(argv) == 0
    cells = seen["cells"]
    d, p = cells["minilm", "lora", "deltatune"], cells["minilm", "lora", "peft"]
    assert len(order) == 8 and d.median("step_ms") == p.median("step_ms") == 135.0
    order.clear()
    assert bench.main([*argv, "--repeats", "3"]) == 0  # the odd residual: one process of drift, peft's way
    d, p = seen["cells"]["minilm", "lora", "deltatune"], seen["cells"]["minilm", "lora", "peft"]
    assert (d.median("step_ms"), p.median("step_ms")) == (130.0, 120.0)
    repeats = next(a for a in bench.parser()._actions if "--repeats" in a.option_strings)
    assert "(default 4" in repeats.help and "an odd count" in repeats.help


class _Stop(Exception):
    """Raised by a stand-in to end a script's main once its options are read."""


def _after_counts(run_rounds, names: list[str]) -> dict[str, dict[str, int]]:
    """{x: {name: how many of name's timed calls ran right after a call of x}}, on a fake clock where a call right
    after x costs 15 ms instead of 10."""
    out = {}
    for x in names:
        clock = types.SimpleNamespace(t=0.0, last=None, after=x)

        def call(name, clock=clock):
            def run(*args):
                clock.t += 0.010 + (0.005 if clock.last == clock.after else 0.0)
                clock.last = name

            return run

        times = run_rounds(clock, {n: call(n) for n in names})
        out[x] = {n: sum(1 for ms in times[n] if ms > 12) for n in names}
    return out


def test_interleaved_rounds_balance_across_row_boundaries_at_the_default_rounds(monkeypatch):
    """The Williams rows ran back to back, so each round's first call followed the last call of the round before,
    outside the design: with 8 rounds of 4 models, "floor" ran right after "full" in 4 rounds, each LoRA in 2; and
    the default 9 rounds is no whole cycle of 4 (training), 6 (the 3 forwards) or 2 (merge). Now an untimed call of
    the round's first function comes before it, and the default is 12 rounds: every model after every one (itself
    included, as a round's first) equally often."""
    inter = _script("interleaved")
    got: dict = {}

    def measure(models, batch, rounds):
        got["rounds"] = rounds
        raise _Stop

    shape = types.SimpleNamespace(dtype="float32")
    monkeypatch.setattr(inter, "build", lambda *a, **k: (None, None, shape))
    monkeypatch.setattr(inter, "max_difference", lambda *a: 0.0)
    monkeypatch.setattr(inter, "measure", measure)
    with pytest.raises(_Stop):
        inter.main([])
    rounds = got["rounds"]

    def run_rounds(clock, fns):
        monkeypatch.setattr(inter, "time", types.SimpleNamespace(perf_counter=lambda: clock.t))
        return inter._rounds(fns, rounds)

    parts = {"train": ["full", "deltatune", "peft", "floor"], "forward": ["base", "deltatune", "peft"],
             "merge": ["deltatune", "peft"]}  # fmt: skip
    for names in parts.values():
        counts = _after_counts(run_rounds, names)
        assert all(len(set(c.values())) == 1 for c in counts.values()), (rounds, counts)
    times = {**parts, "merged": parts["forward"], "faults": parts["train"], "sys": parts["train"]}
    times = {what: {name: [1.0] for name in names} for what, names in times.items()}
    shape = types.SimpleNamespace(batch=1, seq=8, dtype="float32")
    said = "rounds after 1 warm-up, order balanced {}(over whole cycles of 4 rounds for training, 6 for the forwards"
    assert said.format("") in inter.report(times, "minilm", shape, rounds, "python x")
    assert said.format("in part ") in inter.report(times, "minilm", shape, 9, "python x")


def test_scaling_adapter_rounds_balance_across_row_boundaries_at_the_default_rounds(monkeypatch):
    """scaling.py's adapter part ran 3 rounds by default over 4 counts (no whole cycle of the design: k = 64 never
    ran after k = 16 ...) and back to back (each round's first count after the last of the round before). The
    default is now one whole cycle (4 rounds for 4 counts), an untimed training pass of the round's first count
    before it: each count's forward runs after every count's passes equally often."""
    scaling = _script("scaling")
    got: dict = {}

    def capture(a):
        got["a"] = a
        raise _Stop

    real = scaling.run_adapters
    monkeypatch.setattr(scaling, "run_adapters", capture)
    with pytest.raises(_Stop):
        scaling.main(["--part", "adapters"])
    a = got["a"]
    assert a.counts == [1, 4, 16, 64]
    monkeypatch.setattr(scaling, "_shape", lambda *args: types.SimpleNamespace(batch=a.rows, kind="llama"))
    base = types.SimpleNamespace(config=types.SimpleNamespace())
    monkeypatch.setattr(scaling.bw, "build", lambda *args: (base, {}, "CAUSAL_LM"))
    monkeypatch.setattr(scaling.mixed_batch, "with_loras", lambda *args, **kwargs: torch.nn.Linear(1, 1))
    monkeypatch.setattr(scaling, "_rss_mib", lambda: 0.0)
    monkeypatch.setattr(scaling.bw, "_peak_mib", lambda device: 0.0)
    monkeypatch.setattr(scaling.bw, "_reset_peak", lambda device: True)
    calls: dict = {}
    monkeypatch.setattr(scaling.mixed_batch, "passes", lambda model, batch: (calls["forward"], calls["train"]))
    names = [str(k) for k in a.counts]

    def run_rounds(clock, fns):
        def pass_(names_):
            fns[str(len(set(names_)))]()

        calls.update(forward=pass_, train=pass_)
        monkeypatch.setattr(scaling, "time", types.SimpleNamespace(perf_counter=lambda: clock.t))
        times = real(a)["times"]
        return {n: times["forward", int(n)] for n in names}

    counts = _after_counts(run_rounds, names)
    assert all(len(set(c.values())) == 1 for c in counts.values()), (a.rounds, counts)


@pytest.mark.parametrize("configs", ["llama1b,llama1b-compile", "minilm,llama1b"])
def test_bench_refuses_only_gpu_configs_without_cuda(monkeypatch, capsys, configs):
    """--configs llama1b on a machine without CUDA printed a report of nothing (and timed start-up) and exited 0;
    now one line and exit status 2. A list with a CPU configuration still measures that one."""
    bench = _script("bench")
    ran: list[str] = []

    def worker(spec):
        ran.append(spec["config"])
        return {"step_ms": 1.0, "peak_mem_mib": 1.0}, None

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench, "_worker", worker)
    monkeypatch.setattr(bench, "measure_startup", lambda repeats: pytest.fail("timed start-up"))
    monkeypatch.setattr(bench, "report", lambda *args, **kwargs: "")
    mixed = configs.startswith("minilm")
    status = bench.main(["--configs", configs, "--methods", "lora", "--quick"] + ["--startup-repeats", "0"] * mixed)
    err = capsys.readouterr().err
    if mixed:
        assert status == 0 and ran == ["minilm", "minilm"]
    else:
        assert status == 2 and ran == []
        said = "bench.py: error: --configs llama1b,llama1b-compile: GPU only (torch sees no CUDA device); nothing to"
        assert err.strip() == said + " measure"


def test_write_atomic_keeps_a_symlink_and_the_mode_and_leaves_the_umask(tmp_path, monkeypatch):
    """write_atomic renamed its temporary file over the path: a symlinked --out became a regular file (the link's
    target kept the old report), an existing report's mode (0600) became 0644 (the umask's), and the umask was read
    by setting it to 0 for a moment, which a thread creating a file then got 0666 from."""
    common = _script("common")
    target = tmp_path / "real" / "report.md"
    target.parent.mkdir()
    target.write_text("old\n", encoding="utf-8")
    target.chmod(0o600)
    link = tmp_path / "report.md"
    link.symlink_to(target)

    def umask(mask):
        raise AssertionError("os.umask called")

    mask = os.umask(0o022)
    os.umask(mask)
    monkeypatch.setattr(os, "umask", umask)
    common.emit("new\n", str(link))
    assert link.is_symlink() and target.read_text(encoding="utf-8") == "new\n"
    assert (target.stat().st_mode & 0o777) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["real", "report.md"] and os.listdir(target.parent) == ["report.md"]
    fresh = tmp_path / "fresh.md"
    common.write_atomic(fresh, "x\n")
    assert (fresh.stat().st_mode & 0o777) == 0o666 & ~mask


@pytest.mark.parametrize(("out", "said"), [
    ("", "gpu.sh: error: --out needs a folder name, got ''"),
    ("runs/gpu-*", "gpu.sh: error: --out 'runs/gpu-*': a folder name without the glob characters * ? ["),
    ("runs/gpu-[1]", "gpu.sh: error: --out 'runs/gpu-[1]': a folder name without the glob characters * ? ["),
    ("runs/gpu?", "gpu.sh: error: --out 'runs/gpu?': a folder name without the glob characters * ? ["),
])  # fmt: skip
def test_gpu_script_refuses_an_empty_or_globbing_out(tmp_path, out, said):
    """--out '' said "a folder name without spaces"; --out with * ? or [ went into the unquoted steps, where the
    shell expands it against the files there (or keeps it, as it likes)."""
    import subprocess

    fake = tmp_path / "python"
    fake.write_text("#!/bin/bash\nexit 0\n")
    fake.chmod(0o755)
    done = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run", "--out", out], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PY": str(fake)})  # fmt: skip
    assert done.returncode == 2 and done.stderr.strip() == said
