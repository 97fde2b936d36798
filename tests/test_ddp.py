"""Conv-LoRA under DistributedDataParallel: two CPU processes on gloo, no
find_unused_parameters, different data per rank, identical adapters at the end."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("segment_anything", reason="the SAM tests need segment-anything "
                    "(pip install -e .[test])")

from sam_helpers import DDP_GATINGS, DDP_STEPS, ddp_worker

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Both gatings' results from one two-process run (starting processes is the slow part)."""
    out = tmp_path_factory.mktemp("ddp")
    world = 2
    # spawn, not fork: each rank is a fresh interpreter, as under torchrun
    mp.spawn(ddp_worker, args=(world, _free_port(), str(out)), nprocs=world, join=True)
    return {g: [torch.load(out / f"{g}-rank{r}.pt") for r in range(world)] for g in DDP_GATINGS}


@pytest.mark.parametrize("gating", DDP_GATINGS)
def test_two_ranks_end_with_identical_adapters(ddp_runs, gating):
    runs = ddp_runs[gating]
    # the ranks saw different data, so without gradient averaging they would diverge
    for step in range(DDP_STEPS):
        assert runs[0]["losses"][step] != runs[1]["losses"][step], step
    final0, final1 = runs[0]["final"], runs[1]["final"]
    assert final0.keys() == final1.keys() == runs[0]["initial"].keys()
    assert any(k.endswith("lora_A") for k in final0) and any("mask_decoder" in k for k in final0)
    for k in final0:
        assert torch.equal(final0[k], final1[k]), f"{k}: ranks differ by " \
            f"{(final0[k] - final1[k]).abs().max().item():.3e}"
    # every adapter tensor trained (lora_B and the experts move from step 2 on)
    for k in final0:
        if ".qkv." in k:
            assert not torch.equal(final0[k], runs[0]["initial"][k]), f"{k} did not change"
    if gating == "map":
        # one image per rank: a global block's router has one unit, so 3 of the 4 experts
        # went unchosen on that rank, and DDP still found a gradient for each of them
        assert min(runs[0]["experts_chosen"]) == 1 and min(runs[1]["experts_chosen"]) == 1
