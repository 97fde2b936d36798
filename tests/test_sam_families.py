"""apply_conv_lora on SAM 2 (Hiera), SAM-HQ and SAM 3 (its ViT, q/k/v projections), as
transformers builds them, in small random configurations (no downloads). Meta's sam2 and
sam3 packages are not installed here: their encoders are found by class (sam/model.py), and run
the same attention code as transformers' ports."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the SAM 2/3 tests need "
                                   "transformers (pip install -e .[hf])")

from convlora_kernels import ConvLoRALinear
from convlora_kernels.sam import (adapter_state_dict, apply_conv_lora, aux_loss, load_adapter,
                                  read_adapter_config, save_adapter)

from sam_helpers import ADAPTER, FAST, FUSED, randomise_adapters, record_routing

T = transformers


def _sam2():
    """Hiera with 4 stages (1, 1, 2, 1 blocks), windows 4, 4, 4, 2, a global block and
    query pooling: its qkv layers see (B·16, 4, 4, 16) windows of a 16x16 map first,
    then maps that shrink and widen stage by stage (a stage's first block pools the
    previous stage's map)."""
    bb = T.Sam2HieraDetConfig(
        hidden_size=16, num_attention_heads=1, image_size=[64, 64],
        blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[16, 32, 64, 128],
        num_attention_heads_per_stage=[1, 1, 2, 2], window_size_per_stage=[4, 4, 4, 2],
        global_attention_blocks=[3], window_positional_embedding_background_size=[4, 4])
    vision = T.Sam2VisionConfig(backbone_config=bb, backbone_channel_list=[128, 64, 32, 16],
                                backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]],
                                fpn_hidden_size=32)
    cfg = T.Sam2Config(
        vision_config=vision,
        prompt_encoder_config=T.Sam2PromptEncoderConfig(hidden_size=32, image_size=64,
                                                        patch_size=16, mask_input_channels=4),
        mask_decoder_config=T.Sam2MaskDecoderConfig(hidden_size=32, mlp_dim=64,
                                                    num_hidden_layers=1, num_attention_heads=2,
                                                    iou_head_hidden_dim=32))
    return T.Sam2Model(cfg), 64


def _sam_hq():
    vc = T.SamHQVisionConfig(hidden_size=32, output_channels=32, num_hidden_layers=2,
                             num_attention_heads=2, image_size=64, patch_size=8, mlp_dim=64,
                             window_size=4, global_attn_indexes=[1], num_pos_feats=16)
    cfg = T.SamHQConfig(
        vision_config=vc,
        prompt_encoder_config=T.SamHQPromptEncoderConfig(hidden_size=32, image_size=64,
                                                         patch_size=8, mask_input_channels=4),
        mask_decoder_config=T.SamHQMaskDecoderConfig(hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, mlp_dim=64,
                                                     iou_head_hidden_dim=32, vit_dim=32))
    return T.SamHQModel(cfg), 64


def _sam3_vision():
    vit = T.Sam3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, image_size=112, patch_size=14, window_size=4,
                          global_attn_indexes=[1], pretrain_image_size=56)
    return T.Sam3VisionConfig(backbone_config=vit, fpn_hidden_size=32,
                              backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]])


def _sam3_tracker():
    """SAM 3's ViT (8x8 patch grid: 4x4 windows, then a global layer) under SAM's box
    prompts."""
    cfg = T.Sam3TrackerConfig(
        vision_config=_sam3_vision(),
        prompt_encoder_config=T.Sam3TrackerPromptEncoderConfig(
            hidden_size=32, image_size=112, patch_size=14, mask_input_channels=4),
        mask_decoder_config=T.Sam3TrackerMaskDecoderConfig(
            hidden_size=32, mlp_dim=64, num_hidden_layers=1, num_attention_heads=2,
            iou_head_hidden_dim=32))
    return T.Sam3TrackerModel(cfg), 112


def _sam3():
    cfg = T.Sam3Config(
        vision_config=_sam3_vision(),
        text_config=T.CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                     projection_dim=32, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=32,
                                     bos_token_id=1, eos_token_id=2),
        geometry_encoder_config=T.Sam3GeometryEncoderConfig(
            hidden_size=32, num_layers=1, num_attention_heads=2, intermediate_size=64),
        detr_encoder_config=T.Sam3DETREncoderConfig(hidden_size=32, num_layers=1,
                                                    num_attention_heads=2, intermediate_size=64),
        detr_decoder_config=T.Sam3DETRDecoderConfig(hidden_size=32, num_layers=1, num_queries=8,
                                                    num_attention_heads=2, intermediate_size=64),
        mask_decoder_config=T.Sam3MaskDecoderConfig(hidden_size=32, num_attention_heads=2))
    return T.Sam3Model(cfg), 112


# name: (builder, expected adapted layers)
FAMILIES = {
    "sam2": (_sam2, [f"vision_encoder.backbone.blocks.{i}.attn.qkv" for i in range(5)]),
    "sam-hq": (_sam_hq, [f"vision_encoder.layers.{i}.attn.qkv" for i in range(2)]),
    "sam3-tracker": (_sam3_tracker, [f"vision_encoder.backbone.layers.{i}.attention.{p}"
                                     for i in range(2) for p in ("q_proj", "v_proj")]),
    "sam3": (_sam3, [f"vision_encoder.backbone.layers.{i}.attention.{p}"
                     for i in range(2) for p in ("q_proj", "v_proj")]),
}


def _build(family, seed=0):
    torch.manual_seed(seed)
    model, size = FAMILIES[family][0]()
    with torch.no_grad():  # default initialisations are near zero: make every weight act
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval(), size


def _inputs(family, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, size, size, generator=g)
    if family == "sam3":  # text prompts (DETR-style queries), normalised cx, cy, w, h boxes
        return dict(pixel_values=x, input_ids=torch.randint(3, 100, (2, 5), generator=g),
                    attention_mask=torch.ones(2, 5, dtype=torch.long),
                    input_boxes=torch.tensor([[[0.5, 0.5, 0.3, 0.3]], [[0.4, 0.6, 0.2, 0.5]]]),
                    input_boxes_labels=torch.ones(2, 1, dtype=torch.long))
    boxes = torch.tensor([[[4., 4., size * 0.6, size * 0.6]], [[10., 8., size - 4., size * 0.8]]])
    return dict(pixel_values=x, input_boxes=boxes, multimask_output=False)


def _masks(model, family, seed=0, size=None):
    return model(**_inputs(family, size, seed)).pred_masks


@pytest.mark.parametrize("family", list(FAMILIES))
def test_unchanged_at_initialisation_and_every_adapter_trains(family):
    model, size = _build(family)
    with torch.no_grad():
        expected = _masks(model, family, size=size)
    layers = apply_conv_lora(model, **FAST)
    assert list(layers) == FAMILIES[family][1]
    assert all(isinstance(m, ConvLoRALinear) for m in layers.values())
    with torch.no_grad():
        torch.testing.assert_close(_masks(model, family, size=size), expected, rtol=0, atol=0)

    randomise_adapters(model)
    model.train()
    out = _masks(model, family, size=size)
    loss = out.float().square().mean() + aux_loss(model)
    loss.backward()
    for name, layer in layers.items():
        for t in ADAPTER:
            g = layer.get_parameter(t).grad
            assert g is not None and g.abs().sum() > 0, f"{name}.{t}"
    assert set(adapter_state_dict(model)) == {n for n, p in model.named_parameters()
                                              if p.requires_grad}


@pytest.mark.parametrize("family", ["sam2", "sam3-tracker"])
def test_adapter_file_round_trip(family, tmp_path):
    model, size = _build(family)
    apply_conv_lora(model, gating="map", **FAST)
    randomise_adapters(model)
    with torch.no_grad():
        want = _masks(model.eval(), family, seed=3, size=size)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    cfg = read_adapter_config(path)
    assert cfg["targets"] == (["qkv"] if family == "sam2" else ["q_proj", "v_proj"])
    fresh, _ = _build(family)
    apply_conv_lora(fresh, **cfg, **FUSED)
    load_adapter(fresh, path)
    with torch.no_grad():
        assert torch.equal(_masks(fresh.eval(), family, seed=3, size=size), want)


@pytest.mark.parametrize("family", ["sam2", "sam3-tracker"])
@pytest.mark.parametrize("gating", ["map", "token"])
def test_routing_per_map_and_per_token(family, gating):
    """Each layer routes the maps it is given, whatever their size: in Hiera the 16x16 map
    of 16 channels comes as 16 windows of 4x4 per image, the 8x8 map of 32 as 4 windows,
    the 4x4 map of 64 (global block) whole."""
    model, size = _build(family)
    apply_conv_lora(model, gating=gating, **FAST)
    randomise_adapters(model, std=2.0)
    seen = record_routing(model)
    with torch.no_grad():
        _masks(model, family, size=size)
    shapes = set()
    varied = False
    for name, calls in seen.items():
        for x, idx in calls:
            shapes.add(tuple(x.shape))
            assert idx.shape == x.shape[:3], name
            per_map = idx.reshape(idx.shape[0], -1)
            if gating == "map":
                assert torch.all(per_map == per_map[:, :1]), name
            varied |= bool((per_map != per_map[:, :1]).any())
    assert varied == (gating == "token")
    if family == "sam2":
        assert shapes == {(32, 4, 4, 16), (8, 4, 4, 32), (2, 4, 4, 64)}


def test_targets_of_sam3_and_their_errors():
    model, size = _build("sam3-tracker")
    layers = apply_conv_lora(model, targets=["v_proj", "k_proj", "q_proj"], **FAST)
    assert [n.rsplit(".", 1)[1] for n in layers] == ["q_proj", "k_proj", "v_proj"] * 2
    assert read_config(model).targets == ("q_proj", "k_proj", "v_proj")
    for family, targets, err, match in [
        ("sam3-tracker", ["qkv"], ValueError, r"targets: Sam3ViTModel's attention has the "
         r"projections \['q_proj', 'k_proj', 'v_proj'\]; expected a non-empty list of them "
         r"without repeats, got \['qkv'\]"),
        ("sam3-tracker", ["q_proj", "q_proj"], ValueError, "without repeats"),
        ("sam3-tracker", "q_proj", TypeError, "targets: expected a list of projection names"),
        ("sam2", ["q_proj"], ValueError, r"Sam2HieraDetModel's attention has the projections "
         r"\['qkv'\]"),
    ]:
        m, _ = _build(family)
        with pytest.raises(err, match=match):
            apply_conv_lora(m, targets=targets, **FAST)
        assert not any(isinstance(x, ConvLoRALinear) for x in m.modules())
    # only the image encoder's projections: the text, DETR and decoder attention keep theirs
    sam3, _ = _build("sam3")
    apply_conv_lora(sam3, **FAST)
    adapted = [n for n, m in sam3.named_modules() if isinstance(m, ConvLoRALinear)]
    assert all(n.startswith("vision_encoder.backbone.layers.") for n in adapted)
    assert any(n.endswith("q_proj") and not n.startswith("vision_encoder")
               for n, _ in sam3.named_modules())


def read_config(model):
    return model.conv_lora_config


@pytest.mark.parametrize("family", ["sam2", "sam3-tracker"])
def test_bf16_autocast(family):
    model, size = _build(family)
    apply_conv_lora(model, **FAST)
    randomise_adapters(model)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _masks(model, family, size=size)
        loss = out.float().square().mean() + aux_loss(model)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [m.lora_A.grad for m in model.modules() if isinstance(m, ConvLoRALinear)]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    # each layer in bf16 against the same layer in float32 on the inputs autocast gave it,
    # with the routers tied (every token to expert 0) so that rounding cannot flip a choice
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ConvLoRALinear):
                m.router.w_gate.zero_()
                m.router.w_noise.zero_()
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0], out)))
             for m in model.modules() if isinstance(m, ConvLoRALinear)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _masks(model.eval(), family, size=size)
    for h in hooks:
        h.remove()
    assert len(seen) == len(grads)
    for layer, x, out in seen:
        assert out.dtype == torch.bfloat16  # (LayerNorm hands the layer float32 on a CPU)
        with torch.no_grad():
            exact = layer(x.float())
        err = (out.float() - exact).abs().max() / exact.abs().max()
        assert err < 2e-2, err  # inputs and weights rounded to bf16: a few units of 2^-8


@pytest.mark.slow  # compiling SAM 2 / SAM 3: 1-2 min each on 2 cores
@pytest.mark.parametrize("family", ["sam2", "sam3-tracker"])
def test_torch_compile(family):
    model, size = _build(family)
    apply_conv_lora(model, **FAST)
    randomise_adapters(model)
    model.eval()
    inputs = _inputs(family, size)
    with torch.no_grad():
        want = model(**inputs).pred_masks
        got = torch.compile(model)(**inputs).pred_masks
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
