# SPDX-License-Identifier: Apache-2.0
"""A stage started from the other environment says which one to use, before it starts anything."""

import importlib.util

import pytest

from e2e_llm import cli


@pytest.mark.parametrize("command", sorted(cli.NEEDS_ENVIRONMENT))
def test_a_stage_needing_the_other_environment_names_it(command, monkeypatch, capsys):
    module, library, environment = cli.NEEDS_ENVIRONMENT[command]
    present = importlib.util.find_spec(module) is not None  # this environment's truth, either way
    assert (cli.wrong_environment(command) is None) == present

    monkeypatch.setitem(cli.NEEDS_ENVIRONMENT, command, ("e2e_llm_no_such_module", library, environment))
    assert cli.main([command, "--profile", "no-such-profile"]) == cli.CONFIG_ERROR  # before the profile is read
    err = capsys.readouterr().err
    assert f"error: e2e-llm {command} needs {library}, which this Python" in err
    assert f"run it from the {environment} environment (.venv/{environment}/bin/e2e-llm" in err


def test_stages_both_environments_run_are_not_checked():
    for command in ("data", "model", "evaluate", "publish", "render", "validate", "e2e"):
        assert cli.wrong_environment(command) is None
