"""The dispatcher's control interface to an execution unit."""

from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["UnitControl"]


class UnitControl(wiring.Signature):
    """Dispatcher -> unit: ``start`` for one cycle with ``cmd``.

    ``busy[s]`` is high while the instruction in slot ``s`` is in flight: from the cycle after
    ``start`` until its last memory access has completed (a command with no work never raises
    it). A unit with several slots also says whether it can take a command (``ready``) and into
    which slot it will go (``slot``); a one-slot unit can take one whenever it is not busy.
    """

    def __init__(self, cmd_shape, slots: int = 1):
        members = {"start": Out(1), "cmd": Out(cmd_shape), "busy": In(slots)}
        if slots > 1:
            members.update({"ready": In(1), "slot": In(range(slots))})
        super().__init__(members)
