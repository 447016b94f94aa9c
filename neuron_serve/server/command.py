"""`neuron-serve serve`: gunicorn in front of the Flask app, one model replica per worker.

Worker class: gthread, with the guards of ``server/worker.py``. Each worker's engine is a real OS
thread that waits on the worker's forward process (``engine/forward_process.py``: the graphs run there,
because AOTInductor holds the GIL through a whole graph call); request threads just wait on queues.
gevent would monkey-patch the engine thread into a greenlet, and every wait on the forward process
would block all streams of that worker.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from gunicorn.app.base import BaseApplication

from neuron_serve.artifact.graphs import GraphSet
from neuron_serve.artifact.manifest import ArtifactManifest, kv_cache_bytes, read_manifest
from neuron_serve.artifact.remote import pull_artifact
from neuron_serve.recipe.files import load_recipe
from neuron_serve.recipe.schema import ServeSection
from neuron_serve.server.app import LOOPBACK, create_app
from neuron_serve.server.auth import key_digest
from neuron_serve.server.environment import apply_environment
from neuron_serve.server.placement import plan_placement
from neuron_serve.server.sagemaker import sagemaker_target
from neuron_serve.server.service import ServeSettings, start_services
from neuron_serve.server.tenants import load_tenants
from neuron_serve.weights.local_cache import cache_dir
from neuron_serve.weights.s3 import S3Url, is_s3


def resolve_target(target: str) -> Path:
    """An artifact directory to serve: the target itself, the artifact an S3 URL names (pulled into the
    local cache, verified), or a recipe's (compiled first: a cache hit when nothing changed). The
    artifact's manifest holds the recipe it was compiled from, [serve] settings included."""
    if is_s3(target):
        return pull_artifact(S3Url.parse(target), cache_dir())
    path = Path(target)
    if is_recipe(target):
        # Imported on use: the compiler (transformers, gguf) would add 1.7 s to every server's start.
        from neuron_serve.compiler.compile import compile_recipe

        return compile_recipe(load_recipe(path)).out_dir
    read_manifest(path)  # a clear error now, not in every worker
    return path


def is_recipe(target: str) -> bool:
    return Path(target).suffix == ".toml"


def forward_start_method(targets: list[str]) -> str:
    """Fork the forward processes from the workers, unless this process compiles a recipe first: the
    compile runs torch's parallel operators, after which a forked process cannot
    (`ForwardProcess`'s docstring). Forked, a replica starts 2 to 3 s sooner on 2 cores."""
    return "spawn" if any(is_recipe(target) for target in targets) else "fork"


class ServerApplication(BaseApplication):
    def __init__(self, models: list[ServeSettings], options: dict):
        self.models = models
        self.settings = models[0]  # server-wide settings are every model's
        self.options = options
        self.replica_index = 0  # this worker's, set after the fork
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        if self.settings.usage_log:
            usage = logging.FileHandler(self.settings.usage_log)  # appends: every worker, one line each
            usage.setFormatter(logging.Formatter("%(message)s"))
            logging.getLogger("neuron_serve.requests").addHandler(usage)
        return create_app(start_services(self.models, self.replica_index))


def pre_fork(server, worker) -> None:
    """Give the new worker the lowest replica index no live worker holds (stable across restarts)."""
    taken = {getattr(w, "replica_index", None) for w in server.WORKERS.values()}
    worker.replica_index = next(i for i in range(len(taken) + 1) if i not in taken)


def post_fork(server, worker) -> None:
    """The worker's models load after the fork, each replica on the cores `plan_placement` gave it."""
    server.app.replica_index = worker.replica_index
    for settings in server.app.models:
        cores = settings.placement[worker.replica_index]
        server.log.info("replica %d of %s: cores %s", worker.replica_index, settings.model_name, cores)


def child_exit(server, worker) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:
    """At shutdown (SIGTERM included, once the workers are gone), write the traffic profile; then the
    workers' metric files have served their purpose and go."""
    from neuron_serve.engine.metrics import traffic_profile

    for settings in server.app.models:
        path = traffic_profile(settings.model_name).write(settings.profile_dir)
        server.log.info("traffic profile of %s written: %s", settings.model_name, path)
    shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


def describe(manifest: ArtifactManifest, artifacts: Path) -> str:
    """What a replica will run: the precision the compile chose for this machine, the slots and the step budget."""
    recipe, graphs = manifest.recipe, GraphSet.from_shapes(manifest.recipe.shapes)
    return (
        f"serving {artifacts}: {recipe.model.dtype} on {recipe.target.kind}, TP {recipe.target.tp_degree}, "
        f"{graphs.batch_size} slots, {graphs.token_budget} tokens per step, "
        f"KV cache {kv_cache_bytes(manifest) / 2**30:.2f} GiB per replica"
    )


def serve(args: argparse.Namespace) -> int:
    for line in apply_environment(args):
        print(f"configuration: {line}", file=sys.stderr)
    targets = args.targets or [sagemaker_target()]
    if args.model_name and len(targets) > 1:
        raise ValueError("--model-name names one model: with several, each is served under its recipe's name")
    artifacts = [resolve_target(target).resolve() for target in targets]
    manifests = [read_manifest(path) for path in artifacts]
    names = [args.model_name or manifest.recipe.name for manifest in manifests]
    if len(set(names)) < len(names):
        raise ValueError(f"two models are named alike ({', '.join(names)}): serve each under its own name")
    first = manifests[0].recipe.serve
    workers = args.workers or first.workers
    placement = plan_placement({name: m.recipe for name, m in zip(names, manifests, strict=True)}, workers)
    access = _access(args)
    start_method = forward_start_method(targets)
    models = [
        _model_settings(path, manifest, name, args, access, placement[name], workers, start_method)
        for path, manifest, name in zip(artifacts, manifests, names, strict=True)
    ]
    host = args.host or first.host
    if not (access.api_key_sha256 or access.tenants) and host not in (*LOOPBACK, "localhost"):
        print(f"warning: serving on {host} without --api-key: anyone who reaches the port can use it", file=sys.stderr)
    for path, manifest in zip(artifacts, manifests, strict=True):
        print(describe(manifest, path), file=sys.stderr)
    # Every stream holds a thread until it ends: each model's slots and queue, and room for /ping and /metrics.
    threads = sum(m.recipe.shapes.batch_size + s.max_waiting for m, s in zip(manifests, models, strict=True)) + 8
    options = _gunicorn_options(args, host, first, workers, threads)
    ServerApplication(models, options).run()
    return 0


@dataclass
class Access:
    api_key_sha256: str
    tenants: dict


def _access(args: argparse.Namespace) -> Access:
    key = key_digest(args.api_key) if args.api_key else ""
    access = Access(key, load_tenants(args.tenants) if args.tenants else {})
    if access.api_key_sha256 and access.tenants:
        raise ValueError("give --api-key or --tenants, not both: the tenants file holds every key")
    return access


def _model_settings(
    path, manifest, name, args, access: Access, cores, workers: int, start_method: str
) -> ServeSettings:
    section = manifest.recipe.serve
    return ServeSettings(
        artifacts=path,
        model_name=name,
        max_waiting=args.max_waiting or section.max_waiting,
        max_tokens_default=section.max_tokens_default,
        max_tokens_cap=section.max_tokens_cap,
        log_prompts=args.log_prompts,
        profile_dir=Path(args.profile_dir),
        api_key_sha256=access.api_key_sha256,
        tenants=access.tenants,
        replicas=workers,
        usage_log=args.usage_log,
        placement=cores,
        forward_start_method=start_method,
        prefill_order=section.prefill_order,
    )


def _gunicorn_options(args, host: str, first: ServeSection, workers: int, threads: int) -> dict:
    return {
        "bind": f"{host}:{args.port or first.port}",
        "workers": workers,
        "worker_class": "neuron_serve.server.worker.ServingWorker",  # gthread, guarded (its docstring)
        "threads": threads,
        "timeout": args.timeout or 120,
        "graceful_timeout": first.graceful_timeout_s,
        "keepalive": 5,
        "pre_fork": pre_fork,
        "post_fork": post_fork,
        "child_exit": child_exit,
        "on_exit": on_exit,
        "errorlog": "-",
        # gunicorn's control socket is one path per user ($HOME/.gunicorn/gunicorn.ctl): a second server
        # would share it, and the first to exit would delete the other's. Nothing here uses it.
        "control_socket_disable": True,
        "loglevel": "info",
    }
