# MLflow tracking server for infra/docker-compose.yml: the official image plus the two drivers it lacks,
# psycopg2 (Postgres backend store) and boto3 (S3 / MinIO artifact store).
#   docker compose -f infra/docker-compose.yml build mlflow
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir "psycopg2-binary>=2.9,<3" "boto3>=1.34,<2"
