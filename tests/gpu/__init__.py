"""GPU tests: run on a CUDA host (tests/gpu/run_on_device.sh); skipped with a reason elsewhere."""
