"""Checks of the example files users copy (Kubernetes manifests)."""
