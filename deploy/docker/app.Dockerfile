# syntax=docker/dockerfile:1.7@sha256:a57df69d0ea827fb7266491f2813635de6f17269be881f696fbfdf2d83dda33e
# recforge app image: the base image + recforge and its locked dependencies. Serves by default; every
# other command (`train`, `export`, `registry ...`) runs by naming it:
#   docker buildx build -f deploy/docker/app.Dockerfile --build-arg BASE_IMAGE=recforge-base:2.13.0-cu130 \
#       -t recforge-app:0.1.0 .
#   docker run --gpus all -v $PWD/models:/models -p 8000:8000 recforge-app:0.1.0
#   docker run --gpus all -v $PWD/data:/data recforge-app:0.1.0 quickstart workdir=/data/quickstart
ARG BASE_IMAGE=recforge-base:2.13.0-cu130
FROM ${BASE_IMAGE}

ARG CUDA_LOCK=requirements/lock-cu130.txt
USER 0:0
WORKDIR /opt/recforge

# The lock before the source: editing code reuses the (large) dependency layer.
COPY ${CUDA_LOCK} requirements/lock-cuda.txt
RUN pip install --no-cache-dir -r requirements/lock-cuda.txt

COPY pyproject.toml README.md ./
COPY src ./src
# --no-deps: everything is already installed from the lock; --no-build-isolation: the lock's setuptools builds it.
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && rm -rf build src/*.egg-info \
    && recforge --help > /dev/null
COPY configs ./configs
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/recforge-healthcheck
COPY --chmod=0755 deploy/docker/seed-registry.sh /usr/local/bin/recforge-seed-registry

# Training data and runs, the model registry, and logs (served impressions/clicks) live outside the image.
RUN mkdir -p /data /models /logs \
    && chown 10001:10001 /data /models /logs
VOLUME ["/data", "/models", "/logs"]

ENV RECFORGE_SERVE_EVENTS_DIR=/logs/serve-events
WORKDIR /data
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 CMD ["python", "/usr/local/bin/recforge-healthcheck"]
ENTRYPOINT ["recforge"]
CMD ["serve", "--registry", "/models", "--host", "0.0.0.0", "--port", "8000"]
