"""The fine-tuning flow end to end on synthetic data with the small random SAM: train
(learning test), evaluate, resume, predict, the command line and its errors."""

import json

import pytest
import torch

pytest.importorskip("segment_anything", reason="the SAM tests need segment-anything "
                    "(pip install -e .[test])")
pytest.importorskip("PIL", reason="the data tests need Pillow")

from convlora_kernels import finetune
from convlora_kernels.seg.data import SegmentationDataset, read_image, read_mask
from convlora_kernels.seg.synthetic import synthetic_split
from convlora_kernels.seg.trainer import (FinetuneConfig, build_sam, evaluate, load_segmenter,
                                        predict, train)

STEPS = 150


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    train_dir, val_dir = synthetic_split(root, 48, 16, num_classes=1, size=128, seed=0)
    return train_dir, val_dir


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = FinetuneConfig(train_data=str(data[0]), val_data=str(data[1]), num_classes=1,
                         out=str(out), model_type="tiny", steps=STEPS, val_every=30, lr=1e-3,
                         backend="cpu")
    logs = []
    result = train(cfg, progress=False, log=logs.append)
    return cfg, out, result, logs


def _all_foreground_iou(val_dir):
    """The IoU of predicting foreground everywhere: the score to beat by far."""
    ds = SegmentationDataset(val_dir, 1)
    scores = [(ds[i]["mask"] == 1).float().mean().item() for i in range(len(ds))]
    return sum(scores) / len(scores)

@pytest.mark.slow  # the shared 150-step training run: ~2 min on 2 cores
def test_training_learns_the_task(run, data):
    cfg, out, result, logs = run
    validations = [h["validation"] for h in result["history"] if "validation" in h]
    assert [v["step"] for v in validations] == [30, 60, 90, 120, 150]
    first, best = validations[0]["iou"], max(v["iou"] for v in validations)
    chance = _all_foreground_iou(data[1])
    assert best > 0.35 and best > 2 * chance and best > first + 0.2, (first, best, chance)
    assert result["best"]["score"] == best
    losses = [h["loss"] for h in result["history"] if "loss" in h]
    assert len(losses) == STEPS and sum(losses[-20:]) < sum(losses[:20])
    assert len(logs) == 5 and logs[0].startswith("step 30: validation {'iou': ")
    assert sorted(p.name for p in out.iterdir()) == [
        "best.safetensors", "curve.png", "finetune.json", "history.json", "last.pt",
        "last.safetensors"]
    assert json.loads((out / "finetune.json").read_text())["steps"] == STEPS

@pytest.mark.slow  # the shared 150-step training run: ~2 min on 2 cores
def test_evaluate_and_predict_from_the_saved_files(run, data, tmp_path):
    cfg, out, result, _ = run
    seg = load_segmenter(out / "best.safetensors", backend="cpu")
    metrics = evaluate(seg, data[1], progress=False)
    assert metrics["iou"] == pytest.approx(result["best"]["score"], abs=1e-6)

    images = sorted((data[1] / "images").iterdir())[:3]
    written = predict(seg, images, tmp_path / "pred", progress=False)
    assert [p.name for p in written] == [p.name for p in images]
    for img_path, mask_path in zip(images, written, strict=True):
        want = seg.predict(read_image(img_path)[None])[0]
        assert torch.equal(read_mask(mask_path, 1), want)
        assert (tmp_path / "pred" / f"{img_path.stem}_overlay.png").is_file()

@pytest.mark.slow  # the shared 150-step training run: ~2 min on 2 cores
def test_resume_continues_the_run(run, data, tmp_path):
    cfg, out, result, _ = run
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    state = torch.load(copy / "last.pt", weights_only=False)
    logs = []
    more = FinetuneConfig(**{**cfg.__dict__, "out": str(copy), "steps": STEPS + 10,
                             "val_every": 10})
    resumed = train(more, resume=True, progress=False, log=logs.append)
    assert logs[0] == f"resumed from {copy / 'last.pt'} at step {STEPS}"
    assert resumed["step"] == STEPS + 10
    assert resumed["history"][:len(state["history"])] == state["history"]
    adam = torch.load(copy / "last.pt", weights_only=False)["optimizer"]["state"]
    assert all(s["step"].item() == STEPS + 10 for s in adam.values())

    changed = FinetuneConfig(**{**more.__dict__, "lr": 1e-4})
    with pytest.raises(ValueError, match=r"resume: the run in .* was trained with lr=0.001, "
                                         r"now lr=0.0001; resume with the same settings"):
        train(changed, resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="resume: .*last.pt does not exist"):
        train(FinetuneConfig(**{**more.__dict__, "out": str(tmp_path / "new")}), resume=True,
              progress=False)

@pytest.mark.slow  # the shared 150-step training run: ~2 min on 2 cores
def test_a_failed_write_leaves_the_checkpoint_whole(run, data, tmp_path, monkeypatch):
    cfg, out, _, _ = run
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    before = (copy / "last.pt").read_bytes()

    def disk_full(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"\0" * 64)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", disk_full)
    more = FinetuneConfig(**{**cfg.__dict__, "out": str(copy), "steps": STEPS + 1})
    with pytest.raises(OSError, match="disk full"):
        train(more, resume=True, progress=False)
    assert (copy / "last.pt").read_bytes() == before
    assert not [p for p in copy.iterdir() if p.name.endswith(".tmp")]


def test_command_line(data, tmp_path, capsys):
    out = tmp_path / "cli"
    assert finetune.main(["train", "--train", str(data[0]), "--num-classes", "1", "--out",
                          str(out), "--model-type", "tiny", "--steps", "2", "--val-every", "2",
                          "--backend", "cpu", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2
    assert finetune.main(["eval", "--weights", str(out / "best.safetensors"), "--data",
                          str(data[1]), "--no-progress", "--backend", "cpu"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"iou", "dice", "mae"}
    assert finetune.main(["predict", "--weights", str(out / "last.safetensors"), "--images",
                          str(data[1] / "images"), "--out", str(tmp_path / "masks"),
                          "--no-progress", "--backend", "cpu"]) == 0
    assert len(list((tmp_path / "masks").glob("*_overlay.png"))) == 16
    assert finetune.main(["synthetic", "--out", str(tmp_path / "syn"), "--train", "2",
                          "--val", "1", "--size", "64"]) == 0
    assert (tmp_path / "syn" / "val" / "masks").is_dir()

    for args, message in [
        (["train", "--train", str(tmp_path / "nope"), "--num-classes", "1", "--out",
          str(tmp_path / "x"), "--model-type", "tiny"], "does not exist"),
        (["train", "--train", str(data[0]), "--num-classes", "0", "--out",
          str(tmp_path / "x"), "--model-type", "tiny"], "num_classes: expected a positive"),
        (["train", "--train", str(data[0]), "--num-classes", "1", "--out",
          str(tmp_path / "x"), "--model-type", "tiny", "--checkpoint", "sam.pth"],
         "checkpoint: the 'tiny' model has no pretrained weights"),
    ]:
        capsys.readouterr()
        assert finetune.main(args) == 2
        assert message in capsys.readouterr().err


def test_build_sam_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint: .*missing.pth does not exist"):
        build_sam("vit_b", tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint: .*junk.pth is not a PyTorch checkpoint"):
        build_sam("vit_b", junk)
    other = tmp_path / "tiny.pth"
    torch.save(build_sam("tiny").state_dict(), other)
    with pytest.raises(ValueError, match=r"tiny.pth does not fit SAM vit_b .*is it another "
                                         r"model type\?"):
        build_sam("vit_b", other)
    with pytest.raises(ValueError, match="model_type: expected one of"):
        build_sam("vit_s")
    a, b = build_sam("tiny", seed=3), build_sam("tiny", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                  b.state_dict().values(), strict=True))


def _command(*args):
    """The command as a user runs it: (exit status, stderr)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "convlora_kernels.finetune", *map(str, args)],
                       capture_output=True, text=True, cwd=root, timeout=300)
    return r.returncode, r.stderr


def test_outputs_never_replace_inputs(data, tmp_path):
    """predict refuses an --out in a folder it reads (the masks beside the images, the
    images' own folder) and existing files without --overwrite; train refuses an --out
    holding a run without --resume or --overwrite, and one inside its data. Every refusal
    comes before the model is loaded (the weights here do not exist) and changes nothing."""
    val = data[1]
    masks_before = sorted(p.name for p in (val / "masks").iterdir())
    weights = tmp_path / "absent.safetensors"
    for out in (val / "masks", val / "images" / "pred", val):
        status, err = _command("predict", "--weights", weights, "--images", val / "images",
                               "--out", out, "--no-progress")
        assert status == 2 and "lies inside the data folder" in err, err
    assert sorted(p.name for p in (val / "masks").iterdir()) == masks_before
    elsewhere = tmp_path / "pred"
    elsewhere.mkdir()
    first = sorted((val / "images").iterdir())[0]
    (elsewhere / f"{first.stem}.png").write_bytes(b"mine")
    status, err = _command("predict", "--weights", weights, "--images", val / "images",
                           "--out", elsewhere, "--no-progress")
    assert status == 2 and "exist already" in err and "--overwrite" in err, err
    assert (elsewhere / f"{first.stem}.png").read_bytes() == b"mine"
    status, err = _command("predict", "--weights", weights, "--images", val / "images",
                           "--out", elsewhere, "--overwrite", "--no-progress")
    assert status == 2 and "absent.safetensors" in err, err  # past the check: the weights

    run = tmp_path / "run"
    run.mkdir()
    (run / "finetune.json").write_text("{}")
    train = ["train", "--train", data[0], "--val", val, "--num-classes", "1",
             "--model-type", "tiny", "--backend", "cpu", "--no-progress", "--steps", "1"]
    status, err = _command(*train, "--out", run)
    assert status == 2 and "holds a run (finetune.json)" in err and "--resume" in err, err
    assert (run / "finetune.json").read_text() == "{}"
    status, err = _command(*train, "--out", data[0] / "run")
    assert status == 2 and "lies inside the data folder" in err, err


def test_binary_masks_with_two_classes_are_refused(data, tmp_path):
    """0/255 masks trained with --num-classes 2 (background + foreground) would read 255 as
    'ignore' and learn no foreground while validation reported perfect scores: refused
    with both fixes named, before a checkpoint claims anything."""
    status, err = _command("train", "--train", data[0], "--val", data[1], "--num-classes", "2",
                           "--out", tmp_path / "run", "--model-type", "tiny", "--backend",
                           "cpu", "--no-progress", "--steps", "2")
    assert status == 2 and "255 is read as 'ignore'" in err and "--num-classes 1" in err, err
    assert not (tmp_path / "run" / "best.safetensors").exists()


def test_written_files_take_the_umask_mode(tmp_path):
    """Files written atomically (checkpoints, masks, JSON) get the mode any new file gets
    under the process's umask, not a temporary file's 0600."""
    import os
    import stat

    from convlora_kernels._files import write_atomically

    old = os.umask(0o022)
    try:
        target = tmp_path / "x.json"
        write_atomically(target, lambda tmp: open(tmp, "w").write("{}"))
        plain = tmp_path / "plain.json"
        plain.write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o644


def test_train_draws_its_curve(run):
    """curve.png beside history.json: a PNG of the loss and the validation metric, redrawn
    at each validation from the history it plots."""
    from PIL import Image

    from convlora_kernels.seg.trainer import write_curve

    _, out, result, _ = run
    with Image.open(out / "curve.png") as img:
        assert img.format == "PNG" and img.size == (700, 400)
        drawn = img.convert("RGB")
    # orange (the validation line) and blue (the loss) both on the canvas
    colours = drawn.getcolors(maxcolors=1 << 16)
    assert any(r > 200 and 100 < g < 160 and b < 60 for _, (r, g, b) in colours), "no metric line"
    assert any(r < 60 and 90 < g < 140 and b > 160 for _, (r, g, b) in colours), "no loss line"
    assert write_curve(out / "again.png", result["history"], "iou")
    assert (out / "again.png").stat().st_size > 1000


def test_errors_get_a_line_of_their_own(data, tmp_path):
    """A bad mask found mid-run (here at the first validation, the up-front check
    skipped) ends the run with one 'error:' line that starts a line, not glued to the
    progress bar's last state."""
    import shutil

    import numpy as np
    from PIL import Image

    val = tmp_path / "val"
    shutil.copytree(data[1], val)
    bad = sorted((val / "masks").iterdir())[0]
    Image.fromarray(np.full((128, 128), 7, dtype=np.uint8)).save(bad)
    status, err = _command("train", "--train", data[0], "--val", val, "--num-classes", "1",
                           "--out", tmp_path / "run", "--model-type", "tiny", "--backend",
                           "cpu", "--steps", "2", "--val-every", "1", "--skip-data-check")
    assert status == 2, err
    lines = err.replace("\r", "\n").splitlines()
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: "), err
    assert bad.name in errors[0] and "Traceback" not in err, err
    assert any("step" in line for line in lines), err  # the bar was drawn


def test_weights_record_their_base_model(data, tmp_path):
    """best.safetensors says which SAM it was trained on (type and the seed of a random
    init, or a checkpoint's name, size and SHA-256), so a copy of it alone evaluates on the
    same model; a different --model-type or a --checkpoint for a random-init run is refused,
    naming both."""
    import shutil

    from convlora_kernels.sam import read_base_model

    out = tmp_path / "run"
    cfg = FinetuneConfig(train_data=str(data[0]), val_data=None, num_classes=1, out=str(out),
                         model_type="tiny", steps=2, val_every=2, backend="cpu", seed=7)
    train(cfg, progress=False, log=lambda _: None)
    assert read_base_model(out / "best.safetensors") == {"model_type": "tiny", "seed": 7}
    alone = tmp_path / "elsewhere" / "weights.safetensors"
    alone.parent.mkdir()
    shutil.copy(out / "best.safetensors", alone)
    seg = load_segmenter(alone, backend="cpu", device="cpu")
    want = build_sam("tiny", seed=7).state_dict()
    got = seg.sam.state_dict() if hasattr(seg, "sam") else None
    assert got is not None
    adapter = ("lora_", "conv_weight", "conv_bias", "router")
    frozen = [k for k in want if k.startswith("image_encoder.") and k in got
              and not any(a in k for a in adapter)]
    assert len(frozen) > 10
    assert all(torch.equal(want[k], got[k]) for k in frozen), \
        [k for k in frozen if not torch.equal(want[k], got[k])][:5]
    with pytest.raises(ValueError, match="trained on SAM tiny, not vit_b"):
        load_segmenter(alone, model_type="vit_b", backend="cpu", device="cpu")
    with pytest.raises(ValueError, match="randomly initialised SAM tiny \\(seed 7\\)"):
        load_segmenter(alone, checkpoint=str(alone), backend="cpu", device="cpu")
    # the command as a user runs it on the copy alone: the same model, the same scores
    import os
    import subprocess
    import sys

    here = evaluate(seg, data[1], batch_size=4, bf16=False, progress=False)
    r = subprocess.run([sys.executable, "-m", "convlora_kernels.finetune", "eval", "--weights",
                        str(alone), "--data", str(data[1]), "--backend", "cpu", "--no-bf16",
                        "--no-progress"], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    there = json.loads(r.stdout.strip().splitlines()[-1])
    assert there["iou"] == pytest.approx(here["iou"], rel=1e-6, abs=1e-9), (there, here)
    status, err = _command("eval", "--weights", alone, "--data", data[1], "--backend", "cpu",
                           "--model-type", "vit_b", "--no-progress")
    assert status == 2 and "trained on SAM tiny, not vit_b" in err, err


def test_recorded_checkpoint_is_checked(tmp_path):
    """A recorded checkpoint is found where it was, or given; one of another size or hash
    is refused with both files described; one that moved is named."""
    from pathlib import Path

    from convlora_kernels.seg.trainer import base_from_record, describe_base

    ckpt = tmp_path / "sam_vit_b_01ec64.pth"
    ckpt.write_bytes(b"the weights" * 1000)
    base = describe_base("vit_b", str(ckpt), seed=0)
    assert base["checkpoint"]["name"] == "sam_vit_b_01ec64.pth"
    assert base["checkpoint"]["bytes"] == 11000 and len(base["checkpoint"]["sha256"]) == 64
    w = Path("run/best.safetensors")
    assert base_from_record(w, base, None, None) == ("vit_b", str(ckpt), 0)
    assert base_from_record(w, base, "vit_b", str(ckpt)) == ("vit_b", str(ckpt), 0)
    other = tmp_path / "other.pth"
    other.write_bytes(b"the weightz" * 1000)  # same size, another hash
    with pytest.raises(ValueError, match="is not the file .* trained on: that was "
                                         "sam_vit_b_01ec64.pth .* this is other.pth"):
        base_from_record(w, base, None, str(other))
    shorter = tmp_path / "short.pth"
    shorter.write_bytes(b"x")
    with pytest.raises(ValueError, match="1 bytes"):
        base_from_record(w, base, None, str(shorter))
    moved = tmp_path / "moved.pth"
    ckpt.rename(moved)
    with pytest.raises(FileNotFoundError, match="sam_vit_b_01ec64.pth .* no longer at"):
        base_from_record(w, base, None, None)
    assert base_from_record(w, base, None, str(moved)) == ("vit_b", str(moved), 0)


def _broken_copy(data, tmp_path):
    """Copies of the synthetic train and val folders with one bad mask in val (a class id
    binary masks cannot hold) and one truncated image in train."""
    import shutil

    import numpy as np
    from PIL import Image

    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    shutil.copytree(data[0], train_dir)
    shutil.copytree(data[1], val_dir)
    bad_mask = sorted((val_dir / "masks").iterdir())[3]
    Image.fromarray(np.full((128, 128), 7, dtype=np.uint8)).save(bad_mask)
    cut = sorted((train_dir / "images").iterdir())[5]
    cut.write_bytes(cut.read_bytes()[:200])
    return train_dir, val_dir, bad_mask, cut


def test_bad_data_is_found_before_the_first_step(data, tmp_path):
    """Every image and mask of train and val is read before training: a bad validation
    mask and a truncated training image are both named in one error, and no step runs
    (no checkpoint, no history)."""
    train_dir, val_dir, bad_mask, cut = _broken_copy(data, tmp_path)
    status, err = _command("train", "--train", train_dir, "--val", val_dir, "--num-classes",
                           "1", "--out", tmp_path / "run", "--model-type", "tiny",
                           "--backend", "cpu", "--steps", "50", "--val-every", "25",
                           "--no-progress")
    assert status == 2, err
    assert "2 of 64 image/mask pairs cannot be used" in err, err
    assert str(bad_mask) in err and str(cut) in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "last.pt").exists()
    assert not (tmp_path / "run" / "history.json").exists()


def test_worker_errors_are_one_line(data, tmp_path):
    """With the check skipped and two loader workers, a bad training image reaches the
    user as the same one-line error, not DataLoader's 'Caught ... in DataLoader worker'
    and a traceback."""
    train_dir, val_dir, bad_mask, cut = _broken_copy(data, tmp_path)
    status, err = _command("train", "--train", train_dir, "--num-classes", "1", "--out",
                           tmp_path / "run", "--model-type", "tiny", "--backend", "cpu",
                           "--steps", "20", "--batch-size", "8", "--workers", "2",
                           "--skip-data-check", "--no-progress")
    assert status == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and str(cut) in errors[0], err
    assert "Caught" not in err and "Traceback" not in err, err


def test_eval_with_every_pixel_ignored_is_an_error(run, data, tmp_path):
    """--ignore-index names the value to skip; a validation set where it covers every
    pixel has no score to report and says so instead of printing one."""
    import shutil

    import numpy as np
    from PIL import Image

    _, out, _, _ = run
    val = tmp_path / "val"
    shutil.copytree(data[1], val)
    for m in (val / "masks").iterdir():
        Image.fromarray(np.full((128, 128), 254, dtype=np.uint8)).save(m)
    status, err = _command("eval", "--weights", out / "best.safetensors", "--data", val,
                           "--ignore-index", "254", "--backend", "cpu", "--no-progress")
    assert status == 2 and "every pixel of the 16 image(s) scored is ignored" in err, err
    status, err = _command("eval", "--weights", out / "best.safetensors", "--data", val,
                           "--backend", "cpu", "--no-progress")
    assert status == 2 and "expected a binary mask" in err, err  # 254 is no binary value
    status, err = _command("eval", "--weights", out / "best.safetensors", "--data", val,
                           "--ignore-index", "1", "--backend", "cpu", "--no-progress")
    assert status == 2 and "ignore_index: 1 is a class id" in err, err


def test_kill_and_resume_is_the_same_run(data, tmp_path):
    """kill -9 of a real training process after its first checkpoint, then --resume: the
    adapters at the end are bitwise those of a run never stopped (the epoch's position,
    the data order and the routers' noise all continue from last.pt), and history.json
    holds every step once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    steps = 30
    args = ["train", "--train", data[0], "--val", data[1], "--num-classes", "1",
            "--model-type", "tiny", "--backend", "cpu", "--steps", steps, "--val-every", 8,
            "--batch-size", 5, "--lr", "1e-3", "--seed", 3, "--no-progress",
            "--skip-data-check"]
    whole = tmp_path / "whole"
    status, err = _command(*args, "--out", whole)
    assert status == 0, err

    cut = tmp_path / "cut"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "convlora_kernels.finetune",
                             *map(str, args), "--out", str(cut)], cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (cut / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    saved = torch.load(cut / "last.pt", weights_only=False)
    assert saved["step"] < steps, "the run finished before it could be killed"
    status, err = _command(*args, "--out", cut, "--resume")
    assert status == 0, err
    a, b = load_file(whole / "last.safetensors"), load_file(cut / "last.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    hist = json.loads((cut / "history.json").read_text())
    assert [h["step"] for h in hist if "loss" in h] == list(range(1, steps + 1))
    assert hist == json.loads((whole / "history.json").read_text())
