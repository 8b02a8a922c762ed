"""The loop's cached stages behind one interface: `key` names a result, `run` makes it, `cached` does it once.

A stage's result lives at `<mathloop.cache_dir>/<stage>/<key>`, the key being a sha256 of everything that made it,
so a second run, or every run of a sweep, reuses it. `Stage.cached` holds the logic every stage shares: reuse a
complete entry (one that has its record file); else take the entry's lock (concurrent runs wait instead of
computing twice), look again, build under a temporary name and rename it into place. With
`mathloop.cache=false` the stage builds into the run directory and nothing is read from or written to the cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefopt.io import atomic_write_text, cache_key, locked, replace_dir
from prefopt.mathloop.fingerprints import data_fingerprint, optimizer_fingerprint, spec_fingerprint
from prefopt.mathloop.stages.sampling import provenance_path
from prefopt.verify import CHECKER_VERSION

log = logging.getLogger("prefopt")

CACHE_VERSION = 1  # bump when a stage's code changes what it produces for the same config


def stage_key(stage: str, payload: dict) -> str:
    """The cache key of `stage`'s result made from `payload` (everything that determines it)."""
    return cache_key({"stage": stage, "version": CACHE_VERSION, **payload})


@dataclass
class Cached:
    """A stage's result: where it is, whether it came from the cache, and what `run` returned if it ran here."""

    path: Path
    reused: bool
    made: Any = None


class Stage:
    """One cached stage of the loop (`loop`: the `MathLoop` whose settings it reads)."""

    name = ""  # its folder under mathloop.cache_dir
    label = ""  # its name in the log
    record = ""  # the file written last into an entry: an entry that has it is complete
    every_rank = False  # every process runs it (it trains through the engine), else the main process alone
    collective = True  # every process calls `cached` (a barrier follows the build); false: the main process only
    staged = True  # built under a temporary name and renamed into place; false: the entry's own atomic writes

    def __init__(self, loop):
        self.loop = loop

    def key(self, *inputs) -> str:
        raise NotImplementedError

    def run(self, *inputs) -> Any:
        """Make the stage's result into the entry directory (or file) given last; returns what the caller needs."""
        raise NotImplementedError

    def entry(self, key: str) -> Path:
        return Path(self.loop.switches.cache_dir) / self.name / key

    def done(self, entry: Path) -> Path:
        return entry / self.record

    def cached(self, key: str, make: Callable[[Path], Any], hardware, local: Path) -> Cached:
        """The entry of `key`, reused when complete, else made by `make(directory)` once (under the entry's lock);
        without a cache, `make(local)` in the run directory."""
        if not self.loop.switches.cache:
            made = self._make(make, local, hardware)
            if self.collective:
                hardware.barrier()
            return Cached(local, False, made)
        entry = self.entry(key)
        if self.done(entry).is_file():
            log.info("%s: reusing the cached %s", self.label, entry)
            return Cached(entry, True)
        with locked(entry) if hardware.is_main else contextlib.nullcontext():
            if self.done(entry).is_file():  # another run finished it meanwhile
                return Cached(entry, True)
            build = entry.with_name(f".{key}.build") if self.staged else entry
            made = self._make(make, build, hardware)
            if hardware.is_main and self.staged:
                replace_dir(build, entry)
            if self.collective:
                hardware.barrier()
        return Cached(entry, False, made)

    def _make(self, make: Callable[[Path], Any], out: Path, hardware) -> Any:
        return make(out) if self.every_rank or hardware.is_main else None


class WarmupStage(Stage):
    """The SFT warm-up (prefopt.mathloop.stages.warmup): `<key>/policy` and `warmup.json`."""

    name, label, record, every_rank = "warmup", "warm-up", "warmup.json", True

    def key(self, spec, data) -> str:
        loop = self.loop
        return stage_key(
            "warmup",
            {
                "model": spec_fingerprint(spec),
                "data": data_fingerprint(data, training=True),
                "tokenize": loop.tokenize,
                "warmup": {**vars(loop.warmup), "progress": None},
                "optimizer": optimizer_fingerprint(loop.optimizer_factory),
                "max_grad_norm": loop.max_grad_norm,
            },
        )

    def run(self, key: str, spec, data, hardware, out: Path):
        """Train into out (resumable from its checkpoints), the policy to out/policy; (model, tokenizer, result)."""
        t0 = time.perf_counter()
        model, tokenizer, result = self.loop.run_warmup(spec, data, hardware, out)
        if hardware.is_main:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            shutil.rmtree(out / "policy", ignore_errors=True)
            (out / "final").rename(out / "policy")
            record = {
                "key": key,
                "seconds": time.perf_counter() - t0,
                "metrics": result["metrics"],
                "model": spec_fingerprint(spec),
                "warmup": vars(self.loop.warmup),
            }
            atomic_write_text(out / self.record, json.dumps(record, indent=2, default=str))
        return model, tokenizer, result


class PairsStage(Stage):
    """On-policy pairs (prefopt.mathloop.stages.sampling): `<key>.jsonl` and its provenance, written last."""

    name, label, staged = "pairs", "pairs", False

    def key(self, spec, problems_id: Any) -> str:
        loop = self.loop
        render = {k: loop.tokenize[k] for k in ("chat_template", "system_prompt", "user_suffix") if k in loop.tokenize}
        return stage_key(
            "pairs",
            {
                "policy": spec_fingerprint(spec),
                "problems": problems_id,
                "render": render,
                "pairs": loop.pairs.fingerprint(),
                "max_new_tokens": loop.generation.max_new_tokens,
                "top_p": loop.generation.top_p,
                "verify_timeout_s": loop.verify.timeout_s,
                "checker": CHECKER_VERSION,
                **stop_tokens(loop),
            },
        )

    def entry(self, key: str) -> Path:
        return Path(self.loop.switches.cache_dir) / self.name / f"{key}.jsonl"

    def done(self, entry: Path) -> Path:
        return provenance_path(entry)

    def run(self, loaded, spec, data, hardware, problems, out: Path) -> dict:
        model, tokenizer = loaded or self.loop.load(spec, hardware)
        return self.loop.run_pairs(model, tokenizer, spec, data, out, problems)


def stop_tokens(loop) -> dict:
    """The generation's stop words, part of a key only when set (keys made without them stay valid)."""
    stops = list(getattr(loop.generation, "stop_tokens", None) or [])
    return {"stop_tokens": stops} if stops else {}


class EvalStage(Stage):
    """The starting policy's verified accuracy (prefopt.mathloop.stages.verification): per-sample files and
    `result.json`. Only the main process evaluates."""

    name, label, record, collective = "eval", "verified accuracy", "result.json", False

    def key(self, spec, data, prefix: str) -> str:
        loop = self.loop
        return stage_key(
            "eval",
            {
                "policy": spec_fingerprint(spec),
                "evaluation": loop.evaluation.fingerprint(),
                "problems": loop.problem_source(data).fingerprint(),
                "prefix": prefix,
                "max_new_tokens": loop.generation.max_new_tokens,
                "verify_timeout_s": loop.verify.timeout_s,
                "checker": CHECKER_VERSION,
                **stop_tokens(loop),
            },
        )

    def run(self, loaded, spec, data, hardware, prefix: str, out: Path) -> tuple[dict, dict]:
        out.mkdir(parents=True, exist_ok=True)
        model, tokenizer = loaded or self.loop.load(spec, hardware)
        metrics, details = self.loop.run_eval(model, tokenizer, spec, data, out, prefix)
        atomic_write_text(out / self.record, json.dumps({"metrics": metrics, "details": details}, indent=2))
        return metrics, details
