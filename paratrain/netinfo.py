"""Network interfaces and which one gloo / NCCL would use (for ``paratrain doctor``).

Linux only in full (IPv4 addresses via ``SIOCGIFADDR``); elsewhere the lists come back
with fewer details rather than failing.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
from pathlib import Path
from typing import Any

_SIOCGIFADDR = 0x8915
_IFF_UP, _IFF_LOOPBACK = 0x1, 0x8


def _ipv4(name: str) -> list[str]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return []
    return [socket.inet_ntoa(raw[20:24])]


def _flags(name: str) -> int:
    try:
        return int((Path("/sys/class/net") / name / "flags").read_text().strip(), 16)
    except (OSError, ValueError):
        return _IFF_UP | (_IFF_LOOPBACK if name == "lo" else 0)


def interfaces() -> list[dict[str, Any]]:
    """Every interface: name, index, up, loopback, IPv4 addresses."""
    out = []
    try:
        names = socket.if_nameindex()
    except OSError:
        names = []
    for index, name in names:
        flags = _flags(name)
        out.append({"name": name, "index": index, "up": bool(flags & _IFF_UP),
                    "loopback": bool(flags & _IFF_LOOPBACK), "ipv4": _ipv4(name)})
    return out


def _owner(addr: str, ifaces: list[dict[str, Any]]) -> str | None:
    """The interface that holds ``addr`` (any 127.x belongs to the loopback one)."""
    for i in ifaces:
        if addr in i["ipv4"]:
            return i["name"]
    if ipaddress.ip_address(addr).is_loopback:
        return next((i["name"] for i in ifaces if i["loopback"]), "lo")
    return None


def gloo_interface(ifaces: list[dict[str, Any]]) -> dict[str, Any]:
    """What gloo binds to: GLOO_SOCKET_IFNAME, else the address this host name resolves to."""
    env = os.environ.get("GLOO_SOCKET_IFNAME", "")
    by_name = {i["name"]: i for i in ifaces}
    if env:
        names = [n for n in env.split(",") if n]
        bad = [n for n in names if n not in by_name or not by_name[n]["ipv4"]]
        info = {"source": "GLOO_SOCKET_IFNAME", "interfaces": names,
                "addresses": [a for n in names if n in by_name for a in by_name[n]["ipv4"]]}
        if bad:
            info["summary"] = f"GLOO_SOCKET_IFNAME={env}: {', '.join(bad)} missing or without IPv4"
            info["error"] = f"set GLOO_SOCKET_IFNAME to one of: {', '.join(sorted(by_name))}"
        else:
            info["summary"] = f"{env} (GLOO_SOCKET_IFNAME) {', '.join(info['addresses'])}"
        return info
    host = socket.gethostname()
    try:
        addr = socket.gethostbyname(host)
    except OSError:
        addr = "127.0.0.1"
    name = _owner(addr, ifaces)
    info = {"source": "hostname", "interfaces": [name] if name else [], "addresses": [addr]}
    note = "; other hosts cannot reach it: set GLOO_SOCKET_IFNAME" if addr.startswith("127.") else ""
    info["summary"] = f"{name or '?'} ({host} resolves to {addr}{note})"
    return info


def _nccl_match(spec: str, name: str) -> bool:
    exclude = spec.startswith("^")
    spec = spec.lstrip("^")
    exact = spec.startswith("=")
    prefixes = [p for p in spec.lstrip("=").split(",") if p]
    hit = any(name == p if exact else name.startswith(p) for p in prefixes)
    return not hit if exclude else hit


def nccl_interface(ifaces: list[dict[str, Any]]) -> dict[str, Any]:
    """What NCCL's socket transport picks: NCCL_SOCKET_IFNAME, else ib*, else non-docker, non-lo, else lo."""
    usable = [i for i in ifaces if i["up"] and i["ipv4"]]
    env = os.environ.get("NCCL_SOCKET_IFNAME", "")
    if env:
        chosen = [i["name"] for i in usable if _nccl_match(env, i["name"])]
        info = {"source": "NCCL_SOCKET_IFNAME", "interfaces": chosen}
        if not chosen:
            info["summary"] = f"NCCL_SOCKET_IFNAME={env} matches no interface that is up"
            info["error"] = f"set NCCL_SOCKET_IFNAME to one of: {', '.join(i['name'] for i in usable)}"
        else:
            info["summary"] = f"{', '.join(chosen)} (NCCL_SOCKET_IFNAME={env})"
        return info
    ib = [i["name"] for i in usable if i["name"].startswith("ib")]
    other = [i["name"] for i in usable if not i["loopback"] and not i["name"].startswith("docker")]
    chosen = ib or other or [i["name"] for i in usable if i["loopback"]]
    info = {"source": "default", "interfaces": chosen[:1]}
    info["summary"] = f"{chosen[0]} (NCCL default order: ib*, then non-docker, then lo)" if chosen else "none"
    return info
