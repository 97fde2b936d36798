"""The fine-tuning command over several processes (torchrun, gloo on the CPU, the small
random SAM): the same adapters as one process on the same batches, resume after kill -9
with two processes or one, clear errors instead of hangs; gradient accumulation and
activation checkpointing against the plain step."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("segment_anything", reason="the SAM tests need segment-anything "
                    "(pip install -e .[test])")
pytest.importorskip("PIL", reason="the data tests need Pillow")
pytest.importorskip("convlora_kernels._C", reason="the cpu backend is not built")

import torch.distributed as dist  # noqa: E402

from convlora_kernels.seg.synthetic import synthetic_split  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 3 classes: the cross-entropy's pixel count and the soft Dice's statistics are batch-wide,
# as are the routers' (token routing, 4 experts): all must be summed over the processes.
COMMON = ["--model-type", "tiny", "--backend", "cpu", "--batch-size", "4", "--lr", "1e-3",
          "--seed", "1", "--no-progress", "--skip-data-check", "--experts", "4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic3")
    return synthetic_split(root, 16, 5, num_classes=3, size=128, seed=0)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _train_cmd(data, out, *extra, procs=1):
    args = ["train", "--train", str(data[0]), "--val", str(data[1]), "--num-classes", "3",
            "--out", str(out), *COMMON, *map(str, extra)]
    if procs == 1:
        return [sys.executable, "-m", "convlora_kernels.finetune", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={procs}", "-m", "convlora_kernels.finetune", *args]


def _run(cmd, timeout=600):
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def _adapters(folder, name="last.safetensors"):
    from safetensors.torch import load_file

    return load_file(str(folder / name))


def _first_step_gradients(folder):
    """The Adam moments after a run's first step (last.pt), by parameter name: g / 10 and
    g² / 1000 (a plain run's Adam state is by index, a sharded run's by name)."""
    from convlora_kernels.seg.trainer import FinetuneConfig, _segmenter

    state = torch.load(folder / "last.pt", weights_only=False)
    assert state["step"] == 1
    moments = state["optimizer"]["state"]
    if all(isinstance(k, int) for k in moments):
        cfg = FinetuneConfig("", 3, "", model_type="tiny", num_experts=4, backend="cpu")
        names = [n for n, p in _segmenter(cfg, torch.device("cpu")).named_parameters()
                 if p.requires_grad]
        moments = {names[k]: v for k, v in moments.items()}
    return {k: (v["exp_avg"], v["exp_avg_sq"]) for k, v in moments.items()}


def _assert_same_gradients(a, b):
    """The first step's gradients of two runs equal to float32 rounding: to 1e-4 of each
    tensor's largest entry (the sums run in other orders), and to 2e-5 of the largest of
    all for the tensors whose gradient is rounding noise (lora_B while the experts' output
    is nearly zero, a bias that a softmax cancels). A lost or doubled term (a statistic
    not summed over the processes, a gradient averaged twice) is off by tens of percent.
    Forwards over other batch sizes (one image against two) round differently, and the
    softmax's cancellation in the decoder's shared weights grows that to 1e-3: the runs
    compared keep every process's forward at two images."""
    assert a.keys() == b.keys() and len(a) > 50
    # at the first step lora_B is zero, so the experts have no gradient yet
    assert sum(bool(a[k][0].abs().max() > 0) for k in a) > 0.6 * len(a)
    floor = [2e-5 * max(a[k][i].abs().max().item() for k in a) for i in (0, 1)]
    for k in a:
        for i, (x, y) in enumerate(zip(a[k], b[k], strict=True)):
            torch.testing.assert_close(y, x, rtol=0, atol=max(1e-4 * x.abs().max().item(),
                                                              floor[i]),
                                       msg=f"parameter {k}")


def _assert_same_run(a, b, lr=1e-3):
    """Two runs' losses and validations equal to float32 rounding at every step, and their
    adapters within Adam's reach of each other: Adam moves a weight by about lr a step
    whatever its gradient's size, so a gradient within rounding of zero may move it either
    way (the first step's gradients are compared tightly: _assert_same_gradients)."""
    ha = json.loads((a / "history.json").read_text())
    hb = json.loads((b / "history.json").read_text())
    assert [h.get("step", h.get("validation", {}).get("step")) for h in ha] == \
        [h.get("step", h.get("validation", {}).get("step")) for h in hb]
    for x, y in zip(ha, hb, strict=True):
        if "loss" in x:
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-4), x["step"]
        else:
            # an arg max over the nearly equal logits of a barely trained model: a weight
            # moved by rounding flips a few pixels, and a rare class's IoU with them (the
            # sums over processes themselves: test_metrics_summed_over_shares)
            for m, tol in (("miou", 0.03), ("pixel_accuracy", 0.02)):
                assert y["validation"][m] == pytest.approx(x["validation"][m], abs=tol)
    losses = [h["loss"] for h in ha if "loss" in h]
    assert len(set(losses)) == len(losses)
    wa, wb = _adapters(a), _adapters(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=lr * len(losses), msg=k)


@pytest.fixture(scope="module")
def one_and_two(data, tmp_path_factory):
    """{(processes, passes): (the first step's gradients, the run's folder)}: one and two
    processes, plain at batch 4 and with 2 accumulation passes at batch 8 (so that each
    process's forward holds 2 images, as one process's does: the same GEMM shapes); 1
    step, then resumed to 4. And (1, 0): one process, batch 8 in one pass, 1 step."""
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for accum in (1, 2):
        for procs in (1, 2):
            out = root / f"p{procs}a{accum}"
            size = ["--grad-accum", accum, "--batch-size", 4 * accum]
            status, _, err = _run(_train_cmd(data, out, "--steps", 1, "--val-every", 1,
                                             *size, procs=procs))
            assert status == 0, err[-3000:]
            first = _first_step_gradients(out)
            status, _, err = _run(_train_cmd(data, out, "--steps", 4, "--val-every", 2,
                                             *size, "--resume", procs=procs))
            assert status == 0, err[-3000:]
            runs[procs, accum] = first, out
    out = root / "whole8"
    status, _, err = _run(_train_cmd(data, out, "--steps", 1, "--val-every", 1,
                                     "--batch-size", 8))
    assert status == 0, err[-3000:]
    runs[1, 0] = _first_step_gradients(out), out
    return runs


@pytest.mark.slow  # nine runs, four of them under torchrun: ~3 min on 2 cores
@pytest.mark.parametrize("accum", [1, 2])
def test_two_processes_train_what_one_does(one_and_two, accum):
    (g1, one), (g2, two) = one_and_two[1, accum], one_and_two[2, accum]
    _assert_same_gradients(g1, g2)
    _assert_same_run(one, two)
    # the files a run writes, written once (by rank 0), none left half-written
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert not [p for p in two.iterdir() if p.name.startswith(".")]
    cfg = json.loads((two / "finetune.json").read_text())
    assert cfg["batch_size"] == 4 * accum and cfg["grad_accum"] == accum


@pytest.mark.slow
def test_accumulation_passes_train_what_the_whole_batch_does(one_and_two):
    """2 passes of 4 images: the first step's gradient is that of the batch of 8 in one
    pass, the soft Dice's and the routers' statistics included (measured over the whole
    batch before the passes)."""
    _assert_same_gradients(one_and_two[1, 0][0], one_and_two[1, 2][0])


@pytest.mark.slow  # two runs under torchrun, an eval: ~1 min on 2 cores
def test_sharded_run_trains_what_one_process_does(one_and_two, data, tmp_path):
    """--shard (FSDP2, with --grad-checkpoint too): the first step's gradients and the run
    are those of one process; the files are an unsharded run's, and best.safetensors
    evaluates without torchrun."""
    g1, one = one_and_two[1, 1]
    out = tmp_path / "sharded"
    for steps in (["--steps", 1, "--val-every", 1], ["--steps", 4, "--val-every", 2,
                                                     "--resume"]):
        status, _, err = _run(_train_cmd(data, out, *steps, "--shard", "--grad-checkpoint",
                                         procs=2))
        assert status == 0, err[-3000:]
        if "--resume" not in steps:
            _assert_same_gradients(g1, _first_step_gradients(out))
    _assert_same_run(one, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in one.iterdir())
    status, printed, err = _run([sys.executable, "-m", "convlora_kernels.finetune", "eval",
                                 "--weights", str(out / "best.safetensors"), "--data",
                                 str(data[1]), "--backend", "cpu", "--no-progress"])
    assert status == 0, err[-3000:]
    best = json.loads((out / "history.json").read_text())
    recorded = [h["validation"] for h in best if "validation" in h]
    step = json.loads(printed.strip().splitlines()[-1])
    assert 0 <= step["miou"] <= 1 and max(v["miou"] for v in recorded) == pytest.approx(
        step["miou"], abs=0.03)


@pytest.mark.slow  # three runs, two under torchrun: ~1 min on 2 cores
def test_sharded_run_resumes_with_another_world_size(data, tmp_path):
    """A --shard run of two processes resumed by three: Adam's state, saved whole by
    parameter name, is cut anew, and the run goes on as one process's would."""
    common = ["--batch-size", 6, "--val-every", 2]
    one = tmp_path / "one"
    status, _, err = _run(_train_cmd(data, one, *common, "--steps", 4))
    assert status == 0, err[-3000:]
    out = tmp_path / "sharded"
    status, _, err = _run(_train_cmd(data, out, *common, "--steps", 2, "--shard", procs=2))
    assert status == 0, err[-3000:]
    status, _, err = _run(_train_cmd(data, out, *common, "--steps", 4, "--shard", "--resume",
                                     procs=3))
    assert status == 0, err[-3000:]
    _assert_same_run(one, out)


def test_shard_needs_torchrun(data, tmp_path, capsys):
    from convlora_kernels import finetune

    assert finetune.main(["train", "--train", str(data[0]), "--num-classes", "3", "--out",
                          str(tmp_path / "x"), "--model-type", "tiny", "--shard",
                          "--no-progress"]) == 2
    assert "shard: --shard splits the weights over the processes" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_batch_that_does_not_split_is_an_error(data, tmp_path):
    start = time.time()
    status, out, err = _run(_train_cmd(data, tmp_path / "bad", "--steps", 2,
                                       "--batch-size", 3, procs=2), timeout=300)
    assert status != 0
    assert "batch_size: 3 images per step do not split over 2 processes" in err, err[-2000:]
    # each rank says it on a line of its own; the only traceback is torchrun's own report
    assert "convlora_kernels/" not in err, err[-2000:]
    assert not (tmp_path / "bad" / "finetune.json").exists()
    assert time.time() - start < 120


def _children(pid):
    """Process ids whose parent is pid (Linux /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


@pytest.mark.slow  # three runs under torchrun and two alone: ~2 min on 2 cores
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_one_rank_then_resume_with_two_or_one(data, tmp_path):
    """kill -9 of rank 1 after a checkpoint; torchrun stops the other; --resume with two
    processes, or with one, ends where an uninterrupted run ends, history continuous."""
    steps = ["--steps", 6, "--val-every", 2]
    whole = tmp_path / "whole"
    status, _, err = _run(_train_cmd(data, whole, *steps))
    assert status == 0, err[-3000:]

    cut = tmp_path / "cut"
    proc = subprocess.Popen(_train_cmd(data, cut, *steps, procs=2), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (cut / "last.pt").exists() and proc.poll() is None \
                and time.time() < deadline:
            time.sleep(0.02)
        ranks = _children(proc.pid)
        assert ranks, "torchrun's workers were not found"
        os.kill(max(ranks), signal.SIGKILL)  # one of the two ranks
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    saved = torch.load(cut / "last.pt", weights_only=False)
    assert saved["step"] < 6, "the run finished before it could be killed"
    assert not [p for p in cut.iterdir() if p.name.startswith(".")]  # nothing half-written

    cut2 = tmp_path / "cut2"
    shutil.copytree(cut, cut2)
    for folder, procs in ((cut, 2), (cut2, 1)):
        status, _, err = _run(_train_cmd(data, folder, *steps, "--resume", procs=procs))
        assert status == 0, err[-3000:]
        _assert_same_run(whole, folder)
        hist = json.loads((folder / "history.json").read_text())
        assert [h["step"] for h in hist if "loss" in h] == list(range(1, 7))


def test_grad_checkpoint_gives_the_same_gradients():
    """Activation checkpointing per encoder block: the same loss and gradients (the
    routers' noise drawn again alike when a block's forward is recomputed)."""
    from convlora_kernels.gating import PerSampleNoise, routing_scope
    from convlora_kernels.seg.distributed import checkpoint_blocks
    from convlora_kernels.seg.losses import segmentation_loss
    from convlora_kernels.seg.model import SamSegmenter
    from convlora_kernels.seg.trainer import build_sam

    torch.manual_seed(0)
    images = torch.rand(2, 3, 128, 128) * 255
    masks = torch.randint(0, 3, (2, 128, 128))
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(1)  # the same adapters' initialisation
        seg = SamSegmenter(build_sam("tiny", seed=4), 3, r=4, num_experts=4,
                           backend="cpu").train()
        with torch.no_grad():  # adapters that are not zero, routers that route
            for n, p in seg.named_parameters():
                if p.requires_grad and ("lora_B" in n or "router" in n):
                    p.normal_(0, 0.1)
        if checkpointed:
            assert checkpoint_blocks(seg) == 4 and checkpoint_blocks(seg) == 0
        with routing_scope(noise=PerSampleNoise(seg, 7).keys([3, 9])):
            loss = segmentation_loss(seg(images), masks, seg.aux_loss())
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in seg.named_parameters()
                                      if p.requires_grad}))
    (l0, g0), (l1, g1) = grads
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys() and any("router" in k for k in g0)
    for k in g0:
        assert g0[k] is not None and g0[k].abs().max() > 0, k
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)


def test_accumulation_of_a_whole_batch_equals_it(tmp_path):
    """--grad-accum 2 at batch 4 computes the gradient batch 4 does: binary structure loss
    and the routers' aux loss (4 experts), whose load balance is measured over the batch."""
    train_dir, _ = synthetic_split(tmp_path / "d", 8, 2, num_classes=1, size=128, seed=2)
    grads = []
    for accum in (1, 2):
        out = tmp_path / f"a{accum}"
        status, _, err = _run([sys.executable, "-m", "convlora_kernels.finetune", "train",
                               "--train", str(train_dir), "--num-classes", "1", "--out",
                               str(out), "--model-type", "tiny", "--backend", "cpu",
                               "--batch-size", "4", "--lr", "1e-3", "--no-progress",
                               "--skip-data-check", "--experts", "4", "--steps", "1",
                               "--val-every", "1", "--grad-accum", str(accum)])
        assert status == 0, err[-3000:]
        grads.append(_first_step_gradients(out))
    _assert_same_gradients(*grads)


@pytest.mark.parametrize("num_classes", [1, 3])
def test_metrics_summed_over_shares(num_classes):
    """Validation over processes: each scores its share, the running sums are added
    (SegmentationMetrics.reduce); the metrics are those of the whole set, exactly for
    the counts (IoU from summed intersections and unions, not averaged ratios)."""
    from convlora_kernels.seg.metrics import SegmentationMetrics

    torch.manual_seed(0)
    k = num_classes
    logits = torch.randn(7, k, 9, 11)
    target = torch.randint(0, max(2, k), (7, 9, 11))
    target[2, :4] = 255
    whole = SegmentationMetrics(k)
    for i in range(0, 7, 2):
        whole.update(logits[i:i + 2], target[i:i + 2])
    shares = [SegmentationMetrics(k) for _ in range(3)]
    for rank, m in enumerate(shares):
        for i in range(rank, 7, 3):
            m.update(logits[i:i + 1], target[i:i + 1])

    def summed(values):
        return [sum(v) for v in zip(*(m._values for m in shares))]

    for m in shares:
        m._values = [float(v) for v in m.confusion.flatten().tolist()] + [
            m.images, m.scored, m.valid_pixels, m.iou_sum, m.dice_sum, m.mae_sum]
    for m in shares:
        m.reduce(summed)
    a, b = whole.compute(), shares[1].compute()
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-12, nan_ok=True), key
    assert torch.equal(shares[0].confusion, whole.confusion)
    assert shares[2].valid_pixels == whole.valid_pixels == 7 * 99 - 44
