# syntax=docker/dockerfile:1
# Signalbox image: a venv built in a throwaway stage, copied into a clean slim runtime.
#   docker build -t signalbox .
#   docker run --rm -p 8080:8080 -v "$PWD/policies:/etc/signalbox/policies:ro" \
#       -e OPENAI_API_KEY signalbox
# Policies are read from /etc/signalbox/policies (a directory of YAML files, hot-reloaded);
# mount a host directory or a Kubernetes ConfigMap there, as a whole directory (no subPath).
# `docker stop` waits 10 s by default; give it --stop-timeout / --time >= grace + drain.

# One pinned minor line for both stages: the venv's interpreter path must match at runtime.
ARG PYTHON_IMAGE=python:3.11-slim-trixie

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv

WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY proxy ./proxy
# Every runtime dependency is pinned by constraints.txt (`make constraints` refreshes it from the
# tested venv), so two builds of one commit install the same versions. All of them ship binary
# wheels for 3.11, so no compiler is needed; pip compiles .pyc here, so the read-only runtime
# never has to write bytecode.
RUN /opt/venv/bin/pip install --constraint constraints.txt . \
    && /opt/venv/bin/signalbox --help >/dev/null


FROM ${PYTHON_IMAGE}

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="signalbox" \
      org.opencontainers.image.description="A reverse-proxy sidecar for LLM APIs: policies for limits, queues, retries and streams." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH="/opt/venv/bin:${PATH}"

# A fixed numeric UID/GID so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
RUN groupadd --system --gid 10001 signalbox \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin signalbox \
    && mkdir -p /etc/signalbox/policies

COPY --from=builder /opt/venv /opt/venv

# The policy directory: mount a host directory or a ConfigMap here, whole (no subPath), read-only.
VOLUME ["/etc/signalbox/policies"]

USER 10001:10001
WORKDIR /tmp

# 8080: API, /healthz, /readyz, /metrics. 9090: admin API (bearer token SIGNALBOX_ADMIN_TOKEN;
# it binds 127.0.0.1 unless the command adds --admin-host 0.0.0.0).
EXPOSE 8080 9090

# Liveness only (never depends on upstreams). slim has no curl, so use the stdlib;
# urlopen raises on any non-2xx answer or refused connection, which exits non-zero.
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('SIGNALBOX_HEALTHCHECK_URL', 'http://127.0.0.1:8080/healthz'), timeout=2)"]

# The proxy handles SIGTERM itself (fail readiness, keep serving for the grace, drain
# streams, exit 0), and it starts no child processes, so it can run as PID 1 without an init.
STOPSIGNAL SIGTERM
ENTRYPOINT ["signalbox"]
CMD ["serve", "--policies", "/etc/signalbox/policies", "--host", "0.0.0.0"]
