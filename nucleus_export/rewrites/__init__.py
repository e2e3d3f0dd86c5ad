"""Pure rewrites of exported graphs (onnx.ModelProto in, new ModelProto out): MoE lowering, attention masks, segments,
forced routing, bf16 emulation, and `as_built.engine_graph`, the one function that says what graph a backend gets."""
