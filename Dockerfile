# syntax=docker/dockerfile:1
# Images for the cluster side of mlxpool: the operator and the router (agents run on the
# Macs themselves, natively: Metal is not available in Linux containers).
#   docker build --target operator -t mlxpool-operator:0.1.0 .
#   docker build --target router   -t mlxpool-router:0.1.0 .
# Both run as a non-root user with a read-only root filesystem (no .pyc written, no
# home needed); neither installs MLX (only the agent serves models).
# Not built in this project's CI (no container engine there): linted by hadolint and a
# structure test (tests/operator/test_images.py).

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# A C++ compiler for the native weight manager (mlxpool._native) built with the package.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY native/ native/
COPY mlxpool/ mlxpool/
COPY node-agent/ node-agent/
COPY operator/ operator/
COPY router/ router/
RUN python -m venv /opt/mlxpool \
 && /opt/mlxpool/bin/pip install --no-cache-dir --upgrade pip==25.3 \
 && /opt/mlxpool/bin/pip install --no-cache-dir .

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/mlxpool/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
COPY --from=build /opt/mlxpool /opt/mlxpool
# 65532: the "nonroot" uid of distroless images, which the manifests' runAsUser names.
USER 65532:65532
ENTRYPOINT ["mlxpool"]

FROM runtime AS router
EXPOSE 8080
CMD ["router", "--help"]

FROM runtime AS operator
EXPOSE 8080 8081
CMD ["operator", "--help"]
