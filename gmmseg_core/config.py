"""Training configuration (a flat dataclass with JSON round trip) and the named notebook profiles.

``TrainConfig`` holds everything :func:`gmmseg_core.train.train` needs; ``cache_key()`` is a stable hash of the
fields that change the trained model (run-location and bookkeeping fields excluded), used by
:func:`gmmseg_core.train.train_cached` so that a model trained by one notebook is reused by the next.

``PROFILES`` (smoke / cpu / gpu notebook parameters) is re-exported from :mod:`gmmseg_core.profiles`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from gmmseg_core import __version__
from gmmseg_core._files import atomic_write_text
from gmmseg_core.profiles import PROFILES

__all__ = ["TrainConfig", "PROFILES", "parse_overrides"]

HEADS = ("gmm", "softmax")
AMP_MODES = ("none", "bf16", "fp16")
# Fields that say where/how a run is stored or displayed, not what is trained: left out of cache_key().
_NON_KEY_FIELDS = ("out_dir", "run_name", "resume", "num_workers", "log_interval", "checkpoint_interval",
                   "progress")


def without_data_cache_dirs(d: dict) -> dict:
    """A copy of a config dict without the ``cache_dir`` entries of its dataset kwargs: where generated data is
    cached is a location, not something the trained model depends on."""
    d = dict(d)
    for name in ("dataset_kwargs", "val_dataset_kwargs"):
        if isinstance(d.get(name), dict):
            d[name] = {k: v for k, v in d[name].items() if k != "cache_dir"}
    return d


@dataclass
class TrainConfig:
    """Configuration of one training run.

    Model
        ``arch`` (``"fcn"``, ``"deeplabv3plus"``, ``"segformer"`` or ``"smp:<Arch>:<encoder>"``), ``head``
        (``"gmm"`` or ``"softmax"``), ``head_kwargs`` (e.g. ``{"variant": "official", "num_components": 3}``),
        ``model_kwargs`` (backbone options such as ``width``).
    Data
        ``dataset`` (a :func:`gmmseg_core.data.build_dataset` name), ``data_root``, ``dataset_kwargs`` (for
        every split, e.g. ``image_size``), ``val_dataset_kwargs`` (overrides for the validation split, e.g.
        ``num_images``), ``balanced_sampler`` (class-balanced image sampling), ``num_workers``.
    Optimisation
        ``iters`` steps of ``batch_size`` images per process; AdamW (fused) with ``lr`` (the head's parameters get
        ``lr * head_lr_mult``) and ``weight_decay`` (not on biases and norm weights); linear warm-up over
        ``warmup_iters`` then poly decay ``(1 - step / iters) ** poly_power``; ``grad_clip`` (max global norm,
        None = off); ``amp`` (``"none"``, ``"bf16"``, ``"fp16"``; CUDA only, ignored on CPU). The released
        GMMSeg configs differ in scope: their 10x learning rate covers the whole decode head (the decoder too,
        which lives in the backbones here), and only the parameters named ``norm`` or ``pos_block`` outside the
        decode head skip weight decay there (mmcv applies the first matching key, and ``head`` comes before
        ``norm``, so the decode head's norms and every bias decay).
    Bookkeeping
        ``eval_interval`` (validate every N steps; 0 = only at the end), ``log_interval`` (console refresh),
        ``checkpoint_interval`` (0 = only at the end), ``seed``, ``device`` (None = cpu), ``out_dir`` and
        ``run_name`` (the run directory is ``out_dir/run_name``; None = a name derived from the cache key),
        ``resume`` (continue from ``checkpoint.pt`` in the run directory if there is one), ``progress``
        (tqdm bar).
    """

    arch: str = "fcn"
    head: str = "gmm"
    head_kwargs: dict = field(default_factory=dict)
    model_kwargs: dict = field(default_factory=dict)
    dataset: str = "scenes"
    data_root: str | None = None
    dataset_kwargs: dict = field(default_factory=dict)
    val_dataset_kwargs: dict = field(default_factory=dict)
    iters: int = 200
    batch_size: int = 8
    lr: float = 1e-3
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    warmup_iters: int = 0
    poly_power: float = 1.0
    grad_clip: float | None = None
    amp: str = "none"
    eval_interval: int = 0
    log_interval: int = 10
    checkpoint_interval: int = 0
    seed: int = 0
    device: str | None = None
    num_workers: int = 0
    balanced_sampler: bool = False
    out_dir: str = "runs"
    run_name: str | None = None
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field, its value and what was expected.

        The ``*_kwargs`` dicts are checked by their keys (each must be an argument of the head, backbone or
        dataset); their values are checked by the constructors, when ``train`` builds data and model, which
        happens before the run directory is written."""
        def need(ok, name, expected):
            if not ok:
                value = getattr(self, name)
                # a numpy scalar would otherwise read as "must be an int, got np.int64(5)"
                hint = " (a numpy scalar: give a Python one, the config is stored as JSON)" if (
                    type(value).__module__ == "numpy") else ""
                raise ValueError(f"{name} must be {expected}, got {value!r}{hint}")

        # Python numbers only, unlike the library's checks (gmmseg_core._checks): a numpy scalar here would pass
        # validation and then break to_dict(), whose JSON gives the run its config.json and cache key.
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        from gmmseg_core.data import (  # lazy: the data package imports torch
            available_datasets,
            check_dataset_arguments,
        )
        from gmmseg_core.models import check_arch, check_model_arguments  # lazy: the models import torch

        check_arch(self.arch)
        need(self.head in HEADS, "head", f"one of {HEADS}")
        for name in ("head_kwargs", "model_kwargs", "dataset_kwargs", "val_dataset_kwargs"):
            need(isinstance(getattr(self, name), dict), name, "a dict")
        check_model_arguments(self.arch, self.head, self.head_kwargs, self.model_kwargs)
        need(isinstance(self.dataset, str) and self.dataset, "dataset", "a non-empty string")
        # a dataset registered by the user in another process (a run loaded here) is left to build_dataset
        if self.dataset in available_datasets():
            for name in ("dataset_kwargs", "val_dataset_kwargs"):
                check_dataset_arguments(self.dataset, getattr(self, name), name)
        need(self.data_root is None or isinstance(self.data_root, str), "data_root", "None or a path string")
        need(is_int(self.iters) and self.iters > 0, "iters", "a positive int")
        need(is_int(self.batch_size) and self.batch_size > 0, "batch_size", "a positive int")
        need(is_num(self.lr) and 0 < self.lr < math.inf, "lr", "a positive finite number")
        need(is_num(self.head_lr_mult) and self.head_lr_mult > 0, "head_lr_mult", "a positive number")
        need(is_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a number >= 0")
        need(is_int(self.warmup_iters) and self.warmup_iters >= 0, "warmup_iters", "an int >= 0")
        need(is_num(self.poly_power) and self.poly_power >= 0, "poly_power", "a number >= 0")
        need(self.grad_clip is None or (is_num(self.grad_clip) and self.grad_clip > 0), "grad_clip",
             "None or a positive number")
        need(self.amp in AMP_MODES, "amp", f"one of {AMP_MODES}")
        for name in ("eval_interval", "checkpoint_interval", "num_workers"):
            need(is_int(getattr(self, name)) and getattr(self, name) >= 0, name, "an int >= 0")
        need(is_int(self.log_interval) and self.log_interval > 0, "log_interval", "a positive int")
        need(is_int(self.seed) and 0 <= self.seed < 2**32, "seed", "an int in [0, 2**32)")
        need(self.device is None or isinstance(self.device, str), "device", "None or a string such as 'cuda:0'")
        for name in ("balanced_sampler", "resume", "progress"):
            need(isinstance(getattr(self, name), bool), name, "a bool")
        need(isinstance(self.out_dir, str) and self.out_dir, "out_dir", "a non-empty path string")
        need(self.run_name is None or (isinstance(self.run_name, str) and self.run_name
                                       and "/" not in self.run_name), "run_name", "None or a name without '/'")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Build from a dict; unknown keys raise ``ValueError`` listing them and the known fields."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def to_json(self, path=None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            atomic_write_text(path, text + "\n")      # a run's config.json is rewritten on every resume
        return text

    @classmethod
    def from_json(cls, path_or_text, label: str = "config") -> TrainConfig:
        """Load from a JSON file path or a JSON string (an object of fields).

        ``ValueError`` names the source (``label``, e.g. ``"--config"``, then the path or text) for a directory,
        text that is not JSON, and JSON that is not an object; ``FileNotFoundError`` names it for a missing file.
        """
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            if Path(text).is_dir():
                raise ValueError(f"{label} must be a JSON file, got the directory {text!r}")
            if not Path(text).exists():
                raise FileNotFoundError(f"{label} {text!r} does not exist; expected a JSON file of TrainConfig "
                                        "fields (or the JSON object itself)")
            text = Path(text).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{label} {str(path_or_text)!r} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{label} {str(path_or_text)!r} must hold a JSON object of TrainConfig fields, got a "
                             f"{type(data).__name__}")
        return cls.from_dict(data)

    def replace(self, **changes) -> TrainConfig:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    def with_overrides(self, overrides) -> TrainConfig:
        """A copy with ``["key=value", ...]`` overrides applied (see :func:`parse_overrides`)."""
        d = self.to_dict()
        for key, value in parse_overrides(overrides).items():
            top, _, sub = key.partition(".")
            if top not in d:
                raise ValueError(f"unknown TrainConfig field {top!r} in override {key}={value!r}; known fields: "
                                 f"{sorted(d)}")
            if sub:
                if not isinstance(d[top], dict):
                    raise ValueError(f"override {key!r}: field {top!r} is not a dict")
                d[top][sub] = value
            else:
                d[top] = value
        return TrainConfig.from_dict(d)

    # ------------------------------------------------------------------ identity
    def cache_key(self) -> str:
        """16-hex-digit SHA-256 of the JSON of every field that changes the trained model.

        Left out: ``out_dir``, ``run_name``, ``resume``, ``num_workers``, ``log_interval``,
        ``checkpoint_interval``, ``progress`` and a ``cache_dir`` entry of the dataset kwargs (where generated
        data is cached). ``device`` enters only by its type (``"cuda:1"`` -> ``"cuda"``). Settings that cannot
        change the model count as their default: ``data_root`` for a dataset that does not read it (generated or
        bundled data), or that reads there what it reads with neither a root nor ``$GMMSEG_DATA``
        (Fashion-MNIST found elsewhere, or the same files; without a root, what ``$GMMSEG_DATA`` makes
        Fashion-MNIST read enters instead), ``amp`` off CUDA (training there is float32 whatever it says). A
        real data set's root enters as the absolute folder it reads (``$GMMSEG_DATA`` or ``./data`` without
        one). The package version enters too, so a cache written by another release (whose checkpoints may hold
        other buffers) is not reused.
        """
        from gmmseg_core.data import dataset_info  # lazy: the data package imports torch

        d = without_data_cache_dirs(self.to_dict())
        for name in _NON_KEY_FIELDS:
            d.pop(name)
        d["device"] = (self.device or "cpu").split(":")[0]
        entry = dataset_info(self.dataset)
        if not entry.reads_root:
            d["data_root"] = None
        elif entry.root_key is not None:  # without a root too: $GMMSEG_DATA may change what it reads
            d["data_root"] = entry.root_key(self.data_root)
        if d["device"] != "cuda":
            d["amp"] = "none"
        d["gmmseg_version"] = __version__
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def default_run_name(self) -> str:
        head = self.head
        if head == "gmm":
            head += "-" + str(self.head_kwargs.get("variant", "paper"))
        return f"{self.arch.replace(':', '-')}_{head}_{self.dataset}_s{self.seed}_{self.cache_key()[:8]}"

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / (self.run_name or self.default_run_name())


def parse_overrides(overrides) -> dict:
    """Parse ``["key=value", ...]`` into a dict; values are JSON when they parse (``3``, ``1e-3``, ``true``,
    ``null``, ``{"a": 1}``), else plain strings. Keys may be dotted (``head_kwargs.variant=official``)."""
    out = {}
    for item in overrides or ():
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override must look like key=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = value
    return out
