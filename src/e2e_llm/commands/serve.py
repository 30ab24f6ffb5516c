# SPDX-License-Identifier: Apache-2.0
"""Run the OpenAI-compatible serving app (Ray Serve LLM + the e2e-llm ingress) for a profile
and block until Ctrl-C (or SIGTERM, or a hangup: e2e_llm.hangup), then shut Serve and Ray down cleanly.

On the local profile the adapter store is an S3 server on loopback: it is started here when
nothing answers on the profile's endpoint, and `--publish` puts a trained adapter in it first.

Examples:
    e2e-llm serve --profile local --publish latest
    e2e-llm serve --profile local --publish latest --then "python examples/openai_client.py"
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading

from e2e_llm.cli import INTERRUPTED, add_profile_argument, ray_temp_dir
from e2e_llm.hangup import on_stop_signals

# How long the --then command has to end after its SIGINT before it is killed.
THEN_GRACE_S = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_profile_argument(parser)
    parser.add_argument("--publish", metavar="ADAPTER",
                        help="publish this adapter (folder, run id or 'latest') first, alias = data.dataset")
    parser.add_argument("--host", help="HTTP host (default: serve.host)")
    parser.add_argument("--port", type=int, help="HTTP port (default: serve.port)")
    parser.add_argument("--then", metavar="COMMAND",
                        help="once ready, run COMMAND (env: E2E_LLM_BASE_URL, E2E_LLM_MODEL, E2E_LLM_PROFILE), "
                             "then shut down and exit with its status")
    parser.add_argument("--ray-temp-dir", default=os.environ.get("RAY_TMPDIR"), type=ray_temp_dir,
                        help="temp dir for a local Ray instance (short path; default $RAY_TMPDIR)")


def run(args: argparse.Namespace) -> int:
    from e2e_llm.adapters import AdapterError
    from e2e_llm.config import load_profile
    from e2e_llm.local_s3 import LocalS3Error, is_loopback, start
    from e2e_llm.model import ModelError, resolve_model_path
    from e2e_llm.publish import publish_once
    from e2e_llm.ray_address import unreachable_ray_address
    from e2e_llm.serve import ServeError, start_refusals
    from e2e_llm.storage import is_remote, s3_endpoint
    from e2e_llm.store import AdapterStore, StoreError, find_training_adapter, local_store_dir

    config = load_profile(args.profile)
    host, port = args.host or config.serve.host, args.port or config.serve.port
    if config.serve.high_throughput:
        _stop_left_behind_haproxy()
    # Refuse before starting anything (a local S3 server included).
    if refusals := start_refusals(config, host, port):
        code, message = refusals[0]
        print(f"error: {message}", file=sys.stderr)
        return code
    try:
        resolve_model_path(config.model, root=config.root)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if problem := unreachable_ray_address():
        print(f"error: {problem}", file=sys.stderr)
        return 1
    store = AdapterStore.from_config(config)
    endpoint = s3_endpoint(config.storage.endpoint_url)
    moto = None
    try:
        if endpoint and is_loopback(endpoint) and is_remote(store.uri):
            moto = start(endpoint, data_dir=local_store_dir(config))
            if moto:
                print(f"started the local S3 store at {endpoint} for {store.uri} (data in {moto.data_dir})",
                      flush=True)
        model = config.model.id
        if args.publish:
            adapter_dir, manifest = find_training_adapter(config, args.publish)
            name = config.data.dataset
            adapter_id, _ = publish_once(config, store, adapter_dir, manifest, name)
            if name not in store.aliases() or store.aliases()[name].stable != adapter_id:
                store.set_alias(name, stable=adapter_id)
            print(f"adapter {adapter_dir} -> {store.adapter_uri(adapter_id)} (alias {name})", flush=True)
            model = f"{config.model.id}:{name}"
    except (StoreError, ServeError, AdapterError, LocalS3Error) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if moto:
            moto.stop()
        return 1

    try:
        return _serve(args, config, host, port, model)
    finally:
        if moto:
            moto.stop()


def _serve(args: argparse.Namespace, config, host: str, port: int, model: str) -> int:
    import ray
    from ray import serve

    from e2e_llm.local_ray import LocalRay
    from e2e_llm.serve import (
        DeployFailed,
        DeployInterrupted,
        app_args,
        build_app,
        ray_init_kwargs,
        run_app,
        serve_start_kwargs,
    )

    stop = threading.Event()
    code = 0
    with LocalRay(config) as local_ray:  # before ray.init: Ray's processes inherit its environment
        ray.init(**ray_init_kwargs(config, temp_dir=args.ray_temp_dir))
        on_stop_signals(lambda *_: stop.set())  # after ray.init, which sets its own SIGTERM handler
        try:
            serve.start(**serve_start_kwargs(config, host, port))
            try:
                run_app(config, build_app(app_args(config)), stop, echo=lambda line: print(line, flush=True))
            except DeployInterrupted as exc:
                print(f"error: {exc}", file=sys.stderr, flush=True)
                return INTERRUPTED
            except DeployFailed as exc:
                print(f"error: {exc}", file=sys.stderr, flush=True)
                return 1
            if pinning := local_ray.pin():
                print(f"Ray's processes run on CPUs {sorted(pinning.ray_cpus)}, the engine's worker on "
                      f"{sorted(pinning.engine_cpus)} (serve.isolate_engine_cpus)", flush=True)
            base_url = f"http://{host}:{port}{config.serve.route_prefix.rstrip('/')}/v1"
            print(f"serving {config.model.id} at {base_url} (model=\"{model}\"); Ctrl-C to stop", flush=True)
            if args.then:
                env = {**os.environ, "E2E_LLM_BASE_URL": base_url, "E2E_LLM_MODEL": model,
                       "E2E_LLM_PROFILE": args.profile}  # the client asks as this profile's adapters were trained
                code = run_then(shlex.split(args.then), env, stop)
            else:
                while not stop.wait(0.5):
                    pass
        finally:
            print("shutting down Serve and Ray", flush=True)
            serve.shutdown()
            ray.shutdown()
    return code


def _stop_left_behind_haproxy() -> None:
    from e2e_llm.haproxy_leftovers import stop_left_behind
    from e2e_llm.serve import MODE_FILES_DIR_ENV, mode_files_env

    for stopped in stop_left_behind(mode_files_env()[MODE_FILES_DIR_ENV]):
        print(f"stopped HAProxy (pid {stopped.pid}, listening on {', '.join(stopped.listening) or 'nothing'}): an "
              "e2e-llm serve whose Ray instance ended without shutting Serve down left it behind", file=sys.stderr)


def run_then(cmd: list[str], env: dict[str, str], stop: threading.Event) -> int:
    """Run ``--then``'s command to its end, or until ``stop`` (Ctrl-C or SIGTERM here): it gets a
    SIGINT then, and is killed after :data:`THEN_GRACE_S`. A signal forwarded to this process alone
    (`make e2e` forwards Ctrl-C to its stage) did not reach it: a client waiting on an answer kept
    the stage, and Serve and Ray with it, up for as long as its own timeout."""
    client = subprocess.Popen(cmd, env=env)
    while not stop.wait(0.2):
        if client.poll() is not None:
            return client.returncode
    client.send_signal(signal.SIGINT)
    try:
        client.wait(THEN_GRACE_S)
    except subprocess.TimeoutExpired:
        client.kill()
        client.wait()
    return INTERRUPTED
