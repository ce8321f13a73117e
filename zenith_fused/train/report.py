"""Tables, pictures and JSON of a training-command run: a comparison or a sweep."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

__all__ = ["summarize", "summarize_sweep", "format_results", "write_outputs", "plot_curves", "plot_sweep", "picture",
           "curves_figure", "sweep_figure", "load_results", "redraw"]

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


def _warmup_lines(results: dict[str, Any]) -> list[str]:
    """What --warmup-steps K did, when it was given (older JSON has no warmup_steps: K = 0)."""
    warmup = results["config"].get("warmup_steps", 0)
    if not warmup:
        return []
    return [f"warmup: K = {warmup} steps: ZENITH's warmup_steps, and a linear warmup over the same K steps for "
            "every other method but sgd (the constant rate without warmup); warmup+constant is SGD with that "
            "warmup and then the constant rate."]


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
    caption = [_spread_line(results), _metric_line(results), _TIME_LINE, *_warmup_lines(results)]
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
        *_warmup_lines(results),
        f"Per-run times are in results.json (wall_time_s, optimizer_step_time_s); the whole sweep took "
        f"{results['total_time_s']:.0f} s.",
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(caption)


# ---------------------------------------------------------------------------------------- pictures
# One style per method in a fixed order, the same in every picture: a colour, a dash pattern and a
# marker, so that two methods whose lines coincide (sgd and sgd-plateau until the first reduction)
# both stay visible. Methods are drawn in this order; a method not listed takes the next spare style.
METHOD_STYLES = {
    "zenith": dict(color="C0", linestyle="-", marker="o"),
    "sgd": dict(color="C1", linestyle=(0, (6, 2)), marker="s"),
    "sgd-cosine": dict(color="C2", linestyle="-.", marker="^"),
    "sgd-plateau": dict(color="C3", linestyle=(0, (1, 1.5)), marker="v"),
    "warmup+constant": dict(color="C8", linestyle=(0, (2, 2)), marker="h"),
    "adamw": dict(color="C4", linestyle=(0, (4, 1, 1, 1, 1, 1)), marker="D"),
    "prodigy": dict(color="C5", linestyle=(0, (3, 1.5, 1, 1.5)), marker="P"),
    "dadapt-sgd": dict(color="C6", linestyle=(0, (3, 1.5, 1, 1.5)), marker="X"),
}
SPARE_STYLES = (dict(color="C7", linestyle=(0, (8, 2, 2, 2)), marker="*"),
                dict(color="C8", linestyle=(0, (2, 2)), marker="h"),
                dict(color="C9", linestyle=(0, (5, 1, 1, 1)), marker="<"))
MARKERS_PER_LINE = 8  # markers along a line over steps, staggered between methods
BAND_ALPHA = 0.12


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _styles(methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{method: style}`` in drawing order: the listed methods first, in their order."""
    known = [m for m in METHOD_STYLES if m in methods]
    others = [m for m in methods if m not in METHOD_STYLES]
    styles = {m: dict(METHOD_STYLES[m]) for m in known}
    for k, m in enumerate(others):
        styles[m] = dict(SPARE_STYLES[k % len(SPARE_STYLES)])
    for m, style in styles.items():
        style.update(linewidth=2.0 if m == "zenith" else 1.4, markersize=5, markerfacecolor="none")
    return styles


def _marks(n: int, k: int, count: int) -> tuple[int, int]:
    """``markevery`` for line ``k`` of ``count`` with ``n`` points: evenly spaced, each line offset
    so that the markers of coinciding lines fall side by side."""
    every = max(1, n // MARKERS_PER_LINE)
    return (min(n - 1, every * k // max(1, count)), every)


def _finite(values: Sequence[float | None]) -> list[float]:
    """JSON keeps a diverged value as null; drawn as a gap."""
    return [float("nan") if v is None or not math.isfinite(v) else float(v) for v in values]


def _band(curves: Sequence[Sequence[float]]) -> tuple[list[float], list[float], list[float]]:
    """(mean, min, max) over seeds at each point, NaN where a seed has none."""
    columns = list(zip(*curves))
    mean = [statistics.fmean(c) if all(math.isfinite(v) for v in c) else float("nan") for c in columns]
    low = [min(c) if all(math.isfinite(v) for v in c) else float("nan") for c in columns]
    high = [max(c) if all(math.isfinite(v) for v in c) else float("nan") for c in columns]
    return mean, low, high


def _smooth(values: Sequence[float], width: int) -> list[float]:
    """Trailing moving average (the raw per-step loss of small batches is too noisy to read)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def _spread_note(seeds: int) -> str:
    return f"mean of {seeds} seeds, band: min to max over the seeds" if seeds > 1 else "one seed"


def _draw(ax, x, curves, style, k, count, label=None, markevery=None):
    """The mean of ``curves`` (one per seed) with its min-max band when there are several."""
    mean, low, high = _band(curves)
    line, = ax.plot(x, mean, label=label, markevery=markevery or _marks(len(x), k, count), **style)
    if len(curves) > 1:
        ax.fill_between(x, low, high, color=style["color"], alpha=BAND_ALPHA, linewidth=0)
    return line


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """Three panels over steps: training loss, the evaluated metric, effective learning rate; the
    legend below them."""
    _save(curves_figure(results), path)


def plot_sweep(results: dict[str, Any], path: Path) -> None:
    """Two panels against the swept value: the final test metric of each method (the methods that do
    not depend on it as horizontal lines), and ZENITH's final effective learning rate; bands are the
    seeds' min to max; the legend below them."""
    _save(sweep_figure(results), path)


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def curves_figure(results: dict[str, Any]):
    """The figure :func:`plot_curves` saves."""
    plt = _pyplot()
    cfg = results["config"]
    text = results["metric"] == "final_test_bpb"
    to_bits = 1 / math.log(2) if text else 1.0
    runs = results["runs"]
    styles = _styles(list(runs))
    fig, (ax_loss, ax_eval, ax_lr) = plt.subplots(1, 3, figsize=(16, 5.2), layout="constrained")
    eval_key = "val_bpb" if text else "test_accuracy"
    handles = []
    for k, (method, style) in enumerate(styles.items()):
        per_seed = runs[method]
        first = per_seed[0]
        steps = list(range(1, first["steps"] + 1))
        width = max(1, first.get("steps_per_epoch", first["steps"] // 20) // 2)
        losses = [_smooth([v * to_bits for v in _finite(r["train_loss"])], width) for r in per_seed]
        _draw(ax_loss, steps, losses, style, k, len(styles))
        evals = first["evals"]["step"]
        _draw(ax_eval, evals, [_finite(r["evals"][eval_key]) for r in per_seed], style, k, len(styles),
              markevery=_marks(len(evals), k, len(styles)) if len(evals) > 2 * MARKERS_PER_LINE else None)
        rates = [[v if v > 0 else float("nan") for v in _finite(r["effective_lr"])] for r in per_seed]
        label = method + (f" ({ADAPTIVE[method]})" if method in ADAPTIVE else "")
        handles.append(_draw(ax_lr, steps, rates, style, k, len(styles), label=label))

    spread = _spread_note(len(cfg["seeds"]))
    if text:
        ax_loss.set(title="training loss", ylabel="bits per byte (moving average)")
        ax_eval.set(title="validation loss", ylabel="validation bits per byte (lower is better)",
                    ylim=_bpb_limits(runs))
    else:
        ax_loss.set(title="training loss", ylabel="cross-entropy, nats (moving average)", yscale="log")
        ax_eval.set(title="test accuracy, zoomed on the second half", ylabel="test accuracy",
                    ylim=(_accuracy_floor(runs), 1.0))
    low = min([cfg["lr"] * 1e-3] + ([cfg["adamw_lr"] * 0.05] if "adamw" in runs else []))
    # Cosine ends near 0 and Prodigy starts at d0 = 1e-6; neither end is worth six decades of axis.
    ax_lr.set(title="effective learning rate", ylabel="learning rate (ZENITH: η0 × lr_scale)", yscale="log",
              ylim=(low, cfg["lr"] * 2))
    for ax in (ax_loss, ax_eval, ax_lr):
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.suptitle(f"{_title(results)}\n{spread}", fontsize=10)
    return fig


# Bits per byte above this are worse than a uniform guess (8 bits): a diverged run, whose thousands
# would flatten every other point; such points are written at the panel's top edge instead.
BPB_CEILING = 9.0


def _cap_bpb(ax, values: Sequence[float], methods: dict[str, Any], metric: str, styles: dict[str, Any]) -> None:
    means = {method: ([p[metric]["mean"] for p in entry["points"]] if entry["depends"]
                      else [entry["reference"][metric]["mean"]])
             for method, entry in methods.items()}
    kept = [m for ms in means.values() for m in ms if m is not None and math.isfinite(m) and m <= BPB_CEILING]
    highs = [(method, value, mean) for method, entry in methods.items() if entry["depends"]
             for value, mean in zip(values, means[method]) if mean is not None and mean > BPB_CEILING]
    if not highs:
        return
    ax.set_ylim(max(0.0, min(kept, default=BPB_CEILING - 1) - 0.3), BPB_CEILING)
    stacked: dict[float, int] = {}
    for method, value, mean in highs:
        row = stacked[value] = stacked.get(value, -1) + 1
        ax.annotate(f"{method} ↑ {mean:.3g}", (value, BPB_CEILING), xytext=(-4, -6 - 12 * row),
                    textcoords="offset points", ha="right", va="top", fontsize=8, color=styles[method]["color"])


def _title(results: dict[str, Any]) -> str:
    cfg, env = results["config"], results["environment"]
    length = f"{cfg['steps']} steps" if "steps" in cfg else f"{cfg['epochs']} epochs"
    adamw = f", AdamW lr {cfg['adamw_lr']}" if "adamw" in cfg["methods"] else ""
    swept = results.get("sweep", {}).get("parameter")
    lr = "η0 swept" if swept == "lr" else f"lr {cfg['lr']}"
    window = "W swept" if swept == "window_size" else f"W {cfg['window_size']}"
    if cfg.get("warmup_steps"):
        window += f", warmup {cfg['warmup_steps']} steps"
    return (f"{results['dataset']['name']}: {length}, batch {cfg['batch_size']}, {lr}{adamw}, {window}, "
            f"weight decay {cfg['weight_decay']} — torch {env['torch']} on {env['device']}")


def _bpb_limits(runs: dict[str, list[dict[str, Any]]]) -> tuple[float, float]:
    """From below the best to a little above the worst value after the first evaluations (the
    untrained model's 8 bits per byte would flatten the rest)."""
    late = [v for per_seed in runs.values() for r in per_seed for v in _finite(r["evals"]["val_bpb"][2:])
            if math.isfinite(v)]
    if not late:
        return (0.0, 8.5)
    return (max(0.0, min(late) - 0.2), max(late) + 0.3)


def _accuracy_floor(runs: dict[str, list[dict[str, Any]]]) -> float:
    """A lower y-limit that shows the differences of the second half of training, where the methods
    are within a few test images of each other (the first epochs then leave the panel)."""
    late = [acc for per_seed in runs.values() for r in per_seed
            for acc in _finite(r["evals"]["test_accuracy"][len(r["evals"]["test_accuracy"]) // 2:])
            if math.isfinite(acc)]
    worst = min(late, default=0.0)
    return max(0.0, worst - 2 * (1.0 - worst))


def sweep_figure(results: dict[str, Any]):
    """The figure :func:`plot_sweep` saves."""
    plt = _pyplot()
    sweep = results["sweep"]
    name, flag = SWEEP_NAMES[sweep["parameter"]]
    metric = sweep["metric"]
    values = sweep["values"]
    methods = sweep["methods"]
    styles = _styles(list(methods))
    zenith = methods.get("zenith")
    with_lr = zenith is not None and zenith["depends"]
    fig, axes = plt.subplots(1, 2 if with_lr else 1, figsize=(13 if with_lr else 7.5, 5), layout="constrained",
                             squeeze=False)
    ax = axes[0][0]
    handles = []
    for k, (method, style) in enumerate(styles.items()):
        entry = methods[method]
        if not entry["depends"]:
            ref = entry["reference"][metric]
            line = ax.axhline(ref["mean"], label=f"{method} (one run, any {name})",
                              **{**style, "marker": None, "linewidth": 1.2})
            if len(ref["values"]) > 1:
                # Dotted edges rather than a fill: the bands of references near one value would merge.
                for edge in (min(ref["values"]), max(ref["values"])):
                    ax.axhline(edge, color=style["color"], linestyle=(0, (1, 3)), linewidth=0.8)
            handles.append(line)
            continue
        per_seed = [list(seed) for seed in zip(*(_finite(p[metric]["values"]) for p in entry["points"]))]
        handles.append(_draw(ax, values, per_seed, style, k, len(styles), label=method, markevery=1))
    ax.set(xscale="log", xlabel=f"{name} ({flag})", ylabel=METRIC_NAMES[metric]
           + (" (lower is better)" if metric == "final_test_bpb" else ""), title=METRIC_NAMES[metric])
    if metric == "final_test_bpb":
        _cap_bpb(ax, values, methods, metric, styles)
    panels = [ax]
    if with_lr:
        ax_lr = axes[0][1]
        per_seed = [list(seed) for seed in zip(*(_finite(p["final_lr"]["values"]) for p in zenith["points"]))]
        _draw(ax_lr, values, per_seed, styles["zenith"], 0, 1, markevery=1)
        # η0 for scale, named on the panel itself: the figure's legend is for the methods.
        reference = dict(color="black", linestyle=(0, (1, 2)), linewidth=1)
        if sweep["parameter"] == "lr":
            ax_lr.plot(values, values, **reference)
            middle = values[len(values) // 2]
            ax_lr.annotate("η0 itself", (middle, middle), xytext=(-6, 4), textcoords="offset points",
                           ha="right", va="bottom", fontsize=9)
        else:
            eta0 = results["config"]["lr"]
            ax_lr.axhline(eta0, **reference)
            ax_lr.annotate(f"η0 = {eta0:g}", (values[0], eta0), xytext=(2, -4), textcoords="offset points",
                           ha="left", va="top", fontsize=9)
        ax_lr.set(xscale="log", yscale="log", xlabel=f"{name} ({flag})",
                  ylabel="ZENITH's final learning rate, η0 × lr_scale", title="ZENITH's final learning rate")
        panels.append(ax_lr)
    for panel in panels:
        panel.grid(True, alpha=0.3)
        panel.set_xticks(values, [f"{v:g}" for v in values])
        panel.minorticks_off()
    if any(not entry["depends"] for entry in methods.values()) and len(results["config"]["seeds"]) > 1:
        handles.append(ax.plot([], [], color="gray", linestyle=(0, (1, 3)), linewidth=0.8,
                               label="a reference's min and max over the seeds")[0])
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles) if len(handles) <= 4 else 3, fontsize=9,
               frameon=False)
    fig.suptitle(f"{_title(results)}\n{_spread_note(len(results['config']['seeds']))}", fontsize=10)
    return fig


# ------------------------------------------------------------------------------------------ output
def write_outputs(results: dict[str, Any], table: str, out: Path, plot_path: Path) -> None:
    """``results.json``, the picture at ``plot_path`` and ``table.md`` in ``out``."""
    out = Path(out)
    with open(out / "results.json", "w", encoding="utf-8") as f:
        # NaN/inf (a diverged run) are written as null: strict JSON readers reject the bare tokens.
        json.dump(_json_safe(results), f, separators=(",", ":"))
    picture(results, plot_path)
    (out / "table.md").write_text(table + "\n", encoding="utf-8")


def picture(results: dict[str, Any], path: Path) -> None:
    """The picture of ``results`` at ``path``: curves for a comparison, the sweep's panels for a sweep."""
    if "sweep" in results:
        plot_sweep(results, path)
    else:
        plot_curves(results, path)


def load_results(path: Path) -> dict[str, Any]:
    """A ``results.json``, in the current layout: files written before the command logged ``"evals"``
    (bench/results/train-digits-cpu-2026-11-29.json) kept them under ``"epochs"``, with no ``"metric"``."""
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    results.setdefault("metric", "final_test_accuracy")
    for per_seed in results["runs"].values():
        for run in per_seed:
            if "evals" not in run and isinstance(run.get("epochs"), dict):
                run["evals"] = run.pop("epochs")
    return results


def redraw(results_path: Path, picture_path: Path | None = None) -> Path:
    """Draw the picture of a saved run again from its JSON (by default next to it, ``.png``)."""
    results_path = Path(results_path)
    picture_path = Path(picture_path) if picture_path is not None else results_path.with_suffix(".png")
    picture(load_results(results_path), picture_path)
    return picture_path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m zenith_fused.train.report RESULTS.json [PICTURE.png]``: redraw a saved run's picture."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m zenith_fused.train.report",
                                     description="Draw the picture of a saved run again from its results.json, "
                                                 "and print its table.")
    parser.add_argument("results", type=Path, help="a results.json written by python -m zenith_fused.train")
    parser.add_argument("picture", type=Path, nargs="?", default=None,
                        help="where to draw it (default: the JSON's path with .png)")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        parser.error(f"{args.results}: no such file")
    path = redraw(args.results, args.picture)
    print(format_results(load_results(args.results)))
    print(f"wrote {path}")
    return 0


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


if __name__ == "__main__":
    raise SystemExit(main())
