"""Ops. One module per op: host launchers, the ``torch.library`` custom op (CPU kernel = C++,
CUDA kernel = Triton, fake kernel for tracing), autograd, and the pure-torch reference.

Importing this package registers the custom ops; it does not import triton.
"""

from .flat_ops import antibody_combine_, clip_, grad_dots, perturb_, restore_, sq_norm
from .sequence_logprob import SeqLogprob, linear_sequence_logprob, paired_sequence_logprob, sequence_logprob

__all__ = [
    "SeqLogprob",
    "sequence_logprob",
    "linear_sequence_logprob",
    "paired_sequence_logprob",
    "sq_norm",
    "perturb_",
    "restore_",
    "grad_dots",
    "antibody_combine_",
    "clip_",
]
