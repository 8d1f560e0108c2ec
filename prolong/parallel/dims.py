"""Parallel degrees and process groups: one object decides, one function builds.

The world is laid out as a DP x SP grid with **SP innermost**: global rank ``r`` is sequence-parallel
rank ``r % SP`` of data-parallel replica ``r // SP``. So ranks ``k·SP .. k·SP+SP-1`` form one SP
group (consecutive ranks, i.e. one node's GPUs when SP divides the workers per node: Ulysses'
all-to-all runs every layer and must stay on NVLink), and ranks ``s, s+SP, s+2·SP, ...`` form one
DP group. This is the layout DeepSpeed's own ``parallel_state_sp`` builds, so its groups and ours
agree rank for rank.

:class:`ParallelDims` is pure (no process group needed): it validates the degrees and answers
"which ranks are in my groups". :meth:`ParallelDims.build` creates the torch.distributed subgroups
once, in the same order on every rank (``new_group`` is collective over the whole world), and
returns :class:`ParallelGroups` for the calling rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class ParallelDimsError(ValueError):
    """The parallel degrees do not fit the world. ``field`` names the degree at fault
    (``sequenceParallel`` or ``workersPerNode``), so spec validation can point at it."""

    def __init__(self, message: str, field: str = "sequenceParallel") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class ParallelDims:
    """World = DP x SP, SP groups of consecutive ranks within one node."""

    world_size: int
    """Number of training processes (one per GPU)."""
    sp: int = 1
    """Ulysses sequence-parallel degree: ranks sharing one packed row."""
    workers_per_node: int | None = None
    """Processes per machine. When given, an SP group must not span two machines."""

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ParallelDimsError(f"world size must be >= 1, got {self.world_size}", "world")
        if self.sp < 1:
            raise ParallelDimsError(f"sequence-parallel degree must be >= 1, got {self.sp}")
        wpn = self.workers_per_node
        if wpn is not None:  # the node rule first: it is the one a user can act on
            if wpn < 1 or self.world_size % wpn:
                raise ParallelDimsError(f"workers per node {wpn} does not divide the world size "
                                        f"{self.world_size}", "workersPerNode")
            if wpn % self.sp:
                raise ParallelDimsError(f"sequence-parallel groups stay within a node: SP {self.sp} "
                                        f"must divide the workers per node {wpn}")
        if self.world_size % self.sp:
            raise ParallelDimsError(f"sequence-parallel degree {self.sp} does not divide the world "
                                    f"size {self.world_size}")

    @classmethod
    def from_spec(cls, spec: Any) -> ParallelDims:
        """From a TrainSpec (``cluster.nodes x cluster.workersPerNode``,
        ``parallelism.sequenceParallel``). Spec validation calls this; its error becomes a spec
        issue at ``parallelism.*``, and everything after validation receives the result."""
        cluster = spec.cluster
        return cls(world_size=cluster.world_size, sp=spec.parallelism.sequence_parallel,
                   workers_per_node=cluster.workers_per_node)

    @property
    def dp(self) -> int:
        """Data-parallel degree: replicas that read different rows."""
        return self.world_size // self.sp

    def micro_batches_per_rank(self, rows_per_step: int) -> int:
        """Gradient-accumulation steps: the rows of one optimizer step each replica processes."""
        return max(1, rows_per_step // self.dp)

    @property
    def sp_enabled(self) -> bool:
        return self.sp > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ParallelDimsError(f"rank {rank} is outside a world of {self.world_size}")

    def sp_rank(self, rank: int) -> int:
        """Position of ``rank`` inside its SP group (which S/SP chunk of the row it holds)."""
        self._check_rank(rank)
        return rank % self.sp

    def dp_rank(self, rank: int) -> int:
        """Index of ``rank``'s data-parallel replica (which rows it reads)."""
        self._check_rank(rank)
        return rank // self.sp

    def sp_group_ranks(self, rank: int) -> list[int]:
        first = self.dp_rank(rank) * self.sp
        return list(range(first, first + self.sp))

    def dp_group_ranks(self, rank: int) -> list[int]:
        return list(range(self.sp_rank(rank), self.world_size, self.sp))

    def all_sp_groups(self) -> list[list[int]]:
        return [list(range(k * self.sp, (k + 1) * self.sp)) for k in range(self.dp)]

    def all_dp_groups(self) -> list[list[int]]:
        return [list(range(s, self.world_size, self.sp)) for s in range(self.sp)]

    def build(self, rank: int | None = None) -> ParallelGroups:
        """Create the SP, DP and world subgroups (collective: every rank must call it, in the same
        order relative to other ``new_group`` calls). ``torch.distributed`` must be initialised
        with this world size."""
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised")
        if dist.get_world_size() != self.world_size:
            raise ParallelDimsError(f"torch.distributed has {dist.get_world_size()} ranks, the "
                                    f"parallel dims expect {self.world_size}")
        rank = dist.get_rank() if rank is None else rank
        sp_group = dp_group = None
        for ranks in self.all_sp_groups():
            group = dist.new_group(ranks)
            if rank in ranks:
                sp_group = group
        for ranks in self.all_dp_groups():
            group = dist.new_group(ranks)
            if rank in ranks:
                dp_group = group
        # A separate group over the whole world (DeepSpeed's "sequence data parallel" group, over
        # which ZeRO partitions and reduces): DeepSpeed also builds its own rather than WORLD.
        world_group = dist.new_group(list(range(self.world_size)))
        return ParallelGroups(dims=self, rank=rank, sp_group=sp_group, dp_group=dp_group,
                              world_group=world_group)


@dataclass(frozen=True)
class ParallelGroups:
    """The calling rank's process groups (built by :meth:`ParallelDims.build`)."""

    dims: ParallelDims
    rank: int
    sp_group: Any
    """The ranks sharing this rank's rows (Ulysses all-to-all)."""
    dp_group: Any
    """One rank per replica with this rank's SP position."""
    world_group: Any
    """All DP x SP ranks: ZeRO partitions and reduces over it."""

    @property
    def sp_rank(self) -> int:
        return self.dims.sp_rank(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.dims.dp_rank(self.rank)

    @property
    def sp(self) -> int:
        return self.dims.sp

    @property
    def dp(self) -> int:
        return self.dims.dp
