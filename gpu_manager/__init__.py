"""gpufaas.gpu_manager."""
