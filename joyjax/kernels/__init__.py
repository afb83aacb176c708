"""MoE dispatch kernels behind one boundary: permute -> grouped matmul -> unpermute (combine).

``kernels`` knows nothing of the model. Backends: ``reference`` (pure JAX, exact, any platform),
``ragged_dot`` (``jax.lax.ragged_dot``), ``pallas`` (GPU / TPU Pallas kernels) and ``pallas_interpret``
(the same kernels run by the Pallas interpreter, for CPU tests). ``auto`` picks the fastest correct one for
the platform; the environment variable ``JOYJAX_MOE_IMPL`` overrides the config for A/B runs.
"""

from joyjax.kernels.ops import grouped_matmul, grouped_swiglu, permute, unpermute, resolve_impl

__all__ = ["grouped_matmul", "grouped_swiglu", "permute", "unpermute", "resolve_impl"]
