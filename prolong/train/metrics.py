"""Per-step training metrics: throughput, MFU in both conventions, tokens per domain.

One ``StepMetrics`` per optimizer step goes three ways: ``ray.train.report`` (the driver's progress
bar and Ray Train's result), ``ray.util.metrics`` gauges (Prometheus / the Ray dashboard's Grafana
panels, names ``prolong_<metric>``, exported as ``ray_prolong_<metric>``), and ``metrics.jsonl`` in
the stage directory.

Throughput and MFU are over the step's **wall time** (``wall_s``): waiting for the loader
(``data_s``), the optimizer step itself (``seconds``) and the checkpoint save at the step's end
(``save_s``; zero on steps that save none). Over ``seconds`` alone they read high by the data
wait and, on a saving step, by the save: what a user pays for is the wall time.

MFU is model FLOPs per second per device over the device's dense bf16 peak. The dense convention
charges every token full attention over the row (6N + 12·L·H·d·S); the document-causal one charges
what a document-masked causal kernel actually computes (6N + 6·L·H·d·Σdᵢ²/S), from the real
document lengths of the step's rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from prolong.model.flops import PEAK_BF16_FLOPS, dense_flops_per_token, doc_causal_flops_per_token
from prolong.spec import ArchitectureSpec

# The one list of exported metrics: the gauges below and the Grafana dashboard
# (prolong.k8s.dashboard) are both made from it.
GAUGE_PREFIX = "prolong_"
PROMETHEUS_PREFIX = "ray_"
TAG_KEYS = ("pipeline", "stage", "stage_id")
"""Tags of every gauge; tokens per domain adds ``domain``."""


@dataclass(frozen=True)
class Metric:
    name: str
    """Gauge name without the prolong_ prefix."""
    title: str
    unit: str
    description: str
    step_field: str
    """The StepMetrics field it exports."""
    by_domain: bool = False

    @property
    def gauge(self) -> str:
        return GAUGE_PREFIX + self.name

    @property
    def prometheus(self) -> str:
        return PROMETHEUS_PREFIX + self.gauge


METRICS: tuple[Metric, ...] = (
    Metric("loss", "Loss", "none", "Token-averaged cross-entropy of the step.", "loss"),
    Metric("tokens_per_second", "Tokens/s", "short", "Training tokens per second, all workers.", "tokens_per_s"),
    Metric("mfu", "MFU (dense)", "percentunit",
           "Model FLOPs utilisation with 6N + 12LHdS FLOPs per token (full causal attention).", "mfu_dense"),
    Metric("mfu_doc_causal", "MFU (document-causal)", "percentunit",
           "MFU counting attention only within packed documents (sum of squared lengths).", "mfu_doc_causal"),
    Metric("grad_norm", "Gradient norm", "none", "Global gradient norm before clipping.", "grad_norm"),
    Metric("lr", "Learning rate", "sci", "Learning rate of the step.", "lr"),
    Metric("domain_tokens", "Tokens per domain", "short",
           "Training tokens consumed so far from each data domain.", "tokens_per_domain", by_domain=True),
    Metric("data_seconds", "Data wait", "s", "Seconds the step waited for its rows (rank 0).", "data_s"),
    Metric("save_seconds", "Checkpoint save", "s",
           "Seconds the checkpoint after the step took to write (0 on other steps).", "save_s"),
    Metric("step", "Step", "none", "Optimizer step.", "step"),
)


@dataclass
class StepMetrics:
    step: int
    loss: float
    lr: float
    grad_norm: float | None
    tokens: int
    """Tokens processed in this step across all workers (rows x sequence length)."""
    valid_tokens: int
    """Tokens that were prediction targets (the loss normaliser)."""
    seconds: float
    """The optimizer step alone (forward, backward, update of every micro-batch)."""
    tokens_per_s: float
    tokens_per_s_per_device: float
    mfu_dense: float | None
    mfu_doc_causal: float | None
    tokens_per_domain: dict[str, int] = field(default_factory=dict)
    """Cumulative tokens consumed per domain since the start of the stage."""
    data_s: float = 0.0
    """Waiting for this rank's rows of the step (the loader's planning and reading)."""
    save_s: float = 0.0
    """Writing and reporting the checkpoint after the step (0 on steps that save none)."""
    wall_s: float = 0.0
    """The step's wall time: data wait + step + save + bookkeeping; throughput and MFU use it."""

    def as_record(self) -> dict[str, Any]:
        return asdict(self)


def step_flops(arch: ArchitectureSpec, seq_len: int, rows_doc_lengths: Iterable[Sequence[int]]
               ) -> tuple[float, float]:
    """(dense, document-causal) FLOPs of one step's rows."""
    dense = causal = 0.0
    for lengths in rows_doc_lengths:
        tokens = sum(lengths)
        eff = sum(d * d for d in lengths) / tokens if tokens else 0.0
        dense += tokens * dense_flops_per_token(arch, seq_len)
        causal += tokens * doc_causal_flops_per_token(arch, eff)
    return dense, causal


def make_step_metrics(*, step: int, loss: float, lr: float, grad_norm: float | None,
                      seconds: float, tokens: int, dense_flops: float, causal_flops: float,
                      valid_tokens: int, devices: int, device_kind: str, gpu_type: str,
                      tokens_per_domain: dict[str, int], data_s: float = 0.0,
                      save_s: float = 0.0, wall_s: float | None = None) -> StepMetrics:
    """Throughput and MFU of a step that processed ``tokens`` tokens and the given FLOPs (summed
    over all data-parallel ranks, see :func:`step_flops`) on ``devices`` devices, over its wall
    time ``wall_s`` (at least ``data_s + seconds + save_s``, which it is when not given)."""
    seconds = max(seconds, 1e-9)
    wall = max(wall_s if wall_s is not None else 0.0, data_s + seconds + save_s)
    peak = PEAK_BF16_FLOPS.get(gpu_type) if device_kind == "gpu" else None
    denom = peak * devices * wall if peak else None
    return StepMetrics(
        step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=tokens, valid_tokens=valid_tokens,
        seconds=seconds, tokens_per_s=tokens / wall,
        tokens_per_s_per_device=tokens / wall / devices,
        mfu_dense=dense_flops / denom if denom else None,
        mfu_doc_causal=causal_flops / denom if denom else None,
        tokens_per_domain=dict(tokens_per_domain), data_s=data_s, save_s=save_s, wall_s=wall)


def with_save_time(m: StepMetrics, save_s: float) -> StepMetrics:
    """``m`` with the checkpoint save that followed its step counted in: ``save_s`` and the wall
    time grow by it, and throughput and MFU are over the longer wall time."""
    wall = m.wall_s + save_s
    scale = m.wall_s / wall if wall > 0 else 1.0
    return replace(m, save_s=m.save_s + save_s, wall_s=wall,
                   tokens_per_s=m.tokens_per_s * scale,
                   tokens_per_s_per_device=m.tokens_per_s_per_device * scale,
                   mfu_dense=None if m.mfu_dense is None else m.mfu_dense * scale,
                   mfu_doc_causal=None if m.mfu_doc_causal is None else m.mfu_doc_causal * scale)


class RayGauges:
    """``ray.util.metrics`` gauges named and tagged as the Grafana dashboard expects
    (:data:`METRICS`), created inside a Ray worker (they need a connected Ray)."""

    def __init__(self, *, pipeline: str, stage: str, stage_id: str):
        from ray.util.metrics import Gauge  # only inside a Ray worker: needs a connected Ray

        self._tags = {"pipeline": pipeline, "stage": stage, "stage_id": stage_id}
        self._gauges = {}
        for metric in METRICS:
            keys = (*TAG_KEYS, "domain") if metric.by_domain else TAG_KEYS
            self._gauges[metric.step_field] = (Gauge(metric.gauge, description=metric.description,
                                                tag_keys=keys), metric.by_domain)

    def update(self, m: StepMetrics) -> None:
        for name, (gauge, by_domain) in self._gauges.items():
            value = getattr(m, name)
            if by_domain:
                for domain, count in value.items():
                    gauge.set(float(count), tags={**self._tags, "domain": domain})
            elif value is not None:
                gauge.set(float(value), tags=self._tags)
