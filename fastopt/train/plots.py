"""Training curves as an image (PNG, or any format matplotlib writes): loss (train solid, validation
dashed) and the validation metric per epoch, one colour per run. Uses matplotlib's Agg backend, so it
works without a display."""
from __future__ import annotations

import os


_MARKERS = ("o", "s", "^", "D", "v", "P")


def run_styles(n: int) -> list:
    """(colour, marker) for each of n runs, no two alike: matplotlib's tab10 colours for up to 10 runs, tab20's
    past that, and each further round of 20 with the next marker (`fastopt compare` runs every optimizer)."""
    if n <= 10:
        return [(f"C{i}", _MARKERS[0]) for i in range(n)]
    import matplotlib
    colors = matplotlib.colormaps["tab20"].colors
    return [(colors[i % 20], _MARKERS[(i // 20) % len(_MARKERS)]) for i in range(n)]


def plot_histories(histories: dict, path: str, *, metric: str = "accuracy", title: str = "") -> str:
    """histories: label -> TrainResult.history (runs without a finished epoch are left out). Writes `path`
    and returns it; the directory must exist (it is not created: a mistyped path is an error)."""
    histories = {label: h for label, h in histories.items() if h["epoch"]}
    if not histories:
        raise ValueError("nothing to plot: no run finished an epoch")
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'fastopt[train]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for (label, history), (color, marker) in zip(histories.items(), run_styles(len(histories))):
        epochs = history["epoch"]
        line = {"color": color, "marker": marker if len(histories) > 20 else None, "markersize": 3}  # colours suffice
        ax_loss.plot(epochs, history["train_loss"], label=f"{label} train", **line)
        ax_loss.plot(epochs, history["val_loss"], linestyle="--", label=f"{label} val", **line)
        ax_metric.plot(epochs, history[f"val_{metric}"], color=color, marker=marker, markersize=3, label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss (solid: train, dashed: validation)")
    if all(min(h["train_loss"] + h["val_loss"]) > 0 for h in histories.values()):
        ax_loss.set_yscale("log")  # losses fall over orders of magnitude; log shows the late epochs
    ax_metric.set(xlabel="epoch", ylabel=f"validation {metric}", title=f"validation {metric}")
    for ax in (ax_loss, ax_metric):
        ax.grid(True, alpha=0.3)
    ax_loss.legend(fontsize=7, ncol=2 if len(histories) > 3 else 1)
    ax_metric.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def supported_formats() -> dict:
    """File extensions matplotlib can write (without the dot) -> description."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'fastopt[train]'") from None
    return FigureCanvasAgg.get_supported_filetypes()


def check_plot_path(path: str) -> None:
    """ValueError unless `path` ends in an extension matplotlib writes (.png, .pdf, .svg, ...); ImportError
    without matplotlib. Call it before training, so that a bad name does not waste a run."""
    extension = os.path.splitext(path)[1].lower().lstrip(".")
    formats = supported_formats()
    if extension not in formats:
        what = f"unsupported file type .{extension}" if extension else "no file extension"
        raise ValueError(f"{path}: {what}; use one of {', '.join('.' + f for f in sorted(formats))}")
