"""What a training stage cost and how it went: ``report.md`` and ``curves.png`` in its directory,
and the figures of one stage that ``prolongctl report`` (:mod:`prolong.run.report`) puts side by
side.

Every figure is computed from ``metrics.jsonl`` (one row per step, replayed steps replaced):

- *step time* is the sum of the steps' wall times (``wall_s``: the data wait, the optimizer step
  and the checkpoint saves; rows written before wall_s existed count their ``seconds``), without
  start-up or data preparation; *device-hours* = step time x devices / 3600; the data wait and
  the saves are also shown alone;
- *tokens/s per device* = tokens / step time / devices;
- MFU is the mean of the per-step values (only on GPUs: a CPU has no rated peak here), in both
  conventions (dense 6N + 12LHdS, and document-causal).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prolong.plots import png_bytes, pyplot

TRAIN_REPORT = "report.md"
CURVES_PNG = "curves.png"


@dataclass(frozen=True)
class TrainingFigures:
    """The headline figures of one training stage."""

    steps: int
    tokens: int
    step_seconds: float
    devices: int
    first_loss: float | None
    """Mean loss of the first loss_window(steps) steps (last_loss: of the last ones)."""
    last_loss: float | None
    min_loss: float | None
    mfu_dense: float | None
    mfu_doc_causal: float | None
    tokens_per_domain: dict[str, int]
    data_seconds: float = 0.0
    """Of step_seconds: waiting for the loader."""
    save_seconds: float = 0.0
    """Of step_seconds: writing checkpoints."""

    @property
    def device_hours(self) -> float:
        return self.step_seconds * self.devices / 3600

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.step_seconds if self.step_seconds > 0 else None

    @property
    def tokens_per_s_per_device(self) -> float | None:
        rate = self.tokens_per_s
        return None if rate is None else rate / self.devices

    def cost(self, price_per_device_hour: float | None) -> float | None:
        return None if price_per_device_hour is None else self.device_hours * price_per_device_hour


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def loss_window(steps: int) -> int:
    """Steps averaged for the first and last loss: a tenth of the run, 1 to 10 steps. One step's
    loss depends on which domains its rows came from (a row of retrieval documents scores far
    below a row of code), so a single first or last step can say the opposite of the trend."""
    return max(1, min(10, steps // 10))


def training_figures(records: Sequence[dict[str, Any]], devices: int) -> TrainingFigures:
    losses = [r["loss"] for r in records]
    k = loss_window(len(losses))
    return TrainingFigures(
        steps=len(records), tokens=sum(int(r["tokens"]) for r in records),
        step_seconds=sum(float(r.get("wall_s") or r["seconds"]) for r in records),
        data_seconds=sum(float(r.get("data_s", 0.0)) for r in records),
        save_seconds=sum(float(r.get("save_s", 0.0)) for r in records), devices=devices,
        first_loss=_mean(losses[:k]), last_loss=_mean(losses[-k:]) if losses else None,
        min_loss=min(losses) if losses else None,
        mfu_dense=_mean([r.get("mfu_dense") for r in records]),
        mfu_doc_causal=_mean([r.get("mfu_doc_causal") for r in records]),
        tokens_per_domain=dict(records[-1].get("tokens_per_domain", {})) if records else {})


def fmt(value: float | None, spec: str = ",.0f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def training_markdown(title: str, fig: TrainingFigures, *, device: str) -> str:
    """``report.md`` of a training stage."""
    total = sum(fig.tokens_per_domain.values()) or 1
    lines = [
        f"# {title}", "",
        "| figure | value |", "|---|---|",
        f"| steps | {fig.steps:,} |",
        f"| tokens | {fig.tokens:,} |",
        f"| loss (first -> last, means of {loss_window(fig.steps)} steps; min) | "
        f"{fmt(fig.first_loss, '.4f')} -> "
        f"{fmt(fig.last_loss, '.4f')} (min {fmt(fig.min_loss, '.4f')}) |",
        f"| devices | {fig.devices} x {device} |",
        f"| step time | {fmt(fig.step_seconds, ',.1f')} s |",
        f"| of which data wait; checkpoint saves | {fig.data_seconds:,.1f} s; "
        f"{fig.save_seconds:,.1f} s |",
        f"| device-hours | {fmt(fig.device_hours, ',.4f')} |",
        f"| tokens/s (all devices) | {fmt(fig.tokens_per_s)} |",
        f"| tokens/s per device | {fmt(fig.tokens_per_s_per_device)} |",
        f"| MFU, dense 6N+12LHdS | {fmt(fig.mfu_dense, '.1%', 'n/a (no rated peak for ' + device + ')')} |",
        f"| MFU, document-causal | {fmt(fig.mfu_doc_causal, '.1%', 'n/a')} |",
        "",
        "Tokens per domain:", "",
        "| domain | tokens | share |", "|---|---|---|",
        *(f"| {d} | {n:,} | {n / total:.1%} |" for d, n in fig.tokens_per_domain.items()),
        "",
        "Step time is the sum of the steps' wall times (data wait and checkpoint saves "
        "included, start-up not); tokens/s and MFU are over it; "
        "device-hours = step time x devices / 3600. Curves: curves.png.", ""]
    return "\n".join(lines)


SMOOTH_ABOVE = 200
"""Panels of more steps than this draw a running mean over the faded per-step values."""


def smoothing_window(points: int) -> int:
    """1 (no smoothing) up to SMOOTH_ABOVE points; then about a hundredth of the run, at least 5."""
    return 1 if points <= SMOOTH_ABOVE else max(5, points // 100)


def running_mean(xs: Sequence[float], ys: Sequence[float], window: int
                 ) -> tuple[list[float], list[float]]:
    """The mean of each ``window`` consecutive values, placed at the window's middle step."""
    import numpy as np

    means = np.convolve(np.asarray(ys, dtype=float), np.ones(window) / window, mode="valid")
    centres = np.convolve(np.asarray(xs, dtype=float), np.ones(window) / window, mode="valid")
    return centres.tolist(), means.tolist()


def curves_png(records: Sequence[dict[str, Any]], title: str) -> bytes:
    """Loss, learning rate, grad norm, tokens/s, MFU and tokens per domain against step."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), dpi=100)
    steps = [r["step"] for r in records]

    def panel(ax: Any, key: str, label: str, *, log: bool = False, smooth: bool = True) -> None:
        pairs = [(s, r[key]) for s, r in zip(steps, records, strict=True) if r.get(key) is not None]
        if pairs:
            xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
            window = smoothing_window(len(pairs)) if smooth else 1
            if window > 1:  # per-step values of small batches are noise: show their running mean
                ax.plot(xs, ys, linewidth=0.5, alpha=0.25, color="tab:blue")
                ax.plot(*running_mean(xs, ys, window), linewidth=1.5, color="tab:blue",
                        label=f"mean of {window} steps")
                ax.legend(fontsize=8)
            else:
                ax.plot(xs, ys, linewidth=1.5)
            if log and all(p[1] > 0 for p in pairs):
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)

    panel(axes[0][0], "loss", "loss (token-averaged CE)")
    panel(axes[0][1], "lr", "learning rate", smooth=False)
    panel(axes[0][2], "grad_norm", "gradient norm (before clipping)")
    panel(axes[1][0], "tokens_per_s", "tokens/s (all devices)")
    ax = axes[1][1]
    measured = False
    for key, label in (("mfu_dense", "dense"), ("mfu_doc_causal", "document-causal")):
        pairs = [(s, r[key]) for s, r in zip(steps, records, strict=True) if r.get(key) is not None]
        if pairs:
            measured = True
            ax.plot([p[0] for p in pairs], [100 * p[1] for p in pairs], label=label)
    if measured:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "MFU: GPU runs only\n(no rated peak for a CPU)", ha="center",
                va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title("MFU (%)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax = axes[1][2]
    domains = list(dict.fromkeys(d for r in records for d in r.get("tokens_per_domain", {})))
    for d in domains:
        ax.plot(steps, [r.get("tokens_per_domain", {}).get(d, 0) for r in records], label=d)
    if domains:
        ax.legend(fontsize=8)
    ax.set_title("tokens consumed per domain")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    fig.suptitle(title)
    return png_bytes(fig)
