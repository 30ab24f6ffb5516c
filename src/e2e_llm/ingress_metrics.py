# SPDX-License-Identifier: Apache-2.0
"""The ingress's per-version metrics, through ``ray.util.metrics`` (exported on Ray's metrics port
with the ``ray_`` prefix): what the canary's SLO gate (``e2e_llm.canary_io``) and the dashboards
(``e2e_llm.monitoring``) read, and the rule of what a request's outcome counts as.

- ``e2e_llm_requests`` (model, alias, version, status): every request, by its HTTP status;
- ``e2e_llm_request_errors`` (model, alias, version, code): status >= 400, but not
  :data:`~e2e_llm.api_guard.CLIENT_CLOSED_REQUEST` (a client that left says nothing about us);
- ``e2e_llm_request_latency_seconds`` (model, alias, version, stream): end to end (stream: until
  the last chunk), for requests that ended, not for clients that left;
- ``e2e_llm_request_fallbacks`` (model, alias, version = the candidate, code = its error),
  ``e2e_llm_request_retries`` (model), ``e2e_llm_alias_refresh_errors``.
"""

from __future__ import annotations

from e2e_llm.api_guard import CLIENT_CLOSED_REQUEST

LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128]
VERSION_TAGS = ("model", "alias", "version")


class IngressMetrics:
    def __init__(self):
        from ray.util import metrics

        self.requests = metrics.Counter(
            "e2e_llm_requests", description="Requests by model, alias, adapter version and HTTP status.",
            tag_keys=VERSION_TAGS + ("status",))
        self.errors = metrics.Counter(
            "e2e_llm_request_errors", description="Failed requests (status >= 400; not 499, a client that "
            "left before its answer) by version and code.", tag_keys=VERSION_TAGS + ("code",))
        self.latency = metrics.Histogram(
            "e2e_llm_request_latency_seconds", description="End-to-end request latency (stream: until the last chunk).",
            boundaries=LATENCY_BUCKETS_S, tag_keys=VERSION_TAGS + ("stream",))
        self.refresh_errors = metrics.Counter(
            "e2e_llm_alias_refresh_errors", description="Failed reads of the alias records from the adapter store.")
        self.retries = metrics.Counter(
            "e2e_llm_request_retries", description="Requests retried once after their engine replica died.",
            tag_keys=("model",))
        self.fallbacks = metrics.Counter(
            "e2e_llm_request_fallbacks", description="Alias requests whose candidate failed before any token, "
            "answered by the stable version instead (version: the candidate; code: its error).",
            tag_keys=VERSION_TAGS + ("code",))

    def record(self, labels: dict[str, str], code: int, seconds: float, stream: bool) -> None:
        """One request that ended with ``code`` after ``seconds``."""
        self.requests.inc(tags={**labels, "status": str(code)})
        if code == CLIENT_CLOSED_REQUEST:  # neither an error nor a latency: the client left
            return
        if code >= 400:
            self.errors.inc(tags={**labels, "code": str(code)})
        self.latency.observe(seconds, tags={**labels, "stream": str(stream).lower()})
