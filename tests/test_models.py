"""build_model: every architecture with both heads, the smp adapters, and a short training run."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gmmseg_core.heads import GMMHead, SoftmaxHead
from gmmseg_core.models import ARCHS, SegmentationModel, build_backbone, build_model, check_model_arguments
from gmmseg_core.models.deeplab import ASPP
from gmmseg_core.models.fcn import DilatedResNet
from gmmseg_core.models.segformer import Block, EfficientSelfAttention

C = 4
IN_HOUSE = sorted(ARCHS)
GMM_KW = dict(embed_dim=8, num_components=2, memory_size=32, update_interval=1)


def _data(B=2, H=32, W=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, H, W, generator=g)
    labels = torch.randint(0, C, (B, H, W), generator=g)
    labels[:, :3] = 255
    return images, labels


def _check_model(model, images, labels):
    B, _, H, W = images.shape
    out = model.forward_train(images, labels)
    assert set(out) >= {"loss", "logits", "features", "ce", "aux"}
    assert out["logits"].shape == (B, C, H, W)
    assert out["features"].shape[:2] == (B, model.backbone.out_channels)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    model.update_head(out["features"], labels, out["logits"])
    assert set(model(images, labels)) == set(out)      # the DDP-friendly spelling of forward_train
    model.eval()
    with torch.no_grad():
        assert model(images).shape == (B, C, H, W)
        if model.is_generative:
            loglik = model.class_log_likelihood(images)
            assert loglik.shape == (B, C, H, W) and torch.isfinite(loglik).all()
        else:
            with pytest.raises(TypeError, match="generative head"):
                model.class_log_likelihood(images)


@pytest.mark.parametrize("arch", IN_HOUSE)
@pytest.mark.parametrize("head", ["gmm", "softmax"])
def test_in_house_arch_shapes(arch, head):
    model = build_model(arch, head, num_classes=C, width=8, head_kwargs=GMM_KW if head == "gmm" else None)
    assert isinstance(model, SegmentationModel)
    assert isinstance(model.head, GMMHead if head == "gmm" else SoftmaxHead)
    assert model.is_generative == (head == "gmm")
    _check_model(model, *_data())
    if head == "gmm":
        assert int(model.head.num_updates) == 1 and int(model.head.memory_count.sum()) > 0


@pytest.mark.parametrize("arch", IN_HOUSE)
def test_odd_input_sizes(arch):
    model = build_model(arch, "gmm", num_classes=C, width=8, head_kwargs=GMM_KW).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 37, 29)).shape == (1, C, 37, 29)


@pytest.mark.parametrize("arch", ["smp:Segformer:mit_b0", "smp:UPerNet:resnet18"])
def test_smp_adapters(arch):
    pytest.importorskip("segmentation_models_pytorch")
    model = build_model(arch, "gmm", num_classes=C, encoder_weights=None,
                        head_kwargs=dict(GMM_KW, variant="official"))
    assert model.backbone.out_channels == model.head.embed[0].in_channels
    _check_model(model, *_data(H=64, W=64))
    with torch.no_grad():                          # sides that are not multiples of 32 are padded inside
        assert model(torch.randn(2, 3, 40, 72)).shape == (2, C, 40, 72)


class _Connection:
    def close(self):
        pass


def _hub(monkeypatch, cached=False, reachable=True):
    """The Hugging Face Hub as the smp adapter sees it, without touching the network: weights cached or not, its
    host reachable or not (as without network: the name does not resolve). Returns the connections tried."""
    import huggingface_hub

    from gmmseg_core.models import smp_adapter

    tried = []

    def connect(address, timeout=None):
        tried.append(address)
        if not reachable:
            raise OSError(-2, "Name or service not known")
        return _Connection()

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://huggingface.co")
    for var in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo_id, filename, **kw: f"/cache/{repo_id}/{filename}" if cached else None)
    monkeypatch.setattr(smp_adapter.socket, "create_connection", connect)
    return tried


def _recording_create_model(monkeypatch, smp):
    """smp.create_model that records the weights asked for and builds with random ones. Returns the record."""
    real, asked = smp.create_model, []

    def create_model(*args, encoder_weights=None, **kw):
        asked.append(encoder_weights)
        return real(*args, encoder_weights=None, **kw)

    monkeypatch.setattr(smp, "create_model", create_model)
    return asked


def test_smp_pretrained_weights_fail_at_once_without_network(monkeypatch):
    smp = pytest.importorskip("segmentation_models_pytorch")
    tried = _hub(monkeypatch, cached=False, reachable=False)
    asked = _recording_create_model(monkeypatch, smp)
    with pytest.raises(FileNotFoundError, match=r"'imagenet' weights of smp encoder 'resnet18' \(they are not in "
                       r"the local cache and huggingface.co:443 cannot be reached: \[Errno -2\] Name or service not "
                       r"known\).*encoder_weights=None.*HF_HUB_OFFLINE=1"):
        build_model("smp:Unet:resnet18", "softmax", num_classes=3)
    assert tried == [("huggingface.co", 443)] and asked == []       # huggingface_hub's retries never start


@pytest.mark.parametrize("case", ["cached", "reachable", "proxy", "offline mode", "timm encoder"])
def test_smp_pretrained_weights_load_as_before_where_the_hub_may_serve_them(monkeypatch, case):
    import huggingface_hub

    smp = pytest.importorskip("segmentation_models_pytorch")
    tried = _hub(monkeypatch, cached=case == "cached", reachable=case == "reachable")
    if case == "proxy":
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    if case == "offline mode":      # huggingface_hub itself answers at once from the cache
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    asked = _recording_create_model(monkeypatch, smp)
    encoder = "tu-resnet18" if case == "timm encoder" else "resnet18"
    build_model(f"smp:Unet:{encoder}", "softmax", num_classes=3, encoder_weights="imagenet")
    assert asked == ["imagenet"]
    assert tried == ([("huggingface.co", 443)] if case == "reachable" else [])


def test_smp_pretrained_weights_that_cannot_be_fetched_say_how_to_proceed(monkeypatch):
    smp = pytest.importorskip("segmentation_models_pytorch")
    _hub(monkeypatch, cached=False, reachable=True)     # the host answers, the download itself fails
    real = smp.create_model

    def offline(*args, encoder_weights=None, **kw):     # what the hub raises without network or cached copy
        if encoder_weights is not None:
            raise OSError("cannot reach the hub and the file is not in the local cache")
        return real(*args, encoder_weights=None, **kw)

    monkeypatch.setattr(smp, "create_model", offline)
    with pytest.raises(FileNotFoundError, match=r"'imagenet' weights of smp encoder 'mit_b0' \(cannot reach the hub"
                       r".*model_kwargs.encoder_weights=null"):
        build_model("smp:Segformer:mit_b0", "gmm", num_classes=C)
    assert build_model("smp:Segformer:mit_b0", "gmm", num_classes=C, encoder_weights=None).num_classes == C


def test_smp_architecture_whose_head_is_more_than_a_classifier_is_refused():
    smp = pytest.importorskip("segmentation_models_pytorch")
    if "dpt" not in {name.lower() for name in smp.MODEL_ARCHITECTURES_MAPPING}:  # smp 0.4: all classifier heads
        pytest.skip(f"smp {smp.__version__} has no DPT (smp 0.5 added it)")
    with pytest.raises(ValueError, match=r"segmentation head \(DPTSegmentationHead\) is not a classifier"):
        build_model("smp:DPT:tu-vit_tiny_patch16_224", "gmm", num_classes=C, encoder_weights=None)


def test_bad_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"arch must be one of \['deeplabv3plus', 'fcn', 'segformer'\]"):
        build_model("unet", num_classes=C)
    with pytest.raises(ValueError, match="head must be one of"):
        build_model("fcn", "svm", num_classes=C)
    with pytest.raises(ValueError, match="smp:<Architecture>:<encoder>"):
        build_model("smp:Unet", num_classes=C)
    with pytest.raises(ValueError, match="size must be one of"):
        build_model("segformer", num_classes=C, size="huge")
    with pytest.raises(ValueError, match="variant must be one of"):
        build_model("fcn", num_classes=C, head_kwargs=dict(variant="x"))


@pytest.mark.parametrize("arch, kw, message", [
    ("fcn", dict(width=-1), "width must be None or a positive int, got -1"),
    ("fcn", dict(width=0), "width must be None or a positive int, got 0"),
    ("fcn", dict(width="abc"), "width must be None or a positive int, got 'abc'"),
    ("fcn", dict(width=8.0), "width must be None or a positive int, got 8.0"),
    ("fcn", dict(width=True), "width must be None or a positive int, got True"),
    ("fcn", dict(channels=0), "channels must be None or a positive int, got 0"),
    ("fcn", dict(channels=-3), "channels must be None or a positive int, got -3"),
    ("fcn", dict(depths=[1, 0, 1, 1]), r"depths must be None or 4 positive ints, got \[1, 0, 1, 1\]"),
    ("fcn", dict(depths=[]), r"depths must be None or 4 positive ints, got \[\]"),
    ("fcn", dict(depths="abcd"), "depths must be None or 4 positive ints, got 'abcd'"),
    ("deeplabv3plus", dict(width=-1), "width must be None or a positive int, got -1"),
    ("deeplabv3plus", dict(channels=0), "channels must be None or a positive int, got 0"),
    ("deeplabv3plus", dict(aspp_rates=[2, 0, 6]), r"aspp_rates must be None or a sequence of positive ints"),
    ("segformer", dict(width=-2), "width must be None or a positive int, got -2"),
    ("segformer", dict(width=0), "width must be None or a positive int, got 0"),
    ("segformer", dict(decoder_dim=-3), "decoder_dim must be None or a positive int, got -3"),
    ("segformer", dict(dims=[16, 32, 64]), r"dims must be None or 4 positive ints, got \[16, 32, 64\]"),
    ("segformer", dict(heads=[1, 1, 0, 4]), r"heads must be None or 4 positive ints"),
    ("segformer", dict(depths=[1, 1, 1, -1]), r"depths must be None or 4 positive ints"),
    ("segformer", dict(size=["tiny"]), r"size must be one of \['tiny', 'small', 'base'\], got \['tiny'\]"),
])
def test_backbone_sizes_must_be_positive_ints(arch, kw, message):
    with pytest.raises(ValueError, match=message):
        build_model(arch, "softmax", num_classes=C, **kw)


def test_explicit_backbone_sizes_override_the_preset():
    assert build_backbone("fcn", width=4, depths=[1, 1, 1, 1], channels=12).out_channels == 12
    assert build_backbone("deeplabv3plus", width=4, aspp_rates=[1, 2]).out_channels == 16
    assert build_backbone("segformer", width=4).out_channels == 16
    assert build_backbone("segformer", decoder_dim=24).out_channels == 24


def test_sizes_grow():
    counts = [sum(p.numel() for p in build_model("segformer", "softmax", num_classes=C, size=s).parameters())
              for s in ("tiny", "small", "base")]
    assert counts[0] < counts[1] < counts[2]


PALETTE = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_short_training_learns(variant):
    # four 16x16 tiles per image, each the colour of its class plus noise: 40 steps must beat chance clearly
    torch.manual_seed(0)
    model = build_model("fcn", "gmm", num_classes=C, width=8,
                        head_kwargs=dict(GMM_KW, variant=variant, mean_momentum=0.9))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    acc = []
    for _ in range(40):
        labels = torch.randint(0, C, (4, 2, 2), generator=g).repeat_interleave(16, 1).repeat_interleave(16, 2)
        images = PALETTE[labels].permute(0, 3, 1, 2) + 0.3 * torch.randn(4, 3, 32, 32, generator=g)
        out = model.forward_train(images, labels)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        model.update_head(out["features"], labels, out["logits"])
        acc.append(float((out["logits"].argmax(1) == labels).float().mean()))
    assert int(model.head.num_updates) == 40
    assert sum(acc[-10:]) / 10 > sum(acc[:5]) / 5 + 0.1, acc


@pytest.mark.parametrize("kw, message", [
    (dict(decoder_chanels=(64, 32, 16, 8, 4)), r"model_kwargs \['decoder_chanels'\] are not arguments of smp.Unet"),
    (dict(classes=3), r"model_kwargs \['classes'\] are set by the adapter"),
])
def test_smp_keywords_are_checked_against_the_architecture(kw, message):
    pytest.importorskip("segmentation_models_pytorch")
    with pytest.raises(ValueError, match=message):
        build_model("smp:Unet:resnet18", "softmax", num_classes=3, encoder_weights=None, **kw)
    with pytest.raises(ValueError, match="unknown smp encoder 'nope'"):
        build_model("smp:Unet:nope", "softmax", num_classes=3, encoder_weights=None)


def test_smp_deprecated_keywords_it_still_takes_pass_the_check():
    pytest.importorskip("segmentation_models_pytorch")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model("smp:Unet:resnet18", "softmax", num_classes=3, encoder_weights=None,
                            decoder_use_batchnorm=False)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_forward_upsamples_the_head_logits_bilinearly():
    torch.manual_seed(0)
    model = build_model("fcn", "softmax", num_classes=C, width=4).eval()
    images = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        small = model.head(model.backbone(images))
        ref = F.interpolate(small, size=(32, 48), mode="bilinear", align_corners=False)
        torch.testing.assert_close(model(images), ref)


def test_training_loss_is_the_labelled_pixels_cross_entropy_plus_the_component_loss():
    torch.manual_seed(0)
    model = build_model("fcn", "gmm", num_classes=C, width=4, head_kwargs=dict(GMM_KW, variant="official"))
    images, labels = _data()
    out = model.forward_train(images, labels)
    ce = F.cross_entropy(out["logits"], labels, ignore_index=255)       # the mean over labelled pixels only
    torch.testing.assert_close(out["ce"], ce.detach())
    assert float(out["aux"]) > 0 and not out["ce"].requires_grad and not out["aux"].requires_grad
    torch.testing.assert_close(out["loss"], ce + out["aux"])


def test_labels_at_another_resolution_are_scored_by_logits_resized_to_them():
    torch.manual_seed(0)
    model = build_model("fcn", "softmax", num_classes=C, width=4)
    images, labels = _data()
    labels = labels[:, ::2, ::2]
    out = model.forward_train(images, labels)
    small = model.head(model.backbone(images))          # train-mode BatchNorm: batch statistics, same values
    ref = F.cross_entropy(F.interpolate(small, size=labels.shape[-2:], mode="bilinear", align_corners=False),
                          labels, ignore_index=255)
    torch.testing.assert_close(out["ce"], ref.detach())
    assert out["logits"].shape[-2:] == images.shape[-2:]


@pytest.mark.parametrize("head", ["gmm", "softmax"])
def test_a_batch_without_labelled_pixels_has_a_zero_loss_that_back_propagates(head):
    model = build_model("fcn", head, num_classes=C, width=4, head_kwargs=GMM_KW if head == "gmm" else None)
    images, labels = _data()
    out = model.forward_train(images, torch.full_like(labels, 255))
    assert float(out["loss"].detach()) == 0.0
    out["loss"].backward()


@pytest.mark.parametrize("arch, stride", [("fcn", 8), ("deeplabv3plus", 4), ("segformer", 4)])
def test_features_come_at_the_documented_stride_and_width(arch, stride):
    backbone = build_backbone(arch, width=4).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 64, 96))
    assert backbone.out_channels == 16 and features.shape[1:] == (16, 64 // stride, 96 // stride)


@pytest.mark.parametrize("output_stride", [8, 16])
def test_dilated_resnet_stages_are_post_activation_residual_maps_at_their_strides(output_stride):
    encoder = DilatedResNet(4, (1, 1, 1, 1), output_stride).eval()
    with torch.no_grad():
        feats = encoder(torch.randn(1, 3, 64, 64))
    strides = (4, 8, 8, 8) if output_stride == 8 else (4, 8, 16, 16)
    assert [f.shape[1:] for f in feats] == [(4 * m, 64 // s, 64 // s) for m, s in zip((1, 2, 4, 8), strides)]
    assert all(float(f.min()) >= 0 for f in feats)


def test_deeplab_runs_its_aspp_on_stride_16_features():
    backbone = build_backbone("deeplabv3plus", width=4).eval()
    with torch.no_grad():
        assert backbone.encoder(torch.randn(1, 3, 64, 64))[-1].shape[-2:] == (4, 4)


def _reach(module, x):
    """Rows of ``x`` (1, Cin, S, S) that the centre output pixel of ``module`` (eval mode) depends on."""
    x = x.clone().requires_grad_(True)
    out = module.eval()(x)
    out = out[-1] if isinstance(out, list) else out
    out[0, :, out.shape[-2] // 2, out.shape[-1] // 2].sum().backward()
    rows = x.grad.abs().sum((0, 1, 3)).nonzero()
    return int(rows.max() - rows.min() + 1)


def test_dilation_and_depth_set_the_receptive_field():
    # theoretical receptive fields of width-4 encoders with one block per stage: the FCN backbone 275 rows (its
    # last stages dilated 2 and 4, then two 3x3 convolutions at stride 8; 147 without dilation), the stride-16
    # encoder 227 (163 without its rate-2 stage); a second block in every stage adds to both
    torch.manual_seed(0)
    x = torch.randn(1, 3, 320, 320)
    assert _reach(build_backbone("fcn", width=4), x) == 275
    assert _reach(DilatedResNet(4, (1, 1, 1, 1), 16), x) == 227
    assert _reach(DilatedResNet(4, (2, 2, 2, 2), 16), x) > 227


def test_aspp_pools_the_whole_image_and_its_branches_reach_their_rates():
    torch.manual_seed(0)
    aspp = ASPP(8, 8, rates=(2, 4, 6))
    x = torch.randn(1, 8, 40, 40)
    assert _reach(aspp, x) == 40
    nn.init.zeros_(aspp.pool[1].weight)        # silence the image-pooling branch
    assert _reach(aspp, x) == 2 * 6 + 1


def test_deeplab_decoder_fuses_the_low_level_features():
    torch.manual_seed(0)
    backbone = build_backbone("deeplabv3plus", width=4).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fused = backbone(images)
        handle = backbone.skip.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
        without_skip = backbone(images)
        handle.remove()
    assert not torch.allclose(fused, without_skip)


def test_update_head_passes_the_given_logits_on():
    # with correct_only, pixels whose given logits predict another class stay out of the memory
    torch.manual_seed(0)
    model = build_model("fcn", "gmm", num_classes=C, width=4, head_kwargs=dict(GMM_KW, correct_only=True))
    images, labels = _data()
    out = model.forward_train(images, labels)
    logits = torch.zeros_like(out["logits"])
    logits[:, 0] = 1.0                                  # class 0 everywhere
    model.update_head(out["features"], labels, logits)
    counts = model.head.memory_count.view(C, -1).sum(1)
    assert int(counts[0]) > 0 and int(counts[1:].sum()) == 0


def test_reduced_attention_sees_every_token_of_a_map_its_reduction_does_not_divide():
    torch.manual_seed(0)
    attn = EfficientSelfAttention(8, heads=2, sr_ratio=4)
    x = torch.randn(1, 36, 8, requires_grad=True)               # a 6 x 6 map
    attn(x, 6, 6)[0, 0].sum().backward()
    assert bool((x.grad[0].abs().sum(1) > 0).all())             # the first query reads the last row and column


def test_segformer_stages_end_layer_normalised():
    torch.manual_seed(0)
    backbone = build_backbone("segformer", width=4).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for stage in backbone.stages:
            x = stage(x)
            torch.testing.assert_close(x.mean(1), torch.zeros_like(x[:, 0]), atol=1e-5, rtol=0)
            torch.testing.assert_close(x.var(1, unbiased=False), torch.ones_like(x[:, 0]), atol=1e-3, rtol=0)


def _reference_attention(attn, x, h, w, heads):
    """Multi-head attention, ``softmax(q k^T / sqrt(d)) v``, with keys and values from the map reduced by
    ``attn.sr`` (a strided convolution, then LayerNorm) when it has one."""
    B, N, C = x.shape
    kv = x
    if attn.sr is not None:
        kv = attn.sr_norm(attn.sr(x.transpose(1, 2).reshape(B, C, h, w)).flatten(2).transpose(1, 2))
    k, v = attn.kv(kv).split(C, dim=-1)

    def split(t):                                                  # (B, n, C) -> (B, heads, n, C / heads)
        return t.reshape(B, -1, heads, C // heads).transpose(1, 2)

    q, k, v = split(attn.q(x)), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / (C // heads) ** 0.5, dim=-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("sr_ratio", [1, 2])
def test_efficient_self_attention_is_multi_head_attention_over_the_reduced_map(sr_ratio):
    torch.manual_seed(0)
    attn = EfficientSelfAttention(8, heads=2, sr_ratio=sr_ratio)
    x = torch.randn(2, 24, 8)                                      # a 4 x 6 map
    torch.testing.assert_close(attn(x, 4, 6), _reference_attention(attn, x, 4, 6, heads=2))


def test_transformer_block_is_pre_norm_attention_then_mix_ffn_with_residuals():
    torch.manual_seed(0)
    block = Block(8, heads=2, sr_ratio=2)
    x = torch.randn(2, 24, 8)
    y = x + _reference_attention(block.attn, block.norm1(x), 4, 6, heads=2)
    ffn, z = block.ffn, block.norm2(y)
    hidden = ffn.fc1(z).transpose(1, 2).reshape(2, -1, 4, 6)
    mixed = F.gelu(ffn.dw(hidden).flatten(2).transpose(1, 2))       # depth-wise 3x3 convolution, then GELU
    torch.testing.assert_close(block(x, 4, 6), y + ffn.fc2(mixed))


def test_smp_inputs_are_padded_at_the_bottom_right_and_features_cropped_back():
    pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    backbone = build_backbone("smp:Segformer:mit_b0", encoder_weights=None).eval()
    images = torch.randn(1, 3, 40, 50)
    with torch.no_grad():
        features = backbone(images)                                  # stride 4 on the 64 x 64 padded input
        padded = backbone(F.pad(images, (0, 14, 0, 24)))
    assert features.shape[-2:] == (10, 13)
    torch.testing.assert_close(features, padded[..., :10, :13])


def test_build_model_puts_the_model_on_the_device_asked_for():
    model = build_model("fcn", "gmm", num_classes=C, width=4, head_kwargs=GMM_KW, device="meta")
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"} and model.arch == "fcn"


def test_model_keywords_are_checked_without_building_anything():
    with pytest.raises(ValueError, match=r"model_kwargs \['depth'\] are not arguments of FCNBackbone"):
        check_model_arguments("fcn", "gmm", model_kwargs={"depth": 2})
    with pytest.raises(ValueError, match=r"head_kwargs \['variant'\] are not arguments of SoftmaxHead"):
        check_model_arguments("fcn", "softmax", head_kwargs={"variant": "paper"})


def test_smp_pan_says_which_input_sizes_it_needs():
    pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    model = build_model("smp:PAN:resnet18", "softmax", num_classes=C, encoder_weights=None).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 97, 130)).shape == (1, C, 97, 130)   # padded to 128 x 160
        with pytest.raises(ValueError, match=r"reach 128 pixels .* got 96x130"):
            model(torch.randn(1, 3, 96, 130))
