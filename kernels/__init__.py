"""Triton kernels; each has an fp32 reference in ``ops/`` and a test against it in ``tests/kernels/``.

    kernels.latent_attention.latent_attention          ref: ops.latent_attention.latent_attention_varlen_ref
    kernels.sparse_attention.sparse_latent_attention   ref: ops.sparse_attention.sparse_latent_attention_ref

Nothing is imported here: ``triton.jit`` chooses between compiling and the CPU interpreter
(``TRITON_INTERPRET=1``) when a kernel module is imported, so importing the package must not do it.
"""
