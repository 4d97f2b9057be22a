"""CPU runtimes for the exported networks: graph export and cache, ONNX Runtime, OpenVINO."""
