"""Parity of exported graphs against diffusers' PyTorch forward: errors, cosine, routing agreement."""
