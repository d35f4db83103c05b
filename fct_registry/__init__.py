"""fct-registry: forward compatible training and embedding-model upgrades without backfill."""
