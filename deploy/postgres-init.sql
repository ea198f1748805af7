-- The databases of the team stack (deploy/compose.yaml); `tollgate stack up` creates the same ones.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
\connect prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;  -- Prefect's search indexes
