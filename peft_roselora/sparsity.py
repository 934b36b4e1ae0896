"""The RoseLoRA math as small pure functions: schedule, importance, top-k masks and sparsity accounting.

Nothing in this module knows about PEFT layers or models; every function takes tensors or numbers and returns
tensors or numbers, so each piece is unit-tested alone (``tests/test_sparsity.py``). Notation follows
``docs/method.md``: ``tau`` is the keep ratio (density), ``t_i`` the last dense step, ``t_f`` the step at which the
final keep ratio is reached, ``T`` the total number of optimizer steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Union

import torch


# Tolerance used when turning a real number of entries or steps into an integer: 0.1 * 30 is 3.0000000000000004 in
# floating point and must count as 3, not 4.
_ROUNDING_TOLERANCE = 1e-9

StepSpec = Union[int, float]


def ceil_count(value: float) -> int:
    """Round ``value`` up to an integer, ignoring floating-point noise below 1e-9.

    Args:
        value (float): a non-negative real number of entries or steps.

    Returns:
        int: ``ceil(value)``, except that ``value`` within 1e-9 above an integer rounds to that integer.
    """
    return math.ceil(value - _ROUNDING_TOLERANCE)


def floor_count(value: float) -> int:
    """Round ``value`` down to an integer, ignoring floating-point noise below 1e-9 (``0.7 * 10`` is 7)."""
    return math.floor(value + _ROUNDING_TOLERANCE)


def resolve_step(value: StepSpec, total_step: int, *, round_up: bool) -> int:
    """Turn a schedule step given as a count or as a fraction of the total into a step count.

    Args:
        value (int | float): an ``int`` is a step count and returned unchanged; a ``float`` in ``[0, 1]`` is a
            fraction of ``total_step``.
        total_step (int): the total number of optimizer steps ``T``.
        round_up (bool): round a fractional step up (used for ``t_f``) or down (used for ``t_i``), so that two
            different fractions never resolve to the same step.

    Returns:
        int: the step count.
    """
    if isinstance(value, bool) or not isinstance(value, float):
        return int(value)
    scaled = value * total_step
    return ceil_count(scaled) if round_up else floor_count(scaled)


def keep_ratio_at(step: int, final_keep_ratio: float, prune_start_step: int, prune_end_step: int) -> float:
    """Cubic keep-ratio schedule of the method (``docs/method.md``, "Schedule").

    ``tau(t) = 1`` for ``t <= t_i``; ``tau + (1 - tau) * (1 - (t - t_i) / (t_f - t_i)) ** 3`` for ``t_i < t < t_f``;
    ``tau`` for ``t >= t_f``.

    Args:
        step (int): ``t``, the number of optimizer steps taken (1 after the first step).
        final_keep_ratio (float): ``tau`` in ``(0, 1]``.
        prune_start_step (int): ``t_i``, the last dense step.
        prune_end_step (int): ``t_f > t_i``, the first step at the final keep ratio.

    Returns:
        float: the keep ratio in ``[tau, 1]``.
    """
    if step <= prune_start_step:
        return 1.0
    if step >= prune_end_step:
        return final_keep_ratio
    remaining = 1.0 - (step - prune_start_step) / (prune_end_step - prune_start_step)
    return final_keep_ratio + (1.0 - final_keep_ratio) * remaining**3


def kept_count(keep_ratio: float, size: int) -> int:
    """Number of entries a row (or column) of ``size`` entries keeps at ``keep_ratio``: ``ceil(tau * size)``, >= 1."""
    return min(size, max(1, ceil_count(keep_ratio * size)))


@torch.no_grad()
def update_importance_emas(
    importances: list[torch.Tensor | None],
    weights: list[torch.Tensor],
    grads: list[torch.Tensor],
    beta: float,
    agree: Optional[Callable[[bool], bool]] = None,
    dtype: torch.dtype = torch.float32,
    repair: Optional[Callable[[], bool]] = None,
) -> list[torch.Tensor] | None:
    """Smoothed sensitivity ``I_bar <- beta * I_bar + (1 - beta) * |w * g|`` for many factors at once
    (``docs/method.md``, "Importance"), unless some ``|w * g|`` is not finite.

    Uses ``torch._foreach_*`` kernels per device, so the cost is a handful of calls whatever the number of factors,
    plus one finiteness check (one device synchronisation, the only one of a training step).

    Args:
        importances (list[Tensor | None]): fp32 EMAs, updated in place; ``None`` for a factor's first update, which
            returns ``|w * g|`` itself (the first update sets ``I_bar = I``).
        weights (list[Tensor]): the factors, any floating dtype, shapes ``(r, in)`` or ``(out, r)``.
        grads (list[Tensor]): their gradients, same shapes.
        beta (float): the EMA coefficient in ``[0, 1)``.
        agree (callable | None): combines this process's finiteness flag with the other processes' when each holds
            only some rows (FSDP2), so that all take the same decision; None for one process.
        dtype (torch.dtype): storage dtype of the EMAs, ``float32`` or ``bfloat16``. With ``bfloat16`` the update
            is computed in fp32 from the stored values and rounded once.
        repair (callable | None): called once when some ``|w * g|`` is not finite; when it returns True it changed
            the gradients (persistent mode zeroing the NaN / inf gradients of pruned entries, which a multiply by the
            mask leaves NaN) and the sensitivities are computed and checked again. The check of the masked gradients
            thus costs no synchronisation of its own.

    Returns:
        list[Tensor] | None: the updated EMAs in ``dtype`` (the given tensors where they existed), in input order;
        ``None`` when a gradient or weight holds NaN or inf, in which case no EMA was touched.
    """
    groups = list(_group_by_device(weights).values())

    def sensitivities_and_finite() -> tuple[list[list[torch.Tensor]], bool]:
        sensitivities = []
        for indices in groups:
            sensitivity = torch._foreach_mul(
                [weights[i].float() for i in indices], [grads[i].float() for i in indices]
            )
            torch._foreach_abs_(sensitivity)
            sensitivities.append(sensitivity)
        finite = all_finite([tensor for group in sensitivities for tensor in group])
        return sensitivities, agree(finite) if agree is not None else finite

    sensitivities, finite = sensitivities_and_finite()
    if not finite and repair is not None and repair():
        sensitivities, finite = sensitivities_and_finite()
    if not finite:
        return None
    result: list[torch.Tensor | None] = list(importances)
    for indices, sensitivity in zip(groups, sensitivities):
        existing = [j for j, i in enumerate(indices) if importances[i] is not None]
        if existing:
            previous = [importances[indices[j]] for j in existing]
            if dtype == torch.float32:
                torch._foreach_mul_(previous, beta)
                torch._foreach_add_(previous, [sensitivity[j] for j in existing], alpha=1.0 - beta)
            else:  # fp32 arithmetic, one rounding into the stored dtype
                updated = [sensitivity[j] for j in existing]
                torch._foreach_mul_(updated, 1.0 - beta)
                torch._foreach_add_(updated, [value.float() for value in previous], alpha=beta)
                torch._foreach_copy_(previous, updated)
        for j, i in enumerate(indices):
            if importances[i] is None:
                result[i] = sensitivity[j].to(dtype)
    return result


@torch.no_grad()
def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every entry of every tensor is finite.

    One ``foreach`` 2-norm per device and one synchronisation: a NaN or inf entry makes its tensor's 2-norm NaN or
    inf, so finite norms prove every entry finite. Only when some norm is not finite (a fault, or finite entries
    above ~1e19 whose squares overflow) is the exact max-norm taken (about ten times slower on CPU, hence not the
    first check).
    """
    tensors = [tensor for tensor in tensors if tensor.numel()]  # a process may hold no rows of a factor (FSDP2)
    if not tensors:
        return True
    if _norms_finite(tensors, 2.0):
        return True
    return _norms_finite(tensors, float("inf"))


def _norms_finite(tensors: list[torch.Tensor], order: float) -> bool:
    norms = [norm.to(tensors[0].device) for norm in torch._foreach_norm(tensors, order)]
    return bool(torch.stack(norms).isfinite().all())


@torch.no_grad()
def row_topk_masks(scores: list[torch.Tensor], keeps: list[int]) -> list[torch.Tensor]:
    """Boolean masks keeping the ``keep`` highest scores in every row, for many tensors at once.

    Tensors of the same shape, device and ``keep`` are stacked and share one ``topk`` call. For the columns of
    ``lora_B`` pass ``scores.T`` and transpose the mask back. Ties are broken by ``torch.topk``.

    Args:
        scores (list[Tensor]): 2-D importance scores ``(rows, n)``.
        keeps (list[int]): entries kept per row, ``1 <= keep``; ``keep >= n`` keeps everything.

    Returns:
        list[Tensor]: bool masks of the shapes of ``scores``, exactly ``min(keep, n)`` True entries per row.
    """
    return grouped_topk_masks(scores, keeps, [-1] * len(scores))


def grouped_topk_masks(
    importances: list[torch.Tensor],
    keeps: list[int],
    dims: list[int],
    masks: Optional[list[torch.Tensor]] = None,
    scores_of: Optional[Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]] = None,
) -> list[torch.Tensor]:
    """Boolean masks keeping, along dimension ``dims[i]`` of each tensor, its ``keeps[i]`` highest scores, with a
    constant number of ops per group of tensors: tensors of the same shape, device, ``keep`` and ``dim`` are stacked
    once (and their current ``masks`` once), scored once (``scores_of(stacked importances, stacked masks or
    None)``, default the importances themselves), and share one ``topk``, one ``scatter_`` and one ``unbind``. With
    ``dim=-1`` the rows keep ``keep`` entries each (the rows of ``lora_A``), with ``dim=-2`` the columns (the
    columns of ``lora_B``). Ties are broken by ``torch.topk``.

    Args:
        importances (list[Tensor]): 2-D scores (or importances ``scores_of`` turns into scores).
        keeps (list[int]): entries kept per row / column, ``>= 1``; ``keep >=`` the size keeps everything.
        dims (list[int]): ``-1`` or ``-2`` per tensor.
        masks (list[Tensor] | None): the current bool masks, stacked for ``scores_of`` (persistent mode).
        scores_of (callable | None): stacked importances and masks -> stacked scores.

    Returns:
        list[Tensor]: bool masks of the shapes of ``importances`` (views of one stacked tensor per group).
    """
    result: list[torch.Tensor | None] = [None] * len(importances)
    groups: dict[tuple, list[int]] = {}
    for i, (importance, keep, dim) in enumerate(zip(importances, keeps, dims)):
        groups.setdefault((tuple(importance.shape), importance.device, keep, dim), []).append(i)
    for (shape, device, keep, dim), indices in groups.items():
        if keep >= shape[dim]:
            every = torch.ones((len(indices), *shape), dtype=torch.bool, device=device).unbind(0)
            for i, mask in zip(indices, every):
                result[i] = mask
            continue
        stacked = torch.stack([importances[i] for i in indices])
        if scores_of is not None:
            stacked = scores_of(stacked, torch.stack([masks[i] for i in indices]) if masks is not None else None)
        top = stacked.topk(keep, dim=dim, sorted=False).indices
        chosen = torch.zeros(stacked.shape, dtype=torch.bool, device=device).scatter_(dim, top, True)
        for i, mask in zip(indices, chosen.unbind(0)):
            result[i] = mask
    return result


@torch.no_grad()
def apply_masks_(
    weights: list[torch.Tensor], masks: list[torch.Tensor], clamp_value: float | None = None, check: bool = True
) -> int:
    """Zero, in place, every entry of ``weights`` whose mask is False, then clamp to ``[-clamp_value, clamp_value]``.

    Pruned entries become exactly zero even when they held NaN or inf (one ``foreach`` multiply per device, and, only
    when some entry is not finite afterwards, a ``masked_fill_`` of the affected tensors). Used for factors and, in
    persistent mode, for their gradients.

    Args:
        weights (list[Tensor]): tensors modified in place.
        masks (list[Tensor]): bool masks of the same shapes.
        clamp_value (float | None): clamp bound, or None for no clamp.
        check (bool): run the finiteness check (one device synchronisation). ``False`` when the caller knows the
            tensors finite or checks them later (a NaN / inf entry then stays NaN where pruned: ``NaN * 0``).

    Returns:
        int: the number of tensors that still hold a non-finite value in a kept entry (0 when all is well, and
        always 0 with ``check=False``).
    """
    for indices in _group_by_device(weights).values():
        group = [weights[i] for i in indices]
        torch._foreach_mul_(group, [masks[i] for i in indices])
        if clamp_value is not None:
            torch._foreach_clamp_min_(group, -clamp_value)
            torch._foreach_clamp_max_(group, clamp_value)
    if not check or all_finite(weights):
        return 0
    nonfinite_kept = 0
    for weight, mask in zip(weights, masks):  # rare fault path: per tensor, never per row or entry
        weight.masked_fill_(~mask, 0.0)
        nonfinite_kept += int(not bool(weight.isfinite().all()))
    return nonfinite_kept


def _group_by_device(tensors: list[torch.Tensor]) -> dict[torch.device, list[int]]:
    groups: dict[torch.device, list[int]] = {}
    for i, tensor in enumerate(tensors):
        groups.setdefault(tensor.device, []).append(i)
    return groups


def factor_density(mask_or_weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Fraction of non-zero entries of every row (``dim=1``) or column (``dim=0``), as float64 (exact counts)."""
    return (mask_or_weight != 0).double().mean(dim=dim)


def proposition1_density_bound(weight_a: torch.Tensor, weight_b: torch.Tensor, blocks: int = 1) -> float:
    """Upper bound on the density of ``B @ A`` from Proposition 1: ``sum_i density(A_i*) * density(B_*i)``.

    Args:
        weight_a (Tensor): ``lora_A`` weight, shape ``(r, in)`` (term rows).
        weight_b (Tensor): ``lora_B`` weight, shape ``(out, r)`` (term columns, in the same term order).
        blocks (int): ``E`` when the terms form ``E`` consecutive blocks of ``r / E``, each block making its own
            part of the update (the experts of an expert parameter, the groups of a grouped convolution): the bound
            is then on the density of the whole update, ``1 / E`` of the sum.

    Returns:
        float: the bound, clipped to 1.
    """
    bound = (factor_density(weight_a, dim=1) * factor_density(weight_b, dim=0)).sum().item() / blocks
    return min(1.0, bound)


def blockwise_outer_sum(rows_a: torch.Tensor, rows_b: torch.Tensor, blocks: int = 1) -> torch.Tensor:
    """The update ``sum_i b_i a_i^T`` of rank-one terms split into ``blocks`` consecutive blocks, each its own update.

    Args:
        rows_a (Tensor): ``(terms, n_a)``, term ``i``'s row of ``lora_A``.
        rows_b (Tensor): ``(terms, n_b)``, term ``i``'s column of ``lora_B``.
        blocks (int): number of blocks ``E`` dividing ``terms`` (experts, convolution groups).

    Returns:
        Tensor: ``(E, n_b, n_a)``; block ``e`` is ``sum`` over its terms of ``b_i a_i^T``.
    """
    return torch.einsum(
        "etb,eta->eba", rows_b.reshape(blocks, -1, rows_b.shape[1]), rows_a.reshape(blocks, -1, rows_a.shape[1])
    )


def nominal_density_bound(rank: int, keep_ratio: float, in_features: int, out_features: int) -> float:
    """The ``r * tau^2`` bound, with ``tau`` rounded up to whole kept entries exactly as pruning rounds it.

    With ``k_A = ceil(tau * in)`` entries kept per row of A and ``k_B = ceil(tau * out)`` per column of B the merged
    delta has at most ``r * (k_A / in) * (k_B / out)`` density; this equals ``r * tau^2`` whenever ``tau * in`` and
    ``tau * out`` are whole numbers.
    """
    density_a = kept_count(keep_ratio, in_features) / in_features
    density_b = kept_count(keep_ratio, out_features) / out_features
    return min(1.0, rank * density_a * density_b)


@dataclass
class ModuleSparsity:
    """Sparsity of one adapted module (one row of a ``SparsityReport``).

    ``max_row_density_a`` / ``max_col_density_b`` are the keep ratios reached (densest row of A, column of B);
    ``delta_*`` describe the merged update ``scaling * B @ A``; ``nominal_bound`` is ``r * tau^2`` (tau rounded up to
    whole entries) and ``proposition1_bound`` the data-dependent bound ``sum_i density(A_i*) * density(B_*i)``.
    """

    name: str
    in_features: int
    out_features: int
    rank: int
    nonzeros_a: int
    nonzeros_b: int
    max_row_density_a: float
    max_col_density_b: float
    delta_nonzeros: int
    delta_numel: int
    nominal_bound: float
    proposition1_bound: float
    blocks: int = 1

    @property
    def factor_nonzeros(self) -> int:
        return self.nonzeros_a + self.nonzeros_b

    @property
    def factor_numel(self) -> int:
        return self.blocks * self.rank * (self.in_features + self.out_features)

    @property
    def delta_density(self) -> float:
        return self.delta_nonzeros / self.delta_numel


def module_sparsity(
    name: str,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    delta: torch.Tensor,
    keep_ratio: float,
    blocks: int = 1,
) -> ModuleSparsity:
    """Measure one module: ``weight_a`` ``(r, in)``, ``weight_b`` ``(out, r)`` (term rows and columns: for
    convolutions ``in`` is ``in_channels * prod(kernel)`` and ``out`` the ``out_channels / groups`` one term
    reaches), ``delta`` the merged update (any orientation; for ``E`` experts the ``E`` stacked updates),
    ``keep_ratio`` the ratio the nominal bound is computed for. With ``blocks=E`` (experts, convolution groups) the
    rank is ``r / E`` per block and the bounds are on the density of the whole update."""
    rank, in_features = weight_a.shape
    rank //= blocks
    out_features = weight_b.shape[0]
    return ModuleSparsity(
        name=name,
        in_features=in_features,
        out_features=out_features,
        rank=rank,
        nonzeros_a=int(torch.count_nonzero(weight_a)),
        nonzeros_b=int(torch.count_nonzero(weight_b)),
        max_row_density_a=float(factor_density(weight_a, dim=1).max()),
        max_col_density_b=float(factor_density(weight_b, dim=0).max()),
        delta_nonzeros=int(torch.count_nonzero(delta)),
        delta_numel=delta.numel(),
        nominal_bound=nominal_density_bound(rank, keep_ratio, in_features, out_features),
        proposition1_bound=proposition1_density_bound(weight_a, weight_b, blocks),
        blocks=blocks,
    )


@dataclass
class SparsityReport:
    """Sparsity of one adapter: per module (``modules``) and in total.

    ``scheduled_keep_ratio`` is ``tau(t)`` at the adapter's current step (None if ``total_step`` is unset; the
    bounds then use ``target_keep_ratio``). ``skipped_steps`` counts optimizer steps the GradScaler skipped (no
    importance, no prune, ``t`` unchanged); ``nonfinite_steps`` counts steps whose gradients held NaN/inf (the
    importance EMA kept its value).
    """

    adapter_name: str
    target_keep_ratio: float
    scheduled_keep_ratio: float | None
    step: int
    modules: list[ModuleSparsity] = field(default_factory=list)
    skipped_steps: int = 0
    nonfinite_steps: int = 0

    @property
    def factor_nonzeros(self) -> int:
        return sum(row.factor_nonzeros for row in self.modules)

    @property
    def factor_numel(self) -> int:
        return sum(row.factor_numel for row in self.modules)

    @property
    def delta_nonzeros(self) -> int:
        return sum(row.delta_nonzeros for row in self.modules)

    @property
    def delta_numel(self) -> int:
        return sum(row.delta_numel for row in self.modules)

    @property
    def delta_density(self) -> float:
        return self.delta_nonzeros / max(1, self.delta_numel)

    @property
    def keep_ratio_reached(self) -> float:
        """The densest row of any ``lora_A`` or column of any ``lora_B``."""
        return max((max(row.max_row_density_a, row.max_col_density_b) for row in self.modules), default=0.0)

    @property
    def nominal_bound(self) -> float:
        """Merged-delta density bound over all modules (numel-weighted ``r * tau^2``)."""
        return sum(row.nominal_bound * row.delta_numel for row in self.modules) / max(1, self.delta_numel)

    @property
    def within_bounds(self) -> bool:
        """Whether every module's merged delta respects both bounds."""
        return all(row.delta_density <= min(row.nominal_bound, row.proposition1_bound) + 1e-12 for row in self.modules)

    def to_dict(self) -> dict:
        """JSON-ready summary with the per-module rows."""
        return {
            "adapter_name": self.adapter_name,
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "nonfinite_steps": self.nonfinite_steps,
            "target_keep_ratio": self.target_keep_ratio,
            "scheduled_keep_ratio": self.scheduled_keep_ratio,
            "keep_ratio_reached": self.keep_ratio_reached,
            "factor_nonzeros": self.factor_nonzeros,
            "factor_numel": self.factor_numel,
            "delta_nonzeros": self.delta_nonzeros,
            "delta_numel": self.delta_numel,
            "delta_density": self.delta_density,
            "nominal_bound": self.nominal_bound,
            "within_bounds": self.within_bounds,
            "modules": [asdict(row) for row in self.modules],
        }

    def __str__(self) -> str:
        ratio = "unset" if self.scheduled_keep_ratio is None else f"{self.scheduled_keep_ratio:.4f}"
        lines = [
            f"RoseLoRA sparsity of adapter '{self.adapter_name}' at step {self.step} "
            f"(keep ratio scheduled {ratio}, target {self.target_keep_ratio})",
            f"{'module':<48} {'A nnz':>8} {'B nnz':>8} {'keep':>7} {'delta nnz':>10} {'density':>9} {'bound':>9}",
        ]
        for row in self.modules:
            keep = max(row.max_row_density_a, row.max_col_density_b)
            lines.append(
                f"{row.name[-48:]:<48} {row.nonzeros_a:>8} {row.nonzeros_b:>8} {keep:>7.4f} {row.delta_nonzeros:>10} "
                f"{row.delta_density:>9.5f} {row.nominal_bound:>9.5f}"
            )
        lines.append(
            f"total: factor non-zeros {self.factor_nonzeros}/{self.factor_numel} "
            f"({self.factor_nonzeros / max(1, self.factor_numel):.4f}), keep ratio reached "
            f"{self.keep_ratio_reached:.4f}, merged-delta non-zeros {self.delta_nonzeros}/{self.delta_numel} "
            f"(density {self.delta_density:.5f}, r*tau^2 bound {self.nominal_bound:.5f}, "
            f"within bounds: {self.within_bounds}); steps skipped by the GradScaler {self.skipped_steps}, "
            f"with non-finite gradients {self.nonfinite_steps}"
        )
        return "\n".join(lines)
