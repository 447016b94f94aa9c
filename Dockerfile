# syntax=docker/dockerfile:1
# neuron-serve as a SageMaker-compatible inference container for Inf2/Trn1 (see docker/README.md).
#
# The base is AWS's Neuron deep-learning container (DLC) for PyTorch inference: the Neuron runtime and
# tools, neuronx-cc, torch-neuronx and neuronx-distributed, with pip already pointed at AWS's Neuron
# package repository. Published tags (github.com/aws-neuron/deep-learning-containers) look like
#   public.ecr.aws/neuron/pytorch-inference-neuronx:<torch>-neuronx-<py>-sdk<neuron sdk>-<os>
# and are mirrored in the DLC registry as
#   763104351884.dkr.ecr.<region>.amazonaws.com/pytorch-inference-neuronx:<same tag>
# The Neuron SDK release is 2.31.1, stated with its package pins in neuron_serve/backends/neuron/sdk.py (a
# test keeps this tag, the `neuron` extra and the NKI minimum in step).
ARG BASE_IMAGE=public.ecr.aws/neuron/pytorch-inference-neuronx:2.9.0-neuronx-py312-sdk2.31.1-ubuntu24.04
FROM ${BASE_IMAGE}

# The entrypoint listens on SAGEMAKER_BIND_TO_PORT when SageMaker sets it (inference pipelines).
LABEL com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true
ENV PYTHONUNBUFFERED=1

WORKDIR /opt/neuron-serve
COPY pyproject.toml README.md ./
COPY neuron_serve ./neuron_serve
COPY nki_kernels ./nki_kernels

# Install the package without touching the Neuron SDK the base image ships: its torch, torch-neuronx,
# torch-xla, compiler, NxD, NKI and NumPy versions are pinned as they are. The import check fails the
# build, not the endpoint, if the result is broken.
RUN pip freeze | grep -iE '^(torch|torch[-_]neuronx|torch[-_]xla|neuronx[-_]cc|neuronx[-_]distributed|libneuronxla|nki|numpy)==' \
        > /tmp/neuron-sdk-constraints.txt \
 && pip install --no-cache-dir --constraint /tmp/neuron-sdk-constraints.txt . \
 && python -c "import neuron_serve.cli, neuron_serve.recipe.schema, neuron_serve.backends.neuron.runner, torch_neuronx, neuronx_distributed, nki.language" \
 && rm -f /tmp/neuron-sdk-constraints.txt

COPY --chmod=755 docker/entrypoint.sh /usr/local/bin/neuron-serve-entrypoint

# SageMaker sends /ping and /invocations to port 8080.
EXPOSE 8080
# Exec form: the entrypoint (then the server, which it execs) receives SageMaker's SIGTERM directly.
ENTRYPOINT ["/usr/local/bin/neuron-serve-entrypoint"]
# `docker run IMAGE` serves like SageMaker's `docker run IMAGE serve`.
CMD ["serve"]
