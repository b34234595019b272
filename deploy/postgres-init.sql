-- Databases of the services that share the PostgreSQL server of docker-compose.yaml.
CREATE DATABASE airflow OWNER couponflow;
CREATE DATABASE mlflow OWNER couponflow;
CREATE DATABASE feast OWNER couponflow;
