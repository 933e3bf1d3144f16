"""Training curves as an image (PNG, or any format matplotlib writes): loss (train solid, validation
dashed) and the validation metric per epoch, one colour per run. Uses matplotlib's Agg backend, so it
works without a display."""
from __future__ import annotations

import os


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
    for i, (label, history) in enumerate(histories.items()):
        color = f"C{i % 10}"
        epochs = history["epoch"]
        ax_loss.plot(epochs, history["train_loss"], color=color, label=f"{label} train")
        ax_loss.plot(epochs, history["val_loss"], color=color, linestyle="--", label=f"{label} val")
        ax_metric.plot(epochs, history[f"val_{metric}"], color=color, marker="o", markersize=3, label=label)
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
