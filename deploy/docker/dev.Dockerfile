# syntax=docker/dockerfile:1.7@sha256:a57df69d0ea827fb7266491f2813635de6f17269be881f696fbfdf2d83dda33e
# recforge dev image: the app image + JupyterLab, the test/lint tools of dev-lock.txt (pytest, ruff, debugpy,
# ipykernel) and native debuggers. Still non-root; serves JupyterLab on 8888 (token printed in the log).
#   docker buildx build -f deploy/docker/dev.Dockerfile --build-arg APP_IMAGE=recforge-app:0.1.0 -t recforge-dev:0.1.0 .
#   docker run --gpus all -p 127.0.0.1:8888:8888 -v $PWD:/work recforge-dev:0.1.0
ARG APP_IMAGE=recforge-app:0.1.0
FROM ${APP_IMAGE}

USER 0:0
WORKDIR /opt/recforge
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gdb strace procps less git \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

COPY requirements/dev-lock.txt requirements/dev-lock.txt
# JupyterLab is pinned here and held to the locks' versions of everything they share; py-spy samples a
# running trainer or server without restarting it.
RUN pip install --no-cache-dir -c requirements/lock-cuda.txt -r requirements/dev-lock.txt \
        jupyterlab==4.6.6 py-spy==0.4.3

COPY notebooks ./notebooks
RUN mkdir -p /work && chown 10001:10001 /work
WORKDIR /work
USER 10001:10001
EXPOSE 8888
HEALTHCHECK NONE
ENTRYPOINT []
CMD ["jupyter", "lab", "--ip=0.0.0.0", "--port=8888", "--no-browser", "--ServerApp.root_dir=/work"]
