"""Kernel tests run the Triton kernels on CPU tensors through Triton's interpreter when no GPU exists.

``triton.jit`` reads ``TRITON_INTERPRET`` when a kernel module is imported, so it is set here, before
any test module of this directory imports ``kernels``. Nothing else in the test suite imports
``kernels`` (``ops.dispatch`` imports it lazily, on a Triton path only); a kernel imported too early
still fails loudly, never silently (see ``kernels._common.check_backend``).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
