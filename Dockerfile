# The gateway image; the publisher CLI (wspublish) ships in it too. No `# syntax=` line: it
# would make BuildKit fetch a frontend image, and the build must work without a registry.

ARG PYTHON=python:3.11-slim-bookworm

FROM ${PYTHON} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# Dependencies first, from the locked set, so code changes do not rebuild this layer.
COPY requirements.lock ./
RUN python -m venv /venv && /venv/bin/pip install --require-virtualenv -r requirements.lock
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY publisher ./publisher
RUN /venv/bin/pip install --require-virtualenv --no-deps .

FROM ${PYTHON}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/venv/bin:$PATH \
    GATEWAY_LOG_FORMAT=json
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home --shell /usr/sbin/nologin gateway
COPY --from=build /venv /venv
USER 10001:10001
EXPOSE 8765
# No curl in a slim image: Python asks /readyz itself.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('GATEWAY_PORT', '8765'), timeout=2).status != 200)"]
# Exec form: the gateway is PID 1's only child-free process and receives SIGTERM itself.
ENTRYPOINT ["wsgateway"]
