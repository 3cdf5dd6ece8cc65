"""The rank report as a PNG: spectra with the chosen cut-offs for a few modules, and ranks by layer and module."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pick_modules(modules: list[dict[str, Any]], count: int = 7) -> list[dict[str, Any]]:
    """Up to ``count`` adapted modules with a spectrum: one per module kind (from the middle of the model), then
    more layers spread evenly when there are fewer kinds than ``count``."""
    rows = [m for m in modules if m["adapted"] and m.get("spectrum")]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row)
    picked = [group[len(group) // 2] for group in by_kind.values()][:count]
    rest = [r for r in rows if r not in picked]
    while len(picked) < count and rest:
        picked.append(rest.pop(len(rest) // 2))
    return picked


def rank_grid(modules: list[dict[str, Any]]) -> tuple[list[str], list[str], list[list[float]]]:
    """``(row labels, kinds, grid)``: rank per (layer, kind); NaN where a module is missing."""
    kinds = list(dict.fromkeys(m["kind"] for m in modules))
    layers = sorted({m["layer"] for m in modules if m["layer"] is not None})
    labels = [str(layer) for layer in layers] + (["-"] if any(m["layer"] is None for m in modules) else [])
    index = {label: i for i, label in enumerate(labels)}
    grid = [[float("nan")] * len(kinds) for _ in labels]
    for m in modules:
        label = "-" if m["layer"] is None else str(m["layer"])
        grid[index[label]][kinds.index(m["kind"])] = float(m["rank"])
    return labels, kinds, grid


def draw_report(report: dict[str, Any], path: str | Path, title: str = "SoKA rank report") -> Path:
    """Write the figure to ``path`` (matplotlib Agg canvas; pyplot is not touched) and return the path."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    modules = report["modules"]
    fig = Figure(figsize=(13, 5.5))
    FigureCanvasAgg(fig)
    ax_s, ax_h = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1]})

    for row in pick_modules(modules):
        spectrum = np.asarray(row["spectrum"], dtype=float)
        ks = np.arange(1, spectrum.size + 1)
        normed = spectrum / spectrum[0] if spectrum[0] > 0 else spectrum
        (line,) = ax_s.semilogy(
            ks,
            np.maximum(normed, 1e-12),
            marker=".",
            markersize=3,
            label=row["module"].removeprefix("model."),
        )
        r = row["rank"]
        if 1 <= r <= spectrum.size:
            ax_s.axvline(r, color=line.get_color(), linestyle="--", linewidth=0.8)
            ax_s.plot([r], [max(normed[r - 1], 1e-12)], "o", color=line.get_color())
    ax_s.set_xlabel("term k")
    ax_s.set_ylabel("σ_k / σ_1 (KPSVD of R(W))")
    ax_s.set_title("Spectra and chosen ranks (dashed)")
    if ax_s.lines:
        ax_s.legend(fontsize=7, loc="upper right")

    labels, kinds, grid = rank_grid(modules)
    data = np.asarray(grid, dtype=float) if grid else np.zeros((1, 1))
    top = float(np.nanmax(data)) if np.isfinite(data).any() else 1.0
    image = ax_h.imshow(
        data, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=max(top, 1.0)
    )
    ax_h.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right", fontsize=8)
    step = max(1, len(labels) // 16)
    ax_h.set_yticks(range(0, len(labels), step), labels[::step], fontsize=8)
    ax_h.set_xlabel("module")
    ax_h.set_ylabel("layer")
    ax_h.set_title("Rank by layer and module")
    if data.size <= 120:
        for (i, j), value in np.ndenumerate(data):
            if not np.isnan(value):
                ax_h.text(j, i, f"{int(value)}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(image, ax=ax_h, label="rank")
    totals = report["totals"]
    fig.suptitle(
        f"{title}: {totals['trainable_params']:,} parameters, {totals['total_terms']} terms in "
        f"{totals['adapted_modules']} modules"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
