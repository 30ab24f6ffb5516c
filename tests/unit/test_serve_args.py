# SPDX-License-Identifier: Apache-2.0
"""The serving app's arguments from a profile: request limits (strict), the ingress replica's
adapter-store settings, and no single engine replica in the cluster profile."""

from __future__ import annotations

import pytest

from e2e_llm.config import ConfigError, load_profile
from e2e_llm.serve import ENDPOINT_ENV, _with_runtime_endpoint, app_args


def test_a_typo_in_serve_limits_names_the_key(write_profile):
    path = write_profile(lambda d: d["serve"]["limits"].update(max_nn=4))
    with pytest.raises(ConfigError, match=r"serve\.limits\.max_nn: unknown key"):
        load_profile(str(path))


@pytest.mark.parametrize("key,value", [("max_n", 0), ("max_total_tokens", -1), ("max_body_bytes", 10)])
def test_limits_out_of_range_are_refused(key, value, write_profile):
    path = write_profile(lambda d: d["serve"]["limits"].update({key: value}))
    with pytest.raises(ConfigError, match=rf"serve\.limits\.{key}"):
        load_profile(str(path))


def test_limits_and_retry_reach_the_app_args(project_root):
    config = load_profile("local", root=project_root)
    args = app_args(config)
    assert args["limits"] == {"max_n": config.serve.limits.max_n,
                              "max_total_tokens": config.serve.limits.max_total_tokens,
                              "max_body_bytes": config.serve.limits.max_body_bytes,
                              "default_max_tokens": config.model.max_model_len}
    assert args["retry"] == {"deadline_s": config.serve.retry.deadline_s}


def test_the_ingress_replica_gets_the_store_endpoint_and_region(project_root, monkeypatch):
    for name in ENDPOINT_ENV:
        monkeypatch.delenv(name, raising=False)
    config = load_profile("local", root=project_root)
    env = app_args(config)["ingress_deployment_config"]["ray_actor_options"]["runtime_env"]["env_vars"]
    assert {env[n] for n in ENDPOINT_ENV} == {config.storage.endpoint_url}
    assert env["AWS_DEFAULT_REGION"] == config.storage.region
    assert "VLLM_CPU_KVCACHE_SPACE" not in env  # engine-only settings stay on the engine
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1234")
    moved = _with_runtime_endpoint(app_args(config))
    ingress_env = moved["ingress_deployment_config"]["ray_actor_options"]["runtime_env"]["env_vars"]
    assert ingress_env["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:1234"
    assert moved["ingress_deployment_config"]["ray_actor_options"]["num_cpus"] == 0


def test_the_cluster_profile_has_no_single_engine_replica(project_root):
    config = load_profile("cluster", root=project_root)
    assert config.serve.min_replicas >= 2
    deployment = app_args(config)["llm_configs"][0]["deployment_config"]["autoscaling_config"]
    assert deployment["min_replicas"] >= 2
