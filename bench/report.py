"""The one benchmark table: every row of bench/results/*.json against its target, printed and written
into docs/benchmarks.md between its markers, with the machine, the date and the commit measured.

A row whose benchmark has not run (no JSON) is listed as not measured, never left out. Whether a
target is met was decided by the benchmark itself from numbers of its own run (bench/common.py).

    python bench/report.py [--results DIR] [--doc docs/benchmarks.md] [--no-doc]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import RESULTS, ROW_KEYS  # noqa: E402

BEGIN, END = "<!-- bench-table:begin -->", "<!-- bench-table:end -->"
# Every row of the table, in its order, and the benchmark that measures it.
EXPECTED = {
    "1a": ("overhead", "unary latency p50, 1 KiB, EchoEngine, 1 in flight"),
    "1b": ("overhead", "unary latency p99, 1 KiB, EchoEngine, 1 in flight"),
    "2": ("overhead", "gateway CPU per request, 64 in flight"),
    "3": ("overhead", "throughput, 64 in flight"),
    "4": ("overhead", "streaming tokens/s"),
    "5": ("model_tokens", "bundled model tokens/s through the stack"),
    "6a": ("authz", "authz decision, cached, 10k tenants / 100k lines: p99"),
    "6b": ("authz", "authz decision, uncached, 10k tenants / 100k lines: p99"),
    "7a": ("reload", "policy reload of 100k lines under load: failed requests"),
    "7b": ("reload", "policy reload of 100k lines under load: p99 latency"),
    "8a": ("sealing", "sealing at 1 MiB"),
    "8b": ("sealing", "opening at 1 MiB"),
    "9": ("scrub", "scrub vs a plain memset of the same memory"),
    "10a": ("http_door", "HTTP door unary p50, 1 KiB, EchoEngine, 1 in flight"),
    "10b": ("http_door", "HTTP door unary p50, 64 in flight"),
    "10c": ("http_door", "gateway CPU per request, HTTP door, 1 in flight"),
    "10d": ("http_door", "gateway CPU per request, HTTP door, 64 in flight"),
    "10e": ("http_door", "gateway CPU per request, HTTP door, vs LiteLLM proxy"),
    "11a": ("storage", "model bundle from the local RGW, verified while streaming, vs raw GET"),
    "11b": ("storage", "cached bundle verified again vs a plain read of the same files"),
    "12a": ("capacity", "paced streams (30 tokens/s, Poisson arrivals) within inter-token p99 + 5 ms"),
    "12b": ("capacity", "gateway CPU per 1,000 relayed tokens, paced streams"),
    "13": ("processes", "requests/s, gateway.processes = 2, 64 in flight"),
}


def load(results: Path) -> dict[str, dict[str, Any]]:
    reports = {}
    for path in sorted(results.glob("*.json")):
        report = json.loads(path.read_text())
        if isinstance(report, dict) and "rows" in report and "benchmark" in report:
            reports[report["benchmark"]] = report
    return reports


def figure(value: float, unit: str) -> str:
    if unit in ("req/s", "tokens/s", "requests") or abs(value) >= 100:
        return f"{value:,.0f} {unit}"
    if abs(value) >= 10:
        return f"{value:.1f} {unit}"
    return f"{value:.3g} {unit}" if abs(value) < 1 else f"{value:.2f} {unit}"


def rows_of(reports: dict[str, dict[str, Any]]) -> list[list[str]]:
    measured = {row["id"]: (name, row) for name, report in reports.items() for row in report["rows"]}
    ids = list(EXPECTED) + sorted(set(measured) - set(EXPECTED))  # e.g. 9-cuda, on a GPU machine
    table = []
    for rid in ids:
        if rid not in measured:
            bench, what = EXPECTED[rid]
            table.append([rid, what, "—", "not measured", "—", "—", f"no {bench}.json"])
            continue
        name, row = measured[rid]
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise SystemExit(f"{name}.json row {rid} lacks {', '.join(missing)}")
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "—"
        met = "yes" if row["met"] else "**no**"
        if reports[name].get("quick"):
            met += " (quick run)"
        table.append([rid, row["what"], row["baseline"], figure(row["measured"], row["unit"]), ratio,
                      row["target"], met])  # fmt: skip
    return table


def markdown(reports: dict[str, dict[str, Any]]) -> str:
    head = ["#", "what", "baseline (same run)", "measured", "ratio", "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows_of(reports)]
    met = sum(1 for r in reports.values() for row in r["rows"] if row["met"])
    total = sum(len(r["rows"]) for r in reports.values())
    lines += [
        "",
        f"Targets met: {met} of {total} measured rows ({len(EXPECTED)} rows in the issue's table).",
        "",
    ]
    lines += ["| benchmark | date | commit | machine | load (1 min) | mode |", "|---|---|---|---|---|---|"]
    for name, r in sorted(reports.items()):
        m = r.get("machine", {})
        where = f"{m.get('cpus', '?')} CPUs, {m.get('cpu', '?')}, Python {m.get('python', '?')}"
        mode = ("quick (smoke)" if r.get("quick") else "full") + ("" if r["rows"] else ", figures only")
        load_1m = m.get("load_avg_1m")
        load_text = f"{load_1m:.2f}" if isinstance(load_1m, int | float) else "?"
        lines.append(
            f"| {name} | {r.get('date', '?')} | {r.get('commit', '?')} | {where} | {load_text} | {mode} |"
        )
    return "\n".join(lines) + "\n"


def write_doc(doc: Path, table: str) -> None:
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc}: no {BEGIN} … {END} markers to write the table between")
    before, rest = text.split(BEGIN, 1)
    _old, after = rest.split(END, 1)
    doc.write_text(f"{before}{BEGIN}\n{table}{END}{after}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-doc", action="store_true", help="print only")
    args = parser.parse_args()
    reports = load(args.results)
    table = markdown(reports)
    print(table)
    if not args.no_doc:
        write_doc(args.doc, table)
        print(f"written into {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
