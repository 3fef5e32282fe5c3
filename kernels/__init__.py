"""Triton ``@triton.jit`` kernels, installed as ``antibody_fast.kernels`` (never as a top-level ``kernels``).

Import these modules lazily, only when a Triton implementation actually runs: under
``TRITON_INTERPRET=1`` the variable must be set before the kernels are defined.
"""
