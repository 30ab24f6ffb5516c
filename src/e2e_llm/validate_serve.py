# SPDX-License-Identifier: Apache-2.0
"""Ladder steps 4b and 6: ``serveConfigV2`` through Ray Serve's ``ServeDeploySchema`` with every
``import_path`` imported and every LLM config through ``ray.serve.llm.LLMConfig``; the Anyscale
YAMLs through the SDK's ``JobConfig``/``ServiceConfig`` (offline)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml

from e2e_llm.validate_common import _fmt, _name


def check_import_path(import_path: str, where: str) -> list[str]:
    module, _, attr = import_path.partition(":")
    if not attr:
        module, _, attr = import_path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        return [f"{where}: import_path {import_path!r} does not import: {exc}"]
    return [] if callable(target) else [f"{where}: import_path {import_path!r} is not callable"]


def check_applications(applications: list[dict[str, Any]], where: str) -> list[str]:
    """Every application's import_path imports; its LLM configs pass Ray's LLMConfig."""
    problems = []
    for i, app in enumerate(applications or []):
        at = f"{where}.applications[{i}]"
        if not app.get("import_path"):
            problems.append(f"{at}.import_path: required")
            continue
        problems += check_import_path(app["import_path"], at)
        for j, llm in enumerate((app.get("args") or {}).get("llm_configs") or []):
            try:
                from ray.serve.llm import LLMConfig

                LLMConfig.model_validate(llm)
            except Exception as exc:  # noqa: BLE001  pydantic ValidationError (or ImportError) names the field
                problems.append(f"{at}.args.llm_configs[{j}]: {exc}")
    return problems


def check_serve_config(doc: dict[str, Any]) -> list[str]:
    """``serveConfigV2`` parses with Ray Serve's ServeDeploySchema; its applications import."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    name = _name(doc)
    text = (doc.get("spec") or {}).get("serveConfigV2")
    if not text:
        return [f"{name}: spec.serveConfigV2: missing"]
    try:
        config = yaml.safe_load(text)
        ServeDeploySchema.model_validate(config)
    except yaml.YAMLError as exc:
        return [f"{name}: spec.serveConfigV2: not valid YAML: {exc}"]
    except ValidationError as exc:
        return [f"{name}: spec.serveConfigV2.{_fmt(e['loc'])}: {e['msg']}" for e in exc.errors()]
    return check_applications(config.get("applications"), f"{name}: spec.serveConfigV2")



def check_anyscale(path: Path) -> list[str]:
    """Load a rendered Anyscale YAML through the SDK's own config model (offline)."""
    from anyscale.job.models import JobConfig
    from anyscale.service.models import ServiceConfig

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    model = ServiceConfig if "applications" in data else JobConfig
    try:
        config = model.from_dict(data)
    except Exception as exc:  # noqa: BLE001  TypeError/ValueError; not every message names its field
        return [f"{path}: {model.__name__}.{_anyscale_field(model, data, exc)}: {exc}"]
    if model is ServiceConfig:
        return check_applications([dict(a) for a in config.applications], str(path))
    return []


def _anyscale_field(model: Any, data: dict[str, Any], exc: Exception) -> str:
    """The key of ``data`` the SDK rejected: named in the message, or the first key that
    fails on its own next to a minimal valid config."""
    unknown = [k for k in data if k not in getattr(model, "__dataclass_fields__", {})]
    if unknown:
        return unknown[0]
    named = [k for k in data if f"'{k}'" in str(exc)]
    if named:
        return named[0]
    minimal = {"applications": [{"import_path": "m:f"}]} if "applications" in data else {"entrypoint": "true"}
    for key, value in data.items():
        try:
            model.from_dict({**minimal, key: value})
        except Exception:  # noqa: BLE001  any rejection points at this key
            return key
    return "<config>"

