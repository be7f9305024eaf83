"""``paratrain doctor [--json]``: can this machine train, and what would make it better?

Each check gives ok / warn / fail, a one-line summary, structured details and, when not
ok, a one-line fix.  The exit code is 0 when training can run here (a CPU-only machine is
a valid, warned state) and 1 when a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from paratrain.netinfo import gloo_interface, interfaces, nccl_interface

CHECKS = ("python", "torch", "cuda", "gpus", "nvidia_smi", "cudnn", "nccl", "gloo", "mpi", "cpu", "memory",
          "shm", "network", "gloo_interface", "nccl_interface", "hostname", "pyzmq")

_TORCH_INSTALL = ("install the CUDA build of torch {v} that your driver supports (pytorch.org's install selector, "
                  "e.g. `pip install torch=={v} --index-url <PyTorch cu12x wheel index>`); its wheels bring the "
                  "CUDA runtime, cuDNN and NCCL, so only the NVIDIA driver is needed on the machine")


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    summary: str
    fix: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.add_argument("--nnodes", type=int, default=0,
                        help="hosts in the job you plan (default: from torchrun's environment, else 1)")


def _run(cmd: list[str], timeout: float = 20.0) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return p.returncode, (p.stdout + p.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return -1, str(e)


def planned_nnodes(arg: int = 0) -> int:
    """Hosts in this job: ``--nnodes``, else torchrun's environment, else 1."""
    if arg:
        return arg
    for key in ("NNODES", "PET_NNODES", "GROUP_WORLD_SIZE"):
        v = os.environ.get(key, "")
        if v.isdigit():
            return int(v)
        if ":" in v and v.split(":")[-1].isdigit():  # --nnodes=MIN:MAX
            return int(v.split(":")[-1])
    world, local = os.environ.get("WORLD_SIZE", ""), os.environ.get("LOCAL_WORLD_SIZE", "")
    if world.isdigit() and local.isdigit() and int(local):
        return max(1, int(world) // int(local))
    return 1


# ---- checks ----------------------------------------------------------------------------------
def check_python() -> Check:
    v = sys.version_info
    ok = v >= (3, 10)
    return Check("python", "ok" if ok else "fail", f"{platform.python_version()} ({sys.executable})",
                 "" if ok else "use Python 3.10 or newer", {"version": platform.python_version()})


def check_torch(torch) -> Check:
    v = torch.__version__
    base = tuple(int(x) for x in v.split("+")[0].split(".")[:2] if x.isdigit())
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU"
    status = "ok" if base >= (2, 5) else "warn"
    return Check("torch", status, f"{v} ({build} build)", "" if status == "ok" else "upgrade to torch >= 2.5",
                 {"version": v, "cuda_build": torch.version.cuda, "debug": torch.version.debug})


def check_cuda(torch) -> Check:
    v = torch.__version__.split("+")[0]
    detail = {"available": torch.cuda.is_available(), "cuda_version": torch.version.cuda,
              "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if not torch.version.cuda:
        return Check("cuda", "warn", "CPU-only torch build: training runs on CPU (gloo)",
                     "for NVIDIA GPUs: " + _TORCH_INSTALL.format(v=v), detail)
    if not torch.cuda.is_available():
        return Check("cuda", "warn", f"torch built for CUDA {torch.version.cuda} but no usable GPU",
                     "check `nvidia-smi`, CUDA_VISIBLE_DEVICES and that the driver supports CUDA "
                     f"{torch.version.cuda} (upgrade the driver or use a torch build for an older CUDA)", detail)
    return Check("cuda", "ok", f"CUDA {torch.version.cuda}, {detail['device_count']} GPU(s)", "", detail)


def check_gpus(torch) -> Check:
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "memory_gb": round(p.total_memory / 2**30, 1),
                         "capability": f"{p.major}.{p.minor}"})
    if not gpus:
        return Check("gpus", "ok", "none (CPU training)", "", {"gpus": []})
    names = ", ".join(f"{g['name']} {g['memory_gb']} GB" for g in gpus)
    return Check("gpus", "ok", names, "", {"gpus": gpus})


def check_nvidia_smi(torch) -> Check:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        status = "warn" if torch.cuda.is_available() else "ok"
        return Check("nvidia_smi", status, "not installed (no NVIDIA driver tools)",
                     "" if status == "ok" else "install the NVIDIA driver utilities (nvidia-utils)", {"gpus": []})
    rc, out = _run([exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"])
    if rc != 0:
        return Check("nvidia_smi", "warn", f"nvidia-smi failed: {out.splitlines()[-1] if out else rc}",
                     "reinstall or reload the NVIDIA driver (nvidia-smi must list the GPUs)", {"gpus": []})
    gpus = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3:
            gpus.append({"name": parts[0], "memory_mb": parts[1], "driver": parts[2]})
    driver = gpus[0]["driver"] if gpus else "?"
    return Check("nvidia_smi", "ok", f"driver {driver}, {len(gpus)} GPU(s)", "", {"gpus": gpus, "driver": driver})


def check_cudnn(torch) -> Check:
    if not torch.version.cuda:
        return Check("cudnn", "ok", "not applicable (CPU build)", "", {"version": None})
    version = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if version is None:
        return Check("cudnn", "warn", "cuDNN not loadable",
                     f"`pip install --force-reinstall torch=={torch.__version__.split('+')[0]}` brings the "
                     "matching nvidia-cudnn-cu12 wheel", {"version": None})
    return Check("cudnn", "ok", str(version), "", {"version": version})


_NCCL_SMOKE = ("import torch, torch.distributed as dist; dist.init_process_group('nccl', store=dist.HashStore(), "
               "rank=0, world_size=1, device_id=torch.device('cuda', 0)); t = torch.ones(4, device='cuda'); "
               "dist.all_reduce(t); torch.cuda.synchronize(); print('nccl-ok', t.sum().item()); "
               "dist.destroy_process_group()")


def check_nccl(torch, dist) -> Check:
    if not torch.version.cuda:
        return Check("nccl", "ok", "not applicable (CPU build)", "", {"available": False, "version": None})
    if not dist.is_nccl_available():
        return Check("nccl", "warn", "this torch build has no NCCL",
                     _TORCH_INSTALL.format(v=torch.__version__.split("+")[0]), {"available": False, "version": None})
    v = torch.cuda.nccl.version()
    version = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    detail = {"available": True, "version": version, "usable": None}
    if not torch.cuda.is_available():
        return Check("nccl", "warn", f"NCCL {version} built in, but no GPU to run it on", "see the cuda check", detail)
    rc, out = _run([sys.executable, "-c", _NCCL_SMOKE], timeout=90)
    detail["usable"] = rc == 0 and "nccl-ok" in out
    if not detail["usable"]:
        last = out.splitlines()[-1] if out else f"exit {rc}"
        return Check("nccl", "fail", f"NCCL {version} cannot run a 1-GPU all_reduce: {last[:160]}",
                     "rerun with NCCL_DEBUG=INFO; reinstall torch to get the matching nvidia-nccl-cu12 wheel", detail)
    return Check("nccl", "ok", f"{version}, 1-GPU all_reduce ok", "", detail)


def check_gloo(torch, dist) -> Check:
    if not dist.is_available() or not dist.is_gloo_available():
        return Check("gloo", "fail", "this torch build has no gloo backend",
                     "install an official torch wheel (gloo is built in on Linux and macOS)", {"available": False})
    try:
        pg = dist.ProcessGroupGloo(dist.HashStore(), 0, 1)
        t = torch.ones(4)
        pg.allreduce([t]).wait()
        usable = bool(t.sum() == 4)
    except Exception as e:  # noqa: BLE001 - the check reports the failure
        return Check("gloo", "fail", f"gloo all_reduce failed: {e}", "check the loopback interface (lo) is up",
                     {"available": True, "usable": False})
    return Check("gloo", "ok", "available, 1-rank all_reduce ok", "", {"available": True, "usable": usable})


def check_mpi(dist) -> Check:
    avail = dist.is_available() and dist.is_mpi_available()
    return Check("mpi", "ok", "available" if avail else "not built in (not needed: gloo / NCCL are used)", "",
                 {"available": avail})


def check_cpu(torch) -> Check:
    cores = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    detail = {"cores": cores, "usable_cores": usable, "model": model, "torch_threads": torch.get_num_threads()}
    status = "ok" if usable >= 2 else "warn"
    fix = "" if status == "ok" else "multi-worker training on 1 core is slow; run with parallel.nproc = 1"
    return Check("cpu", status, f"{usable} usable of {cores} cores ({model})", fix, detail)


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for ln in f:
                k, v = ln.split(":", 1)
                out[k] = int(v.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def check_memory() -> Check:
    m = _meminfo()
    total, avail = m.get("MemTotal", 0), m.get("MemAvailable", 0)
    detail = {"total_gb": round(total / 2**30, 1), "available_gb": round(avail / 2**30, 1)}
    if not total:
        return Check("memory", "warn", "unknown (no /proc/meminfo)", "", detail)
    status = "ok" if avail >= 2 * 2**30 else "warn"
    fix = "" if status == "ok" else "less than 2 GB free: use a smaller model / batch, or parallel.zero"
    return Check("memory", status, f"{detail['available_gb']} GB available of {detail['total_gb']} GB", fix, detail)


def check_shm() -> Check:
    try:
        usage = shutil.disk_usage("/dev/shm")
    except OSError:
        return Check("shm", "warn", "/dev/shm missing", "mount a tmpfs on /dev/shm (used by NCCL and data workers)",
                     {"total_gb": 0})
    gb = usage.total / 2**30
    detail = {"total_gb": round(gb, 2), "free_gb": round(usage.free / 2**30, 2)}
    if gb < 1:
        return Check("shm", "warn", f"/dev/shm is only {gb * 1024:.0f} MB",
                     "in a container pass --shm-size=8g (or --ipc=host); NCCL needs shared memory", detail)
    return Check("shm", "ok", f"{gb:.1f} GB", "", detail)


def check_network(nnodes: int = 1) -> list[Check]:
    ifaces = interfaces()
    up = [i for i in ifaces if i["up"] and not i["loopback"] and i["ipv4"]]
    names = ", ".join(f"{i['name']} {'/'.join(i['ipv4'])}" for i in ifaces if i["ipv4"]) or "none"
    net = Check("network", "ok" if up else "warn", names,
                "" if up else "only loopback is up: one host only (multi-host needs a routable interface)",
                {"interfaces": ifaces})
    g = gloo_interface(ifaces)
    gloo = Check("gloo_interface", "fail" if g.get("error") else "ok", g["summary"], g.get("error", ""), g)
    if gloo.status == "ok" and nnodes > 1 and any(a.startswith("127.") for a in g["addresses"]):
        gloo.status, gloo.fix = "warn", "set GLOO_SOCKET_IFNAME to the interface the other hosts can reach"
    n = nccl_interface(ifaces)
    nccl = Check("nccl_interface", "warn" if n.get("error") else "ok", n["summary"], n.get("error", ""), n)
    return [net, gloo, nccl]


def check_hostname(nnodes: int) -> Check:
    host = socket.gethostname()
    try:
        addr = socket.gethostbyname(host)
    except OSError as e:
        addr, err = None, str(e)
    else:
        err = ""
    loopback = addr is None or addr.startswith("127.")
    detail = {"hostname": host, "fqdn": socket.getfqdn(), "address": addr, "loopback": loopback, "nnodes": nnodes}
    if addr is None:
        return Check("hostname", "warn", f"{host} does not resolve ({err})",
                     f"add '{host}' to /etc/hosts with this host's address", detail)
    if loopback and nnodes > 1:
        return Check("hostname", "warn", f"{host} resolves to loopback {addr} in a {nnodes}-host job",
                     "other hosts cannot reach 127.x: pass torchrun --local-addr=<this host's IP> and set "
                     "GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME to the interface, or fix /etc/hosts", detail)
    note = " (fine on one host)" if loopback else ""
    return Check("hostname", "ok", f"{host} -> {addr}{note}", "", detail)


def multi_host_warning() -> str | None:
    """Under a multi-host torchrun job: a warning when gloo would bind to loopback, else None."""
    if planned_nnodes() < 2 or os.environ.get("GLOO_SOCKET_IFNAME"):
        return None
    c = check_hostname(planned_nnodes())
    if c.status == "ok":
        return None
    return f"{c.summary}; gloo will bind to it and other hosts cannot connect: {c.fix}"


def check_pyzmq() -> Check:
    try:
        import zmq
    except ImportError:
        return Check("pyzmq", "warn", "not installed: the parameter server (parallel.sync = ps) cannot run",
                     "pip install 'pyzmq>=25'", {"version": None})
    return Check("pyzmq", "ok", f"{zmq.__version__} (libzmq {zmq.zmq_version()})", "",
                 {"version": zmq.__version__, "libzmq": zmq.zmq_version()})


def run_checks(nnodes: int = 0) -> list[Check]:
    """Every check, in :data:`CHECKS` order."""
    import torch
    import torch.distributed as dist

    nodes = planned_nnodes(nnodes)
    checks = [check_python(), check_torch(torch), check_cuda(torch), check_gpus(torch), check_nvidia_smi(torch),
              check_cudnn(torch), check_nccl(torch, dist), check_gloo(torch, dist), check_mpi(dist),
              check_cpu(torch), check_memory(), check_shm(), *check_network(nodes), check_hostname(nodes),
              check_pyzmq()]
    assert tuple(c.name for c in checks) == CHECKS
    return checks


def verdict(checks: list[Check]) -> dict[str, Any]:
    """Overall status; training can run unless a check failed."""
    statuses = [c.status for c in checks]
    worst = "fail" if "fail" in statuses else "warn" if "warn" in statuses else "ok"
    by = {c.name: c for c in checks}
    device = "cuda" if by["cuda"].detail.get("available") else "cpu"
    backend = "nccl" if device == "cuda" and by["nccl"].detail.get("usable") else "gloo"
    return {"status": worst, "can_train": worst != "fail", "device": device, "backend": backend,
            "warnings": statuses.count("warn"), "failures": statuses.count("fail")}


def main(args: argparse.Namespace) -> int:
    checks = run_checks(args.nnodes)
    v = verdict(checks)
    if args.json:
        print(json.dumps({**v, "checks": [asdict(c) for c in checks]}, indent=2, default=str))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            print(f"  {c.status:<5} {c.name:<{width}}  {c.summary}")
            if c.fix:
                print(f"        {'':<{width}}  fix: {c.fix}")
        where = f"{v['device']}, {v['backend']}"
        head = "training can run here" if v["can_train"] else "training cannot run here"
        print(f"{head} ({where}); {v['warnings']} warning(s), {v['failures']} failure(s)")
    return 0 if v["can_train"] else 1
