"""Airflow-side pieces of couponflow: the Assets that chain the DAGs, task defaults."""
