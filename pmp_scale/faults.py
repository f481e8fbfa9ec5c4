"""Fault injection for the crash tests, as an object the code is handed: no-op by default.

`Trainer(cfg, faults=...)` and `Checkpointer(..., faults=...)` call `faults.point(where)` at
the places a crash test may strike; the default `Faults` does nothing, and nothing in the
package builds anything else. A test hands in a `FaultPlan` instead, which kills or stops its
own rank at one point: `FaultPlan("rank1:save_files:4", rank=1)` SIGKILLs rank 1 at step 4's
checkpoint, after DeepSpeed's files, before the marker.

Points: `step:N` (after optimizer step N), `backward:N` (mid step N, before the optimizer),
`save_files:N`, `save_marker:N` (marker written, `latest` not yet moved). An optional action
suffix: `:TERM` sends itself a real SIGTERM instead, `:STOP` freezes it with SIGSTOP (a
test then kills its whole node at a known point), `:ENOSPC` raises "no space left on device".
"""
from __future__ import annotations

import errno
import os
import signal


class Faults:
    """No faults: every point is a no-op."""

    def point(self, where: str) -> None:
        pass


class FaultPlan(Faults):
    """One fault at one point of one rank: `<where>` or `<where>:TERM|STOP|ENOSPC`."""

    def __init__(self, spec: str, rank: int):
        self.spec = spec
        self.rank = rank

    def point(self, where: str) -> None:
        prefix = f"rank{self.rank}:{where}"
        if self.spec == prefix:
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.spec == f"{prefix}:TERM":
            os.kill(os.getpid(), signal.SIGTERM)
        elif self.spec == f"{prefix}:STOP":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif self.spec == f"{prefix}:ENOSPC":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), where)
