"""Tables, plots and the honest summary of a head-to-head benchmark."""

from __future__ import annotations

import math
import platform
import statistics
from collections import defaultdict
from datetime import date
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def choose_rates(grid: list[dict], methods: tuple[str, ...]) -> dict[str, float]:
    """Per method with a grid, the grid rate with the lowest validation loss (diverged runs never win)."""
    best: dict[str, tuple[float, float]] = {}
    for r in grid:
        method, lr, loss = r["config"]["method"], r["config"]["lr"], r["val_loss"]
        loss = loss if _finite(loss) else math.inf
        if method not in best or loss < best[method][0]:
            best[method] = (loss, lr)
    return {m: best[m][1] for m in methods if m in best}


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if _finite(v)]
    if not values:
        return "diverged"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _groups(final: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in final:
        groups[r["name"]].append(r)
    return groups


def final_table(final: list[dict]) -> str:
    lines = [
        "| run | trainable | lr | val loss | GSM8K acc. | train loss (last 10) | grad-norm mean / std / max "
        "| init s | s/step | peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in sorted(_groups(final).items(), key=lambda kv: (kv[1][0]["budget"], kv[0])):
        first = runs[0]
        acc = [r["accuracy"] for r in runs]
        acc_text = f"{statistics.mean(acc):.3f}" + (f" ± {statistics.stdev(acc):.3f}" if len(acc) > 1 else "")
        tail = [statistics.mean(r["losses"][-10:]) for r in runs]
        gn = [
            statistics.mean([r[k] for r in runs])
            for k in ("grad_norm_mean", "grad_norm_std", "grad_norm_max")
        ]
        lines.append(
            f"| {name} | {first['trainable']:,} | {first['config']['lr']:g} | {_mean_std([r['val_loss'] for r in runs])} "
            f"| {acc_text} ({first['n_test']} items) | {_mean_std(tail)} | {gn[0]:.3f} / {gn[1]:.3f} / {gn[2]:.3f} "
            f"| {statistics.mean(r['init_seconds'] for r in runs):.1f} "
            f"| {statistics.mean(r['seconds_per_step'] for r in runs):.2f} "
            f"| {statistics.mean(r['peak_mib'] for r in runs):.0f} |"
        )
    return "\n".join(lines)


def grid_table(grid: list[dict], best: dict[str, float]) -> str:
    rates = sorted({r["config"]["lr"] for r in grid})
    by = {(r["config"]["method"], r["config"]["lr"]): r["val_loss"] for r in grid}
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |", "|---|" + "---:|" * len(rates)]
    for method in best:
        cells = []
        for lr in rates:
            v = by.get((method, lr))
            text = "" if v is None else (f"{v:.4f}" if _finite(v) else "diverged")
            cells.append(f"**{text}**" if lr == best[method] and v is not None else text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tier_of(name: str) -> str:
    """``"soka-grad-r16@0.75x"`` → ``"r16"``; ``"soka-kron"`` → ``"kron"``."""
    return name.rsplit("-", 1)[1].split("@")[0]


def method_of(name: str) -> str:
    return name.rsplit("-", 1)[0]


def _stats(runs: list[dict]) -> tuple[float, float, int]:
    values = [r["val_loss"] for r in runs if _finite(r["val_loss"])]
    if len(values) < len(runs) or not values:
        return math.inf, 0.0, len(runs)
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def verdicts(final: list[dict]) -> list[str]:
    """Each SoKA variant's validation loss against the best non-SoKA method at its tier: "wins" or "loses"
    only where the difference of the means exceeds twice the larger standard deviation over seeds, "within
    noise" otherwise, and no verdict from a single seed."""
    groups = _groups(final)
    out = []
    for name, runs in sorted(groups.items()):
        if not name.startswith("soka"):
            continue
        tier = tier_of(name)
        peers = {n: _stats(r) for n, r in groups.items() if tier_of(n) == tier and not n.startswith("soka")}
        peers = {n: s for n, s in peers.items() if "@" not in n}
        if not peers:
            continue
        peer = min(peers, key=lambda n: peers[n][0])
        (mean, std, n), (ref, ref_std, ref_n) = _stats(runs), peers[peer]
        if not (_finite(mean) and _finite(ref)):
            word = "diverged against" if not _finite(mean) else "wins against (the peer diverged)"
        elif min(n, ref_n) < 2:
            word = "has one seed, no verdict, against"
        elif abs(mean - ref) > 2 * max(std, ref_std):
            word = "wins against" if mean < ref else "loses to"
        else:
            word = "is within noise of"
        gap = f" ({(mean - ref) / ref:+.1%})" if _finite(mean) and _finite(ref) else ""
        out.append(
            f"- {name} ({runs[0]['trainable']:,} params) {word} the best peer {peer} "
            f"({groups[peer][0]['trainable']:,} params) on validation loss: {_mean_std([r['val_loss'] for r in runs])} "
            f"vs {_mean_std([r['val_loss'] for r in groups[peer]])}{gap}, {min(n, ref_n)} seed(s)."
        )
    return out


def plot(final: list[dict], out: Path, prefix: str) -> list[Path]:
    groups = _groups(final)
    tiers = sorted({tier_of(name) for name in groups}, key=lambda t: (t != "kron", len(t), t))
    paths = []
    for key, ylabel in (("losses", "training loss"), ("grad_norms", "gradient norm")):
        fig, axes = plt.subplots(1, len(tiers), figsize=(6 * len(tiers), 4), squeeze=False)
        for ax, tier in zip(axes[0], tiers, strict=True):
            for name, runs in sorted(groups.items()):
                if tier_of(name) != tier:
                    continue
                k = 5  # moving mean of 5 steps, then mean ± std over seeds as a band
                curves = [
                    [statistics.mean(r[key][max(0, j - k + 1) : j + 1]) for j in range(len(r[key]))]
                    for r in runs
                ]
                width = min(len(c) for c in curves)
                mean = [statistics.mean(c[j] for c in curves) for j in range(width)]
                (line,) = ax.plot(mean, label=f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
                if len(curves) > 1:
                    std = [statistics.stdev(c[j] for c in curves) for j in range(width)]
                    ax.fill_between(
                        range(width), [m - s for m, s in zip(mean, std, strict=True)], [m + s for m, s in zip(mean, std, strict=True)],
                        color=line.get_color(), alpha=0.2, linewidth=0,
                    )  # fmt: skip
            ax.set_title(f"budget tier: {tier}")
            ax.set_xlabel("step")
            ax.set_ylabel(f"{ylabel} (moving mean of 5; band: ± std over seeds)")
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{prefix}-{key.replace('_', '-')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    methods = sorted({method_of(name) for name in groups})
    colors = plt.get_cmap("tab10")
    for name, runs in sorted(groups.items()):
        x = runs[0]["trainable"]
        method = method_of(name)
        style = dict(  # one colour per method, one marker per tier (hollow: SoKA's 0.75× budget)
            color=colors(methods.index(method) % 10),
            marker="os^Dv"[tiers.index(tier_of(name)) % 5],
            facecolors="none" if "@" in name else None,
            label=name,
        )
        axes[0].scatter([x] * len(runs), [r["val_loss"] for r in runs], **style)
        axes[1].scatter([x] * len(runs), [r["accuracy"] for r in runs], **style)
    counts = [runs[0]["trainable"] for runs in groups.values()]
    for ax, label in zip(axes, ("validation loss", "GSM8K accuracy"), strict=True):
        ax.set_xscale("log")
        ax.set_xlim(min(counts) / 1.3, max(counts) * 1.3)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e6:g}M"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(label)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = out / f"{prefix}-vs-params.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def write_report(
    grids: dict[str, list[dict]], final: list[dict], best: dict[str, dict[str, float]], size: Any, out: Path,
    command: str, docs: Path | None = None,
) -> Path:  # fmt: skip
    """``report.md`` in ``out`` (and, with ``docs``, its section of ``docs/benchmarks.md``): the setup, a
    learning-rate grid per tier, the final runs, the verdicts and the plots."""
    prefix = f"compare-{out.name.removeprefix('compare-')}"
    img_dir = docs / "img" if docs else out
    img_dir.mkdir(parents=True, exist_ok=True)
    images = plot(final, img_dir, prefix) if final else []
    rel = (lambda p: f"img/{p.name}") if docs else (lambda p: p.name)
    parallel = (
        f" {size.jobs} runs at a time, {size.threads or 'default'} thread(s) each." if size.jobs > 1 else ""
    )
    grid_sections = []
    for tier, grid in grids.items():
        grid_sections += [
            f"Learning-rate grid at tier {tier} (validation loss, seed {size.seeds[0]}; chosen rate in bold):",
            "",
            grid_table(grid, best[tier]),
            "",
        ]
    missing = [t for t in size.final_tiers if not any(tier_of(r["name"]) == t for r in final)]
    body = "\n".join(
        [
            f"Command: `{command}`. Machine: {machine()}. Date: {date.today().isoformat()}.",
            f"Setup: {size.steps} steps, batch {size.batch_size}, max length {size.max_len} tokens, "
            f"{size.n_train} GSM8K training rows in a fixed order, validation on {size.n_val} held-out rows, "
            f"accuracy on the first {size.n_test} GSM8K test problems (greedy, {size.max_new_tokens} new tokens), "
            f"seeds {list(size.seeds)}. AdamW, weight decay 0, warm-up 10 % then linear decay, clip 1.0."
            + parallel,
            "",
            *grid_sections,
            "Final runs:",
            "",
            final_table(final),
            "",
            "Where SoKA stands (a verdict needs the difference of the means to exceed twice the larger std):",
            "",
            *verdicts(final),
            *(["", f"Not yet run: tiers {', '.join(missing)}."] if missing else []),
            "",
            *[f"![{p.stem}]({rel(p)})" for p in images],
        ]
    )
    (out / "report.md").write_text(body + "\n")
    if docs is not None:
        marker = prefix
        doc = docs / "benchmarks.md"
        text = doc.read_text() if doc.exists() else "# Benchmarks\n"
        section = f"<!-- {marker}:begin -->\n{body}\n<!-- {marker}:end -->"
        begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
        if begin in text and end in text:
            text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
        else:
            text = text.rstrip() + f"\n\n## Head-to-head on GSM8K ({out.name})\n\n{section}\n"
        doc.write_text(text)
    return out / "report.md"
