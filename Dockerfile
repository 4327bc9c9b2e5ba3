# kdiff-pipeline, CPU image (GPU hosts: Dockerfile.gpu).
#   docker build -t kdiff-pipeline:cpu .
#   docker run --rm -v "$PWD/runs:/runs" kdiff-pipeline:cpu run --teacher swin --student shufflenetv2
# The default --run-dir (runs/default) lands in the /runs volume; the container runs as uid 10001, so the
# host folder must be writable by it (or pass --user "$(id -u):$(id -g)"). See docs/docker.md.
FROM debian:bookworm-slim

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

# Every pip command is constrained by a lock (scripts/lock.sh), so the image gets exactly its versions.
# 1. The README's first install command: torch and torchvision (5.8 GB, the largest layer, so it comes first).
#    Both images run this very step with lock-cpu.txt (lock-gpu.txt pins torch and its dependencies identically:
#    tests/test_docker.py checks it), so a builder or registry holding both images stores this layer once.
WORKDIR /opt/kdiff
COPY requirements/lock-cpu.txt requirements/lock-gpu.txt requirements/
RUN pip install --no-cache-dir -c requirements/lock-cpu.txt torch==2.14.1 torchvision==0.29.1

# 2. The package's other dependencies, read from pyproject.toml: a change of code then rebuilds only step 3.
COPY pyproject.toml src/
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("src/pyproject.toml", "rb"))["project"]["dependencies"]))' >requirements/deps.txt \
 && pip install --no-cache-dir -c requirements/lock-cpu.txt -r requirements/deps.txt

# 3. The README's second command: the package itself (not editable, without the test extra).
COPY README.md src/
COPY pipeline src/pipeline
COPY models src/models
COPY exporters src/exporters
RUN pip install --no-cache-dir -c requirements/lock-cpu.txt ./src \
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
