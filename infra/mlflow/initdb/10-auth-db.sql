-- Runs once, when the postgres volume is first initialised: MLflow's basic-auth app keeps its
-- users and permissions in a database of its own, beside the tracking database `mlflow`.
CREATE DATABASE mlflow_auth;
