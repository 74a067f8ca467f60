"""Results of a run: the JSON file, the text table, and the one PNG chart."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Sequence

from .cases import (COUNTED_MODES, MIN_BYTES, MODES, O_C_SLACK, TWO_PASS_BYTES, meets_target)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SHORT = {"forward": "fwd", "backward": "bwd", "forward+backward": "fwd+bwd", "eval": "eval"}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------- counted (CPU)
def counted_table(rows: List[dict]) -> str:
    """One line per (case, dtype): the shape that ran, then launches and element sizes moved
    per element for each mode; '!' marks a mode that misses issue 4's target."""
    by_key: Dict[tuple, Dict[str, dict]] = {}
    for row in rows:
        by_key.setdefault((row["case"], row["dtype"]), {})[row["mode"]] = row
    modes = list(COUNTED_MODES) + ["forward+backward"]
    head = (f"{'case':<32} {'dtype':<5} {'ran':<20} {'M ran':>7}  "
            + "  ".join(f"{SHORT[m]:>11}" for m in modes))
    lines = [head, f"{'':<32} {'':<5} {'':<20} {'':>7}  "
             + "  ".join(f"{'launch B/el':>11}" for _ in modes)]
    for (case, dtype), per_mode in by_key.items():
        first = next(iter(per_mode.values()))
        cells = []
        for mode in modes:
            row = per_mode.get(mode)
            if row is None:
                cells.append(f"{'-':>11}")
                continue
            total = row["bytes_per_element"]["total"]
            flag = " " if meets_target(mode, row["M_run"], row["launches"], total) else "!"
            cells.append(f"{row['launches']:>4} {total:5.2f}{flag}")
        ran = "x".join(str(d) for d in first["shape_run"])
        lines.append(f"{case:<32} {dtype:<5} {ran:<20} {first['M_run']:>7}  " + "  ".join(cells))
    lines.append(f"B/el: bytes requested per element of x, in element sizes (minimum fwd "
                 f"{MIN_BYTES['forward']}, bwd {MIN_BYTES['backward']}, eval {MIN_BYTES['eval']}; "
                 f"two-pass {TWO_PASS_BYTES['forward']} / {TWO_PASS_BYTES['backward']}). "
                 f"'!': misses issue 4's target for the regime of M ran (+{O_C_SLACK} for O(C)).")
    return "\n".join(lines)


def counted_chart(rows: List[dict], meta: dict, path: Path) -> None:
    """Three panels (training forward, backward, eval): per case, bytes loaded + stored per
    element (stacked) with the launch count above, against the minimum and two-pass lines;
    M ≤ 8192 cases shaded."""
    plt = _pyplot()
    keys = []
    for row in rows:
        key = (row["case"], row["dtype"])
        if key not in keys:
            keys.append(key)
    index = {key: i for i, key in enumerate(keys)}
    fig, axes = plt.subplots(len(COUNTED_MODES), 1, figsize=(max(12, 0.36 * len(keys) + 3), 15),
                             sharex=True)
    for ax, mode in zip(axes, COUNTED_MODES):
        mode_rows = [r for r in rows if r["mode"] == mode]
        xs = [index[(r["case"], r["dtype"])] for r in mode_rows]
        loaded = [r["bytes_per_element"]["loaded"] for r in mode_rows]
        stored = [r["bytes_per_element"]["stored"] for r in mode_rows]
        for r, x in zip(mode_rows, xs):
            if r["regime_run"] == "M<=8192":
                ax.axvspan(x - 0.5, x + 0.5, color="#fff3c4", zorder=0)
        ax.bar(xs, loaded, color="#3b6ea8", label="loaded", zorder=2)
        ax.bar(xs, stored, bottom=loaded, color="#9cc3e6", label="stored", zorder=2)
        for r, x, lo, st in zip(mode_rows, xs, loaded, stored):
            ok = meets_target(mode, r["M_run"], r["launches"], lo + st)
            ax.text(x, lo + st + 0.08, str(r["launches"]), ha="center", va="bottom", fontsize=7,
                    color="black" if ok else "#c0392b", fontweight="normal" if ok else "bold")
        ax.axhline(MIN_BYTES[mode], color="#2e8b57", linestyle="--", linewidth=1.2,
                   label=f"minimum {MIN_BYTES[mode]}", zorder=3)
        if TWO_PASS_BYTES[mode] != MIN_BYTES[mode]:
            ax.axhline(TWO_PASS_BYTES[mode], color="#c0392b", linestyle=":", linewidth=1.2,
                       label=f"two-pass {TWO_PASS_BYTES[mode]}", zorder=3)
        top = max([lo + st for lo, st in zip(loaded, stored)] + [TWO_PASS_BYTES[mode]])
        ax.set_ylim(0, top * 1.18 + 0.3)
        ax.set_ylabel("element sizes / element")
        title = {"forward": "training forward", "backward": "backward (dx, dγ, dβ)",
                 "eval": "eval forward"}[mode]
        ax.set_title(f"{title}: bytes requested per element (number above bar: launches; red "
                     f"= misses issue 4's target)", fontsize=10, loc="left")
        ax.grid(axis="y", alpha=0.3, zorder=1)
        handles, labels = ax.get_legend_handles_labels()
        handles.append(plt.Rectangle((0, 0), 1, 1, color="#fff3c4"))
        labels.append("M ≤ 8192 (as run)")
        ax.legend(handles, labels, loc="upper right", fontsize=8, ncol=5)
    axes[-1].set_xticks(range(len(keys)))
    axes[-1].set_xticklabels([_tick(case, dtype, rows) for case, dtype in keys], rotation=90,
                             fontsize=7)
    axes[-1].set_xlim(-0.6, len(keys) - 0.4)
    fig.suptitle(f"bn_triton under Triton's interpreter: counted traffic, not a GPU timing — "
                 f"torch {meta['torch']}, triton {meta['triton']}, {meta['cpu']}", fontsize=11)
    _save(fig, path)


def _tick(case: str, dtype: str, rows: List[dict]) -> str:
    ran = next(r["shape_run"] for r in rows if r["case"] == case and r["dtype"] == dtype)
    return f"{case} {dtype} ({'x'.join(map(str, ran))})"


# -------------------------------------------------------------------------------- timed (GPU)
TIMED_HEADER = (f"{'case':<32} {'dtype':<5} {'mode':<8} {'provider':<14} {'ms':>9} {'GB/s':>8} "
                f"{'%peak':>6}  speedup of bn_triton")
TIMED_FOOTER = ("GB/s under the minimum bytes model: fwd 2, bwd 3, fwd+bwd 5, eval 2 element "
                "sizes per element; time: median of triton.testing.do_bench (L2 flushed).")


def timed_lines(rows: List[dict]) -> List[str]:
    lines = []
    for row in rows:
        if "error" in row:
            lines.append(f"{row['case']:<32} {row['dtype']:<5} {'':<8} {row['provider']:<14} "
                         f"error: {row['error'][:80]}")
            continue
        pct = "n/a" if row.get("pct_of_peak") is None else f"{row['pct_of_peak']:.0f}"
        speed = ""
        if row["provider"] == "bn_triton":
            speed = "  ".join(f"vs {k} x{v:.2f}" for k, v in row.get("speedup", {}).items())
        lines.append(f"{row['case']:<32} {row['dtype']:<5} {SHORT[row['mode']]:<8} "
                     f"{row['provider']:<14} {row['ms']:9.4f} {row['gbs']:8.0f} {pct:>6}  {speed}")
    return lines


def timed_table(rows: List[dict]) -> str:
    return "\n".join([TIMED_HEADER] + timed_lines(rows) + [TIMED_FOOTER])


PROVIDER_COLOURS = {"bn_triton": "#3b6ea8", "torch": "#999999", "torch.compile": "#e69f00",
                    "flag_gems": "#7b3294"}


def timed_chart(rows: List[dict], meta: dict, path: Path, dtype: str,
                providers: Sequence[str]) -> None:
    """One panel per mode: GB/s (minimum bytes model) of each provider per case in `dtype`,
    the device's peak as a line, bn_triton's speedup over torch eager above its bar."""
    plt = _pyplot()
    ok = [r for r in rows if "ms" in r and r["dtype"] == dtype]
    cases = []
    for r in ok:
        if r["case"] not in cases:
            cases.append(r["case"])
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    providers = [p for p in providers if any(r["provider"] == p for r in ok)]
    if not cases or not modes:
        return
    width = 0.8 / max(1, len(providers))
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(12, 0.5 * len(cases) + 3),
                                                     3.6 * len(modes) + 1.5), sharex=True,
                             squeeze=False)
    peak = meta.get("peak_bandwidth_gbs")
    for ax, mode in zip(axes[:, 0], modes):
        tallest = max([r["gbs"] for r in ok if r["mode"] == mode] + [peak or 0])
        ax.set_ylim(0, tallest * 1.3)  # room for the legend above the bars and the peak
        for j, provider in enumerate(providers):
            xs, ys = [], []
            for i, case in enumerate(cases):
                row = next((r for r in ok if r["case"] == case and r["mode"] == mode
                            and r["provider"] == provider), None)
                if row is not None:
                    xs.append(i + (j - (len(providers) - 1) / 2) * width)
                    ys.append(row["gbs"])
                    speedup = row.get("speedup", {}).get("torch")
                    if provider == "bn_triton" and speedup is not None:
                        ax.text(xs[-1], ys[-1], f"x{speedup:.2f}", rotation=90, ha="center",
                                va="bottom", fontsize=6)
            ax.bar(xs, ys, width=width, color=PROVIDER_COLOURS.get(provider), label=provider)
        if peak:
            ax.axhline(peak, color="#c0392b", linestyle="--", linewidth=1,
                       label=f"peak {peak:.0f} GB/s")
            secondary = ax.secondary_yaxis("right", functions=(lambda g: 100 * g / peak,
                                                               lambda p: p * peak / 100))
            secondary.set_ylabel("% of peak")
        ax.set_ylabel("GB/s")
        ax.set_title(f"{mode} ({MIN_BYTES[mode]} element sizes per element); above bn_triton: "
                     "speedup over torch eager", fontsize=10, loc="left")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, ncol=len(providers) + 1, loc="upper right")
    axes[-1, 0].set_xticks(range(len(cases)))
    axes[-1, 0].set_xticklabels(cases, rotation=90, fontsize=7)
    fig.suptitle(f"bn_triton vs torch on {meta.get('gpu', 'GPU')}, {dtype} — torch "
                 f"{meta['torch']}, triton {meta['triton']}", fontsize=11)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    """Lay out, write (creating the folder) and close a chart."""
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise SystemExit("the chart needs matplotlib: pip install -e '.[bench]' "
                         "(or pass --no-chart)") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
