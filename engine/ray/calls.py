"""Waiting on Ray calls with one deadline, failures named after the actor that failed."""
from __future__ import annotations

import time

import ray


def root_cause(err: Exception, max_lines: int = 6) -> str:
    """The remote exception of a Ray error, without the remote traceback."""
    cause = getattr(err, "cause", None)  # RayTaskError carries the exception the method raised
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return "\n".join(lines[-max_lines:])


def get_each(refs: list, *, names: list[str], timeout_s: float, what: str, error: type[Exception] = RuntimeError,
             context: str = "") -> list:
    """``ray.get`` of one ref per named actor under a shared deadline. A timeout, a dead actor or a
    failed call raises ``error`` naming the actor (``names[i]``, e.g. "actor rank 1") and ``what``."""
    results, deadline = [], time.monotonic() + timeout_s
    for name, ref in zip(names, refs):
        try:
            results.append(ray.get(ref, timeout=max(deadline - time.monotonic(), 0.0)))
        except ray.exceptions.GetTimeoutError as err:
            raise error(f"{name} did not finish {what} within {timeout_s:.0f} s{context}") from err
        except ray.exceptions.RayActorError as err:
            raise error(f"{name} died during {what}{context}: {root_cause(err)}") from err
        except ray.exceptions.RayError as err:
            raise error(f"{name} failed during {what}{context}: {root_cause(err)}") from err
    return results


def split_evenly(num_items: int, num_parts: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` ranges covering ``num_items``, sizes differing by at most one."""
    base, extra = divmod(num_items, num_parts)
    ranges, start = [], 0
    for part in range(num_parts):
        stop = start + base + (part < extra)
        ranges.append((start, stop))
        start = stop
    return ranges


def wait_all(refs: list, *, timeout_s: float) -> list[tuple[str, object]]:
    """Wait for every ref under one deadline, raising nothing: per ref ``("ok", value)``, ``("dead",
    err)`` (its actor died), ``("failed", err)`` (the call raised) or ``("timeout", None)``."""
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    out: list[tuple[str, object]] = []
    for ref in refs:
        try:
            out.append(("ok", ray.get(ref, timeout=0)))
        except ray.exceptions.GetTimeoutError:
            out.append(("timeout", None))
        except ray.exceptions.RayActorError as err:
            out.append(("dead", err))
        except ray.exceptions.RayError as err:
            out.append(("failed", err))
    return out
