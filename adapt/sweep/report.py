"""A sweep's reports: results.csv (one row per run), table.md (mean ± std over seeds), curves.png (AP against
shots per strategy) and retention.png (target AP against retention per strategy)."""
from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

from adapt.strategy_spec import STRATEGIES
from adapt.sweep.cell import ROW_FIELDS
from adapt.sweep.grid import ZERO_SHOT
from glip_io import atomic_write

SHOT_ORDER = ["0", "1", "2", "3", "5", "10", "20", "30", "50", "100", "full"]


def write_reports(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, ROW_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "results.csv", text.getvalue().encode())
    ok = [r for r in rows if r.get("status") == "ok"]
    atomic_write(out / "table.md", render_table(ok).encode())
    if ok:
        plot_curves(ok, out / "curves.png")
        plot_retention(ok, out / "retention.png")


def _mean_std(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["base"], r["task"], r["strategy"], str(r["shots"])), []).append(r)
    return groups


def _shot_key(label: str) -> int:
    return SHOT_ORDER.index(label) if label in SHOT_ORDER else len(SHOT_ORDER) - 1 + int(label) / 1e6


def render_table(rows: list[dict]) -> str:
    """Mean ± std over seeds of AP and retention, one line per base, task, strategy and shots."""
    lines = ["| base | task | strategy | shots | seeds | AP | AP50 | retention AP | retention % of base |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = {name: i for i, name in enumerate((ZERO_SHOT,) + tuple(STRATEGIES))}
    for (base, task, strategy, shots), group in sorted(
            _groups(rows).items(), key=lambda kv: (kv[0][0], kv[0][1], order.get(kv[0][2], 99), _shot_key(kv[0][3]))):
        column = lambda key: [float(r[key]) for r in group if r.get(key) not in (None, "")]  # noqa: E731
        lines.append(f"| {base} | {task} | {strategy} | {shots} | {len(group)} | {_mean_std(column('AP'))} | "
                     f"{_mean_std(column('AP50'))} | {_mean_std(column('retention_AP'))} | "
                     f"{_mean_std(column('retention_pct'))} |")
    return "\n".join(lines) + "\n"


def _averaged(rows: list[dict], key: str) -> dict[tuple, float]:
    """Mean over seeds then tasks of `key`, per (base, strategy, shots); zero-shot joins every strategy at 0."""
    per_task: dict[tuple, list[float]] = {}
    for (base, task, strategy, shots), group in _groups(rows).items():
        values = [float(r[key]) for r in group if r.get(key) not in (None, "")]
        if values:
            per_task.setdefault((base, strategy, shots), []).append(statistics.mean(values))
    return {k: statistics.mean(v) for k, v in per_task.items()}


def plot_curves(rows: list[dict], path: Path) -> None:
    """AP (mean over seeds and tasks) against shots, a line per strategy, solid/dashed/dotted per base."""
    plt = _pyplot()
    mean = _averaged(rows, "AP")
    shots = sorted({k[2] for k in mean if k[1] != ZERO_SHOT} | {"0"}, key=_shot_key)
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for base_index, base in enumerate(sorted({k[0] for k in mean})):
        for strategy_index, strategy in enumerate(s for s in tuple(STRATEGIES) if any(k[1] == s for k in mean)):
            points = [(i, mean[(base, strategy, s)] if s != "0" else mean.get((base, ZERO_SHOT, "0")))
                      for i, s in enumerate(shots)]
            points = [(x, y) for x, y in points if y is not None and (x == 0 or (base, strategy, shots[x]) in mean)]
            axes.plot(*zip(*points), marker="o", color=f"C{strategy_index}", linestyle=["-", "--", ":"][base_index % 3],
                      label=f"{strategy} ({base})")
    axes.set_xticks(range(len(shots)), shots)
    axes.set(xlabel="shots per category (0 = zero-shot)", ylabel="AP (mean over tasks and seeds)")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7)
    _save(figure, path)


def plot_retention(rows: list[dict], path: Path) -> None:
    """Target AP against retention (% of the base's own AP), a point per strategy, base and shots."""
    plt = _pyplot()
    ap, kept = _averaged(rows, "AP"), _averaged(rows, "retention_pct")
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    markers = ["o", "s", "^"]
    for base_index, base in enumerate(sorted({k[0] for k in ap})):
        for strategy_index, strategy in enumerate((ZERO_SHOT,) + tuple(STRATEGIES)):
            keys = [k for k in ap if k[0] == base and k[1] == strategy and k in kept]
            if keys:
                axes.scatter([kept[k] for k in keys], [ap[k] for k in keys], color=f"C{strategy_index}",
                             marker=markers[base_index % 3], label=f"{strategy} ({base})")
                for k in keys:
                    axes.annotate(k[2], (kept[k], ap[k]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    axes.set(xlabel="retention: AP on the base's own vocabulary, % of the base", ylabel="target AP")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7)
    _save(figure, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=130)
    _pyplot().close(figure)
    atomic_write(path, buffer.getvalue())
