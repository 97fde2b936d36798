"""convlora_kernels.sam on segment_anything's vit_b/l/h builds (without downloaded weights)
and on transformers' SamModel / SamVisionModel (skipped when transformers is missing)."""

import pytest
import torch

pytest.importorskip("segment_anything", reason="the SAM tests need segment-anything "
                    "(pip install -e .[test])")
from segment_anything import sam_model_registry

from convlora_kernels.sam import (adapter_state_dict, apply_conv_lora, aux_loss, load_adapter,
                                  load_adapter_state_dict, read_adapter_config, save_adapter,
                                  trainable_parameters)

from sam_helpers import (DEPTH, DIM, FAST, GLOBAL_BLOCKS, GRID, IMG, FUSED, WINDOW, images,
                         layer_param_names, perturb_decoder, random_batch, randomise_adapters,
                         record_routing, task_loss, trainable_names)


# --- Real SAM builds ------------------------------------------------------------------

VITS = {"vit_b": (12, 768, (2, 5, 8, 11)), "vit_l": (24, 1024, (5, 11, 17, 23)),
        "vit_h": (32, 1280, (7, 15, 23, 31))}


@pytest.mark.parametrize("name", list(VITS))
def test_vit_structure_without_weights(name):
    depth, dim, global_blocks = VITS[name]
    with torch.device("meta"):  # the structure, without memory or initialisation time
        sam = sam_model_registry[name]()
    layers = apply_conv_lora(sam, **FUSED)
    assert list(layers) == [f"image_encoder.blocks.{i}.attn.qkv" for i in range(depth)]
    for i, block in enumerate(sam.image_encoder.blocks):
        assert block.window_size == (0 if i in global_blocks else 14)
        assert (block.attn.qkv.in_features, block.attn.qkv.out_features) == (dim, 3 * dim)
    per_layer = 3 * dim + 3 * dim * 3 + 8 * (9 * 9 + 3) + 2 * 3 * 8
    n_decoder = sum(p.numel() for p in sam.mask_decoder.parameters())
    assert trainable_parameters(sam).trainable == depth * per_layer + n_decoder
    assert set(adapter_state_dict(sam)) == trainable_names(sam)


def _encode_tokens(sam, tokens):
    """The encoder's blocks and neck on a (B, H, W, C) token map: every module of the
    1024×1024 forward (windows with padding, global blocks with interpolated relative
    positions) at a fraction of its cost."""
    x = tokens
    with torch.no_grad():
        for blk in sam.image_encoder.blocks:
            x = blk(x)
        return sam.image_encoder.neck(x.permute(0, 3, 1, 2))


def test_vit_b_from_a_checkpoint_file(tmp_path):
    torch.manual_seed(0)
    original = sam_model_registry["vit_b"]()
    with torch.no_grad():  # positional tensors start at zero; give them values that act
        for n, p in original.image_encoder.named_parameters():
            if "rel_pos" in n or n == "pos_embed":
                p.normal_(0, 0.1)
    path = tmp_path / "sam_vit_b.pth"
    torch.save(original.state_dict(), path)

    sam = sam_model_registry["vit_b"](checkpoint=str(path))  # the official loading path
    layers = apply_conv_lora(sam, **FUSED)
    assert len(layers) == 12
    assert torch.equal(layers["image_encoder.blocks.3.attn.qkv"].weight,
                       original.image_encoder.blocks[3].attn.qkv.weight)
    # SAM's tensor names are kept: the checkpoint loads again, leaving out only the adapters
    result = sam.load_state_dict(torch.load(path), strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == layer_param_names(layers)

    # 16×16 tokens: windowed blocks pad to 28×28 (4 windows), as 64×64 pads to 70×70
    tokens = torch.randn(1, 16, 16, 768, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_encode_tokens(sam, tokens), _encode_tokens(original, tokens),
                               rtol=0, atol=0)

    randomise_adapters(sam, std=0.05)
    perturb_decoder(sam)
    adapter = tmp_path / "adapter.safetensors"
    save_adapter(sam, adapter)
    reloaded = sam_model_registry["vit_b"](checkpoint=str(path))
    apply_conv_lora(reloaded, **read_adapter_config(adapter), **FUSED)
    load_adapter(reloaded, adapter)
    # every tensor of the fine-tuned model is back (outputs: test_adapter_state_dict_round_trip)
    want, got = sam.state_dict(), reloaded.state_dict()
    assert want.keys() == got.keys()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    assert not torch.equal(got["mask_decoder.iou_token.weight"],
                           original.mask_decoder.iou_token.weight)


# --- transformers' SAM (optional) -----------------------------------------------------

def _hf_config():
    transformers = pytest.importorskip("transformers")
    vision = transformers.SamVisionConfig(
        hidden_size=DIM, output_channels=32, num_hidden_layers=DEPTH, num_attention_heads=2,
        image_size=IMG, patch_size=8, mlp_dim=64, window_size=WINDOW,
        global_attn_indexes=list(GLOBAL_BLOCKS), num_pos_feats=16)
    return transformers, transformers.SamConfig(
        vision_config=vision,
        prompt_encoder_config=transformers.SamPromptEncoderConfig(
            hidden_size=32, image_size=IMG, patch_size=8, mask_input_channels=4),
        mask_decoder_config=transformers.SamMaskDecoderConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_dim=64,
            iou_head_hidden_dim=32))


def _hf_model(cls, config, seed=0):
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # its default initialisation is near zero; make every weight act
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _hf_sam():
    transformers, config = _hf_config()
    return _hf_model(transformers.SamModel, config)


def _hf_forward(model, seed=0):
    images, boxes, target, target_iou = random_batch(seed)
    out = model(pixel_values=images, input_boxes=boxes[:, None], multimask_output=False)
    return out.pred_masks[:, 0], out.iou_scores[:, 0], target, target_iou


def test_transformers_sam_model():
    model = _hf_sam()
    with torch.no_grad():
        expected = _hf_forward(model)[0]
    layers = apply_conv_lora(model, gating="map", **FAST)
    assert list(layers) == [f"vision_encoder.layers.{i}.attn.qkv" for i in range(DEPTH)]
    decoder = {f"mask_decoder.{n}" for n, _ in model.mask_decoder.named_parameters()}
    assert trainable_names(model) == layer_param_names(layers) | decoder
    with torch.no_grad():
        assert torch.equal(_hf_forward(model)[0], expected)

    routing = record_routing(model)
    masks, ious, target, target_iou = _hf_forward(model.train())
    (task_loss(masks, ious, target, target_iou) + aux_loss(model)).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    (_, windowed), = routing["vision_encoder.layers.0.attn.qkv"]
    (_, global_), = routing["vision_encoder.layers.1.attn.qkv"]
    assert windowed.shape == (2 * 4, WINDOW, WINDOW) and global_.shape == (2, GRID, GRID)

    randomise_adapters(model)
    with torch.no_grad():
        trained = _hf_forward(model.eval())[0]
    fresh = _hf_sam()
    apply_conv_lora(fresh, gating="map", **FAST)
    load_adapter_state_dict(fresh, adapter_state_dict(model))
    with torch.no_grad():
        assert torch.equal(_hf_forward(fresh)[0], trained)


def test_transformers_sam_vision_model():
    transformers, config = _hf_config()
    model = _hf_model(transformers.SamVisionModel, config.vision_config)
    x = images()
    with torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state
        layers = apply_conv_lora(model, **FAST)
        assert list(layers) == [f"vision_encoder.layers.{i}.attn.qkv" for i in range(DEPTH)]
        assert torch.equal(model(pixel_values=x).last_hidden_state, expected)
        randomise_adapters(model)
        assert not torch.equal(model(pixel_values=x).last_hidden_state, expected)
    assert trainable_names(model) == layer_param_names(layers)
