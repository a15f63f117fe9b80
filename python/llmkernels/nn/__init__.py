"""Drop-in layers that route through llmkernels' kernels."""
