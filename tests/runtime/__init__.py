"""Runtime tests: device/backend selection and the megatron-core CPU adaptations."""
