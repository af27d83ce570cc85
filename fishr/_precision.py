"""The precision of the matrix products fishr traces: one default, one check, one scope.

On recent NVIDIA GPUs JAX's default float32 product rounds its factors to TF32 (a 10-bit
mantissa) and on TPUs to bfloat16; CPUs compute true float32 either way, and float64 is
never rounded. Measured on an H200 (jax 0.11.2), float32, error against the float64 result
of the same method:

* sample-space SR: 4e-7 to 7e-5 at ``"highest"``, 6e-4 to 2e-2 at JAX's default;
* block K-FAC: 7e-6 (MLP) and 4e-5 (CNN) at ``"highest"``, 4e-3 and 6e-2 at JAX's default;

the warm call costs 1.00-1.07x (K-FAC) and 1.16-1.23x (SR) of the TF32 one. So every
preconditioner traces its work under ``jax.default_matmul_precision("highest")`` unless
told otherwise; ``None`` leaves JAX's setting (what the seeds and the peers do).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import jax

DEFAULT_MATMUL_PRECISION = "highest"  # true float32 products on GPUs (their default is TF32) and TPUs


def check_matmul_precision(matmul_precision: Any, who: str) -> str | None:
    """``None`` or a name :func:`jax.default_matmul_precision` accepts; raises naming ``who`` otherwise."""
    if matmul_precision is None:
        return None
    try:
        if not isinstance(matmul_precision, str):
            raise ValueError
        with jax.default_matmul_precision(matmul_precision):
            pass
    except ValueError:
        raise ValueError(f"{who}: `matmul_precision` must be None (JAX's setting) or a name that "
                         "jax.default_matmul_precision accepts ('highest', 'high', 'default', 'float32', "
                         f"'tensorfloat32', 'bfloat16', ...); got {matmul_precision!r}.") from None
    return matmul_precision


def precision_scope(matmul_precision: str | None) -> contextlib.AbstractContextManager:
    """``jax.default_matmul_precision(matmul_precision)``, or nothing for ``None``.

    It acts while the products are traced: entered inside a jitted function, it sets the
    precision of the products traced there and of no others.
    """
    if matmul_precision is None:
        return contextlib.nullcontext()
    return jax.default_matmul_precision(matmul_precision)


def traced_at(matmul_precision: str | None, fn: Callable) -> Callable:
    """``fn`` with everything it traces under :func:`precision_scope` (``fn`` itself for ``None``)."""
    if matmul_precision is None:
        return fn

    @functools.wraps(fn)
    def scoped(*args, **kwargs):
        with precision_scope(matmul_precision):
            return fn(*args, **kwargs)

    return scoped
