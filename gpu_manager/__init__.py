"""gpufaas.gpu_manager: the node agent that keeps models in device and host memory.

See ``docs/gpu_manager.md``: devices (NVML or CPU stand-ins), the host and device tiers, the
layer-by-layer loader, memory accounting, concurrency and batching.
"""
