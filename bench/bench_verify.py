"""Cost of verifying one signed op (docs/SAFETY.md §7 steps 1-11), threshold 1 and threshold 2.

Usage: python bench/bench_verify.py [--runs 2000]

Each run verifies the same envelope from scratch: caps, payload type, Ed25519 per signature (OpenSSL
through cryptography), strict payload parse, audience, time, role, signers, revocations and, for the
DESTRUCTIVE op, the HMAC challenge. The trust store is loaded once, as the gate holds it in memory.
Prints a Markdown table of median and p99 microseconds per verify; the issue's target is under 1 ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from safety import signedop
from safety.truststore import TrustStore, load
from tests.signing import AUDIENCE, NOW, SECRET, approval_op, default_doc, encode, op, seal, write_store


def timings(env: signedop.Envelope, store: TrustStore, runs: int) -> list[float]:
    """Seconds per verify() of ``env``, ``runs`` times (after a warm-up)."""
    for _ in range(50):
        signedop.verify(env, store, now=NOW, audience=AUDIENCE, challenge_key=SECRET)
    result = []
    for _ in range(runs):
        started = time.perf_counter()
        signedop.verify(env, store, now=NOW, audience=AUDIENCE, challenge_key=SECRET)
        result.append(time.perf_counter() - started)
    return result


def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        store = load(write_store(Path(directory), default_doc()))
    cases = [
        ("threshold 1 (APPROVAL disk.resize, 1 signature)", seal(encode(approval_op()), "carol")),
        ("threshold 2 (DESTRUCTIVE guest.destroy, 2 signatures, challenge)", seal(encode(op()), "alice", "bob")),
    ]
    print("| op | runs | median µs | p99 µs |\n|---|---|---|---|")
    for name, env in cases:
        samples = sorted(timings(env, store, args.runs))
        p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
        print(f"| {name} | {args.runs} | {statistics.median(samples) * 1e6:.0f} | {p99 * 1e6:.0f} |")


if __name__ == "__main__":
    main()
