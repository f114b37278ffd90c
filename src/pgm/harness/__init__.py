"""Our text models in EleutherAI's lm-evaluation-harness (the optional extra `harness`).

Importing `pgm.harness` registers the harness model `pgm` (`pgm.harness.model`); `evaluate` is
what `pgm harness` runs: the harness on tasks it knows, on YAML tasks of your own (`include`),
and on the two offline tasks built from the built-in corpus (`pgm.harness.tasks`), with the
results JSON written beside the model.
"""

from __future__ import annotations

from ..errors import MissingDependency

try:
    import lm_eval  # noqa: F401
except ImportError:
    raise MissingDependency("the harness needs lm-eval: pip install 'partition-gm[harness]'") from None

import json
from pathlib import Path

from ..errors import ArgumentError
from ..formats import write_atomic
from .model import METHODS, HarnessModel
from .tasks import BUILTIN_TASKS, write_builtin_tasks

__all__ = ["BUILTIN_TASKS", "METHODS", "HarnessModel", "evaluate", "results_path", "write_builtin_tasks"]


def results_path(source: str | Path, tasks: list[str], *, method: str, num_mc: int, limit: int | None) -> Path:
    """Where `evaluate` writes by default: harness/ in the model's directory (a checkpoint file's
    folder), named after the tasks and the settings."""
    name = f"{'+'.join(tasks)}-{method}-mc{num_mc}" + (f"-limit{limit}" if limit else "")
    return harness_folder(source) / f"{name}.json"


def harness_folder(source: str | Path) -> Path:
    """harness/ in the model's directory (a checkpoint file's folder)."""
    source = Path(source)
    return (source if source.is_dir() else source.parent) / "harness"


def evaluate(source, tasks: list[str], *, num_mc: int | None = None, limit: int | None = None,
             method: str = "conditional", batch_size: int = 64, seed: int = 0, num_fewshot: int | None = None,
             include: list[str] = (), output: str | Path | None = None, device: str = "auto",
             weights: str | None = None, precision: str = "auto", gpt2_file: str | None = None,
             bootstrap_iters: int = 1000, progress: bool = True, pipeline=None) -> tuple[dict, Path]:
    """Run the harness's `tasks` on the model at `source` (or an already loaded `pipeline`), and
    write its results JSON (with our settings under "pgm") to `output` or `results_path`.
    `bootstrap_iters`: resamples for the metrics' standard errors (0: none). Returns (results,
    path)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    if not tasks:
        raise ArgumentError("name at least one task (e.g. pgm_lambada)")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ArgumentError(f"limit must be a positive integer, got {limit!r}")
    if isinstance(bootstrap_iters, bool) or not isinstance(bootstrap_iters, int) or bootstrap_iters < 0:
        raise ArgumentError(f"bootstrap_iters must be a non-negative integer, got {bootstrap_iters!r}")
    for folder in include:
        if not Path(folder).is_dir():
            raise ArgumentError(f"--include {folder}: no such folder of task YAML files")
    where = source if pipeline is None else pipeline.run or pipeline.source
    results_folder = Path(output).parent if output is not None else harness_folder(where)
    paths = [str(Path(folder).resolve()) for folder in include]
    if any(task in BUILTIN_TASKS for task in tasks):
        paths.append(str(write_builtin_tasks(results_folder / "tasks")))
    # Indexing the harness's own thousands of task files takes seconds: only when a task needs it.
    manager = TaskManager(include_path=paths, include_defaults=False) if paths else None
    if manager is None or any(task not in manager.all_tasks for task in tasks):
        manager = TaskManager(include_path=paths or None)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ArgumentError(f"the harness knows no task {', '.join(unknown)} (offline: {', '.join(BUILTIN_TASKS)}, or "
                            "YAML tasks of your own with --include FOLDER)")
    model = HarnessModel(str(source) if pipeline is None else None, pipeline=pipeline, num_mc=num_mc, method=method,
                         batch_size=batch_size, seed=seed, device=device, weights=weights, precision=precision,
                         gpt2_file=gpt2_file, progress=progress)
    # Named after the settings the model took (an AR model's exact likelihoods: mc1).
    path = Path(output) if output is not None else results_path(where, tasks, method=method, num_mc=model.num_mc,
                                                                 limit=limit)
    try:
        results = simple_evaluate(model=model, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, log_samples=False, bootstrap_iters=bootstrap_iters,
                                  random_seed=seed)
    except OverflowError:
        raise ArgumentError("a metric overflowed a float (a perplexity of log-likelihoods this low, as whole-sequence "
                            "scores of long contexts give): run without the metrics' standard errors "
                            "(--bootstrap-iters 0)") from None
    results["pgm"] = model.settings
    write_atomic(path, (json.dumps(results, indent=2, default=handle_non_serializable) + "\n").encode())
    return results, path
