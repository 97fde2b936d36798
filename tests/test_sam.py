"""convlora_kernels.sam on a small ImageEncoderViT / Sam: windowed and global blocks,
relative positions (real builds and transformers' SAM: test_sam_builds.py)."""

import copy
import functools
import warnings

import pytest
import torch
import torch.nn as nn

pytest.importorskip("segment_anything", reason="the SAM tests need segment-anything "
                    "(pip install -e .[test])")
from segment_anything.modeling.image_encoder import Block

from convlora_kernels import ConvLoRALinear
from convlora_kernels import sam as sam_module
from convlora_kernels.sam import (adapter_state_dict, apply_conv_lora, aux_loss, load_adapter,
                                  load_adapter_state_dict, print_trainable_parameters,
                                  read_adapter_config, save_adapter, trainable_parameters)

from sam_helpers import (DEPTH, DIM, FAST, GLOBAL_BLOCKS, GRID, FUSED, WINDOW, Segmenter, images,
                         layer_param_names, perturb_decoder, random_batch, randomise_adapters,
                         record_routing, segment, task_loss, tiny_encoder, tiny_sam,
                         trainable_names)


def _adapted_encoder(seed=0, **kw):
    enc = tiny_encoder(seed)
    apply_conv_lora(enc, **{**FAST, **kw})
    return enc


# --- Set-up ---------------------------------------------------------------------------

def test_output_unchanged_at_initialisation():
    x = images()
    with torch.no_grad():
        expected = tiny_encoder().eval()(x)  # SAM has no dropout: train mode gives the same
        for gating, train in (("map", False), ("token", True)):
            enc = tiny_encoder().train(train)
            layers = apply_conv_lora(enc, gating=gating, **FUSED)
            assert list(layers) == [f"blocks.{i}.attn.qkv" for i in range(DEPTH)]
            assert all(enc.blocks[i].attn.qkv is m for i, m in enumerate(layers.values()))
            assert all(isinstance(m, ConvLoRALinear) and m.training == train
                       for m in layers.values())
            assert torch.equal(enc(x), expected), (gating, train)
    cfg = enc.conv_lora_config
    assert (cfg.r, cfg.num_experts, cfg.alpha, cfg.scales, cfg.gating, cfg.interpolation,
            cfg.blocks) == (3, 8, 32, tuple(range(1, 9)), "token", "bilinear", (0, 1, 2))
    assert cfg.train_mask_decoder is False  # an encoder has no decoder to train


def test_only_adapters_and_the_decoder_train(capsys):
    sam = tiny_sam()
    qkv_weight = sam.image_encoder.blocks[0].attn.qkv.weight
    layers = apply_conv_lora(sam, **FUSED)
    decoder = {f"mask_decoder.{n}" for n, _ in sam.mask_decoder.named_parameters()}
    assert trainable_names(sam) == layer_param_names(layers) | decoder
    assert layers["image_encoder.blocks.0.attn.qkv"].weight is qkv_weight  # shared, frozen
    assert not qkv_weight.requires_grad

    # per layer: lora_A r·C, lora_B 3C·r, experts n·(r·r·9 + r), router 2·r·n
    per_layer = 3 * DIM + 3 * DIM * 3 + 8 * (9 * 9 + 3) + 2 * 3 * 8
    n_decoder = sum(p.numel() for p in sam.mask_decoder.parameters())
    counts = trainable_parameters(sam)
    assert counts.trainable == DEPTH * per_layer + n_decoder
    assert counts.total == sum(p.numel() for p in sam.parameters())
    assert counts.share == counts.trainable / counts.total
    print_trainable_parameters(sam)
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {counts.trainable:,} || all params: {counts.total:,} || "
        f"trainable%: {100 * counts.share:.4f}")

    frozen_decoder = tiny_sam()
    layers = apply_conv_lora(frozen_decoder, train_mask_decoder=False, **FUSED)
    assert trainable_names(frozen_decoder) == layer_param_names(layers)

    some = tiny_encoder()
    layers = apply_conv_lora(some, blocks=[2, 0], **FUSED)
    assert list(layers) == ["blocks.0.attn.qkv", "blocks.2.attn.qkv"]
    assert type(some.blocks[1].attn.qkv) is nn.Linear
    assert some.conv_lora_config.blocks == (0, 2)
    assert trainable_names(some) == layer_param_names(layers)


def test_apply_conv_lora_errors_leave_the_model_unchanged():
    enc = tiny_encoder()
    before = {n: p.requires_grad for n, p in enc.named_parameters()}
    for kw, err, match in [
        (dict(r=0), ValueError, "r: expected a positive integer"),
        (dict(gating="pixel"), ValueError, "gating: expected one of"),
        (dict(blocks=[3]), ValueError, r"blocks: expected indices in \[0, 3\).*got 3"),
        (dict(blocks=[1, 1]), ValueError, "blocks: block 1 is listed twice"),
        (dict(blocks=[]), ValueError, "blocks: expected at least one"),
        (dict(blocks=2), TypeError, "blocks: expected a sequence"),
        (dict(blocks=[0.5]), TypeError, "blocks: expected integer block indices"),
        (dict(train_mask_decoder="yes"), TypeError, "train_mask_decoder: expected a bool"),
    ]:
        with pytest.raises(err, match=match):
            apply_conv_lora(enc, **{**FUSED, **kw})
        assert not any(isinstance(m, ConvLoRALinear) for m in enc.modules())
        assert {n: p.requires_grad for n, p in enc.named_parameters()} == before
        assert not hasattr(enc, "conv_lora_config")

    apply_conv_lora(enc, **FUSED)
    with pytest.raises(ValueError, match="already has 3 Conv-LoRA layers"):
        apply_conv_lora(enc, **FUSED)
    sam = tiny_sam()
    apply_conv_lora(sam.image_encoder, **FUSED)
    with pytest.raises(ValueError, match="apply_conv_lora may be called once"):
        apply_conv_lora(sam, **FUSED)
    with pytest.raises(ValueError, match="Sequential contains no such image encoder"):
        apply_conv_lora(nn.Sequential(nn.Linear(4, 12)))
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        apply_conv_lora("sam")


# --- Training -------------------------------------------------------------------------

@pytest.mark.parametrize("gating", ["token", "map"])
def test_training_steps_reach_every_adapter_tensor(gating):
    sam = tiny_sam()
    layers = apply_conv_lora(sam, gating=gating, **FAST)
    model = Segmenter(sam).train()
    routing = record_routing(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    unused = 0
    for step in range(2):
        for calls in routing.values():
            calls.clear()
        images, boxes, target, target_iou = random_batch(seed=step)
        loss = task_loss(*model(images, boxes), target, target_iou) + aux_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for name, p in model.named_parameters():
            if not p.requires_grad:
                assert p.grad is None, name
                continue
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            # lora_B starts at zero, so the rest of the branch has gradients from step 2
            if ".qkv." in name and (step == 1 or name.endswith(("lora_B", "w_gate", "w_noise"))):
                assert p.grad.abs().sum() > 0, (step, name)
        # single-mask output: only the first mask token's hypernetwork has nonzero gradients
        assert sam.mask_decoder.iou_token.weight.grad.abs().sum() > 0
        assert sam.mask_decoder.output_hypernetworks_mlps[0].layers[0].weight.grad.abs().sum() > 0
        for name, layer in layers.items():
            (_, expert_index), = routing["sam." + name]
            used = set(expert_index.unique().tolist())
            per_expert = layer.conv_weight.grad.flatten(1).abs().sum(1)
            for e in range(layer.num_experts):  # an unchosen expert: a zero gradient
                if e not in used:
                    unused += 1
                    assert per_expert[e] == 0, (name, e)
                elif step == 1:
                    assert per_expert[e] > 0, (name, e)
        opt.step()
    if gating == "map":  # two images: the global block's two units leave experts unchosen
        assert unused > 0


def test_map_gating_routes_per_window_and_per_image():
    enc = _adapted_encoder(gating="map")
    randomise_adapters(enc)
    routing = record_routing(enc)
    with torch.no_grad():
        enc.eval()(images())
    per_window = []
    for i, (name, calls) in enumerate(routing.items()):
        (x, expert_index), = calls
        layer = enc.get_submodule(name)
        if i in GLOBAL_BLOCKS:
            assert expert_index.shape == (2, GRID, GRID)
        else:  # SAM's window partition: 4 windows of 14×14 per image
            assert expert_index.shape == (2 * 4, WINDOW, WINDOW)
            per_window.append(expert_index[:, 0, 0].view(2, 4))
        assert (expert_index == expert_index[:, :1, :1]).all(), name
        # each unit's expert is the top-1 of its mean z = x Aᵀ (eval: no noise)
        z = x @ layer.lora_A.t()
        assert torch.equal(expert_index[:, 0, 0], (z.mean((1, 2)) @ layer.router.w_gate).argmax(1))
    # not trivial: the windows of one image went to different experts
    assert any(len(set(w.tolist())) > 1 for img in per_window for w in img)

    token = _adapted_encoder(gating="token")
    randomise_adapters(token)
    routing = record_routing(token)
    with torch.no_grad():
        token.eval()(images())
    (_, expert_index), = routing["blocks.0.attn.qkv"]
    assert len(expert_index[0].unique()) > 1  # token gating varies inside a window


def test_aux_loss_sums_the_training_forwards():
    enc = _adapted_encoder()
    randomise_adapters(enc)
    layers = [m for m in enc.modules() if isinstance(m, ConvLoRALinear)]
    x = images()
    enc.train()(x)
    total = aux_loss(enc)
    assert total.shape == () and total.dtype == torch.float32 and total.requires_grad
    assert torch.allclose(total, sum(m.aux_loss for m in layers)) and total > 0
    grads = torch.autograd.grad(total, [m.router.w_noise for m in layers])
    assert all(g.abs().sum() > 0 for g in grads)

    layers[0].eval()  # a layer in eval mode is left out
    assert torch.allclose(aux_loss(enc), sum(m.aux_loss for m in layers[1:]))
    with torch.no_grad():
        enc.eval()(x)
    with torch.no_grad():  # evaluation: no warning
        assert aux_loss(enc).item() == 0
    sam_module.model._warn_eval_mode_once.cache_clear()
    with pytest.warns(RuntimeWarning, match=r"every Conv-LoRA layer is in eval mode.*call "
                      r"model.train\(\) before the training forward"):
        zero = aux_loss(enc)
    assert zero.item() == 0 and not zero.requires_grad and zero.shape == ()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aux_loss(enc)  # once per process
    with pytest.raises(ValueError, match="has no Conv-LoRA layers"):
        aux_loss(tiny_encoder())

    with torch.no_grad():  # a training forward without autograd cannot train the routers
        enc.train()(x)
    with pytest.warns(RuntimeWarning, match=r"aux_loss: the router loss of blocks.0.attn.qkv "
                      r"\(3 layer\(s\) in all\) has no gradient"):
        aux_loss(enc)


# --- Saving and loading ---------------------------------------------------------------

def _eval_outputs(sam, seed=7):
    images, boxes, _, _ = random_batch(seed)
    with torch.no_grad():
        return segment(sam.eval(), images, boxes)


def test_adapter_state_dict_round_trip(tmp_path):
    sam = tiny_sam()
    apply_conv_lora(sam, gating="map", **FAST)
    randomise_adapters(sam)
    perturb_decoder(sam)
    sd = adapter_state_dict(sam)
    assert set(sd) == trainable_names(sam)  # exactly the trained tensors, by state_dict names
    full = sam.state_dict()
    assert all(torch.equal(sd[k], full[k]) for k in sd)
    expected = _eval_outputs(sam)

    path = tmp_path / "adapter.safetensors"
    save_adapter(sam, path)
    cfg = read_adapter_config(path)
    assert cfg == dict(r=3, num_experts=4, alpha=32, scales=[1, 2, 3, 4], gating="map",
                       interpolation="bilinear", blocks=[0, 1, 2], train_mask_decoder=True,
                       modules_to_save=[], targets=["qkv"])
    fresh = tiny_sam()
    apply_conv_lora(fresh, **cfg, **FUSED)
    assert not torch.equal(_eval_outputs(fresh)[0], expected[0])
    load_adapter(fresh, path)
    for got, want in zip(_eval_outputs(fresh), expected, strict=True):
        assert torch.equal(got, want)

    again = tiny_sam()
    apply_conv_lora(again, gating="map", **FAST)
    load_adapter_state_dict(again, sd)
    for got, want in zip(_eval_outputs(again), expected, strict=True):
        assert torch.equal(got, want)


def test_adapter_file_mix_ups_get_clear_errors(tmp_path, monkeypatch):
    """SAM's own checkpoint, a file that is not safetensors, a missing path or a folder given
    to read_adapter_config / load_adapter; save_adapter into a missing folder; and a save
    that fails midway leaves the previous file whole and no temporary file behind."""
    sam = tiny_sam()
    apply_conv_lora(sam, **FUSED)
    ckpt = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(sam.state_dict(), ckpt)
    with pytest.raises(ValueError, match=r"sam_vit_b_01ec64.pth is a PyTorch checkpoint "
                       r"\(torch.save\), not an adapter file: SAM's own weights load with "
                       r"sam_model_registry"):
        read_adapter_config(ckpt)
    with pytest.raises(ValueError, match="is a PyTorch checkpoint"):
        load_adapter(sam, ckpt)
    junk = tmp_path / "notes.txt"
    junk.write_text("a text file that is long enough to have eight bytes")
    with pytest.raises(ValueError, match="notes.txt is not a safetensors file"):
        read_adapter_config(junk)
    with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist"):
        read_adapter_config(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="is a folder"):
        read_adapter_config(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"path: the folder .*nope does not exist; "
                       r"create it first \(os.makedirs"):
        save_adapter(sam, tmp_path / "nope" / "adapter.safetensors")

    path = tmp_path / "adapter.safetensors"
    save_adapter(sam, path)
    before = path.read_bytes()
    import safetensors.torch

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    randomise_adapters(sam)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(sam, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter.safetensors", "notes.txt", "sam_vit_b_01ec64.pth"]


def test_adapter_file_whose_header_starts_like_a_pickle(tmp_path):
    """A safetensors file starts with its header's length: one whose low byte is 0x80 (a
    pickle's first byte) is an adapter file all the same. And adapter files take the mode
    new files get under the umask (safetensors writes 0600)."""
    import os
    import stat

    sam = tiny_sam()
    apply_conv_lora(sam, **FUSED)
    randomise_adapters(sam)
    path = tmp_path / "adapter.safetensors"
    old = os.umask(0o022)
    try:
        for pad in range(256):
            save_adapter(sam, path, base_model={"model_type": "tiny", "note": "x" * pad})
            if path.read_bytes()[0] == 0x80:
                break
        else:
            pytest.fail("no padding gave a header length with low byte 0x80")
    finally:
        os.umask(old)
    assert read_adapter_config(path)["r"] == FUSED.get("r", read_adapter_config(path)["r"])
    fresh = tiny_sam()
    apply_conv_lora(fresh, **FUSED)
    load_adapter(fresh, path)
    for k, v in adapter_state_dict(sam).items():
        assert torch.equal(adapter_state_dict(fresh)[k], v), k
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_loading_into_another_setup_names_the_mismatch(tmp_path):
    sam = tiny_sam()
    apply_conv_lora(sam, **FUSED)
    randomise_adapters(sam)
    path = tmp_path / "adapter.safetensors"
    save_adapter(sam, path)
    sd = adapter_state_dict(sam)

    def model(**kw):
        m = tiny_sam(seed=3)
        apply_conv_lora(m, **{**FUSED, **kw})
        return m

    def refuses(m, load, err, match):
        before = {k: v.clone() for k, v in adapter_state_dict(m).items()}
        with pytest.raises(err, match=match):
            load(m)
        after = adapter_state_dict(m)  # nothing was copied
        assert all(torch.equal(before[k], after[k]) for k in before)

    from_file = functools.partial(load_adapter, path=path)
    for kw, match in [(dict(alpha=16), "trained with alpha=32, but this model has alpha=16"),
                      (dict(r=2), "trained with r=3, but this model has r=2"),
                      (dict(gating="map"), "gating='token'.*gating='map'"),
                      (dict(interpolation="bicubic"), "interpolation='bilinear'"),
                      (dict(scales=[2] * 8), r"scales=\(1, 2, 3"),
                      (dict(blocks=[0, 1]), r"blocks=\(0, 1, 2\).*blocks=\(0, 1\)"),
                      (dict(train_mask_decoder=False), "train_mask_decoder=True")]:
        refuses(model(**kw), from_file, ValueError, match)

    from_sd = functools.partial(load_adapter_state_dict, state_dict=sd)
    refuses(model(r=2), from_sd, ValueError,
            r"state_dict\['image_encoder.blocks.0.attn.qkv.lora_A'\]: expected shape \(2, 32\) "
            r"\(this model: r=2, num_experts=8\), got \(3, 32\)")
    refuses(model(num_experts=4), from_sd, ValueError, r"conv_weight'\]: expected shape \(4, ")
    refuses(model(blocks=[0, 1]), from_sd, ValueError,
            r"unexpected 6 \(this model has no such tensor\): image_encoder.blocks.2")
    refuses(model(train_mask_decoder=False), from_sd, ValueError, "unexpected .*mask_decoder")
    partial_sd = {k: v for k, v in sd.items() if not k.endswith("router.w_noise")}
    refuses(model(), functools.partial(load_adapter_state_dict, state_dict=partial_sd), ValueError,
            r"missing 3 \(this model has them\): image_encoder.blocks.0.attn.qkv.router")
    bad_value = dict(sd, **{next(iter(sd)): [1.0]})
    refuses(model(), functools.partial(load_adapter_state_dict, state_dict=bad_value),
            TypeError, "expected a tensor, got list")

    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.ones(2)}, str(other))
    refuses(model(), functools.partial(load_adapter, path=other), ValueError,
            "is not a Conv-LoRA adapter file")
    with pytest.raises(ValueError, match="call apply_conv_lora"):
        load_adapter(tiny_sam(), path)
    with pytest.raises(ValueError, match="call apply_conv_lora"):
        adapter_state_dict(tiny_encoder())


# --- torch.compile, bf16 autocast, activation checkpointing --------------------------

def _bf16_error(enc, x):
    """Max error of an eval forward under bf16 autocast against float64, relative to the
    largest output."""
    with torch.no_grad():
        truth = copy.deepcopy(enc).double()(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = enc(x)  # the neck's LayerNorm2d returns float32
    return ((y.double() - truth).abs().max() / truth.abs().max()).item(), truth


def test_bf16_autocast():
    x = images(batch=1)
    base = _adapted_encoder().eval()  # at initialisation: the frozen model's bf16 error
    err_base, out_base = _bf16_error(base, x)
    enc = _adapted_encoder().eval()
    randomise_adapters(enc, std=0.03)
    err, out = _bf16_error(enc, x)
    effect = ((out - out_base).abs().max() / out.abs().max()).item()
    assert effect > 10 * err, "the adapters must change the output well beyond bf16 rounding"
    assert err <= 2 * err_base + 1e-3, f"bf16 error {err:.3e}, without adapters {err_base:.3e}"

    out_dtypes = []
    for m in enc.modules():
        if isinstance(m, ConvLoRALinear):
            m.register_forward_hook(lambda mod, args, out: out_dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = enc.train()(x).float().square().mean() + aux_loss(enc)
    assert out_dtypes == [torch.bfloat16] * DEPTH
    loss.backward()
    for name, p in enc.named_parameters():
        if p.requires_grad:
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


def test_activation_checkpointing_of_encoder_blocks():
    ckpt = pytest.importorskip("torch.distributed.algorithms._checkpoint.checkpoint_wrapper")
    wrap = functools.partial(ckpt.apply_activation_checkpointing,
                             checkpoint_wrapper_fn=functools.partial(
                                 ckpt.checkpoint_wrapper,
                                 checkpoint_impl=ckpt.CheckpointImpl.NO_REENTRANT),
                             check_fn=lambda m: isinstance(m, Block))
    plain = _adapted_encoder()
    randomise_adapters(plain)
    wrapped = copy.deepcopy(plain)
    wrap(wrapped)
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_modules())
    assert adapter_state_dict(wrapped).keys() == adapter_state_dict(plain).keys()
    x = images()
    outs = []
    for model in (plain, wrapped):
        torch.manual_seed(5)  # the same router noise in both
        y = model.train()(x)
        (y.square().mean() + aux_loss(model)).backward()
        outs.append(y.detach())
    assert torch.equal(outs[0], outs[1])
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for n, p in wrapped.named_parameters():
        if p.requires_grad:
            key = n.replace("_checkpoint_wrapped_module.", "")
            assert p.grad is not None and grads[key].abs().sum() > 0, key
            assert torch.allclose(p.grad, grads[key], rtol=1e-5, atol=1e-7), key

    blocks_first = tiny_encoder()  # blocks wrapped before apply_conv_lora
    wrap(blocks_first)
    layers = apply_conv_lora(blocks_first, **FUSED)
    assert list(layers) == [f"blocks.{i}.attn.qkv" for i in range(DEPTH)]


def test_torch_compile():
    """aot_eager traces what inductor would (dynamo, AOT autograd, fake tensors) without
    the C++ code generation that takes minutes on a small CPU machine."""
    torch._dynamo.reset()
    enc = tiny_encoder(depth=2, global_attn_indexes=(1,))
    apply_conv_lora(enc, num_experts=2, **FUSED)
    randomise_adapters(enc, std=0.1)
    x = images()
    compiled = torch.compile(enc, backend="aot_eager")
    with torch.no_grad():
        # float32 rounding only: AOT autograd decomposes some ops (interpolation, GELU)
        torch.testing.assert_close(compiled.eval()(x), enc(x), rtol=1e-4, atol=1e-4)
    y = compiled.train()(x)
    total = aux_loss(compiled)
    assert total.requires_grad and total > 0
    (y.square().mean() + total).backward()
    for name, p in enc.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert adapter_state_dict(compiled).keys() == adapter_state_dict(enc).keys()
    torch._dynamo.reset()
