"""`gptoss eval --tasks`: lm-evaluation-harness tasks on gptoss runs, in this process, saved into each run.

    run_tasks(targets, tasks, ...) -> one lm-eval results dict per run or checkpoint, in the order given

Tasks are lm-eval's: its built-in ones (HellaSwag, ARC, MMLU, ...; their data comes from the Hugging Face
hub or its local cache, docs/eval.md) and YAML tasks in --include-path folders. Each run is loaded the one
way (run/open.py's load_run: its dtype and transforms apply) and wrapped as an lm-eval model
(harness_lm.py); lm-eval's `simple_evaluate` builds the requests, asks the model and computes the metrics,
so the numbers are computed exactly as for any other model lm-eval evaluates.

The results are lm-eval's results dict (results, groups, configs, versions, n-shot, higher_is_better,
n-samples, config ...) plus a "gptoss" record (run, checkpoint, step, options, timing), saved as
RUN/eval/tasks/<checkpoint>-<digest>/results.json, where the digest names the tasks and options, so
rerunning the same evaluation replaces it; with log_samples also samples_<task>.jsonl, one line per
document with its requests' responses (per-item log-likelihoods). The folder is written whole or not at
all. lm-eval is an optional extra: without it this module says how to install it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..atomic import staged_directory
from ..errors import GptossError
from ..run.layout import TASK_RESULTS, RunDir
from .evaluator import Progress, Target

FORMAT = 1
INSTALL_HINT = "install the eval extra: uv sync --extra eval (or pip install 'gptoss[eval]')"


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise GptossError(f"gptoss eval --tasks needs lm-evaluation-harness (lm-eval): {INSTALL_HINT}") from None


def task_names(specs: list[str]) -> list[str]:
    """--tasks a,b --tasks c -> [a, b, c] (order kept, repeats dropped)."""
    names = [n.strip() for spec in specs for n in spec.split(",")]
    if not names or any(not n for n in names):
        raise GptossError("--tasks takes task names, e.g. --tasks hellaswag,arc_easy (an empty name was given)")
    return list(dict.fromkeys(names))


def check_task_options(limit: int | None, num_fewshot: int | None, batch_size: int, include_path: Path | None) -> None:
    if limit is not None and limit <= 0:
        raise GptossError(f"--limit must be > 0, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise GptossError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    if batch_size <= 0:
        raise GptossError(f"--batch-size must be > 0, got {batch_size}")
    if include_path is not None and not Path(include_path).is_dir():
        raise GptossError(f"--include-path {include_path} is not a directory (it holds task YAML files)")


def task_manager(names: list[str], include_path: Path | None):
    """lm-eval's TaskManager that knows every name. Indexing lm-eval's ~15,000 built-in task files takes
    seconds, so tasks that all come from --include-path are found there alone."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(local.match_tasks([n]) for n in names):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [n for n in names if not manager.match_tasks([n])]
    if unknown:
        where = f" or under --include-path {include_path}" if include_path is not None else ""
        raise GptossError(
            f"unknown lm-eval task {', '.join(unknown)}: not one of lm-eval's tasks{where} "
            "(lm-eval ls tasks lists them; a task of your own is a YAML file in an --include-path folder)"
        )
    return manager


def load_tasks(manager, names: list[str]) -> list:
    """The named tasks, groups and tags, built (their documents loaded): a task whose data cannot be had
    fails here, before any model is loaded."""
    built = []
    for name in manager.match_tasks(names):
        try:
            loaded = manager.load([name])
        except Exception as err:  # datasets and lm-eval raise many kinds; the first line says what went wrong
            first = (str(err).strip().splitlines() or [""])[0]
            raise GptossError(
                f"lm-eval task {name}: its data could not be loaded ({type(err).__name__}: {first}); "
                "lm-eval reads task data from the Hugging Face hub or its local cache, see docs/eval.md"
            ) from None
        group = loaded["groups"].get(name)
        built.extend([group] if group is not None else loaded["tasks"].values())
    return built


def evaluation_digest(names: list[str], include_path: Path | None, limit: int | None, num_fewshot: int | None) -> str:
    """Names one evaluation of one checkpoint: the same tasks and options give the same folder."""
    key = {
        "tasks": sorted(names),
        "include_path": str(Path(include_path).resolve()) if include_path is not None else None,
        "limit": limit,
        "num_fewshot": num_fewshot,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def run_tasks(
    targets: list[Target],
    tasks: list[str],
    *,
    include_path: Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    log_samples: bool = False,
    progress: Progress | None = None,
    save: bool = True,
    warn: Callable[[str], None] = lambda message: None,
) -> list[dict[str, Any]]:
    """Evaluate every target on the lm-eval `tasks` (see the module docstring)."""
    names = task_names(tasks)
    check_task_options(limit, num_fewshot, batch_size, include_path)
    require_lm_eval()
    from ..run.open import load_run
    from .harness_lm import GptossLM

    _quiet()
    progress = progress or Progress()
    manager = task_manager(names, include_path)
    results = []
    for target in targets or [Target()]:
        built = load_tasks(manager, names)
        loaded = load_run(target.run, target.checkpoint, device, dtype)
        label = f"{loaded.run.name}/{loaded.checkpoint.name}"
        lm = GptossLM(loaded, batch_size=batch_size, progress=_stages(progress, label))
        start = time.perf_counter()
        try:
            out = _evaluate(lm, built, manager, limit=limit, num_fewshot=num_fewshot, log_samples=log_samples)
        finally:
            progress.done()
        out["gptoss"] = {
            "format": FORMAT,
            "name": label,
            "run": str(loaded.run),
            "checkpoint": str(loaded.checkpoint),
            "step": loaded.step,
            "tasks": names,
            "include_path": str(include_path) if include_path is not None else None,
            "limit": limit,
            "num_fewshot": num_fewshot,
            "batch_size": batch_size,
            "device": loaded.device.type,
            "dtype": loaded.dtype_name,
            "elapsed_s": time.perf_counter() - start,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if save:
            digest = evaluation_digest(names, include_path, limit, num_fewshot)
            out["gptoss"]["saved"] = _save(loaded.run, f"{loaded.checkpoint.name}-{digest}", out, warn)
        results.append(out)
        del loaded, lm  # one model at a time
    return results


def _evaluate(lm, built: list, manager, *, limit: int | None, num_fewshot: int | None, log_samples: bool) -> dict:
    """lm-eval's own evaluation of `lm` on the built tasks (its default seeds, so runs repeat exactly)."""
    from lm_eval import simple_evaluate

    return simple_evaluate(
        model=lm,
        tasks=built,
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=lm.batch_size,
        log_samples=log_samples,
    )


def _quiet() -> None:
    """lm-eval and datasets report every step (INFO lines, progress bars); our progress bar says enough,
    and their warnings still show."""
    import logging

    import datasets

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    datasets.disable_progress_bars()


def _stages(progress: Progress, label: str) -> Callable[[str, int], Callable[[int], None]]:
    """The model's progress hook: each request type it is asked for gets a bar of its own."""

    def start(kind: str, total: int) -> Callable[[int], None]:
        progress.done()
        progress.start(f"{label} {kind}", total)
        return progress.advance

    return start


def _save(run: RunDir, name: str, out: dict, warn: Callable[[str], None]) -> str | None:
    """RUN/eval/tasks/NAME/results.json (+ samples_<task>.jsonl), written whole; a run directory we cannot
    write to costs a warning, not the numbers."""
    from lm_eval.utils import handle_non_serializable

    folder = run.eval_tasks / name
    samples = out.pop("samples", None) or {}
    try:
        with staged_directory(folder, force=True, flag="eval folder") as tmp:
            text = json.dumps(out, indent=1, default=handle_non_serializable, ensure_ascii=False)
            (tmp / TASK_RESULTS).write_text(text, encoding="utf-8")
            for task, docs in samples.items():
                lines = (json.dumps(d, default=handle_non_serializable, ensure_ascii=False) for d in docs)
                (tmp / f"samples_{task}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    except (OSError, GptossError) as err:
        warn(f"could not save the results to {folder} ({getattr(err, 'strerror', None) or err})")
        return None
    finally:
        if samples:
            out["samples"] = samples
    return str(folder / TASK_RESULTS)
