"""The report's W&B source: a group's runs through the public API, as `RunRecord`s like local run directories.

`wandb:ENTITY/PROJECT/GROUP` reads `wandb.Api().runs("ENTITY/PROJECT", filters={"group": GROUP})`: each run's
`summary` (final values), `history()` (curves against `step`) and `config` (the resolved config, flattened; the
keys whose values differ between runs become the table's columns, as Hydra overrides do for directories).
"""

from __future__ import annotations

from typing import Any

from prefopt.reporting.runs import ReportError, RunRecord, to_number


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        elif not (name.endswith("_target_") or name.endswith(".fn")):
            out[name] = str(value)
    return out


def read_wandb(spec: str, timeout: int = 30) -> list[RunRecord]:
    """The runs of `wandb:ENTITY/PROJECT/GROUP` through the W&B public API."""
    parts = spec.removeprefix("wandb:").strip("/").split("/")
    if len(parts) != 3 or not all(parts):
        raise ReportError(f"expected wandb:ENTITY/PROJECT/GROUP, got {spec!r}")
    entity, project, group = parts
    try:
        import wandb

        api = wandb.Api(timeout=timeout)
        runs = list(api.runs(f"{entity}/{project}", filters={"group": group}))
        records = [_wandb_record(run, f"{entity}/{project}") for run in runs]
    except Exception as exc:  # noqa: BLE001 - network, auth, API changes: one line, not a traceback
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ReportError(f"cannot read W&B group {entity}/{project}/{group}: {type(exc).__name__}: {first}") from None
    if not records:
        raise ReportError(f"W&B group {entity}/{project}/{group} has no runs")
    return records


def _wandb_record(run: Any, project_path: str) -> RunRecord:
    final = {}
    for key, value in dict(run.summary).items():
        if isinstance(value, dict):  # a define_metric summary: {"last": .., "max": ..}
            value = value.get("last")
        v = to_number(value)
        if v is not None and not key.startswith("_"):
            final[key] = v
    history: dict[str, list[tuple[int, float]]] = {}
    for row in run.history(samples=100_000, pandas=False):
        step = row.get("step", row.get("_step"))
        for key, value in row.items():
            v = to_number(value)
            if step is not None and v is not None and not key.startswith("_") and key != "step":
                history.setdefault(key, []).append((int(step), v))
    for points in history.values():
        points.sort()
    config = dict(run.config)
    status = {"finished": "complete"}.get(run.state, run.state)
    step = final.pop("step", None)
    return RunRecord(
        name=run.name,
        source=f"wandb:{project_path}/{run.id}",
        status=status,
        step=int(step) if step is not None else None,
        loss=(config.get("loss") or {}).get("key") if isinstance(config.get("loss"), dict) else None,
        overrides=_flatten(config),
        final=final,
        history=history,
        wall_time_s=to_number(dict(run.summary).get("_runtime")),
    )
