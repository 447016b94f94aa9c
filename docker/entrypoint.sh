#!/bin/sh
# The container's entrypoint. SageMaker starts the container as `docker run IMAGE serve` and puts the
# model (an artifact directory from `neuron-serve compile`, or a recipe and weights) in /opt/ml/model,
# which `neuron-serve serve` without a target reads. Any other command runs as given, e.g.
# `docker run IMAGE neuron-serve compile compile/NAME.toml` or `docker run -it IMAGE bash`.
set -e
if [ "$1" = "serve" ]; then
    shift
    # All interfaces, whatever host the recipe names; SageMaker's port (8080 unless an inference
    # pipeline assigns another). exec: the server becomes PID 1 and gets SageMaker's SIGTERM itself.
    exec neuron-serve serve --host 0.0.0.0 --port "${SAGEMAKER_BIND_TO_PORT:-8080}" "$@"
fi
exec "$@"
