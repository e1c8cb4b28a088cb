"""The ``gmmseg`` command: ``train``, ``evaluate``, ``predict``, ``reproduce`` and ``bench``.

Run ``gmmseg <command> --help`` for the options of each; ``python -m gmmseg_core`` is the same command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gmmseg_core import reproduce as reproduce_cli

__all__ = ["main", "build_parser"]

MAIN_EPILOG = """\
examples:
  gmmseg train --arch fcn --head gmm --iters 200 --out-dir runs
  gmmseg train --config my_run.json --set lr=3e-4 --set head_kwargs.variant=official
  gmmseg evaluate runs/fcn_gmm-paper_scenes_s0_1a2b3c4d --split anomaly --scorers msp energy gmm
  gmmseg predict runs/fcn_gmm-paper_scenes_s0_1a2b3c4d photos/ street.jpg --out-dir predictions
  gmmseg reproduce --profile cpu
  gmmseg bench --quick

Every subcommand has its own --help.
"""

TRAIN_EPILOG = """\
The run directory (<out-dir>/<run-name>) receives config.json, log.csv, metrics.json and checkpoint.pt.
Options given on the command line override --config; --set overrides both and reaches every TrainConfig
field, including dict entries (head_kwargs.num_components=3, dataset_kwargs.image_size=64). Values of
--set are read as JSON when they parse (3, 1e-3, true, null, {"a": 1}) and as strings otherwise.
A run directory that already holds a trained run is continued with --resume and started again only with
--overwrite. With --resume, --config <run>/config.json continues that run wherever the command is run from.

examples:
  gmmseg train --arch segformer --head softmax --iters 500 --batch-size 8 --device cuda
  gmmseg train --dataset scenes --set dataset_kwargs.image_size=64 --set model_kwargs.width=16
  gmmseg train --config runs/x/config.json --resume          # continue an interrupted run
  gmmseg train --config runs/x/config.json --run-name x_lr3e-4 --set lr=3e-4    # a variant as a new run
  torchrun --nproc_per_node 2 -m gmmseg_core train --device cuda --iters 1000   # multi-GPU (DDP)
"""

EVAL_EPILOG = """\
Closed-set splits (e.g. val) report mIoU, pixel accuracy and calibration (ECE); anomaly splits (labels
0 known / 1 anomaly / 255 void) report AUROC, AP and FPR95 for each scorer. The dataset defaults to the
one the run was trained on. Results are printed as a table and written as JSON (--output, default
<run-dir>/eval_<dataset>_<split>.json). A run that is not finished (still training, or stopped before its
end) is evaluated at its last checkpoint, with a note, and the JSON says "run_finished": false.

examples:
  gmmseg evaluate runs/my_run                         # val split of the training dataset
  gmmseg evaluate runs/my_run --split anomaly --scorers msp max_logit energy entropy sml gmm
  gmmseg evaluate runs/my_run --dataset road_anomaly --data-root /data --split anomaly --streaming
"""

PREDICT_EPILOG = """\
Applies a trained run to your own PNG/JPEG files. Each INPUT is an image file or a folder, whose .png, .jpg
and .jpeg files (not hidden ones, nor those of its subfolders) are taken in name order. For each image,
--out-dir receives
  <stem>_labels.png     the predicted classes in the colours of the run's dataset
  <stem>_<scorer>.png   each anomaly score as a heat map (magma colours: black = the image's lowest score,
                        pale yellow = its highest; scaled per image, so colours compare pixels of one image,
                        not images: use --save-arrays or predictions.json's scales for that)
  <stem>.npz            with --save-arrays: labels (H, W), one float32 (H, W) array per scorer, classes
and predictions.json, written once every image is done, lists the inputs, their outputs, the class names and
each heat map's scale. Inputs whose names clash (a/x.png, b/x.jpg) get x, x_2, ... ; files of the same names
from an earlier call are replaced; --out-dir may not be an input folder (a later call would take the outputs
for images).
Images are turned upright as their EXIF orientation says, normalised as the datasets do and predicted at their
own size (the outputs have that size); the model has learnt the scale of its training images, so bring photos
near that resolution first (the run's config.json says which: dataset_kwargs.image_size, the scenes default
being 64x128). The default scorers are msp max_logit energy entropy, and gmm for a GMM run; sml is fitted on
the run's training data when asked for.

examples:
  gmmseg predict runs/my_run photos/ --out-dir predictions
  gmmseg predict runs/my_run a.png b.jpg --out-dir out --scorers gmm msp --save-arrays
  gmmseg predict runs/my_run big/ --out-dir out --mode slide --crop-size 512 --stride 341 --device cuda
"""

REPRO_EPILOG = """\
Runs the study notebooks with papermill for a profile and writes their figures and tables (to figures/ for
the cpu profile, to <out-dir>/figures for the others). Profiles:
  smoke  seconds per notebook, for the tests (numbers meaningless)
  cpu    the reference run committed under figures/: tiny models, 8-9 min on a 2-core CPU
  gpu    256x512 images, 4000-step trainings, the real datasets when --data-root is given

examples:
  gmmseg reproduce --profile cpu
  gmmseg reproduce --profile gpu --device cuda --data-root /data --out-dir outputs/gpu --keep-going
  gmmseg reproduce --profile gpu --device cuda --data-root /data --out-dir outputs/gpu --resume   # after a stop
  gmmseg reproduce --profile cpu --notebooks 03_closed_set --set train_processes=4 --set 'seeds=[0]'
"""


def _add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TrainConfig JSON file to start from")
    p.add_argument("--arch", help="fcn | deeplabv3plus | segformer | smp:<Arch>:<encoder> (default fcn)")
    p.add_argument("--head", choices=["gmm", "softmax"], help="classifier head (default gmm)")
    p.add_argument("--variant", choices=["paper", "official"], help="GMM head variant (head_kwargs.variant)")
    p.add_argument("--dataset", help="dataset name (default scenes, generated, no files needed)")
    p.add_argument("--data-root", help="root directory of a real dataset")
    p.add_argument("--image-size", type=int, help="image size (dataset_kwargs.image_size)")
    p.add_argument("--iters", type=int, help="training steps (default 200)")
    p.add_argument("--batch-size", type=int, help="images per step and process (default 8)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--head-lr-mult", type=float, help="learning-rate multiplier of the head (default 10)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.01)")
    p.add_argument("--warmup-iters", type=int, help="linear warm-up steps (default 0)")
    p.add_argument("--grad-clip", type=float, help="clip the gradient norm to this value (default off)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], help="mixed precision on CUDA (default none)")
    p.add_argument("--eval-interval", type=int, help="validate every N steps (default 0: at the end)")
    p.add_argument("--checkpoint-interval", type=int, help="checkpoint every N steps (default 0: at the end)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--num-workers", type=int, help="DataLoader workers (default 0)")
    p.add_argument("--balanced-sampler", action="store_true", default=None,
                   help="sample images class-balanced (as the released code)")
    p.add_argument("--out-dir", help="parent directory of the run (default runs)")
    p.add_argument("--run-name", help="run directory name (default: derived from the config's hash)")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue from the run directory's checkpoint.pt if it exists (with --config "
                        "<run>/config.json: that run's directory, wherever the command runs)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run directory that already holds a trained run (its checkpoint, "
                        "metrics and evaluations are deleted); without it such a start is refused")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any TrainConfig field (repeatable), e.g. --set head_kwargs.embed_dim=32")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("gmmseg")
    except Exception:  # not installed (e.g. run from a bare checkout)
        return "unknown"


def _add_inference_arguments(p) -> None:
    """The options ``gmmseg evaluate`` and ``gmmseg predict`` share: sml statistics, inference mode, device."""
    p.add_argument("--sml-images", type=int, default=200,
                   help="training images for the sml statistics, spread evenly over the split (default 200; "
                        "0 = all)")
    p.add_argument("--mode", choices=["whole", "slide"], default="whole", help="inference mode (default whole)")
    p.add_argument("--crop-size", type=int, help="window size for --mode slide")
    p.add_argument("--stride", type=int, help="window stride for --mode slide (default 2/3 of --crop-size)")
    p.add_argument("--device", help="cpu, cuda, ... (default cpu)")


def _check_inference_arguments(args) -> None:
    """``ValueError`` for what ``gmmseg evaluate`` and ``gmmseg predict`` both refuse before loading the run: a
    negative ``--sml-images``, window options without ``--mode slide``, an unknown scorer."""
    from gmmseg_core.scoring import SCORERS

    if args.sml_images < 0:
        raise ValueError(f"--sml-images must be >= 0 (0 = all training images), got {args.sml_images}")
    if args.mode == "whole" and (args.crop_size is not None or args.stride is not None):
        raise ValueError("--crop-size and --stride apply to --mode slide")
    unknown = sorted(set(args.scorers or ()) - set(SCORERS))
    if unknown:
        raise ValueError(f"--scorers {unknown} are not scorers; choose from {sorted(SCORERS)}")


def _check_loaded_run(args, model, command: str, outputs: str) -> bool:
    """After ``gmmseg evaluate`` / ``gmmseg predict`` loaded ``args.run_dir``'s model: a note on stderr when the run
    is not finished (still training, or stopped before its end), ``ValueError`` for ``--scorers gmm`` on a softmax
    model. Returns whether the run is finished."""
    from gmmseg_core.train import is_finished

    finished = is_finished(args.run_dir)
    if not finished:        # e.g. a training still running there: its outputs are not the finished model's
        print(f"gmmseg {command}: note: the run in {str(args.run_dir)!r} is not finished (still training, or "
              f"stopped before its end): these are the {outputs} of its last checkpoint", file=sys.stderr)
    if "gmm" in (args.scorers or ()) and not getattr(model, "is_generative", False):
        raise ValueError("--scorers gmm needs a GMM head; this run was trained with the softmax head")
    return finished


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gmmseg", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=MAIN_EPILOG,
        description="GMMSeg study package: train and evaluate generative (GMM) and softmax segmentation "
                    "models, reproduce the study notebooks, run the benchmarks.")
    parser.add_argument("--version", action="version", version=f"gmmseg {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (writes a run directory)", epilog=TRAIN_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a segmentation model with a GMM or softmax head.")
    _add_train_options(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit (checks the fields and the names in the *_kwargs "
                        "dicts; their values are checked when training builds the model and data)")

    p = sub.add_parser("evaluate", help="evaluate a trained run (closed-set or anomaly)", epilog=EVAL_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Evaluate a run directory written by `gmmseg train`.")
    p.add_argument("run_dir", help="run directory (holds checkpoint.pt)")
    p.add_argument("--dataset", help="dataset name (default: the training dataset)")
    p.add_argument("--data-root", help="dataset root (default: the training run's for its own dataset, $GMMSEG_DATA "
                                       "or ./data for another one; for the training dataset it also locates the "
                                       "split the sml statistics come from)")
    p.add_argument("--split", default="val", help="split to evaluate: val, anomaly, ... (default val)")
    p.add_argument("--image-size", type=int, help="image size (default: the training run's for its own dataset, "
                                                  "the dataset's own size for another one)")
    p.add_argument("--num-images", type=int,
                   help="images in the split: how many a generated dataset (scenes, fashion, digits) makes, or "
                        "N spread evenly over a dataset read from disk (default: the run's setting for the train "
                        "and val splits of its own dataset, else the split's own size)")
    p.add_argument("--scorers", nargs="+", metavar="NAME",
                   help="anomaly scorers: msp max_logit energy entropy sml gmm (default: all that apply; "
                        "sml is fitted on the training split)")
    _add_inference_arguments(p)
    p.add_argument("--streaming", action="store_true", help="histogram-based anomaly metrics (bounded memory)")
    p.add_argument("--batch-size", type=int, default=4, help="images per batch (default 4)")
    p.add_argument("--output", help="JSON file for the results (default <run_dir>/eval_<dataset>_<split>.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("predict", help="apply a trained run to image files (labels, anomaly heat maps)",
                       epilog=PREDICT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Predict the classes and anomaly scores of PNG/JPEG images with a run "
                                   "directory written by `gmmseg train`.")
    p.add_argument("run_dir", help="run directory (holds checkpoint.pt)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and folders of images")
    p.add_argument("--out-dir", required=True, help="folder for the outputs (created if needed)")
    p.add_argument("--scorers", nargs="+", metavar="NAME",
                   help="anomaly scorers: msp max_logit energy entropy sml gmm (default: all that apply but sml, "
                        "which is fitted on the training split when named)")
    _add_inference_arguments(p)
    p.add_argument("--data-root", help="root of the training data for the sml statistics (default: the run's)")
    p.add_argument("--save-arrays", action="store_true", help="also write <stem>.npz with the labels and scores")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("reproduce", help="run the study notebooks for a profile", epilog=REPRO_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Execute the notebooks with papermill and regenerate figures and tables.")
    reproduce_cli.add_arguments(p)

    p = sub.add_parser("bench", help="run the benchmarks (from a source checkout)",
                       description="Run every benchmarks/bench_*.py and update benchmarks/RESULTS.md. "
                                   "Needs the repository checkout (benchmarks/ is not installed).")
    p.add_argument("--quick", action="store_true", help="tiny sizes, no RESULTS.md update (smoke test)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks (e.g. bench_train_step)")
    return parser


# ------------------------------------------------------------------------------------------------ commands
def _train_config(args):
    from gmmseg_core.config import TrainConfig
    from gmmseg_core.data import dataset_info

    cfg = TrainConfig.from_json(args.config, label="--config") if args.config else TrainConfig()
    d = cfg.to_dict()
    if args.resume and args.overwrite:
        raise ValueError("--resume continues a run and --overwrite starts it again: give one of them")
    run_of_config = _run_dir_of(args.config, cfg) if args.config else None
    if run_of_config is not None and args.out_dir is None and args.run_name is None:
        # config.json of a run names that run, not a namesake under the current directory
        d.update(out_dir=str(run_of_config.parent), run_name=run_of_config.name)
    if args.overwrite:
        d["resume"] = False       # a resumed run's config.json says resume=true
    # an absolute data root: the run's config.json is read again from other directories (evaluate, resume)
    data_root = str(Path(args.data_root).resolve()) if args.data_root else args.data_root
    flags = {"arch": args.arch, "head": args.head, "dataset": args.dataset, "data_root": data_root,
             "iters": args.iters, "batch_size": args.batch_size, "lr": args.lr, "head_lr_mult": args.head_lr_mult,
             "weight_decay": args.weight_decay, "warmup_iters": args.warmup_iters, "grad_clip": args.grad_clip,
             "amp": args.amp, "eval_interval": args.eval_interval,
             "checkpoint_interval": args.checkpoint_interval, "seed": args.seed, "device": args.device,
             "num_workers": args.num_workers, "balanced_sampler": args.balanced_sampler, "out_dir": args.out_dir,
             "run_name": args.run_name, "resume": args.resume}
    d.update({k: v for k, v in flags.items() if v is not None})
    if args.variant is not None:
        if d["head"] != "gmm":
            raise ValueError(f"--variant {args.variant} is a GMM head variant, but the head is {d['head']!r}")
        d["head_kwargs"] = {**d["head_kwargs"], "variant": args.variant}
    if args.image_size is not None:
        d["dataset_kwargs"] = {**d["dataset_kwargs"], "image_size": args.image_size}
    if args.no_progress:
        d["progress"] = False
    cfg = TrainConfig.from_dict(d).with_overrides(args.overrides)
    dataset_info(cfg.dataset)    # validate leaves unregistered names to training; the command line registers none
    return cfg


def _run_dir_of(config_path, cfg):
    """The run directory a ``config.json`` belongs to (absolute), or None for a config file of its own."""
    path = Path(str(config_path))
    if path.name != "config.json":      # inline JSON, or a config file of its own
        return None
    folder = path.resolve().parent
    return folder if folder.name == cfg.run_name or (folder / "checkpoint.pt").exists() else None


def _finished_step(run_dir):
    """The last step of the finished run in ``run_dir``, None when there is none."""
    from gmmseg_core.train import is_finished

    if not is_finished(run_dir):
        return None
    return (json.loads((run_dir / "metrics.json").read_text()).get("final") or {}).get("step")


def _checkpoint_step(run_dir):
    """The step of the checkpoint in ``run_dir``, None when there is none or it cannot be read (``train`` then
    names the problem). Memory-mapped: the model and memory bank are not read."""
    import torch

    from gmmseg_core.train import CHECKPOINT

    path = run_dir / CHECKPOINT
    if not path.is_file():
        return None
    try:
        return int(torch.load(path, map_location="cpu", mmap=True, weights_only=False)["step"])
    except Exception:  # noqa: BLE001 - any damage: train() reports it with its own message
        return None


def cmd_train(args) -> int:
    from gmmseg_core.train import CHECKPOINT, _check_run_dir_free, _launched_rank, train

    cfg = _train_config(args)
    report = not _launched_rank()    # torchrun's ranks >= 1 train, but only rank 0 reports (errors: every process)
    if args.print_config:
        if report:
            print(cfg.to_json())
        return 0
    _check_run_dir_free(cfg.run_dir)     # a running training's checkpoint is not a trained run to resume or overwrite
    existing = cfg.run_dir / CHECKPOINT
    if not cfg.resume and not args.overwrite and existing.exists():
        raise ValueError(f"{str(cfg.run_dir)!r} already holds a trained run ({CHECKPOINT}); pass --resume to "
                         "continue it, --overwrite to start it again, or --run-name for a new run")
    if cfg.resume and not cfg.run_dir.exists() and report:   # (train() warns about a run that left no checkpoint)
        print(f"no run {str(cfg.run_dir)!r} to resume: training from step 0", file=sys.stderr)
    finished_at = _finished_step(cfg.run_dir) if cfg.resume else None
    resumed_at = _checkpoint_step(cfg.run_dir) if cfg.resume and finished_at != cfg.iters else None
    if resumed_at is not None and resumed_at < cfg.iters and report:   # (the progress bar starts there too)
        print(f"resuming the run in {str(cfg.run_dir)!r} from its checkpoint at step {resumed_at} of {cfg.iters}",
              file=sys.stderr)
    run_dir = train(cfg)
    if not report:      # only rank 0 reports (every process returns once the run's files are written)
        return 0
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
    final = metrics.get("final") or {}
    if finished_at == cfg.iters:        # else it trained, from its checkpoint or continued to a larger --iters
        print(f"the run in {str(run_dir)!r} was already finished at step {cfg.iters}: nothing trained (a larger "
              "--iters continues it)", file=sys.stderr)
    if final:
        print(f"final: mIoU {100 * final['miou']:.2f}  pixel acc {100 * final['pixel_acc']:.2f}  "
              f"ECE {100 * final['ece']:.2f}")
    print(f"run directory: {run_dir}")
    return 0


def cmd_evaluate(args) -> int:
    from gmmseg_core.data import build_dataset
    from gmmseg_core.evaluate import (
        collect_sml_statistics,
        evaluate_anomaly,
        evaluate_closed_set,
        format_table,
    )
    from gmmseg_core.train import _check_device, _write_json, dataset_kwargs_for, load_run

    _check_device(args.device)
    output = Path(args.output) if args.output else None
    if output is not None and output.is_dir():
        raise ValueError(f"--output must be a file path, got the directory {str(output)!r}")
    blocked = next((q for q in (output.parents if output is not None else ()) if q.exists() and not q.is_dir()),
                   None)
    if blocked is not None:     # checked before the evaluation, whose results would otherwise be lost
        raise ValueError(f"--output {str(output)!r} cannot be written: {str(blocked)!r} is a file")
    _check_inference_arguments(args)
    model, cfg, _ = load_run(args.run_dir, device=args.device)
    finished = _check_loaded_run(args, model, "evaluate", "results")
    name = args.dataset or cfg.dataset
    root = args.data_root if args.data_root is not None else (cfg.data_root if name == cfg.dataset else None)
    kw = {}
    if name == cfg.dataset:  # the training run's data settings (and its validation overrides for val)
        kw = dataset_kwargs_for(cfg, "val" if args.split == "val" else "eval")   # never augmented
        if args.split not in ("train", "val"):
            kw.pop("num_images", None)  # the training split's size says nothing about an anomaly split's
    if args.image_size is not None:
        kw["image_size"] = args.image_size
    if args.num_images is not None:
        kw["num_images"] = args.num_images
    dataset = build_dataset(name, args.split, root=root, **kw)
    common = dict(batch_size=args.batch_size, device=args.device, mode=args.mode, crop_size=args.crop_size,
                  stride=args.stride, progress=not args.no_progress)
    for flag, given in (("--scorers", args.scorers), ("--streaming", args.streaming)):
        if given and not getattr(dataset, "is_anomaly_split", False):
            raise ValueError(f"{flag} applies to anomaly splits; {name}/{args.split} is a closed-set split")
    if getattr(dataset, "is_anomaly_split", False):
        scorers = args.scorers
        want_sml = scorers is None or "sml" in scorers
        sml_stats = None
        if want_sml:
            # the training dataset where the evaluated split was found, when they are the same dataset
            train_ds = build_dataset(cfg.dataset, "train", root=root if name == cfg.dataset else cfg.data_root,
                                     **dataset_kwargs_for(cfg, "statistics"))      # without augmentation
            sml_stats = collect_sml_statistics(model, train_ds, max_images=args.sml_images or None, **common)
        results = evaluate_anomaly(model, dataset, scorers=scorers, sml_stats=sml_stats,
                                   streaming=args.streaming, **common)
        print(f"{name}/{args.split}: anomaly metrics (%), {len(dataset)} images")
        print(format_table(results))
    else:
        results = evaluate_closed_set(model, dataset, **common)
        print(f"{name}/{args.split}: {len(dataset)} images")
        print(format_table({"model": results}, keys=("miou", "pixel_acc", "mean_acc", "ece")))
        classes = getattr(dataset, "classes", [str(i) for i in range(len(results["per_class_iou"]))])
        for cls, iou in zip(classes, results["per_class_iou"]):
            print(f"  {cls:<16}{100 * iou:8.2f}")
    out = output or Path(args.run_dir) / f"eval_{name}_{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    options = {"mode": args.mode, "crop_size": args.crop_size, "stride": args.stride, "num_images": len(dataset),
               "image_size": kw.get("image_size"), "data_root": None if root is None else str(root),
               "run_finished": finished}
    if getattr(dataset, "is_anomaly_split", False):
        options.update(streaming=args.streaming, sml_images=args.sml_images)
    _write_json(out, {"dataset": name, "split": args.split, "options": options, "results": results})
    print(f"written: {out}")
    return 0


def cmd_predict(args) -> int:
    from gmmseg_core.data import build_dataset
    from gmmseg_core.evaluate import collect_sml_statistics
    from gmmseg_core.predict import (
        check_images,
        check_mode,
        check_out_dir,
        find_images,
        predict_files,
        run_labelling,
    )
    from gmmseg_core.train import _check_device, dataset_kwargs_for, load_run

    _check_device(args.device)
    _check_inference_arguments(args)
    if args.mode == "slide" and args.crop_size is None:
        raise ValueError("--mode slide needs --crop-size (the window size)")
    check_mode(args.mode, args.crop_size, args.stride)
    out_dir = Path(args.out_dir)
    check_out_dir(out_dir, args.inputs)
    check_images(find_images(args.inputs))      # missing inputs, empty folders and non-images, before loading
    model, cfg, metrics = load_run(args.run_dir, device=args.device)
    _check_loaded_run(args, model, "predict", "predictions")
    sml_stats = None
    if "sml" in (args.scorers or ()):
        root = args.data_root if args.data_root is not None else cfg.data_root
        train_ds = build_dataset(cfg.dataset, "train", root=root, **dataset_kwargs_for(cfg, "statistics"))
        sml_stats = collect_sml_statistics(model, train_ds, max_images=args.sml_images or None, device=args.device,
                                           mode=args.mode, crop_size=args.crop_size, stride=args.stride,
                                           progress=not args.no_progress)
    classes, palette, normalizer = run_labelling(cfg, model.num_classes, metrics)
    summary = predict_files(model, args.inputs, out_dir, classes, palette, scorers=args.scorers,
                            sml_stats=sml_stats, normalizer=normalizer, mode=args.mode, crop_size=args.crop_size,
                            stride=args.stride, device=args.device, save_arrays=args.save_arrays,
                            progress=not args.no_progress)
    renamed = [(im["input"], im["stem"]) for im in summary["images"] if Path(im["input"]).stem != im["stem"]]
    for source, stem in renamed:
        print(f"gmmseg predict: note: {source!r} shares its name with an earlier input: its outputs are "
              f"named {stem!r}", file=sys.stderr)
    count = len(summary["images"])
    print(f"{count} image{'s' * (count != 1)}, scorers {' '.join(summary['scorers'])}; classes: "
          + ", ".join(f"{i} {c}" for i, c in enumerate(classes)))
    print(f"written: {out_dir} (summary in {out_dir / 'predictions.json'})")
    return 0


def cmd_reproduce(args) -> int:
    return reproduce_cli.run_from_args(args)


def cmd_bench(args) -> int:
    if (Path.cwd() / "benchmarks" / "run_all.py").exists() and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        from benchmarks import run_all
    except ImportError:
        print("gmmseg bench needs the source checkout: run it from the repository root (where benchmarks/ "
              "is), e.g. `cd gmmseg && gmmseg bench`, or `make bench`.", file=sys.stderr)
        return 2
    argv = (["--quick"] if args.quick else []) + (["--only", *args.only] if args.only else [])
    return run_all.main(argv)


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "reproduce": cmd_reproduce,
            "bench": cmd_bench}


def main(argv=None) -> int:
    """Entry point of the ``gmmseg`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt as err:            # a training stopped by Ctrl-C says where its checkpoint is
        print(f"gmmseg {args.command}: interrupted" + (f": {err}" if str(err) else ""), file=sys.stderr)
        return 130
    except SystemExit as err:                   # SIGTERM: the same, with the exit status SystemExit carries
        if getattr(err, "detail", None):
            print(f"gmmseg {args.command}: terminated: {err.detail}", file=sys.stderr)
        raise
    except (ValueError, OSError) as err:        # bad values, and paths that are missing or not what they must be
        print(f"gmmseg {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:           # a diverged training: not a usage error, no traceback either
        print(f"gmmseg {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
