"""``python benchmarks/bench.py --quick``: one LoRA comparison on a tiny Llama gives the report's rows and columns.

A smoke test of the harness (benchmarks/bench.py and bench_worker.py), not of speed: it checks that every figure
is there and positive, never how large it is.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
from tiny import markdown_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(BENCHMARKS, "bench.py")), reason="no benchmarks/")


def main(argv: list[str]) -> int:
    """``python benchmarks/bench.py ARGV``, in this process."""
    sys.path.insert(0, BENCHMARKS)
    import bench

    return bench.main(argv)


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft")
@pytest.mark.parametrize("fused", [False, True])
def test_quick_lora_report(tmp_path, capsys, fused):
    out, raw = tmp_path / "bench.md", tmp_path / "bench.json"
    argv = ["--quick", "--configs", "llama-fp32", "--methods", "lora", "--startup-repeats", "0"] + [
        "--fused-loss"
    ] * fused
    assert main([*argv, "--out", str(out), "--json", str(raw)]) == 0
    text = out.read_text(encoding="utf-8")
    assert text in capsys.readouterr().out
    loss = "fused (`fused_loss=True`" if fused else "transformers' (the library default)"
    assert f"- deltatune's causal-LM loss: {loss}" in text

    assert "- Command: `python benchmarks/bench.py --quick --configs llama-fp32" in text
    assert "torch 2." in text and "peft " in text and "transformers " in text
    assert "### llama-fp32" in text and "### Start-up" in text

    header, *rows = markdown_table(text, "Training")
    assert header[:5] == ["method", "trainable params", "step ms deltatune", "step ms peft", "d/p"]
    assert "memory / full" in header
    assert [r[0] for r in rows] == ["LoRA r=8, alpha 16, q+v"]
    lora = dict(zip(header, rows[0]))
    # tiny Llama: r * (d_in + d_out) per q_proj / v_proj, 2 layers, hidden 64
    assert _number(lora["trainable params"]) == 8 * (64 + 64) * 2 * 2
    for column in (
        "step ms deltatune",
        "step ms peft",
        "d/p",
        "tokens/s deltatune",
        "tokens/s peft",
        "peak MiB deltatune",
        "peak MiB peft",
        "adapter MiB deltatune",
        "adapter MiB peft",
    ):
        assert _number(lora[column]) > 0, column
    assert lora["step / full"] == "—"  # full fine-tuning was not run

    header, *rows = markdown_table(text, "Injection, merging and inference (forward latency without labels, no grad)")
    assert len(header) == 14 and len(rows) == 1
    assert all(_number(cell) > 0 for cell in rows[0][1:]), rows[0]

    runs = json.loads(raw.read_text(encoding="utf-8"))["runs"]
    assert sorted(r["side"] for r in runs) == ["deltatune", "peft"]
    for run in runs:
        assert not run["errors"] and len(run["results"]) == 1
        result = run["results"][0]
        assert result["step_ms"] > 0 and result["peak_mem_mib"] > 0 and result["merge_ms"] > 0
        assert result["spec"]["fused_loss"] is fused


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--configs", "--methods", "--warmup", "--steps", "--repeats", "--quick", "--out", "--json"):
        assert option in out


def test_an_out_file_in_no_folder_is_refused_before_measuring(capsys):
    """--out was written only after the whole measurement: a traceback then, and --json never written."""
    with pytest.raises(SystemExit) as exit_:
        main(["--configs", "minilm", "--methods", "lora", "--out", "/nonexistent/bench.md"])
    assert exit_.value.code == 2 and "--out '/nonexistent/bench.md'" in capsys.readouterr().err


@pytest.mark.parametrize(("script", "argv", "said"), [
    ("bench", ["--configs", "minilm", "--methods", "lora", "--out", "{tmp}"], "--out '{tmp}' is a folder"),
    ("llm_quality", ["--quick", "--out", "/nonexistent/q.md"], "--out '/nonexistent/q.md': '/nonexistent' is not a"),
    ("llm_quality", ["--quick", "--sides", "PEFT"], "--sides: unknown side 'PEFT'; sides: deltatune, peft"),
    ("scaling", ["--quick", "--out", "/nonexistent/s.md"], "--out '/nonexistent/s.md': '/nonexistent' is not a"),
])  # fmt: skip
def test_an_output_that_cannot_be_written_is_refused_before_measuring(capsys, tmp_path, script, argv, said):
    """bench.py took a folder as --out, and llm_quality.py and scaling.py checked --out not at all: each failed after
    the whole measurement (an hour and more), losing the report, --json and the answers paired_bleu.py reads;
    llm_quality.py ran its base row before every worker failed on a misspelt side."""
    sys.path.insert(0, BENCHMARKS)
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_:
        module.main([a.format(tmp=tmp_path) for a in argv])
    assert exit_.value.code == 2 and said.format(tmp=tmp_path) in capsys.readouterr().err


def test_unknown_method_is_an_error(capsys):
    assert main(["--methods", "lora,nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown method nope; choose from full, lora, lora-dora, lora-4bit, ia3" in err


def test_method_names_are_the_test_matrix_names():
    """One vocabulary: every method of the bench (and of common.py) is a registry method, optionally ``-variant``,
    and has a config on each side it runs."""
    sys.path.insert(0, BENCHMARKS)
    import bench
    import common

    import deltatune.registry

    assert set(bench.METHODS) <= set(common.METHODS)
    for name in common.METHODS:
        assert common.method(name) in deltatune.registry.names(), name
        assert common.method_config(name, "deltatune", "CAUSAL_LM", **common.MODULES["llama"]).task_type == "CAUSAL_LM"
        if common.peft_has(name) and importlib.util.find_spec("peft") is not None:
            assert common.method_config(name, "peft", "CAUSAL_LM", **common.MODULES["llama"]).task_type == "CAUSAL_LM"
    assert bench.sides("lora-4bit") == ["deltatune", "peft"] and bench.sides("full") == ["deltatune", "torch"]
    assert bench.sides("bottleneck-houlsby") == ["deltatune"]
    with pytest.raises(ValueError, match="peft has no method 'bitfit'"):
        common.method_config("bitfit", "peft", "CAUSAL_LM")
    with pytest.raises(ValueError, match="unknown method 'qlora'"):
        common.method_config("qlora", "deltatune", "CAUSAL_LM")


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft")
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
@pytest.mark.parametrize("config", ["llama-fp32", "minilm"])  # minilm: peft's side keeps classifier and pooler
def test_quick_qlora_reports_the_weights_held(tmp_path, config):
    out = tmp_path / "bench.md"
    # QLoRA alone (a process per side): its row measures itself against the fp32 weights ("vs fp32")
    argv = ["--quick", "--configs", config, "--methods", "lora-4bit", "--startup-repeats", "0"]
    assert main([*argv, "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    title = next(line for line in text.splitlines() if line.startswith("Weights held after training"))
    header, *rows = markdown_table(text, title)
    assert [row[0] for row in rows] == ["QLoRA: NF4 base, LoRA r=8 q+v"]
    qlora = dict(zip(header, rows[0]))
    # 4 bits + constants: about 0.52 bytes per parameter at real sizes; the tiny model's 64-wide layers pay more
    # for the per-layer code books
    for side in ("deltatune", "peft"):
        assert 0.5 <= _number(qlora[f"bytes/param {side}"]) < 0.75, qlora
        assert _number(qlora[f"4-bit layers MiB {side}"]) > 0
    assert _number(qlora["vs fp32 deltatune"]) < 0.3


@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "benchmarks", "mixed_batch.py")), reason="no benchmarks/")
def test_mixed_batch_benchmark_reports_both_passes(tmp_path):
    sys.path.insert(0, BENCHMARKS)
    import mixed_batch

    out = tmp_path / "mixed.md"
    assert mixed_batch.main(["--quick", "--rounds", "1", "--threads", "1", "--out", str(out)]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    start = lines.index("| pass | single adapter ms | 4 adapters mixed ms | mixed throughput / single |")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[start + 2 : start + 4]]
    assert [r[0] for r in rows] == ["inference forward", "training forward + backward"]
    assert all(_number(cell) > 0 for row in rows for cell in row[1:])


@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "benchmarks", "fused_loss.py")), reason="no benchmarks/")
def test_fused_loss_benchmark_runs_and_both_losses_agree(capsys):
    sys.path.insert(0, BENCHMARKS)
    import fused_loss

    assert fused_loss.main(["--quick", "--threads", "1"]) == 0  # 1: the two losses differ
    out = capsys.readouterr().out
    assert "| transformers ForCausalLMLoss |" in out and "| deltatune fused |" in out


@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "benchmarks", "logprobs.py")), reason="no benchmarks/")
def test_logprobs_benchmark_runs_and_both_ways_agree(capsys):
    sys.path.insert(0, BENCHMARKS)
    import logprobs

    assert logprobs.main(["--quick", "--threads", "1"]) == 0  # 1: the chunked log-probs differ from the whole ones
    out = capsys.readouterr().out
    rows = [
        line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| float") or line.startswith("| bf")
    ]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        (dtype, way) for dtype in ("float32", "bfloat16") for way in ("whole log_softmax", "deltatune chunked")
    ]
    assert all(_number(r[2]) > 0 and _number(r[3]) >= 0 for r in rows), rows
    assert "Same log-probs and gradients: yes" in out


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft")
@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "benchmarks", "interleaved.py")), reason="no benchmarks/")
@pytest.mark.parametrize(
    "config, fused, dora", [("llama-fp32", False, False), ("llama-fp32", True, True), ("minilm", False, False)]
)
def test_interleaved_benchmark_reports_every_measure(tmp_path, config, fused, dora):
    sys.path.insert(0, BENCHMARKS)
    import interleaved

    out = tmp_path / "interleaved.md"
    argv = ["--quick", "--config", config, "--rounds", "1", "--threads", "1", "--out", str(out)]
    assert (
        interleaved.main(argv + ["--fused-loss"] * fused + ["--dora"] * dora) == 0
    )  # 1: deltatune's and peft's models do not compute the same outputs
    header, *table = markdown_table(
        out.read_text(encoding="utf-8"), "## deltatune and peft interleaved in one process"
    )
    assert header == ["measure", "deltatune ms", "peft ms", "d/p", "other ms", "ratio to other"]
    step = "DoRA training step" if dora else "LoRA training step"
    assert [r[0] for r in table] == [
        step,
        step,
        "unmerged forward",
        "merged forward",
        "merge + unmerge",
    ]
    assert all(_number(cell) > 0 for row in table for cell in row[1:4]), table
    assert table[0][4].startswith("full fine-tuning ") and _number(table[0][5]) > 0
    assert table[1][4].startswith("floor ") and _number(table[1][5]) > 0
    assert "The floor, a LoRA whose own arithmetic costs next to nothing" in out.read_text(encoding="utf-8")
    assert "Per training step (median): minor page faults" in out.read_text(encoding="utf-8")
    loss = "the fused causal-LM loss" if fused else "transformers' (the library default"
    assert f"- deltatune's loss: {loss}" in out.read_text(encoding="utf-8")
    assert ("alpha 16, q+v, DoRA;" in out.read_text(encoding="utf-8")) == dora


@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "benchmarks", "interleaved.py")), reason="no benchmarks/")
def test_floor_model_is_the_base_with_gradients_at_the_lora_targets():
    """The floor computes the base model's outputs exactly (its shifts start at zero), trains only the shifts, one
    per LoRA target, and every shift gets a gradient: it is a LoRA's step without a LoRA's arithmetic."""
    import torch

    sys.path.insert(0, BENCHMARKS)
    import bench_worker as bw
    import common
    import interleaved

    shape = bw.QUICK["llama-fp32"]
    base, batch, task_type = bw.build(shape, torch.device("cpu"), 0)
    reference, _, _ = bw.build(shape, torch.device("cpu"), 0)
    floor = interleaved.floor_model(base, common.LORA_TARGETS["llama"], task_type)
    trainable = [n for n, p in floor.named_parameters() if p.requires_grad]
    targets = [n for n, _ in reference.named_modules() if n.rsplit(".", 1)[-1] in ("q_proj", "v_proj")]
    assert len(trainable) == len(targets) > 0 and all(n.startswith("floor_shifts.") for n in trainable)
    out = floor(**batch)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, reference(**batch).logits, atol=0, rtol=0)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in floor.floor_shifts.parameters())
    with pytest.raises(ValueError, match="no module named"):
        interleaved.floor_model(reference, ["no_such_layer"], task_type)


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft")
def test_quick_smollm2_lora_report_counts_the_real_model(tmp_path, capsys):
    """The real SmolLM2 configuration: LoRA r8 on q and v of 30 layers, both sides, one process each."""
    out = tmp_path / "bench.md"
    argv = ["--quick", "--configs", "smollm2-fp32", "--methods", "lora", "--startup-repeats", "0"]
    assert main([*argv, "--out", str(out)]) == 0
    header, *rows = markdown_table(out.read_text(encoding="utf-8"), "Training")
    lora = dict(zip(header, rows[0]))
    # q_proj 576 -> 576, v_proj 576 -> 192 (3 key/value heads of 64): r * (d_in + d_out) each, 30 layers
    assert _number(lora["trainable params"]) == 8 * ((576 + 576) + (576 + 192)) * 30
    assert _number(lora["step ms deltatune"]) > 0 and _number(lora["step ms peft"]) > 0


def test_gpu_script_dry_run_plans_without_cuda():
    import subprocess

    env = {**os.environ, "PY": sys.executable}
    done = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run", "--out", "x"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "benchmarks/bench.py --configs llama1b,llama1b-compile --methods full,lora,lora-4bit" in done.stdout
    assert "llama1b: 1.24B parameters, batch 8 x seq 1024, bfloat16" in done.stdout and "dry run: ok" in done.stdout
    bad = subprocess.run(["bash", "benchmarks/gpu.sh", "--nope"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option --nope" in bad.stderr


def test_scaling_fit_recovers_a_quadratic_and_the_quick_run_reports_both_parts(tmp_path):
    """benchmarks/scaling.py: the growth fit on exact values, one length point measured in this process (the script
    runs each in a process of its own), and the quick adapter part's report and plots."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import scaling

    lengths = [128, 256, 512, 1024, 2048]
    a, b, c = scaling.fit(lengths, [3 + 0.5 * n + 2e-4 * n * n for n in lengths])
    assert (a, b, c) == (pytest.approx(3, abs=1e-6), pytest.approx(0.5), pytest.approx(2e-4))
    assert scaling.growth(lengths, [10 + 2 * n for n in lengths], "ms").startswith("linear (0% quadratic")
    point = scaling.length_worker({"variant": "lora deltatune", "seq": 16, "steps": 1, "dtype": "float32",
                                   "quick": True})  # fmt: skip
    assert point["step_ms"] > 0
    text = scaling.length_report([point, {**point, "seq": 32}], str(tmp_path / "scaling-length.png"))
    header, *rows = markdown_table(text, "### Step time (ms, median) against sequence length")
    assert header[:3] == ["variant", "L=16", "L=32"] and [r[0] for r in rows] == ["lora deltatune"]
    out = tmp_path / "scaling.md"
    assert scaling.main(["--quick", "--part", "adapters", "--out", str(out)]) == 0
    header, *rows = markdown_table(
        out.read_text(), "### Mixed-adapter batches: 8 rows x 8 tokens, rows spread over k adapters"
    )
    assert [(r[0], r[1]) for r in rows] == [(p, k) for p in ("inference forward", "training forward + backward")
                                            for k in ("1", "4")]  # fmt: skip
    assert rows[0][3] == "1.00" and float(rows[1][3]) > 0
    assert (tmp_path / "scaling-length.png").stat().st_size > 0 and (tmp_path / "scaling-adapters.png").exists()
