# SPDX-License-Identifier: Apache-2.0

import pytest

from e2e_llm.config import ConfigError, load_profile


@pytest.mark.parametrize("profile", ["local", "cluster"])
def test_shipped_profiles_load(project_root, profile):
    config = load_profile(profile, root=project_root)
    assert config.profile == profile
    assert config.path(config.train.recipe).is_file()
    assert config.task_schema().name == "viggo"


def test_typo_names_file_line_and_key(write_profile):
    path = write_profile(lambda d: d["train"].update(num_wrokers=2))
    with pytest.raises(ConfigError) as err:
        load_profile(str(path))
    message = str(err.value)
    assert str(path) in message and "train.num_wrokers: unknown key" in message
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "num_wrokers" in text)
    assert f"{path}:{line}:" in message


def test_a_key_given_twice_is_an_error_not_the_last_one_wins(write_profile):
    path = write_profile(lambda d: None)
    text = path.read_text().replace("batch:\n", "batch:\n  batch_size: 4\n  batch_size: 8\n", 1)
    path.write_text(text)
    first = next(i for i, line in enumerate(text.splitlines(), 1) if "batch_size: 4" in line)
    with pytest.raises(ConfigError, match=rf"{path}: not valid YAML: key 'batch_size' on line {first + 1} "
                                          rf"repeats the one on line {first}"):
        load_profile(str(path))


def test_wrong_type_says_what_was_expected(write_profile):
    path = write_profile(lambda d: d["train"].update(num_workers="two"))
    with pytest.raises(ConfigError, match=r"train\.num_workers: Input should be a valid integer.*'two'"):
        load_profile(str(path))


def test_unsupported_storage_scheme_is_rejected(write_profile):
    path = write_profile(lambda d: d["storage"].update(root="ftp://host/x"))
    with pytest.raises(ConfigError, match="storage.root: .*unsupported storage scheme 'ftp'"):
        load_profile(str(path))


@pytest.mark.parametrize("model_id", ["qwen:7b", "org/model", "has space", "-lead"])
def test_a_model_id_clients_could_not_call_is_rejected(write_profile, model_id):
    """``<id>:<adapter>`` is how clients name an adapter, and the id is a cache folder: the rule
    adapter names and aliases follow (e2e_llm.store) holds for it too."""
    from e2e_llm.store import StoreError, _check_name

    path = write_profile(lambda d: d["model"].update(id=model_id))
    with pytest.raises(ConfigError, match=r"model\.id: .*use letters, digits, '\.', '_' or '-' \(no ':' or '/'\)"):
        load_profile(str(path))
    with pytest.raises(StoreError):  # one rule for every name in `model=`
        _check_name("alias", model_id)


def test_unknown_profile_lists_available(project_root):
    with pytest.raises(ConfigError, match="available: cluster, local"):
        load_profile("nope", root=project_root)


def test_relative_paths_resolve_against_project_root(project_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_profile("local", root=project_root)
    assert config.storage_uri("data") == str(project_root / ".e2e/local/data")
    assert config.path(config.data.task) == project_root / "configs/tasks/viggo.yaml"


def test_storage_root_override_moves_the_adapter_store_too_and_says_so(project_root, tmp_path, monkeypatch):
    """$E2E_LLM_STORAGE_ROOT isolates a run: nothing, published adapters included, lands in the
    profile's own storage, and the replaced adapter store is named in a warning."""
    import pytest

    profile = load_profile("local", root=project_root)
    monkeypatch.setenv("E2E_LLM_STORAGE_ROOT", str(tmp_path / "isolated"))
    with pytest.warns(UserWarning, match=r"replaces storage.adapters \(s3://e2e-llm-local/adapters\) of .*local.yaml: "
                                         rf"the adapter store is {tmp_path}/isolated/adapters"):
        config = load_profile("local", root=project_root)
    assert config.storage.root == str(tmp_path / "isolated")
    assert config.adapters_uri() == str(tmp_path / "isolated" / "adapters")
    assert config.storage_uri("runs") == str(tmp_path / "isolated" / "runs")
    assert config.storage.endpoint_url == profile.storage.endpoint_url  # endpoint and region stay


def test_an_s3_endpoint_in_the_environment_that_sends_the_local_store_elsewhere_is_named(project_root,
                                                                                        monkeypatch):
    """AWS_ENDPOINT_URL set for the AWS CLI (a MinIO) replaced the local profile's store on loopback:
    `e2e-llm serve` started no local store and published to the MinIO, without a word."""
    import warnings

    import pytest

    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://minio.corp.example:9000")
    with pytest.warns(UserWarning, match=r"^\$AWS_ENDPOINT_URL=https://minio.corp.example:9000 replaces "
                                         r"storage.endpoint_url \(http://127.0.0.1:9321, a local store\) of "
                                         r".*local.yaml: its s3:// storage goes to https://minio.corp.example:9000 "
                                         r"\(unset \$AWS_ENDPOINT_URL for the local store\)$"):
        config = load_profile("local", root=project_root)
    from e2e_llm.storage import s3_endpoint

    assert s3_endpoint(config.storage.endpoint_url) == "https://minio.corp.example:9000"  # what the warning says
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:45678")  # a local store on another port
        load_profile("local", root=project_root)
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
        monkeypatch.delenv("AWS_ENDPOINT_URL")
        load_profile("local", root=project_root)


def test_storage_root_override_without_an_adapter_store_is_silent(tmp_path, monkeypatch):
    import warnings

    from e2e_llm.config import StorageConfig, storage_root_override

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replaced = storage_root_override(StorageConfig(root="s3://b/root"), str(tmp_path))
    assert replaced.root == str(tmp_path) and replaced.adapters is None


def test_a_bad_storage_root_override_names_the_variable(project_root, monkeypatch):
    from e2e_llm.config import ConfigError

    monkeypatch.setenv("E2E_LLM_STORAGE_ROOT", "ftp://host/x")
    with pytest.raises(ConfigError, match=r"\$E2E_LLM_STORAGE_ROOT: storage.root: .*unsupported storage scheme 'ftp'"):
        load_profile("local", root=project_root)


@pytest.mark.parametrize("blank", ["", "   \n"])
def test_a_blank_system_prompt_is_rejected_naming_the_key(write_profile, blank):
    path = write_profile(lambda d: d["data"].update(system_prompt=blank))
    with pytest.raises(ConfigError, match=r"data\.system_prompt: String should match pattern"):
        load_profile(str(path))


def test_the_local_profile_trains_and_asks_with_a_short_system_prompt_the_cluster_with_the_datasets(project_root):
    local, cluster = (load_profile(p, root=project_root) for p in ("local", "cluster"))
    assert local.data.system_prompt and len(local.data.system_prompt) < 100
    assert cluster.data.system_prompt is None
