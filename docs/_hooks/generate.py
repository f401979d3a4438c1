"""mkdocs hook: pages that derive from the code, so the docs cannot drift from it.

In a page's markdown:
  <!-- options: adapt.tune.TuneConfig -->     a table of the dataclass's fields (option, default, help)
  <!-- include: backbone/weights/MODEL_CARD.md -->   another repository file, its relative links re-pointed
  <!-- strategies -->                        the registered strategies as adapt.strategy_spec declares them
"""
from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_OPTIONS = re.compile(r"<!-- options: ([\w.]+) -->")
_INCLUDE = re.compile(r"<!-- include: ([\w./-]+) -->")
_STRATEGIES = "<!-- strategies -->"
_RELATIVE_LINK = re.compile(r"(!?)\[([^\]]*)\]\((?!https?:|#)([^)]+)\)")


def on_files(files, config):
    """Publish benchmarks/results/ under results/, so the benchmarks page links the raw outputs it quotes."""
    from mkdocs.structure.files import File

    results = ROOT / "benchmarks" / "results"
    # A run's adapters and Ray Tune's state stay local (.gitignore), and a sweep may be writing them meanwhile.
    local = {"adapters", "ray"}
    for path in sorted(p for p in results.rglob("*") if p.is_file() and not local & set(p.relative_to(results).parts)):
        files.append(File.generated(config, f"results/{path.relative_to(results).as_posix()}", abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    markdown = _INCLUDE.sub(lambda m: _include(m.group(1), page.file.src_path), markdown)
    if _STRATEGIES in markdown:
        markdown = markdown.replace(_STRATEGIES, strategies_table())
    return _OPTIONS.sub(lambda m: options_table(m.group(1)), markdown)


def strategies_table() -> str:
    """One row per registered strategy, from its declaration (adapt.strategy_spec)."""
    from adapt.strategy_spec import EXPORT_MODES, SERVING_MODES, STRATEGIES

    rows = ["| strategy | trains | default lr / weight decay | adapter holds | served | export |",
            "|---|---|---|---|---|---|"]
    for spec in STRATEGIES.values():
        lr = f"{spec.lr:g} / {spec.weight_decay:g}" + "".join(
            f"; `{prefix}*` at lr x {factor:g}" for prefix, factor in spec.lr_multipliers)
        weights = ("every base weight" if spec.weights == ("*",) else
                   f"{len(spec.weights)} base tensors: " + ", ".join(f"`{w}`" for w in spec.weights))
        holds = " + ".join(["P0", *([weights] if spec.weights else []), *(["LoRA factors"] if spec.lora else [])])
        export = EXPORT_MODES[spec.export] if spec.export else "refused"
        rows.append(f"| `{spec.name}` | {_cell(spec.summary)} | {lr} | {holds} | {_cell(SERVING_MODES[spec.serving])} "
                    f"| {_cell(export)} |")
    return "\n".join(rows)


def options_table(dotted: str) -> str:
    """The fields of a config dataclass as the CLI spells them (--kebab-case), with default and help."""
    from adapt.cli_config import option_fields, option_name

    module, _, name = dotted.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    rows = ["| option | default | what it sets |", "|---|---|---|"]
    for field in option_fields(cls):  # the same fields, names and help the command line offers
        help_text = field.metadata.get("help", "")
        rows.append(f"| `{option_name(field.name)}` | {_default(field)} | {_cell(help_text)} |")
    return "\n".join(rows)


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if isinstance(value, tuple):
        value = ",".join(str(v) for v in value)
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
