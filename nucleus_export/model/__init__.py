"""The model as the toolkit sees it: config, checkpoint on disk, the PyTorch reference, the embedded tiny model."""
