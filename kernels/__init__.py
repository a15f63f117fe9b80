"""Triton kernels, shipped as llmkernels.kernels (GPU paths; tested under TRITON_INTERPRET=1).

None yet: the Triton attention kernel is issue 4's work.
"""
