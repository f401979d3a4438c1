"""mkdocs hook: pages that derive from the code, so the docs cannot drift from it.

In a page's markdown:
  <!-- options: adapt.tune.TuneConfig -->     a table of the dataclass's fields (option, default, help)
  <!-- include: backbone/weights/MODEL_CARD.md -->   another repository file, its relative links re-pointed
"""
from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_OPTIONS = re.compile(r"<!-- options: ([\w.]+) -->")
_INCLUDE = re.compile(r"<!-- include: ([\w./-]+) -->")
_RELATIVE_LINK = re.compile(r"(!?)\[([^\]]*)\]\((?!https?:|#)([^)]+)\)")


def on_files(files, config):
    """Publish benchmarks/results/ under results/, so the benchmarks page links the raw outputs it quotes."""
    from mkdocs.structure.files import File

    results = ROOT / "benchmarks" / "results"
    for path in sorted(p for p in results.rglob("*") if p.is_file()):
        files.append(File.generated(config, f"results/{path.relative_to(results).as_posix()}", abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    markdown = _INCLUDE.sub(lambda m: _include(m.group(1), page.file.src_path), markdown)
    return _OPTIONS.sub(lambda m: options_table(m.group(1)), markdown)


def options_table(dotted: str) -> str:
    """The fields of a config dataclass as the CLI spells them (--kebab-case), with default and help."""
    module, _, name = dotted.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    rows = ["| option | default | what it sets |", "|---|---|---|"]
    for field in dataclasses.fields(cls):
        help_text = field.metadata.get("help")
        if help_text is None or field.metadata.get("cli") is False:
            continue
        rows.append(f"| `--{field.name.replace('_', '-')}` | {_default(field)} | {_cell(help_text)} |")
    return "\n".join(rows)


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    return "none" if value is None else f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _include(relative: str, page_path: str) -> str:
    """A repository file's text; links into docs/ are re-pointed, links elsewhere become code paths."""
    source = ROOT / relative
    text = source.read_text(encoding="utf-8")
    page_dir = (ROOT / "docs" / page_path).parent

    def repoint(match: re.Match) -> str:
        bang, label, target = match.groups()
        path = (source.parent / target.split("#")[0]).resolve()
        anchor = "#" + target.split("#", 1)[1] if "#" in target else ""
        try:
            inside_docs = path.relative_to(ROOT / "docs")
        except ValueError:
            return f"{label} (`{path.relative_to(ROOT)}`)" if not bang else match.group(0)
        up = Path(*[".."] * len(page_dir.relative_to(ROOT / "docs").parts)) if page_dir != ROOT / "docs" else Path()
        return f"{bang}[{label}]({(up / inside_docs).as_posix()}{anchor})"

    return _RELATIVE_LINK.sub(repoint, text)
