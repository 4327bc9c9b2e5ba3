# kdiff-pipeline, CPU image (GPU hosts: Dockerfile.gpu).
#   docker build -t kdiff-pipeline:cpu .
#   docker run --rm -v "$PWD/runs:/runs" kdiff-pipeline:cpu run --teacher swin --student shufflenetv2
# The default --run-dir (runs/default) lands in the /runs volume; the container runs as uid 10001, so the
# host folder must be writable by it (or pass --user "$(id -u):$(id -g)"). See docs/docker.md.
# The base is a build argument. Its default, the tag, is what any engine pulls for the build's platform; pin the
# digest your registry serves with --build-arg BASE=debian:bookworm-slim@sha256:... (or scripts/pin-base.sh, which
# writes the engine's digest here). Machines without a registry pass their local base (scripts/docker-smoke.sh
# does, and logs it). See docs/docker.md.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

# Debian's Python 3.11 with its venv module, and the built-in default data set (Fashion-MNIST, offline, in
# /usr/share/datasets/fashion-mnist/). Pinned to bookworm's releases.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3=3.11.2-1+b1 \
      python3-venv=3.11.2-1+b1 \
      dataset-fashion-mnist=0.0~git20200523.55506a9-1 \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib
RUN python3 -m venv /opt/venv

# Every third-party package comes from a hashed lock (scripts/lock.sh), read as a requirements file with
# --require-hashes: the image gets exactly those files (each one's sha256 checked) or the build fails.
# 1. torch and torchvision with their dependencies (5.8 GB, the largest layer, so it comes first). Both images
#    run this very step, so a builder or registry holding both stores this layer once.
WORKDIR /opt/kdiff
COPY requirements/lock-torch.txt requirements/
RUN pip install --no-cache-dir --require-hashes -r requirements/lock-torch.txt

# 2. Everything else of the lock (the package's dependencies and its test extra): a change of code then
#    rebuilds only step 3.
COPY requirements/lock-cpu.txt requirements/
RUN pip install --no-cache-dir --require-hashes -r requirements/lock-cpu.txt

# 3. The package itself (not editable); --no-deps: its dependencies are all there from step 2.
COPY pyproject.toml README.md src/
COPY pipeline src/pipeline
COPY models src/models
COPY exporters src/exporters
RUN pip install --no-cache-dir --no-deps ./src \
 && rm -rf src/build src/*.egg-info \
 && pip check \
 && pipeline --help >/dev/null

# A non-root user; the run directory is a volume. /work/runs -> /runs, so the default --run-dir (runs/default,
# relative to the working directory) lands in the volume, and so does --run-dir /runs/NAME.
RUN useradd --no-log-init --create-home --uid 10001 --user-group pipeline \
 && mkdir -p /runs /work \
 && ln -s /runs /work/runs \
 && chown pipeline:pipeline /runs
USER 10001:10001
WORKDIR /work
VOLUME ["/runs"]

ENTRYPOINT ["pipeline"]
CMD ["--help"]
