"""The Triton Python-backend model that serves whole requests through this runtime (`model.py`)."""
