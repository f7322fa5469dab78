# syntax=docker/dockerfile:1
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Only what the package needs, so editing tests does not rebuild this layer.
COPY pyproject.toml README.md constraints.txt ./
COPY service ./service
# /var/lib/prediction-service: where compose mounts STATE_DIR. A new named
# volume takes this directory's owner, so the app (uid 10001) can write it.
RUN pip install --no-cache-dir -c constraints.txt . \
    && useradd --system --uid 10001 --no-create-home app \
    && mkdir -p /var/lib/prediction-service \
    && chown 10001:10001 /var/lib/prediction-service

USER 10001

ENV HOST=0.0.0.0 PORT=8080
EXPOSE 8080

# Healthy means ready: the broker is connected and the event stream replayed.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('PORT', '8080')}/readyz\", timeout=2)"]

# uvicorn finishes in-flight requests on SIGTERM; give it SHUTDOWN_GRACE_S.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service"]
