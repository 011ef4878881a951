#!/usr/bin/env python3
"""What the PROXY protocol costs ballast per new connection: plain, a v2 header sent to
the backend, a v2 header accepted from an upstream, measured alternately in one run.

Every variant has the same path, so only ballast's own work differs:
    wrk (Connection: close) -> HAProxy (nbthread 1) -> ballast (threads 1) -> nginx HTTP
- plain:  HAProxy sends no header; ballast sends none; nginx listens plain.
- send:   ballast has send_proxy = "v2"; nginx listens with proxy_protocol.
- accept: HAProxy sends a v2 header (send-proxy-v2); ballast has accept_proxy = "v2".
Only ballast's CPU is counted (its /proc figures), per connection; ratios are to plain
in the same run.

Usage: cargo build --release && python3 benches/proxy_protocol.py [--duration 5] [--reps 3]
Needs haproxy, nginx and wrk (Debian: apt-get install haproxy nginx wrk).
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as c  # noqa: E402

VARIANTS = ("plain", "send", "accept")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ballast", default=os.path.join(c.ROOT, "target", "release", "ballast"))
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    bench = c.Bench(argparse.Namespace(pin=False, kit=None, ballast=args.ballast, duration=args.duration,
                                       backend_cores="", load_cores=""))
    plain_port, pp_port = c.free_port(), c.free_port()
    procs = []

    def start(variant):
        """HAProxy in front of ballast for `variant`: (front port, ballast's Proc)."""
        front, middle = c.free_port(), c.free_port()
        backend = pp_port if variant == "send" else plain_port
        extra = {"plain": "", "send": 'send_proxy = "v2"\n',
                 "accept": 'accept_proxy = "v2"\ntrusted_proxies = ["127.0.0.1"]\n'}[variant]
        conf = bench.write(f"ballast-{variant}.toml",
                           f"[runtime]\nthreads = 1\nshutdown_timeout = \"2s\"\n\n[[listeners]]\nname = \"web\"\n"
                           f"bind = \"127.0.0.1:{middle}\"\n{extra}\n  [[listeners.backends]]\n"
                           f"  addr = \"127.0.0.1:{backend}\"\n")
        b = c.Proc(f"ballast-{variant}", [bench.ballast, "--log-level", "error", "run", "--config", conf], bench.tmp)
        c.wait_port(middle, b)
        send = " send-proxy-v2" if variant == "accept" else ""
        hconf = bench.write(f"haproxy-{variant}.cfg",
                            "global\n  nbthread 1\n  maxconn 7000\ndefaults\n  mode tcp\n  timeout connect 2s\n"
                            f"  timeout client 1h\n  timeout server 1h\nlisten front\n  bind 127.0.0.1:{front}\n"
                            f"  server b 127.0.0.1:{middle}{send}\n")
        h = c.Proc(f"haproxy-{variant}", [bench.tool("haproxy"), "-db", "-f", hconf], bench.tmp)
        c.wait_port(front, h)
        return front, b, h

    results = {v: [] for v in VARIANTS}
    try:
        procs.append(c.nginx_hello(bench, "nginx-plain", plain_port))
        procs.append(c.nginx_hello(bench, "nginx-pp", pp_port, proxy_protocol=True))
        for rep in range(args.reps):
            for variant in VARIANTS:
                front, b, h = start(variant)
                try:
                    cpu0 = c.cpu_seconds(b.pids())
                    r = c.run_wrk(bench, front, True)
                    r["cpu"] = c.cpu_seconds(b.pids()) - cpu0
                finally:
                    h.stop()
                    b.stop()
                c.note_rep(results, variant, rep, r)
    finally:
        for p in procs:
            p.stop()

    def per_conn(v):
        return c.cpu_us_per_unit(results[v])

    base = per_conn("plain")
    print("| variant | connections/s | ballast CPU us per connection | / plain |")
    print("| --- | --- | --- | --- |")
    for v in VARIANTS:
        rate = statistics.median(r["value"] for r in results[v])
        print(f"| {v} | {rate:,.0f} | {per_conn(v):.1f} | {per_conn(v) / base:.2f} |")


if __name__ == "__main__":
    main()
