"""Tests of the benchmark helpers that need no accelerator."""
