# The example service (example_app/) on the lifecycle library.
# Build: docker build -t lifecycle-example .   Run: docker run -p 8000:8000 lifecycle-example
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SQLITE_PATH=/data/items.db

WORKDIR /app
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home app \
    && mkdir /data \
    && chown app:app /data

# Dependencies in their own layer, rebuilt only when pyproject.toml changes: install the
# project's "example" extra against a placeholder package, then drop the placeholder.
# Versions follow pyproject.toml's lower bounds; add a constraints file to pin them exactly.
COPY pyproject.toml README.md ./
# hadolint ignore=DL3013
RUN mkdir lifecycle \
    && touch lifecycle/__init__.py \
    && pip install ".[example]" \
    && pip uninstall --yes anyio-lifecycle \
    && rm -rf lifecycle build

COPY lifecycle/ lifecycle/
RUN pip install --no-deps . && rm -rf build
COPY example_app/ example_app/

USER 10001:10001
EXPOSE 8000
# uvicorn itself receives SIGTERM (exec-form CMD, no shell in between): the app's drain
# begins at once, then uvicorn shuts down gracefully. See "Graceful drain" in the README.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=2)"]
CMD ["uvicorn", "example_app.main:app", "--host", "0.0.0.0", "--port", "8000", "--timeout-graceful-shutdown", "30"]
