# syntax=docker/dockerfile:1
# The receiver as a production image: no embedded Postgres, no dev secrets, not root.
#   docker build -t receiver .
#   docker run -e RECEIVER_DATABASE_URL=… -e RECEIVER_WEBHOOK_SECRETS=… \
#              -e RECEIVER_TOKEN_KEYS=… -e RECEIVER_INDEX_KEY=… -p 8080:8080 receiver
# Run `docker run … receiver migrate` once per release before rolling the replicas.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY receiver ./receiver
COPY sql ./sql
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin receiver
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER receiver
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["receiver"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
