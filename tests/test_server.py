"""The server's training receive: every sending client's batch lands, by the transport, in its
own rows of one fused batch, in client order, with each row's k beside it."""
import torch

from collafuse_mpi import comm
from collafuse_mpi.harness import PhaseTimer
from collafuse_mpi.loopback import LoopbackTransport
from collafuse_mpi.server import Server
from collafuse_mpi.training import pack_train
from conftest import tiny_config


def _batch(n, shape, seed, t0):
    g = torch.Generator().manual_seed(seed)
    x, e = torch.randn((n, *shape), generator=g), torch.randn((n, *shape), generator=g)
    return x, e, torch.arange(t0, t0 + n)


def test_receive_step_fuses_client_batches_in_order_and_regrows(tmp_path):
    cfg = tiny_config(tmp_path / "r.h5")
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    tps = LoopbackTransport.group(4)
    ks = [4, 10, 6]  # the middle client owns the whole chain (k = T) and sends nothing
    server = Server(cfg, tps[0], ks, torch.device("cpu"), PhaseTimer())
    assert server.senders == [0, 2]
    for step, rows in enumerate([(4, 4), (2, 3), (5, 6)]):  # fewer rows, then more than the buffer held
        sent = []
        for client, n in zip(server.senders, rows):
            x, e, t = _batch(n, shape, 10 * step + client, 1 + client)
            tps[client + 1].isend(0, comm.TRAIN, client, step, pack_train(x, e, t), meta=ks[client])
            sent.append((x, e, t, torch.full((n,), ks[client])))
        x_t, t, k, eps = server.receive_step(0)
        assert torch.equal(x_t, torch.cat([s[0] for s in sent]))
        assert torch.equal(eps, torch.cat([s[1] for s in sent]))
        assert torch.equal(t, torch.cat([s[2] for s in sent]))
        assert torch.equal(k, torch.cat([s[3] for s in sent]))
        assert x_t.shape[0] == sum(rows) and server._fused.shape[0] >= sum(rows)
