"""Triton backend of the op boundary: the torch ops ``rnn_fused::triton_recurrence_forward/backward``.

The kernels and their design (register path for small H, one launch per step above ``MAX_REGISTER_H``) are
in recurrence.py. Importing this package never fails: without triton, ``unavailable_reason()`` says so and
``recurrence_forward`` raises with the same sentence. On a machine without a GPU the kernels run on CPU
tensors under ``TRITON_INTERPRET=1``, which must be set before triton is first imported.
"""

from __future__ import annotations

MIN_TRITON = (3, 4)  # triton.knobs (the interpreter switch the kernels read) is new in 3.4


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


try:
    import triton  # noqa: F401
except ImportError as error:
    _REASON: str | None = f"triton is not installed ({error}); install it with `pip install 'triton>=3.4'`"
else:
    _found = getattr(triton, "__version__", "0")
    _REASON = (None if _version_tuple(_found) >= MIN_TRITON else
               f"triton {_found} is older than {'.'.join(map(str, MIN_TRITON))}, which the kernels need; "
               f"install it with `pip install 'triton>=3.4'`")

if _REASON is None:
    from .recurrence import recurrence_backward, recurrence_forward
else:
    def recurrence_forward(*args, **kwargs):
        raise RuntimeError(f"rnn_fused: the Triton backend is unavailable: {_REASON}")

    recurrence_backward = recurrence_forward


def unavailable_reason() -> str | None:
    """None when the Triton kernels can run (on CUDA tensors, or CPU ones under TRITON_INTERPRET=1).

    Their autograd rule takes the weight gradient from the compiled extension (rnn_fused/ops.py), so the
    extension is needed too."""
    if _REASON is not None:
        return _REASON
    from .. import _extension

    reason = _extension.load()
    return None if reason is None else f"its autograd rule needs the compiled extension: {reason}"


__all__ = ["recurrence_backward", "recurrence_forward", "unavailable_reason"]
