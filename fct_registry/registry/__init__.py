"""The model registry: versions and their tags, the MLflow store, the compatibility graph and chain planner,
publishing model folders."""
