#!/usr/bin/env python3
"""What [cluster] costs ballast per new connection, off and on, measured alternately in
one run, and the load each instance puts on Redis.

    wrk (Connection: close) -> ballast (threads 1, least_conn, 3 backends) -> nginx HTTP

- off: no [cluster].
- on:  [cluster] with a Redis of the bench's own (report_interval 1s, the default).
Only ballast's CPU is counted (its /proc figures), per connection; the ratio is to off
in the same run. Redis's load, per second, for this one instance: round trips (the
script's EVALSHA calls) and commands (`total_commands_processed`, which counts the
script's own calls inside Redis too: 5 plus one per peer per round).

Usage: cargo build --release && python3 benches/cluster.py [--duration 5] [--reps 3]
Needs nginx, wrk and redis-server (Debian: apt-get install nginx wrk redis-server).
"""

import argparse
import os
import re
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as c  # noqa: E402

VARIANTS = ("off", "on")


def redis_counts(port):
    """(total_commands_processed, EVALSHA calls) of the Redis on `port`; asking is itself
    one command."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"INFO all\r\n")
        data = b""
        while b"# Keyspace" not in data or not data.endswith(b"\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    total = int(re.search(rb"total_commands_processed:(\d+)", data).group(1))
    evalsha = re.search(rb"cmdstat_evalsha:calls=(\d+)", data)
    return total, int(evalsha.group(1)) if evalsha else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ballast", default=os.path.join(c.ROOT, "target", "release", "ballast"))
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    bench = c.Bench(argparse.Namespace(pin=False, kit=None, ballast=args.ballast, duration=args.duration,
                                       backend_cores="", load_cores=""))
    redis_port = c.free_port()
    backends = [c.free_port() for _ in range(3)]
    procs = []

    def start(variant):
        port = c.free_port()
        cluster = (f"[cluster]\nredis = \"redis://127.0.0.1:{redis_port}/0\"\ninstance = \"bench\"\n\n"
                   if variant == "on" else "")
        listed = "".join(f"\n  [[listeners.backends]]\n  addr = \"127.0.0.1:{b}\"\n" for b in backends)
        conf = bench.write(f"ballast-{variant}.toml",
                           f"[runtime]\nthreads = 1\nshutdown_timeout = \"2s\"\n\n{cluster}[[listeners]]\n"
                           f"name = \"web\"\nbind = \"127.0.0.1:{port}\"\nstrategy = \"least_conn\"\n{listed}")
        b = c.Proc(f"ballast-{variant}", [bench.ballast, "--log-level", "error", "run", "--config", conf],
                   bench.tmp)
        c.wait_port(port, b)
        return port, b

    results = {v: [] for v in VARIANTS}
    try:
        for port in backends:
            procs.append(c.nginx_hello(bench, f"nginx-{port}", port))
        redis = c.Proc("redis", [bench.tool("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1",
                                 "--save", "", "--appendonly", "no"], bench.tmp)
        procs.append(redis)
        c.wait_port(redis_port, redis)
        for rep in range(args.reps):
            for variant in VARIANTS:
                port, b = start(variant)
                try:
                    time.sleep(1.5)  # the first report rounds
                    cpu0, (cmd0, rt0), t0 = c.cpu_seconds(b.pids()), redis_counts(redis_port), time.monotonic()
                    r = c.run_wrk(bench, port, True)
                    r["cpu"] = c.cpu_seconds(b.pids()) - cpu0
                    (cmd1, rt1), took = redis_counts(redis_port), time.monotonic() - t0
                    # Less the INFO command this bench itself sent.
                    r["redis_per_s"] = (cmd1 - cmd0 - 1) / took
                    r["round_trips_per_s"] = (rt1 - rt0) / took
                finally:
                    b.stop()
                c.note_rep(results, variant, rep, r)
    finally:
        for p in procs:
            p.stop()

    def per_conn(v):
        return c.cpu_us_per_unit(results[v])

    base = per_conn("off")
    print("| [cluster] | connections/s | ballast CPU us per connection | / off | Redis round trips/s | Redis commands/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for v in VARIANTS:
        rate = statistics.median(r["value"] for r in results[v])
        redis_rate = statistics.median(r["redis_per_s"] for r in results[v])
        trips = statistics.median(r["round_trips_per_s"] for r in results[v])
        print(f"| {v} | {rate:,.0f} | {per_conn(v):.1f} | {per_conn(v) / base:.2f} | {trips:.2f} | {redis_rate:.2f} |")


if __name__ == "__main__":
    main()
