# The expertmesh operator (kopf): reads Models, writes the RayService, queries Prometheus.
# Build from the repository root:
#   docker build -f deployments/docker/operator.Dockerfile -t ghcr.io/expertmesh/expertmesh-operator:0.1.0 .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/expertmesh
COPY pyproject.toml constraints.txt README.md ./
COPY platform/ platform/
COPY operators/ operators/

# The operator imports neither torch nor Ray (tests/unit/operator/test_operator_imports.py), so
# the image installs the package without its runtime dependencies and then the [operator] extra
# alone, read from pyproject.toml; the last two checks keep it that way.
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['operator'], sep='\n')" > /tmp/operator-requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/operator-requirements.txt \
    && rm -rf /opt/expertmesh/platform /opt/expertmesh/operators /tmp/operator-requirements.txt \
    && expertmesh-operator --help >/dev/null \
    && ! python -c "import torch" 2>/dev/null && ! python -c "import ray" 2>/dev/null

# A numeric non-root user, so the chart's runAsNonRoot can check it.
USER 10001:10001
ENTRYPOINT ["expertmesh-operator"]
