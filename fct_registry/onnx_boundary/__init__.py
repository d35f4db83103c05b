"""The ONNX boundary: export with parity checks, ONNX Runtime sessions, model folders and cards, image decoding."""
