"""The generated tables: the docs are current and the CLI prints them from the code."""

from pathlib import Path

from click.testing import CliRunner

from tinyaccel import spec
from tinyaccel.cli import main
from tinyaccel.hw import isa

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def test_architecture_doc_is_current():
    stale = spec.stale_sections(DOC)
    assert stale == [], (f"docs/architecture.md sections {stale} differ from the code; run "
                         f"`tinyaccel spec --update-docs docs/architecture.md`")


def test_doc_has_every_generated_section():
    text = DOC.read_text()
    for name in spec.sections():
        assert f"<!-- BEGIN GENERATED: {name} -->" in text


def test_spec_cli_lists_every_field_at_its_offset():
    result = CliRunner().invoke(main, ["spec"])
    assert result.exit_code == 0, result.output
    for op in isa.Opcode:
        assert op.name in result.output
        for field in isa.operand_fields(op):
            hi = field.offset + field.width - 1
            bits = str(field.offset) if field.width == 1 else f"{hi}:{field.offset}"
            line = [ln for ln in result.output.splitlines()
                    if f" {field.name} " in ln and bits in ln]
            assert line, f"{op.name}.{field.name} at bits {bits} missing from `tinyaccel spec`"
    for status in isa.Status:
        assert status.name in result.output


def test_spec_markdown_matches_sections():
    result = CliRunner().invoke(main, ["spec", "--markdown"])
    assert result.exit_code == 0
    for name in spec.sections():
        assert spec.render_markdown(name) in result.output


def test_bench_rejects_unknown_suite():
    result = CliRunner().invoke(main, ["bench", "nosuch"])
    assert result.exit_code != 0
    assert "nosuch" in result.output
