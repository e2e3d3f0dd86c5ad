"""Integrations of bundles into other frameworks' code (diffusers' pipelines)."""
