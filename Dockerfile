# Image for the ext_proc service (`extproc serve`) and the vLLM simulator (`vllmsim`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Metadata first: dependency layers are then rebuilt only when pyproject.toml changes...
COPY pyproject.toml README.md* ./
COPY extproc ./extproc
COPY vllmsim ./vllmsim
# ...and a non-editable install leaves nothing in /src that the runtime needs.
RUN pip install . && rm -rf /src

# Never run as root; a fixed UID keeps file ownership predictable for mounted volumes. USER is
# numeric so that Kubernetes can verify `runAsNonRoot` (deploy/base/deployment.yaml runs it so).
# Nothing is written at run time (PYTHONDONTWRITEBYTECODE; pip compiled the bytecode above; the
# self-signed TLS certificate lives in memory): a read-only root filesystem works.
RUN groupadd --gid 10001 app \
 && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin app
USER 10001:10001
WORKDIR /home/app

# gRPC (ext_proc), gRPC health (--grpc-health-address), admin HTTP, simulator HTTP.
EXPOSE 9002 9003 9090 8000
# No default server: docker-compose.yaml chooses `extproc serve ...` or `vllmsim ...`.
CMD ["extproc", "--help"]
