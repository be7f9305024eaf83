"""bench comm: every op runs on 2 local processes; bus bandwidth follows the nccl-tests formulas."""

from __future__ import annotations

import json

import pytest

from paratrain.bench import parse_sizes
from paratrain.bench.comm import OPS, bus_factor
from paratrain.cli import main


@pytest.mark.slow
def test_bench_comm_two_processes(tmp_path, capsys):
    out = tmp_path / "comm.json"
    rc = main(["bench", "comm", "--nproc", "2", "--sizes", "4K,64K", "--target-s", "0.01", "--max-iters", "5",
               "--out", str(out), "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = json.loads(out.read_text())
    assert printed == result
    assert result["world_size"] == 2 and result["backend"] == "gloo" and result["memcpy_gbps"] > 0
    rows = result["results"]
    assert sorted({r["op"] for r in rows}) == sorted(OPS)
    for r in rows:
        assert r["bytes"] in (4096, 65536) and 3 <= r["iters"] <= 5 and r["time_us"] > 0
        assert r["algbw_gbps"] == pytest.approx(r["bytes"] / (r["time_us"] * 1e-6) / 1e9)
        assert r["busbw_gbps"] == pytest.approx(r["algbw_gbps"] * bus_factor(r["op"], 2))
    h = result["headline"]
    assert h["all_reduce_bytes"] == 65536
    assert h["busbw_over_memcpy"] == pytest.approx(h["all_reduce_busbw_gbps"] / result["memcpy_gbps"])


def test_bus_factors_are_the_nccl_tests_definitions():
    assert bus_factor("all_reduce", 4) == pytest.approx(2 * 3 / 4)
    assert bus_factor("all_gather", 4) == bus_factor("reduce_scatter", 4) == pytest.approx(3 / 4)
    assert bus_factor("broadcast", 8) == bus_factor("send_recv", 8) == 1.0
    assert bus_factor("ps_push_pull", 3) == 4.0


def test_sizes_and_bad_arguments(capsys):
    assert parse_sizes("4K:256M", 4) == [4 << 10 << 2 * i for i in range(9)]
    assert parse_sizes("4K,1M", 2) == [4096, 1 << 20]
    assert main(["bench", "comm", "--sizes", "abc"]) == 2
    assert main(["bench", "comm", "--max-iters", "0"]) == 2
    assert main(["bench", "comm", "--target-s", "nan"]) == 2
    assert main(["bench", "comm", "--ops", "all_reduce,alltoall"]) == 2
    assert main(["bench", "memory"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 5 and "--max-iters 0 must be at least 1" in err and "--target-s nan must be" in err
