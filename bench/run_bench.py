"""`kproxy run` as a process against the in-process fake API server, in a lab node's namespace
(as tests/e2e start it), for one size, mode and backend.

What "in the kernel" means here: the daemon writes its ``sync_complete`` log line after the
sync's transaction has returned (iptables-restore exited 0: the kernel holds the rules), so the
line's own timestamp is when the change was in the kernel; the benchmark reads the log (cheap at
any size) instead of polling iptables-save, which at 10,000 Services costs a second a look. To
show the log tells the truth, the kernel is read once at the end (one `iptables-save -t nat`):
the last endpoint change is there and the deleted Service is not.

Measured: start of the process to the first full sync in the kernel (and to the end of the
initial list, from ``initial_list_complete``); then `changes` isolated single-endpoint changes,
each waited for before the next, from just before the EndpointSlice update is stored in the
fake API server to the ``sync_complete`` line of the sync that wrote it (p50 and p99, with the
daemon's own render and apply of those syncs); then one Service (and its slice) added and
deleted the same way; peak RSS from /proc/PID/status VmHWM just before SIGTERM.

The daemon runs with ``--min-sync-period=0s`` (the running mode's) so that the rate limiter (1 s by
default) does not hold back a change that arrives just after the previous sync: the latency
measured is the daemon's, for isolated changes. Everything (lab, API server, daemon) is torn
down on the way out, also on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cluster import NODE, objects, service_obj, slice_obj
from modes import ModeSpec
from procs import ENV, KPROXY, in_netns, kill_group, vm_hwm_mib
from sync_bench import Budget

from kproxy.lab.namespaces import Lab
from kproxy.testing.builders import node
from kproxy.testing.fakeapi import FakeAPIServer
from kproxy.testing.netns import call_in

POLL = 0.002  # seconds between reads of the daemon's log while waiting for a line


class OverBudget(Exception):
    pass


class DaemonDied(Exception):
    pass


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    log: Path
    started: float  # wall clock, just before the fork
    _offset: int = 0
    _partial: bytes = b""
    seen: list[dict[str, Any]] = field(default_factory=list)

    def new_events(self) -> list[dict[str, Any]]:
        with self.log.open("rb") as f:
            f.seek(self._offset)
            data = self._partial + f.read()
        self._offset += len(data) - len(self._partial)
        *lines, self._partial = data.split(b"\n")
        out = []
        for line in lines:
            if line.startswith(b"{"):
                event = json.loads(line)
                event["_t"] = datetime.fromisoformat(event["timestamp"]).timestamp()
                out.append(event)
        self.seen.extend(out)
        return out

    def wait(self, pred: Callable[[dict[str, Any]], bool], budget: Budget) -> dict[str, Any]:
        """The next log line (from now on) for which `pred` holds."""
        while True:
            for event in self.new_events():
                if event.get("event") in ("kproxy_crashed", "sync_failed"):
                    raise DaemonDied(json.dumps(event)[:1500])
                if pred(event):
                    return event
            if self.proc.poll() is not None:
                raise DaemonDied(f"exited {self.proc.returncode}: {self.log.read_text()[-1500:]}")
            if budget.left() <= 0:
                raise OverBudget
            time.sleep(POLL)


def is_sync(**want: Any) -> Callable[[dict[str, Any]], bool]:
    def pred(event: dict[str, Any]) -> bool:
        return event.get("event") == "sync_complete" and all(
            (v(event.get(k)) if callable(v) else event.get(k) == v) for k, v in want.items()
        )

    return pred


@contextmanager
def lab_with_api(tag: str) -> Iterator[tuple[Lab, FakeAPIServer]]:
    with Lab(prefix=f"kpb{os.getpid() % 100000}{tag}"[:16], nodes=1, pods_per_node=0, clients=0) as lab:
        api = call_in(lab.node(1).ns, FakeAPIServer(history_size=100).start)
        try:
            yield lab, api
        finally:
            api.stop()


def trigger_annotated(obj: dict[str, Any]) -> dict[str, Any]:
    # As the EndpointSlice controller stamps it; the daemon's own latency histogram reads it.
    obj["metadata"].setdefault("annotations", {})["endpoints.kubernetes.io/last-change-trigger-time"] = datetime.now(
        UTC
    ).isoformat()
    return obj


def measure(
    spec: ModeSpec, backend: str, services: int, per_service: int, changes: int, budget: Budget, tmp: Path, tag: str
) -> dict[str, Any]:
    out: dict[str, Any] = {"status": "ok"}
    with lab_with_api(tag) as (lab, api):
        ns = lab.node(1).ns
        t = time.perf_counter()
        api.create("nodes", node(name=NODE, addresses=[lab.node(1).ipv4], pod_cidrs=["10.0.1.0/24"]))
        for obj in objects(services, per_service):
            api.create("services" if obj["kind"] == "Service" else "endpointslices", obj)
        out["api_load_s"] = time.perf_counter() - t
        kubeconfig = api.write_kubeconfig(tmp / f"kubeconfig-{tag}")
        log = tmp / f"kproxy-run-{tag}.log"
        argv = [
            *KPROXY,
            "run",
            *spec.flags(backend),
            f"--kubeconfig={kubeconfig}",
            f"--hostname-override={NODE}",
            "--cluster-cidr=10.0.0.0/8",
            "--min-sync-period=0s",  # whichever mode runs
        ]
        with log.open("wb") as f:
            started = time.time()
            proc = subprocess.Popen(in_netns(ns, argv), stdout=f, stderr=f, env=ENV, start_new_session=True)
        daemon = Daemon(proc, log, started)
        try:
            run_steps(daemon, api, ns, spec, backend, services, per_service, changes, budget, out)
        except OverBudget:
            out["status"] = "over budget"
            summarize(out)
        except DaemonDied as e:
            out["status"] = "failed"
            out["error"] = str(e)
        finally:
            out["peak_rss_mib"] = vm_hwm_mib(proc.pid)
            stop(proc)
            out["log_lines"] = len(daemon.seen)
    return out


def run_steps(
    daemon: Daemon,
    api: FakeAPIServer,
    ns: str,
    spec: ModeSpec,
    backend: str,
    services: int,
    per_service: int,
    changes: int,
    budget: Budget,
    out: dict[str, Any],
) -> None:
    listed = daemon.wait(lambda e: e.get("event") == "initial_list_complete", budget)
    out["to_listed_s"] = listed["_t"] - daemon.started
    first = daemon.wait(is_sync(kind="full"), budget)
    out["to_first_sync_s"] = first["_t"] - daemon.started
    out["first_sync"] = {k: first.get(k) for k in ("render_ms", "duration_ms", "written", "endpoints")}
    out["first_sync"]["apply_ms"] = _apply_ms(first)
    out["peak_rss_after_first_sync_mib"] = vm_hwm_mib(daemon.proc.pid)
    endpoints = first["endpoints"]

    samples: list[dict[str, Any]] = []
    out["changes"] = samples
    last_ip = ""
    for k in range(changes):
        i = (k * 7919) % services  # spread over the cluster, each Service at most once per cycle
        last_ip = f"10.250.{k // 250}.{k % 250 + 1}"
        obj = trigger_annotated(slice_obj(i, per_service, first=last_ip))
        t0 = time.time()
        api.update("endpointslices", obj)
        done = daemon.wait(is_sync(changed=lambda c: bool(c and c >= 1)), budget)
        samples.append(_sample(done, t0))
        if budget.left() <= 0:
            raise OverBudget
    summarize(out)

    extra = services  # a new Service and its slice, then gone again
    t0 = time.time()
    with api.batch():
        api.create("services", service_obj(extra))
        api.create("endpointslices", slice_obj(extra, per_service))
    out["add_service"] = _sample(
        daemon.wait(is_sync(services=services + 1, endpoints=endpoints + per_service), budget), t0
    )
    t0 = time.time()
    with api.batch():
        api.delete("endpointslices", f"svc{extra}-abcde", "ns1")
        api.delete("services", f"svc{extra}", "ns1")
    out["delete_service"] = _sample(daemon.wait(is_sync(services=services, endpoints=endpoints), budget), t0)
    out["verified_in_kernel"] = verify(ns, spec, backend, last_ip, extra, budget)


def summarize(out: dict[str, Any]) -> None:
    """p50 and p99 of the changes so far (also of a run stopped over budget part-way)."""
    samples = out.get("changes") or []
    lat = sorted(s["latency_s"] for s in samples)
    out["change_p50_s"] = _quantile(lat, 0.5)
    out["change_p99_s"] = _quantile(lat, 0.99)
    out["change_apply_p50_s"] = statistics.median(s["apply_ms"] for s in samples) / 1000 if samples else None


def _sample(event: dict[str, Any], t0: float) -> dict[str, Any]:
    return {
        "latency_s": event["_t"] - t0,
        "render_ms": event.get("render_ms"),
        "apply_ms": _apply_ms(event),
        "duration_ms": event.get("duration_ms"),
        "kind": event.get("kind"),
    }


def _apply_ms(event: dict[str, Any]) -> float:
    """The sync's plan and apply: what the kernel is read for, the difference, its writing (the
    daemon logs the plan apart since it has; the benchmark's column has always held both)."""
    return float(event.get("plan_ms") or 0) + float(event.get("apply_ms") or 0)


def _quantile(values: list[float], q: float) -> float | None:
    """The q-quantile, linearly interpolated (of 100 samples, p99 lies between the two largest)."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def verify(ns: str, spec: ModeSpec, backend: str, last_ip: str, deleted: int, budget: Budget) -> bool | str:
    """The log's word checked once against the kernel: the last change is there, the deleted
    Service is not."""
    if spec.name != "iptables":
        return "not checked in this mode"
    try:
        done = subprocess.run(
            in_netns(ns, [f"iptables-{backend}-save", "-t", "nat"]),
            capture_output=True,
            text=True,
            timeout=max(budget.left(), 30),
            check=True,
        )
    except subprocess.TimeoutExpired:
        return "not checked (over budget)"
    dnat = last_ip == "" or f"--to-destination {last_ip}:" in done.stdout
    return dnat and f"ns1/svc{deleted}:" not in done.stdout


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            proc.wait()
