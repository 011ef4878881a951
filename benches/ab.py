#!/usr/bin/env python3
"""Two ballast builds measured alternately in one run: which one costs less.

On a small shared machine a figure moves by 5-10% between runs of compare.py, more than
most changes save. Measured alternately (A, B, A, B, ...) against the same backends and
load generator, two builds see the same noise, and the medians tell them apart.

Usage:
  python3 benches/ab.py OLD_BINARY NEW_BINARY [--only http,connect] [--threads 1,2] [--reps 4]
Prints, per scenario and thread count, each build's median proxy CPU per unit (us per
request or connection, ms per GB) and median p99, and new/old.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as C  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--only", default="http,connect")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--duration", type=int, default=5)
    args = ap.parse_args()
    bench = C.Bench(argparse.Namespace(pin=False, kit=None, ballast=args.old, duration=args.duration,
                                       reps=args.reps, backend_cores="", load_cores="",
                                       idle_conns=5000))
    backends = bench.start_backends()
    scale = {"http": 1e6, "connect": 1e6, "redis": 1e6}
    try:
        for scenario in args.only.split(","):
            service = C.service_of(scenario)
            for threads in (int(t) for t in args.threads.split(",")):
                results = {args.old: [], args.new: []}
                for _ in range(args.reps):
                    for binary in (args.old, args.new):
                        bench.ballast = binary
                        proxy = bench.start_proxy("ballast", threads)
                        try:
                            C.wait_port(bench.front[service], proxy)
                            results[binary].append(C.measure(bench, scenario, bench.front[service], proxy))
                        finally:
                            proxy.stop()
                            time.sleep(0.3)
                cost = {b: statistics.median(r["cpu"] / max(r["units"], 1e-12) * scale.get(scenario, 1e3)
                                             for r in rs) for b, rs in results.items()}
                p99 = {b: statistics.median(r.get("p99", 0.0) for r in rs) for b, rs in results.items()}
                unit = "ms per GB" if scenario.startswith("bulk") else "us per unit"
                print(f"{scenario} T={threads}: CPU {unit} {cost[args.old]:.2f} -> {cost[args.new]:.2f} "
                      f"(x{cost[args.new] / cost[args.old]:.3f}); p99 ms {p99[args.old]} -> {p99[args.new]}",
                      flush=True)
    finally:
        for b in backends:
            b.stop()


if __name__ == "__main__":
    main()
