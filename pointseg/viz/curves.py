"""Training curves as PNGs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io


def dedupe_by_step(history: list[dict]) -> list[dict]:
    """One entry per ``step``, the last one written (a resumed run repeats the steps after its checkpoint)."""
    by_step = {int(h["step"]): h for h in history if "step" in h}
    return [by_step[s] for s in sorted(by_step)]


def loss_curve_png(history: list[dict], keys: list[str] | None = None, title: str = "training loss") -> bytes:
    """PNG bytes of ``history[k][key]`` against ``history[k]["step"]``, one line per key.

    ``keys`` default: every key starting with ``loss``. The y axis is
    logarithmic when all values are positive.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = dedupe_by_step(history)
    if keys is None:
        keys = sorted({k for h in history for k in h if k.startswith("loss")}, key=lambda k: (k != "loss", k))
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    positive = True
    for k in keys:
        pts = [(h["step"], h[k]) for h in history if k in h]
        if pts:
            xs, ys = zip(*pts)
            positive &= min(ys) > 0
            ax.plot(xs, ys, label=k, lw=2 if k == "loss" else 1)
    if positive and history:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if keys:
        ax.legend(fontsize=7)
    return figure_png(fig)


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
