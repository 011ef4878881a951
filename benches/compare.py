#!/usr/bin/env python3
"""Side-by-side benchmark: ballast beside HAProxy, nginx stream and a direct connection.

The method (see ../shared/BENCH.md in the project workspace): everything runs on
loopback; every variant sees the same backends and the same load generator; variants are
interleaved and each scenario is repeated (medians are reported). Each thread count is
its own variant and is quoted on its own row, never "the better of": ballast with
`runtime.threads = T`, HAProxy with `nbthread T`, nginx with T workers. Per figure the
table gives ballast / HAProxy and ballast / nginx at the same T (below 1 is better for
CPU, p99 and memory; above 1 is better for throughput), and ballast at T / ballast at 1.

Two modes:
- default: peers from the system (Debian: haproxy nginx libnginx-mod-stream iperf3 wrk
  redis-server redis-tools), nothing pinned, T = 1, 2. For a small shared machine, where
  the proxy's CPU per unit is the fairest figure.
- --pin: for a many-core machine (the method of ../shared/bench/scale.py): the proxy is
  pinned with taskset to cores 0..T-1 (T = 1, 2, 4), backends to cores 4-9, load
  generators to cores 10-15; peers come from a kit (--kit DIR, with bin/ and lib/ as
  ../shared/bench/make-peer-kit.sh packs them).

Usage:
  cargo build --release && python3 benches/compare.py [--duration 10] [--reps 3]
  python3 benches/compare.py --pin --kit .bench/kit --ballast .bench/ballast
  (--pin runs 10 variants per scenario: split a long run with --only to fit a time limit)
Options: --only http,connect,idle   --threads 1,2   --idle-conns 5000   --json FILE
Scenarios: bulkN (iperf3 -P N), http (wrk keep-alive), connect (wrk, Connection: close),
redis (redis-benchmark GET), idle (RSS growth per idle connection).
"""

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROXIES = ("ballast", "haproxy", "nginx")
NAMES = {"ballast": "ballast", "haproxy": "HAProxy", "nginx": "nginx", "direct": "direct"}


# ------------------------------------------------------------------ processes and /proc

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_cores(spec):
    """"4-9" or "4,5,6" or "1" -> [4, ..., 9]."""
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def cores_arg(cores):
    return ",".join(str(c) for c in cores)


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def cpu_seconds(pids):
    """utime + stime of the processes (all their threads)."""
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


def open_fds(pids):
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return total


class Proc:
    """A started program whose output goes to a log file in the run's folder."""

    def __init__(self, name, args, tmp, env=None, workers=0):
        self.name, self.log, self.workers = name, os.path.join(tmp, f"{name}.log"), workers
        with open(self.log, "w") as log:
            self.p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def pids(self):
        """The process and its children (nginx's master and workers)."""
        return [self.p.pid] + children(self.p.pid)

    def log_tail(self):
        with open(self.log) as f:
            return f.read()[-800:]

    def stop(self):
        try:
            os.killpg(self.p.pid, signal.SIGTERM)
            self.p.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except OSError:
                pass
            self.p.wait()


def wait_port(port, proc=None, timeout=10.0):
    """Until the port accepts and, for a master that forks workers (nginx), every worker
    runs: the listening socket exists before the workers, whose CPU and memory count."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                if not proc or len(children(proc.p.pid)) >= proc.workers:
                    return
        except OSError:
            if proc and proc.p.poll() is not None:
                break
        time.sleep(0.05)
    tail = f"\n--- {proc.name}:\n{proc.log_tail()}" if proc else ""
    raise RuntimeError(f"nothing listens on {port}{tail}")


# ------------------------------------------------------------------ the bench: tools, cores, configs

class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="ballast-bench-")
        self.ballast = args.ballast
        if args.kit:
            lib = os.path.join(args.kit, "lib")
            self.env = dict(os.environ, LD_LIBRARY_PATH=lib)  # for the peers only, not ballast
            self.stream_module = os.path.join(lib, "ngx_stream_module.so")
        else:
            self.env = None
            self.stream_module = "/usr/lib/nginx/modules/ngx_stream_module.so"
        self.backend_cores = parse_cores(args.backend_cores) if args.pin else []
        self.load_cores = parse_cores(args.load_cores) if args.pin else []
        # Ports: backends, then one front port per service (a proxy at a time listens on them).
        self.iperf, self.http1, self.http2, self.redis = (free_port() for _ in range(4))
        self.front = {name: free_port() for name in ("bulk", "http", "redis")}

    def tool(self, name):
        if self.args.kit:
            return os.path.join(self.args.kit, "bin", name)
        return shutil.which(name) or name

    def pinned(self, cores, argv):
        return ["taskset", "-c", cores_arg(cores)] + argv if cores else argv

    def proxy_cores(self, threads):
        return list(range(threads)) if self.args.pin else []

    def run_load(self, argv, timeout):
        """A load generator, on the load cores in --pin mode; its stdout."""
        return subprocess.run(self.pinned(self.load_cores, argv), capture_output=True, text=True,
                              timeout=timeout, env=self.env).stdout

    def services(self):
        return {"bulk": [self.iperf], "http": [self.http1, self.http2], "redis": [self.redis]}

    def direct_port(self, service):
        return self.services()[service][0]

    def write(self, name, text):
        path = os.path.join(self.tmp, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    # nginx runs as root's workers when started as root (no www-data on a bare machine);
    # its temp and log paths point into the run's folder.
    def nginx_head(self, name, workers):
        user = "user root;\n" if os.geteuid() == 0 else ""
        return (f"{user}daemon off; worker_processes {workers}; pid {self.tmp}/{name}.pid;\n"
                f"error_log {self.tmp}/{name}.err error;\nworker_rlimit_nofile 19000;\n"
                "events { worker_connections 9000; }\n")

    def start_backends(self):
        b = self.backend_cores
        procs = [Proc("iperf3", self.pinned(b, [self.tool("iperf3"), "-s", "-p", str(self.iperf), "-B", "127.0.0.1"]),
                      self.tmp, self.env)]
        workers = max(1, len(b) // 2)  # two HTTP backends share the backend cores
        for port in (self.http1, self.http2):
            name = f"nginx-http-{port}"
            temp = " ".join(f"{k}_temp_path {self.tmp}/{k}-{port};" for k in
                            ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
            conf = self.write(f"{name}.conf", self.nginx_head(name, workers) +
                              f"http {{ access_log off; keepalive_requests 10000000; {temp}\n"
                              f"  server {{ listen 127.0.0.1:{port} backlog=65535;\n"
                              f"    location / {{ return 200 \"hello from {port}\\n\"; }} }} }}\n")
            procs.append(Proc(name, self.pinned(b, [self.tool("nginx"), "-e", f"{self.tmp}/{name}.err",
                                                     "-c", conf, "-p", self.tmp]), self.tmp, self.env))
        procs.append(Proc("redis", self.pinned(b, [self.tool("redis-server"), "--port", str(self.redis), "--bind",
                                                    "127.0.0.1", "--save", "", "--appendonly", "no"]),
                          self.tmp, self.env))
        for proc, port in zip(procs, (self.iperf, self.http1, self.http2, self.redis)):
            wait_port(port, proc)
        return procs

    def start_proxy(self, kind, threads):
        cores = self.proxy_cores(threads)
        if kind == "haproxy":
            lines = [f"global\n  nbthread {threads}\n  maxconn 7000\n",
                     "defaults\n  mode tcp\n  option splice-auto\n  timeout connect 2s\n"
                     "  timeout client 1h\n  timeout server 1h\n"]
            for name, backends in self.services().items():
                lines.append(f"listen {name}\n  bind 127.0.0.1:{self.front[name]}\n  balance leastconn\n")
                lines += [f"  server b{p} 127.0.0.1:{p}\n" for p in backends]
            conf = self.write(f"haproxy-{threads}.cfg", "".join(lines))
            return Proc(f"haproxy-{threads}", self.pinned(cores, [self.tool("haproxy"), "-db", "-f", conf]),
                        self.tmp, self.env)
        if kind == "nginx":
            name = f"nginx-stream-{threads}"
            body = [f"load_module {self.stream_module};\n", self.nginx_head(name, threads), "stream {\n"]
            for service, backends in self.services().items():
                body.append(f"  upstream {service} {{ least_conn; zone {service} 64k; ")
                body += [f"server 127.0.0.1:{p}; " for p in backends]
                body.append(f"}}\n  server {{ listen 127.0.0.1:{self.front[service]} reuseport backlog=65535; "
                            f"proxy_pass {service}; }}\n")
            body.append("}\n")
            conf = self.write(f"{name}.conf", "".join(body))
            return Proc(name, self.pinned(cores, [self.tool("nginx"), "-e", f"{self.tmp}/{name}.err",
                                                  "-c", conf, "-p", self.tmp]), self.tmp, self.env, workers=threads)
        if kind == "ballast":
            body = [f"[runtime]\nthreads = {threads}\nshutdown_timeout = \"2s\"\n"]
            for name, backends in self.services().items():
                body.append(f"\n[[listeners]]\nname = \"{name}\"\nbind = \"127.0.0.1:{self.front[name]}\"\n"
                            "strategy = \"least_conn\"\n")
                body += [f"\n  [[listeners.backends]]\n  addr = \"127.0.0.1:{p}\"\n" for p in backends]
            conf = self.write(f"ballast-{threads}.toml", "".join(body))
            return Proc(f"ballast-{threads}", self.pinned(cores, [self.ballast, "--log-level", "error", "run",
                                                                  "--config", conf]), self.tmp)
        raise ValueError(kind)


# ------------------------------------------------------------------ scenarios
# Each returns {"value": the scenario's throughput (or KiB/conn), "units": what the proxy's
# CPU is divided by, ...}; the caller adds the proxy's CPU seconds.

SERVICE = {"http": "http", "connect": "http", "redis": "redis", "idle": "http"}


def nginx_hello(bench, name, port, proxy_protocol=False):
    """An nginx (one worker) answering 200 "hello" on 127.0.0.1:`port`, with the PROXY
    protocol when asked; started and listening."""
    listen = f"127.0.0.1:{port} backlog=65535" + (" proxy_protocol" if proxy_protocol else "")
    temp = " ".join(f"{k}_temp_path {bench.tmp}/{k}-{port};" for k in
                    ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = bench.write(f"{name}.conf", bench.nginx_head(name, 1) +
                       f"http {{ access_log off; {temp}\n  server {{ listen {listen};\n"
                       f"    location / {{ return 200 \"hello\\n\"; }} }} }}\n")
    p = Proc(name, [bench.tool("nginx"), "-e", f"{bench.tmp}/{name}.err", "-c", conf, "-p", bench.tmp], bench.tmp)
    wait_port(port, p)
    return p


def note_rep(results, variant, rep, r):
    """Keeps one repetition's result of `variant`, saying it (and its errors) on stderr."""
    if r.get("errors"):
        print(f"{variant} rep {rep}: errors: {r['errors']}", file=sys.stderr)
    print(f"{variant} rep {rep}: {r}", file=sys.stderr, flush=True)
    results[variant].append(r)


def cpu_us_per_unit(runs):
    """The median over `runs` of CPU microseconds per unit (connection, request)."""
    return statistics.median(r["cpu"] / r["units"] * 1e6 for r in runs)


def service_of(scenario):
    return "bulk" if scenario.startswith("bulk") else SERVICE[scenario]


def run_bulk(bench, port, streams):
    d = bench.args.duration
    out = bench.run_load([bench.tool("iperf3"), "-c", "127.0.0.1", "-p", str(port), "-t", str(d),
                          "-P", str(streams), "-J"], d + 30)
    end = json.loads(out)["end"]["sum_received"]
    return {"value": end["bits_per_second"] / 1e9, "units": end["bytes"] / 1e9}  # Gbit/s, GB


def run_wrk(bench, port, close):
    d = bench.args.duration
    if bench.args.pin:  # one wrk thread per load core; more connections to keep T = 4 busy
        threads, conns = len(bench.load_cores), (64 if close else 256)
    else:
        threads, conns = 2, 64
    argv = [bench.tool("wrk"), f"-t{threads}", f"-c{conns}", f"-d{d}s", "--latency", f"http://127.0.0.1:{port}/"]
    if close:
        argv[1:1] = ["-H", "Connection: close"]
    out = bench.run_load(argv, d + 30)
    reqs = int(re.search(r"(\d+) requests in", out).group(1))

    def latency_ms(p):
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)\b", out)
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)] if m else float("nan")

    errors = re.findall(r"(Socket errors: .*|Non-2xx or 3xx responses: \d+)", out)
    r = {"value": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "units": reqs,
         "p50": latency_ms(50), "p99": latency_ms(99)}
    if errors:
        r["errors"] = "; ".join(errors)
    return r


def run_redis(bench, port):
    n = 200000
    out = bench.run_load([bench.tool("redis-benchmark"), "-p", str(port), "-t", "get", "-n", str(n), "-q"], 300)
    return {"value": float(re.findall(r"GET: ([\d.]+) requests per second", out)[-1]), "units": n}


def run_idle(bench, port, pids):
    """RSS growth of a fresh proxy per idle connection, once every connection reached a backend."""
    n = bench.args.idle_conns
    rss0, fds0 = rss_kib(pids), open_fds(pids)
    socks = []
    try:
        for _ in range(n):
            socks.append(socket.create_connection(("127.0.0.1", port)))
        deadline = time.time() + 20
        while open_fds(pids) < fds0 + 2 * n and time.time() < deadline:  # client side + backend side
            time.sleep(0.1)
        time.sleep(0.5)  # let lazily touched pages settle
        return {"value": (rss_kib(pids) - rss0) / n, "units": 0, "fds": open_fds(pids) - fds0}
    finally:
        for s in socks:
            s.close()


def measure(bench, scenario, port, proxy):
    pids = proxy.pids() if proxy else []
    cpu0 = cpu_seconds(pids)
    if scenario.startswith("bulk"):
        r = run_bulk(bench, port, int(scenario[4:] or 1))
    elif scenario in ("http", "connect"):
        r = run_wrk(bench, port, scenario == "connect")
    elif scenario == "redis":
        r = run_redis(bench, port)
    elif scenario == "idle":
        r = run_idle(bench, port, pids)
    else:
        raise ValueError(scenario)
    r["cpu"] = cpu_seconds(proxy.pids() if proxy else []) - cpu0
    return r


# ------------------------------------------------------------------ the report

# (scenario, figure, label, how to read it from a list of repetitions)
def median(key):
    return lambda rs: statistics.median(r[key] for r in rs)


def cpu_per(scale):
    return lambda rs: statistics.median(r["cpu"] / max(r["units"], 1e-12) * scale for r in rs)


def figures(scenario):
    if scenario.startswith("bulk"):
        n = scenario[4:] or "1"
        return [(f"bulk Gbit/s, {n} stream(s)", median("value"), True),
                (f"CPU ms per GB, {n} stream(s)", cpu_per(1e3), False)]
    return {
        "http": [("keep-alive req/s", median("value"), True),
                 ("CPU us per keep-alive request", cpu_per(1e6), False),
                 ("keep-alive p99 ms", median("p99"), False)],
        "connect": [("new connections/s", median("value"), True),
                    ("CPU us per new connection", cpu_per(1e6), False),
                    ("new-connection p99 ms", median("p99"), False)],
        "redis": [("redis GET/s", median("value"), True),
                  ("CPU us per redis GET", cpu_per(1e6), False)],
        "idle": [("RSS KiB per idle connection", median("value"), False)],
    }[scenario]


def fmt(v):
    if v is None or v != v:
        return ""
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b and a == a and b == b else ""


def report(results, args):
    """One row per figure and thread count: every T side by side, ratios at the same T."""
    threads = args.thread_counts
    where = (f"pinned: proxy on cores 0..T-1, backends {args.backend_cores}, load {args.load_cores}"
             if args.pin else "not pinned")
    lines = [f"\n{where}; {os.cpu_count()} cores; {args.duration} s per measurement; medians of {args.reps}; "
             f"idle: {args.idle_conns} connections\n",
             "| figure | T | direct | ballast | HAProxy | nginx | ballast/HAProxy | ballast/nginx | ballast T/1 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for scenario in args.scenarios:
        for label, read, is_throughput in figures(scenario):
            def value(variant):
                rs = results.get((scenario, variant))
                return read(rs) if rs else None

            direct = value("direct") if scenario != "idle" and (is_throughput or "p99" in label) else None
            base = value(f"ballast-{threads[0]}")
            for t in threads:
                v = {p: value(f"{p}-{t}") for p in PROXIES}
                cells = [fmt(direct)]
                for p in PROXIES:
                    to_direct = f" ({v[p] / direct:.2f})" if is_throughput and direct and v[p] else ""
                    cells.append(fmt(v[p]) + to_direct)
                cells += [ratio(v["ballast"], v["haproxy"]), ratio(v["ballast"], v["nginx"]),
                          ratio(v["ballast"], base) if t != threads[0] else ""]
                lines.append(f"| {label} | {t} | " + " | ".join(cells) + " |")
    lines.append("\n(x) after a throughput: its ratio to direct. Ratios below 1 mean ballast uses less "
                 "(CPU, p99, memory); above 1, more throughput. ballast T/1: ballast at T over ballast at "
                 f"T = {threads[0]}.")
    errors = sorted({f"{s} {v}: {r['errors']}" for (s, v), rs in results.items() for r in rs if "errors" in r})
    lines += [f"load generator errors: {e}" for e in errors]
    return "\n".join(lines)


# ------------------------------------------------------------------ main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pin", action="store_true", help="many-core mode: pin the proxy, backends and load generators")
    ap.add_argument("--kit", help="folder with bin/ and lib/ of the peers (make-peer-kit.sh); default: the system's")
    ap.add_argument("--ballast", default=os.path.join(ROOT, "target", "release", "ballast"))
    ap.add_argument("--duration", type=int, help="seconds per measurement (default 10, --pin 8)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", help="comma-separated scenarios (bulk1 bulk4 bulk8 http connect redis idle)")
    ap.add_argument("--threads", help="thread counts T (default 1,2; --pin 1,2,4)")
    ap.add_argument("--proxies", default=",".join(PROXIES))
    ap.add_argument("--idle-conns", type=int, default=5000)
    ap.add_argument("--backend-cores", default="4-9", help="--pin: cores of the backends")
    ap.add_argument("--load-cores", default="10-15", help="--pin: cores of the load generators")
    ap.add_argument("--json", help="also write every repetition's raw figures here")
    args = ap.parse_args()
    args.duration = args.duration or (8 if args.pin else 10)
    args.thread_counts = [int(t) for t in (args.threads or ("1,2,4" if args.pin else "1,2")).split(",")]
    default = "bulk8,http,connect,idle" if args.pin else "bulk1,bulk4,http,connect,redis,idle"
    args.scenarios = (args.only or default).split(",")
    proxies = args.proxies.split(",")
    for s in args.scenarios:
        if not (re.fullmatch(r"bulk\d*", s) or s in SERVICE):
            sys.exit(f"unknown scenario {s}")
    if args.pin and max(args.thread_counts) > os.cpu_count():
        sys.exit(f"--pin with T = {max(args.thread_counts)} needs that many cores; this machine has {os.cpu_count()}")

    bench = Bench(args)
    for tool in ("haproxy", "nginx", "iperf3", "wrk", "redis-server", "redis-benchmark"):
        if not os.access(bench.tool(tool), os.X_OK):
            sys.exit(f"missing {tool}: apt-get install haproxy nginx libnginx-mod-stream iperf3 wrk redis-server "
                     "redis-tools, or pass --kit")
    if not os.access(bench.ballast, os.X_OK):
        sys.exit(f"no ballast at {bench.ballast}: cargo build --release, or pass --ballast")
    # Two fds per proxied connection, and this script holds the idle clients.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    variants = ["direct"] + [f"{p}-{t}" for t in args.thread_counts for p in proxies]
    runs = sum(args.reps * (len(variants) - (s == "idle")) for s in args.scenarios)
    print(f"{runs} measurements, about {runs * (args.duration + 2) // 60 + 1} min", file=sys.stderr, flush=True)
    backends = bench.start_backends()
    results = {}  # (scenario, variant) -> [one dict per repetition]
    try:
        for scenario in args.scenarios:
            service = service_of(scenario)
            for rep in range(args.reps):
                for variant in variants:
                    if scenario == "idle" and variant == "direct":
                        continue
                    proxy = None
                    if variant != "direct":
                        kind, t = variant.rsplit("-", 1)
                        proxy = bench.start_proxy(kind, int(t))
                    try:
                        port = bench.front[service] if proxy else bench.direct_port(service)
                        wait_port(port, proxy)
                        r = measure(bench, scenario, port, proxy)
                        results.setdefault((scenario, variant), []).append(r)
                        print(f"{scenario} {variant} rep {rep}: " + json.dumps({k: round(v, 4) if isinstance(v, float)
                                                                               else v for k, v in r.items()}),
                              file=sys.stderr, flush=True)
                    finally:
                        if proxy:
                            proxy.stop()
                            time.sleep(0.3)
    finally:
        for b in backends:
            b.stop()
    table = report(results, args)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "table": table,
                       "results": {f"{s} {v}": rs for (s, v), rs in results.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
