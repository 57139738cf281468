# The image of one version of the code: `ops build` tags it by commit (+ a hash of the diff).
# BASE_IMAGE must provide Python 3.11+ with pip; a CUDA PyTorch base means the build installs only
# the project and the small packages it needs.
ARG BASE_IMAGE=docker.io/pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

# PIP_BREAK_SYSTEM_PACKAGES: a Debian base refuses system-wide installs otherwise (PEP 668).
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1
WORKDIR /opt/diffusion-ops

# Dependencies first, from pyproject.toml alone, so that a code change reuses this layer.
COPY pyproject.toml README.md ./
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && python3 -m pip install -r /tmp/requirements.txt

COPY diffusion ./diffusion
COPY ops ./ops
COPY configs ./configs
RUN python3 -m pip install --no-deps . && python3 -c "import diffusion.config, ops.cli"

# Engines pass the command: `python -m diffusion RUN_DIR` (wrapped to keep a log in the run dir).
CMD ["python3", "-m", "diffusion", "--help"]
