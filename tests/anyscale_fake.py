# SPDX-License-Identifier: Apache-2.0
"""The Anyscale SDK's FakeAnyscaleClient, taught what the real backend does with
``canary_percent``: a rollout of a new version onto a running service keeps the old one as
primary until 100; with ``fail`` set the new version reports UNHEALTHY. Shared by the engine
canary and the deploy-job tests (needs the serve environment's ``anyscale``)."""

from __future__ import annotations

from anyscale._private.anyscale_client.fake_anyscale_client import FakeAnyscaleClient


class CanaryFake(FakeAnyscaleClient):
    def __init__(self):
        super().__init__()
        self.fail = False
        self.rollouts: list[int | None] = []
        self.rollbacks: list[str] = []

    def rollout_service(self, model):
        existing = self.get_service(model.name)
        self.rollouts.append(model.canary_percent)
        if existing is None or existing.primary_version is None:
            return super().rollout_service(model)
        old_primary = existing.primary_version
        service = super().rollout_service(model)
        new = service.primary_version
        if model.canary_percent is not None and model.canary_percent < 100:
            if existing.canary_version is not None and existing.canary_version.version == model.version:
                new = existing.canary_version
            new.weight = model.canary_percent
            old_primary.weight = 100 - model.canary_percent
            service.primary_version, service.canary_version = old_primary, new
            service.versions = [old_primary, new]
            if self.fail:
                new.current_state = "UNHEALTHY"
        else:
            service.canary_version = None
            service.current_state = "RUNNING"
        self.update_service(service)
        return service

    def rollback_service(self, service_id, *, max_surge_percent=None):
        super().rollback_service(service_id, max_surge_percent=max_surge_percent)
        self.rollbacks.append(service_id)
        service = self._services[service_id]
        service.primary_version.weight = 100
        service.canary_version = None
        service.versions = [service.primary_version]
