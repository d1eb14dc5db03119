"""Shipping a model: ONNX with parity checks, int8, a model card and the MLflow registry."""
