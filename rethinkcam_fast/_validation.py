"""Argument checks shared by every op: clear errors that name the offending argument."""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, value: object, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor, got shape {tuple(value.shape)}")
    return value


def check_cams_shape(name: str, value: object) -> torch.Tensor:
    """Score maps ``Tensor[N, H, W]`` with a spatial extent (an empty batch may have any)."""
    maps = check_tensor(name, value, ndim=3)
    if maps.shape[0] and maps.shape[1] * maps.shape[2] == 0:
        raise ValueError(f"{name} must have a non-empty spatial extent, got shape {tuple(maps.shape)}")
    return maps


def check_flag(name: str, value: object) -> bool:
    """``value`` as a bool; only ``bool`` and ``numpy.bool_`` are taken (``bool("no")`` is True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")
    return bool(value)


def check_float_dtype(name: str, value: torch.Tensor) -> None:
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {value.dtype}"
        )


INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                  torch.uint16, torch.uint32, torch.uint64)


def check_integer_dtype(name: str, value: torch.Tensor, what: str = "integers") -> None:
    """``TypeError`` unless ``value`` holds plain integers: floating values would be rounded (hiding a
    convention mismatch), bool, complex and quantized tensors are not numbers of that kind."""
    if value.dtype not in INTEGER_DTYPES:
        raise TypeError(f"{name} must hold {what} (any integer dtype), got {value.dtype}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"tensors must be on one device: {listed}")


def real_number(name: str, value: object) -> float:
    """``value`` as a float: a real number (Python's or numpy's) or a 0-d real tensor (read on the host:
    a hyperparameter, not data); ``TypeError`` naming ``name`` for anything else, booleans included."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool and not value.is_complex():
        return float(value.item())
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_unit_interval(name: str, value: object, *, include_one: bool = False) -> float:
    """``value`` (see :func:`real_number`) as a float in ``[0, 1)`` (or ``[0, 1]``); ``TypeError``/``ValueError``
    naming ``name``."""
    result = real_number(name, value)
    upper_ok = result <= 1.0 if include_one else result < 1.0
    if not (result >= 0.0 and upper_ok):  # also rejects NaN
        interval = "[0, 1]" if include_one else "[0, 1)"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return result


def first_bad_unit_map(maps: torch.Tensor) -> tuple[int, str] | None:
    """``(index, problem)`` of the first map of ``maps[N, ...]`` that is not finite and inside ``[0, 1]``.

    One pass (NaN propagates through min/max and inf lands at an extreme, so both fail the range test;
    the finer diagnosis runs only for the image reported) and one device sync.
    """
    if maps.shape[0] == 0 or maps[0].numel() == 0:
        return None
    flat = maps.flatten(1)
    lo, hi = flat.amin(dim=1), flat.amax(dim=1)  # (torch.aminmax along a dim is ~10x slower on CPU)
    bad = ~((lo >= 0) & (hi <= 1))
    if not bool(bad.any()):
        return None
    index = int(bad.nonzero()[0, 0])
    finite = bool(torch.isfinite(maps[index]).all())
    return index, "non-finite values" if not finite else "values outside [0, 1]"


def check_unit_maps(name: str, maps: torch.Tensor, offset: int = 0) -> None:
    """Maps ``[N, ...]`` must be finite and inside ``[0, 1]``; ``ValueError`` names the first bad image
    (as ``name[offset + i]``: ``maps`` may be a slice of the user's batch starting at ``offset``)."""
    found = first_bad_unit_map(maps)
    if found is not None:
        index, what = found
        raise ValueError(f"{name}[{offset + index}] has {what}; expected min-max normalised maps in [0, 1]")


def check_flagged_maps(name: str, maps: torch.Tensor, flags: torch.Tensor) -> None:
    """After a native pass that flagged maps (``uint8 [N]``, 1 = a NaN or a value outside ``[0, 1]``),
    raise :func:`check_unit_maps`' error for the first flagged map (its diagnosis runs on that map only)."""
    if flags.numel() and bool(flags.any()):
        index = int(flags.nonzero()[0, 0])
        check_unit_maps(name, maps[index:index + 1], offset=index)


def output_size_arg(output_size, default: tuple[int, int]) -> list[int]:
    """``output_size`` checked: ``None`` (``default``) or two positive ints."""
    if output_size is None:
        return list(default)
    if isinstance(output_size, (str, bytes)) or not hasattr(output_size, "__len__") or len(output_size) != 2:
        raise TypeError(f"output_size must be None or a pair (H, W) of ints, got {output_size!r}")
    if not all(isinstance(v, Integral) and not isinstance(v, (bool, np.bool_)) for v in output_size):
        raise TypeError(f"output_size must hold ints, got {output_size!r}")
    if min(output_size) <= 0:
        raise ValueError(f"output_size must be positive, got {tuple(output_size)}")
    return [int(v) for v in output_size]
