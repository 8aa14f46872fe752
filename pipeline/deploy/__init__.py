"""Stage 3, a trained network -> answers: predict, export (ONNX), import-weights, info."""
