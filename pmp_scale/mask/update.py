"""Stage II: only masked elements are ever updated; the complement stays bit-exactly at θ(0).

Two hooks (see docs/design.md, "The masked update"):
  H1 — at the accumulation boundary, before `engine.step()`, zero the complement in the
       partitioned gradients, so the global norm and clipping see the masked gradient.
  H2 — around every inner optimizer step (once per ZeRO-3 sub-group) snapshot the fp32 master
       partition and afterwards put the complement back. This is what makes the guarantee
       independent of the optimizer: decoupled weight decay and stale Adam moments would
       otherwise move frozen elements even with zero gradients. The bf16/fp16 partitions and
       gathered parameters are derived from the fp32 master after the step, so they follow.
`complement: decay` keeps H1 only (the reference implementation's behaviour); `project` too,
plus the controller's periodic projection (`project.py`).

H2 cannot switch itself off quietly: every optimizer step counts the sub-groups it restored and
`after_step` raises `MaskedUpdateError` unless that is every sub-group, exactly once (a
DeepSpeed step path that bypasses the inner optimizer, or a sub-group the hooks do not
recognise, would otherwise train the complement as `decay` does, without a word).
"""
from __future__ import annotations

import torch

from .. import ds_internals
from ..chunking import spans
from .sharded import ShardedMask


# The hooks work a chunk at a time (chunking.CHUNK elements: unpacked mask + fp32 temporary,
# 20 MiB), whatever `sub_group_size` is. Not chunked: H2's snapshot, one sub-group of fp32
# master (4 B x sub_group_size; 400 MB at the derived 1e8), alive only during that sub-group's
# inner step.


class MaskedUpdateError(RuntimeError):
    """The masked update did not cover every sub-group: the complement may have moved."""


class MaskedUpdate:
    def __init__(self, engine, mask: ShardedMask, complement: str = "frozen"):
        if complement not in ("frozen", "decay", "project"):
            raise ValueError(f"pmp.complement must be 'frozen', 'decay' or 'project', "
                             f"got {complement!r}")
        self.engine = engine
        self.mask = mask
        self.complement = complement
        self.offload = ds_internals.offloads_optimizer(engine)
        self.fp32_flat = ds_internals.fp32_master(engine)
        self._group_of = {t.data_ptr(): i for i, t in enumerate(self.fp32_flat)}
        self._snapshot: tuple[int, torch.Tensor] | None = None
        self._restored: list[int] = []  # sub-groups restored during the current step
        self._unmatched = 0             # inner steps on parameters that are no sub-group
        self._handles = []
        if complement == "frozen":
            # Partial offload (`ratio` < 1) steps the sub-groups kept on the device with a
            # second optimizer: hook both.
            for inner in ds_internals.inner_optimizers(engine):
                self._handles += [inner.register_step_pre_hook(self._pre),
                                  inner.register_step_post_hook(self._post)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _keep(self, group: int, start: int, stop: int, device) -> torch.Tensor:
        """Unpacked mask of one chunk, only for the op at hand: the resident form stays packed
        (1 bit per element)."""
        return self.mask.sub_group_slice(group, start, stop).to(device, non_blocking=True)

    # H1 ------------------------------------------------------------------------------------
    @torch.no_grad()
    def before_step(self, engine, step: int) -> None:
        self._restored, self._unmatched = [], 0
        buf = ds_internals.grad_buffer(engine)
        offset = 0
        for g, n in enumerate(self.mask.layout.sub_group_sizes):
            # With optimizer offload the boundary backward has already copied the gradients
            # to the host fp32 partition: mask that copy too.
            host = self.fp32_flat[g].grad if self.offload else None
            for a, b in spans(n):
                drop = ~self._keep(g, a, b, buf.device)
                buf[offset + a:offset + b].masked_fill_(drop, 0)
                if host is not None:
                    host[a:b].masked_fill_(drop.to(host.device), 0)
            offset += n
            if host is not None:  # its cached per-parameter norms must see the masked copy
                ds_internals.renorm_offloaded_grads(engine, g, host)

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
        if g is None:
            self._unmatched += 1
        else:
            self._snapshot = (g, self.fp32_flat[g].detach().clone())

    @torch.no_grad()
    def _post(self, optimizer, args, kwargs) -> None:
        if self._snapshot is None:
            return
        g, before = self._snapshot
        self._snapshot = None
        flat = self.fp32_flat[g]
        for a, b in spans(flat.numel()):
            part = flat[a:b]
            part.copy_(torch.where(self._keep(g, a, b, flat.device), part, before[a:b]))
        self._restored.append(g)

    def after_step(self, engine, step: int) -> None:
        """H2's guard: every sub-group snapshotted and restored exactly once in this step."""
        if self.complement != "frozen":
            return
        if ds_internals.step_skipped(engine) and not self._restored:
            return  # fp16 loss-scale overflow: DeepSpeed skipped the whole step
        n = len(self.fp32_flat)
        if sorted(self._restored) != list(range(n)) or self._unmatched:
            missing = sorted(set(range(n)) - set(self._restored))
            raise MaskedUpdateError(
                f"masked update at step {step + 1}: the complement was restored for "
                f"{len(self._restored)} of {n} ZeRO-3 sub-groups (not restored: {missing}; "
                f"inner optimizer steps on unrecognised parameters: {self._unmatched}); the "
                "complement may have moved, so training stops here (the last checkpoint is "
                "intact). This DeepSpeed optimizer path is not covered by the PMP hooks.")


@torch.no_grad()
def complement_drift(engine, mask: ShardedMask, theta0: list[torch.Tensor]) -> torch.Tensor:
    """max |θ − θ(0)| over the complement of this rank's fp32 partitions (0 when frozen), as a
    0-dim tensor on the master's device: chunked, and no host sync until the caller reads it.
    Padding is never selected, and is 0 in both, so it does not count."""
    fp32 = ds_internals.fp32_master(engine)
    drift = torch.zeros((), dtype=torch.float32, device=fp32[0].device)
    for g, flat in enumerate(fp32):
        for a, b in spans(flat.numel()):
            part = flat[a:b]
            ref = theta0[g][a:b].to(part.device, non_blocking=True)
            diff = (part - ref).abs().masked_fill_(mask.sub_group_slice(g, a, b).to(part.device), 0)
            drift = torch.maximum(drift, diff.max())
    return drift
