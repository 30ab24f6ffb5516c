# SPDX-License-Identifier: Apache-2.0
"""The rendered Anyscale YAMLs through the SDK's own deploy/submit paths, against the SDK's
fake client: the canary deploy (`--canary-percent`, `--max-surge-percent`), the rollback and
the job submissions carry exactly what `make deploy-service|rollback|train|batch` sends."""

from __future__ import annotations

import pytest
import yaml
from conftest import ROOT

pytest.importorskip("anyscale")


@pytest.fixture
def client():
    # Private module of the anyscale SDK: the fake it uses for its own tests (offline).
    from anyscale._private.anyscale_client import FakeAnyscaleClient

    return FakeAnyscaleClient()


def _service_config(name="e2e-llm-prod"):
    from anyscale.service.models import ServiceConfig

    return ServiceConfig.from_yaml(str(ROOT / "services/llm.yaml")).options(name=name)


def test_service_canary_deploy_then_rollback(client):
    from anyscale.service import ServiceSDK

    sdk = ServiceSDK(client=client)
    service_id = sdk.deploy(_service_config())
    first = client.rolled_out_model
    assert first.name == "e2e-llm-prod" and first.canary_percent is None

    # The next version goes out as a canary with 10% of traffic and 20% surge capacity.
    assert sdk.deploy(_service_config(), canary_percent=10, max_surge_percent=20) == service_id
    canary = client.rolled_out_model
    assert (canary.canary_percent, canary.max_surge_percent) == (10, 20)
    rendered = yaml.safe_load((ROOT / "services/llm.yaml").read_text())
    (sent,), (app,) = canary.ray_serve_config["applications"], rendered["applications"]
    assert {k: sent[k] for k in app} == app  # the SDK adds only runtime settings (runtime_env)

    assert sdk.rollback("e2e-llm-prod", max_surge_percent=50) == service_id
    assert client.rolled_back_service == (service_id, 50)


def test_rollback_of_an_unknown_service_fails_clearly(client):
    from anyscale.service import ServiceSDK

    with pytest.raises(RuntimeError, match="'e2e-llm-dev' was not found"):
        ServiceSDK(client=client).rollback("e2e-llm-dev")


@pytest.mark.parametrize("stage, entrypoint", [
    ("train", "e2e-llm train --profile cluster"),
    ("batch", "e2e-llm batch --profile cluster --adapter latest"),
])
def test_job_submission_carries_the_rendered_job(client, stage, entrypoint):
    from anyscale.job import JobSDK
    from anyscale.job.models import JobConfig

    config = JobConfig.from_yaml(str(ROOT / f"jobs/{stage}.yaml")).options(name=f"e2e-llm-{stage}-prod")
    JobSDK(client=client).submit(config)
    job = client.submitted_job
    assert job.name == f"e2e-llm-{stage}-prod"
    assert job.config.entrypoint == entrypoint
    assert job.config.max_retries == yaml.safe_load((ROOT / "configs/deploy.yaml").read_text())["jobs"]["max_retries"]
