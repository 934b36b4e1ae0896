"""RoseLoRA factors sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): which rows a process holds, and the
collectives the schedule adds.

FSDP2 shards every parameter along dim 0 into ``torch.chunk`` pieces (``ceil(rows / world)`` rows per process, the
last processes holding fewer or none): ``lora_A`` ``(r, in)`` by its rank rows, ``lora_B`` ``(out, r)`` by output
rows. Between steps the parameters and their gradients are ``DTensor`` with placement ``Shard(0)``.

What that means for each part of the method:

- importance ``|w * g|`` and its EMA are elementwise: every process updates the rows it holds, and keeps only those
  (the EMAs are sharded like their factors);
- masking is elementwise: every process zeroes its rows, using the matching rows of the mask buffers (the masks
  are ``bool`` buffers that FSDP2 leaves replicated; every process holds them whole, a quarter of one fp32 copy of
  the adapter);
- selection needs whole rows of ``lora_A`` (held locally) and whole *columns* of ``lora_B`` (spread over all
  processes). At each mask selection the schedule gathers the importance of every sharded factor with one
  ``all_gather_into_tensor`` per device mesh, ``r * (in + out)`` fp32 values per module, and every process runs the
  one-process selection on the gathered scores: the masks are those of one process, bit for bit, given the same
  importance;
- the finiteness check of each step's importance is agreed with one ``all_reduce`` of one int (a NaN reaches only
  the shards holding it, and every process must take the same decision).

Only 1-D meshes with ``Shard(0)`` placements (plain FSDP2) are supported; other layouts (HSDP, tensor parallel)
raise ``NotImplementedError`` naming the placement.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch


@functools.cache
def _dtensor_type() -> Optional[type]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def is_sharded(tensor: Optional[torch.Tensor]) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter or gradient sharded by FSDP2). Called for every factor on
    every step: the ``DTensor`` class is looked up once."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The rows this process holds (``DTensor.to_local()``, sharing storage), or ``tensor`` itself when unsharded."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def _check_layout(weight: torch.Tensor) -> None:
    from torch.distributed.tensor import Shard

    placements = tuple(weight.placements)
    if weight.device_mesh.ndim != 1 or placements != (Shard(0),):
        raise NotImplementedError(
            "RoseLoRA supports factors sharded by FSDP2 along dim 0 on a 1-D device mesh (placements "
            f"(Shard(dim=0),)), got placements {placements} on a {weight.device_mesh.ndim}-D mesh (HSDP and tensor "
            "parallelism are not supported)."
        )


def shard_rows(weight: torch.Tensor) -> slice:
    """The rows ``[start, stop)`` of dim 0 that this process holds of a sharded ``weight``.

    Raises:
        NotImplementedError: for a layout other than ``Shard(0)`` on a 1-D mesh.
        RuntimeError: if the local tensor does not have the ``torch.chunk`` row count FSDP2 gives it.
    """
    _check_layout(weight)
    rows = weight.shape[0]
    world = weight.device_mesh.size()
    chunk = math.ceil(rows / world)
    start = min(weight.device_mesh.get_local_rank() * chunk, rows)
    stop = min(start + chunk, rows)
    local_rows = weight.to_local().shape[0]
    if local_rows != stop - start:
        raise RuntimeError(
            f"RoseLoRA expected this process to hold rows {start}:{stop} of a sharded factor of shape "
            f"{tuple(weight.shape)} (torch.chunk over {world} processes), but it holds {local_rows} rows."
        )
    return slice(start, stop)


@dataclass
class CommunicationStats:
    """Collectives the RoseLoRA schedule issued in this process, and the bytes this process sent and received."""

    collectives: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0

    def add(self, sent: int, received: int) -> None:
        self.collectives += 1
        self.bytes_sent += sent
        self.bytes_received += received


@torch.no_grad()
def gather_full(
    local_values: list[torch.Tensor], weights: list[torch.Tensor], stats: Optional[CommunicationStats] = None
) -> list[torch.Tensor]:
    """The whole tensors of which ``local_values`` are the rows this process holds, for every sharded ``weights[i]``
    (unsharded ones are returned as given). One ``all_gather_into_tensor`` per device mesh: the local rows of every
    sharded factor, padded to the chunk size, travel in one flat fp32 buffer.

    Args:
        local_values (list[Tensor]): per factor, this process's rows (``(local rows, ...)``) of a value shaped like
            the factor, e.g. its importance EMA.
        weights (list[Tensor]): the factors (``DTensor`` when sharded), giving the global shapes and the mesh.
        stats (CommunicationStats | None): counters to add this call's collectives and bytes to.

    Returns:
        list[Tensor]: fp32 tensors of the factors' global shapes (the given tensor where unsharded).
    """
    result = list(local_values)
    meshes: dict = {}
    for index, weight in enumerate(weights):
        if is_sharded(weight):
            _check_layout(weight)
            meshes.setdefault(weight.device_mesh, []).append(index)
    for mesh, indices in meshes.items():
        world = mesh.size()
        pieces, chunks = [], []
        for index in indices:
            shape = tuple(weights[index].shape)
            chunk = math.ceil(shape[0] / world)
            local = local_values[index].float()
            padded = local.new_zeros((chunk, *shape[1:]))
            padded[: local.shape[0]] = local
            pieces.append(padded.reshape(-1))
            chunks.append(chunk)
        send = torch.cat(pieces)
        received = send.new_empty(world * send.numel())
        torch.distributed.all_gather_into_tensor(received, send, group=mesh.get_group())
        if stats is not None:
            stats.add(send.numel() * send.element_size(), (world - 1) * send.numel() * send.element_size())
        received = received.view(world, -1)
        offset = 0
        for index, chunk in zip(indices, chunks):
            shape = tuple(weights[index].shape)
            size = chunk * math.prod(shape[1:])
            block = received[:, offset : offset + size].reshape(world * chunk, *shape[1:])
            result[index] = block[: shape[0]]
            offset += size
    return result


def _all_reduce_int(value: int, op, weights: list[torch.Tensor], stats: Optional[CommunicationStats]) -> int:
    for mesh in {weight.device_mesh for weight in weights if is_sharded(weight)}:
        reduced = torch.tensor([value], dtype=torch.int64, device=mesh.device_type)
        torch.distributed.all_reduce(reduced, op=op, group=mesh.get_group())
        if stats is not None:
            stats.add(reduced.element_size(), reduced.element_size())
        value = int(reduced.item())
    return value


def agree_all_true(flag: bool, weights: list[torch.Tensor], stats: Optional[CommunicationStats] = None) -> bool:
    """``flag`` and-combined over every process sharing a mesh with the sharded ``weights`` (one ``all_reduce`` of one
    int per mesh); ``flag`` itself when nothing is sharded."""
    return bool(_all_reduce_int(int(flag), torch.distributed.ReduceOp.MIN, weights, stats))


def sum_over_processes(value: int, weights: list[torch.Tensor], stats: Optional[CommunicationStats] = None) -> int:
    """``value`` summed over the processes sharing a mesh with the sharded ``weights`` (one ``all_reduce`` per mesh);
    ``value`` itself when nothing is sharded."""
    return _all_reduce_int(value, torch.distributed.ReduceOp.SUM, weights, stats)


def share_from_first_process(value, weights: list[torch.Tensor], stats: Optional[CommunicationStats] = None):
    """When some processes hold ``value`` and others hold ``None`` (a full optimizer state dict loaded on the first
    process and broadcast by ``set_optimizer_state_dict``, which passes the extra keys of the parameter groups only
    to that process), send the first process's ``value`` to all. Collective over the mesh of the sharded
    ``weights``; ``value`` itself when nothing is sharded or every process holds one.

    Raises:
        RuntimeError: if some processes hold a value but the first one does not.
    """
    meshes = {weight.device_mesh for weight in weights if is_sharded(weight)}
    if not meshes:
        return value
    mesh = next(iter(meshes))
    holders = _all_reduce_int(int(value is not None), torch.distributed.ReduceOp.SUM, weights, stats)
    if holders in (0, mesh.size()):
        return value
    group = mesh.get_group()
    first = torch.distributed.get_global_rank(group, 0)
    if torch.distributed.get_rank() == first and value is None:
        raise RuntimeError(
            f"RoseLoRA schedule state was restored on {holders} of {mesh.size()} processes but not on the first one."
        )
    box = [value]
    torch.distributed.broadcast_object_list(box, src=first, group=group)
    if stats is not None:
        stats.collectives += 1
    return box[0]


def as_sharded_like(local_value: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``local_value`` (this process's rows) as a ``DTensor`` with the layout of the sharded ``weight``, so that
    ``torch.distributed.checkpoint`` saves it sharded and full-state-dict helpers gather it, exactly as they do the
    optimizer's own moments."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local_value, weight.device_mesh, weight.placements, shape=weight.shape, stride=weight.stride(), run_check=False
    )


def local_rows_of(value: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """This process's rows of a saved ``value`` shaped like the sharded ``weight``: a ``DTensor`` (resharded if its
    layout differs: collective), a whole tensor (sliced), or already the local rows (returned as is)."""
    rows = shard_rows(weight)
    local_shape = (rows.stop - rows.start, *weight.shape[1:])
    if is_sharded(value):
        if tuple(value.placements) == tuple(weight.placements) and tuple(value.to_local().shape) == local_shape:
            return value.to_local()
        value = value.full_tensor()
    if tuple(value.shape) == tuple(weight.shape):
        return value[rows]
    return value
