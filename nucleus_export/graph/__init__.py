"""ONNX graphs built directly from the checkpoint's tensors, block by block (docs/architecture.md, "Why the graph is built from the weights")."""
