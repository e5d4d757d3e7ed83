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


class DeviceError(TinyAccelError):
    """The accelerator reported an error status; ``status`` is a ``tinyaccel.hw.isa.Status``."""

    def __init__(self, message: str, status=None, pc: int | None = None):
        super().__init__(message)
        self.status = status
        self.pc = pc


class BackendUnavailable(TinyAccelError, RuntimeError):
    """A backend is missing what it needs (a tool, a serial port); the message says what to do."""
