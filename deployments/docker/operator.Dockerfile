# The expertmesh operator (kopf): reads Models, writes the RayService, queries Prometheus.
# Build from the repository root:
#   docker build -f deployments/docker/operator.Dockerfile -t ghcr.io/expertmesh/expertmesh-operator:0.1.0 .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/expertmesh
COPY pyproject.toml constraints.txt README.md ./
COPY platform/ platform/
COPY operators/ operators/

# The operator builds the same serve config as the runtime (expertmesh.config, expertmesh.serve.app),
# so it installs the runtime's dependencies too; CPU torch keeps the image free of CUDA libraries.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX}" -c constraints.txt ".[operator]" \
    && rm -rf /opt/expertmesh/platform /opt/expertmesh/operators \
    && expertmesh-operator --help >/dev/null

# A numeric non-root user, so the chart's runAsNonRoot can check it.
USER 10001:10001
ENTRYPOINT ["expertmesh-operator"]
