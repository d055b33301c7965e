"""Cost of a CNN: multiply-accumulates (the "FLOPs" of the pruning literature), parameters and time per batch.

`count_flops` runs one forward pass on a zero input with hooks on every ``nn.Conv2d`` and ``nn.Linear`` and
adds, per example:

    conv:   H_out * W_out * C_out * (C_in / groups) * k_h * k_w
    linear: (elements of the output / out_features) * in_features * out_features

BatchNorm, ReLU, pooling and additions are not counted (as in the TRP and ResNet papers' FLOP columns);
one multiply-accumulate counts as one FLOP.

>>> from torch import nn
>>> count_flops(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(32, 3)), (1, 4, 4))
384
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from prunekit.errors import InputError, module_modes, restore_modes

__all__ = ["count_flops", "count_params", "ms_per_batch"]


def _check_shape(input_shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise InputError(f"input_shape must be a tuple of positive ints (one example, e.g. (1, 28, 28)), got {input_shape!r}") from None
    if not shape or min(shape) < 1:
        raise InputError(f"input_shape must be a tuple of positive ints (one example, e.g. (1, 28, 28)), got {input_shape!r}")
    return shape


def _input_channels(model: nn.Module) -> tuple[int | None, bool]:
    """``(channels, sure)``: a `prunekit.cnn.ResNet`'s ``in_channels`` (sure), else the input channels of the first
    registered layer if that is a Conv2d (not sure: registration order need not be the order of the forward)."""
    config = getattr(model, "config", None)
    if isinstance(config, dict) and isinstance(config.get("in_channels"), int):
        return config["in_channels"], True
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    return (first.in_channels if isinstance(first, nn.Conv2d) else None), False


def _wrong_channels(model: nn.Module, given: int, ndim: int, *, before: bool) -> int | None:
    """The channels the model expects if an input with `given` channels (and `ndim` dims, batch included) does
    not fit: before the forward only when sure, after a failed forward from the first conv too."""
    channels, sure = _input_channels(model)
    if channels is not None and (sure or not before) and (ndim != 4 or given != channels):
        return channels
    return None


def _channels_error(channels: int, what: str) -> InputError:
    return InputError(f"the model takes {channels} input channel{'s' * (channels != 1)}: {what}")


def count_flops(model: nn.Module, input_shape=(1, 28, 28)) -> int:
    """Multiply-accumulates of Conv2d and Linear layers for one example of shape `input_shape` (no batch dim)."""
    shape = _check_shape(input_shape)
    channels = _wrong_channels(model, shape[0], len(shape) + 1, before=True)
    if channels is not None:
        raise _channels_error(channels, f"input_shape must be ({channels}, H, W) for one example, got {shape}")
    total = 0

    def conv_hook(mod: nn.Conv2d, inp, out):  # out: [1, C_out, H_out, W_out]
        nonlocal total
        kh, kw = mod.kernel_size
        total += out.numel() * (mod.in_channels // mod.groups) * kh * kw

    def linear_hook(mod: nn.Linear, inp, out):  # out: [1, ..., out_features]
        nonlocal total
        total += out.numel() * mod.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = module_modes(model)
    model.eval()
    try:
        p = next(model.parameters(), None)
        x = torch.zeros((1, *shape), dtype=p.dtype if p is not None else torch.float32,
                        device=p.device if p is not None else "cpu")
        with torch.no_grad():
            try:
                model(x)
            except RuntimeError:  # a conv's channel mismatch: say what input the model takes
                channels = _wrong_channels(model, shape[0], len(shape) + 1, before=False)
                if channels is None:
                    raise
                raise _channels_error(channels, f"input_shape must be ({channels}, H, W) for one example, "
                                                f"got {shape}") from None
    finally:
        for h in hooks:
            h.remove()
        restore_modes(was_training)
    return int(total)


def count_params(model: nn.Module) -> int:
    """Number of parameters (BatchNorm affine parameters included, running statistics not)."""
    return int(sum(p.numel() for p in model.parameters()))


def ms_per_batch(model: nn.Module, x: torch.Tensor, *, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time in milliseconds of one no-grad forward pass of batch `x` in eval mode, on the model's
    device (`x` is moved there first; on a GPU each pass is timed to the end of its kernels).

    Uses the thread count the caller set (benchmarks set one thread).
    """
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise InputError("x must be a batch tensor [B, ...]")
    channels = _wrong_channels(model, x.shape[1], x.ndim, before=True)
    if channels is not None:
        raise _channels_error(channels, f"x must be a batch [B, {channels}, H, W], got {list(x.shape)}")
    if repeats < 1 or warmup < 0:
        raise InputError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    from prunekit.data.methods._checks import to_model
    from prunekit.speed import sync_device

    if next(model.parameters(), None) is not None:  # a CPU batch for a GPU model was a device-mismatch error
        x = to_model(x, model)

    was_training = module_modes(model)
    model.eval()
    times = []
    try:
        with torch.no_grad():
            for i in range(warmup + repeats):
                sync_device(x.device)  # GPU kernels run asynchronously: a pass ends when its device is done
                t0 = time.perf_counter()
                try:
                    model(x)
                    sync_device(x.device)
                except RuntimeError:  # a conv's channel mismatch: say what input the model takes
                    channels = _wrong_channels(model, x.shape[1], x.ndim, before=False)
                    if channels is None:
                        raise
                    raise _channels_error(channels, f"x must be a batch [B, {channels}, H, W], "
                                                    f"got {list(x.shape)}") from None
                if i >= warmup:
                    times.append(1000.0 * (time.perf_counter() - t0))
    finally:
        restore_modes(was_training)
    return float(statistics.median(times))
