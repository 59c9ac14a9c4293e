"""Which GPU a Ray process of a role trains on, decided from what Ray gave it."""
from __future__ import annotations

NOSET_VISIBLE_DEVICES = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


class DeviceError(RuntimeError):
    """A rank got no device it can use (the message says why and which flag to look at)."""


def ray_device_index(*, gpu_ids: list, env: dict, device_count: int, cluster_has_gpus: bool, who: str) -> int | None:
    """The CUDA device index of a process Ray assigned ``gpu_ids`` (None: train on the CPU).

    Ray normally narrows CUDA_VISIBLE_DEVICES to the assigned GPU, which is then device 0. With
    RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES it does not: every GPU of the node stays visible
    and the assigned one is found by its id in CUDA_VISIBLE_DEVICES (or, unset, the id itself);
    taking device 0 there would put every rank of the node on one GPU.
    """
    if not gpu_ids or device_count == 0:
        if cluster_has_gpus:
            # Silently falling back would train on the CPU over gloo, orders of magnitude slower.
            raise DeviceError(f"{who} was given no GPU by Ray (assigned {list(gpu_ids)}, {device_count} visible) "
                              "although the cluster has GPUs: check --<role>_num_gpus_per_node and the "
                              "colocation flags, and that the node's GPUs are registered with Ray")
        return None
    assigned = str(gpu_ids[0])
    if env.get(NOSET_VISIBLE_DEVICES, "").lower() not in ("1", "true"):
        return 0
    visible = [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not visible:
        return int(assigned)
    if assigned not in visible:
        raise DeviceError(f"{who}: Ray assigned GPU {assigned}, which is not in CUDA_VISIBLE_DEVICES={','.join(visible)}")
    return visible.index(assigned)
