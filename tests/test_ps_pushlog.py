"""The worker's push log: bounded memory over many steps, exact read-back from disk, and a
real server restarted from a checkpoint brought back to the uninterrupted state by pushes
replayed from the spilled log."""

from __future__ import annotations

import torch

from paratrain.ps.launch import free_ports
from paratrain.ps.protocol import FrameRecord, KeyRecord, Msg, frame_record, tensor_frame
from paratrain.ps.pushlog import Entry, PushLog
from tests.test_ps_units import ServerThread, cfg_for, ps_worker, set_grads, tiny_model


def make_entry(clock: int, n: int = 16384) -> Entry:
    g = torch.Generator().manual_seed(clock)
    a, b = torch.randn(n, generator=g), torch.randint(0, 1000, (7,), generator=g)
    bodies = {0: ([KeyRecord(3, 0, 1), KeyRecord(4, 2, 1, 1, 5, -2)], [frame_record(a), frame_record(b)],
                  [tensor_frame(a), tensor_frame(b)], False),
              1: ([KeyRecord(9, 0, 0, 2)], [FrameRecord(0, (4, 2))], [tensor_frame(torch.ones(8))], True)}
    return Entry(clock, 0.1 * clock, float(clock % 5), bodies, [clock, clock + 1], None if clock % 2 else 0.5)


def same(a: Entry, b: Entry) -> bool:
    if (a.clock, a.lr, a.weight, a.base, a.coef) != (b.clock, b.lr, b.weight, b.base, b.coef):
        return False
    for i, (ra, fa, xa, pa) in a.bodies.items():
        rb, fb, xb, pb = b.bodies[i]
        if ra != rb or fa != fb or pa != pb or [bytes(x) for x in xa] != [bytes(x) for x in xb]:
            return False
    return True


def test_memory_stays_bounded_and_disk_is_trimmed_per_checkpoint(tmp_path):
    log = PushLog(tmp_path / "log", tail=2)
    size = make_entry(1).nbytes
    every, steps = 25, 310
    last_ckpt = 0
    try:
        for c in range(1, steps + 1):
            log.append(make_entry(c))
            assert log.mem_bytes <= 4 * size  # queued + being written, never the whole history
            if c % every == 0:  # a checkpoint commits the previous one: trim up to it
                log.trim(last_ckpt)
                last_ckpt = c
                assert log.disk_bytes <= 2 * every * (size + 1024)
        assert log.peak_mem_bytes <= 4 * size < steps * size / 50
        files = sorted(p.name for p in (tmp_path / "log").iterdir())
        assert len(files) == 2, files  # the interval since the last checkpoint and the one before it
        got = list(log.entries_after(last_ckpt - 3))  # crosses into the newest segment
        assert [e.clock for e in got] == list(range(last_ckpt - 2, steps + 1))
        assert all(same(e, make_entry(e.clock)) for e in got)
        assert [e.clock for e in log.entries_after(0)] == list(range(last_ckpt - every + 1, steps + 1))
    finally:
        log.close()
    assert not (tmp_path / "log").exists()


def test_replay_from_the_spilled_log_restores_the_uninterrupted_state(tmp_path):
    """40 async pushes, checkpoint at 8, crash at 36: 28 pushes come back from disk."""
    cfg = cfg_for("async", **{"train.optimizer": "adamw", "train.weight_decay": 0.1, "run.dir": f'"{tmp_path}"'})
    endpoint = f"tcp://127.0.0.1:{free_ports('127.0.0.1', 1)[0]}"

    def run(crash: bool) -> tuple[list[torch.Tensor], dict]:
        model = tiny_model()
        servers = [ServerThread(cfg, endpoint=endpoint)]
        ckpt = tmp_path / f"ckpt{int(crash)}"
        ckpt.mkdir()
        try:
            with ps_worker(cfg, endpoint, 0, model, keep_log=True) as w:
                w.connect(0)
                push = 0
                for step in range(1, 41):
                    set_grads(model, step)
                    w.step(0.01, 1.0)
                    push = max(push, w.current.nbytes)
                    w.finish()  # the next gradient depends on the parameters: the same ones in both runs
                    if step == 8:
                        w.request(0, Msg.CHECKPOINT, {"path": str(ckpt)})
                        w.trim(0)
                    if step == 36 and crash:
                        servers[-1].stop()
                        servers.append(ServerThread(cfg, endpoint=endpoint, resume=ckpt / "ps_server0.pt"))
                stats = {"peak": w.pushlog.peak_mem_bytes, "disk": w.pushlog.disk_bytes, "push": push}
                if crash:
                    assert w.recoveries == 1 and servers[-1].srv.shard.version == 40
                w.close_log()
                return [p.detach().clone() for p in model.parameters()], stats
        finally:
            for st in servers:
                st.stop()

    (plain, s0), (crashed, s1) = run(False), run(True)
    for a, b in zip(plain, crashed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    for s in (s0, s1):
        assert s["peak"] <= 4 * s["push"] and s["disk"] >= 30 * s["push"], s
