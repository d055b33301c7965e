"""Input checks shared by the data scores: arrays in, float64 / int64 numpy out, `InputError` on bad input."""

from __future__ import annotations

import numpy as np

from prunekit.errors import InputError, int_at_least  # noqa: F401 (re-exported)


def to_numpy(value, name: str) -> np.ndarray:
    """A numpy view of an array, a torch tensor (detached, on the CPU) or a nested list."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as err:
        raise InputError(f"{name} must be an array or tensor, got {type(value).__name__}: {err}") from None


def float_array(value, name: str, *, ndims: tuple[int, ...], allow_neg_inf: bool = False) -> np.ndarray:
    """A non-empty float64 array with one of `ndims` dimensions and no NaN nor Inf (-inf allowed with
    `allow_neg_inf`: a masked logit)."""
    arr = to_numpy(value, name)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.number)):
        raise InputError(f"{name} must hold numbers, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise InputError(f"{name} must be real, got dtype {arr.dtype}")
    if arr.ndim not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise InputError(f"{name} must be {want}, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise InputError(f"{name} is empty (shape {tuple(arr.shape)}); give at least one example")
    arr = arr.astype(np.float64, copy=False)
    if np.isnan(arr).any():
        raise InputError(f"{name} has {int(np.isnan(arr).sum())} NaN values; fix or drop those examples")
    bad = np.isposinf(arr) if allow_neg_inf else np.isinf(arr)
    if bad.any():
        what = "+inf" if allow_neg_inf else "infinite"
        raise InputError(f"{name} has {int(bad.sum())} {what} values; fix or drop those examples")
    return arr


def labels_array(value, name: str = "labels", *, n: int, k: int | None = None) -> np.ndarray:
    """Integer class labels ``[N]`` in ``[0, k)`` (``k=None``: only ``>= 0``), as int64."""
    arr = to_numpy(value, name)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise InputError(f"{name} must have shape [{n}] (one label per example), got {tuple(arr.shape)}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{name} must be integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if n and arr.min() < 0:
        raise InputError(f"{name} has negative values (min {arr.min()}); labels are class indices 0..K-1")
    if k is not None and n and arr.max() >= k:
        raise InputError(f"{name} has class {arr.max()} but the outputs have only K={k} classes (0..{k - 1})")
    return arr


def to_model(x, model):
    """`x` on the model's device, and float inputs in its float dtype: float32 data into a model built under a
    caller's ``torch.set_default_dtype(torch.float64)`` was PyTorch's bare "mat1 and mat2 must have the same
    dtype" mid-run."""
    param = next(model.parameters())
    dtype = param.dtype if x.is_floating_point() and param.is_floating_point() else None
    return x.to(device=param.device, dtype=dtype)
