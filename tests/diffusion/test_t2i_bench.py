"""benchmarks/t2i_digits.py refuses bad options in one line before it trains anything."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = str(Path(__file__).resolve().parents[2] / "benchmarks")


def test_bad_options_are_one_line(tmp_path, capsys):
    sys.path.insert(0, BENCHMARKS)
    import t2i_digits

    cases = [
        (["--methods", "lora,nope"], "unknown method nope; choose from lora"),
        (["--lr", "lora=1e-2,nope=1"], "--lr names unknown method 'nope'"),
        (["--base", str(tmp_path / "missing")], "no base UNet at"),
    ]
    for argv, words in cases:
        assert t2i_digits.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    assert t2i_digits.LR["lora"] == 2e-3  # nothing applied from a refused --lr
