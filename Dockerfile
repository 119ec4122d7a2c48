# claimwatch worker image.
#
#   docker build -t claimwatch .
#   docker run --env-file /path/outside/repo/.env claimwatch            # one worker, /healthz on :6066
#   docker run ... claimwatch alerts export --run-id r1 --out -       # any other subcommand
#
# Configuration comes only from CLAIMWATCH_* environment variables (see
# claimwatch/settings.py); no secret is baked into the image.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Project metadata first, then the sources the wheel is built from.
COPY pyproject.toml README.md ./
COPY claimwatch/ claimwatch/
COPY stream/ stream/
COPY detectors/ detectors/
COPY alerts/ alerts/
COPY replay/ replay/
# configs/ is not part of the wheel: the default rule file is read from here
# (compose bind-mounts the live one over CLAIMWATCH_RULES_PATH instead).
COPY configs/ configs/

RUN pip install ".[postgres]" \
 && groupadd --system --gid 10001 claimwatch \
 && useradd --system --uid 10001 --gid claimwatch --home-dir /var/lib/claimwatch --shell /usr/sbin/nologin claimwatch \
 && mkdir -p /var/lib/claimwatch \
 && chown claimwatch:claimwatch /var/lib/claimwatch

# The installed package cannot find configs/ next to itself, so say where it is.
# The web server must listen beyond loopback inside the container so that
# Prometheus (on the compose network) can scrape /metrics; the host never
# publishes this port.
ENV CLAIMWATCH_RULES_PATH=/app/configs/rules.yaml \
    CLAIMWATCH_DATA_DIR=/var/lib/claimwatch \
    CLAIMWATCH_WEB_BIND=0.0.0.0

USER claimwatch:claimwatch
WORKDIR /var/lib/claimwatch

EXPOSE 6066

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:6066/healthz', timeout=4); sys.exit(0 if r.status == 200 else 1)"]

ENTRYPOINT ["claimwatch"]
CMD ["worker", "--web-port", "6066"]
