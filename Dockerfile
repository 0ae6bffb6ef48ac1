# syntax=docker/dockerfile:1
# The receiver as a production image: no embedded Postgres, no dev secrets, not root.
#   docker build -t receiver .
#   docker run -e RECEIVER_DATABASE_URL=… -e RECEIVER_WEBHOOK_SECRETS=… \
#              -e RECEIVER_TOKEN_KEYS=… -e RECEIVER_INDEX_KEY=… -p 8080:8080 receiver
# Run `docker run … receiver migrate` once per release before rolling the replicas.
# Pin the base by digest where you build: `docker pull python:3.11-slim` and use
# `FROM python:3.11-slim@sha256:…` in both stages (README "Container image").

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY receiver ./receiver
COPY sql ./sql
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin receiver
WORKDIR /app
# The dependencies, exactly as locked (versions and hashes): a layer of its own, rebuilt
# only when requirements.lock changes (`make lock`), not at every source edit.
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes --no-deps -r requirements.lock
# The receiver's own wheel, mounted from the build stage rather than copied: nothing of
# it stays behind in a layer.
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    pip install --no-cache-dir --no-deps /dist/*.whl
USER receiver
EXPOSE 8080
# `receiver health` GETs /healthz where serve answers it: the admin listener when
# RECEIVER_ADMIN_PORT is set (the public port then answers 404), else the port below,
# which must be CMD's --port. It reads no secret; exit 0 or 1, one line. Its --timeout
# stays below HEALTHCHECK's, which also covers the interpreter's start (~1-2 s).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["receiver", "health", "--port", "8080", "--timeout", "2"]
ENTRYPOINT ["receiver"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
