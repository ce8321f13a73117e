"""Tables, pictures and JSON of a training-command run: a comparison or a sweep."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

__all__ = ["summarize", "summarize_sweep", "format_results", "write_outputs", "plot_curves", "plot_sweep"]

# The numbers of one run that a summary keeps, over seeds (each run has those of its task).
SUMMARY_FIELDS = ("final_test_accuracy", "best_test_accuracy", "best_epoch", "final_val_bpb", "final_test_bpb",
                  "best_val_bpb", "final_train_bpb", "wall_time_s", "optimizer_step_time_s", "final_lr_scale",
                  "final_lr")

# (header, field, format) of the comparison table, per kind of task.
IMAGE_COLUMNS = (
    ("final test acc", "final_test_accuracy", "{:.4f}"),
    ("best test acc", "best_test_accuracy", "{:.4f}"),
    ("best epoch", "best_epoch", "{:.1f}"),
    ("wall time (s)", "wall_time_s", "{:.1f}"),
    ("optimizer.step() (s)", "optimizer_step_time_s", "{:.2f}"),
    ("final LR scale", "final_lr_scale", "{:.3f}"),
)
TEXT_COLUMNS = (
    ("test bpb", "final_test_bpb", "{:.3f}"),
    ("val bpb", "final_val_bpb", "{:.3f}"),
    ("train bpb, last interval", "final_train_bpb", "{:.3f}"),
    ("wall time (s)", "wall_time_s", "{:.1f}"),
    ("optimizer.step() (s)", "optimizer_step_time_s", "{:.2f}"),
    ("final lr", "final_lr", "{:.2e}"),
    ("final LR scale", "final_lr_scale", "{:.3f}"),
)
METRIC_NAMES = {"final_test_accuracy": "final test accuracy", "final_test_bpb": "final test bits per byte"}
SWEEP_NAMES = {"lr": ("η0", "--lr-sweep"), "window_size": ("W", "--window-sweep")}
LINESTYLES = {"zenith": "-", "sgd": "--", "sgd-cosine": "-", "sgd-plateau": ":", "adamw": "-.",
              "prodigy": "-.", "dadapt-sgd": "-."}
# Their effective rate is an Adam-type step size, not comparable with the SGD rates on one axis.
ADAPTIVE = {"adamw": "an Adam step", "prodigy": "d·lr, an Adam-type step", "dadapt-sgd": "d·lr"}


def _mean_std(values: Sequence[float]) -> dict[str, Any]:
    # Sample standard deviation; 0 for a single seed.
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": list(values)}


def _summary_of(per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {field: _mean_std([r[field] for r in per_seed])
                               for field in SUMMARY_FIELDS if field in per_seed[0]}
    summary["seeds"] = len(per_seed)
    return summary


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """``{method: {field: {"mean", "std", "values"}}}`` over the seeds of each method."""
    return {method: _summary_of(per_seed) for method, per_seed in runs.items()}


def summarize_sweep(runs: dict[str, list[dict[str, Any]]], parameter: str, grid: Sequence[float],
                    metric: str) -> dict[str, Any]:
    """The sweep's numbers: for each method, a summary over seeds at each grid value (``"points"``),
    or one summary (``"reference"``) for a method that does not depend on ``parameter``."""
    methods: dict[str, Any] = {}
    for method, method_runs in runs.items():
        if method_runs[0][parameter] is None:
            methods[method] = {"depends": False, "reference": _summary_of(method_runs)}
            continue
        points = []
        for value in grid:
            at_value = [r for r in method_runs if r[parameter] == value]
            points.append({"value": value, **_summary_of(at_value)})
        methods[method] = {"depends": True, "points": points}
    return {"parameter": parameter, "flag": SWEEP_NAMES[parameter][1], "values": list(grid), "metric": metric,
            "methods": methods}


# ------------------------------------------------------------------------------------------ tables
def _cell(fields: dict[str, Any], key: str, fmt: str, seeds: int) -> str:
    if key not in fields:
        return "–"
    value = fields[key]
    if not math.isfinite(value["mean"]):
        return "diverged"
    if seeds > 1:
        return f"{fmt.format(value['mean'])} ± {fmt.format(value['std'])}"
    return fmt.format(value["mean"])


def _spread_line(results: dict[str, Any]) -> str:
    seeds = results["config"]["seeds"]
    if len(seeds) > 1:
        return f"Each cell is the mean ± sample standard deviation over {len(seeds)} seeds ({', '.join(map(str, seeds))})."
    return f"One seed ({seeds[0]}): no spread."


def _metric_line(results: dict[str, Any]) -> str:
    data = results["dataset"]
    if results["metric"] == "final_test_bpb":
        return (f"bpb: bits per byte (cross-entropy / ln 2, lower is better) on fixed samples of "
                f"{data['val_eval_bytes']:,} validation and {data['test_eval_bytes']:,} test bytes, "
                f"after the last step; train bpb is the mean training loss since the previous evaluation.")
    return ("test acc: fraction of the test images classified right after the last epoch; "
            "best: the maximum over epochs, measured on the test set itself (optimistic).")


_TIME_LINE = ("wall time: seconds of one run, training and its evaluations; optimizer.step(): the seconds "
              "spent inside optimizer.step() in that run (host time on the CPU, CUDA events on a GPU).")


def format_results(results: dict[str, Any]) -> str:
    """The printed and saved table, with its caption."""
    if "sweep" in results:
        return format_sweep(results)
    text = results["metric"] == "final_test_bpb"
    columns = TEXT_COLUMNS if text else IMAGE_COLUMNS
    seeds = len(results["config"]["seeds"])
    summary = results["summary"]
    if not any("final_lr_scale" in fields for fields in summary.values()):
        columns = tuple(c for c in columns if c[1] != "final_lr_scale")
    lines = ["| method | " + " | ".join(name for name, *_ in columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for method, fields in summary.items():
        cells = [_cell(fields, key, fmt, seeds) for _, key, fmt in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    caption = [_spread_line(results), _metric_line(results), _TIME_LINE]
    if text:
        caption.append("final lr: the learning rate of the last step (ZENITH: η0 × lr_scale; AdamW's is an Adam "
                       "step size, on another scale).")
    caption.append("final LR scale: ZENITH's lr_scale after the last step.")
    return "\n".join(lines) + "\n\n" + "\n".join(caption)


def format_sweep(results: dict[str, Any]) -> str:
    """Rows: the swept values; columns: the final test metric of each method, then ZENITH's final lr."""
    sweep = results["sweep"]
    name, flag = SWEEP_NAMES[sweep["parameter"]]
    seeds = len(results["config"]["seeds"])
    fmt = "{:.3f}" if sweep["metric"] == "final_test_bpb" else "{:.4f}"
    methods = sweep["methods"]
    headers = [m if entry["depends"] else f"{m} (one run, any {name})" for m, entry in methods.items()]
    zenith = methods.get("zenith")
    with_lr = zenith is not None and zenith["depends"]
    if with_lr:
        headers.append("ZENITH final lr")
    lines = [f"| {name} | " + " | ".join(headers) + " |", "|" + "---|" * (len(headers) + 1)]
    for i, value in enumerate(sweep["values"]):
        cells = []
        for entry in methods.values():
            fields = entry["points"][i] if entry["depends"] else entry["reference"]
            cells.append(_cell(fields, sweep["metric"], fmt, seeds))
        if with_lr:
            cells.append(_cell(zenith["points"][i], "final_lr", "{:.2e}", seeds))
        lines.append(f"| {value:g} | " + " | ".join(cells) + " |")
    other = {"lr": f"W = {results['config']['window_size']}",
             "window_size": f"η0 = {results['config']['lr']}"}[sweep["parameter"]]
    caption = [
        f"{METRIC_NAMES[sweep['metric']]} against {name} ({flag}; {other}). {_spread_line(results)}",
        _metric_line(results),
        "ZENITH final lr: η0 × lr_scale after the last step, the rate it ended at.",
        f"Per-run times are in results.json (wall_time_s, optimizer_step_time_s); the whole sweep took "
        f"{results['total_time_s']:.0f} s.",
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(caption)


# ---------------------------------------------------------------------------------------- pictures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


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


def _style(i: int, method: str) -> dict[str, Any]:
    # Methods can coincide (sgd and sgd-plateau until the first reduction): styles keep both visible.
    return dict(color=f"C{i}", linestyle=LINESTYLES.get(method, "-"), linewidth=1.8 if method == "zenith" else 1.2)


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """Three panels over steps: training loss, the evaluated metric, effective learning rate."""
    plt = _pyplot()
    cfg = results["config"]
    text = results["metric"] == "final_test_bpb"
    to_bits = 1 / math.log(2) if text else 1.0
    fig, (ax_loss, ax_eval, ax_lr) = plt.subplots(1, 3, figsize=(16, 4.6))
    eval_key = "val_bpb" if text else "test_accuracy"
    for i, (method, per_seed) in enumerate(results["runs"].items()):
        style = _style(i, method)
        first = per_seed[0]
        steps = range(1, first["steps"] + 1)
        loss = _mean_curve([[v * to_bits if math.isfinite(v) else float("nan") for v in r["train_loss"]]
                            for r in per_seed])
        width = max(1, first.get("steps_per_epoch", first["steps"] // 20) // 2)
        ax_loss.plot(steps, _smooth(loss, width), label=method, **style)
        ax_eval.plot(first["evals"]["step"], _mean_curve([r["evals"][eval_key] for r in per_seed]),
                     marker=".", markersize=4, label=method, **style)
        lr = _mean_curve([r["effective_lr"] for r in per_seed])
        label = method + (f" ({ADAPTIVE[method]})" if method in ADAPTIVE else "")
        ax_lr.plot(steps, [v if v > 0 else float("nan") for v in lr], label=label, **style)

    seeds = len(cfg["seeds"])
    over = f" (mean of {seeds} seeds)" if seeds > 1 else ""
    if text:
        ax_loss.set(title="training loss, bits per byte" + over, xlabel="step")
        ax_eval.set(title="validation bits per byte" + over, xlabel="step", ylim=_bpb_limits(results["runs"]))
        ax_eval.legend(loc="upper right", fontsize=8)
    else:
        ax_loss.set(title="training loss" + over, xlabel="step", yscale="log")
        ax_eval.set(title="test accuracy" + over + ", zoomed", xlabel="step",
                    ylim=(_accuracy_floor(results["runs"]), 1.0))
        ax_eval.legend(loc="lower right", fontsize=8)
    low = min([cfg["lr"] * 1e-3] + ([cfg["adamw_lr"] * 0.05] if "adamw" in results["runs"] else []))
    # Cosine ends near 0 and Prodigy starts at d0 = 1e-6; neither end is worth six decades of axis.
    ax_lr.set(title="effective learning rate (ZENITH: lr × lr_scale)", xlabel="step", yscale="log",
              ylim=(low, cfg["lr"] * 2))
    for ax in (ax_loss, ax_eval, ax_lr):
        ax.grid(True, alpha=0.3)
    ax_lr.legend(loc="lower left", fontsize=8)
    fig.suptitle(_title(results), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _title(results: dict[str, Any]) -> str:
    cfg, env = results["config"], results["environment"]
    length = f"{cfg['steps']} steps" if "steps" in cfg else f"{cfg['epochs']} epochs"
    adamw = f", AdamW lr {cfg['adamw_lr']}" if "adamw" in cfg["methods"] else ""
    swept = results.get("sweep", {}).get("parameter")
    lr = "η0 swept" if swept == "lr" else f"lr {cfg['lr']}"
    window = "W swept" if swept == "window_size" else f"W {cfg['window_size']}"
    return (f"{results['dataset']['name']}: {length}, batch {cfg['batch_size']}, {lr}{adamw}, {window}, "
            f"weight decay {cfg['weight_decay']} — torch {env['torch']} on {env['device']}")


def _bpb_limits(runs: dict[str, list[dict[str, Any]]]) -> tuple[float, float]:
    """From below the best to a little above the worst value after the first evaluations (the
    untrained model's 8 bits per byte would flatten the rest)."""
    late = [v for per_seed in runs.values() for r in per_seed for v in r["evals"]["val_bpb"][2:] if math.isfinite(v)]
    if not late:
        return (0.0, 8.5)
    return (max(0.0, min(late) - 0.2), max(late) + 0.3)


def _accuracy_floor(runs: dict[str, list[dict[str, Any]]]) -> float:
    """A lower y-limit that shows the differences of the second half of training, where the methods
    are within a few test images of each other (the first epochs then leave the panel)."""
    late = [acc for per_seed in runs.values() for r in per_seed
            for acc in r["evals"]["test_accuracy"][len(r["evals"]["test_accuracy"]) // 2:]]
    worst = min(late)
    return max(0.0, worst - 2 * (1.0 - worst))


def plot_sweep(results: dict[str, Any], path: Path) -> None:
    """The final test metric against the swept value, one line per method with its seed range
    (min to max), the methods that do not depend on it as horizontal bands, and ZENITH's final
    effective learning rate on a second axis."""
    plt = _pyplot()
    sweep = results["sweep"]
    name, flag = SWEEP_NAMES[sweep["parameter"]]
    metric = sweep["metric"]
    values = sweep["values"]
    fig, ax = plt.subplots(figsize=(8.5, 5))
    for i, (method, entry) in enumerate(sweep["methods"].items()):
        style = _style(i, method)
        if not entry["depends"]:
            ref = entry["reference"][metric]
            ax.axhline(ref["mean"], label=f"{method} (one run, any {name})", **{**style, "linestyle": ":"})
            ax.axhspan(min(ref["values"]), max(ref["values"]), color=style["color"], alpha=0.08)
            continue
        fields = [p[metric] for p in entry["points"]]
        ax.plot(values, [f["mean"] for f in fields], marker="o", markersize=4, label=method, **style)
        ax.fill_between(values, [min(f["values"]) for f in fields], [max(f["values"]) for f in fields],
                        color=style["color"], alpha=0.15)
    ax.set(xscale="log", xlabel=f"{name} ({flag})", ylabel=METRIC_NAMES[metric]
           + (" (lower is better)" if metric == "final_test_bpb" else ""))
    ax.grid(True, alpha=0.3)
    ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.minorticks_off()

    zenith = sweep["methods"].get("zenith")
    handles, labels = ax.get_legend_handles_labels()
    if zenith is not None and zenith["depends"]:
        ax_lr = ax.twinx()
        lrs = [p["final_lr"] for p in zenith["points"]]
        line, = ax_lr.plot(values, [f["mean"] for f in lrs], color="black", marker="s", markersize=4,
                           linestyle="--", linewidth=1, label="ZENITH final lr (η0 × lr_scale), right axis")
        ax_lr.fill_between(values, [min(f["values"]) for f in lrs], [max(f["values"]) for f in lrs],
                           color="black", alpha=0.08)
        handles.append(line)
        labels.append(line.get_label())
        if sweep["parameter"] == "lr":
            diagonal, = ax_lr.plot(values, values, color="gray", linestyle=":", linewidth=1,
                                   label="η0 itself, right axis")
            handles.append(diagonal)
            labels.append(diagonal.get_label())
        ax_lr.set(yscale="log", ylabel="ZENITH's final effective learning rate")
    seeds = results["config"]["seeds"]
    spread = f"mean of {len(seeds)} seeds, band: min to max" if len(seeds) > 1 else "one seed"
    ax.legend(handles, labels, fontsize=8, loc="best")
    ax.set_title(f"{METRIC_NAMES[metric]} against {name} ({spread})", fontsize=10)
    fig.suptitle(_title(results), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ output
def write_outputs(results: dict[str, Any], table: str, out: Path, plot_path: Path) -> None:
    """``results.json``, the picture at ``plot_path`` and ``table.md`` in ``out``."""
    out = Path(out)
    with open(out / "results.json", "w", encoding="utf-8") as f:
        # NaN/inf (a diverged run) are written as null: strict JSON readers reject the bare tokens.
        json.dump(_json_safe(results), f, separators=(",", ":"))
    if "sweep" in results:
        plot_sweep(results, plot_path)
    else:
        plot_curves(results, plot_path)
    (out / "table.md").write_text(table + "\n", encoding="utf-8")


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
