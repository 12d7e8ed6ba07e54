"""gpufaas.core."""
