"""Cost and memory models: roofline time on published GPU peaks, the MoE combine's formulations, FLOPs and bytes of a
built graph, the host memory an engine build takes, and `inspect --bundle`'s report."""
