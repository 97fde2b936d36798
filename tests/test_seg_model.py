"""convlora_kernels.seg: SamSegmenter on small SAMs (segment_anything and transformers),
its losses and metrics against their definitions."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("segment_anything", reason="the SAM tests need segment-anything "
                    "(pip install -e .[test])")

from convlora_kernels import ConvLoRALinear
from convlora_kernels.sam import save_adapter
from convlora_kernels.seg.losses import (IGNORE_INDEX, ce_dice_loss, segmentation_loss,
                                         structure_loss)
from convlora_kernels.seg.metrics import SegmentationMetrics
from convlora_kernels.seg.model import SamSegmenter

from sam_helpers import FAST, FUSED, IMG, randomise_adapters, tiny_sam


def _hf_sam():
    from test_sam_builds import _hf_sam as build
    return build()


def _images(seed=0, batch=2, h=IMG, w=IMG):
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 255


def _no_prompt_reference(sam, seg, embeddings):
    """SAM's own decoder with its mask tokens replaced by the class tokens and every
    hypernetwork MLP by the first one (the authors' construction), run image by image."""
    dec = copy.deepcopy(sam.mask_decoder)
    k = seg.num_classes
    dec.num_mask_tokens = k
    dec.mask_tokens = nn.Embedding(k, seg.class_tokens.weight.shape[1])
    dec.mask_tokens.weight.data.copy_(seg.class_tokens.weight)
    dec.output_hypernetworks_mlps = nn.ModuleList([dec.output_hypernetworks_mlps[0]] * k)
    sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
    return torch.cat([dec.predict_masks(embeddings[i:i + 1], sam.prompt_encoder.get_dense_pe(),
                                        sparse, dense)[0] for i in range(embeddings.shape[0])])


@pytest.mark.parametrize("num_classes", [1, 3])
def test_decoder_is_sams_with_one_token_per_class(num_classes):
    sam = tiny_sam()
    seg = SamSegmenter(sam, num_classes, **FAST)
    with torch.no_grad():
        seg.class_tokens.weight.add_(torch.randn_like(seg.class_tokens.weight))
        emb = sam.image_encoder(sam.preprocess(_images()))
        got = seg.decode(emb)
        want = _no_prompt_reference(sam, seg, emb)
    assert got.shape == (2, num_classes, 112, 112)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_transformers_sam_model():
    hf = _hf_sam()
    seg = SamSegmenter(hf, 1, **FAST)
    dec = copy.deepcopy(hf.mask_decoder)  # SAM's decoder with one mask token: the same
    dec.num_mask_tokens = 1
    dec.mask_tokens = nn.Embedding(1, seg.class_tokens.weight.shape[1])
    dec.mask_tokens.weight.data.copy_(seg.class_tokens.weight)
    dec.output_hypernetworks_mlps = nn.ModuleList([dec.output_hypernetworks_mlps[0]])
    hf.mask_decoder, original = dec, hf.mask_decoder
    with torch.no_grad():
        emb = hf.get_image_embeddings(seg.preprocess(_images())[0])
        want = hf(image_embeddings=emb, multimask_output=False).pred_masks[:, 0]
        hf.mask_decoder = original
        got = seg.decode(emb)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert any(isinstance(m, ConvLoRALinear) for m in hf.vision_encoder.modules())


def test_preprocessing_and_output_frame():
    sam = tiny_sam()
    seg = SamSegmenter(sam, 2, **FAST).eval()
    x = _images(h=IMG, w=160)
    pre, hw = seg.preprocess(x)
    assert hw == (IMG, 160)
    torch.testing.assert_close(pre, sam.preprocess(x))  # SAM's normalisation and padding
    small = _images(h=112, w=80)
    pre, hw = seg.preprocess(small)
    assert hw == (IMG, 160) and pre.shape == (2, 3, IMG, IMG)
    torch.testing.assert_close(pre, sam.preprocess(F.interpolate(
        small, (IMG, 160), mode="bilinear", align_corners=False, antialias=True)))
    with torch.no_grad():
        full = seg(x)
        low = seg.decode(sam.image_encoder(sam.preprocess(x)))
    assert full.shape == (2, 2, IMG, 160)
    want = F.interpolate(low, (IMG, IMG), mode="bilinear", align_corners=False)[..., :160]
    torch.testing.assert_close(full, want)
    assert seg(small).shape == (2, 2, 112, 80)
    assert torch.equal(seg.predict(x), full.argmax(1))


@pytest.mark.parametrize("num_classes", [1, 3])
def test_what_trains_and_every_trainable_tensor_gets_a_gradient(num_classes):
    sam = tiny_sam()
    seg = SamSegmenter(sam, num_classes, **FAST)
    randomise_adapters(seg)
    trainable = {n for n, p in seg.named_parameters() if p.requires_grad}
    decoder = {n for n in trainable if n.startswith("sam.mask_decoder.")}
    assert {n.split(".")[2] for n in decoder} == {"transformer", "output_upscaling",
                                                  "output_hypernetworks_mlps"}
    assert all(n.startswith("sam.mask_decoder.output_hypernetworks_mlps.0.")
               for n in decoder if "hypernetworks" in n)
    assert "class_tokens.weight" in trainable
    assert not any(n.startswith("sam.prompt_encoder") for n in trainable)
    seg.train()
    x = _images()
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, max(2, num_classes), (2, IMG, IMG), generator=g)
    target[:, -20:] = IGNORE_INDEX
    loss = segmentation_loss(seg(x), target, seg.aux_loss())
    loss.backward()
    for n, p in seg.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_save_and_rebuild(tmp_path):
    seg = SamSegmenter(tiny_sam(), 3, **FAST)
    randomise_adapters(seg)
    with torch.no_grad():
        seg.class_tokens.weight.add_(torch.randn_like(seg.class_tokens.weight))
        for p in seg.sam.mask_decoder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "seg.safetensors"
    save_adapter(seg, path)
    x = _images(3)
    with torch.no_grad():
        want = seg.eval()(x)
    again = SamSegmenter.from_adapter(tiny_sam(), path, **{"backend": FUSED["backend"]})
    assert again.num_classes == 3
    with torch.no_grad():
        assert torch.equal(again.eval()(x), want)
    from convlora_kernels.sam import apply_conv_lora
    other = tiny_sam()
    apply_conv_lora(other, **FAST)
    save_adapter(other, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="was not saved from a SamSegmenter"):
        SamSegmenter.from_adapter(tiny_sam(), tmp_path / "plain.safetensors")


def test_segmenter_errors():
    with pytest.raises(ValueError, match="num_classes: expected a positive integer"):
        SamSegmenter(tiny_sam(), 0)
    with pytest.raises(TypeError, match="sam: expected segment_anything's Sam"):
        SamSegmenter(nn.Linear(2, 2), 1)
    seg = SamSegmenter(tiny_sam(), 1, **FAST)
    with pytest.raises(ValueError, match=r"images: expected a float tensor \(B, 3, H, W\)"):
        seg(torch.zeros(2, 1, IMG, IMG))


# --- Losses and metrics ---------------------------------------------------------------

def _binary_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 1, 40, 48, generator=g) * 3
    target = (torch.rand(2, 40, 48, generator=g) > 0.6).long()
    target[:, :, 10:30] = (torch.rand(2, 40, 20, generator=g) > 0.2).long()
    return logits, target


def test_structure_loss_against_its_definition():
    logits, target = _binary_case()
    t = target.float()[:, None]
    weit = 1 + 5 * (F.avg_pool2d(t, 31, stride=1, padding=15) - t).abs()
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    wbce = (weit * bce).sum((2, 3)) / weit.sum((2, 3))
    p = torch.sigmoid(logits)
    inter = (p * t * weit).sum((2, 3))
    union = ((p + t) * weit).sum((2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    torch.testing.assert_close(structure_loss(logits, target), (wbce + wiou).mean())
    # the executed original: reduce="none" is read as reduce=True, a plain mean BCE
    plain = F.binary_cross_entropy_with_logits(logits, t)
    torch.testing.assert_close(structure_loss(logits, target, weighted_bce=False),
                               (plain + wiou).mean())
    # ignored pixels count nowhere: whatever the logits there
    ignored = target.clone()
    ignored[:, :, -8:] = IGNORE_INDEX
    changed = logits.clone()
    changed[:, :, :, -8:] = 100.0
    torch.testing.assert_close(structure_loss(logits, ignored), structure_loss(changed, ignored))
    assert not torch.allclose(structure_loss(logits, target), structure_loss(logits, ignored))
    with pytest.raises(ValueError, match="structure_loss is for binary segmentation"):
        structure_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target: expected integer class ids of shape "
                                         r"\(2, 40, 48\)"):
        structure_loss(logits, t[:, 0])


def test_ce_dice_loss_against_its_definition():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 10, 12, generator=g, requires_grad=True)
    target = torch.randint(0, 3, (2, 10, 12), generator=g)
    target[0, :2] = IGNORE_INDEX
    valid = target != IGNORE_INDEX
    ce = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], target[valid])
    p = torch.softmax(logits, 1).permute(0, 2, 3, 1)[valid]
    onehot = F.one_hot(target[valid], 3).float()
    dice = 1 - ((2 * (p * onehot).sum(0) + 1) / (p.sum(0) + onehot.sum(0) + 1)).mean()
    got = ce_dice_loss(logits, target)
    torch.testing.assert_close(got, ce + dice)
    got.backward()
    assert logits.grad[0, :, :2].abs().sum() == 0 and logits.grad.abs().sum() > 0
    bad = target.clone()
    bad[1, 0, 0] = 3
    with pytest.raises(ValueError, match=r"target: class ids must be in \[0, 3\) or 255 "
                                         r"\(ignored\), got \[3\]"):
        ce_dice_loss(logits, bad)
    aux = torch.tensor(0.25)
    torch.testing.assert_close(segmentation_loss(logits, target, aux), ce + dice + 0.5)
    lg, tg = _binary_case()
    torch.testing.assert_close(segmentation_loss(lg, tg, aux), structure_loss(lg, tg) + 0.25)


def test_metrics_against_hand_counts():
    logits, target = _binary_case(1)
    target[1, :5] = IGNORE_INDEX
    m = SegmentationMetrics(1)
    m.update(logits[:1], target[:1])
    m.update(logits[1:], target[1:])
    got = m.compute()
    ious, dices, maes = [], [], []
    for b in range(2):
        v = target[b] != IGNORE_INDEX
        p, t = (logits[b, 0] > 0)[v], (target[b] == 1)[v]
        inter, union = (p & t).sum().item(), (p | t).sum().item()
        ious.append(inter / union)
        dices.append(2 * inter / (p.sum() + t.sum()).item())
        maes.append((torch.sigmoid(logits[b, 0])[v] - t.float()).abs().mean().item())
    assert got["iou"] == pytest.approx(sum(ious) / 2, rel=1e-9)
    assert got["dice"] == pytest.approx(sum(dices) / 2, rel=1e-9)
    assert got["mae"] == pytest.approx(sum(maes) / 2, rel=1e-6)

    pred = torch.tensor([[[0, 1, 2, 2]]])
    lg = F.one_hot(pred, 4).permute(0, 3, 1, 2).float()
    tg = torch.tensor([[[0, 1, 1, IGNORE_INDEX]]])
    m = SegmentationMetrics(4)
    m.update(lg, tg)
    got = m.compute()
    # class 0: 1/1; class 1: 1/2 (one pixel predicted 2); class 2: 0/1; class 3 unseen
    assert got["iou_per_class"][:3] == [1.0, 0.5, 0.0]
    assert got["iou_per_class"][3] != got["iou_per_class"][3]  # NaN
    assert got["miou"] == pytest.approx(0.5)
    assert got["pixel_accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"logits: expected 4 channels \(num_classes\), got 1"):
        m.update(lg[:, :1], tg)


def test_metrics_never_score_what_is_absent():
    """An image with no foreground in prediction or target is left out of binary IoU and
    Dice (not a perfect 1), NaN when no image has any; a class absent from prediction and
    target is NaN in iou_per_class and out of the mean; every pixel ignored is an error."""
    m = SegmentationMetrics(1)
    lg = torch.full((2, 1, 2, 2), -5.0)   # predicts background everywhere
    lg[0, 0, 0, 0] = 5.0                 # image 0: one foreground pixel, also in the target
    tg = torch.zeros(2, 2, 2, dtype=torch.long)
    tg[0, 0, 0] = 1
    m.update(lg, tg)
    got = m.compute()
    assert got["iou"] == 1.0 and got["dice"] == 1.0  # image 1 (empty, empty) left out
    m = SegmentationMetrics(1)
    m.update(lg[1:], tg[1:])
    got = m.compute()
    assert got["iou"] != got["iou"] and got["dice"] != got["dice"]  # NaN: nothing to score
    assert got["mae"] == pytest.approx(torch.sigmoid(torch.tensor(-5.0)).item())
    m = SegmentationMetrics(3)
    m.update(F.one_hot(torch.zeros(1, 2, 2, dtype=torch.long), 3).permute(0, 3, 1, 2).float(),
             torch.zeros(1, 2, 2, dtype=torch.long))
    got = m.compute()
    assert got["iou_per_class"][0] == 1.0 and all(v != v for v in got["iou_per_class"][1:])
    assert got["miou"] == 1.0
    for k in (1, 3):
        m = SegmentationMetrics(k)
        m.update(torch.zeros(1, k, 2, 2), torch.full((1, 2, 2), IGNORE_INDEX))
        with pytest.raises(ValueError, match="every pixel of the 1 image"):
            m.compute()


def test_sam2_is_refused_with_a_clear_error():
    pytest.importorskip("transformers")
    from test_sam_families import _build

    sam2, _ = _build("sam2")
    with pytest.raises(TypeError, match=r"got Sam2Model \(SAM 2 and SAM 3 decoders are not "
                                        r"supported here"):
        SamSegmenter(sam2, 1)
    assert not any(isinstance(m, ConvLoRALinear) for m in sam2.modules())
