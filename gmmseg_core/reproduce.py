"""Run the study notebooks for a named profile with papermill.

The notebooks under ``notebooks/`` (installed inside the package, as ``gmmseg_core/notebooks``) are executed in
order, each with the parameters of the chosen profile (:data:`gmmseg_core.profiles.PROFILES`) plus the run-wide
ones (``device``, ``data_root``, ``figures_dir``, ``cache_dir``, ``out_dir``). Trained models are shared between
notebooks through ``train_cached``: the same configuration gives the same cache key under ``cache_dir``, so a
model trained by one notebook is reused by the next. Executed notebooks go to ``out_dir``; figures (PNG) and the
tables (Markdown and CSV) to ``figures_dir``. One run at a time per ``out_dir``: a second one there stops at once,
naming the first.

Usage::

    python -m gmmseg_core.reproduce --profile cpu
    gmmseg reproduce --profile smoke --out-dir /tmp/smoke --figures-dir /tmp/smoke/figures
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from ._checks import check_int
from ._files import DirectoryLock, atomic_write_text, utc_timestamp
from .profiles import NOTEBOOKS, PROFILES, notebook_parameters


def _notebook_dir() -> Path:
    """Where the study notebooks are: inside the package when it is installed from a wheel or an sdist
    (``gmmseg_core/notebooks``), else the checkout's ``notebooks/`` beside the package (a source tree, or an
    editable install)."""
    package = Path(__file__).resolve().parent
    installed = package / "notebooks"
    return installed if installed.is_dir() else package.parent / "notebooks"


NOTEBOOK_DIR = _notebook_dir()
RUN_PARAMETERS = ("device", "data_root", "figures_dir", "cache_dir", "out_dir")
TIMINGS = "timings.json"
LOCK = "reproduce.lock"      # in out_dir while a run writes there


class NotebookExecutionError(RuntimeError):
    """A notebook failed; the message names the notebook, the failing cell and the exception.

    Attributes
    ----------
    notebook : Path
        The source notebook.
    output_path : Path
        The executed copy (with outputs up to the failure).
    cell_index : int or None
        Index of the failing cell in the *source* notebook (0-based), None when unknown (e.g. a dead kernel).
    ename, evalue : str
        Exception name and message raised in the cell.
    """

    def __init__(self, notebook, output_path, cell_index, ename, evalue, source=""):
        self.notebook = Path(notebook)
        self.output_path = Path(output_path)
        self.cell_index = cell_index
        self.ename = ename
        self.evalue = evalue
        self.source = source
        where = f"cell {cell_index}" if cell_index is not None else "an unknown cell"
        first_line = next((ln for ln in source.splitlines() if ln.strip()), "")
        msg = f"notebook {self.notebook} failed in {where}: {ename}: {evalue}"
        if first_line:
            msg += f"\n  cell starts with: {first_line[:100]}"
        msg += f"\n  executed copy with the traceback: {self.output_path}"
        super().__init__(msg)


def _resolve_notebooks(notebooks) -> list[Path]:
    """Names (``"03_closed_set"``), file names or paths -> existing notebook paths, in the given order."""
    if notebooks is None:
        paths = [NOTEBOOK_DIR / f"{name}.ipynb" for name in NOTEBOOKS]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"the study notebooks {missing} are not in {NOTEBOOK_DIR}; reinstall gmmseg "
                                    "(its wheel ships them) or run from a checkout that has notebooks/")
        return paths
    if isinstance(notebooks, (str, os.PathLike)):
        notebooks = [notebooks]
    paths = []
    for item in notebooks:
        p = Path(item)
        exact = [p, NOTEBOOK_DIR / p, NOTEBOOK_DIR / f"{p}.ipynb"]
        found = next((c for c in exact if c.suffix == ".ipynb" and c.is_file()), None)
        if found is None:  # a prefix of one notebook's name
            prefixed = [n for n in NOTEBOOKS if n.startswith(str(item))]
            if len(prefixed) > 1:
                raise ValueError(f"notebooks: {item!r} matches {prefixed}; give one of them (a longer prefix)")
            found = next((c for c in (NOTEBOOK_DIR / f"{n}.ipynb" for n in prefixed) if c.is_file()), None)
        if found is None:
            raise ValueError(f"notebooks: no notebook found for {item!r}; expected a path or one of {NOTEBOOKS}")
        paths.append(found.resolve())
    return paths


@contextmanager
def _environ(values: dict):
    """``os.environ`` with ``values`` (``{name: str}``) set inside the block and as it was again after it."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        os.environ.update(values)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _kernel():
    """Name of a kernelspec that runs *this* interpreter (so the notebooks see this environment), valid inside
    the block.

    Uses the ``python3`` kernelspec when its command is a bare ``python`` (jupyter_client substitutes the
    running interpreter) or lives in ``sys.prefix``; otherwise writes a private kernelspec pointing at
    ``sys.executable`` into a temporary Jupyter data directory and adds it to ``JUPYTER_PATH``, both undone when
    the block ends.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        exe = KernelSpecManager().get_kernel_spec("python3").argv[0]
    except NoSuchKernel:
        exe = None
    if exe is not None and (exe in ("python", "python3")
                            or Path(exe).resolve().is_relative_to(Path(sys.prefix).resolve())):
        yield "python3"
        return
    name = "gmmseg-python"
    with tempfile.TemporaryDirectory(prefix="gmmseg-kernels-") as root:
        kdir = Path(root) / "kernels" / name
        kdir.mkdir(parents=True)
        spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "gmmseg (this interpreter)", "language": "python"}
        (kdir / "kernel.json").write_text(json.dumps(spec))
        with _environ({"JUPYTER_PATH": os.pathsep.join(filter(None, [root, os.environ.get("JUPYTER_PATH")]))}):
            yield name


def _check_notebook_packages() -> None:
    """Fail with the install command when the packages that execute notebooks are missing."""
    import importlib.util

    missing = [m for m in ("papermill", "nbformat", "jupyter_client", "ipykernel") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"running the notebooks needs {', '.join(missing)}: pip install 'gmmseg[notebooks]' "
                          "(or use the environment `make env` creates)")


def _declared_parameters(notebook: Path) -> set[str]:
    """Names assigned in the notebook's ``parameters`` cell (as papermill reads them)."""
    import papermill as pm

    return set(pm.inspect_notebook(str(notebook)))


def _source_cell_index(notebook: Path, err) -> int | None:
    """Map papermill's cell index (counted in the executed copy, which has an injected-parameters cell)
    back to the source notebook by matching the failing cell's source."""
    import nbformat

    try:
        nb = nbformat.read(notebook, as_version=4)
    except Exception:  # pragma: no cover - unreadable source, keep papermill's index
        return err.cell_index
    matches = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source == err.source]
    if len(matches) == 1:
        return matches[0]
    return err.cell_index


def run_notebook(notebook, output_path, parameters: dict, kernel_name: str | None = None,
                 progress: bool = True) -> float:
    """Execute one notebook with papermill; returns its duration in seconds.

    ``progress`` shows a bar over the notebook's cells on stderr (one redraw per cell): a notebook can run for
    hours, and its outputs go to the executed copy, not to the console.

    Raises
    ------
    NotebookExecutionError
        When a cell raises or the kernel dies; the message names the notebook and the cell.
    """
    if kernel_name is None:
        with _kernel() as kernel_name:
            return run_notebook(notebook, output_path, parameters, kernel_name=kernel_name, progress=progress)
    with _environ({"MPLBACKEND": "Agg"}):  # figures are files; no display in the kernel
        return _execute_notebook(Path(notebook), Path(output_path), parameters, kernel_name, progress)


def _execute_notebook(notebook: Path, output_path: Path, parameters: dict, kernel_name: str, progress: bool) -> float:
    """:func:`run_notebook`'s work on an existing kernelspec, with its environment set; returns the seconds."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    output_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sockets = tempfile.TemporaryDirectory(prefix="gmmseg-kernel-") if os.name == "posix" else None
    km = None
    if sockets is not None:
        # a local kernel over Unix sockets (IPC) rather than unencrypted TCP on localhost; papermill leaves a
        # kernel it did not start running, so it is shut down below
        from jupyter_client.manager import KernelManager

        km = KernelManager(kernel_name=kernel_name, transport="ipc", ip=str(Path(sockets.name) / "kernel"))
    kernel_idle = False
    if _INTERRUPTS is not None:
        _INTERRUPTS.kernel = km
    try:
        pm.execute_notebook(
            str(notebook), str(output_path), parameters=parameters, kernel_name=kernel_name,
            cwd=str(notebook.parent), progress_bar={"desc": notebook.stem, "leave": False} if progress else False,
            log_output=False, km=km,
        )
        kernel_idle = True
    except PapermillExecutionError as err:
        kernel_idle = True                     # a cell raised; the kernel waits for the next one
        raise NotebookExecutionError(notebook, output_path, _source_cell_index(notebook, err), err.ename,
                                     err.evalue, err.source) from None
    except Exception as err:  # dead kernel, timeout, bad notebook file
        raise NotebookExecutionError(notebook, output_path, None, type(err).__name__, str(err)) from err
    finally:
        interrupts = _INTERRUPTS
        interrupted = interrupts is not None and interrupts.signum is not None
        if interrupts is not None:
            interrupts.kernel = None
        # Interrupted: the signal handler has killed the kernel's process group. Shutting the kernel down through
        # its manager would run papermill's event loop again, whose abandoned tasks wait on the dead kernel for
        # ever. Otherwise, broken while a cell runs (dead kernel, timeout): kill the process group (now=True)
        # with whatever the cell started, instead of asking a busy kernel to shut down.
        if km is not None and km.has_kernel:
            if interrupted:
                _kill_kernel(km)
            else:
                km.shutdown_kernel(now=not kernel_idle)
        if sockets is not None:
            sockets.cleanup()
        if interrupted:      # whatever papermill made of the killed kernel (a dead-kernel error, or nothing)
            raise KeyboardInterrupt(f"signal {interrupts.signum}")
    return time.perf_counter() - start


# reproduce's own arguments that the notebooks also receive, with their command-line flags
RUN_ARGUMENTS = {"device": "--device", "data_root": "--data-root", "figures_dir": "--figures-dir",
                 "cache_dir": "--cache-dir", "out_dir": "--out-dir"}


class _RunInterrupts:
    """Ctrl-C and SIGTERM during :func:`reproduce`: the running notebook's kernel is killed with its process group.

    The kernel runs in a session of its own, so a terminal's Ctrl-C never reaches it or the trainings it
    started, and waiting for the busy kernel to shut down would take until its cell ends (hours, for a long
    training cell), while the trainings go on. The handler kills the kernel's process group, which stops them
    all at once, then raises ``KeyboardInterrupt``; ``run_notebook`` raises it again in place of whatever
    papermill made of the dead kernel, and ``reproduce`` records the interrupted notebook in ``timings.json``
    and passes the interrupt on. A training killed this way resumes from its last checkpoint the next time.
    Outside the main thread, or without process groups, the signals keep their usual handling.
    """

    def __init__(self):
        self.signum = None
        self.kernel = None                      # the running notebook's KernelManager, set by run_notebook

    def _handle(self, signum, frame):
        self.signum = signum
        if self.kernel is not None:
            _kill_kernel(self.kernel)
        raise KeyboardInterrupt(f"signal {signum}")

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread() or not hasattr(os, "killpg"):
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


_INTERRUPTS: _RunInterrupts | None = None      # the run in progress, if any


def _kill_kernel(km) -> None:
    """SIGKILL to a kernel's process group (the kernel and what it started), or to the kernel alone, without
    going through the kernel manager's event loop; nothing if it has not started or is gone."""
    provisioner = getattr(km, "provisioner", None)
    process = getattr(provisioner, "process", None)
    pgid = getattr(provisioner, "pgid", None)
    try:
        if pgid is not None and hasattr(os, "killpg"):
            os.killpg(pgid, signal.SIGKILL)
        elif process is not None:
            process.kill()
    except OSError:
        pass


class NotebooksFailedError(RuntimeError):
    """Notebooks failed in a ``reproduce(..., keep_going=True)`` run, which ran the others to the end.

    Attributes
    ----------
    failures : list of NotebookExecutionError
        One per failed notebook, in run order.
    result : dict
        What :func:`reproduce` would have returned, with an ``"error"`` entry for each failed notebook (also
        written to ``timings.json``).
    """

    def __init__(self, failures, result):
        self.failures, self.result = list(failures), result
        ran = len(result["notebooks"]) - len(self.failures)
        lines = [f"{len(self.failures)} of {len(result['notebooks'])} notebooks failed"
                 + (f" ({ran} ran to the end):" if ran else ":")]
        lines += [str(err) for err in self.failures]
        super().__init__("\n".join(lines))


def _earlier_entries(path: Path, profile: str) -> dict:
    """The notebook entries of the ``timings.json`` at ``path`` when earlier runs of ``profile`` wrote it; {} when
    there is none, or it is of another profile (its entries say nothing about this one's notebooks) or unreadable."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    notebooks = earlier.get("notebooks") if isinstance(earlier, dict) and earlier.get("profile") == profile else None
    if not isinstance(notebooks, dict):
        return {}
    return {name: entry for name, entry in notebooks.items() if isinstance(entry, dict)}


def _notebook_record(notebook: Path, output: Path, parameters: dict) -> dict:
    """What identifies one execution of ``notebook``: its executed copy, its parameters (as JSON reads them
    back) and the digest of the source it ran."""
    return {"output": str(output), "parameters": json.loads(json.dumps(parameters, default=str)),
            "notebook_sha256": hashlib.sha256(notebook.read_bytes()).hexdigest()}


def _finished_earlier(entry, record: dict) -> bool:
    """Whether an earlier run's ``timings.json`` entry is a finished execution of ``record`` (same source, same
    parameters) whose executed copy is still there: such a notebook need not run again."""
    return (isinstance(entry, dict) and "seconds" in entry and "error" not in entry
            and all(entry.get(key) == value for key, value in record.items()) and Path(record["output"]).is_file())


def _write_timings(path: Path, result: dict, earlier: dict) -> None:
    """``timings.json``: ``result`` with the entries of earlier runs it does not replace kept (each marked
    ``"earlier_run": true``), complete only when this run is and every entry ended without an error."""
    notebooks = {name: {**entry, "earlier_run": True} for name, entry in earlier.items()}
    notebooks.update(result["notebooks"])        # this run's entries take the place of the earlier ones
    ended = all("seconds" in entry and "error" not in entry for entry in notebooks.values())
    atomic_write_text(path, json.dumps({**result, "notebooks": notebooks, "complete": result["complete"] and ended},
                                       indent=2))


def _machine(device) -> dict:
    """What ``timings.json`` records of the machine: another processor trains slightly different models, so the
    figures of a run are only reproducible on one like it."""
    import torch

    from gmmseg_core._machine import cpu_description, kernel_caps

    gpu = torch.device(device).type == "cuda" if device else False
    return {"cpu": cpu_description(), "cpu_cores": os.cpu_count(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(torch.device(device)) if gpu else None, "kernel_caps": kernel_caps()}


def _unreadable_datasets(notebook_params: dict, data_root) -> dict:
    """``{dataset: (reason, [notebook, ...])}`` for the data sets named by the notebooks' ``datasets`` parameters
    (``notebook_params``: ``{notebook path: its parameters}``) that cannot be read here, tried as notebook 03 tries
    them (one image of the train and val splits): those notebooks leave such a data set out of their tables and
    figures, which would otherwise be said only in a table's notes once the run has ended. A misspelt data set
    name raises here, before anything runs, as it would in the notebook."""
    from gmmseg_core.data import build_dataset, dataset_info

    reasons, users = {}, {}
    for path, params in notebook_params.items():
        for name in params.get("datasets") or ():
            dataset_info(name)
            users.setdefault(name, []).append(path.stem)
            if name in reasons:
                continue
            reasons[name] = None
            try:
                for split in ("train", "val"):
                    build_dataset(name, split, root=data_root, num_images=1, image_size=params.get("image_size"))
            except Exception as err:  # noqa: BLE001 - whatever stops the notebook reading it
                reasons[name] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
    return {name: (reason, users[name]) for name, reason in reasons.items() if reason is not None}


def reproduce(profile: str = "cpu", data_root=None, device=None, out_dir=None, figures_dir=None,
              cache_dir=None, notebooks=None, parameters: dict | None = None, threads: int | None = None,
              keep_going: bool = False, resume: bool = False, log=print, progress: bool = True) -> dict:
    """Execute the study notebooks for ``profile`` and collect their timings.

    Parameters
    ----------
    profile : {"smoke", "cpu", "gpu"}
        Named parameter set from :data:`gmmseg_core.profiles.PROFILES`.
    data_root : str or None
        Root of the real datasets (Cityscapes, ADE20K, Fishyscapes, ...); None uses the shipped/generated data.
    device : str or None
        Torch device for the notebooks; None -> "cpu".
    out_dir : path or None
        Where the executed notebooks and ``timings.json`` go; default ``outputs/<profile>``.
    figures_dir : path or None
        Where the figures (PNG) and the tables (``*_table.md`` / ``*_table.csv``) go; default ``figures`` (the
        committed reference) for the cpu profile, ``<out_dir>/figures`` for the others, so a smoke or gpu run
        never overwrites the reference figures by accident.
    cache_dir : path or None
        Trained-model cache shared by the notebooks; default ``<out_dir>/cache``.
    notebooks : list of names or paths, optional
        Subset (or other notebooks) to run, in the given order; default all of them.
    parameters : dict, optional
        Extra parameters (override the profile's), each passed to the notebooks whose parameters cell declares
        it; a name no notebook of the run declares, or one of the run-wide arguments above (``device``,
        ``data_root``, ``figures_dir``, ``cache_dir``, ``out_dir``), raises ``ValueError`` before anything runs
        or is created.
    threads : int, optional
        Intra-op threads of each notebook kernel (``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``, set while the
        notebooks run; the caller's values are back when ``reproduce`` returns). Default: 1 on the CPU, the
        library default on CUDA. The CPU models are tiny, so extra threads buy little, and on a
        shared machine oversubscribed threads that spin-wait for each other make every step 10-100x slower.
    keep_going : bool
        After a failing notebook, run the later ones anyway (a notebook trains the models it needs that an
        earlier one did not), then raise :class:`NotebooksFailedError` naming every failure. Default: stop at
        the first failure.
    resume : bool
        Skip each notebook that an earlier run left finished in ``out_dir``: ``timings.json`` records it as ended
        without an error, with the same parameters (the run-wide ones included) and the same notebook source, and
        its executed copy is there. Every other notebook runs. Changes to the library are not noticed: after
        one, run without ``resume``. Default: run every notebook.
    log : callable
        Progress printer (``print`` by default): a line as each notebook starts and ends.
    progress : bool
        A bar over the running notebook's cells on stderr.

    Returns
    -------
    dict
        ``{"profile", "notebooks": {name: entry}, "total_seconds", "figures_dir", "out_dir", "complete"}`` for
        this run's notebooks, each ``entry`` being ``{"output": executed copy, "seconds", "parameters",
        "notebook_sha256", "started": UTC time}``, with an ``"error"`` when the notebook failed or was
        interrupted (and the entry of the earlier run, marked ``"earlier_run": true``, for a notebook that
        ``resume`` skipped). ``"complete"`` is true when every notebook of the run ended without an error;
        ``"total_seconds"`` is the run's wall time.

        ``<out_dir>/timings.json`` holds the same, merged into what earlier runs of the profile wrote there:
        their entries for notebooks this run did not execute stay, marked ``"earlier_run": true`` (a file of
        another profile is replaced). There ``"complete"`` is true only when this run completed and every
        entry, earlier ones included, ended without an error. The file is written as each notebook starts and
        however the run ends: an entry without ``"seconds"`` is that of a notebook still running, or of a run
        killed without clean-up.

    Raises
    ------
    DirectoryInUseError
        An ``OSError``, before anything runs, when another run writes to ``out_dir`` (it holds the folder's
        ``reproduce.lock``, a lock that ends with its process): names that process.
    NotebookExecutionError
        When a notebook fails (names the notebook and the cell); later notebooks are not run.
    NotebooksFailedError
        With ``keep_going``, after the last notebook, when any failed.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    _check_notebook_packages()
    out_dir = Path(out_dir if out_dir is not None else Path("outputs") / profile).resolve()
    if figures_dir is None:
        figures_dir = "figures" if profile == "cpu" else out_dir / "figures"
    figures_dir = Path(figures_dir).resolve()
    if data_root in (None, ""):
        data_root = None
    else:                           # the kernels run in notebooks/: a relative root must be resolved here
        data_root = Path(data_root).expanduser().resolve()
        if not data_root.is_dir():
            raise ValueError(f"data_root {str(data_root)!r} is not a directory; pass the folder that holds the "
                             "datasets, each in its usual layout (listed in gmmseg_core/data/readers.py and the "
                             "README's Data section)")
    from gmmseg_core.train import _check_device

    _check_device(device)
    cache_dir = Path(cache_dir).resolve() if cache_dir is not None else out_dir / "cache"
    paths = _resolve_notebooks(notebooks)
    run_wide = sorted(set(parameters or {}) & set(RUN_ARGUMENTS))
    if run_wide:
        raise ValueError(f"parameters {run_wide} are set for the whole run by reproduce's own arguments ("
                         + ", ".join(f"{name}= / {flag}" for name, flag in RUN_ARGUMENTS.items())
                         + "), which resolve paths against the current directory; pass them that way")
    declared = {path: _declared_parameters(path) for path in paths} if parameters else {}
    unknown = sorted(set(parameters or {}) - set().union(*declared.values()))
    if unknown:
        raise ValueError(f"parameters {unknown} are not declared by any notebook of this run "
                         f"({', '.join(p.stem for p in paths)}); see each notebook's parameters cell")
    if threads is None and not str(device or "cpu").startswith("cuda"):
        threads = 1
    threads = check_int("threads", threads, optional=True)
    run_params = {"device": device or "cpu", "data_root": str(data_root) if data_root else None,
                  "figures_dir": str(figures_dir), "cache_dir": str(cache_dir), "out_dir": str(out_dir)}
    notebook_params = {path: {**notebook_parameters(profile, path.stem), **run_params,
                              **{k: v for k, v in (parameters or {}).items() if k in declared.get(path, ())}}
                       for path in paths}
    result = {"profile": profile, "notebooks": {}, "figures_dir": str(figures_dir), "out_dir": str(out_dir),
              "machine": _machine(device), "complete": False}
    for name, (reason, users) in _unreadable_datasets(notebook_params, data_root).items():
        log(f"note: the data set {name!r} cannot be read here ({reason}); {', '.join(users)} will leave it out of "
            "their tables and figures", flush=True)
    timings = out_dir / TIMINGS
    failures = []
    global _INTERRUPTS
    interrupts = _RunInterrupts()
    # only once every argument is known to be good: the lock makes out_dir, then the other folders are made
    lock = DirectoryLock(out_dir, name=LOCK).acquire(
        "two runs in one output folder would overwrite each other's executed notebooks and timings.json: wait for "
        "that one to end, or give this one another out_dir (--out-dir)")
    try:
        for d in (figures_dir, cache_dir):
            d.mkdir(parents=True, exist_ok=True)
    except BaseException:
        lock.release()
        raise
    # inherited by the kernels papermill starts; the caller's values are back when the run ends
    thread_vars = {var: str(threads) for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")} if threads is not None else {}
    earlier = _earlier_entries(timings, profile)       # read under the lock: no other run rewrites it now
    total_start = time.perf_counter()
    try:
        with interrupts.installed(), _kernel() as kernel, _environ(thread_vars):
            _INTERRUPTS = interrupts
            for i, nb_path in enumerate(paths, 1):
                name, params = nb_path.stem, notebook_params[nb_path]
                output = out_dir / nb_path.name
                record = _notebook_record(nb_path, output, params)
                if resume and _finished_earlier(earlier.get(name), record):
                    result["notebooks"][name] = {**earlier[name], "earlier_run": True}
                    log(f"[{i}/{len(paths)}] {name}: skipped, finished by an earlier run with the same parameters "
                        f"in {earlier[name]['seconds']:.1f} s", flush=True)
                    continue
                log(f"[{i}/{len(paths)}] {name}: start ({profile} profile)", flush=True)
                start, error = time.perf_counter(), None
                entry = result["notebooks"][name] = {**record, "started": utc_timestamp()}
                result["total_seconds"] = round(start - total_start, 2)
                _write_timings(timings, result, earlier)      # a kill -9 from here on leaves it unfinished
                try:
                    run_notebook(nb_path, output, params, kernel_name=kernel, progress=progress)
                except NotebookExecutionError as err:
                    entry.update(seconds=round(time.perf_counter() - start, 2), error=str(err))
                    if not keep_going:
                        raise
                    failures.append(err)
                    error = str(err)
                except BaseException as err:                     # interrupted: recorded, then passed on
                    entry.update(seconds=round(time.perf_counter() - start, 2), error=f"interrupted ({err})")
                    raise
                seconds = time.perf_counter() - start
                entry["seconds"] = round(seconds, 2)
                log(f"[{i}/{len(paths)}] {name}: " + (f"FAILED after {seconds:.1f} s; going on\n  {error}" if error
                                                       else f"done in {seconds:.1f} s"), flush=True)
        result["complete"] = not failures       # keep_going: the failures are this run's too
    finally:
        _INTERRUPTS = None
        # what ran, also when a failure or an interrupt ends the run early ("complete": false)
        result["total_seconds"] = round(time.perf_counter() - total_start, 2)
        try:
            _write_timings(timings, result, earlier)
        finally:
            lock.release()
    done = len(paths) - len(failures)
    skipped = sum(1 for info in result["notebooks"].values() if info.get("earlier_run"))
    log(f"{done} of {len(paths)} notebooks done" + (f" ({skipped} by an earlier run)" if skipped else "")
        + f" in {result['total_seconds']:.1f} s; figures in {figures_dir}", flush=True)
    for name, info in result["notebooks"].items():
        log(f"  {name:<36} {info['seconds']:8.1f} s" + ("  FAILED" if "error" in info else "")
            + ("  (earlier run)" if info.get("earlier_run") else ""), flush=True)
    if failures:
        raise NotebooksFailedError(failures, result)
    return result


def add_arguments(parser):
    """Add the ``reproduce`` options to an argparse parser (shared by ``gmmseg reproduce`` and ``main``)."""
    parser.add_argument("--profile", default="cpu", choices=sorted(PROFILES), help="parameter set (default cpu)")
    parser.add_argument("--data-root", default=None, help="root of real datasets (default: generated/shipped data)")
    parser.add_argument("--device", default=None, help="torch device for the notebooks (default cpu)")
    parser.add_argument("--out-dir", default=None, help="executed notebooks and timings (default outputs/<profile>)")
    parser.add_argument("--figures-dir", default=None,
                        help="figures and tables (default: figures for the cpu profile, <out-dir>/figures otherwise)")
    parser.add_argument("--cache-dir", default=None, help="trained-model cache (default <out-dir>/cache)")
    parser.add_argument("--notebooks", nargs="+", default=None, help="run only these notebooks (names or paths)")
    parser.add_argument("--threads", type=int, default=None, help="threads per kernel (default 1 on the CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no bar over the running notebook's cells")
    parser.add_argument("--keep-going", action="store_true",
                        help="after a failing notebook run the later ones anyway, then exit 1 naming every failure")
    parser.add_argument("--resume", action="store_true",
                        help="skip the notebooks an earlier run in --out-dir finished with the same parameters and "
                             "notebook source (as its timings.json records, with the executed copy there); the "
                             "others run. Changes to the library are not noticed: rerun without --resume after one")
    parser.add_argument("--set", dest="parameters", action="append", default=None, metavar="NAME=VALUE",
                        help="override a notebook parameter in the notebooks that declare it; VALUE is JSON when "
                             "it parses (--set train_processes=4 --set 'seeds=[0]'); repeatable")


def run_from_args(args) -> int:
    """Run :func:`reproduce` from parsed options; 1 (with the notebook and cell named) when a notebook fails,
    2 for a bad option value (named), 130 when interrupted (Ctrl-C or SIGTERM)."""
    from gmmseg_core.config import parse_overrides

    try:
        parameters = parse_overrides(args.parameters)
        bad = [k for k in parameters if not k.isidentifier()]
        if bad:
            raise ValueError(f"--set names a notebook parameter (a Python name), got {bad}")
        reproduce(args.profile, data_root=args.data_root, device=args.device, out_dir=args.out_dir,
                  figures_dir=args.figures_dir, cache_dir=args.cache_dir, notebooks=args.notebooks,
                  threads=args.threads, parameters=parameters or None, keep_going=args.keep_going,
                  resume=args.resume, progress=not args.no_progress)
    except (ValueError, ImportError, OSError) as err:
        print(f"gmmseg reproduce: error: {err}", file=sys.stderr)
        return 2
    except (NotebookExecutionError, NotebooksFailedError) as err:
        print(f"gmmseg reproduce: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:          # Ctrl-C or SIGTERM: the running notebook's kernel is already stopped
        print(f"gmmseg reproduce: interrupted ({err}); trained models so far stay in the cache and a rerun resumes",
              file=sys.stderr)
        return 130
    return 0


def main(argv=None) -> int:
    """``python -m gmmseg_core.reproduce``; exits non-zero (naming the notebook and cell) on failure."""
    parser = argparse.ArgumentParser(prog="gmmseg reproduce", description=reproduce.__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
