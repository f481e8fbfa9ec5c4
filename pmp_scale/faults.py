"""Fault injection for the crash tests: `PMP_FAULT=rank1:save_files:4` makes rank 1 SIGKILL
itself at that point (here: step 4's checkpoint, after DeepSpeed's files, before the marker).

Points: `step:N` (after optimizer step N), `backward:N` (mid step N, before the optimizer),
`save_files:N`, `save_marker:N` (marker written, `latest` not yet moved). An optional action
suffix: `:TERM` sends itself a real SIGTERM instead, `:STOP` freezes it with SIGSTOP (a
test then kills its whole node at a known point), `:ENOSPC` raises "no space left on device".
Unset: a no-op.
"""
from __future__ import annotations

import errno
import os
import signal


def fault_point(where: str) -> None:
    spec = os.environ.get("PMP_FAULT")
    if not spec:
        return
    prefix = f"rank{os.environ.get('RANK', '0')}:{where}"
    if spec == prefix:
        os.kill(os.getpid(), signal.SIGKILL)
    elif spec == f"{prefix}:TERM":
        os.kill(os.getpid(), signal.SIGTERM)
    elif spec == f"{prefix}:STOP":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif spec == f"{prefix}:ENOSPC":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), where)
