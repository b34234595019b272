# One image for every couponflow service: Airflow components, the API, Dask workers.
FROM python:3.11-slim-bookworm
WORKDIR /opt/couponflow
RUN apt-get update && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
COPY requirements.lock pyproject.toml README.md ./
RUN pip install --no-cache-dir "uv==0.13.9" \
    && uv pip install --system --no-cache -r requirements.lock
COPY . .
RUN uv pip install --system --no-deps -e .
ENV COUPONFLOW_HOME=/data/couponflow \
    AIRFLOW_HOME=/data/airflow \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/couponflow/dags \
    AIRFLOW__CORE__PLUGINS_FOLDER=/opt/couponflow/plugins \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    PYTHONPATH=/opt/couponflow/plugins
