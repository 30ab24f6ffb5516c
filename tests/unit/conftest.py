# SPDX-License-Identifier: Apache-2.0
import pytest


@pytest.fixture
def config(local_config, tmp_path):
    """The local profile with its storage in this test's tmp dir."""
    config = local_config.model_copy(deep=True)
    config._root = local_config.root
    config.storage.root = str(tmp_path / "storage")
    return config
