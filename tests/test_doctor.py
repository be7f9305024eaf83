"""paratrain doctor: every field in the JSON, exit 0 on this CPU machine, multi-host warnings."""

from __future__ import annotations

import json
import socket

from paratrain import doctor
from paratrain.cli import main
from paratrain.netinfo import _nccl_match, gloo_interface, nccl_interface

IFACES = [{"name": "lo", "index": 1, "up": True, "loopback": True, "ipv4": ["127.0.0.1"]},
          {"name": "docker0", "index": 2, "up": True, "loopback": False, "ipv4": ["172.17.0.1"]},
          {"name": "eth0", "index": 3, "up": True, "loopback": False, "ipv4": ["10.250.77.5"]}]


def test_doctor_json_has_every_check_and_exits_0(capsys):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("status", "can_train", "device", "backend", "warnings", "failures", "checks"):
        assert key in report, key
    assert report["can_train"] is True and report["failures"] == 0
    assert [c["name"] for c in report["checks"]] == list(doctor.CHECKS)
    for c in report["checks"]:
        assert set(c) == {"name", "status", "summary", "fix", "detail"}, c
        assert c["status"] in ("ok", "warn", "fail") and c["summary"]
        assert c["status"] == "ok" or c["fix"], c
    by = {c["name"]: c for c in report["checks"]}
    assert by["torch"]["detail"]["version"] and by["python"]["detail"]["version"]
    assert by["gloo"]["status"] == "ok" and by["gloo"]["detail"]["usable"] is True
    assert by["cpu"]["detail"]["cores"] >= 1 and by["memory"]["detail"]["total_gb"] > 0
    assert "total_gb" in by["shm"]["detail"] and by["network"]["detail"]["interfaces"]
    assert by["pyzmq"]["detail"]["version"]
    if report["device"] == "cpu":  # CPU-only is a valid, warned state
        assert by["cuda"]["status"] == "warn" and "CUDA build of torch" in by["cuda"]["fix"]


def test_doctor_text_output(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "training can run here" in out.splitlines()[-1]
    assert all(name in out for name in doctor.CHECKS)


def test_hostname_on_loopback_warns_only_in_multi_host_jobs(monkeypatch):
    monkeypatch.setattr(socket, "gethostbyname", lambda host: "127.0.1.1")
    assert doctor.check_hostname(1).status == "ok"
    multi = doctor.check_hostname(2)
    assert multi.status == "warn" and "--local-addr" in multi.fix and "GLOO_SOCKET_IFNAME" in multi.fix
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    assert doctor.planned_nnodes() == 2
    assert doctor.run_checks()[list(doctor.CHECKS).index("hostname")].status == "warn"


def test_which_interface_gloo_and_nccl_pick(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    monkeypatch.setattr(socket, "gethostbyname", lambda host: "10.250.77.5")
    assert gloo_interface(IFACES)["interfaces"] == ["eth0"]
    assert nccl_interface(IFACES)["interfaces"] == ["eth0"]  # docker* and lo come last
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth9")
    assert "error" in gloo_interface(IFACES)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth0")
    assert gloo_interface(IFACES)["addresses"] == ["10.250.77.5"]
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "^docker,lo")
    assert nccl_interface(IFACES)["interfaces"] == ["eth0"]
    assert _nccl_match("=eth", "eth0") is False and _nccl_match("eth", "eth0") is True


def test_multi_host_warning_at_launch(monkeypatch):
    monkeypatch.setattr(socket, "gethostbyname", lambda host: "127.0.1.1")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    assert doctor.multi_host_warning() is None
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    assert "127.0.1.1" in doctor.multi_host_warning()
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth0")
    assert doctor.multi_host_warning() is None
