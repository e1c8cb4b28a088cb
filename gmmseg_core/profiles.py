"""Named parameter sets for the study notebooks: ``smoke``, ``cpu`` and ``gpu``.

``PROFILES[profile][notebook]`` is the flat dict of parameter overrides for that notebook (names as in the
notebook's ``parameters`` cell). The run-wide parameters ``device``, ``data_root``, ``figures_dir``,
``cache_dir`` and ``out_dir`` are added by :func:`gmmseg_core.reproduce.reproduce`.

Notebooks 02-06 get their models from an :class:`ExperimentRuns` (configurations by :func:`experiment_config`,
trained through ``train_cached``); they share the training parameters of ``TRAIN`` so that the same
(architecture, head, dataset, seed) gives the same configuration, hence the same cache key, in every notebook: a
model is trained once per run and reused.

- ``smoke``: seconds per notebook (32x32 images, 3 training steps, one seed, one architecture); used by the
  test suite. The numbers it produces are meaningless.
- ``cpu``: the reference run on a 2-core CPU (its figures and tables are the ones committed under
  ``figures/``): tiny models (width 8) on 64x128 images (8x16 FCN features at stride 8), 300 steps
  of batch 8, three architectures x three heads x two data sets x two seeds, plus the ablation runs of notebooks
  04 (class LayerNorm, 2 extra trainings) and 05. Measured: 15 min 29 s for all six notebooks on an otherwise
  idle 2-core machine (notebook 03, 36 trainings of ~15-20 s each plus evaluation, 11 min 14 s; notebook 04
  1 min 6 s; notebook 05 2 min 3 s). Later runs from an empty cache: 12 min 21 s (notebook 03 8 min 40 s);
  16 min 9 s on a slower day of the same machine (notebook 03 11 min 42 s); 13 min 47 s that day with the fused
  optimiser (notebook 03 9 min 53 s). Notebooks 03-05 then trained two models at a time (``train_processes=2``,
  one process per core; the models, hence the figures, are identical): 8 min 0 s with notebook 03 so (4 min
  29 s), 9 min 13 s with all three on a slower spell (notebook 02, which trains nothing in parallel, took 48 s
  against 36 s); 8 min 8 s with the kernels over IPC too (notebook 03 5 min 4 s, 04 55 s, 05 69 s).
- ``gpu``: larger images (256x512) and models (width 64), 4000 steps of batch 16, three seeds, and the real
  data sets when ``data_root`` is given. Float32 with 4 DataLoader workers: on an H100 bf16 autocast was
  slower for these launch-bound models (46 vs 40 ms per step), and without workers the main process could not
  feed the GPU. Runtime extrapolated from 120-step runs on one H100 (``benchmarks/RESULTS.md``, gpu_check;
  no full run yet): about 2 hours for notebook 03 (2.4 in an earlier run, before the fused optimiser),
  2-2.5 hours for all six with the shipped data; real data sets add training time in proportion to their
  schedules.

Kernels run with one intra-op thread on the CPU (see ``reproduce(threads=...)``).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

NOTEBOOKS = (
    "01_discriminative_vs_generative",
    "02_sinkhorn_em",
    "03_closed_set",
    "04_anomaly",
    "05_components",
    "06_explorer",
)

# Shared training parameters (notebooks 02-06): identical values -> identical configs -> one training per model.
TRAIN = {
    "smoke": dict(image_size=[32, 32], num_train_images=8, num_val_images=4, train_iters=3, batch_size=4,
                  width=8, embed_dim=8, num_components=3, lr=1e-3, update_interval=1, mean_momentum=0.5,
                  amp="none", num_workers=0),
    "cpu": dict(image_size=[64, 128], num_train_images=160, num_val_images=32, train_iters=300, batch_size=8,
                width=8, embed_dim=16, num_components=3, lr=3e-3, update_interval=5, mean_momentum=0.9,
                amp="none", num_workers=0),
    "gpu": dict(image_size=[256, 512], num_train_images=2000, num_val_images=200, train_iters=4000,
                batch_size=16, width=64, embed_dim=64, num_components=5, lr=1e-3, update_interval=5,
                mean_momentum=0.99, amp="none", num_workers=4),
}

_NOTEBOOK = {
    "smoke": {
        "01_discriminative_vs_generative": dict(n_per_blob=40, softmax_steps=20, mlp_hidden=8, n_components=2,
                                                gmm_max_iter=5, grid_size=40),
        "02_sinkhorn_em": dict(toy_n=200, n_starts=2, max_iter=3, epsilons=[0.05, 0.5], sinkhorn_iters=[1, 3],
                               real_arch="fcn", real_max_points=200),
        "03_closed_set": dict(archs=["fcn"], datasets=["scenes", "fashion"], seeds=[0], n_examples=2,
                              train_processes=2),
        "04_anomaly": dict(archs=["fcn"], datasets=["scenes", "fashion"], n_examples=2, ablation_arch="fcn",
                           train_processes=2),
        "05_components": dict(arch="fcn", component_counts=[1, 3], n_examples=2, max_points=300,
                              bic_components=[1, 2, 3], bic_points=100, train_processes=2),
        "06_explorer": dict(arch="fcn", interactive=False, image_index=0, threshold_quantiles=[0.9, 0.99]),
    },
    "cpu": {
        "01_discriminative_vs_generative": dict(n_per_blob=150, softmax_steps=600, mlp_hidden=32, n_components=3,
                                                gmm_max_iter=100, grid_size=200),
        "02_sinkhorn_em": dict(toy_n=600, n_starts=12, max_iter=40, epsilons=[0.01, 0.05, 0.2, 1.0],
                               sinkhorn_iters=[1, 3, 10], real_arch="deeplabv3plus", real_max_points=2000),
        "03_closed_set": dict(archs=["fcn", "deeplabv3plus", "segformer"], datasets=["scenes", "fashion"],
                              seeds=[0, 1], train_processes=2),
        "04_anomaly": dict(archs=["fcn", "deeplabv3plus", "segformer"], datasets=["scenes", "fashion"],
                           n_examples=3, ablation_arch="fcn", train_processes=2),
        "05_components": dict(arch="deeplabv3plus", component_counts=[1, 3, 5], n_examples=3, max_points=3000,
                              bic_components=[1, 2, 3, 4, 6, 8, 12, 16], bic_points=2000, train_processes=2),
        "06_explorer": dict(arch="deeplabv3plus", interactive=False, image_index=0),
    },
    "gpu": {
        "01_discriminative_vs_generative": dict(n_per_blob=300, softmax_steps=2000, mlp_hidden=64,
                                                n_components=3, gmm_max_iter=200, grid_size=300),
        "02_sinkhorn_em": dict(toy_n=2000, n_starts=50, max_iter=100, epsilons=[0.01, 0.05, 0.2, 1.0],
                               sinkhorn_iters=[1, 3, 10, 30], real_arch="segformer", real_max_points=20000),
        "03_closed_set": dict(archs=["fcn", "deeplabv3plus", "segformer"], datasets=["scenes", "fashion"],
                              seeds=[0, 1, 2], train_processes=1),
        "04_anomaly": dict(archs=["fcn", "deeplabv3plus", "segformer"], datasets=["scenes", "fashion"],
                           n_examples=4, ablation_arch="segformer"),
        "05_components": dict(arch="segformer", component_counts=[1, 3, 5, 8], n_examples=4, max_points=20000,
                              bic_components=[1, 2, 3, 5, 8, 12, 16, 24, 32], bic_points=5000),
        "06_explorer": dict(arch="segformer", interactive=False, image_index=0),
    },
}

_TRAINING_NOTEBOOKS = ("02_sinkhorn_em", "03_closed_set", "04_anomaly", "05_components", "06_explorer")

PROFILES: dict[str, dict[str, dict]] = {
    profile: {nb: {**(TRAIN[profile] if nb in _TRAINING_NOTEBOOKS else {}), **params}
              for nb, params in per_nb.items()}
    for profile, per_nb in _NOTEBOOK.items()
}


HEAD_KINDS = ("softmax", "gmm_paper", "gmm_official")
_OPTIONAL_TRAIN_PARAMS = ("amp", "num_workers")


def experiment_config(train_params: dict, arch: str, kind: str, dataset: str, seed: int, device=None,
                      data_root=None, cache_dir="runs/cache", model_kwargs: dict | None = None, **head_overrides):
    """The ``TrainConfig`` of one cell of the experiment matrix, built the same way by every notebook.

    Parameters
    ----------
    train_params : dict
        The shared training parameters (keys of ``TRAIN[profile]``: ``image_size``, ``num_train_images``,
        ``num_val_images``, ``train_iters``, ``batch_size``, ``width``, ``embed_dim``, ``num_components``,
        ``lr``, ``update_interval``, ``mean_momentum``; optional: ``amp`` and ``num_workers``, default
        ``"none"`` and 0).
    arch : str
        ``"fcn"``, ``"deeplabv3plus"``, ``"segformer"`` or ``"smp:<Arch>:<encoder>"``.
    kind : {"softmax", "gmm_paper", "gmm_official"}
        The head: softmax, or the GMM head in its paper or official variant. Only the head differs: every kind
        trains with uniformly drawn images, no warm-up and no dropout, so the official variant is the released
        head without the released training's class-balanced sampler (``TrainConfig.balanced_sampler``) and
        1,500-step warm-up.
    dataset : str
        A ``build_dataset`` name. Real datasets (read from ``data_root``) train with mmseg's augmentation
        (``train_transforms``: random rescale 0.5-2, crop back to ``image_size``, flip, photometric distortion);
        the generated ones (scenes, fashion, digits) as drawn.
    seed : int
    device, data_root : passed through
    cache_dir : path
        Where ``train_cached`` keeps runs; generated scenes are also cached there (``<cache_dir>/data``).
    model_kwargs : dict, optional
        Backbone arguments. Default: the profile's ``width`` for the in-house architectures, nothing for smp
        ones (whose encoders have no width; pass ``{"encoder_weights": None}`` to build one offline).
    **head_overrides
        GMM head knobs for ablations (``num_components=1``, ``em="classic"``, ...).

    Returns
    -------
    TrainConfig
    """
    from .config import TrainConfig

    if kind not in HEAD_KINDS:
        raise ValueError(f"kind must be one of {HEAD_KINDS}, got {kind!r}")
    _check_train_params(train_params)
    p = train_params
    head_kwargs = {}
    if kind != "softmax":
        # mean_momentum is scaled to the schedule: the released 0.999 assumes 16k+ M-steps; with a few hundred
        # the means would stay ~90% at their random start.
        head_kwargs = dict(variant=kind.split("_", 1)[1], num_components=int(p["num_components"]),
                           embed_dim=int(p["embed_dim"]), update_interval=int(p["update_interval"]),
                           mean_momentum=float(p["mean_momentum"]))
        head_kwargs.update(head_overrides)
    elif head_overrides:
        raise ValueError(f"head_overrides are GMM knobs; the softmax head takes none, got {head_overrides}")
    size = p["image_size"]
    dataset_kwargs = {"image_size": list(size) if isinstance(size, (list, tuple)) else int(size),
                      "num_images": int(p["num_train_images"])}
    if dataset in ("scenes", "fashion", "digits"):  # generated once, then read back from disk
        dataset_kwargs["cache_dir"] = str(Path(cache_dir) / "data")
    else:  # real images: mmseg's training augmentation, at the profile's size (images are resized to it on load)
        dataset_kwargs["transform"] = {"crop_size": dataset_kwargs["image_size"]}
    if model_kwargs is None:
        model_kwargs = {} if str(arch).startswith("smp:") else {"width": int(p["width"])}
    return TrainConfig(arch=arch, head="softmax" if kind == "softmax" else "gmm", head_kwargs=head_kwargs,
                       model_kwargs=dict(model_kwargs), dataset=dataset, data_root=data_root,
                       dataset_kwargs=dataset_kwargs, val_dataset_kwargs={"num_images": int(p["num_val_images"])},
                       iters=int(p["train_iters"]), batch_size=int(p["batch_size"]), lr=float(p["lr"]),
                       amp=str(p.get("amp", "none")), num_workers=int(p.get("num_workers", 0)),
                       seed=int(seed), device=device, out_dir=str(cache_dir), progress=False)


class ExperimentRuns:
    """The models of one notebook run: configurations from :func:`experiment_config`, trained once per cache.

    Every notebook that trains (02-06) builds one of these from its parameters and asks it for models;
    a model another notebook (or an earlier run) trained is read back from ``cache_dir`` instead of retrained.

    Parameters
    ----------
    train_params : dict
        The shared training parameters (see :func:`experiment_config`).
    device, data_root : passed to every configuration (``device`` also to :func:`~gmmseg_core.train.load_run`)
    cache_dir : path
        Where the runs are cached.

    Attributes
    ----------
    started : float
        ``time.time()`` at construction.

    Notes
    -----
    :meth:`trained` reports a model this object trained (there or in :meth:`train_all`) as trained now the first
    time it returns it, and as cached after that: a later cell, or the same cell run again, reads it back.

    Examples
    --------
    >>> runs = ExperimentRuns(TRAIN["smoke"], cache_dir="runs/cache")                      # doctest: +SKIP
    >>> runs.train_all([runs.config("fcn", k) for k in HEAD_KINDS], processes=2)           # doctest: +SKIP
    >>> model, metrics, run_dir = runs.trained("fcn", "gmm_paper")                         # doctest: +SKIP
      fcn            gmm_paper     scenes   seed 0: val mIoU 0.412 (trained in 14 s)
    """

    def __init__(self, train_params: dict, device=None, data_root=None, cache_dir="runs/cache"):
        self.train_params = dict(train_params)
        self.device, self.data_root, self.cache_dir = device, data_root, Path(cache_dir)
        _check_train_params(self.train_params)      # fails here rather than at the first model
        self.started = time.time()
        self._unreported: set[Path] = set()         # run directories trained here, not yet reported by trained()

    def config(self, arch: str, kind: str, dataset: str = "scenes", seed: int = 0, model_kwargs: dict | None = None,
               **head_overrides):
        """The ``TrainConfig`` of one model (arguments as in :func:`experiment_config`)."""
        return experiment_config(self.train_params, arch, kind, dataset, seed, device=self.device,
                                 data_root=self.data_root, cache_dir=self.cache_dir, model_kwargs=model_kwargs,
                                 **head_overrides)

    @contextmanager
    def _training_threads(self):
        """One torch thread for trainings on the CPU, as ``gmmseg reproduce`` runs them: a run is bit-for-bit
        reproducible only at one thread count, and the cache key does not hold it, so a notebook opened by hand
        (torch's default: every core) would otherwise put other models under the reference run's keys."""
        # imported here: the gmmseg command reads the profiles to build its --help, which needs no torch
        import torch

        if str(self.device or "cpu").startswith("cuda"):
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def train_all(self, configs, processes: int = 1) -> list[Path]:
        """Train the configurations not yet in the cache, up to ``processes`` at a time (see
        :func:`~gmmseg_core.train.train_cached_many`; on the CPU single-threaded, see ``_training_threads``);
        returns their run directories."""
        from .train import is_finished, train_cached_many

        configs = list(configs)
        pending = {run_dir for run_dir in map(self._run_dir, configs) if not is_finished(run_dir)}
        with self._training_threads():
            run_dirs = train_cached_many(configs, self.cache_dir, processes=processes)
        self._unreported |= pending
        return run_dirs

    def _run_dir(self, cfg) -> Path:
        """Where ``train_cached`` keeps ``cfg`` in this object's cache."""
        return self.cache_dir / cfg.default_run_name()

    def trained(self, arch: str, kind: str, dataset: str = "scenes", seed: int = 0, verbose: bool = True,
                model_kwargs: dict | None = None, **head_overrides):
        """One model, trained now or read from the cache, on ``device``.

        Parameters
        ----------
        arch, kind, dataset, seed, model_kwargs, **head_overrides
            As in :func:`experiment_config`.
        verbose : bool
            Print one line: the model, its validation mIoU, and whether it was trained now (with its training
            time) or cached.

        Returns
        -------
        model : nn.Module, in eval mode
        metrics : dict
            The run's ``metrics.json``.
        run_dir : Path
        """
        from .train import is_finished, load_run, train_cached

        cfg = self.config(arch, kind, dataset, seed, model_kwargs=model_kwargs, **head_overrides)
        fresh = not is_finished(self._run_dir(cfg)) or self._run_dir(cfg) in self._unreported
        with self._training_threads():
            run_dir = train_cached(cfg, self.cache_dir)
        self._unreported.discard(run_dir)
        model, _, metrics = load_run(run_dir, device=self.device)
        if verbose:
            how = f"trained in {metrics.get('train_time_s', float('nan')):.0f} s" if fresh else "cached"
            miou = metrics.get("final", {}).get("miou", float("nan"))
            print(f"  {arch:<14} {kind:<13} {dataset:<8} seed {seed}: val mIoU {miou:.3f} ({how})")
        return model, metrics, run_dir


def _check_train_params(train_params: dict) -> None:
    missing = sorted(set(TRAIN["cpu"]) - set(train_params) - set(_OPTIONAL_TRAIN_PARAMS))
    if missing:
        raise ValueError(f"train_params is missing {missing}")
    if isinstance(train_params["image_size"], str):     # an int or [height, width]; a str is a list passed as text
        raise TypeError(_list_as_text_message("image_size", train_params["image_size"], "an int or [height, width]"))


def image_hw(image_size) -> tuple[int, int]:
    """``(height, width)`` of an ``image_size`` given as ``[height, width]`` or as one int (a square), the two
    forms ``ExperimentRuns`` accepts.

    Examples
    --------
    >>> image_hw([64, 128]), image_hw(32)
    ((64, 128), (32, 32))
    """
    # imported here: the data package imports torch, which the gmmseg command's --help does without
    from gmmseg_core.data.base import check_size_pair

    return check_size_pair("image_size", image_size)


def size_label(image_size) -> str:
    """``"HxW"`` of an ``image_size`` (see :func:`image_hw`), as the notebooks' table notes print it."""
    return "{}x{}".format(*image_hw(image_size))


def check_list_parameters(**params) -> None:
    """Raise ``TypeError`` naming any notebook parameter in ``params`` that is not a list (or tuple).

    papermill's ``-p NAME VALUE`` passes ``[0, 1]`` as the text ``'[0, 1]'``, over whose characters a notebook
    would loop and fail far from the cause; lists go in as YAML (``-y 'seeds: [0, 1]'``), or through
    ``gmmseg reproduce --set 'seeds=[0, 1]'`` (JSON).

    Examples
    --------
    >>> check_list_parameters(archs=["fcn"], seeds=(0, 1))
    >>> check_list_parameters(seeds="[0, 1]")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    TypeError: seeds must be a list, got '[0, 1]' (str); papermill's -p passes a list as text: ... -y 'seeds: [0, 1]'
    """
    for name, value in params.items():
        if not isinstance(value, (list, tuple)):
            raise TypeError(_list_as_text_message(name, value, "a list"))


def check_working_directory(notebook: str, **paths) -> None:
    """Raise ``RuntimeError`` when ``paths`` holds relative paths and the kernel does not run in the notebook's folder.

    The parameters cells' defaults (``figures_dir = "../outputs/manual/figures"``, ...) are relative to the folder
    of the notebooks, where JupyterLab starts a kernel; papermill starts it in the directory papermill was run from
    unless given ``--cwd``, so that from the repository root they would point into the repository's parent folder.

    Parameters
    ----------
    notebook : str
        The notebook's file name without ``.ipynb`` (e.g. ``"03_closed_set"``), looked for in the working directory.
    **paths : str or None
        The run-wide paths the notebook writes or reads (``figures_dir=..., cache_dir=...``); None is skipped.
    """
    relative = {name: str(p) for name, p in paths.items() if p is not None and not Path(p).is_absolute()}
    if relative and not Path(f"{notebook}.ipynb").is_file():
        raise RuntimeError(f"{relative} are relative to the folder of {notebook}.ipynb, but this kernel runs in "
                           f"{Path.cwd()}: run papermill with --cwd set to the notebook's folder, or pass "
                           "absolute paths")


def _list_as_text_message(name: str, value, expected: str) -> str:
    text = str(value).strip()
    shown = text if text.startswith("[") else f"[{text}]"
    return (f"{name} must be {expected}, got {value!r} ({type(value).__name__}); papermill's -p passes a list as "
            f"text: give it as YAML, e.g. -y '{name}: {shown}'")


def notebook_parameters(profile: str, notebook: str) -> dict:
    """The parameter overrides of ``notebook`` (a name such as ``"03_closed_set"``) under ``profile``.

    Unknown notebooks (e.g. one passed by path to ``reproduce``) get no overrides.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    return dict(PROFILES[profile].get(notebook, {}))
