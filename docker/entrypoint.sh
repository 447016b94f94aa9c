#!/bin/sh
# The container's entrypoint. SageMaker starts the container as `docker run IMAGE serve`; `neuron-serve
# serve` without a target then serves what the environment names (NEURON_SERVE_MODEL, LMI's
# OPTION_MODEL_ID) or what SageMaker unpacked into /opt/ml/model (SM_MODEL_DIR elsewhere). Any other
# command runs as given, e.g. `docker run IMAGE neuron-serve compile compile/NAME.toml` or
# `docker run -it IMAGE bash`.
set -e

# A model chosen by the environment or put in the model directory.
model_given() {
    [ -n "${NEURON_SERVE_MODEL:-}${OPTION_MODEL_ID:-}" ] && return 0
    dir="${SM_MODEL_DIR:-/opt/ml/model}"
    [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ]
}

if [ "$1" = "serve" ]; then
    shift
    # The cpu image has a model compiled in (NEURON_SERVE_BUILTIN_MODEL): it serves that when nothing
    # else is given. As NEURON_SERVE_MODEL, so that a target on the command line still wins.
    if [ -n "${NEURON_SERVE_BUILTIN_MODEL:-}" ] && ! model_given; then
        export NEURON_SERVE_MODEL="$NEURON_SERVE_BUILTIN_MODEL"
    fi
    # All interfaces, whatever host the recipe names; SageMaker's port (8080 unless an inference
    # pipeline assigns another); NEURON_SERVE_HOST and NEURON_SERVE_PORT win, as in `serve` itself.
    # exec: the server becomes PID 1 and gets SageMaker's SIGTERM itself.
    exec neuron-serve serve --host "${NEURON_SERVE_HOST:-0.0.0.0}" \
        --port "${NEURON_SERVE_PORT:-${SAGEMAKER_BIND_TO_PORT:-8080}}" "$@"
fi
exec "$@"
