"""gpufaas.gpu_manager: the node agent that keeps models in device, host and disk tiers.

See ``docs/gpu_manager.md``: devices (NVML or CPU stand-ins), the residency chain (device, peer,
host, disk, artifact store), model backends per format (torch, ONNX), the layer-by-layer loader,
memory accounting, concurrency and batching.
"""
