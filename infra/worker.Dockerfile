# Prefect process worker for infra/docker-compose.yml: Prefect 3.7 plus this repository installed, so flow runs
# of the deployments in infra/prefect.yaml can import `flows.post_train` and `pipeline`.
#   docker compose -f infra/docker-compose.yml build worker        (build context: the repository root)
# The torch wheel pip picks on Linux x86-64 is the CUDA build; add `.[vllm]` below for GPU sampling with vLLM.
FROM prefecthq/prefect:3.7-python3.11
WORKDIR /opt/gft
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY flows ./flows
COPY configs ./configs
ARG GFT_EXTRAS=""
RUN pip install --no-cache-dir -e ".${GFT_EXTRAS}"
ENV PREFECT_SERVER_ANALYTICS_ENABLED=false \
    TOKENIZERS_PARALLELISM=false \
    HF_HOME=/opt/gft/runs/.hf-cache
