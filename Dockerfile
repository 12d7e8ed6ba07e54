# syntax=docker/dockerfile:1.7
#
# gpufaas images; two final targets, the two images the Helm chart names:
#   docker build --target runtime      -t ghcr.io/gpufaas/gpufaas:0.1.0      .   # operator, gateway, model checks
#   docker build --target runtime-cuda -t ghcr.io/gpufaas/gpufaas:0.1.0-cuda .   # GPU manager
# Both run `gpufaas <subcommand>` as uid 10001; the final stages hold no compiler, pip or build tools.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128

# ---- wheel: the gpufaas wheel (pure Python) ------------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core/ core/
COPY cache/ cache/
COPY scheduler/ scheduler/
COPY gpu_manager/ gpu_manager/
COPY operator/ operator/
COPY examples/ examples/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- venv-cpu: the CPU torch wheel and gpufaas with its dependencies -----------------------------
FROM ${PYTHON_IMAGE} AS venv-cpu
ARG TORCH_VERSION
ARG TORCH_CPU_INDEX
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir --index-url "${TORCH_CPU_INDEX}" "torch==${TORCH_VERSION}"
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
    && pip uninstall --yes pip

# ---- runtime: operator, gateway, model-check Jobs ------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="gpufaas" \
      org.opencontainers.image.description="gpufaas operator, gateway and model checks (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin gpufaas
COPY --from=venv-cpu /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["gpufaas"]
CMD ["--help"]

# ---- cuda-base: the CUDA runtime plus a Python interpreter ---------------------------------------
FROM ${CUDA_IMAGE} AS cuda-base
# The CUDA base image pins the distribution; its security updates are wanted, so no version pins.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# ---- venv-cuda: the CUDA torch wheel and gpufaas -------------------------------------------------
FROM cuda-base AS venv-cuda
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir --index-url "${TORCH_CUDA_INDEX}" "torch==${TORCH_VERSION}"
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
    && pip uninstall --yes pip

# ---- runtime-cuda: the GPU manager ---------------------------------------------------------------
FROM cuda-base AS runtime-cuda
LABEL org.opencontainers.image.title="gpufaas-cuda" \
      org.opencontainers.image.description="gpufaas GPU manager (CUDA)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin gpufaas
COPY --from=venv-cuda /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
EXPOSE 8090
ENTRYPOINT ["gpufaas"]
CMD ["gpu-manager", "--help"]
