"""Static checks over the source tree (no process groups, no models)."""
