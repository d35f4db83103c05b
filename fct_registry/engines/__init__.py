"""Upgrade engines: the chain shared by all, the local ONNX Runtime loop, Ray Data for clusters."""
