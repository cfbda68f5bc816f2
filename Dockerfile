# syntax=docker/dockerfile:1.7
# One image for every winback service: `docker run IMAGE ingest|scheduler|dispatcher|relay|migrate`.
#
# builder: uv installs the locked dependencies (uv.lock, no dev group, no `local` extra: no
#          pgserver, the embedded development database) and then the project itself as a wheel
#          (not editable) into /opt/venv.
# runtime: the same slim Python, the venv only (no compiler, no uv, no sources), a non-root user.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UV_VERSION=0.13.9

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

FROM ${PYTHON_IMAGE} AS builder
COPY --from=uv /uv /bin/uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3 \
    UV_PROJECT_ENVIRONMENT=/opt/venv
WORKDIR /src
# Dependencies first (a layer that changes only with uv.lock) ...
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-project
# ... then the project, built as a wheel and installed into the same venv.
COPY README.md ./
COPY shared ./shared
COPY services ./services
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable \
 && /opt/venv/bin/winback --help >/dev/null \
 && ! /opt/venv/bin/python -c "import pgserver" 2>/dev/null

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="winback" \
      org.opencontainers.image.description="Event-driven win-back engine: ingest, scheduler, dispatcher" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 winback \
 && useradd --system --uid 10001 --gid winback --home-dir /var/lib/winback \
      --shell /usr/sbin/nologin winback \
 && install -d -o winback -g winback -m 0750 /var/lib/winback /var/lib/winback/.winback \
      /var/lib/winback/.winback/messages
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    WINBACK_HTTP__HOST=0.0.0.0
# The working directory is the only writable place the services use (the file provider's
# `.winback/messages`); Kubernetes mounts an emptyDir here and at /tmp (read-only root FS).
WORKDIR /var/lib/winback
USER 10001:10001
EXPOSE 8081 8082 8083 8084
# /health of whichever service runs here: each reads its port from the same settings
# (WINBACK_HTTP__<SERVICE>_PORT, defaults 8081-8084); one of them answering 200 is healthy.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["python", "-c", "import os, sys, urllib.request\nfor name, port in (('INGEST', 8081), ('SCHEDULER', 8082), ('DISPATCHER', 8083), ('RELAY', 8084)):\n    port = os.environ.get(f'WINBACK_HTTP__{name}_PORT', port)\n    try:\n        urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2)\n        sys.exit(0)\n    except Exception:\n        pass\nsys.exit(1)\n"]
ENTRYPOINT ["winback"]
CMD ["--help"]
