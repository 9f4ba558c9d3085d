"""Triton backend of the op boundary (not written yet: see the Triton issue)."""


def unavailable_reason() -> str | None:
    return "the Triton kernels are not implemented yet"


def recurrence_forward(*args, **kwargs):
    raise NotImplementedError("the Triton backend is not implemented yet")
