"""A regression or multi-label cls run's main metric (run_glue's eval_pearson; eval_f1_micro) is the one the CLI prints
before and after training and the board lists, not the loss it fell back to."""

import json

import pytest

from deltatune.board.runs import summary
from deltatune.cli import _print_change

REGRESSION = {"eval_pearson": 0.8, "eval_pearson_before": 0.1, "eval_loss": 1.5, "eval_loss_before": 3.0}
MULTI = {"eval_f1_micro": 0.7, "eval_f1_micro_before": 0.2, "eval_loss": 0.4, "eval_loss_before": 0.7}


@pytest.mark.parametrize("metrics, key", [(REGRESSION, "eval_pearson"), (MULTI, "eval_f1_micro")])
def test_the_cli_and_the_board_headline_the_kind_s_own_metric(metrics, key, tmp_path, capsys):
    _print_change(metrics)
    before, after = metrics[f"{key}_before"], metrics[key]
    assert capsys.readouterr().out == f"{key}: {before:.4f} before training -> {after:.4f} after\n"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.yaml").write_text("stage: cls\n")
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(metrics))
    assert key in summary(str(tmp_path), "run")["metrics"]
