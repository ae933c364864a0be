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

# Never run as root; a fixed UID keeps file ownership predictable for mounted volumes.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin app
USER app
WORKDIR /home/app

# gRPC (ext_proc), admin HTTP, simulator HTTP.
EXPOSE 9002 9090 8000
# No default server: docker-compose.yaml chooses `extproc serve ...` or `vllmsim ...`.
CMD ["extproc", "--help"]
