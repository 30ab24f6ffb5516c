# SPDX-License-Identifier: Apache-2.0
"""Observability artifacts for the serving stage, rendered from code.

``pod_monitor(config)`` is a Prometheus Operator ``PodMonitor`` that scrapes Ray's metrics
port (``metrics``, 8080) on every KubeRay pod; ``grafana_dashboard()`` is a Grafana
dashboard (JSON model) for request rate, latency, time to first token, tokens/s and errors
per model and adapter, built from three metric families that all leave through that port:

- Ray Serve: ``ray_serve_num_http_requests_total``, ``ray_serve_http_request_latency_ms``,
  ``ray_serve_num_http_error_requests_total`` (per route/application);
- vLLM engine (``log_engine_metrics``): ``ray_vllm_*`` (tokens, TTFT, running/waiting,
  KV cache), labelled ``model_name``;
- the e2e-llm ingress (``e2e_llm.ingress``): ``ray_e2e_llm_requests_total``,
  ``ray_e2e_llm_request_errors_total``, ``ray_e2e_llm_request_latency_seconds``, labelled
  ``model``, ``alias`` and ``version`` (the adapter id; empty for the base model), which the
  canary's SLO gate reads too.
"""

from __future__ import annotations

from typing import Any

from e2e_llm.config import PipelineConfig

RAY_METRICS_PORT_NAME = "metrics"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def pod_monitor(config: PipelineConfig, namespace: str | None = None) -> dict[str, Any]:
    """Prometheus Operator PodMonitor for Ray's metrics port on the service's KubeRay pods."""
    metadata: dict[str, Any] = {
        "name": f"{config.serve.app_name}-ray-metrics",
        "labels": {"app.kubernetes.io/part-of": "e2e-llm", "app.kubernetes.io/component": "serve"},
    }
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": metadata,
        "spec": {
            "jobLabel": "ray.io/cluster",
            # Head and worker pods of every RayCluster (a RayService creates new clusters on
            # upgrade, with generated names), so select on the node label, not the name.
            "selector": {"matchLabels": {"ray.io/is-ray-node": "yes"}},
            "podMetricsEndpoints": [
                {
                    "port": RAY_METRICS_PORT_NAME,
                    "interval": "15s",
                    "relabelings": [
                        {"sourceLabels": [f"__meta_kubernetes_pod_label_{label}"], "targetLabel": label}
                        for label in ("ray_io_cluster", "ray_io_node_type")
                    ],
                }
            ],
        },
    }


def _panel(pid: int, title: str, unit: str, targets: list[tuple[str, str]], x: int, y: int,
           w: int = 12, h: int = 8) -> dict[str, Any]:
    return {
        "id": pid,
        "type": "timeseries",
        "title": title,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def grafana_dashboard() -> dict[str, Any]:
    """Grafana dashboard JSON model: traffic, latency, tokens/s and errors per model/adapter."""
    rate = "[$__rate_interval]"
    per_version = "model, alias, version"
    panels = [
        _panel(1, "Requests/s by model, alias and version", "reqps", [
            (f"sum by ({per_version}) (rate(ray_e2e_llm_requests_total{rate}))", "{{model}} {{alias}} {{version}}"),
        ], 0, 0),
        _panel(2, "Errors/s by model, alias and version", "reqps", [
            (f"sum by ({per_version}, code) (rate(ray_e2e_llm_request_errors_total{rate}))",
             "{{model}} {{alias}} {{version}} {{code}}"),
            (f"sum by (route, error_code) (rate(ray_serve_num_http_error_requests_total{rate}))",
             "serve {{route}} {{error_code}}"),
        ], 12, 0),
        _panel(3, "Request latency p50 / p95 by version", "s", [
            ((f"histogram_quantile(0.5, sum by (le, {per_version}) "
             f"(rate(ray_e2e_llm_request_latency_seconds_bucket{rate})))"), "p50 {{model}} {{alias}} {{version}}"),
            ((f"histogram_quantile(0.95, sum by (le, {per_version}) "
             f"(rate(ray_e2e_llm_request_latency_seconds_bucket{rate})))"), "p95 {{model}} {{alias}} {{version}}"),
        ], 0, 8),
        _panel(4, "Time to first token p50 / p95 (engine)", "s", [
            ((f"histogram_quantile(0.5, sum by (le, model_name) "
             f"(rate(ray_vllm_time_to_first_token_seconds_bucket{rate})))"), "p50 {{model_name}}"),
            ((f"histogram_quantile(0.95, sum by (le, model_name) "
             f"(rate(ray_vllm_time_to_first_token_seconds_bucket{rate})))"), "p95 {{model_name}}"),
        ], 12, 8),
        _panel(5, "Tokens/s (generation and prompt)", "short", [
            (f"sum by (model_name) (rate(ray_vllm_generation_tokens_total{rate}))", "generated {{model_name}}"),
            (f"sum by (model_name) (rate(ray_vllm_prompt_tokens_total{rate}))", "prompt {{model_name}}"),
        ], 0, 16),
        _panel(6, "Engine queue and KV cache", "short", [
            ("sum by (model_name) (ray_vllm_num_requests_running)", "running {{model_name}}"),
            ("sum by (model_name) (ray_vllm_num_requests_waiting)", "waiting {{model_name}}"),
            ("avg by (model_name) (ray_vllm_kv_cache_usage_perc)", "KV cache used {{model_name}}"),
        ], 12, 16),
        _panel(7, "HTTP requests/s and p95 latency (Ray Serve proxy)", "short", [
            (f"sum by (route, status_code) (rate(ray_serve_num_http_requests_total{rate}))",
             "{{route}} {{status_code}}"),
            (f"histogram_quantile(0.95, sum by (le, route) (rate(ray_serve_http_request_latency_ms_bucket{rate})))",
             "p95 ms {{route}}"),
        ], 0, 24, w=24),
    ]
    return {
        "title": "e2e-llm serving",
        "uid": "e2e-llm-serve",
        "tags": ["e2e-llm", "ray-serve", "vllm"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
        ]},
        "panels": panels,
    }
