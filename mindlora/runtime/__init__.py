"""Device/backend choice, process groups and the CPU compatibility layer for megatron-core."""
from mindlora.runtime.device import Device, current
from mindlora.runtime.parallel import destroy_parallel, init_distributed, init_parallel

__all__ = ["Device", "current", "init_distributed", "init_parallel", "destroy_parallel"]
