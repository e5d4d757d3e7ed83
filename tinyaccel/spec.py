"""Tables of the ISA, records and configurations, generated from the code that defines them.

``tinyaccel spec`` prints them; ``docs/architecture.md`` embeds the Markdown form between
``<!-- BEGIN GENERATED: name -->`` markers, and a test checks the document is current.
"""

from __future__ import annotations

import re
from pathlib import Path

from amaranth.lib import data, enum

from .hw import isa
from .hw.config import MASK_WORD_BITS, PRESETS, AccelConfig
from .hw.isa import Buffer, Opcode

__all__ = ["sections", "render_markdown", "render_text", "update_document", "stale_sections"]

_ENUMS = [isa.Opcode, isa.Buffer, isa.Status, isa.Counter, isa.SgqMode]
_RECORDS = [isa.ChannelParams, isa.StatusRecord, isa.LinkTrailer, isa.SgqStripeHeader]


def _shape_name(shape) -> str:
    if isinstance(shape, type) and issubclass(shape, enum.Enum):
        return f"{shape.__name__} ({shape.as_shape().width} b)"
    if hasattr(shape, "signed"):
        return f"{'s' if shape.signed else 'u'}{shape.width}"
    return str(shape)


def _bits(offset: int, width: int) -> str:
    return f"{offset}" if width == 1 else f"{offset + width - 1}:{offset}"


def _first_line(obj) -> str:
    return (obj.__doc__ or "").strip().splitlines()[0] if obj.__doc__ else ""


def _member_doc(enum_cls, member) -> str:
    # Member docs are the ``#:`` comments in hw/isa.py; recover them from the source.
    import inspect
    try:
        source = inspect.getsource(enum_cls)
    except OSError:  # pragma: no cover
        return ""
    match = re.search(rf"^\s+{member.name} = \d+\s+#: (.*)$", source, re.M)
    return match.group(1).strip() if match else ""


def _table(header: list[str], rows: list[list]) -> list[list[str]]:
    return [header] + [[str(c) for c in row] for row in rows]


def isa_table() -> list[list[str]]:
    rows = []
    op_offset = data.Layout.cast(isa.InstructionLayout)["opcode"]
    for op in Opcode:
        fields = isa.operand_fields(op)
        if not fields:
            rows.append([op.name, op.value, "—", "", "", _member_doc(Opcode, op)])
        for n, f in enumerate(fields):
            rows.append([op.name if n == 0 else "", op.value if n == 0 else "", f.name,
                         _bits(f.offset, f.width), _shape_name(f.shape),
                         _member_doc(Opcode, op) if n == 0 else ""])
    rows.insert(0, ["(all)", "", "opcode", _bits(op_offset.offset, op_offset.width),
                    _shape_name(Opcode), f"{isa.INSTR_BITS}-bit word, little-endian"])
    return _table(["opcode", "code", "field", "bits", "type", "meaning"], rows)


def enum_tables() -> dict[str, list[list[str]]]:
    return {e.__name__: _table(["name", "code", "meaning"],
                               [[m.name, m.value, _member_doc(e, m)] for m in e])
            for e in _ENUMS}


def record_tables() -> dict[str, list[list[str]]]:
    out = {}
    for rec in _RECORDS:
        layout = data.Layout.cast(rec)
        rows = [[f.name, _bits(f.offset, f.width), _shape_name(f.shape)]
                for f in isa.field_table(layout)]
        out[f"{rec.__name__} ({layout.size} bits)"] = _table(["field", "bits", "type"], rows)
    return out


def config_table(configs: list[AccelConfig] | None = None) -> list[list[str]]:
    configs = configs or list(PRESETS.values())
    rows = [
        ["array (rows x cols)"] + [f"{c.rows} x {c.cols} = {c.macs} MACs" for c in configs],
        ["host stream"] + [f"{c.host_width} bits" for c in configs],
        ["requant lanes"] + [str(c.requant_lanes) for c in configs],
        ["implementation profile"] + [c.impl.name for c in configs],
        ["config_id (status record)"] + [f"0x{c.config_id:06x}" for c in configs],
    ]
    for buf in Buffer:
        rows.append([f"{buf.name} words x bits"] + [
            f"{c.depth(buf)} x {c.word_bits(buf)} ({c.buffer_bytes(buf) / 1024:g} KiB)"
            for c in configs])
    rows.append(["mask bits"] + [f"{c.mask_bits} ({MASK_WORD_BITS} per MASK word)"
                                 for c in configs])
    return _table(["parameter"] + [c.name for c in configs], rows)


def sections() -> dict[str, list[tuple[str, list[list[str]]]]]:
    """Named groups of (title, table) — the generated sections of the architecture document."""
    return {
        "configs": [("Configuration presets (`hw/config.py`)", config_table())],
        "isa": [("Instruction fields (`hw/isa.py`)", isa_table())]
               + [(f"`{name}`", t) for name, t in enum_tables().items()],
        "records": [(f"`{name}`", t) for name, t in record_tables().items()],
    }


def _markdown_table(table: list[list[str]]) -> str:
    def esc(s):
        return str(s).replace("|", "\\|")
    lines = ["| " + " | ".join(esc(c) for c in table[0]) + " |",
             "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in table[1:]]
    return "\n".join(lines)


def render_markdown(name: str) -> str:
    """The Markdown of one generated section."""
    parts = []
    for title, table in sections()[name]:
        parts.append(f"**{title}**\n\n{_markdown_table(table)}")
    return "\n\n".join(parts)


def render_text() -> str:
    """Plain-text rendering of every table, for the terminal."""
    out = []
    for group in sections().values():
        for title, table in group:
            widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
            out.append(title.replace("`", ""))
            for n, row in enumerate(table):
                cells = (str(c).ljust(w) for c, w in zip(row, widths, strict=True))
                out.append(("  " + "  ".join(cells)).rstrip())
                if n == 0:
                    out.append("  " + "  ".join("-" * w for w in widths))
            out.append("")
    return "\n".join(out)


_MARKER = re.compile(r"(<!-- BEGIN GENERATED: (\w+) -->\n)(.*?)(<!-- END GENERATED: \2 -->)", re.S)


def _rewrite(text: str) -> str:
    return _MARKER.sub(lambda m: m.group(1) + render_markdown(m.group(2)) + "\n" + m.group(4),
                       text)


def stale_sections(path: Path) -> list[str]:
    """Names of generated sections in ``path`` whose content differs from the code."""
    text = Path(path).read_text()
    return [m.group(2) for m in _MARKER.finditer(text)
            if m.group(3) != render_markdown(m.group(2)) + "\n"]


def update_document(path: Path) -> bool:
    """Rewrite the generated sections of ``path``; return whether anything changed."""
    path = Path(path)
    old = path.read_text()
    new = _rewrite(old)
    if new != old:
        path.write_text(new)
    return new != old
