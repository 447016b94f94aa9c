"""The models one server serves, by name: a request's `model` picks one (the first where `model` is
optional), each model with its own replica in every worker."""

from __future__ import annotations

from flask import g

from neuron_serve.engine.sampler import brief
from neuron_serve.server.protocol import APIError
from neuron_serve.server.service import ModelService


class ServedModels:
    def __init__(self, services: list[ModelService]):
        self.services = services
        self.by_name = {service.settings.model_name: service for service in services}

    @property
    def names(self) -> list[str]:
        return list(self.by_name)

    @property
    def default(self) -> ModelService:
        return self.services[0]

    @property
    def state(self) -> str:
        """ready when every model is; failed when any failed; else loading."""
        states = {service.state for service in self.services}
        return "ready" if states == {"ready"} else "failed" if "failed" in states else "loading"

    def served_list(self) -> str:
        return ", ".join(repr(name) for name in self.names)

    def pick(self, model: object, required: bool) -> ModelService:
        """The model a request names: OpenAI's and vLLM's answers (400 without one where it is required,
        404 listing the served names for one not served), then 403 if the tenant may not use it."""
        if model is None and not required:
            service = self.default
        elif model is None:
            raise APIError(400, f"'model' is required: this server serves {self.served_list()}", "model")
        elif not isinstance(model, str) or model not in self.by_name:
            message = f"the model {brief(model)} does not exist: this server serves {self.served_list()}"
            raise APIError(404, message, "model", "model_not_found")
        else:
            service = self.by_name[model]
        tenant = g.get("tenant")
        if tenant is not None and not tenant.may_use(service.settings.model_name):
            message = f"tenant {tenant.name!r} may not use the model {service.settings.model_name!r}"
            raise APIError(403, message, "model", "permission_error")
        g.model = service  # for the tenant's request count by model
        return service

    def ready(self, model: object = None, required: bool = False) -> ModelService:
        service = self.pick(model, required)
        if service.state != "ready":
            detail = f": {service.error}" if service.error else ""
            name = service.settings.model_name
            raise APIError(503, f"the model {name!r} is {service.state}{detail}", None, "service_unavailable")
        return service
