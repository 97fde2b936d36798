"""The README's semantic-segmentation flow on synthetic data, and its two figures.

    python docs/seg_demo.py [--work /tmp/convlora-seg-demo] [--steps 300]

Runs, through convlora_kernels.finetune, the commands the README shows (synthetic data,
train, eval, predict) for binary segmentation with the small random SAM on the CPU, then draws
docs/images/seg_curve.png (training loss and validation IoU from the run's history.json)
and docs/images/seg_predictions.png (validation images, their masks, the predict
command's overlays). About a minute on 2 CPU cores.
"""

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/convlora-seg-demo")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    from convlora_kernels.finetune import main as cli

    work = Path(args.work)
    data, run, masks = work / "data", work / "run", work / "masks"
    commands = [
        ["synthetic", "--out", str(data), "--num-classes", "1", "--train", "64", "--val", "16",
         "--size", "128"],
        ["train", "--train", str(data / "train"), "--val", str(data / "val"),
         "--num-classes", "1", "--out", str(run), "--model-type", "tiny",
         "--steps", str(args.steps), "--val-every", "25", "--lr", "1e-3", "--no-progress",
         "--overwrite"],  # a second demo in the same --work starts over
        ["eval", "--weights", str(run / "best.safetensors"), "--data", str(data / "val"),
         "--no-progress"],
        ["predict", "--weights", str(run / "best.safetensors"), "--images",
         str(data / "val" / "images"), "--out", str(masks), "--no-progress", "--overwrite"],
    ]
    for c in commands:
        print("+ python -m convlora_kernels.finetune", " ".join(c), flush=True)
        if cli(c) != 0:
            return 1
    _figures(run, data / "val", masks, HERE / "images")
    return 0


def _figures(run: Path, val: Path, masks: Path, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from convlora_kernels.seg.trainer import write_curve

    out.mkdir(parents=True, exist_ok=True)
    history = json.loads((run / "history.json").read_text())
    write_curve(out / "seg_curve.png", history, "iou",
                title="small random SAM (frozen) + Conv-LoRA, synthetic binary data, CPU")

    import numpy as np

    from convlora_kernels.seg.trainer import PALETTE

    colours = np.zeros((256, 3), dtype=np.uint8) + 40
    colours[1] = colours[255] = PALETTE[0]  # binary masks are stored as 0/255
    names = sorted(p.stem for p in (val / "images").iterdir())[:4]
    fig, axes = plt.subplots(3, len(names), figsize=(2 * len(names), 6), dpi=100)
    for j, name in enumerate(names):
        image = Image.open(next((val / "images").glob(f"{name}.*")))
        truth = colours[np.asarray(Image.open(val / "masks" / f"{name}.png"))]
        overlay = Image.open(masks / f"{name}_overlay.png")
        for i, (im, title) in enumerate([(image, "image"), (truth, "mask"),
                                         (overlay, "predict's overlay")]):
            axes[i, j].imshow(im, interpolation="nearest")
            axes[i, j].set_axis_off()
            if j == 0:
                axes[i, j].set_title(title, fontsize=9, loc="left")
    fig.tight_layout()
    fig.savefig(out / "seg_predictions.png")
    plt.close(fig)
    print(f"wrote {out / 'seg_curve.png'} and {out / 'seg_predictions.png'}")


if __name__ == "__main__":
    sys.path.insert(0, os.fspath(HERE.parent))
    sys.exit(main())
