"""Exception classes, one per kind of failure. Every message names the thing and the value."""


class TinyAccelError(Exception):
    """Base class of every error tinyaccel raises on purpose."""


class FieldError(TinyAccelError, ValueError):
    """An instruction field (or parameter field) holds a value its encoding cannot represent."""


class OpcodeError(FieldError):
    """An instruction word carries an opcode the ISA does not define."""


class AddressError(TinyAccelError, IndexError):
    """An access falls outside a scratchpad: names the buffer, the range and the depth."""


class ShapeError(TinyAccelError, ValueError):
    """A shape is impossible or does not fit the configured hardware."""


class DTypeError(TinyAccelError, TypeError):
    """An array has the wrong dtype for where it is going."""


class ConfigError(TinyAccelError, ValueError):
    """An accelerator configuration is inconsistent."""


class ProtocolError(TinyAccelError):
    """The host byte stream is malformed or out of sync."""


class IntegrityError(ProtocolError):
    """A response fails its integrity check (an SGQ CRC-32 or its zero padding): the bytes are
    corrupted, not merely misaligned. Names the instruction, the expected and received values."""


class DeviceError(TinyAccelError):
    """The accelerator reported an error status; ``status`` is a ``tinyaccel.hw.isa.Status``."""

    def __init__(self, message: str, status=None, pc: int | None = None):
        super().__init__(message)
        self.status = status
        self.pc = pc


class BackendUnavailable(TinyAccelError, RuntimeError):
    """A backend is missing what it needs (a tool, a serial port); the message says what to do."""


class SimulatorError(TinyAccelError, RuntimeError):
    """The RTL simulator failed to build, start, or answer, or exited mid-run; the message
    quotes the end of its log."""


class SimulatorHang(TinyAccelError):
    """The accelerator stopped moving: no beat on either stream for ``watchdog`` cycles.

    ``result`` holds what arrived before the hang (a ``tinyaccel.sim.rtl.RtlResult`` with
    ``timed_out``).
    """

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


class BuildError(TinyAccelError, RuntimeError):
    """A synthesis / place-and-route / packing step failed; the message quotes its log."""


class UnsupportedLayerError(TinyAccelError, NotImplementedError):
    """The model holds a layer (or a use of one) that the INT8 path cannot express."""


class TrainingDivergedError(TinyAccelError, FloatingPointError):
    """A NaN or infinity appeared in training: names the step, the layer and the tensor."""

    def __init__(self, message: str = "", *, step: int | None = None, layer: str = "?",
                 tensor: str = "?"):
        self.step, self.layer, self.tensor = step, layer, tensor
        self.detail = message
        super().__init__(self._text())

    def _text(self) -> str:
        where = f"step {self.step}: " if self.step is not None else ""
        return (f"training diverged at {where}non-finite values in tensor {self.tensor!r} of "
                f"layer {self.layer!r}" + (f" ({self.detail})" if self.detail else ""))

    def at_step(self, step: int) -> "TrainingDivergedError":
        """The same error with the training step filled in."""
        self.step = step
        self.args = (self._text(),)
        return self


class ResumeError(TinyAccelError):
    """A checkpoint cannot be resumed by this run (missing, or written by another recipe)."""


class CapacityError(TinyAccelError):
    """A model does not fit the accelerator's buffers (the message names the buffer and the bytes
    short): a placement failure, not a malformed shape or address."""


class SplitError(TinyAccelError, ValueError):
    """A model cannot be cut where asked: the split layer does not exist, or a value other than
    the split layer's output (a residual branch) crosses the cut."""


class BudgetError(TinyAccelError, ValueError):
    """A link budget the encoder cannot meet (names the budget and the best the encoder reaches)."""


class LinkTimeout(BackendUnavailable):
    """A board stopped answering: the bytes an instruction's response needs did not arrive within
    the port's timeout (names the instruction, the bytes expected and received, the port)."""


class BoardNotFound(BackendUnavailable):
    """No board is attached where one was asked for (programmer or serial port)."""


class GatewareMismatch(TinyAccelError):
    """The board runs gateware of another configuration or ISA than the driver's: its status
    record's ``config_id`` differs from the driver's (names both, and the config)."""


class TimingError(BuildError):
    """A bitstream was routed but does not meet timing at its clock (names Fmax and the clock);
    ``result`` holds the build report."""

    def __init__(self, message: str, result: dict | None = None):
        super().__init__(message)
        self.result = result
