#!/usr/bin/env python3
"""Side-by-side benchmark: ballast beside HAProxy, nginx stream and a direct connection.

See ../shared/BENCH.md in the project workspace for the method. Everything runs on
loopback; every variant sees the same backends and the same load generator, variants are
interleaved, and each scenario is repeated (medians are reported).

Needs (Debian): haproxy nginx libnginx-mod-stream iperf3 wrk redis-server redis-tools.
Usage:  cargo build --release && python3 benches/compare.py [--duration 10] [--reps 3]
Prints a markdown table of medians and ratios to direct, with the proxy's CPU per unit.
"""

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BALLAST = os.path.join(ROOT, "target", "release", "ballast")

# Backends and proxy front ports (loopback only).
IPERF, HTTP1, HTTP2, REDIS = 21001, 21002, 21003, 21004
FRONT = {"bulk": 22000, "http": 23000, "redis": 24000}


def wait_port(port, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def cpu_ticks(pids):
    """utime + stime of the processes, in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                m = re.search(r"VmRSS:\s+(\d+)", f.read())
                total += int(m.group(1)) if m else 0
        except OSError:
            pass
    return total


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


class Proc:
    def __init__(self, args, **kw):
        self.p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)

    def pids(self):
        return [self.p.pid] + children(self.p.pid)

    def stop(self):
        try:
            self.p.send_signal(signal.SIGTERM)
            self.p.wait(timeout=10)
        except Exception:
            self.p.kill()


def start_backends(tmp):
    procs = [Proc(["iperf3", "-s", "-p", str(IPERF), "-B", "127.0.0.1"])]
    for port in (HTTP1, HTTP2):
        conf = os.path.join(tmp, f"nginx-http-{port}.conf")
        with open(conf, "w") as f:
            f.write(f"""daemon off; worker_processes 1; pid {tmp}/nginx-http-{port}.pid;
error_log /dev/null crit;
worker_rlimit_nofile 19000;
events {{ worker_connections 9000; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{port}; location / {{ return 200 "hello from {port}\\n"; }} }} }}
""")
        procs.append(Proc(["nginx", "-c", conf, "-p", tmp]))
    procs.append(Proc(["redis-server", "--port", str(REDIS), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]))
    for port in (IPERF, HTTP1, HTTP2, REDIS):
        wait_port(port)
    return procs


def services():
    return {"bulk": [IPERF], "http": [HTTP1, HTTP2], "redis": [REDIS]}


def haproxy_conf(tmp, threads):
    lines = [f"global\n  nbthread {threads}\n  maxconn 7000\n  pidfile {tmp}/haproxy.pid\n",
             "defaults\n  mode tcp\n  option splice-auto\n  timeout connect 2s\n  timeout client 1h\n  timeout server 1h\n"]
    for name, backends in services().items():
        lines.append(f"listen {name}\n  bind 127.0.0.1:{FRONT[name]}\n  balance leastconn\n")
        lines += [f"  server b{p} 127.0.0.1:{p}\n" for p in backends]
    path = os.path.join(tmp, f"haproxy-{threads}.cfg")
    with open(path, "w") as f:
        f.write("".join(lines))
    return path


def nginx_conf(tmp, workers):
    body = [f"daemon off; worker_processes {workers}; pid {tmp}/nginx-stream.pid;\n",
            "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n",
            "error_log /dev/null crit;\nworker_rlimit_nofile 19000;\n",
            "events { worker_connections 9000; }\nstream {\n"]
    for name, backends in services().items():
        body.append(f"  upstream {name} {{ least_conn; zone {name} 64k; ")
        body += [f"server 127.0.0.1:{p}; " for p in backends]
        body.append(f"}}\n  server {{ listen 127.0.0.1:{FRONT[name]} reuseport; proxy_pass {name}; }}\n")
    body.append("}\n")
    path = os.path.join(tmp, f"nginx-stream-{workers}.conf")
    with open(path, "w") as f:
        f.write("".join(body))
    return path


def ballast_conf(tmp, threads):
    body = [f"[runtime]\nthreads = {threads}\n"]
    for name, backends in services().items():
        body.append(f"\n[[listeners]]\nname = \"{name}\"\nbind = \"127.0.0.1:{FRONT[name]}\"\nstrategy = \"least_conn\"\n")
        body += [f"\n  [[listeners.backends]]\n  addr = \"127.0.0.1:{p}\"\n" for p in backends]
    path = os.path.join(tmp, f"ballast-{threads}.toml")
    with open(path, "w") as f:
        f.write("".join(body))
    return path


def start_proxy(variant, tmp):
    kind, n = variant.rsplit("-", 1)
    if kind == "haproxy":
        return Proc(["haproxy", "-db", "-f", haproxy_conf(tmp, n)])
    if kind == "nginx":
        return Proc(["nginx", "-c", nginx_conf(tmp, n), "-p", tmp])
    if kind == "ballast":
        return Proc([BALLAST, "--log-level", "error", "run", "--config", ballast_conf(tmp, n)])
    raise ValueError(variant)


def port_for(variant, scenario):
    if variant == "direct":
        return {"bulk": IPERF, "http": HTTP1, "redis": REDIS}[scenario]
    return FRONT[scenario]


def run_bulk(port, duration, streams):
    out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(duration), "-P", str(streams), "-J"],
                         capture_output=True, text=True, timeout=duration + 30).stdout
    import json
    data = json.loads(out)
    end = data["end"]
    bits = end["sum_received"]["bits_per_second"]
    return bits / 1e9, end["sum_received"]["bytes"] / 1e9  # Gbit/s, GB


def run_wrk(port, duration, close):
    args = ["wrk", "-t2", "-c64", f"-d{duration}s", "--latency", f"http://127.0.0.1:{port}/"]
    if close:
        args[1:1] = ["-H", "Connection: close"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=duration + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    reqs = int(re.search(r"(\d+) requests in", out).group(1))

    def lat(p):
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    return rps, reqs, lat(50), lat(99)


def run_redis(port):
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-t", "get", "-n", "200000", "-q"],
                         capture_output=True, text=True, timeout=120).stdout
    m = re.findall(r"GET: ([\d.]+) requests per second", out)
    return float(m[-1]), 200000


def idle_memory(port, pids, n=5000):
    before = rss_kib(pids)
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port))
            socks.append(s)
        time.sleep(1.0)
        after = rss_kib(pids)
    finally:
        for s in socks:
            s.close()
    return (after - before) / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--scenarios", default="bulk1,bulk4,http,connect,redis,idle")
    ap.add_argument("--variants", default="direct,haproxy-1,haproxy-2,nginx-1,nginx-2,ballast-1,ballast-2")
    args = ap.parse_args()
    for tool in ("haproxy", "nginx", "iperf3", "wrk", "redis-server", "redis-benchmark"):
        if not shutil.which(tool):
            sys.exit(f"missing {tool}: apt-get install haproxy nginx libnginx-mod-stream iperf3 wrk redis-server redis-tools")
    if not os.path.exists(BALLAST):
        sys.exit("build first: cargo build --release")
    tmp = tempfile.mkdtemp(prefix="ballast-bench-")
    backends = start_backends(tmp)
    results = {}  # (scenario, variant) -> list of dicts
    try:
        for scenario in args.scenarios.split(","):
            for rep in range(args.reps):
                for variant in args.variants.split(","):
                    if scenario == "idle" and (variant == "direct" or rep > 0):
                        continue
                    proxy = None if variant == "direct" else start_proxy(variant, tmp)
                    try:
                        port = port_for(variant, {"bulk1": "bulk", "bulk4": "bulk", "http": "http", "connect": "http", "redis": "redis", "idle": "http"}[scenario])
                        wait_port(port)
                        pids = proxy.pids() if proxy else []
                        cpu0 = cpu_ticks(pids)
                        r = {}
                        if scenario in ("bulk1", "bulk4"):
                            gbps, gb = run_bulk(port, args.duration, 1 if scenario == "bulk1" else 4)
                            r = {"value": gbps, "unit_count": gb}
                        elif scenario in ("http", "connect"):
                            rps, reqs, p50, p99 = run_wrk(port, args.duration, scenario == "connect")
                            r = {"value": rps, "unit_count": reqs, "p50": p50, "p99": p99}
                        elif scenario == "redis":
                            ops, n = run_redis(port)
                            r = {"value": ops, "unit_count": n}
                        elif scenario == "idle":
                            r = {"value": idle_memory(port, pids), "unit_count": 0}
                        r["cpu"] = cpu_ticks(proxy.pids() if proxy else []) - cpu0
                        results.setdefault((scenario, variant), []).append(r)
                        print(f"{scenario} {variant} rep {rep}: {r}", file=sys.stderr, flush=True)
                    finally:
                        if proxy:
                            proxy.stop()
                            time.sleep(0.3)
    finally:
        for b in backends:
            b.stop()
    report(results, args)


def report(results, args):
    units = {"bulk1": ("Gbit/s", "ms CPU/GB", 1e3), "bulk4": ("Gbit/s", "ms CPU/GB", 1e3),
             "http": ("req/s", "us CPU/req", 1e6), "connect": ("req/s", "us CPU/conn", 1e6),
             "redis": ("GET/s", "us CPU/op", 1e6), "idle": ("KiB/conn", "", 0)}
    print(f"\nduration {args.duration}s, medians of {args.reps}\n")
    print("| scenario | variant | result | ratio to direct | proxy CPU per unit | p50 / p99 ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for scenario in args.scenarios.split(","):
        unit, cpu_unit, scale = units[scenario]
        direct = results.get((scenario, "direct"))
        direct_value = statistics.median(r["value"] for r in direct) if direct else None
        for variant in args.variants.split(","):
            rs = results.get((scenario, variant))
            if not rs:
                continue
            value = statistics.median(r["value"] for r in rs)
            ratio = f"{value / direct_value:.2f}" if direct_value and scenario != "idle" else ""
            cpu = ""
            if scale and variant != "direct":
                cpu = f"{statistics.median(r['cpu'] / max(r['unit_count'], 1e-9) * scale for r in rs):.1f} {cpu_unit}"
            lat = ""
            if "p50" in rs[0]:
                lat = f"{statistics.median(r['p50'] for r in rs):.2f} / {statistics.median(r['p99'] for r in rs):.2f}"
            print(f"| {scenario} | {variant} | {value:,.2f} {unit} | {ratio} | {cpu} | {lat} |")


if __name__ == "__main__":
    main()
