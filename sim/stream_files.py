"""The files through which the simulator wrapper (``tinyaccel_tb.sv``) exchanges host streams.

The session writes the program into a binary file that the wrapper loads with one ``$fread``
into its input memory, and reads what the accelerator sent from the ``$writememh`` dump of the
output memory. Both hold whole host beats; the byte order inside a beat is the wrapper's
(most significant byte first), the byte order of the stream is the host's (first byte first).
"""

from __future__ import annotations

import numpy as np

from ..errors import ProtocolError

__all__ = ["encode_input_file", "decode_output_dump"]

#: Value of each ASCII hex digit (255 for any other byte).
_HEX_VALUE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_VALUE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_VALUE[_c] = 10 + _i


def encode_input_file(stream: bytes, beat_bytes: int) -> bytes:
    """The wrapper's binary input file: each host beat most significant byte first ($fread)."""
    return np.frombuffer(stream, dtype=np.uint8).reshape(-1, beat_bytes)[:, ::-1].tobytes()


def decode_output_dump(text: bytes, beat_bytes: int, beats: int) -> bytes:
    """The byte stream in a ``$writememh`` file of ``beats`` words.

    Raises
    ------
    ProtocolError
        The dump holds another number of words, or a word with X or Z bits.
    """
    width = 2 * beat_bytes
    raw = np.frombuffer(text, dtype=np.uint8)
    if len(raw) == beats * (width + 1) and (raw[width::width + 1] == ord("\n")).all():
        digits = _HEX_VALUE[raw.reshape(beats, width + 1)[:, :width]]
    else:  # comments, @addresses or short words: the slow path
        words = [w for w in text.decode().split()
                 if not w.startswith("//") and not w.startswith("@")]
        if len(words) != beats:
            raise ProtocolError(f"output dump holds {len(words)} beats, expected {beats}")
        digits = _HEX_VALUE[np.frombuffer("".join(w.rjust(width, "0") for w in words).encode(),
                                          dtype=np.uint8).reshape(beats, width)]
    if (digits == 255).any():
        raise ProtocolError("output dump holds a word that is not hexadecimal (X or Z bits?)")
    values = (digits[:, 0::2] << 4) | digits[:, 1::2]  # most significant byte first
    return values[:, ::-1].tobytes()
