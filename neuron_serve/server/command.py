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
import tempfile
from pathlib import Path

from gunicorn.app.base import BaseApplication

from neuron_serve.artifact.graphs import GraphSet
from neuron_serve.artifact.manifest import MANIFEST, ArtifactManifest, read_manifest
from neuron_serve.backends.registry import backend_for
from neuron_serve.compiler.compile import compile_recipe, kv_cache_bytes
from neuron_serve.recipe.files import load_recipe
from neuron_serve.recipe.schema import Recipe
from neuron_serve.server.app import LOOPBACK, create_app
from neuron_serve.server.auth import key_digest
from neuron_serve.server.service import ModelService, ServeSettings
from neuron_serve.server.tenants import load_tenants

SAGEMAKER_MODEL_DIR = Path("/opt/ml/model")


def resolve_target(target: str | None) -> Path:
    """An artifact directory to serve, compiling first when given a recipe (a cache hit when nothing
    changed). With no target inside a SageMaker container, the model comes from /opt/ml/model. The
    artifact's manifest holds the recipe it was compiled from, [serve] settings included."""
    if target is None:
        model_dir = Path(os.environ.get("SM_MODEL_DIR", SAGEMAKER_MODEL_DIR))
        if not model_dir.exists():
            raise FileNotFoundError("give an artifact directory or a recipe (no SageMaker /opt/ml/model here)")
        if (model_dir / MANIFEST).exists():
            return model_dir
        recipes = sorted(model_dir.glob("*.toml"))
        recipe = load_recipe(recipes[0]) if recipes else Recipe(name="sagemaker-model")
        if not recipes:
            recipe.model.source = str(model_dir)
        out = Path(tempfile.gettempdir()) / "neuron-serve-artifacts" / recipe.name
        return compile_recipe(recipe, out).out_dir
    path = Path(target)
    if path.suffix == ".toml":
        return compile_recipe(load_recipe(path)).out_dir
    read_manifest(path)  # a clear error now, not in every worker
    return path


class ServerApplication(BaseApplication):
    def __init__(self, settings: ServeSettings, options: dict):
        self.settings = settings
        self.options = options
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
        return create_app(ModelService(self.settings).start())


def pre_fork(server, worker) -> None:
    """Give the new worker the lowest replica index no live worker holds (stable across restarts)."""
    taken = {getattr(w, "replica_index", None) for w in server.WORKERS.values()}
    worker.replica_index = next(i for i in range(len(taken) + 1) if i not in taken)


def post_fork(server, worker) -> None:
    recipe = read_manifest(server.app.settings.artifacts).recipe
    env = backend_for(recipe.target.kind).place_replica(worker.replica_index, server.app.cfg.workers, recipe)
    server.log.info("replica %d placed: %s", worker.replica_index, env)


def child_exit(server, worker) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:
    """At shutdown (SIGTERM included, once the workers are gone), write the traffic profile; then the
    workers' metric files have served their purpose and go."""
    from neuron_serve.engine.metrics import traffic_profile

    settings = server.app.settings
    path = traffic_profile(settings.model_name).write(settings.profile_dir)
    server.log.info("traffic profile written: %s", path)
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
    artifacts = resolve_target(args.target)
    manifest = read_manifest(artifacts)
    serve_section = manifest.recipe.serve
    workers = args.workers or serve_section.workers
    max_waiting = args.max_waiting or serve_section.max_waiting
    settings = ServeSettings(
        artifacts=artifacts.resolve(),
        model_name=args.model_name or manifest.recipe.name,
        max_waiting=max_waiting,
        max_tokens_default=serve_section.max_tokens_default,
        max_tokens_cap=serve_section.max_tokens_cap,
        log_prompts=args.log_prompts,
        profile_dir=Path(args.profile_dir),
        api_key_sha256=key_digest(args.api_key) if args.api_key else "",
        tenants=load_tenants(args.tenants) if args.tenants else {},
        replicas=workers,
        usage_log=args.usage_log,
    )
    if settings.api_key_sha256 and settings.tenants:
        raise ValueError("give --api-key or --tenants, not both: the tenants file holds every key")
    host = args.host or serve_section.host
    if not (settings.api_key_sha256 or settings.tenants) and host not in (*LOOPBACK, "localhost"):
        print(f"warning: serving on {host} without --api-key: anyone who reaches the port can use it", file=sys.stderr)
    batch_size = manifest.recipe.shapes.batch_size
    print(describe(manifest, artifacts), file=sys.stderr)
    options = {
        "bind": f"{host}:{args.port or serve_section.port}",
        "workers": workers,
        "worker_class": "neuron_serve.server.worker.ServingWorker",  # gthread, guarded (its docstring)
        # Every stream holds a thread until it ends: slots + queue + room for /ping and /metrics.
        "threads": batch_size + max_waiting + 8,
        "timeout": 120,
        "graceful_timeout": serve_section.graceful_timeout_s,
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
    ServerApplication(settings, options).run()
    return 0
