"""Foundations: domain errors, typed params (params.yaml), the identity of a model version."""
