"""Table, plot and JSON of a ``zenith_fused.train`` comparison."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

__all__ = ["summarize", "format_table", "write_outputs", "plot_curves"]

# The numbers of one run that the table reports, summarised over seeds.
SUMMARY_FIELDS = ("final_test_accuracy", "best_test_accuracy", "best_epoch", "wall_time_s",
                  "optimizer_step_time_s", "final_lr_scale")


LINESTYLES = {"zenith": "-", "sgd": "--", "sgd-cosine": "-", "sgd-plateau": ":", "prodigy": "-.",
              "dadapt-sgd": "-."}


def _mean_std(values: Sequence[float]) -> dict[str, Any]:
    # Sample standard deviation; 0 for a single seed.
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": list(values)}


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """``{method: {field: {"mean", "std", "values"}}}`` over the seeds of each method."""
    summary = {}
    for method, per_seed in runs.items():
        summary[method] = {field: _mean_std([r[field] for r in per_seed])
                           for field in SUMMARY_FIELDS if field in per_seed[0]}
        summary[method]["seeds"] = len(per_seed)
    return summary


def format_table(summary: dict[str, dict[str, Any]], *, seeds: int) -> str:
    """A Markdown table; with several seeds each cell is ``mean ± std``."""
    columns = (
        ("final test acc", "final_test_accuracy", "{:.4f}"),
        ("best test acc", "best_test_accuracy", "{:.4f}"),
        ("best epoch", "best_epoch", "{:.1f}" if seeds > 1 else "{:.0f}"),
        ("wall time (s)", "wall_time_s", "{:.1f}"),
        ("optimizer.step() (s)", "optimizer_step_time_s", "{:.2f}"),
        ("final LR scale", "final_lr_scale", "{:.3f}"),
    )
    header = "| method | " + " | ".join(name for name, *_ in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for method, fields in summary.items():
        cells = []
        for _, key, fmt in columns:
            if key not in fields:
                cells.append("–")
            elif seeds > 1:
                cells.append(f"{fmt.format(fields[key]['mean'])} ± {fmt.format(fields[key]['std'])}")
            else:
                cells.append(fmt.format(fields[key]["mean"]))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    return [statistics.fmean(values) for values in zip(*curves)]


def _smooth(values: Sequence[float], width: int) -> list[float]:
    """Trailing moving average (the raw per-step loss of small batches is too noisy to read)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """Three panels over steps: training loss, test accuracy, effective learning rate."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    cfg = results["config"]
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(16, 4.6))
    for i, (method, per_seed) in enumerate(results["runs"].items()):
        # Methods can coincide (sgd and sgd-plateau until the first reduction): styles keep both visible.
        style = dict(color=f"C{i}", linestyle=LINESTYLES.get(method, "-"),
                     linewidth=1.8 if method == "zenith" else 1.2)
        first = per_seed[0]
        steps = range(1, first["steps"] + 1)
        loss = _mean_curve([[v if math.isfinite(v) else float("nan") for v in r["train_loss"]] for r in per_seed])
        ax_loss.plot(steps, _smooth(loss, max(1, first["steps_per_epoch"] // 2)), label=method, **style)
        ax_acc.plot(first["epochs"]["step"], _mean_curve([r["epochs"]["test_accuracy"] for r in per_seed]),
                    marker=".", markersize=4, label=method, **style)
        lr = _mean_curve([r["effective_lr"] for r in per_seed])
        label = method + (" (d·lr, an Adam-type step)" if method == "prodigy" else "")
        ax_lr.plot(steps, [v if v > 0 else float("nan") for v in lr], label=label, **style)

    seeds = len(cfg["seeds"])
    over = f" (mean of {seeds} seeds)" if seeds > 1 else ""
    ax_loss.set(title="training loss" + over, xlabel="step", yscale="log")
    ax_acc.set(title="test accuracy" + over + ", zoomed", xlabel="step",
               ylim=(_accuracy_floor(results["runs"]), 1.0))
    # Cosine ends near 0 and Prodigy starts at d0 = 1e-6; neither end is worth six decades of axis.
    ax_lr.set(title="effective learning rate (ZENITH: lr × lr_scale)", xlabel="step", yscale="log",
              ylim=(cfg["lr"] * 1e-3, cfg["lr"] * 2))
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(True, alpha=0.3)
    ax_acc.legend(loc="lower right", fontsize=8)
    ax_lr.legend(loc="lower left", fontsize=8)
    env = results["environment"]
    fig.suptitle(f"{results['dataset']['name']}: {cfg['epochs']} epochs, batch {cfg['batch_size']}, "
                 f"lr {cfg['lr']}, W {cfg['window_size']}, weight decay {cfg['weight_decay']} — "
                 f"torch {env['torch']} on {env['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _accuracy_floor(runs: dict[str, list[dict[str, Any]]]) -> float:
    """A lower y-limit that shows the differences of the second half of training, where the methods
    are within a few test images of each other (the first epochs then leave the panel)."""
    late = [acc for per_seed in runs.values() for r in per_seed
            for acc in r["epochs"]["test_accuracy"][len(r["epochs"]["test_accuracy"]) // 2:]]
    worst = min(late)
    return max(0.0, worst - 2 * (1.0 - worst))


def write_outputs(results: dict[str, Any], table: str, out: Path) -> None:
    """``results.json``, ``curves.png`` and ``table.md`` in ``out``."""
    out = Path(out)
    with open(out / "results.json", "w", encoding="utf-8") as f:
        # NaN/inf (a diverged run) are written as null: strict JSON readers reject the bare tokens.
        json.dump(_json_safe(results), f, separators=(",", ":"))
    plot_curves(results, out / "curves.png")
    (out / "table.md").write_text(table + "\n", encoding="utf-8")


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
