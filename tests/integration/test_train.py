# SPDX-License-Identifier: Apache-2.0
"""Training stage for real: LLaMA-Factory inside a Ray Train TorchTrainer (2 gloo CPU workers)
on the real SmolLM2 model, with checkpoints on local and S3 storage, worker-failure recovery
and resume of an interrupted run."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import pytest
import yaml
from cgroup_limits import cpu_cgroup, inside
from conftest import ROOT, TEST_STORAGE, VENV, run_in_env, storage_env

from e2e_llm.train_worker import node_work_dir, node_work_root

pytestmark = [pytest.mark.train, pytest.mark.slow]
SMOKE = ["--set", "max_samples=32", "--set", "save_steps=1"]  # 16 steps of 2 workers x 1 row (the recipe's batch)


def _events(run_uri: str | Path) -> list[dict]:
    """What the run's workers recorded, read from its storage as the driver reads it."""
    from e2e_llm.train_worker import read_events

    return read_events(str(run_uri), {})


def _start_training(run_id: str, env: dict, log: Path) -> subprocess.Popen:
    cmd = [str(VENV / "train/bin/e2e-llm"), "train", "--profile", "local", "--run-id", run_id, *SMOKE,
           "--ray-temp-dir", f"/tmp/r-{run_id[:8]}"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 900):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"training exited early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(1)
    proc.kill()
    pytest.fail(f"timed out:\n{log.read_text()[-3000:]}")


def _registered_steps(read_snapshot) -> list[int]:
    """Steps of the checkpoints Ray Train has registered (persisted + recorded in its snapshot):
    a worker killed before registration would rightly restart from the previous one."""
    try:
        snapshot = json.loads(read_snapshot())
    except (FileNotFoundError, OSError, ValueError):
        return []
    return [c["metrics"]["global_step"] for c in snapshot.get("checkpoint_results", [])]


def _no_ray_processes_left(temp_dir: str) -> bool:
    out = subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True)
    return out.stdout.strip() == ""


def test_shared_adapter_is_vllm_loadable_with_a_complete_manifest(trained_adapter, local_config):
    assert (trained_adapter / "adapter_config.json").is_file()
    assert (trained_adapter / "adapter_model.safetensors").is_file()
    config = json.loads((trained_adapter / "adapter_config.json").read_text())
    recipe = yaml.safe_load((ROOT / "configs/recipes/smollm2_lora_sft_local.yaml").read_text())
    assert config["r"] == recipe["lora_rank"] and config["peft_type"] == "LORA"
    manifest = json.loads((trained_adapter.parent / "manifest.json").read_text())
    for key in ("run_id", "base_model", "dataset", "training_args", "versions", "git_sha", "metrics", "adapter_uri"):
        assert manifest[key] is not None, key
    assert manifest["base_model"]["id"] == local_config.model.id
    # what every training row asked with: batch refuses rows asking otherwise
    assert manifest["dataset"]["instruction"] == local_config.data.system_prompt
    assert len(manifest["dataset"]["files"]["train"]["sha256"]) == 64
    # every row trained on was counted against cutoff_len, none over it, and prompted as the engines ask
    rows, args = manifest["dataset"]["training_rows"], manifest["training_args"]
    lengths = rows["lengths"]
    assert rows["checked"] and lengths["over"] == 0 and lengths["cutoff_len"] == args["cutoff_len"]
    assert rows["prompt_format"]["mismatch_line"] is None and rows["prompt_format"]["rows"] > 0
    assert lengths["rows"] == min(args["max_samples"], manifest["dataset"]["files"]["train"]["rows"])
    assert 0 < lengths["longest"] <= args["cutoff_len"]
    assert {"llamafactory", "ray", "transformers"} <= set(manifest["versions"])
    metrics = manifest["metrics"]
    assert metrics["global_step"] == metrics["max_steps"] > 0
    assert metrics["train_loss"] > 0 and metrics["eval_loss"] > 0 and metrics["tokens_per_second"] > 0
    assert metrics["train_loss_mean"] > 0  # the Trainer's mean over the run
    assert manifest["ray"]["num_workers"] == 2
    assert manifest["dtype"]["dtype"] in ("bfloat16", "float32") and manifest["dtype"]["reason"]
    assert (trained_adapter.parent / "loss.png").stat().st_size > 1000
    assert list((trained_adapter.parent / "tensorboard").rglob("events.out.tfevents*"))
    # Checkpoints once: Ray Train's in the run folder, not also the HF Trainer's in its work dir.
    assert list(trained_adapter.parent.glob("checkpoint_*/adapter_model.safetensors"))
    assert not list((trained_adapter.parent / "work" / "output").glob("checkpoint-*"))


def test_the_tokenizer_saved_beside_the_adapter_is_the_base_models(trained_adapter, local_model):
    """Why e2e_llm.logs hides vLLM's warning about adapters with their own tokenizer: vLLM uses
    the base model's, and LoRA training leaves it as it was."""
    saved = trained_adapter / "tokenizer.json"
    assert saved.read_bytes() == (Path(local_model) / "tokenizer.json").read_bytes()


def test_training_reduced_the_loss(trained_adapter):
    log = [json.loads(line) for line in (trained_adapter.parent / "trainer_log.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in log if "loss" in row]
    assert losses[-1] < losses[0]


def test_latest_is_resolved_from_manifests_not_mtimes(trained_adapter, tmp_path):
    from e2e_llm.config import load_profile
    from e2e_llm.runs import resolve_adapter

    os.environ["E2E_LLM_STORAGE_ROOT"] = str(TEST_STORAGE)
    try:
        config = load_profile("local", root=ROOT)
        # A newer directory without a completed manifest must not win.
        decoy = TEST_STORAGE / "runs" / "zzzz-unfinished"
        (decoy / "adapter").mkdir(parents=True, exist_ok=True)
        path, manifest = resolve_adapter(config, "latest")
        assert manifest["status"] == "completed" and path.name == "adapter"
        assert path != decoy / "adapter"
    finally:
        os.environ.pop("E2E_LLM_STORAGE_ROOT")


def _s3(endpoint: str):
    """pyarrow's S3 filesystem on the session's loopback store, as the tests read the runs' storage."""
    from pyarrow import fs

    return fs.S3FileSystem(endpoint_override=endpoint.removeprefix("http://"), scheme="http", region="us-east-1",
                           allow_bucket_creation=True)


def _s3_run(endpoint: str, prefix: str):
    """A new run id whose storage root is in the loopback S3 store, the dataset ingested there:
    (the S3 filesystem, the run id, the environment that points the CLI at that root)."""
    s3 = _s3(endpoint)
    s3.create_dir("e2e-ft")
    run_id = f"{prefix}-" + uuid.uuid4().hex[:8]
    env = storage_env(f"s3://e2e-ft/{run_id}-store")
    run_in_env("train", "data", "--profile", "local", env=env)
    return s3, run_id, env


def test_killed_worker_is_restarted_and_resumes_from_s3_checkpoint(s3_server, local_model, tmp_path):
    """SIGKILL a Ray Train worker after the first checkpoint: Ray Train restarts the group with
    world size 2, training resumes past the checkpoint (not from step 0), and the run finishes,
    with checkpoints, data and the adapter all in S3 (loopback server)."""
    s3, run_id, env = _s3_run(s3_server, "ft")
    log = tmp_path / "train.log"
    proc = _start_training(run_id, env, log)
    run_uri = f"s3://e2e-ft/{run_id}-store/runs/{run_id}"
    snapshot = f"e2e-ft/{run_id}-store/runs/{run_id}/checkpoint_manager_snapshot.json"
    registered = _wait_for(lambda: _registered_steps(lambda: s3.open_input_stream(snapshot).read()), proc, log)
    victim = _wait_for(lambda: next((e for e in _events(run_uri) if e["event"] == "start" and e["rank"] == 1), None),
                       proc, log)
    assert (node_work_dir(run_id) / "dataset").is_dir()  # S3 storage: the workers' copy on this node's disk
    os.kill(victim["pid"], signal.SIGKILL)
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    assert not node_work_dir(run_id).exists()  # removed once the run is done

    # In the run's storage, where a driver on a cluster's head node finds them (no worker's disk).
    events = _events(run_uri)
    starts = [e for e in events if e["event"] == "start" and e["rank"] == 0]
    assert len(starts) == 2, events
    assert starts[1]["world_size"] == 2
    assert starts[1]["resume_step"] >= min(registered) >= 1  # resumed past the checkpoint, not from zero
    manifest = json.loads(s3.open_input_stream(f"e2e-ft/{run_id}-store/runs/{run_id}/manifest.json").read())
    assert manifest["attempts"] == 2
    assert manifest["training_args"]["output_dir"] == str(node_work_dir(run_id) / "output")  # as the workers had it
    assert manifest["metrics"]["global_step"] == manifest["metrics"]["max_steps"]
    info = s3.get_file_info(f"e2e-ft/{run_id}-store/runs/{run_id}/adapter/adapter_model.safetensors")
    assert info.size > 0
    assert _no_ray_processes_left(f"/tmp/r-{run_id[:8]}")


def test_a_base_model_kept_in_s3_trains_from_a_copy_on_the_workers_node(s3_server, local_model, tmp_path):
    """model.source: s3://... (a mirror of a hub model for a cluster without the hub): LLaMA-Factory
    loads a local folder or a hub id only, so each node's workers copy it there, and the driver
    checks the rows with a copy of its tokenizer alone. The adapter names its base model as the
    batch stage checks it."""
    from e2e_llm import storage
    from e2e_llm.adapters import check_fits_base
    from e2e_llm.config import load_profile

    _s3(s3_server).create_dir("e2e-models")
    uri = f"s3://e2e-models/{uuid.uuid4().hex[:8]}/{local_model.name}"
    storage.upload_dir(local_model, uri)
    profile = yaml.safe_load((ROOT / "configs/profiles/local.yaml").read_text())
    profile["model"]["source"] = uri
    path = tmp_path / "model-in-s3.yaml"
    path.write_text(yaml.safe_dump(profile))
    machine_temp = tmp_path / "machine-temp"  # TMPDIR of the driver and the workers: their copies go there
    machine_temp.mkdir()
    env = storage_env(tmp_path / "store", TMPDIR=str(machine_temp))
    run_in_env("train", "data", "--profile", str(path), env=env)
    run_id = "s3m-" + uuid.uuid4().hex[:8]
    run_in_env("train", "train", "--profile", str(path), "--run-id", run_id, "--set", "max_samples=8", "--set",
               "max_steps=2", "--set", "save_steps=2", "--ray-temp-dir", f"/tmp/r-{run_id[:8]}", env=env, timeout=900)

    run = tmp_path / "store" / "runs" / run_id
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["base_model"]["source"] == uri and manifest["metrics"]["global_step"] == 2
    rows = manifest["dataset"]["training_rows"]
    assert rows["checked"] and rows["lengths"]["rows"] == 8 and rows["prompt_format"]["mismatch_line"] is None
    copies = {p.parent for p in machine_temp.glob(f"*/models/*/*/{local_model.name}/config.json")}
    with_weights = {c for c in copies if (c / "model.safetensors").is_file()}
    assert len(copies) == 2 and len(with_weights) == 1, copies  # the tokenizer's (driver) and the workers' node's
    base = json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base) == with_weights.pop()
    config = load_profile(str(path), root=ROOT)
    assert check_fits_base(config, run / "adapter", uri, manifest)[0] == manifest["training_args"]["lora_rank"]
    assert _no_ray_processes_left(f"/tmp/r-{run_id[:8]}")


def _ray_node_ports(worker_ports: str) -> list[str]:
    """Every port a Ray node opens, free ones: two nodes share this machine's address. Their
    workers' ports are in Ray's default range, which free_tcp_port leaves alone, one part each."""
    from e2e_llm.ports import free_tcp_port

    flags = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
    ports = [arg for flag in flags for arg in (flag, str(free_tcp_port()))]
    low, high = worker_ports.split("-")
    return [*ports, "--min-worker-port", low, "--max-worker-port", high]


@pytest.fixture()
def two_node_cluster(tmp_path, s3_server):
    """A Ray cluster of two nodes on this machine, one CPU each, the second in a mount namespace of
    its own where the workers' folder (``train_worker.node_work_root``) is an empty tmpfs: as two
    machines of a cluster, each node has its own disk there (the rest of /tmp stays shared: the
    checkout may be in it)."""
    work_root = node_work_root()
    work_root.mkdir(parents=True, exist_ok=True)
    mount = f"mount -t tmpfs -o mode=0700 e2e-node {work_root}"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", mount],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no mount namespace of our own here (needs root): {probe.stderr.strip()}")
    from e2e_llm.ports import free_tcp_port

    ray = str(VENV / "train/bin/ray")
    if shlex.quote(ray) != ray:
        pytest.skip("a node `ray start`s from a path with a space starts its workers through an unquoted "
                    "command and they die (a Ray bug); e2e-llm quotes it only for the instances it starts")
    # Ray turns token authentication on for a head started where ~/.ray/auth_token exists (any local
    # ray.init() writes one), and the joining node would not send it.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    tag = uuid.uuid4().hex[:8]
    head_tmp, node_tmp = f"/tmp/r-head-{tag}", f"/tmp/r-node-{tag}"
    common = ["--num-cpus", "1", "--object-store-memory", str(300 * 2**20), "--disable-usage-stats"]
    for _ in range(3):  # a free port picked here may be taken before Ray binds it: pick again
        gcs = free_tcp_port()
        head = subprocess.run([ray, "start", "--head", "--port", str(gcs), "--include-dashboard", "false",
                               "--ray-client-server-port", str(free_tcp_port()), "--temp-dir", head_tmp, *common,
                               *_ray_node_ports("10002-10499")], env=env, capture_output=True, text=True, timeout=180)
        if head.returncode == 0:
            break
        warnings.warn(f"ray start --head failed, trying other ports:\n{(head.stdout + head.stderr)[-1500:]}",
                      stacklevel=1)
        subprocess.run(["pkill", "-9", "-f", head_tmp])
    else:
        pytest.fail(f"ray start --head failed 3 times:\n{(head.stdout + head.stderr)[-3000:]}")
    node_cmd = shlex.join([ray, "start", "--address", f"127.0.0.1:{gcs}", "--temp-dir", node_tmp, "--block", *common,
                         *_ray_node_ports("10500-10999")])
    node = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "bash", "-c",
                             f"{mount} && exec {node_cmd}"], env=env, start_new_session=True,
                            stdout=open(tmp_path / "node.log", "w"), stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{gcs}"
    count = (f"import ray; ray.init(address='{address}', logging_level='ERROR'); "
             "print(sum(n['Alive'] for n in ray.nodes()))")
    try:
        deadline = time.monotonic() + 180
        while subprocess.run([str(VENV / "train/bin/python"), "-c", count], env=env, capture_output=True,
                             text=True).stdout.strip() != "2":
            assert node.poll() is None and time.monotonic() < deadline, (tmp_path / "node.log").read_text()[-2000:]
            time.sleep(2)
        yield address, env, node.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", node_tmp])
        subprocess.run(["pkill", "-9", "-f", head_tmp])


def _in_mount_namespace_of(pid: int, other: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink(f"/proc/{other}/ns/mnt")
    except OSError:
        return False


def test_a_worker_restarted_on_another_node_resumes_from_ray_trains_checkpoint(two_node_cluster, s3_server,
                                                                                local_model, tmp_path):
    """Two workers on two nodes with their own disks, checkpoints in S3; the worker on the second
    node is SIGKILLed after the first registered checkpoint. On every node but rank 0's, the HF
    checkpoint folder of a step holds only that rank's RNG state: a restarted worker that took it
    for the checkpoint found none there ("Can't find a valid checkpoint"), and the group failed
    again until the ranks happened to swap nodes. On a cluster the driver (here on the head node)
    saw none of the workers' events: the manifest said 1 attempt after 3."""

    address, env, node_pid = two_node_cluster
    s3 = _s3(s3_server)
    bucket = "mn-" + uuid.uuid4().hex[:8]
    s3.create_dir(bucket)
    run_id = "mn-" + uuid.uuid4().hex[:8]
    env = storage_env(f"s3://{bucket}/store", RAY_ADDRESS=address, RAY_AUTH_MODE=env["RAY_AUTH_MODE"])
    run_in_env("train", "data", "--profile", "local", env=env)
    log = tmp_path / "train.log"
    cmd = [str(VENV / "train/bin/e2e-llm"), "train", "--profile", "local", "--run-id", run_id, *SMOKE]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    snapshot = f"{bucket}/store/runs/{run_id}/checkpoint_manager_snapshot.json"
    _wait_for(lambda: _registered_steps(lambda: s3.open_input_stream(snapshot).read()), proc, log)
    run_uri = f"s3://{bucket}/store/runs/{run_id}"
    victim = next(e for e in _events(run_uri) if e["event"] == "start" and _in_mount_namespace_of(e["pid"], node_pid))
    # The second node's workers' folder as its processes see it (its own tmpfs).
    second_node_work_dir = Path(f"/proc/{node_pid}/root{node_work_dir(run_id)}")
    assert (second_node_work_dir / "dataset").is_dir()
    os.kill(victim["pid"], signal.SIGKILL)
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    # A long-lived cluster's nodes kept each run's dataset copy and outputs until their disks filled.
    assert not second_node_work_dir.exists() and not node_work_dir(run_id).exists()

    assert "Can't find a valid checkpoint" not in log.read_text()
    starts = [e for e in _events(run_uri) if e["event"] == "start"]
    assert len({e["node"] for e in starts}) == 2  # the workers ran on both nodes
    second = starts[2:]
    assert len(second) == 2 and all(e["resume_step"] >= 1 for e in second), starts  # one restart, resumed
    manifest = json.loads(s3.open_input_stream(f"{run_uri.removeprefix('s3://')}/manifest.json").read())
    assert manifest["attempts"] == 2
    assert manifest["metrics"]["global_step"] == manifest["metrics"]["max_steps"]


def test_a_local_storage_root_other_nodes_cannot_see_is_refused(two_node_cluster, local_model, tmp_path):
    """A profile's local storage.root on a Ray cluster whose other nodes have their own disk there:
    their workers failed on the dataset path after loading the model, at every restart."""
    address, cluster_env, _ = two_node_cluster
    own_folder = node_work_root() / f"store-{uuid.uuid4().hex[:8]}"  # the second node has its own there
    env = storage_env(own_folder, RAY_ADDRESS=address, RAY_AUTH_MODE=cluster_env["RAY_AUTH_MODE"])
    try:
        run_in_env("train", "data", "--profile", "local", env=env)
        seen = subprocess.run(
            [str(VENV / "train/bin/python"), "-c",
             f"import json, ray; ray.init(address='{address}', logging_level='ERROR'); "
             "from e2e_llm.ray_address import nodes_not_seeing; "
             f"print(json.dumps([len(nodes_not_seeing('{tmp_path}')), len(nodes_not_seeing('{own_folder}'))]))"],
            env=env, capture_output=True, text=True, timeout=300)
        assert seen.stdout.strip().splitlines()[-1] == "[0, 1]", seen.stderr[-2000:]  # /tmp is shared, that is not
        result = subprocess.run([str(VENV / "train/bin/e2e-llm"), "train", "--profile", "local", *SMOKE], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=600)
        output = result.stdout + result.stderr
        assert result.returncode == 1, output[-3000:]
        assert output.rstrip().splitlines()[-1].startswith(
            f"error: storage.root {own_folder} ({own_folder}/runs) is not shared by the Ray cluster at "
            "$RAY_ADDRESS: 1 of its nodes ("), output[-3000:]
        assert "RayTrainWorker" not in output  # before any worker loaded the model
    finally:
        shutil.rmtree(own_folder, ignore_errors=True)


def test_workers_reserving_more_cpus_than_a_containers_limit_are_refused_naming_it(local_model, tmp_path):
    """Inside a cgroup allowing 1 CPU's worth of time (`docker run --cpus 1`), a worker reserving 2
    CPUs (2 threads): the local Ray instance got os.cpu_count() CPUs (2 or more), so it started,
    with more threads than the quota runs at once (2 threads a worker trained 1.30x slower than 1
    there; bench/RESULTS.md). Now Ray gets what the quota allows and the run is refused before any
    worker, naming the limit."""
    cgroup = cpu_cgroup(100000)
    if cgroup is None:
        pytest.skip("no cpu cgroup can be made here (needs root and a cpu controller)")
    env = storage_env(tmp_path / "store")
    ray_dir = tempfile.mkdtemp(prefix="rq-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    try:
        run_in_env("train", "data", "--profile", "local", env=env)
        profile = yaml.safe_load((ROOT / "configs/profiles/local.yaml").read_text())
        profile["train"].update(num_workers=1, resources_per_worker={"CPU": 2})
        path = tmp_path / "two-cpus.yaml"
        path.write_text(yaml.safe_dump(profile))
        result = subprocess.run(inside(cgroup, [str(VENV / "train/bin/e2e-llm"), "train", "--profile", str(path),
                                                *SMOKE, "--ray-temp-dir", ray_dir]),
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        output = result.stdout + result.stderr
        assert result.returncode == 1, output[-3000:]
        assert (f"train.num_workers 1 x CPU 2 a worker (resources_per_worker) = 2 CPU, and this machine's Ray "
                f"instance has 1 (1 of this machine's {os.cpu_count()} CPUs: a CPU quota of 1 applies (cpu cgroup "
                f"/{cgroup.name})): lower them") in output, output[-3000:]
        assert "RayTrainWorker" not in output
    finally:
        if not _wait_for_empty(cgroup):
            warnings.warn(f"{cgroup}: processes still in it after 60 s, left in place: "
                          f"{(cgroup / 'cgroup.procs').read_text().split()}", stacklevel=1)
        else:
            cgroup.rmdir()
        shutil.rmtree(ray_dir, ignore_errors=True)


def _wait_for_empty(cgroup: Path, timeout_s: float = 60) -> bool:
    """Whether the cgroup's processes (Ray's, started inside it) are gone within the deadline."""
    deadline = time.monotonic() + timeout_s
    while (cgroup / "cgroup.procs").read_text().strip():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _training_past_a_checkpoint(tmp_path: Path, prefix: str):
    """A smoke training run started in the background, once Ray Train has registered a checkpoint:
    (its storage root, environment, run id, process, log, checkpoint snapshot)."""
    store = tmp_path / "store"
    env = storage_env(store)
    run_in_env("train", "data", "--profile", "local", env=env)
    run_id = f"{prefix}-" + uuid.uuid4().hex[:8]
    log = tmp_path / "first.log"
    proc = _start_training(run_id, env, log)
    snapshot = store / "runs" / run_id / "checkpoint_manager_snapshot.json"
    _wait_for(lambda: _registered_steps(snapshot.read_text), proc, log)
    return store, env, run_id, proc, log, snapshot


def test_interrupted_run_resumes_on_rerun(local_model, tmp_path):
    store, env, run_id, proc, log, snapshot = _training_past_a_checkpoint(tmp_path, "ir")
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C / preemption
    # Not Ray Train's exit status 0 (`train && publish` would go on): the shell's 130, and how to go on.
    assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    assert not (store / "runs" / run_id / "manifest.json").exists()
    checkpoint_step = max(_registered_steps(snapshot.read_text))
    last_line = log.read_text().rstrip().splitlines()[-1]
    assert last_line.startswith(f"error: interrupted; rerun with --run-id {run_id} to resume from its last "
                                "checkpoint (step "), last_line
    assert int(last_line.rsplit("step ", 1)[1].rstrip(")")) >= 1

    second = _start_training(run_id, env, tmp_path / "second.log")
    assert second.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-3000:]
    resumed = [e for e in _events(store / "runs" / run_id) if e["event"] == "start" and e["rank"] == 0][-1]
    assert resumed["resume_step"] >= checkpoint_step >= 1
    manifest = json.loads((store / "runs" / run_id / "manifest.json").read_text())
    assert manifest["metrics"]["global_step"] == manifest["metrics"]["max_steps"]


def test_a_checkpoint_ray_train_never_registered_is_not_resumed(local_model, tmp_path):
    """A run killed while the HF Trainer was saving its first checkpoint leaves a folder Ray Train
    never registered, here as a kill left it (only rank 1's RNG state written). LLaMA-Factory
    resumed from it on its own, found no checkpoint there, and every rerun failed the same way."""
    store = tmp_path / "store"
    env = storage_env(store)
    run_in_env("train", "data", "--profile", "local", env=env)
    run_id = "nr-" + uuid.uuid4().hex[:8]
    cut_off = store / "runs" / run_id / "work" / "output" / "checkpoint-4"
    cut_off.mkdir(parents=True)
    (cut_off / "rng_state_1.pth").write_bytes(b"cut off mid-save")
    log = tmp_path / "train.log"
    proc = _start_training(run_id, env, log)
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    assert "Resuming training from" not in log.read_text()
    starts = [e for e in _events(store / "runs" / run_id) if e["event"] == "start"]
    assert [e["resume_step"] for e in starts] == [0, 0]  # both workers, one attempt, from step 0
    manifest = json.loads((store / "runs" / run_id / "manifest.json").read_text())
    assert manifest["attempts"] == 1
    assert manifest["metrics"]["global_step"] == manifest["metrics"]["max_steps"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_aborts_the_run_as_ctrl_c_does(local_model, s3_server, tmp_path, signum):
    """A cancelled job, a stopped pod or `kill` (SIGTERM), or a hangup (an SSH connection dropped):
    left to Ray, the driver printed a crash dump and died with SIGABRT (134), or died at once. It
    now takes Ctrl-C's graceful abort: 128 + the signal, how to resume, no Ray left, and (object
    storage) no workers' folder left on the node: a rerun resumes from the storage."""
    from pyarrow import fs

    s3, run_id, env = _s3_run(s3_server, "st")
    log = tmp_path / "train.log"
    proc = _start_training(run_id, env, log)
    run_path = f"e2e-ft/{run_id}-store/runs/{run_id}"
    _wait_for(lambda: _registered_steps(lambda: s3.open_input_stream(f"{run_path}/checkpoint_manager_snapshot.json")
                                        .read()), proc, log)
    assert (node_work_dir(run_id) / "dataset").is_dir()
    proc.send_signal(signum)  # the driver alone, as a job runner, the kubelet or a terminal's hangup does
    assert proc.wait(timeout=120) == 128 + signum, log.read_text()[-3000:]
    text = log.read_text()
    assert text.rstrip().splitlines()[-1].startswith(
        f"error: terminated ({signal.Signals(signum).name}); rerun with --run-id {run_id} to resume from its last "
        "checkpoint (step ")
    assert "SIGTERM received at time" not in text  # no crash dump
    assert s3.get_file_info(f"{run_path}/manifest.json").type == fs.FileType.NotFound
    assert not node_work_dir(run_id).exists()
    deadline = time.monotonic() + 60
    while not _no_ray_processes_left(f"/tmp/r-{run_id[:8]}"):
        assert time.monotonic() < deadline, "Ray processes outlived the aborted run"
        time.sleep(1)


def test_a_run_whose_workers_keep_failing_ends_with_a_clear_error(local_model, local_config, s3_server, tmp_path):
    """Every attempt fails inside LLaMA-Factory (LoRA on modules the model does not have, which only
    PEFT finds, in the workers; the driver refuses an unknown template itself): after the restarts
    train.max_failures allows, the CLI ends with one line that says why and exits 1, with no
    manifest, no Ray process and no workers' folder (S3 storage: on each node's disk) left behind."""
    from pyarrow import fs

    s3, run_id, env = _s3_run(s3_server, "ff")
    temp_dir = f"/tmp/r-{run_id[:8]}"
    result = subprocess.run(
        [str(VENV / "train/bin/e2e-llm"), "train", "--profile", "local", "--run-id", run_id, *SMOKE,
         "--set", "lora_target=no_such_module", "--ray-temp-dir", temp_dir],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 1, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    restarts = local_config.train.max_failures
    assert error and f"training failed (after {restarts} restart(s) allowed by train.max_failures)" in error[0], \
        result.stderr[-3000:]
    assert "ValueError: Target modules {'no_such_module'} not found in the base model" in error[0], error[0]
    assert error[0].endswith("(the workers' tracebacks are above)"), error[0]
    assert result.stderr.rstrip().endswith(error[0])  # the last thing the user reads
    assert "not removed from every node" not in result.stdout
    run_path = f"e2e-ft/{run_id}-store/runs/{run_id}"
    assert s3.get_file_info(f"{run_path}/events").type == fs.FileType.Directory  # the workers did start
    assert s3.get_file_info(f"{run_path}/manifest.json").type == fs.FileType.NotFound
    assert not node_work_dir(run_id).exists()
    assert _no_ray_processes_left(temp_dir)
