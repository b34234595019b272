"""Airflow Assets that chain the couponflow DAGs; a DAG runs when its inputs update.

ingest_events -> LAKE -> build_features -> FEATURES -> train_models -> MODELS ->
allocate_campaign -> ALLOCATIONS; ingest_events -> OUTCOMES -> analyze_experiment.
"""

from __future__ import annotations

from airflow.sdk import Asset

# Users, coupons and behaviour events accepted into the offline store.
LAKE = Asset(name="couponflow_lake", uri="couponflow://lake/behaviour")
# Campaign exposures and outcomes accepted into the offline store.
OUTCOMES = Asset(name="couponflow_outcomes", uri="couponflow://lake/outcomes")
# User features in the Feast offline source, materialized online.
FEATURES = Asset(name="couponflow_features", uri="couponflow://feast/user_features")
# A newly registered response model version (champion or not).
MODELS = Asset(name="couponflow_models", uri="couponflow://mlflow/response_model")
# A new current allocation version of a campaign.
ALLOCATIONS = Asset(name="couponflow_allocations", uri="couponflow://store/allocations")
