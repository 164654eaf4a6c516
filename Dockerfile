# syntax=docker/dockerfile:1
# Airlock GPU image: gateway and workers (vLLM, CUDA). Build:  docker build -t airlock:0.1.0 .
# Runs as a non-root user with a read-only root filesystem: everything it writes goes to the state
# volume (/var/lib/airlock) and /tmp. See docs/operations.md.
ARG CUDA_VERSION=12.8.1
ARG UBUNTU=ubuntu24.04

# --- build: the same scripts/bootstrap.sh the Makefile runs, with the gpu extra ---------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY scripts/ scripts/
COPY protos/ protos/
COPY airlock/ airlock/
COPY serving/ serving/
COPY gateway/ gateway/
COPY control/ control/
COPY worker/ worker/
# The whole stack in one image: the gateway and control plane, and GPU workers. vLLM brings its CUDA
# torch: no CPU torch first (AIRLOCK_TORCH empty), a regular (non-editable) install.
RUN VENV=/opt/airlock AIRLOCK_EXTRAS=gateway,gpu AIRLOCK_TORCH= AIRLOCK_EDITABLE=0 ./scripts/bootstrap.sh \
 && /opt/airlock/bin/python -m compileall -q /opt/airlock/lib

# --- runtime: CUDA runtime libraries, the venv, policy and config; no compilers -------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 airlock \
 && useradd --system --uid 10001 --gid airlock --home-dir /var/lib/airlock --no-create-home \
      --shell /usr/sbin/nologin airlock \
 && mkdir -p /var/lib/airlock && chown 10001:10001 /var/lib/airlock && chmod 0700 /var/lib/airlock
COPY --from=build /opt/airlock /opt/airlock
COPY policy/ /etc/airlock/policy/
COPY deploy/docker/airlock.toml /etc/airlock/airlock.toml
ENV PATH=/opt/airlock/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/airlock \
    HF_HOME=/var/lib/airlock/hf \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
VOLUME ["/var/lib/airlock"]
USER 10001:10001
WORKDIR /var/lib/airlock
EXPOSE 7443 7444 9464
# The gRPC health service over TLS (the gateway's own CA), not a TCP poke: SERVING or unhealthy.
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
  CMD ["airlock", "health", "--config", "/etc/airlock/airlock.toml", "--ca", "/var/lib/airlock/pki/ca.crt", "--timeout", "5"]
ENTRYPOINT ["airlock"]
CMD ["up", "--config", "/etc/airlock/airlock.toml"]
