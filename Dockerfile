# Mnemo scoring service images (docs/deployment.md).
#
#   docker build -t mnemo:cpu .                    # default: ONNX Runtime on CPU, no torch (small)
#   docker build --target gpu -t mnemo:gpu .       # onnxruntime-gpu + CUDA torch (TorchScript backend)
#
# Needs BuildKit (the default builder since Docker 23; DOCKER_BUILDKIT=1 on older engines): the legacy
# builder would also build the GPU stages for the default target. There is deliberately no `# syntax=`
# line, no `--pull` and no digest pin, so a locally built or mirrored BASE_IMAGE works offline.
ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------- build
# A venv holding the service and its dependencies; the runtime stages copy only /opt/venv.
FROM ${BASE_IMAGE} AS build
# Optional pip settings for builds behind a mirror or a TLS-intercepting proxy. Unset unless passed with
# --build-arg, so a plain build uses pip's defaults. Build args show in `docker history`: no secrets here.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
# `python3 -m venv` works on python:3.11-slim and on a plain Debian base with python3-venv alike.
RUN python3 -m venv /opt/venv
WORKDIR /src
# Dependencies first, read from pyproject.toml, so editing the code does not re-download them: the
# service's own and the `grpc` extra (the Open Inference Protocol over gRPC, off unless MNEMO_GRPC_PORT).
COPY pyproject.toml README.md ./
RUN /opt/venv/bin/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['grpc']))" > requirements.txt \
 && /opt/venv/bin/pip install --no-cache-dir -r requirements.txt
# Every package pyproject.toml installs: the `mnemo` CLI lists the commands of training/ and benchmarks/
# too, which import torch only when such a command runs; the serving path imports mnemo/ and service/.
COPY mnemo ./mnemo
COPY service ./service
COPY models ./models
COPY training ./training
COPY benchmarks ./benchmarks
# -P: the check must import the installed package, not the source folder mnemo/ in the working directory
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps . \
 && /opt/venv/bin/python -P -c "import mnemo.service.app, importlib.util as u; assert u.find_spec('torch') is None" \
 && /opt/venv/bin/mnemo serve --help > /dev/null

# ---------------------------------------------------------------------------------------- build-gpu
# onnxruntime-gpu (CUDA execution provider) replaces onnxruntime, and CUDA torch runs TorchScript bundles.
# On PyPI both are CUDA 13 + cuDNN 9 builds (torch 2.13.0, onnxruntime-gpu 1.31.1; host driver >= 580),
# and they bring the CUDA/cuDNN libraries as nvidia-* wheels (ORT's [cuda,cudnn] extras), so the base
# image needs no CUDA toolkit, only the host's NVIDIA driver and the NVIDIA container toolkit. Installed
# in one resolve so both agree on those libraries. For CUDA 12 hosts pass a CUDA 12 pair of builds
# (docs/deployment.md). Untested: no GPU where this was written.
FROM build AS build-gpu
ARG ONNXRUNTIME_GPU="onnxruntime-gpu[cuda,cudnn]==1.31.1"
ARG TORCH="torch==2.13.0"
RUN /opt/venv/bin/pip uninstall --yes onnxruntime \
 && /opt/venv/bin/pip install --no-cache-dir "${ONNXRUNTIME_GPU}" "${TORCH}" \
 && /opt/venv/bin/python -m pip uninstall --yes pip

# ------------------------------------------------------------------------------------------ venv-cpu
# pip and setuptools are build tools: leaving them out of the venv keeps ~25 MB out of the CPU image.
FROM build AS venv-cpu
RUN /opt/venv/bin/python -m pip uninstall --yes pip setuptools

# ---------------------------------------------------------------------------------------------- runtime
# What both images share: a non-root user, the default bundle, settings from MNEMO_* variables.
FROM ${BASE_IMAGE} AS runtime
# Numeric ids, so orchestrators can verify runAsNonRoot without reading /etc/passwd.
RUN groupadd --system --gid 10001 mnemo \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin mnemo
# The default bundle, so the image serves out of the box; mount a directory of bundles over /models
# (read-only is fine) to serve your own.
COPY bundles/brick /models/brick
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MNEMO_MODEL_DIR=/models \
    MNEMO_HOST=0.0.0.0 \
    MNEMO_PORT=8000
EXPOSE 8000 8001
# /readyz is 503 until every bundle is loaded and warmed. urllib, because slim images have no curl;
# urlopen raises (exit 1) on any non-2xx answer.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["/opt/venv/bin/python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('MNEMO_PORT', '8000'), timeout=4)"]
CMD ["mnemo", "serve"]

# ---------------------------------------------------------------------------------------------- gpu
FROM runtime AS gpu
COPY --from=build-gpu /opt/venv /opt/venv
# Let the dynamic loader find the pip-installed CUDA/cuDNN libraries for onnxruntime-gpu (which dlopens
# some of them, e.g. cuDNN), wherever each nvidia-* wheel puts them.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN find /opt/venv -path '*/site-packages/nvidia/*' -name 'lib*.so*' -printf '%h\n' | sort -u \
      > /etc/ld.so.conf.d/mnemo-nvidia.conf \
 && ldconfig
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    MNEMO_DEVICE=auto
USER 10001:10001

# ---------------------------------------------------------------------------------------------- cpu
# The default target (last stage): ONNX Runtime on CPU, no torch.
FROM runtime AS cpu
COPY --from=venv-cpu /opt/venv /opt/venv
ENV MNEMO_BACKEND=onnxruntime \
    MNEMO_DEVICE=cpu
USER 10001:10001
