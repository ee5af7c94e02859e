"""The run's report: ``metrics.json``, a PNG plot of loss (and the metric) over steps, and ``report.md``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..files import atomic_write


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(h["step"], h[key]) for h in history if key in h and "step" in h]
    return [p[0] for p in points], [p[1] for p in points]


def plot_panels(history: list[dict[str, Any]], keys: list[str], path: str) -> str | None:
    """One small panel per statistic over steps (four a row), as a PNG: the online stages' (PPO, GRPO) logs.
    None without matplotlib or without history."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not history or not keys:
        return None
    cols = 4
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(12, 2.6 * rows), dpi=100, squeeze=False)
    steps = [h["step"] for h in history]
    for ax, key in zip(axes.flat, keys):
        ax.plot(steps, [h.get(key, float("nan")) for h in history])
        ax.set_title(key.replace("_", " "))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot(history: list[dict[str, Any]], path: str, metric: str | None = None) -> str | None:
    """Training and eval loss (and ``metric``, on a second axis) over steps, as a PNG. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        xs, ys = _series(history, key)
        if xs:
            ax.plot(xs, ys, style, label=key.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if metric:
        xs, ys = _series(history, metric)
        if xs:
            ax2 = ax.twinx()
            ax2.plot(xs, ys, "s--", color="tab:green", label=metric.replace("_", " "))
            ax2.set_ylabel(metric.replace("eval_", ""))
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, loc="best")
    ax.set_title("training curve")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write(
    out_dir: str,
    recipe: dict[str, Any],
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
    notes: list[str],
    metric: str | None,
    samples: list[dict[str, str]] | None = None,
) -> None:
    """Write metrics.json, training_curve.png and report.md (and samples.json: the base model's and the adapted
    model's answers to a few eval prompts, when given) into ``out_dir``; and the log history as ``log_history.jsonl``
    (for the board's curves) where the Trainer did not write it live (stages with their own loop)."""
    log = os.path.join(out_dir, "log_history.jsonl")
    if not os.path.exists(log):
        with open(log, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(h, default=float) + "\n" for h in history)
    if samples:
        with open(os.path.join(out_dir, "samples.json"), "w", encoding="utf-8") as fh:
            json.dump(samples, fh, indent=2, ensure_ascii=False)
    png = plot(history, os.path.join(out_dir, "training_curve.png"), metric)
    lines = [
        f"# Run report: {recipe['stage']} with {recipe['method'].get('name')} on {recipe['model']['name_or_path']}",
        "",
        "## Final metrics",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items())],
        "",
    ]
    if png:
        lines += ["## Training curve", "", f"![training curve]({os.path.basename(png)})", ""]
    if samples:
        from .chat import markdown

        lines += ["## Answers before and after (greedy, held-out prompts)", "", markdown(samples), ""]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    lines += ["## Recipe", "", "```yaml", _yaml(recipe), "```", ""]
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
    # Last, and whole or not at all: it marks the run finished (runfolder.FINISHED_FILE), so a run stopped before it
    # can still be resumed to write the rest.
    text = json.dumps(metrics, indent=2, sort_keys=True, default=_plain)
    atomic_write(os.path.join(out_dir, "metrics.json"), lambda f: Path(f).write_text(text, encoding="utf-8"))


def _plain(value: Any) -> Any:
    """A numpy scalar's or a 0-d tensor's Python number (a user's compute_metrics, a reward's mean), for JSON."""
    return value.item() if hasattr(value, "item") else float(value)


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False).rstrip()
