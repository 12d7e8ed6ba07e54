"""gpufaas.scheduler."""
