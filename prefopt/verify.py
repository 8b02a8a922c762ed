"""Answer checking: the final answer of a model output, verified against a gold answer with math-verify.

An answer equal to the gold after the Qwen2.5-Math harness's normalisation (`prefopt.answers`) is correct at
once; math-verify (huggingface/Math-Verify) does the extraction and the equivalence test (`parse` + `verify`)
for the rest.
Its own timeout uses `signal.alarm`, which only works in a process's main thread, so the checker turns it
off and runs every check in a worker process of its own pool instead: the parent gives each answer
`timeout_s` seconds, and a worker that overruns is killed and replaced, its answer counted as `timeout`.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing as mp
import os
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Literal

from prefopt.answers import last_boxed, last_number, normalize_answer, plain_arithmetic, same_answer, stated_answer
from prefopt.errors import ConfigError

log = logging.getLogger(__name__)

# Workers forked from the fork server (which preloads the main module, see `_context`) re-run the main
# module as `__mp_main__`, and runpy warns that it is already imported; in a worker that is expected.
warnings.filterwarnings("ignore", message=r".*found in sys\.modules after import of package", category=RuntimeWarning)

Status = Literal["correct", "wrong", "no_answer", "timeout", "error"]
STATUSES: tuple[str, ...] = ("correct", "wrong", "no_answer", "timeout", "error")

# Bump when the verdict on an output can change: the cached pairs and accuracies carry it in their keys.
# 2: answers without a box are read as the harness reads them (`unboxed_answer`).
CHECKER_VERSION = 2

# How long a fresh worker may take to import math-verify (sympy) and report ready.
_START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Verdict:
    """The checker's answer for one (output, gold) pair."""

    correct: bool
    status: Status
    extracted: str | None = None


# ----------------------------------------------------------------------------------------------------------
# Extraction


def _parse(text: str, timeout: int | None):
    from math_verify import parse

    return parse(text, parsing_timeout=timeout)


def _parsed_string(parsed: list) -> str | None:
    # math-verify returns [sympy object, matched string] (or [matched string] when sympy parsing failed).
    strings = [p for p in parsed if isinstance(p, str) and p.strip()]
    return strings[-1] if strings else None


def extract_answer(text: str) -> str | None:
    """The final answer of a model output: the content of its last `\\boxed{}`, else `unboxed_answer`'s.

    math-verify's extraction (a last `$...$` expression, `x = 3`, ...) runs in this process: with its signal
    timeout in the main thread, without one elsewhere. None when nothing fits.
    """
    if not isinstance(text, str):
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    return unboxed_answer(text, lambda t: _parse(t, timeout))[0]


def unboxed_answer(text: str, parse: Callable[[str], list] | None = None) -> tuple[str | None, list | None]:
    """The answer of an output without a `\\boxed{}`, and math-verify's parse when that gave it.

    In order: the number after the last "the answer is" (the harness's rule); math-verify's own extraction
    (LaTeX such as `$\\frac{3}{8}$`), unless it is plain numbers joined by operators (`2 + 40`: a restated
    question math-verify would evaluate and credit); else the last number of the output (the harness's
    `use_last_number`). Read by hand on SmolLM2-135M-Instruct's answers (docs/decisions.md#unboxed-answers).
    """
    stated = stated_answer(text)
    if stated is not None:
        return stated, None
    pred = (parse or (lambda t: _parse(t, None)))(text)
    extracted = _parsed_string(pred)
    if extracted is not None and not plain_arithmetic(extracted):
        return extracted, pred
    last = last_number(text)
    if last is not None:
        return last, None
    return None, pred or None  # nothing to read as a string; math-verify's parse (if any) is still checked


def _parse_gold(gold: str) -> list:
    # A bare `\frac{1}{2}` is only LaTeX to math-verify inside math delimiters; a plain number parses
    # either way. Gold that already carries `$` or a box is taken as it is.
    gold = gold.strip()
    if "$" in gold or "\\boxed" in gold or "\\(" in gold or "\\[" in gold:
        candidates = [gold]
    else:
        candidates = [f"${gold}$", f"\\boxed{{{gold}}}", gold]
    for candidate in candidates:
        parsed = _parse(candidate, None)
        if parsed:
            return parsed
    return [gold]  # unparseable: math-verify still compares it as a string


def _verify(gold: str, pred_box: str | None, pred: list | None) -> bool:
    from math_verify import verify

    if pred is None:
        pred = _parse(f"\\boxed{{{pred_box}}}", None) or [pred_box]
    return bool(verify(_parse_gold(gold), pred, timeout_seconds=None))


def check_answer(output: str, gold: str) -> Verdict:
    """Verify one model output against one gold answer: the harness's normalised match, then math-verify.

    The prediction is the last `\\boxed{}` when there is one (math-verify alone would read several boxes
    as a set), else `unboxed_answer`'s. Equal after `normalize_answer`
    (what the Qwen2.5-Math harness strips: `\\$`, `\\!`, thousands commas, units, `^\\circ`, `\\%`, ...) is
    correct at once; otherwise math-verify decides, on the strings as written and, when normalising changed
    them, once more on the normalised strings (a gold `\\$18.90` does not parse, `18.90` does).
    Runs inside the checker's workers (no timeout of its own).
    """
    if not isinstance(output, str) or not output.strip():
        return Verdict(False, "no_answer", None)
    gold = str(gold)
    boxed = last_boxed(output)
    pred: list | None = None
    if boxed is not None:
        extracted: str | None = boxed
    else:
        extracted, pred = unboxed_answer(output)
        if extracted is None and pred is None:
            return Verdict(False, "no_answer", None)
    if extracted is not None and same_answer(extracted, gold):
        return Verdict(True, "correct", extracted)
    correct = _verify(gold, extracted if pred is None else None, pred)
    if not correct and extracted is not None:
        norm_gold, norm_pred = normalize_answer(gold), normalize_answer(extracted)
        if norm_gold and norm_pred and (norm_gold, norm_pred) != (gold.strip(), extracted.strip()):
            correct = _verify(norm_gold, norm_pred, None)
    return Verdict(correct, "correct" if correct else "wrong", extracted)


# ----------------------------------------------------------------------------------------------------------
# The worker pool


CheckFn = Callable[[str, str], Verdict]


def _resolve(check_fn: CheckFn | str) -> CheckFn:
    if callable(check_fn):
        return check_fn
    module, _, name = str(check_fn).partition(":")
    if not name:
        module, _, name = module.rpartition(".")
    return getattr(importlib.import_module(module), name)


class _DropTimeoutDisabledWarning(logging.Filter):
    # Timeouts are disabled on purpose (the parent enforces them); math-verify warns about it once per process.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


def _worker_main(conn, check_fn: CheckFn | str) -> None:
    try:
        for name in ("math_verify.parser", "math_verify.grader", "math_verify.utils", "math_verify"):
            logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())
        fn = _resolve(check_fn)
        import math_verify  # noqa: F401  (import cost is paid before reporting ready, not by the first answer)
    except BaseException as e:  # noqa: BLE001  (reported to the parent, which raises it)
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if task is None:
            return
        index, output, gold = task
        try:
            verdict = fn(output, gold)
            if not isinstance(verdict, Verdict):
                raise TypeError(f"check function returned {type(verdict).__name__}, not Verdict")
            conn.send(("done", index, verdict))
        except Exception as e:  # noqa: BLE001  (one bad answer must not stop the others)
            conn.send(("error", index, f"{type(e).__name__}: {e}"))


class _Worker:
    def __init__(self, ctx, check_fn):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, check_fn), daemon=True)
        self.proc.start()
        child.close()
        self.state = "starting"  # -> "idle" <-> "busy"
        self.since = time.monotonic()
        self.index: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def _context(start_method: str | None):
    main = sys.modules.get("__main__")
    main_file = getattr(main, "__file__", None)
    if start_method is None:
        start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        if main_file and not os.path.isfile(main_file) and "fork" in mp.get_all_start_methods():
            start_method = "fork"  # `python - < script`: a fresh worker could not re-import the main module
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        # Import math-verify (and whatever the main module imports) once in the fork server, so each
        # worker forked from it starts in milliseconds; without the main module here, every worker
        # would re-import it (torch, transformers) to restore `__mp_main__`.
        preload = ["math_verify", "prefopt.verify"]
        name = getattr(getattr(main, "__spec__", None), "name", None)
        if name and not name.endswith("__main__"):
            preload.insert(0, name)
        elif main_file:
            preload.insert(0, "__main__")
        ctx.set_forkserver_preload(preload)
    return ctx


class AnswerChecker:
    """Checks many (output, gold) pairs with math-verify in worker processes, each with a timeout.

    `timeout_s` bounds one answer's extraction + verification; an answer over it is wrong with status
    `timeout`, and its worker is killed and replaced. `check_fn` (a picklable callable or "module:name")
    replaces `check_answer` in the workers, for tests. Use as a context manager or call `close()`.
    """

    def __init__(
        self,
        timeout_s: float = 5.0,
        workers: int | None = None,
        check_fn: CheckFn | str = check_answer,
        start_method: str | None = None,
    ):
        if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not timeout_s > 0:
            raise ConfigError(f"verify timeout_s must be a number > 0 seconds, got {timeout_s!r}")
        if workers is None:
            workers = _default_workers()
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ConfigError(f"verify workers must be an integer >= 1, got {workers!r}")
        self.timeout_s = float(timeout_s)
        self.num_workers = workers
        self.check_fn = check_fn
        self.start_method = start_method
        self.timeouts = 0  # answers over the timeout so far (each cost a worker)
        self._ctx = None
        self._workers: list[_Worker] = []
        self._lock = threading.RLock()

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> AnswerChecker:
        with self._lock:
            if not self._workers:
                self._ctx = self._ctx or _context(self.start_method)
                self._workers = [_Worker(self._ctx, self.check_fn) for _ in range(self.num_workers)]
        return self

    def close(self) -> None:
        with self._lock:
            for w in self._workers:
                try:
                    if w.state != "busy" and w.proc.is_alive():
                        w.conn.send(None)
                except OSError:
                    pass
            for w in self._workers:
                if w.state != "busy":  # a busy worker is only left by an interrupted call: no need to wait
                    w.proc.join(timeout=1)
                w.kill()
            self._workers = []

    def __enter__(self) -> AnswerChecker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass

    # -- checking ------------------------------------------------------------------------------------------
    def check(self, output: str, gold: str) -> Verdict:
        return self.check_many([output], [gold])[0]

    def check_many(self, outputs: Sequence[str], golds: Sequence[str]) -> list[Verdict]:
        """One Verdict per (output, gold), in order."""
        outputs, golds = list(outputs), list(golds)
        if len(outputs) != len(golds):
            raise ValueError(f"check_many got {len(outputs)} outputs but {len(golds)} gold answers")
        if not outputs:
            return []
        self.start()
        with self._lock:
            try:
                return self._run(outputs, golds)
            except BaseException:
                self.close()  # workers may hold answers of this call; the next call starts fresh ones
                raise

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self._ctx, self.check_fn)

    def _run(self, outputs: list[str], golds: list[str]) -> list[Verdict]:
        results: list[Verdict | None] = [None] * len(outputs)
        pending = deque(range(len(outputs)))
        remaining = len(outputs)
        while remaining:
            now = time.monotonic()
            for w in self._workers:
                if w.state == "idle" and pending:
                    index = pending.popleft()
                    try:
                        w.conn.send((index, outputs[index], golds[index]))
                    except OSError:  # it died while idle: the answer goes to another worker
                        pending.appendleft(index)
                        self._replace(w)
                        continue
                    w.state, w.index, w.deadline = "busy", index, now + self.timeout_s
            deadlines = [w.deadline for w in self._workers if w.state == "busy"]
            deadlines += [w.since + _START_TIMEOUT_S for w in self._workers if w.state == "starting"]
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            ready = wait([w.conn for w in self._workers if w.state != "idle"], timeout)
            for w in list(self._workers):
                if w.conn not in ready:
                    continue
                try:
                    msg = w.conn.recv()
                except (EOFError, OSError):  # the worker died (out of memory, a crash in sympy's C code)
                    if w.state == "starting":
                        raise RuntimeError(f"answer-checker worker {w.proc.pid} died while starting") from None
                    assert w.index is not None  # a busy worker: the starting ones raised above
                    log.warning("answer-checker worker %s died on answer %d", w.proc.pid, w.index)
                    results[w.index] = Verdict(False, "error", None)
                    remaining -= 1
                    self._replace(w)
                    continue
                if msg[0] == "ready":
                    w.state = "idle"
                elif msg[0] == "failed":
                    raise RuntimeError(f"answer-checker worker could not start: {msg[1]}")
                else:
                    kind, index, payload = msg
                    if kind == "error":
                        log.warning("answer check %d failed: %s", index, payload)
                        payload = Verdict(False, "error", None)
                    results[index] = payload
                    remaining -= 1
                    w.state, w.index = "idle", None
            now = time.monotonic()
            for w in list(self._workers):
                if w.state == "busy" and now >= w.deadline:
                    assert w.index is not None  # busy workers have an answer
                    results[w.index] = Verdict(False, "timeout", None)
                    remaining -= 1
                    self.timeouts += 1
                    self._replace(w)
                elif w.state == "starting" and now >= w.since + _START_TIMEOUT_S:
                    raise RuntimeError(f"answer-checker worker did not start within {_START_TIMEOUT_S:.0f} s")
        return results  # type: ignore[return-value]
