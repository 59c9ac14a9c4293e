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
    # Silently falling back would train on the CPU over gloo, orders of magnitude slower.
    if gpu_ids and device_count == 0:
        raise DeviceError(f"{who}: Ray assigned GPU {gpu_ids[0]} but torch sees no CUDA device "
                          f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '<unset>')}): is torch a CPU "
                          "build on this node, or the driver missing?")
    if not gpu_ids:
        if cluster_has_gpus:
            raise DeviceError(f"{who} was given no GPU by Ray although the cluster has GPUs: check "
                              "--<role>_num_gpus_per_node and the colocation flags, and that the node's GPUs "
                              "are registered with Ray")
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
