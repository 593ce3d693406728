"""A cooperative stop request, shared by training and CAM export."""

from __future__ import annotations


class StopFlag:
    """Set from a signal handler; long loops poll it at safe points and checkpoint.

    The handler only flips a bool: heavy I/O inside a signal handler can deadlock or
    tear files (Lightning #21406), so the save happens in the loop itself, at a step
    boundary where model, optimizer and data position are consistent.
    """

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""

    def request(self, reason: str = "stop requested") -> None:
        self.requested = True
        self.reason = reason
