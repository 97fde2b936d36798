"""convlora_kernels.sam around training: modules saved with the adapters, switching the
adapters off and removing them, the box-prompt forward and loss helpers, and the README's
SAM example, executed as written on a small SAM."""

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("segment_anything", reason="the SAM tests need segment-anything "
                    "(pip install -e .[test])")

from convlora_kernels import ConvLoRALinear
from convlora_kernels.sam import (adapter_state_dict, adapters_disabled, add_modules_to_save,
                                  apply_conv_lora, aux_loss, box_prompted_masks, load_adapter,
                                  mask_loss, read_adapter_config, remove_conv_lora,
                                  save_adapter, set_adapters_enabled)

from sam_helpers import (FAST, FUSED, GRID, IMG, OUT, layer_param_names, randomise_adapters,
                         random_batch, segment, tiny_sam, trainable_names)


class WithHead(nn.Module):
    """A SAM with a head of the user's own on the image embeddings (a semantic head)."""

    def __init__(self, seed=0):
        super().__init__()
        self.sam = tiny_sam(seed)
        torch.manual_seed(seed + 5)
        self.head = nn.Sequential(nn.Conv2d(OUT, 8, 1), nn.GELU(), nn.Conv2d(8, 3, 1))

    def forward(self, images):
        return self.head(self.sam.image_encoder(images))


def _images(seed=3, batch=2):
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _perturb(module, seed=4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


# --- modules_to_save ------------------------------------------------------------------

@pytest.mark.parametrize("how", ["name", "module", "later"])
def test_modules_to_save_train_and_round_trip(tmp_path, how):
    net = WithHead()
    if how == "later":
        apply_conv_lora(net, **FAST)
        assert not any(p.requires_grad for p in net.head.parameters())  # frozen, as before
        assert add_modules_to_save(net, ["head"]) == ("head",)
    else:
        apply_conv_lora(net, modules_to_save=["head"] if how == "name" else [net.head], **FAST)
    cfg = read_config_of(net)
    assert cfg.modules_to_save == ("head",)
    layers = [n for n, m in net.named_modules() if isinstance(m, ConvLoRALinear)]
    decoder = {n for n, _ in net.named_parameters() if n.startswith("sam.mask_decoder.")}
    head = {"head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"}
    assert trainable_names(net) == layer_param_names(layers) | decoder | head
    assert set(adapter_state_dict(net)) == trainable_names(net)

    randomise_adapters(net)
    _perturb(net.head)
    with torch.no_grad():
        want = net.eval()(_images())
    path = tmp_path / "with_head.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything trainable is saved: no warning
        save_adapter(net, path)
    saved = read_adapter_config(path)
    assert saved["modules_to_save"] == ["head"]

    fresh = WithHead(seed=0)
    _perturb(fresh.head, seed=9)  # a head that differs until loaded
    apply_conv_lora(fresh, **saved, **FUSED)
    with torch.no_grad():
        assert not torch.allclose(fresh.eval()(_images()), want)
    load_adapter(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(_images()), want)

    # a model set up without the head refuses the file, naming the setting
    plain = WithHead()
    apply_conv_lora(plain, **{**FUSED, **{k: v for k, v in saved.items()
                                          if k != "modules_to_save"}})
    with pytest.raises(ValueError, match=r"modules_to_save=\('head',\), but this model has "
                                         r"modules_to_save=\(\).*after adding those modules"):
        load_adapter(plain, path)


def read_config_of(net):
    return next(m.conv_lora_config for m in net.modules() if hasattr(m, "conv_lora_config"))


def test_modules_to_save_errors():
    def refuses(modules, err, match, **kw):
        net = WithHead()
        before = {n: p.requires_grad for n, p in net.named_parameters()}
        with pytest.raises(err, match=match):
            apply_conv_lora(net, modules_to_save=modules, **{**FAST, **kw})
        assert not any(isinstance(m, ConvLoRALinear) for m in net.modules())
        assert {n: p.requires_grad for n, p in net.named_parameters()} == before

    refuses(["heads"], ValueError, r"modules_to_save: 'heads' is not the name of a module in "
                                   r"WithHead .*top-level modules: sam, head")
    refuses([nn.Linear(2, 2)], ValueError, "the Linear given is not a module of the model")
    refuses([3], TypeError, "expected module names or modules, got int 3")
    refuses("", ValueError, "is not the name of a module")
    refuses(["sam.image_encoder"], ValueError, r"'sam.image_encoder' holds the Conv-LoRA "
                                               r"layer sam.image_encoder.blocks.0.attn.qkv")
    refuses(["sam.mask_decoder.iou_prediction_head"], ValueError,
            r"overlaps 'sam.mask_decoder', which is saved with the adapters already")
    refuses(["head", "head.0"], ValueError, "'head.0' overlaps 'head'")
    # the decoder frozen: naming it (or a part of it) is allowed
    net = WithHead()
    apply_conv_lora(net, modules_to_save=["sam.mask_decoder.iou_prediction_head",
                                          "sam.image_encoder.neck"],
                    train_mask_decoder=False, **FAST)
    trained = {n.rsplit(".", 2)[0] for n in trainable_names(net) if "attn.qkv" not in n}
    assert trained == {"sam.mask_decoder.iou_prediction_head.layers",
                       "sam.image_encoder.neck"}
    # a whole block holding no adapted layer is fine; the one adapted is not
    net = WithHead()
    apply_conv_lora(net, blocks=[0, 2], modules_to_save=["sam.image_encoder.blocks.1"], **FAST)
    with pytest.raises(ValueError, match="overlaps 'sam.image_encoder.blocks.1'"):
        add_modules_to_save(net, ["sam.image_encoder.blocks.1.mlp"])
    with pytest.raises(ValueError, match="holds the Conv-LoRA layer"):
        add_modules_to_save(net, ["sam.image_encoder.blocks.2"])


def test_save_warns_about_trainable_parameters_it_leaves_out(tmp_path):
    net = WithHead()
    apply_conv_lora(net, **FAST)
    net.head.requires_grad_(True)  # trained, but never named: lost on reload without a word
    with pytest.warns(UserWarning, match=r"save_adapter: 4 trainable parameter\(s\) are "
                      r"neither adapters, the mask decoder nor modules_to_save, and are not "
                      r"saved: head.0.bias, head.0.weight, head.2.bias, head.2.weight; to "
                      r"save them, add_modules_to_save\(model, \['head.0', 'head.2'\]\)"):
        save_adapter(net, tmp_path / "a.safetensors")


def test_files_written_before_modules_to_save_still_load(tmp_path):
    from safetensors.torch import save_file

    sam = tiny_sam()
    apply_conv_lora(sam, **FAST)
    randomise_adapters(sam)
    cfg = read_config_of(sam).to_dict()
    del cfg["modules_to_save"]
    tensors = {k: v.clone().contiguous() for k, v in adapter_state_dict(sam).items()}
    path = tmp_path / "old.safetensors"
    save_file(tensors, path, metadata={"format": "convlora-kernels-adapter",
                                       "format_version": "1",
                                       "conv_lora_config": json.dumps(cfg)})
    fresh = tiny_sam()
    apply_conv_lora(fresh, **read_adapter_config(path), **FUSED)
    load_adapter(fresh, path)
    for k, v in adapter_state_dict(fresh).items():
        assert torch.equal(v, tensors[k])


# --- Switching off and removing -------------------------------------------------------

def _outputs(sam, seed=7):
    images, boxes, _, _ = random_batch(seed)
    with torch.no_grad():
        return segment(sam, images, boxes)


def test_adapters_disabled_is_the_frozen_model():
    sam = tiny_sam()
    frozen = _outputs(sam)
    apply_conv_lora(sam, **FAST)
    randomise_adapters(sam)
    tuned = _outputs(sam)
    assert not torch.allclose(tuned[0], frozen[0])
    with adapters_disabled(sam):
        for got, want in zip(_outputs(sam), frozen, strict=True):
            assert torch.equal(got, want)
    for got, want in zip(_outputs(sam), tuned, strict=True):
        assert torch.equal(got, want)

    sam.train()
    images, boxes, _, _ = random_batch(1)
    set_adapters_enabled(sam, False)
    segment(sam, images, boxes)
    assert aux_loss(sam).item() == 0 and not aux_loss(sam).requires_grad
    assert "adapter_enabled=False" in repr(sam.image_encoder.blocks[0].attn.qkv)
    set_adapters_enabled(sam, True)
    segment(sam, images, boxes)
    assert aux_loss(sam).requires_grad
    # the context restores each layer's own setting, also on an exception
    sam.image_encoder.blocks[1].attn.qkv.adapter_enabled = False
    with pytest.raises(RuntimeError, match="inside"):
        with adapters_disabled(sam):
            raise RuntimeError("inside")
    assert [b.attn.qkv.adapter_enabled for b in sam.image_encoder.blocks] == [True, False, True]

    with pytest.raises(TypeError, match="enabled: expected a bool, got int 0"):
        set_adapters_enabled(sam, 0)
    with pytest.raises(ValueError, match="has no Conv-LoRA layers; call apply_conv_lora"):
        set_adapters_enabled(tiny_sam(), False)


def test_adapters_disabled_under_autocast_matches_plain_linear():
    torch.manual_seed(0)
    linear = nn.Linear(16, 24)
    layer = ConvLoRALinear.from_linear(linear, r=3, num_experts=2, backend="cpu")
    layer.adapter_enabled = False
    x = torch.randn(2, 5, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = layer(x), linear(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_remove_conv_lora_restores_the_linear_layers():
    sam = tiny_sam()
    qkv = [b.attn.qkv for b in sam.image_encoder.blocks]
    frozen = _outputs(sam)
    apply_conv_lora(sam, **FAST)
    randomise_adapters(sam)
    restored = remove_conv_lora(sam)
    assert list(restored) == [f"image_encoder.blocks.{i}.attn.qkv" for i in range(3)]
    for block, old in zip(sam.image_encoder.blocks, qkv, strict=True):
        new = block.attn.qkv
        assert type(new) is nn.Linear and new.weight is old.weight and new.bias is old.bias
        assert not new.weight.requires_grad
    assert not any(hasattr(m, "conv_lora_config") for m in sam.modules())
    for got, want in zip(_outputs(sam), frozen, strict=True):
        assert torch.equal(got, want)
    assert set(sam.state_dict()) == set(tiny_sam().state_dict())
    apply_conv_lora(sam, **FAST)  # and it can be set up again
    with pytest.raises(ValueError, match="has no Conv-LoRA layers"):
        remove_conv_lora(tiny_sam())


# --- Box prompts ----------------------------------------------------------------------

@pytest.mark.parametrize("multimask", [False, True])
def test_box_prompted_masks_match_sam_forward(multimask):
    """Sam.forward (no gradients, a list of dicts) gives the same masks and IoU predictions
    for images that are not square (padding and cropping) and two boxes per image."""
    sam = tiny_sam()
    apply_conv_lora(sam, **FAST)
    randomise_adapters(sam)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, IMG, 160, generator=g) * 255
    boxes = torch.tensor([[[10., 20, 100, 120], [30, 40, 150, 200]],
                          [[0., 0, 50, 60], [5, 5, 159, 223]]])
    out = box_prompted_masks(sam, images, boxes, multimask_output=multimask)
    m = 3 if multimask else 1
    assert out.logits.shape == (2, 2, m, IMG, 160)
    assert out.iou_predictions.shape == (2, 2, m)
    assert out.low_res_logits.shape == (2, 2, m, 4 * GRID, 4 * GRID)
    with torch.no_grad():
        ref = sam([{"image": images[i], "original_size": (IMG, 160), "boxes": boxes[i]}
                   for i in range(2)], multimask_output=multimask)
    for i in range(2):
        torch.testing.assert_close(out.low_res_logits[i], ref[i]["low_res_logits"],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.iou_predictions[i], ref[i]["iou_predictions"],
                                   rtol=1e-5, atol=1e-5)
        decided = out.logits[i].abs() > 1e-4  # away from the threshold
        assert torch.equal((out.logits[i] > 0)[decided], ref[i]["masks"][decided])
    one = box_prompted_masks(sam, images, boxes[:, 0], multimask_output=multimask)
    assert one.logits.shape == (2, m, IMG, 160)
    torch.testing.assert_close(one.logits, out.logits[:, 0], rtol=1e-5, atol=1e-5)

    targets = torch.rand(2, 2, IMG, 160, generator=g) > 0.5
    mask_loss(out.logits, targets, out.iou_predictions).backward()
    # every adapter tensor but the routers' (they learn from aux_loss) and the decoder's
    # shared parts get a gradient (with one mask, the other masks' heads get none)
    reached = [(n, p) for n, p in sam.named_parameters() if p.requires_grad
               and ("lora_" in n or "conv_" in n or "output_upscaling" in n
                    or "mask_decoder.transformer" in n or "iou_prediction_head" in n)]
    assert sum(n.rsplit(".", 1)[1] in ("lora_A", "lora_B", "conv_weight", "conv_bias")
               for n, _ in reached) == 4 * 3
    for name, p in reached:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_box_prompted_masks_errors():
    sam = tiny_sam()
    images = torch.rand(2, 3, IMG, IMG) * 255
    boxes = torch.tensor([[0., 0, 10, 10]] * 2)
    for kw, err, match in [
        (dict(images=images[0]), ValueError, r"images: expected a float tensor \(B, 3, H, W\) "
                                             r"of RGB values in 0-255, got torch.float32 "
                                             r"tensor of shape \(3, 224, 224\)"),
        (dict(images=images.to(torch.uint8)), ValueError, "got torch.uint8 tensor"),
        (dict(images=torch.rand(2, 3, IMG + 1, 8)), ValueError,
         r"at most the encoder's input size 224 \(resize the longest side to 224 with "
         r"ResizeLongestSide\(224\)\), got 225x8"),
        (dict(boxes=boxes[:1]), ValueError, r"boxes: expected \(B, 4\) or \(B, K, 4\) boxes "
                                            r"x0, y0, x1, y1 with B = 2 as in images, got "
                                            r"torch.float32 tensor of shape \(1, 4\)"),
        (dict(boxes=boxes[:, :2]), ValueError, "boxes: expected"),
        (dict(sam=sam.image_encoder), TypeError, "sam: expected segment_anything's Sam"),
        (dict(multimask_output=1), TypeError, "multimask_output: expected a bool"),
    ]:
        args = {**dict(sam=sam, images=images, boxes=boxes), **kw}
        with pytest.raises(err, match=match):
            box_prompted_masks(**args)
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        box_prompted_masks(nn.DataParallel(sam), images, boxes)


def test_mask_loss_against_its_definition():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 3, 9, 7, generator=g, requires_grad=True)  # B, K, M, H, W
    targets = torch.rand(2, 3, 9, 7, generator=g) > 0.4
    ious = torch.rand(2, 3, 3, generator=g, requires_grad=True)
    got = mask_loss(logits, targets, ious)

    t = targets.float()
    per = torch.empty(2, 3, 3)
    actual = torch.empty(2, 3, 3)
    for b in range(2):
        for k in range(3):
            for m in range(3):
                x = logits[b, k, m].detach()
                bce = F.binary_cross_entropy_with_logits(x, t[b, k])
                p = torch.sigmoid(x)
                dice = 1 - (2 * (p * t[b, k]).sum() + 1) / (p.sum() + t[b, k].sum() + 1)
                per[b, k, m] = bce + dice
                inter = ((x > 0) & targets[b, k]).sum()
                union = ((x > 0) | targets[b, k]).sum()
                actual[b, k, m] = inter / union
    want = per.min(-1).values.mean() + ((ious.detach() - actual) ** 2).mean()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    got.backward()
    assert logits.grad.abs().sum() > 0 and ious.grad.abs().sum() > 0
    # only the best of the M masks of each prompt gets the mask loss's gradient
    best = per.argmin(-1)
    for b in range(2):
        for k in range(3):
            for m in range(3):
                assert (logits.grad[b, k, m].abs().sum() > 0) == (m == best[b, k]), (b, k, m)
    torch.testing.assert_close(mask_loss(logits, targets), per.min(-1).values.mean(),
                               rtol=1e-6, atol=1e-6)  # without the IoU term

    one = torch.randn(3, 1, 9, 7, generator=g)
    torch.testing.assert_close(mask_loss(one, targets[0]), mask_loss(one, targets[0, :, None]))
    with pytest.raises(ValueError, match=r"targets: expected shape \(2, 3, 9, 7\) to match "
                                         r"logits \(2, 3, 3, 9, 7\).*got \(3, 9, 7\)"):
        mask_loss(logits, targets[0])
    with pytest.raises(ValueError, match=r"iou_predictions: expected shape \(2, 3, 3\)"):
        mask_loss(logits, targets, ious[..., :1])
    with pytest.raises(ValueError, match="logits: expected float mask logits"):
        mask_loss(targets, targets)


# --- The README -----------------------------------------------------------------------

def _readme_sam_example() -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Fine-tune SAM with Conv-LoRA"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_sam_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's block, unchanged, with sam_model_registry["vit_b"] building the small
    SAM (the checkpoint path is not read) and a loader of two batches of 224x224 images."""
    import segment_anything

    built = []

    def vit_b(checkpoint=None):
        assert checkpoint == "sam_vit_b_01ec64.pth"
        built.append(tiny_sam(seed=0))
        return built[-1]

    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", vit_b)
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    loader = []
    for _ in range(2):
        lo = torch.randint(0, IMG // 2, (2, 2), generator=g).float()
        loader.append((torch.rand(2, 3, IMG, IMG, generator=g) * 255,
                       torch.cat([lo, lo + IMG // 3], 1),
                       torch.rand(2, IMG, IMG, generator=g) > 0.5))
    code = _readme_sam_example()
    namespace = {"loader": loader, "__name__": "readme"}
    exec(compile(code, "README.md", "exec"), namespace)

    assert "trainable params:" in capsys.readouterr().out
    trained, reloaded = built
    assert reloaded is namespace["sam"]
    for name, v in adapter_state_dict(trained).items():
        assert torch.equal(adapter_state_dict(reloaded)[name], v), name
    assert any(t.abs().sum() > 0 for n, t in adapter_state_dict(reloaded).items()
               if n.endswith("lora_B"))  # the steps trained the adapters
    assert (tmp_path / "sam_convlora.safetensors").exists()
