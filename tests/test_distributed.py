"""Meta-training across processes (torch.distributed, Gloo on the CPU): two ranks of one slot each
train the θ one process of two slots trains, up to the order of the gradient sums, and keep θ
identical on every rank."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fastl2r import distributed
from fastl2r.experiments import build_config
from fastl2r.meta import MetaLearner
from fastl2r.meta.trainer import MetaTrainer
from fastl2r.ops import unpack_head
from fastl2r.workspace import Workspace

OVERRIDES = ['arch="resnet8_gn"', "pretrain.epochs=0.02", "metatrain.batch_size=4", "metatrain.episode_steps=4",
             "metatrain.episodes=5", "metatrain.parallel_episodes=2", "metatrain.threshold=[3.0, 100.0, 100.0]",
             "metatrain.tbptt=[2, 1, 3]", "metatrain.curriculum_every=2"]


def workspace(data_root) -> Workspace:
    return Workspace(build_config("exp1", "fmnist", "smoke", overrides=OVERRIDES), data_root=data_root, progress=False)


def float64_trainer(ws: Workspace, ranks=distributed.SINGLE, run_dir=None) -> MetaTrainer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        meta = MetaLearner(ws.new_model(), dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a random output head, so that δ depends on θ everywhere
        for group, head in zip(meta.groups, meta.head):
            w_out, _, _ = unpack_head(head, group.dims)
            w_out.copy_(torch.randn(w_out.shape, generator=g, dtype=torch.float64) * 0.3)
    return MetaTrainer(ws, meta=meta, ranks=ranks, run_dir=run_dir)


def _rank_main(rank: int, world: int, port: int, data_root: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ranks, device = distributed.setup("cpu")
    try:
        trainer = float64_trainer(workspace(data_root), ranks)
        trainer.train(progress=False)
        torch.save({"theta": [p.detach() for p in trainer.meta.parameters()],
                    "history": trainer.progress.history, "slots": trainer.slots}, f"{out}/rank{rank}.pt")
    finally:
        distributed.teardown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_train_what_one_process_with_their_slots_trains(tmp_path):
    ws = workspace(tmp_path)
    ws.pretrained_state(0)  # built once, cached for the ranks
    single = float64_trainer(ws)
    single.train(progress=False)
    assert single.slots == 2 and {r["ended_by"] for r in single.progress.history} >= {"threshold", "horizon"}
    mp.start_processes(_rank_main, args=(2, free_port(), str(tmp_path), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["slots"] for r in ranks] == [1, 1]
    for a, b in zip(ranks[0]["theta"], ranks[1]["theta"]):
        assert torch.equal(a, b)  # θ identical on every rank
    for a, b in zip(ranks[0]["theta"], single.meta.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)
    assert ranks[0]["history"] == ranks[1]["history"]
    for mine, truth in zip(ranks[0]["history"], single.progress.history, strict=True):
        assert (mine["episode"], mine["steps"], mine["ended_by"]) == (truth["episode"], truth["steps"], truth["ended_by"])
        assert mine["final_loss"] == pytest.approx(truth["final_loss"], rel=1e-10)


def test_slots_must_divide_among_the_ranks(tmp_path):
    from fastl2r.errors import UserError
    with pytest.raises(UserError, match="do not divide among 2 ranks"):
        MetaTrainer(Workspace(build_config("exp1", "fmnist", "smoke", overrides=[
            'arch="resnet8_gn"', "metatrain.parallel_episodes=3"]), data_root=tmp_path, progress=False),
            ranks=distributed.Ranks(0, 2))
