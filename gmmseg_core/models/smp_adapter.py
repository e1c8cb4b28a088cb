"""Backbones from segmentation-models-pytorch: ``arch="smp:<Architecture>:<encoder>"``.

The smp model is built with its usual constructor; its ``segmentation_head`` (classifier conv, upsampling,
activation) is replaced by the identity, so the backbone returns the decoder output and our head classifies
it. Our heads classify each feature vector alone (a 1x1 convolution) and the model upsamples their logits
bilinearly with ``align_corners=False``, where smp's classifier is a 3x3 convolution in some architectures (smp
0.6: Unet, UnetPlusPlus, MAnet, PSPNet, PAN) and its upsampling aligns corners. Example names (smp 0.6):
``smp:Segformer:mit_b0``, ``smp:UPerNet:resnet18``, ``smp:DeepLabV3Plus:resnet101``, ``smp:Unet:resnet34``,
``smp:FPN:resnet50``. Architectures whose segmentation head does more than classify (smp 0.6's DPT: a 3x3 conv,
BatchNorm and ReLU before its classifier) are refused, since replacing that head would drop part of the network.
"""

from __future__ import annotations

import inspect
import re
import socket
import urllib.parse
import urllib.request

import torch.nn.functional as F
from torch import Tensor, nn


def _smp():
    try:
        import segmentation_models_pytorch as smp
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("arch='smp:...' needs segmentation-models-pytorch "
                          "(pip install 'gmmseg[zoo]' or segmentation-models-pytorch)") from err
    return smp


# the files smp (0.5, 0.6) reads from an encoder's weights repository on the Hugging Face Hub
_HUB_WEIGHT_FILES = ("config.json", "model.safetensors")


def _unreachable_weights(smp, encoder: str, weights: str, timeout: float = 3.0) -> str | None:
    """Why the encoder's pretrained ``weights`` can be neither read from the cache nor downloaded now, or None.

    Without network, huggingface_hub retries a download for half a minute before it gives up; this check
    answers in at most ``timeout`` seconds by connecting to the Hub's host. None, and the build goes on as
    without the check, when the weights are cached, when the host answers, and where it cannot tell: timm
    (``tu-``) encoders, an smp whose encoders do not name a Hub repository, a configured proxy (the Hub may be
    reachable through it only), or ``HF_HUB_OFFLINE`` set (huggingface_hub then fails at once by itself).
    """
    settings = smp.encoders.encoders.get(encoder, {}).get("pretrained_settings", {}).get(weights)
    if not (isinstance(settings, dict) and "repo_id" in settings):
        return None
    import huggingface_hub
    from huggingface_hub import constants

    if getattr(constants, "HF_HUB_OFFLINE", False) or {"https", "all"} & set(urllib.request.getproxies()):
        return None
    cached = [huggingface_hub.try_to_load_from_cache(settings["repo_id"], name, revision=settings.get("revision"))
              for name in _HUB_WEIGHT_FILES]
    if all(isinstance(path, str) for path in cached):
        return None
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    host, port = url.hostname, url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"they are not in the local cache and {host}:{port} cannot be reached: {err}"
    return None


def _weights_error(weights: str, encoder: str, reason) -> FileNotFoundError:
    """The error for pretrained weights that cannot be loaded, saying how to proceed."""
    return FileNotFoundError(
        f"could not load the {weights!r} weights of smp encoder {encoder!r} ({reason}). They are downloaded on "
        "first use and cached, so build once with network access; or train from random initialisation with "
        "encoder_weights=None (build_model(..., encoder_weights=None); in a TrainConfig, "
        "model_kwargs={'encoder_weights': None}; on the command line, --set model_kwargs.encoder_weights=null). "
        "With HF_HUB_OFFLINE=1, huggingface_hub reads cached weights only and fails at once instead of retrying")


def parse_smp_arch(arch: str) -> tuple[str, str]:
    """``"smp:Segformer:mit_b0" -> ("Segformer", "mit_b0")``, with a clear error for a malformed name."""
    parts = arch.split(":", 2)
    if len(parts) != 3 or parts[0] != "smp" or not parts[1] or not parts[2]:
        raise ValueError(f"an smp arch must look like 'smp:<Architecture>:<encoder>' "
                         f"(e.g. 'smp:Segformer:mit_b0'), got {arch!r}")
    return parts[1], parts[2]


class SMPBackbone(nn.Module):
    """An smp model without its segmentation head; features = the decoder output ``(B, out_channels, h, w)``.

    Parameters
    ----------
    architecture : str
        An smp architecture name (``smp.Unet``, ``smp.Segformer``, ...; case-insensitive as in
        ``smp.create_model``).
    encoder : str
        An smp encoder name.
    encoder_weights : str or None
        ``"imagenet"`` (default; downloads on first use, then read from the cache) or None for random
        initialisation. A download that fails raises a ``FileNotFoundError`` that says how to proceed offline;
        without network it fails within seconds where the weights come from the Hugging Face Hub (smp's own
        encoders), instead of after huggingface_hub's half a minute of retries.
    **kw
        Passed to the smp constructor (e.g. ``decoder_channels``).

    Notes
    -----
    Inputs whose sides are not multiples of the encoder's stride (at least 32) are zero-padded at the bottom
    and right; the features are cropped back to the region covering the image. smp's PAN also needs padded sides
    of at least 8 times its encoder's stride (128 pixels by default): its feature pyramid attention halves the
    encoder's last map three times. Smaller inputs raise a ``ValueError`` that says so.
    """

    def __init__(self, architecture: str, encoder: str, encoder_weights: str | None = "imagenet", **kw):
        super().__init__()
        smp = _smp()
        known = {name.lower(): name for name in smp.MODEL_ARCHITECTURES_MAPPING}
        if architecture.lower() not in known:
            raise ValueError(f"unknown smp architecture {architecture!r}; smp {smp.__version__} has "
                             f"{sorted(known.values())}")
        if not encoder.startswith("tu-") and encoder not in smp.encoders.encoders:
            raise ValueError(f"unknown smp encoder {encoder!r}; smp {smp.__version__} has "
                             f"{sorted(smp.encoders.encoders)} and timm's as 'tu-<name>'")
        owned = {"classes", "encoder_name", "encoder_weights"} & set(kw)
        if owned:
            raise ValueError(f"model_kwargs {sorted(owned)} are set by the adapter (the classes belong to our head, "
                             "the encoder to the arch string, encoder_weights is its own argument)")
        # smp passes unknown keywords on to the encoder, where only timm ('tu-') encoders use them: a misspelt
        # decoder option would be dropped without a word
        model_class = smp.MODEL_ARCHITECTURES_MAPPING[known[architecture.lower()]]
        params = set(inspect.signature(model_class.__init__).parameters) - {"self", "kwargs"}
        # deprecated names smp still takes through **kwargs (e.g. Unet's decoder_use_batchnorm)
        params |= set(re.findall(r"kwargs\.pop\(\s*[\"'](\w+)[\"']", inspect.getsource(model_class.__init__)))
        unknown = sorted(set(kw) - params) if not encoder.startswith("tu-") else []
        if unknown:
            raise ValueError(f"model_kwargs {unknown} are not arguments of smp.{model_class.__name__}; it takes "
                             f"{sorted(params - {'classes', 'encoder_name', 'encoder_weights'})}")
        reason = None if encoder_weights is None else _unreachable_weights(smp, encoder, encoder_weights)
        if reason:
            raise _weights_error(encoder_weights, encoder, reason)
        try:
            model = smp.create_model(known[architecture.lower()], encoder_name=encoder,
                                     encoder_weights=encoder_weights, classes=1, **kw)
        except OSError as err:  # no network and no cached copy (huggingface_hub's and urllib's errors are OSErrors)
            if encoder_weights is None:
                raise
            raise _weights_error(encoder_weights, encoder, err) from err
        head = model.segmentation_head
        if not (isinstance(head, nn.Sequential) and len(head) > 0 and isinstance(head[0], nn.Conv2d)
                and all(not any(p.requires_grad for p in m.parameters()) for m in list(head)[1:])):
            raise ValueError(f"smp architecture {known[architecture.lower()]!r}: its segmentation head "
                             f"({type(head).__name__}) is not a classifier convolution followed by upsampling, "
                             "so it cannot be swapped for a GMM or softmax head; use another architecture")
        self.out_channels = head[0].in_channels
        model.segmentation_head = nn.Identity()
        model.classification_head = None
        self.model = model
        stride = int(getattr(model.encoder, "output_stride", 32))
        self.size_divisor = max(32, stride)
        self.min_size = 8 * stride if model_class.__name__ == "PAN" else 1

    def forward(self, images: Tensor) -> Tensor:
        h, w = images.shape[-2:]
        d = self.size_divisor
        pad_h, pad_w = -h % d, -w % d
        if min(h + pad_h, w + pad_w) < self.min_size:
            raise ValueError(f"smp PAN needs input sides that, padded to a multiple of {d}, reach {self.min_size} "
                             f"pixels (its feature pyramid attention halves the encoder's last map three times); "
                             f"got {h}x{w}")
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        feats = self.model(images)
        if pad_h or pad_w:
            fh, fw = feats.shape[-2:]
            feats = feats[..., : -(-fh * h // (h + pad_h)), : -(-fw * w // (w + pad_w))]
        return feats


def build_smp_backbone(arch: str, **kw) -> SMPBackbone:
    architecture, encoder = parse_smp_arch(arch)
    return SMPBackbone(architecture, encoder, **kw)
