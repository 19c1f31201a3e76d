# The Ray image every RayService pod runs (head and workers): Ray + the expertmesh runtime.
# Build from the repository root:
#   docker build -f deployments/docker/runtime.Dockerfile -t ghcr.io/expertmesh/expertmesh-runtime:0.1.0 .
# The Ray version here, constraints.txt and the chart's rayService.rayVersion must agree.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${RAY_IMAGE}

WORKDIR /opt/expertmesh
COPY --chown=ray:users pyproject.toml constraints.txt README.md ./
COPY --chown=ray:users platform/ platform/
COPY --chown=ray:users operators/ operators/

# CPU torch wheels (no CUDA libraries); for GPUs pick a CUDA index and a rayproject/ray *-gpu base.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX}" -c constraints.txt . \
    && python -c "import expertmesh.serve.app"

# KubeRay starts Ray itself (ray start ...); Serve then imports expertmesh.serve.app:app_builder.
WORKDIR /home/ray
