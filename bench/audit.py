"""Audit trail cost: records/s and per-record latency for each fsync policy, with Ed25519 chain-head
signing every 1000 records, on the disk under --dir; then `verify_log` speed over what was written.
Prints a table and writes bench/results/audit.json. The machines are shared and noisy: compare
figures within one run, and note the disk (tmpfs vs a real one) when quoting them.

    python bench/audit.py [--quick] [--records 20000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import RESULTS, write_report  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: E402

from control.audit_verify import verify_log  # noqa: E402
from gateway.audit import AuditLog  # noqa: E402
from gateway.config import AuditConfig  # noqa: E402

FIELDS = {
    "decision": "allow", "subject": "acme/alice", "method": "jwt", "home_tenant": "acme", "tenant": "acme",
    "resource": "model:smollm2", "action": "generate", "rule_line": 12, "generation": 3,
    "peer": "127.0.0.1", "rpc": "/airlock.v1.Inference/Generate", "decision_us": 4.2,
}  # fmt: skip


def run(policy: str, records: int, directory: Path, key: ed25519.Ed25519PrivateKey) -> dict[str, float]:
    path = directory / policy / "gateway.jsonl"
    config = AuditConfig(fsync=policy, sign_every_records=1000, sign_every_seconds=0, rotate_bytes=0)
    log = AuditLog(path, config=config, signing_key=key)
    latencies = []
    start = time.perf_counter()
    for _ in range(records):
        t = time.perf_counter()
        log.record("authorization", **FIELDS)
        latencies.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    log.close()
    t = time.perf_counter()
    report = verify_log(path, key.public_key())
    verify = time.perf_counter() - t
    assert report.ok and report.records == records, report.problems
    latencies.sort()
    return {
        "records_per_s": records / elapsed,
        "p50_us": statistics.median(latencies) * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
        "verify_records_per_s": records / verify,
        "bytes_per_record": path.stat().st_size / records,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1,000 records (smoke test)")
    p.add_argument("--records", type=int, default=20000)
    p.add_argument("--dir", type=Path, help="where to write (default: a temporary directory)")
    p.add_argument("--out", type=Path, default=RESULTS / "audit.json")
    args = p.parse_args()
    if args.quick:
        args.records = 1000
    key = ed25519.Ed25519PrivateKey.generate()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for policy in ("never", "interval", "always"):
            count = args.records if policy != "always" else max(1, args.records // 10)
            results[policy] = run(policy, count, Path(tmp), key)
    print(f"{'fsync':<10}{'records/s':>12}{'p50 µs':>10}{'p99 µs':>10}{'verify rec/s':>14}{'bytes/rec':>11}")
    for policy, r in results.items():
        print(
            f"{policy:<10}{r['records_per_s']:>12.0f}{r['p50_us']:>10.1f}{r['p99_us']:>10.1f}"
            f"{r['verify_records_per_s']:>14.0f}{r['bytes_per_record']:>11.0f}"
        )
    # No row of the table: figures only, listed under the table by bench/report.py.
    write_report(args.out, "audit", [], {"records": args.records, **results}, quick=args.quick)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
