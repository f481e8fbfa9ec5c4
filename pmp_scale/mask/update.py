"""Stage II: only masked elements are ever updated; the complement stays bit-exactly at θ(0).

Two hooks (see DESIGN.md, "The masked update"):
  H1 — at the accumulation boundary, before `engine.step()`, zero the complement in the
       partitioned gradients, so the global norm and clipping see the masked gradient.
  H2 — around every inner optimizer step (once per ZeRO-3 sub-group) snapshot the fp32 master
       partition and afterwards put the complement back. This is what makes the guarantee
       independent of the optimizer: decoupled weight decay and stale Adam moments would
       otherwise move frozen elements even with zero gradients. The bf16/fp16 partitions and
       gathered parameters are derived from the fp32 master after the step, so they follow.
`complement: decay` keeps H1 only (the reference implementation's behaviour).
"""
from __future__ import annotations

import torch

from .sharded import ShardedMask


def _inner_optimizer(engine):
    return engine.optimizer.optimizer


class MaskedUpdate:
    def __init__(self, engine, mask: ShardedMask, complement: str = "frozen"):
        if complement not in ("frozen", "decay"):
            raise ValueError(f"pmp.complement must be 'frozen' or 'decay', got {complement!r}")
        zero = engine.optimizer
        if getattr(zero, "offload_optimizer", False):
            raise NotImplementedError(
                "pmp: optimizer CPU offload is not supported by the masked update yet; "
                "remove deepspeed.zero_optimization.offload_optimizer")
        self.engine = engine
        self.mask = mask
        self.complement = complement
        self.fp32_flat = zero.fp32_partitioned_groups_flat
        self._group_of = {t.data_ptr(): i for i, t in enumerate(self.fp32_flat)}
        self._snapshot: tuple[int, torch.Tensor] | None = None
        self._step_masks: dict[int, torch.Tensor] = {}
        self._handles = []
        if complement == "frozen":
            inner = _inner_optimizer(engine)
            self._handles = [inner.register_step_pre_hook(self._pre),
                             inner.register_step_post_hook(self._post)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _bool(self, group: int) -> torch.Tensor:
        """Unpacked mask of a sub-group, kept only for the current optimizer step."""
        m = self._step_masks.get(group)
        if m is None:
            m = self._step_masks[group] = self.mask.sub_group(group).to(
                self.fp32_flat[group].device, non_blocking=True)
        return m

    # H1 ------------------------------------------------------------------------------------
    def before_step(self, engine, step: int) -> None:
        buf = engine.optimizer.grad_partitions_flat_buffer
        offset = 0
        for g, n in enumerate(self.mask.layout.sub_group_sizes):
            buf[offset:offset + n].masked_fill_(~self._bool(g), 0)
            offset += n

    # H2 ------------------------------------------------------------------------------------
    def _stepped_group(self, optimizer) -> int | None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                g = self._group_of.get(p.data_ptr())
                if g is not None:
                    return g
        return None

    def _pre(self, optimizer, args, kwargs) -> None:
        g = self._stepped_group(optimizer)
        if g is not None:
            self._snapshot = (g, self.fp32_flat[g].detach().clone())

    @torch.no_grad()
    def _post(self, optimizer, args, kwargs) -> None:
        if self._snapshot is None:
            return
        g, before = self._snapshot
        self._snapshot = None
        flat = self.fp32_flat[g]
        flat.copy_(torch.where(self._bool(g), flat, before))

    def after_step(self, engine, step: int) -> None:
        self._step_masks.clear()


@torch.no_grad()
def complement_drift(engine, mask: ShardedMask, theta0: list[torch.Tensor]) -> float:
    """max |θ − θ(0)| over the complement of this rank's fp32 partitions (0 when frozen)."""
    drift = 0.0
    for g, flat in enumerate(engine.optimizer.fp32_partitioned_groups_flat):
        frozen = (~mask.sub_group(g) & mask.layout.real_elements(g)).to(flat.device)
        if frozen.any():
            diff = (flat[frozen] - theta0[g].to(flat.device)[frozen]).abs().max().item()
            drift = max(drift, diff)
    return drift
