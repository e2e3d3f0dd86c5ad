"""ONNX graphs built directly from the checkpoint's tensors, block by block (see README "Why build the graph")."""
