# syntax=docker/dockerfile:1

# The cachecar sidecar image: `cachecar serve` on the config mounted at /etc/cachecar/cachecar.yaml
# (deploy/kubernetes/deployment.yaml mounts a ConfigMap there).
#
#   docker build -t cachecar:0.1.0 .
#   docker run --rm -p 8081:8081 -v "$PWD/my.yaml:/etc/cachecar/cachecar.yaml:ro" cachecar:0.1.0
#
# The build stage turns the checkout into cachecar's wheel and installs it, with the locked
# dependencies, into a virtualenv; the runtime stage copies that virtualenv alone: no source
# tree, no wheels, no pip cache, no build tools, no dev extras. tests/test_deploy.py replays the
# build stage and runs the result, and keeps the ports, paths and user here in step with the
# config defaults and the Kubernetes example.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# What the wheel is built from (pyproject.toml: the packages, the readme, the license, and the
# embedded default config), and the lock's views that the image installs; .dockerignore keeps
# everything else out of the build context.
COPY pyproject.toml README.md LICENSE ./
COPY requirements/runtime.txt requirements/build.txt requirements/
COPY config/cachecar.yaml config/
COPY cache/ cache/
COPY proxy/ proxy/
# The same versions the tests ran on: the build backend and every dependency come from the lock
# (requirements/*.txt, written from uv.lock by scripts/lock), hash-checked, as wheels. Every
# dependency publishes manylinux wheels for amd64 and arm64, so no compiler is needed here.
# cachecar itself is built without build isolation, from the locked backend.
RUN pip install --require-hashes --only-binary :all: -r requirements/build.txt \
 && pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
 && python -m venv --without-pip /opt/cachecar \
 && pip --python /opt/cachecar/bin/python install --require-hashes --only-binary :all: \
        -r requirements/runtime.txt \
 && pip --python /opt/cachecar/bin/python install --no-index --no-deps /wheels/cachecar-*.whl

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="cachecar" \
      org.opencontainers.image.description="A caching sidecar: an HTTP reverse proxy with an in-process L1, a shared Redis L2 and three write modes" \
      org.opencontainers.image.licenses="MIT"
# CACHECAR_HEALTHCHECK_URL: change it with admin.listen's port.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/cachecar/bin:$PATH \
    CACHECAR_HEALTHCHECK_URL=http://127.0.0.1:8081/healthz
# A fixed, numeric uid: Kubernetes' runAsNonRoot can only verify a numeric USER.
RUN groupadd --system --gid 10001 cachecar \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin cachecar
COPY --from=build /opt/cachecar /opt/cachecar
USER 10001:10001
# 8080: the proxy (server.listen); 8081: the admin listener (admin.listen): /healthz, /readyz,
# /metrics, /dashboard, /admin/*. Both bind 127.0.0.1 unless the config says otherwise.
EXPOSE 8080 8081
# SIGTERM: stop accepting, finish requests in flight, flush write-behind, within
# server.shutdown_grace; give `docker stop -t` (or the Pod's grace period) more than that.
STOPSIGNAL SIGTERM
# Slim images have no curl; the standard library does it. Any answer but a 2xx, or none within
# the timeout, is a failure. (Kubernetes ignores HEALTHCHECK: it uses the Pod's probes.)
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['CACHECAR_HEALTHCHECK_URL'], timeout=2)"]
ENTRYPOINT ["cachecar"]
CMD ["serve", "-c", "/etc/cachecar/cachecar.yaml"]
