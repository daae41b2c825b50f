# push-service image: configured only by PUSH_* environment variables (see docs/operations.md "Configuration").
#
#   docker build -t push-service .
#   docker run --rm -p 4000:4000 -e PUSH_SERVICE_KEY=... -e PUSH_JWT_SECRET=... push-service
#
# Both stages use the same base image: the virtualenv built in the first is copied as is into the
# second, so its interpreter path (/usr/local/bin/python3.11) must exist there too.

# --- builder: build the wheel, install it with its dependencies into /opt/venv
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# Only what the package build needs (and what tests/test_deploy.py builds from, to prove it suffices).
COPY pyproject.toml README.md ./
COPY push_service ./push_service

# The broker extras (redis, nats) come along so one image serves every PUSH_BROKER; fast: uvloop.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install "$(find /wheels -name 'push_service-*.whl')[redis,nats,fast]" \
 && /opt/venv/bin/pip uninstall --yes pip setuptools wheel

# --- runtime: the interpreter, the virtualenv, an unprivileged user; no sources, no build tools
FROM python:3.11-slim AS runtime

RUN groupadd --system --gid 10001 push \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin push

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PUSH_HOST=0.0.0.0 \
    PUSH_PORT=4000 \
    PUSH_ENV=production

USER 10001:10001
EXPOSE 4000

# slim has no curl: the check uses the image's own Python. Non-2xx or no answer -> exit 1 (unhealthy).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PUSH_PORT', '4000'), timeout=2)"]

# SIGTERM starts the drain (PUSH_DRAIN_SECONDS): sockets are closed gradually, then the process exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["push-service"]
CMD ["serve"]
