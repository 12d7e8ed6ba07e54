"""Example InferenceFunction manifests (data only); the models are built by gpufaas.core.examples."""
