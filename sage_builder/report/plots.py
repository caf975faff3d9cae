"""The run's charts as PNG bytes (matplotlib, Agg): ban rates against the published ones, rejects by
reason, training loss and accuracy. Each takes plain data read from a stage's files, so the report
and tests can call them without a run directory."""

from __future__ import annotations

import io
from typing import Any

# SPEC 1.2: banned share per category over the PSA authors' 1,000 users.
PUBLISHED_BAN_RATES = {"Sexuality": 0.81, "Propaganda": 0.75, "Shocking": 0.63, "Violence": 0.52,
                       "Self-Harm": 0.41, "Harassment": 0.27, "Hate": 0.15}
OURS, PUBLISHED, ACCENT = "#2b6cb0", "#a0aec0", "#c05621"


def _figure(width: float, height: float) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    return fig, ax


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def ban_rates_plot(rates: dict[str, float], published: dict[str, float | None] | None = None,
                   users: int | None = None) -> bytes:
    """Grouped bars per category: this run's banned share beside the published one (SPEC 1.2)."""
    import numpy as np

    published = {**PUBLISHED_BAN_RATES, **{k: v for k, v in (published or {}).items() if v is not None}}
    categories = list(rates)
    x = np.arange(len(categories))
    fig, ax = _figure(7.5, 3.6)
    ours = [rates[c] for c in categories]
    theirs = [published.get(c) or 0.0 for c in categories]
    ax.bar(x - 0.2, ours, 0.4, label=f"this run{f' ({users} users)' if users else ''}", color=OURS)
    ax.bar(x + 0.2, theirs, 0.4, label="published (1,000 users)", color=PUBLISHED)
    for xi, value in zip(x, ours):
        ax.text(xi - 0.2, value + 0.015, f"{value:.0%}", ha="center", fontsize=8)
    ax.set_xticks(x, categories, rotation=20)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("share of users banning it")
    ax.set_title("Banned categories: this run vs the published Sage users")
    ax.legend(frameon=False, fontsize=8, loc="upper right")
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def rejects_plot(counts: dict[str, dict[str, int]]) -> bytes:
    """Horizontal bars of rejected items per reason, one colour per stage ({stage: {reason: n}})."""
    rows = [(stage, reason, n) for stage, reasons in counts.items() for reason, n in
            sorted(reasons.items(), key=lambda kv: -kv[1])]
    fig, ax = _figure(7.5, max(1.8, 0.32 * len(rows) + 1.0))
    colours = [OURS, ACCENT, "#2f855a", "#6b46c1"]
    stage_colour = {stage: colours[i % len(colours)] for i, stage in enumerate(counts)}
    labels = [f"{stage}: {reason}" for stage, reason, _ in rows]
    values = [n for _, _, n in rows]
    ax.barh(range(len(rows)), values, color=[stage_colour[s] for s, _, _ in rows])
    for i, value in enumerate(values):
        ax.text(value, i, f" {value}", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("rejected items (every attempt)")
    ax.set_title("Rejects by reason")
    ax.spines[["top", "right"]].set_visible(False)
    if not rows:
        ax.text(0.5, 0.5, "no rejects", ha="center", va="center", transform=ax.transAxes)
    return _png(fig)


def training_curves_plot(metrics: list[dict[str, float]], held_out: float | None = None) -> bytes:
    """Loss and implicit accuracy per optimizer step; chance (0.5) and the held-out accuracy marked."""
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in metrics]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.5, 3.2), dpi=110)
    left.plot(steps, [row["loss"] for row in metrics], color=OURS, marker="o" if len(steps) < 30 else None)
    left.axhline(0.6931, color=PUBLISHED, linestyle="--", linewidth=1, label="log 2 (no preference)")
    left.set_xlabel("step")
    left.set_title("DPO loss")
    left.legend(frameon=False, fontsize=8)
    right.plot(steps, [row["implicit_accuracy"] for row in metrics], color=OURS,
               marker="o" if len(steps) < 30 else None, label="train (per step)")
    right.axhline(0.5, color=PUBLISHED, linestyle="--", linewidth=1, label="chance")
    if held_out is not None:
        right.axhline(held_out, color=ACCENT, linewidth=1.5, label=f"held-out {held_out:.2f}")
    right.set_ylim(-0.05, 1.05)
    right.set_xlabel("step")
    right.set_title("implicit accuracy (ties count half)")
    right.legend(frameon=False, fontsize=8)
    for ax in (left, right):
        ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)
