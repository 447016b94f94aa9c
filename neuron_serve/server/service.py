"""One model replica in a server worker: loads the artifacts in the background, then runs the engine."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neuron_serve.artifact.manifest import read_manifest
from neuron_serve.backends.base import Cores, LoadTimes
from neuron_serve.backends.registry import backend_for
from neuron_serve.engine.engine import Engine
from neuron_serve.engine.forward_process import ForwardProcess
from neuron_serve.engine.metrics import metrics_for
from neuron_serve.engine.prompts import stop_ids
from neuron_serve.engine.tokenizer import load_tokenizer
from neuron_serve.server.protocol import Limits
from neuron_serve.server.tenants import Quotas, Tenant

log = logging.getLogger("neuron_serve.server.service")


@dataclass
class ServeSettings:
    artifacts: Path
    model_name: str
    max_waiting: int = 256
    max_tokens_default: int = 256
    max_tokens_cap: int = 0  # 0: no cap but the context
    max_body_bytes: int = 4 * 1024 * 1024
    log_prompts: bool = False
    profile_dir: Path = Path("profiles")  # traffic profiles go to profile_dir/<model_name>/
    api_key_sha256: str = ""  # the key's digest, never the key: "" serves without one
    tenants: dict[str, Tenant] = field(default_factory=dict)  # by key digest (server/tenants.py)
    replicas: int = 1  # the workers, which share each tenant's limits
    usage_log: Path | None = None  # each request's usage record, appended as JSON lines
    placement: list[Cores] = field(default_factory=list)  # each replica's (server/placement.py); []: unpinned
    forward_start_method: str = "spawn"  # how the forward process starts (its docstring says when to fork)
    prefill_order: str = "arrival"  # the recipe's serve.prefill_order


_one_loader_at_a_time = threading.Lock()


def _load_tokenizer(directory: Path):
    """One loader at a time: a tokenizer that needs transformers imports it (`load_tokenizer`), and
    its lazy modules fail ("cannot import name 'AutoTokenizer'") when two threads import them at once,
    as the loaders of several models would."""
    with _one_loader_at_a_time:
        return load_tokenizer(directory)


class ModelService:
    def __init__(self, settings: ServeSettings, replica_index: int = 0):
        self.settings = settings
        self.cores = settings.placement[replica_index] if settings.placement else None
        self.state = "loading"
        self.error: str | None = None
        self.engine: Engine | None = None
        self.tokenizer = None
        self.limits: Limits | None = None
        self.eos_ids: frozenset[int] = frozenset()
        self.metrics = metrics_for(settings.model_name)
        self.source = ""
        self.quotas = Quotas(settings.replicas)
        self._forward: ForwardProcess | None = None
        self._thread = threading.Thread(target=self._load, name="neuron-serve-loader", daemon=True)

    def start_forward_process(self) -> None:
        """Starts the forward process from the calling thread: a forked one before any other thread runs
        (`start_services`). An artifact that cannot be read fails the model here."""
        try:
            self._forward = ForwardProcess(
                self.settings.artifacts, self._fail, self.cores, self.settings.forward_start_method
            )
        except Exception as error:  # reported by /health and /ping, as a failed load
            log.exception("starting the forward process of %s failed", self.settings.artifacts)
            self._fail(f"{type(error).__name__}: {error}")

    def start(self) -> ModelService:
        """Loads the rest in the background, once the forward process has started."""
        self._thread.start()
        return self

    def wait_ready(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return self.state == "ready"

    def _load(self) -> None:
        if self._forward is None:
            return  # failed to start: `start_forward_process` said why
        try:
            times = LoadTimes()
            manifest, runner = read_manifest(self.settings.artifacts), self._forward
            started = time.perf_counter()  # the tokenizer loads while the forward process does
            self.tokenizer = _load_tokenizer(self.settings.artifacts / "tokenizer")
            times.measure("load_tokenizer", started)
            runner.wait_ready(times)
            config, recipe = manifest.model_config, manifest.recipe
            self.eos_ids = stop_ids(self.tokenizer, config.eos_token_ids)
            longest_token = max(map(len, self.tokenizer.get_vocab()))
            settings = self.settings
            self.limits = Limits(
                runner.graphs.max_seq_len,
                config.vocab_size,
                settings.max_tokens_default,
                longest_token,
                settings.max_tokens_cap,
            )
            self.source = manifest.source.get("spec", "")
            kernels, shortest_first = frozenset(recipe.kernels.enabled), self.settings.prefill_order == "shortest-first"
            self.engine = Engine(runner, self.metrics, self.settings.max_waiting, kernels, shortest_first).start()
            backend = backend_for(recipe.target.kind)
            if backend.watch_occupancy(self.metrics.accelerator_occupancy.set):
                self.metrics.occupancy_from_forward_time = False
            for phase, seconds in times.phases.items():
                self.metrics.cold_start.labels(self.settings.model_name, phase).set(seconds)
            self.state = "ready"
            log.info("model %s ready: %s", self.settings.model_name, {k: round(v, 3) for k, v in times.phases.items()})
        except Exception as error:  # reported by /health and /ping; the worker stays up to say so
            log.exception("loading %s failed", self.settings.artifacts)
            self._fail(f"{type(error).__name__}: {error}")

    def _fail(self, message: str) -> None:
        self.error = message
        self.state = "failed"


def start_services(models: list[ServeSettings], replica_index: int) -> list[ModelService]:
    """One replica of each model: every forward process started first, from this thread, then each
    model's loader thread.

    The worker itself then keeps to one torch thread. Its own tensor work (copying logits, sampling)
    is small, and with more threads each of those operators woke OpenMP threads that spun on after it
    for milliseconds, taking a core from the forward process's step. Measured on 2 cores: a batch-1
    decode round trip took 28-29 ms, against 18-19 ms with one thread here."""
    services = [ModelService(settings, replica_index) for settings in models]
    for service in services:
        service.start_forward_process()
    torch.set_num_threads(1)
    return [service.start() for service in services]
