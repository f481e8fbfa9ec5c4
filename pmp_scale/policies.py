"""When the pre-training loop writes a checkpoint and when it stops, out of the loop itself.

Stop policies: `Divergence` (below) and `Preemption` (preemption.py). Each stop writes a
checkpoint first, so the run resumes from exactly where it stopped.
"""
from __future__ import annotations

from .checkpoint import tag_for


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class SaveSchedule:
    """Checkpoint every `every` steps, at the last step, at `stop_at`, and before any stop."""

    def __init__(self, every: int, stop_at: int | None = None):
        self.every, self.stop_at = every, stop_at

    def due(self, step: int, *, last: bool, stopping: bool) -> bool:
        return step % self.every == 0 or last or step == self.stop_at or stopping


class Divergence:
    """Stop after `max_in_a_row` consecutive skipped (non-finite) steps; each skip is logged."""

    def __init__(self, max_in_a_row: int, telemetry):
        self.max_in_a_row, self.telemetry = max_in_a_row, telemetry

    def check(self, step: int, bad_streak: int) -> bool:
        if bad_streak:
            self.telemetry.info(f"step {step} skipped: non-finite loss or gradient "
                                f"({bad_streak} in a row)")
        return bad_streak >= self.max_in_a_row

    @staticmethod
    def stop(step: int, bad_streak: int):
        raise NonFiniteError(
            f"training stopped: non-finite loss or gradient in {bad_streak} consecutive steps up "
            f"to step {step}; the checkpoint {tag_for(step)} holds the last good weights "
            "(skipped steps change nothing); lower optim.lr or inspect the data, then --resume auto")
