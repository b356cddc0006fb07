"""First-packet cost: new TCP connections per second through one Service, with 1,000 and with
30,000 Services in the kernel, per mode, side by side (issue 13: "at 30,000 Services within 10 %
of 1,000 Services"). Recorded, never asserted.

Per mode (or iptables backend), one one-node lab per size (`kproxy.lab`: node-1, pod-1a,
client-1 on the LAN routing through node-1) and one more with no rules, all up at once:

1. pod-1a runs a small server: accept and close, nothing else (port 80, 10 addresses);
2. `kproxy sync MODE --state FILE --node node-1 --cluster-cidr 10.0.0.0/8` programs each loaded
   lab's node-1 with N − 1 generated Services × 10 endpoints (`cluster.py`, none of them
   reachable) plus the target: ns1/zz-target, its ten endpoints the pod's ten addresses. It sorts
   last, so it is the last ClusterIP rule of the iptables mode's KPROXY-SERVICES (a packet to it
   walks past every other Service), and it is a 10-endpoint Service like the others in the
   nftables mode's maps;
3. then, for several rounds, each round in turn: the **baseline** (client-1 straight to the pod
   in the lab with no rules), and in each loaded lab client-1 → ClusterIP (DNAT, and masquerade
   since the client is off-cluster) and client-1 → pod address (what every non-Service
   connection pays for the rules). Rounds visit every size back to back, so whatever else the
   machine does weighs on all sizes alike, and the per-round ratio cancels it.

Each measurement is a **throughput** phase (W client processes, each a tight connect/close loop
for S seconds: connections per second) and a **latency** phase (one client, the same loop: the
time connect() takes, p50 and p99, i.e. SYN out to SYN-ACK back through the node). A connection
is closed with SO_LINGER 0 (an RST: no TIME_WAIT, the source port is free again at once), the pod
keeps no TIME_WAIT sockets (the lab's setting), and node-1's conntrack table is flushed before
every phase, so no phase inherits the previous one's entries.

    flock /tmp/kproxy-bench.lock python bench/first_packet.py --sizes 1000 30000 --rounds 7 --out docs/benchmarks.md

writes the block between the `<!-- bench:first-packet -->` markers of docs/benchmarks.md, the
raw figures under the "first_packet" key of docs/benchmarks.json and the plot to
docs/benchmarks-first-packet.svg. Needs root. iptables-nft runs only up to `--nft-max` Services:
loading 30,000 Services through it takes minutes (5,000 took 57 s in the process benchmark).
"""

from __future__ import annotations

import argparse
import array
import errno
import json
import os
import platform
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))  # the hidden subcommands start without bench/ on the path

MARKER = "<!-- bench:first-packet -->"
PORT = 80
ENDPOINTS = 10  # per Service, the target included
TARGET = "zz-target"  # sorts after every generated svcN
NODE_NAME = "node-1"
LINGER0 = struct.pack("ii", 1, 0)
CONNECT_TIMEOUT = 2.0
COLUMNS = ("nftables", "iptables / legacy", "iptables / nft")


def say(*parts: Any) -> None:
    print(*parts, flush=True)


# -- the two hidden subcommands: the server in the pod, the client in client-1 -------------------


def serve(port: int) -> None:
    """Accept and close, forever; bound to every address of the pod."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(4096)
    print("listening", flush=True)
    accept = srv._accept  # type: ignore[attr-defined]  # the bare fd: no socket object per connection
    while True:
        try:
            fd, _ = accept()
        except OSError:
            continue  # the client's RST can beat the accept (ECONNABORTED)
        os.close(fd)


def connect_loop(dst: str, port: int, until: float) -> tuple[int, dict[str, int], array.array[int]]:
    """New connections until `until` (monotonic): how many, the errors by name, and each one's
    connect() time in microseconds."""
    latencies: array.array[int] = array.array("I")
    errors: dict[str, int] = {}
    addr = (dst, port)
    clock = time.perf_counter_ns
    deadline_ns = int(until * 1e9)
    while True:
        t0 = clock()
        if t0 >= deadline_ns:
            break
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
        s.settimeout(CONNECT_TIMEOUT)
        try:
            s.connect(addr)
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, "timeout" if isinstance(exc, TimeoutError) else "other")
            errors[name] = errors.get(name, 0) + 1
        else:
            latencies.append(min((clock() - t0) // 1000, 2**32 - 1))
        s.close()
    return len(latencies), errors, latencies


def client(dst: str, port: int, seconds: float, workers: int) -> None:
    """`workers` forked loops started together for `seconds`; one JSON line on stdout."""
    start = time.perf_counter() + 0.1  # every worker forked before the clock starts
    until = start + seconds
    pipes = []
    for _ in range(workers):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            while time.perf_counter() < start:
                pass
            n, errs, lat = connect_loop(dst, port, until)
            head = json.dumps({"connections": n, "errors": errs}).encode()
            with os.fdopen(w, "wb") as f:
                f.write(struct.pack("I", len(head)) + head + lat.tobytes())
            os._exit(0)
        os.close(w)
        pipes.append((pid, r))
    total, errors = 0, {}
    latencies: array.array[int] = array.array("I")
    for pid, r in pipes:
        with os.fdopen(r, "rb") as f:
            data = f.read()
        os.waitpid(pid, 0)
        (size,) = struct.unpack_from("I", data)
        head = json.loads(data[4 : 4 + size])
        total += head["connections"]
        for k, v in head["errors"].items():
            errors[k] = errors.get(k, 0) + v
        latencies.frombytes(data[4 + size :])
    ordered = sorted(latencies)
    print(
        json.dumps(
            {
                "connections": total,
                "errors": errors,
                "seconds": seconds,
                "per_s": total / seconds,
                "p50_us": _pct(ordered, 50),
                "p99_us": _pct(ordered, 99),
            }
        )
    )


def _pct(ordered: list[int], p: float) -> float | None:
    if not ordered:
        return None
    return float(ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))])


# -- one lab, one case ----------------------------------------------------------------------------


def target_ip(services: int) -> str:
    i = services - 1  # the generated Services are 0 .. N-2
    return f"172.30.{i // 250}.{i % 250 + 1}"


def write_state(path: Path, services: int) -> Path:
    """N − 1 generated Services × 10 endpoints and the target, whose endpoints are the pod's
    ten addresses, as `kubectl get -o json` prints a List."""
    import cluster

    from kproxy.testing.builders import endpoint, endpoint_slice, service

    items = cluster.objects(services - 1, ENDPOINTS) if services > 1 else []
    items.append(service(name=TARGET, cluster_ip=target_ip(services)))
    items.append(endpoint_slice(TARGET, endpoints=[endpoint(ip, NODE_NAME) for ip in pod_addresses()]))
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items, "metadata": {}}))
    return path


def pod_addresses() -> list[str]:
    # pod-1a of the lab is 10.0.1.11 (node 1, pod a); nine more beside it on its eth0.
    return [f"10.0.1.{11 + k}" for k in range(ENDPOINTS)]


def run_in_ns(ns: str, argv: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    from procs import ENV

    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout, check=False, env=ENV
    )


def measure_phase(client_ns: str, node_ns: str, dst: str, seconds: float, workers: int) -> dict[str, Any]:
    # Every phase starts with node-1's conntrack table empty ("0 flow entries" or "no table" both fine).
    run_in_ns(node_ns, ["conntrack", "-F"])
    argv = [sys.executable, str(HERE), "_client", dst, str(PORT), str(seconds), str(workers)]
    done = run_in_ns(client_ns, argv, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"client to {dst} failed: {done.stderr.strip()[-800:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def summarize(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Median and spread over the rounds of one target."""
    per_s = [r["throughput"]["per_s"] for r in rounds]
    p50 = [r["latency"]["p50_us"] for r in rounds if r["latency"]["p50_us"] is not None]
    p99 = [r["latency"]["p99_us"] for r in rounds if r["latency"]["p99_us"] is not None]
    errors: dict[str, int] = {}
    for r in rounds:
        for phase in r.values():
            for k, v in phase["errors"].items():
                errors[k] = errors.get(k, 0) + v
    return {
        "per_s_median": statistics.median(per_s),
        "per_s_min": min(per_s),
        "per_s_max": max(per_s),
        "serial_per_s_median": statistics.median(r["latency"]["per_s"] for r in rounds),
        "p50_us_median": statistics.median(p50) if p50 else None,
        "p99_us_median": statistics.median(p99) if p99 else None,
        "errors": errors,
        "rounds": rounds,
    }


class _Lab:
    """One running lab with the pod's server; `down()` stops both, whatever happened."""

    def __init__(self, prefix: str) -> None:
        from kproxy.lab.namespaces import Lab

        self.lab = Lab(prefix=prefix, nodes=1, pods_per_node=1, clients=1)
        self.server: subprocess.Popen[str] | None = None
        self.lab.up()
        try:
            self.node, self.pod, self.client = self.lab.node(1), self.lab.pod("pod-1a"), self.lab.client(1)
            assert self.pod.ipv4 == pod_addresses()[0], (self.pod.ipv4, "the lab's address plan changed")
            more = "".join(f"addr add {a}/24 dev eth0\n" for a in pod_addresses()[1:])
            self.lab.run(self.pod.ns, ["ip", "-batch", "-"], input=more)
            self.server = subprocess.Popen(
                ["ip", "netns", "exec", self.pod.ns, sys.executable, str(HERE), "_serve", str(PORT)],
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            assert self.server.stdout is not None
            if self.server.stdout.readline().strip() != "listening":
                raise RuntimeError("the pod's server did not start")
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        if self.server is not None:
            os.killpg(self.server.pid, signal.SIGKILL)
            self.server.wait()
            self.server = None
        self.lab.down()

    def measure(self, dst: str, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
        return {
            "throughput": measure_phase(self.client.ns, self.node.ns, dst, args.seconds, args.workers),
            "latency": measure_phase(self.client.ns, self.node.ns, dst, args.latency_seconds, 1),
        }


def sync(lab: _Lab, column: str, state: Path, services: int, args: argparse.Namespace) -> dict[str, Any]:
    """`kproxy sync` in the lab's node, then one connection through the target's ClusterIP."""
    from modes import MODES
    from procs import KPROXY

    mode, _, backend = (part.strip() for part in column.partition("/"))
    out: dict[str, Any] = {"mode": mode, "backend": backend, "status": "ok"}
    argv = [
        *KPROXY,
        "sync",
        *MODES[mode].flags(backend),
        *("--state", str(state), "--node", NODE_NAME, "--cluster-cidr", "10.0.0.0/8"),
    ]
    started = time.perf_counter()
    done = run_in_ns(lab.node.ns, argv, timeout=args.budget)
    out["sync_s"] = time.perf_counter() - started
    if done.returncode != 0:
        return {**out, "status": "failed", "stderr": done.stderr[-1500:]}
    check = measure_phase(lab.client.ns, lab.node.ns, target_ip(services), 0.05, 1)
    if not check["connections"]:
        return {**out, "status": "failed", "stderr": f"no connection through {target_ip(services)}: {check['errors']}"}
    return out


def measure_column(column: str, sizes: list[int], states: dict[int, Path], args: argparse.Namespace) -> dict[int, Any]:
    """Every size of one mode at once: a lab per size with its rules loaded and one with none
    (the baseline), all up together, measured round by round in turn, so that whatever else the
    machine does in a round weighs on every size alike."""
    labs: list[_Lab] = []
    cases: dict[int, dict[str, Any]] = {}
    try:
        base = _Lab(f"fp{os.getpid()}b")
        labs.append(base)
        loaded: dict[int, _Lab] = {}
        for i, n in enumerate(sizes):
            lab = _Lab(f"fp{os.getpid()}s{i}")
            labs.append(lab)
            cases[n] = sync(lab, column, states[n], n, args)
            say(f"   {column}, {n:,} Services: kproxy sync {cases[n]['status']} ({cases[n]['sync_s']:.1f} s)")
            if cases[n]["status"] == "ok":
                loaded[n] = lab
        rounds: dict[str, list[dict[str, dict[str, Any]]]] = {"baseline": []}
        for n in loaded:
            rounds[f"{n}/service"], rounds[f"{n}/pod"] = [], []
        for _ in range(args.rounds):
            rounds["baseline"].append(base.measure(base.pod.ipv4, args))
            for n, lab in loaded.items():
                rounds[f"{n}/service"].append(lab.measure(target_ip(n), args))
                rounds[f"{n}/pod"].append(lab.measure(lab.pod.ipv4, args))
        baseline = summarize(rounds["baseline"])
        for n in loaded:
            cases[n].update(
                baseline=baseline,
                service=summarize(rounds[f"{n}/service"]),
                pod_with_rules=summarize(rounds[f"{n}/pod"]),
            )
    finally:
        for lab in reversed(labs):
            lab.down()
    return cases


# -- the whole run --------------------------------------------------------------------------------


def remove_dead_labs() -> None:
    """Labs of earlier runs killed with SIGKILL (their `fp<pid>` owner is gone)."""
    import re

    from kproxy.lab.namespaces import NETNS_DIR, remove_namespaces

    names = os.listdir(NETNS_DIR) if os.path.isdir(NETNS_DIR) else []
    for prefix, pid in {(m[1], m[2]) for m in map(re.compile(r"(fp(\d+)[a-z]\d*)-").match, names) if m}:
        if not Path(f"/proc/{pid}").exists():
            remove_namespaces(prefix)


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    results: dict[str, Any] = {
        "measured": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "rounds": args.rounds,
        "seconds": args.seconds,
        "latency_seconds": args.latency_seconds,
        "workers": args.workers,
        "sizes": [],
    }
    with tempfile.TemporaryDirectory(prefix="kproxy-fp-") as tmp:
        states: dict[int, Path] = {}
        for n in sorted(args.sizes):
            t = time.perf_counter()
            states[n] = write_state(Path(tmp) / f"fp{n}.json", n)
            say(f"{n:,} Services: state written in {time.perf_counter() - t:.1f} s")
            results["sizes"].append({"services": n, "per_service": ENDPOINTS, "columns": {}})
        by_size = {s["services"]: s for s in results["sizes"]}
        for column in args.columns:
            sizes = sorted(states)
            if column == "iptables / nft":
                for n in [n for n in sizes if n > args.nft_max]:
                    by_size[n]["columns"][column] = {
                        "mode": "iptables",
                        "backend": "nft",
                        "status": "not run",
                        "why": f"iptables-nft loads {n:,} Services in minutes (5,000: 57 s); run up to {args.nft_max:,}",
                    }
                sizes = [n for n in sizes if n <= args.nft_max]
            t = time.perf_counter()
            for n, case in measure_column(column, sizes, states, args).items():
                by_size[n]["columns"][column] = case
                say(f"   {column}, {n:,} Services: {case['status']} {_line(case)}")
            say(f"   {column}: {time.perf_counter() - t:.0f} s")
            results["total_s"] = time.perf_counter() - started
            results["ratios"] = ratios(results)
            if args.out:
                write(results, args.out)  # after every mode: a run stopped later keeps these
    results["total_s"] = time.perf_counter() - started
    results["ratios"] = ratios(results)
    if args.out:
        write(results, args.out)
    return results


def _line(case: dict[str, Any]) -> str:
    if case.get("status") != "ok":
        return str(case.get("stderr", case.get("why", "")))[:300]
    s, b = case["service"], case["baseline"]
    return (
        f"sync {case['sync_s']:.1f} s; service {s['per_s_median']:.0f}/s p50 {s['p50_us_median']:.0f} µs; "
        f"baseline {b['per_s_median']:.0f}/s p50 {b['p50_us_median']:.0f} µs"
    )


def ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per column: the largest size's figures over the smallest's (issue 13: ≥ 0.90)."""
    sizes = sorted(results["sizes"], key=lambda s: s["services"])
    if len(sizes) < 2:
        return []
    small, large = sizes[0], sizes[-1]
    out = []
    for column in COLUMNS:
        a, b = small["columns"].get(column), large["columns"].get(column)
        row: dict[str, Any] = {"column": column, "small": small["services"], "large": large["services"]}
        if not a or not b or a.get("status") != "ok" or b.get("status") != "ok":
            row["status"] = "not measured"
        else:
            row["per_s_ratio"] = b["service"]["per_s_median"] / a["service"]["per_s_median"]
            row["p50_ratio"] = b["service"]["p50_us_median"] / a["service"]["p50_us_median"]
            row["within_10_percent"] = row["per_s_ratio"] >= 0.9
            # Round r of both sizes ran back to back: the ratio within each round, then their
            # median, is what the machine's drift from round to round does not move.
            paired = [
                y["throughput"]["per_s"] / x["throughput"]["per_s"]
                for x, y in zip(a["service"]["rounds"], b["service"]["rounds"], strict=True)
            ]
            row["paired_ratio_median"] = statistics.median(paired)
            row["paired_ratios"] = paired
            row["status"] = "ok"
        out.append(row)
    return out


# -- report ---------------------------------------------------------------------------------------


def _spread(s: dict[str, Any]) -> str:
    return f"{s['per_s_median']:,.0f} ({s['per_s_min']:,.0f}–{s['per_s_max']:,.0f})"


def _lat(s: dict[str, Any]) -> str:
    return f"{s['p50_us_median']:.0f} / {s['p99_us_median']:.0f} µs"


def markdown(results: dict[str, Any], svg_name: str) -> str:
    lines = [
        f"Measured {results['measured']} on {results['machine']} ({results['cpus']} cores), Python "
        f"{results['python']}, kernel {results['kernel']}: {results['rounds']} rounds per target, each a "
        f"{results['seconds']:g} s throughput phase ({results['workers']} client processes) and a "
        f"{results['latency_seconds']:g} s latency phase (one client); the run took {results['total_s']:.0f} s.",
        "",
        f"![new TCP connections per second through one Service]({svg_name})",
        "",
        "| Services | mode | `kproxy sync` | new connections/s through the ClusterIP: median (min–max) "
        "| connect() p50 / p99, one client | to the pod, rules loaded: /s | to the pod, no rules: /s "
        "| connect() p50, no rules | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size in results["sizes"]:
        for column, case in size["columns"].items():
            head = f"| {size['services']:,} | {column} |"
            if case.get("status") != "ok":
                why = case.get("why") or case.get("stderr", "")
                lines.append(f"{head} {case['status']}: {str(why).strip().splitlines()[0] if why else ''} |||||||")
                continue
            s, p, b = case["service"], case["pod_with_rules"], case["baseline"]
            errors = {**s["errors"]}
            for k, v in p["errors"].items():
                errors[k] = errors.get(k, 0) + v
            err = ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "none"
            lines.append(
                f"{head} {case['sync_s']:.1f} s | {_spread(s)} | {_lat(s)} | {_spread(p)} | {_spread(b)} "
                f"| {b['p50_us_median']:.0f} µs | {err} |"
            )
    if results.get("ratios"):
        lines += [
            "",
            "| mode | connections/s at {large:,} ÷ at {small:,} (medians) | the same, round by round: median (min–max) "
            "| connect() p50 at {large:,} ÷ at {small:,} | issue 13: within 10 % |".format(**results["ratios"][0]),
            "|---|---|---|---|---|",
        ]
        for r in results["ratios"]:
            if r["status"] != "ok":
                lines.append(f"| {r['column']} | not measured | not measured | not measured | not measured |")
                continue
            mark = "yes" if r["within_10_percent"] else "**no**"
            lines.append(
                f"| {r['column']} | {r['per_s_ratio']:.2f} | {r['paired_ratio_median']:.2f} "
                f"({min(r['paired_ratios']):.2f}–{max(r['paired_ratios']):.2f}) | {r['p50_ratio']:.2f} | {mark} |"
            )
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out: Path) -> None:
    import report
    from plot import first_packet_svg

    svg = out.with_name(out.stem + "-first-packet.svg")
    svg.write_text(first_packet_svg(results))
    report.put_json(out.with_suffix(".json"), "first_packet", results)
    report.put_block(out, MARKER, markdown(results, svg.name))


def parse_column(text: str) -> str:
    name = " / ".join(part.strip() for part in text.split("/"))
    if name not in COLUMNS:
        raise argparse.ArgumentTypeError(f"one of {', '.join(c.replace(' ', '') for c in COLUMNS)}")
    return name


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        serve(int(sys.argv[2]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        client(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 30000], help="Services, the target included")
    ap.add_argument("--columns", type=parse_column, nargs="+", default=list(COLUMNS), help="e.g. iptables/legacy")
    ap.add_argument("--nft-max", type=int, default=1000, help="largest size run with iptables-nft")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0, help="per throughput phase")
    ap.add_argument("--latency-seconds", type=float, default=1.0, help="per latency phase")
    ap.add_argument("--workers", type=int, default=2, help="client processes in a throughput phase")
    ap.add_argument("--budget", type=float, default=600.0, help="seconds for one `kproxy sync`")
    ap.add_argument("--out", type=Path, help="docs/benchmarks.md (also .json and -first-packet.svg beside it)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("first_packet: needs root (network namespaces)")
    # SIGTERM unwinds like Ctrl-C, so the lab and the server go on the way out.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    remove_dead_labs()
    results = run(args)
    if not args.out:
        say(markdown(results, "-"))
    say(f"first-packet benchmark took {results['total_s']:.0f} s")


if __name__ == "__main__":
    main()
