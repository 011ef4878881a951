#!/usr/bin/env python3
"""How long an upgrade of many idle connections takes, and the longest pause one saw.

Runs the measurement in tests/upgrade.rs (`measure_an_upgrade_of_idle_connections`,
ignored in the test suite) in release, REPS times, and prints each run and the medians:
- sigquit_to_old_gone_ms: from SIGQUIT to the old process's exit;
- took_ms: the hand-over of the established connections alone (the old process's log);
- the longest wait for an echo per connection (each pings every 500 ms): before the
  upgrade (baseline) and from the new process's start on (through the upgrade).

Usage: benches/handover.py [--conns 5000] [--reps 3]. Output also in .bench/handover.txt.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_run(conns):
    env = dict(os.environ, BALLAST_IDLE_CONNS=str(conns))
    out = subprocess.run(
        ["cargo", "test", "--release", "--test", "upgrade",
         "measure_an_upgrade_of_idle_connections", "--", "--ignored", "--nocapture"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    line = next((l for l in out.stderr.splitlines() if l.startswith("IDLE-UPGRADE")), None)
    if line is None:
        sys.exit("the measurement failed:\n" + out.stderr[-4000:])
    return line


def figures(line):
    def num(pattern):
        return float(re.search(pattern, line).group(1))
    return {
        "sigquit_to_old_gone_ms": num(r"sigquit_to_old_gone_ms=(\d+)"),
        "handover_ms": num(r"took_ms=(\d+)"),
        "baseline_max_ms": num(r"baseline max=([\d.]+)"),
        "upgrade_max_ms": num(r"through the upgrade max=([\d.]+)"),
        "upgrade_p99_ms": num(r"through the upgrade max=[\d.]+ p99=([\d.]+)"),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--conns", type=int, default=5000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    lines = [one_run(args.conns) for _ in range(args.reps)]
    runs = [figures(l) for l in lines]
    report = list(lines)
    report.append(f"medians of {args.reps} runs, {args.conns} idle connections:")
    for key in runs[0]:
        report.append(f"  {key}: {statistics.median(r[key] for r in runs):.1f}")
    text = "\n".join(report)
    print(text)
    os.makedirs(os.path.join(ROOT, ".bench"), exist_ok=True)
    with open(os.path.join(ROOT, ".bench", "handover.txt"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
