"""The Grafana dashboard for our training metrics, generated from the trainer's one list of
exported metrics (:data:`prolong.train.metrics.METRICS`).

The engine exports each per-step metric as a ``ray.util.metrics.Gauge`` named ``prolong_<metric>``
with the tag keys below; Ray's metrics agent prefixes ``ray_``, so Prometheus sees
``ray_prolong_<metric>``. ``python -m prolong.k8s.dashboard`` writes
``charts/dashboards/prolong-training.json`` (shipped by the chart as a Grafana sidecar ConfigMap);
a test fails when the committed file drifts from this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prolong.k8s.generated import write_generated
from prolong.train.metrics import METRICS, Metric

DASHBOARD_PATH = Path(__file__).resolve().parents[2] / "charts" / "dashboards" / "prolong-training.json"
DASHBOARD_UID = "prolong-training"


def _panel(i: int, metric: Metric) -> dict[str, Any]:
    sel = 'pipeline=~"$pipeline", stage=~"$stage"'
    if metric.by_domain:
        expr = f"sum by (pipeline, stage, domain) ({metric.prometheus}{{{sel}}})"
        legend = "{{stage}} {{domain}}"
    else:
        expr = f"max by (pipeline, stage) ({metric.prometheus}{{{sel}}})"
        legend = "{{pipeline}}/{{stage}}"
    return {
        "id": i + 1,
        "type": "timeseries",
        "title": metric.title,
        "description": metric.description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "fieldConfig": {"defaults": {"unit": metric.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                    "tooltip": {"mode": "multi"}},
        "targets": [{"refId": "A", "expr": expr, "legendFormat": legend,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}],
    }


def dashboard() -> dict[str, Any]:
    anchor = METRICS[0].prometheus

    def var(name: str, query: str) -> dict[str, Any]:
        return {"name": name, "label": name, "type": "query", "query": query,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "includeAll": True, "multi": True, "refresh": 2, "allValue": ".*",
                "current": {"text": "All", "value": "$__all"}}

    return {
        "uid": DASHBOARD_UID,
        "title": "ProLong training",
        "description": "Per-step training metrics of ProLong stages (Ray gauges prolong_*).",
        "tags": ["prolong", "ray"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource",
             "query": "prometheus", "current": {}},
            var("pipeline", f"label_values({anchor}, pipeline)"),
            var("stage", f'label_values({anchor}{{pipeline=~"$pipeline"}}, stage)'),
        ]},
        "panels": [_panel(i, m) for i, m in enumerate(METRICS)],
    }


def dashboard_json() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    return write_generated(dashboard_json(), DASHBOARD_PATH, argv)

if __name__ == "__main__":
    raise SystemExit(main())
