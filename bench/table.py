"""One table from the benchmarks' JSON results (``make bench``, ``bench/gpu_check.sh``).

Every benchmark writes one JSON object with a ``bench`` key (``--json PATH``); :func:`rows_for`
turns each kind into rows of (bench, case, figure, value, note) and :func:`format_table` lays
them out as a Markdown pipe table, which reads as well in a terminal as pasted into RESULTS.md.
Kinds: ``data_loader``, ``train_throughput``, ``sp_overhead``, ``part`` (a step of the GPU check:
ran, skipped or failed, with why), ``matmul`` (the measured bf16 matmul ceiling) and
``not_measured`` (a figure this machine could not produce, with the reason and the target).

CLI: ``python bench/table.py [--markdown OUT] [--title T] RESULT.json...`` prints the table (and
writes it, with the JSON merged beside it, atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

HEADERS = ("bench", "case", "figure", "value", "note")
Row = tuple[str, str, str, str, str]


# --------------------------------------------------------------------------------------------
# Number formats
# --------------------------------------------------------------------------------------------

def fmt_count(x: float | None) -> str:
    """12,345 below ten million, else 76.7M."""
    if x is None:
        return "-"
    return f"{x / 1e6:,.1f}M" if abs(x) >= 1e7 else f"{x:,.0f}"


def fmt_seconds(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    gib = n / 2**30
    return f"{gib:.2f} GiB" if gib >= 1 else f"{n / 2**20:.0f} MiB"


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


# --------------------------------------------------------------------------------------------
# Rows per kind
# --------------------------------------------------------------------------------------------

def _data_loader(r: dict[str, Any]) -> list[Row]:
    case = f"S={r['seq_len']}, {r['rows']} rows, 1 core"
    rows = [("data loader", case, "ours (MixtureLoader) tokens/s", fmt_count(r["ours_tokens_per_s"]),
             f"goal {r['goal']:,}: {'met' if r['ours_tokens_per_s'] >= r['goal'] else 'NOT met'}")]
    if r.get("streaming_tokens_per_s"):
        rows.append(("data loader", case, "mosaicml-streaming tokens/s",
                     fmt_count(r["streaming_tokens_per_s"]), "same rows, same build_row"))
        rows.append(("data loader", case, "ratio ours / streaming",
                     fmt_ratio(r["ours_tokens_per_s"] / r["streaming_tokens_per_s"]), ""))
    return rows


def _side_note(side: dict[str, Any]) -> str:
    parts = [side.get("label", "")]
    if side.get("mfu_causal") is not None:
        parts.append(f"MFU causal {fmt_pct(side['mfu_causal'])} / dense {fmt_pct(side['mfu_dense'])}")
    else:
        parts.append(f"{side['tflops_causal'] * 1e3:.2f} causal / {side['tflops_dense'] * 1e3:.2f} "
                     "dense GFLOP/s")
    spread = side.get("step_s_spread")
    parts.append(f"step {fmt_seconds(side['step_s'])}"
                 + (f" (spread {fmt_pct(spread)})" if spread is not None else ""))
    return "; ".join(p for p in parts if p)


def _train_throughput(r: dict[str, Any]) -> list[Row]:
    c = r["config"]
    cpu = c["device"] == "cpu"
    case = (f"{c['shape']} S={c['seq_len']} x{c['rows']} ({c['docs']} doc) "
            f"{'CPU' if cpu else c['device_name']} {c['precision']}")
    if c.get("purpose"):
        case = f"{c['purpose']}: {case}"
    rows: list[Row] = []
    sides = [(k, n) for k, n in (("ours", "ours"), ("baseline", "transformers baseline"))
             if r.get(k) is not None]
    for key, name in sides:
        side = r[key]
        if side["status"] != "ok":
            rows.append(("train throughput", case, f"{name} tokens/s", side["status"].upper(),
                         side.get("reason", "")))
        else:
            rows.append(("train throughput", case, f"{name} tokens/s",
                         fmt_count(side["tokens_per_s"]), _side_note(side)))
    peaks = [fmt_bytes(r[k].get("peak_bytes")) for k, _ in sides]
    rows.append(("train throughput", case,
                 f"peak {c['memory_kind']} ({' / '.join(n for _, n in sides)})", " / ".join(peaks),
                 "over the timed steps" if not cpu else "RSS high-water mark minus RSS before "
                 "the side was built"))
    plans = [r[k].get("plan_peak_bytes") for k, _ in sides]
    if any(p is not None for p in plans):
        rows.append(("train throughput", case,
                     f"peak estimated ({' / '.join(n for _, n in sides)})",
                     " / ".join(fmt_bytes(p) for p in plans),
                     "ours: the plan's estimate (prolong.model.memory) for this run's own spec, "
                     "world 1 (no SP, no partitioning); baseline: bench/peak_memory.py"))
    if r.get("ratio") is not None:
        note = ("CPU ratio (fp32, 2 cores): says nothing about the GPU target" if cpu
                else "target >= 1.3x at 1B/64K, one document")
        if r.get("loss_rel_diff") is not None:
            note += f"; first-step losses agree to {r['loss_rel_diff']:.1e}"
        rows.append(("train throughput", case, "ratio ours / baseline", fmt_ratio(r["ratio"]),
                     note))
    return rows


def _sp_overhead(r: dict[str, Any]) -> list[Row]:
    c = r["config"]
    case = f"{c['shape']} S={c['seq_len']} x{c['rows']} rows, {c['backend']}"
    cpu = c["device"] == "cpu"
    caveat = ("CPU/gloo, 1 thread per rank on a shared 2-core machine: not the GPU figure"
              if cpu else "target overhead <= 10%")
    t1, t2 = r["sp1"]["step_s"], r["sp2"]["step_s"]
    return [
        ("SP overhead", case, "step time SP=1 (1 rank) / SP=2 (2 ranks)",
         f"{fmt_seconds(t1)} / {fmt_seconds(t2)}", "same global batch; median of timed steps"),
        ("SP overhead", case, "step-time ratio SP=2 / SP=1", fmt_ratio(t2 / t1),
         "1.00x = no speed-up from the second rank"),
        ("SP overhead", case, "rank-time overhead 2*t(SP=2)/t(SP=1) - 1",
         fmt_pct(2 * t2 / t1 - 1), caveat + (f"; losses agree to {r['loss_rel_diff']:.1e}"
                                             if r.get("loss_rel_diff") is not None else "")),
    ]


def _memory_plan(r: dict[str, Any]) -> list[Row]:
    case = f"{r['shape']} on one {r['gpu_type']} ({fmt_bytes(r['device_bytes'])})"
    rows: list[Row] = [
        ("memory plan", case, f"S={row['seq_len']:,} peak estimated (ours / transformers baseline)",
         f"{fmt_bytes(row['ours'])} / {fmt_bytes(row['baseline'])}",
         f"baseline's full logits {fmt_bytes(row['baseline_parts']['logits'])}; fits under "
         f"{fmt_bytes(r['fraction'] * r['device_bytes'])}: ours "
         f"{'yes' if row['ours'] <= r['fraction'] * r['device_bytes'] else 'NO'}, baseline "
         f"{'yes' if row['baseline'] <= r['fraction'] * r['device_bytes'] else 'NO'}")
        for row in r["rows"]]
    chosen = r["ratio_length"]
    rows.append(("memory plan", case, "ratio length (both sides fit)",
                 f"{chosen:,}" if chosen else "none",
                 f"MFU with ours alone at S={r['mfu_length']:,}"))
    return rows


def _part(r: dict[str, Any]) -> list[Row]:
    return [("gpu check", r["name"], "status", r["status"].upper(),
             "; ".join(x for x in (r.get("detail", ""),
                                   f"{r['seconds']:.0f} s" if r.get("seconds") is not None
                                   else "") if x))]


def _matmul(r: dict[str, Any]) -> list[Row]:
    tflops = r["tflops"]
    rows = [("gpu check", f"{r['dtype']} matmul {r['n']}^3, {r['device_name']}",
             "TFLOP/s (median)", f"{tflops:.0f}" if tflops >= 100 else f"{tflops:.3g}",
             f"random data, {r['repeats']} timed after {r['warmup']} warm-up")]
    if r.get("copy_tb_per_s") is not None:
        rows.append(("gpu check", f"{r['copy_mib']} MiB copy, {r['device_name']}",
                     "TB/s read + written (median)", f"{r['copy_tb_per_s']:.3g}",
                     "the ceiling of memory-bound work"))
    return rows


def _not_measured(r: dict[str, Any]) -> list[Row]:
    return [(r.get("group", "GPU"), r["case"], r["figure"], "not measured",
             f"{r['reason']}; target: {r['target']}")]


KINDS = {"data_loader": _data_loader, "train_throughput": _train_throughput,
         "sp_overhead": _sp_overhead, "part": _part, "matmul": _matmul, "memory_plan": _memory_plan,
         "not_measured": _not_measured}


def rows_for(result: dict[str, Any]) -> list[Row]:
    kind = result.get("bench")
    if kind not in KINDS:
        raise ValueError(f"unknown result kind {kind!r} (known: {', '.join(KINDS)})")
    return KINDS[kind](result)


def format_table(rows: Iterable[Sequence[str]], headers: Sequence[str] = HEADERS) -> str:
    """A Markdown pipe table with padded columns (pipes inside cells are escaped)."""
    cells = [[str(h) for h in headers]] + [[str(c).replace("|", "\\|") for c in r] for r in rows]
    if any(len(r) != len(headers) for r in cells):
        raise ValueError(f"every row needs {len(headers)} cells")
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def table_of(results: Iterable[dict[str, Any]]) -> str:
    return format_table([row for r in results for row in rows_for(r)])


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for reading
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_results(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Each file's JSON object (or list of objects), in the order given; a file that is not
    valid JSON becomes a failed ``part`` row naming it, so one broken result never hides the rest."""
    out: list[dict[str, Any]] = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            out.append({"bench": "part", "name": Path(path).name, "status": "unreadable",
                        "detail": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        out.extend(data if isinstance(data, list) else [data])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="*", type=Path, help="JSON result files, in table order")
    ap.add_argument("--markdown", type=Path, help="also write the table (with --title) here")
    ap.add_argument("--merged-json", type=Path, help="also write all results as one JSON list")
    ap.add_argument("--title", default="", help="lines printed above the table")
    args = ap.parse_args(argv)
    results = load_results(args.results)
    try:
        table = table_of(results)
    except (KeyError, ValueError, TypeError) as exc:
        print(f"bench/table.py: a result lacks a field or has a wrong one: {exc}", file=sys.stderr)
        return 2
    text = (args.title.rstrip("\n") + "\n\n" if args.title else "") + table + "\n"
    print(text, end="")
    if args.markdown:
        write_atomic(args.markdown, text)
    if args.merged_json:
        write_atomic(args.merged_json, json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
