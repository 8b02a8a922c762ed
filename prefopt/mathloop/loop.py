"""The verified-math loop around a preference run: warm-up → on-policy pairs → (training) → verified accuracy.

`prefopt.training.train` calls `MathLoop.prepare` before preference training and `MathLoop.verify_after` at
its end; the entry points `prefopt.sft`, `prefopt.pairs` and `prefopt.evaluate` run one stage each. The
warm-up policy, the pairs and the accuracy of the starting policy are cached under
`<mathloop.cache_dir>/{warmup,pairs,eval}/<key>`, the key being a sha256 of everything that made them,
so a second run, or every run of a sweep, reuses them. Each stage is a `prefopt.mathloop.stages.stage.Stage`
(`key`, `run`, and the shared `cached`): entries appear atomically (built under a temporary name, then renamed)
and concurrent runs wait on a lock file instead of computing twice.
"""

from __future__ import annotations

import atexit
import gc
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefopt.ches_scores import score_pair_rows
from prefopt.data.arith import ArithmeticData
from prefopt.data.batching import render_prompt, tokenize_pairs
from prefopt.data.sources import FileData
from prefopt.errors import ConfigError, DataError
from prefopt.generate import GenerationConfig, HFGenerator, VLLMGenerator, choose_backend
from prefopt.mathloop.fingerprints import data_fingerprint, weights_id, with_weights
from prefopt.mathloop.judging.pairwise import greedy_answers, judge_prompts, judged_evaluation, reference_answers
from prefopt.mathloop.labelers import LabelContext, VerifierLabeler
from prefopt.mathloop.policy_kl import kl_estimator
from prefopt.mathloop.reward.bradley_terry import RewardConfig
from prefopt.mathloop.stages.reward_training import cached_reward
from prefopt.mathloop.stages.sampling import PairsConfig, sample_pairs, write_pairs
from prefopt.mathloop.stages.stage import EvalStage, PairsStage, WarmupStage
from prefopt.mathloop.stages.verification import EvalConfig, benchmark_rows, evaluate_policy
from prefopt.mathloop.stages.warmup import WarmupConfig, warm_up
from prefopt.merge import trained_weights
from prefopt.models import ModelSpec, load_model, load_tokenizer
from prefopt.stats import StatsError, preservation_metrics, read_benchmarks
from prefopt.tokenizer import save_tokenizer
from prefopt.verify import AnswerChecker

log = logging.getLogger("prefopt")


@dataclass
class MathLoopConfig:
    """`mathloop:` in conf/mathloop.yaml: which stages of the loop run around preference training."""

    warmup: bool = True  # SFT the starting policy on the data's chosen responses first
    pairs: bool = True  # train on on-policy pairs sampled from the starting policy instead of `data`'s pairs
    evaluate: bool = True  # verified accuracy before and after preference training (evaluation.*)
    cache_dir: str = "outputs/cache"
    cache: bool = True  # false: compute every stage afresh, read and write no cache
    reward: bool = (
        False  # train the tiny reward model after the warm-up (prefopt.mathloop.stages.reward_training, cached)
    )


@dataclass
class VerifyConfig:
    """`verify:`: the math-verify answer checker (a worker pool, per-answer timeout)."""

    timeout_s: float = 5.0
    workers: int | None = None  # null: one per CPU core, at most 8


@dataclass
class Prepared:
    """What preference training starts from once the stages before it ran (or came from the cache)."""

    model: ModelSpec
    data: Any
    source: Any = None  # the configured data source (before pairs replace it): its held-out problems are `arith`
    metrics: dict = field(default_factory=dict)  # eval/verified_before/*
    verified: dict = field(default_factory=dict)  # per benchmark: accuracy and counts (no_answer, timeout, ...)
    info: dict = field(default_factory=dict)  # per stage: key, path, cached, counts


# ------------------------------------------------------------------------------------------------------
# Helpers


_CHECKERS: dict[tuple, Any] = {}
_VLLM: dict[str, Any] = {}  # vLLM engines by weights path: building one takes a while and holds GPU memory


def answer_checker(config: VerifyConfig):
    """One AnswerChecker per setting and process: the runs of a local sweep share its worker pool."""
    key = (config.timeout_s, config.workers)
    if key not in _CHECKERS:
        _CHECKERS[key] = AnswerChecker(timeout_s=config.timeout_s, workers=config.workers)
    return _CHECKERS[key]


@atexit.register
def _close_checkers() -> None:
    for checker in _CHECKERS.values():
        checker.close()
    _CHECKERS.clear()


def release_engines(path: str | None = None) -> None:
    """Drop the vLLM engine on `path` (every engine when None) and give its GPU memory back."""
    for key in [k for k in _VLLM if path is None or k == str(path)]:
        del _VLLM[key]
    gc.collect()
    _release_memory()


def _device_of(model) -> torch.device:
    """Where the policy's weights are (the reward model is put beside them)."""
    return next(model.parameters()).device if model is not None else torch.device("cpu")


def _release_memory() -> None:
    """After the stages: their model copies are gone; give their GPU memory back before training."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class MathLoop:
    """The verified-math loop: its config as plain objects (built by `prefopt.compose`) and its stages."""

    switches: MathLoopConfig
    warmup: WarmupConfig
    pairs: PairsConfig
    evaluation: EvalConfig
    generation: GenerationConfig
    verify: VerifyConfig
    tokenize: dict  # tokenize_pairs' max_length, max_prompt_length, chat_template, system_prompt
    optimizer_factory: Callable
    max_grad_norm: float | None = 1.0
    chunk_elements: int | None = None
    policy: str | None = None  # start from these saved weights instead of the model's own
    reward: RewardConfig | None = None  # the reward stage's schedule (`reward:`), run when mathloop.reward

    def checker(self):
        return answer_checker(self.verify)

    # -- building blocks ------------------------------------------------------------------------------
    def start_spec(self, spec: ModelSpec) -> ModelSpec:
        return with_weights(spec, self.policy) if self.policy else spec

    def load(self, spec: ModelSpec, hardware):
        tokenizer = load_tokenizer(spec)
        model = load_model(spec, vocab_size=len(tokenizer)).to(hardware.torch_device)
        return model, tokenizer

    def render(self, tokenizer, problem: str) -> str:
        """A problem as the preference run renders its prompts (so pair samples are on-policy for it)."""
        return render_prompt(
            tokenizer,
            problem,
            self.tokenize["chat_template"],
            self.tokenize["system_prompt"],
            self.tokenize.get("user_suffix"),
        )

    def generator(self, model, tokenizer, spec: ModelSpec):
        """HF generate on `model`, or a vLLM engine on the weights `spec` names (one engine per weights, reused)."""
        saved = spec.name_or_path
        if choose_backend(self.generation, saved) == "vllm":
            assert saved is not None  # vLLM is chosen only for weights on disk
            if saved not in _VLLM:
                release_engines()  # one engine at a time: each holds its share of the GPU's memory
                _VLLM[saved] = VLLMGenerator(saved, tokenizer, self.generation, spec.completion_eos, dtype=spec.dtype)
            return _VLLM[saved]
        return HFGenerator(model, tokenizer, self.generation, spec.completion_eos)

    @staticmethod
    def problem_source(data):
        """Where generated problems come from: the run's arithmetic data, else the arithmetic defaults."""
        return data if hasattr(data, "problem_rows") else ArithmeticData()

    def pair_problems(self, data) -> tuple[list[dict], Any]:
        """(rows, fingerprint) of the problems pairs are sampled on."""
        spec = self.pairs.problems()
        if spec is not None:
            return spec.load(), [vars(spec), data_fingerprint(spec)]
        source = self.problem_source(data)
        rows = source.problem_rows("pairs")
        return (rows[: self.pairs.limit] if self.pairs.limit is not None else rows), source.fingerprint()

    def benchmarks(self, data) -> list:
        specs = self.evaluation.specs()
        source = self.problem_source(data)
        generated = {
            name: source.problem_rows(split)
            for name, split in (("arith", "eval"), ("arith_val", "val"))
            if any(s.name == name for s in specs)
        }
        return [(spec, benchmark_rows(spec, generated)) for spec in specs]

    # -- warm-up ----------------------------------------------------------------------------------------
    def run_warmup(self, spec: ModelSpec, data, hardware, out_dir: Path, run_log=None):
        """SFT from `spec` on `data`'s chosen responses; the policy (weights + tokenizer) goes to out_dir/final."""
        model, tokenizer = self.load(spec, hardware)
        # the SFT set: a data source may give its warm-up targets of their own (ArithmeticData.sft_load: noisy ones)
        train_rows, eval_rows, _ = data.sft_load() if hasattr(data, "sft_load") else data.load()
        args = dict(self.tokenize, completion_eos=spec.completion_eos)
        train_pairs, _ = tokenize_pairs(train_rows, tokenizer, **args)
        eval_pairs, _ = tokenize_pairs(eval_rows, tokenizer, **args)
        result = warm_up(
            model,
            train_pairs,
            eval_pairs,
            tokenizer.pad_token_id,
            self.warmup,
            self.optimizer_factory,
            hardware,
            out_dir,
            max_grad_norm=self.max_grad_norm,
            chunk_elements=self.chunk_elements,
            run_log=run_log,
        )
        trainer = result.pop("trainer")
        if getattr(spec, "uses_lora", False):  # later stages load full weights: merge the adapters in
            if getattr(hardware, "strategy", "none") == "fsdp":
                raise ConfigError(
                    "a warm-up with LoRA under FSDP cannot export merged weights; warm up without "
                    "LoRA (model.lora.r=0) or with mathloop.warmup=false and policy=DIR"
                )
            if hardware.is_main:
                model = model.merge_and_unload()
                model.save_pretrained(out_dir / "final", safe_serialization=True)
            hardware.barrier()
        else:
            trainer.export(out_dir / "final")
        if hardware.is_main:
            save_tokenizer(tokenizer, out_dir / "final")
        model.eval()
        return model, tokenizer, result

    def cached_warmup(self, spec: ModelSpec, data, hardware, run_dir: Path) -> tuple[ModelSpec, dict, Any]:
        """(spec of the warmed-up policy, info, (model, tokenizer) when it was trained in this process).

        With `mathloop.cache=false` the warm-up goes to `run_dir/warmup` and no cache entry is read or written.
        """
        stage = WarmupStage(self)
        key = stage.key(spec, data)
        t0 = time.perf_counter()
        got = stage.cached(key, lambda out: stage.run(key, spec, data, hardware, out), hardware, run_dir / "warmup")
        policy = with_weights(spec, got.path / "policy")
        info = {"key": key, "path": str(got.path), "cached": got.reused}
        if got.reused:
            return policy, info, None
        model, tokenizer, result = got.made
        log.info(
            "warm-up: %d steps in %.0f s, final train loss %.4f -> %s",
            self.warmup.steps,
            time.perf_counter() - t0,
            result["metrics"].get("train/loss", float("nan")),
            got.path,
        )
        return policy, info, (model, tokenizer)

    # -- pairs ------------------------------------------------------------------------------------------
    def run_pairs(self, model, tokenizer, spec: ModelSpec, data, path: Path, problems=None) -> dict:
        """Sample, verify and write pairs to `path` (+ provenance); returns the provenance record."""
        rows, problems_id = problems or self.pair_problems(data)
        prompts = [self.render(tokenizer, r["problem"]) for r in rows]
        t0 = time.perf_counter()
        labeler = self.pairs.labeler or VerifierLabeler()
        context = LabelContext(
            checker=lambda: answer_checker(self.verify),
            device=_device_of(model),
            seed=self.pairs.seed,
            max_pairs_per_prompt=self.pairs.max_pairs_per_prompt,
        )
        pairs, stats, extra = sample_pairs(
            self.generator(model, tokenizer, spec), rows, prompts, self.pairs, labeler, context
        )
        summary = extra.pop("summary")
        if self.pairs.ches:  # CHES under the policy that sampled them, the preference run's reference
            extra["ches"] = score_pair_rows(
                model, tokenizer, pairs, {**self.tokenize, "completion_eos": spec.completion_eos}
            )
        provenance = {
            "policy": weights_id(spec),
            "labeler": labeler.fingerprint(),
            "k": self.pairs.k,
            "temperature": self.pairs.temperature,
            "top_p": self.generation.top_p,
            "seed": self.pairs.seed,
            "max_new_tokens": self.generation.max_new_tokens,
            "max_pairs_per_prompt": self.pairs.max_pairs_per_prompt,
            "problems": problems_id,
            "verify_timeout_s": self.verify.timeout_s,
            "seconds": time.perf_counter() - t0,
            **extra,
        }
        write_pairs(path, pairs, provenance, stats)
        log.info("pairs: %s, %d samples each -> %s", summary, self.pairs.k, path)
        return {**provenance, "num_pairs": stats.pairs, "counts": stats.as_dict()}

    def cached_pairs(self, spec: ModelSpec, loaded, data, hardware, run_dir: Path) -> tuple[Path, dict]:
        """The pairs file of `spec`'s samples (cached; with `mathloop.cache=false`, run_dir/pairs.jsonl)."""
        stage = PairsStage(self)
        problems = self.pair_problems(data)
        key = stage.key(spec, problems[1])
        got = stage.cached(
            key, lambda out: stage.run(loaded, spec, data, hardware, problems, out), hardware, run_dir / "pairs.jsonl"
        )
        record = json.loads(stage.done(got.path).read_text())
        return got.path, {
            "key": key,
            "path": str(got.path),
            "cached": got.reused,
            "num_pairs": record.get("num_pairs"),
            "counts": record.get("counts"),
        }

    # -- evaluation -------------------------------------------------------------------------------------
    def run_eval(
        self, model, tokenizer, spec: ModelSpec, data, out_dir: Path | None, prefix: str, kl=None
    ) -> tuple[dict, dict]:
        return evaluate_policy(
            self.generator(model, tokenizer, spec),
            tokenizer,
            self.benchmarks(data),
            answer_checker(self.verify),
            self.evaluation,
            out_dir,
            prefix=prefix,
            kl=kl,
        )

    def cached_eval(self, spec: ModelSpec, loaded, data, hardware, out_dir: Path, prefix: str) -> tuple[dict, dict]:
        """The starting policy's verified accuracy, cached (per-sample files copied into out_dir)."""
        if not self.switches.cache:
            model, tokenizer = loaded or self.load(spec, hardware)
            return self.run_eval(model, tokenizer, spec, data, out_dir, prefix)
        stage = EvalStage(self)
        got = stage.cached(
            stage.key(spec, data, prefix),
            lambda out: stage.run(loaded, spec, data, hardware, prefix, out),
            hardware,
            out_dir,
        )
        result = json.loads(stage.done(got.path).read_text())
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in got.path.glob("*.jsonl"):
            shutil.copyfile(f, out_dir / f.name)
        return result["metrics"], result["details"]

    # -- the stages around a preference run -------------------------------------------------------------
    def prepare(self, spec: ModelSpec, data, hardware, run_dir: Path) -> Prepared:
        """Warm-up → pairs → accuracy before, as the loop's switches say; returns what training starts from."""
        spec = self.start_spec(spec)
        prepared = Prepared(model=spec, data=data, source=data)
        loaded = None
        if self.switches.warmup:
            spec, prepared.info["warmup"], loaded = self.cached_warmup(spec, data, hardware, run_dir)
            prepared.model = spec
        if self.switches.reward:  # the trained reward model labels the pairs and judges, where they name none
            model_dir, prepared.info["reward"] = cached_reward(self, spec, data, hardware, run_dir)
            self.pairs.labeler = self.pairs.labeler.with_reward_model(str(model_dir))
            if self.evaluation.judge is not None:
                self.evaluation.judge = self.evaluation.judge.with_reward_model(str(model_dir))
        if self.switches.pairs:
            path, prepared.info["pairs"] = self.cached_pairs(spec, loaded, data, hardware, run_dir)
            n = prepared.info["pairs"].get("num_pairs") or sum(1 for _ in open(path))
            if n <= self.pairs.eval_size:
                raise DataError(
                    f"pairs: only {n} pairs from {path} (pairs.eval_size={self.pairs.eval_size} are "
                    f"held out); the starting policy is almost always right or always wrong "
                    f"(see the counts in {path}.provenance.json)"
                )
            prepared.data = FileData(path=str(path), eval_size=self.pairs.eval_size, eval_key="pairs.eval_size")
        if self.switches.evaluate and hardware.is_main:
            prepared.metrics, details = self.cached_eval(
                spec, loaded, data, hardware, run_dir / "verified_before", "eval/verified_before"
            )
            prepared.verified = details
        loaded = None
        _release_memory()
        return prepared

    def verify_after(
        self, policy, tokenizer, prepared: Prepared, hardware, run_dir: Path, start_model=None
    ) -> tuple[dict, dict]:
        """Verified accuracy of the trained policy (exported to run_dir/final): eval/verified/<benchmark>, mean;
        with `evaluation.judge` set, also the judged win rate against the baseline (eval/judge/...).

        vLLM loads the trained weights from disk: `final/`, or for LoRA the adapters merged into a full-precision
        copy of the base (prefopt.merge.trained_weights). HF generate uses the policy in memory, except under FSDP
        (sharded) and with a 4-bit base, where it loads the same weights vLLM would. `start_model`: the starting
        policy when the caller holds it (the KL estimate's reference; otherwise loaded from `prepared.model`)."""
        if not (self.switches.evaluate and hardware.is_main):
            return {}, {}
        spec, temporary = trained_weights(prepared.model, run_dir, tokenizer)
        if spec is not prepared.model and (
            getattr(hardware, "strategy", "none") == "fsdp"
            or (prepared.model.lora["load_in_4bit"] and choose_backend(self.generation, spec.name_or_path) == "hf")
        ):
            policy, tokenizer = self.load(spec, hardware)
        try:  # KL(π‖π_ref) on the policy's own answers, against the policy the run started from

            def load_start(start: ModelSpec):
                return start_model if start_model is not None else self.load(start, hardware)[0]

            kl = kl_estimator(policy, tokenizer, prepared.model, load_start, self.chunk_elements)
            metrics, details = self.run_eval(
                policy, tokenizer, spec, prepared.source, run_dir / "verified", "eval/verified", kl
            )
            del kl
            if self.evaluation.judge is not None:
                judged, details["judge"] = self.judge_after(policy, tokenizer, spec, prepared, hardware, run_dir)
                metrics.update(judged)
        finally:
            if temporary is not None:  # a merged copy only for scoring (model.lora.merge_on_export keeps it)
                release_engines(str(temporary))
                shutil.rmtree(temporary, ignore_errors=True)
        return {**metrics, **preserved(run_dir)}, details

    def judge_after(self, policy, tokenizer, spec: ModelSpec, prepared: Prepared, hardware, run_dir: Path):
        """The judged evaluation (prefopt.mathloop.judging.pairwise): the trained policy vs the baseline or starting
        policy."""
        judge = self.evaluation.judge
        prompts = judge_prompts(judge, self.problem_source(prepared.source).problem_rows("eval"))
        rendered = [self.render(tokenizer, p) for p in prompts]
        ours = greedy_answers(self.generator(policy, tokenizer, spec), rendered, self.evaluation.seed)
        theirs = reference_answers(judge, len(prompts))
        if theirs is None:  # the starting policy (after the warm-up) answers the same rendered prompts
            start, start_tokenizer = self.load(prepared.model, hardware)
            theirs = greedy_answers(
                self.generator(start, start_tokenizer, prepared.model), rendered, self.evaluation.seed
            )
            del start
        return judged_evaluation(judge, prompts, ours, theirs, _device_of(policy), run_dir / "judged.jsonl")


def preserved(run_dir: Path) -> dict:
    """eval/preserved/<benchmark> and eval/improved/<benchmark> (with their intervals) from the per-problem
    files of the starting policy (verified_before/) and the trained one (verified/); {} without them."""
    try:
        return preservation_metrics(read_benchmarks(run_dir / "verified_before"), read_benchmarks(run_dir / "verified"))
    except StatsError as exc:  # the accuracies stand on their own; say why these are missing
        log.warning("preservation/improvement not computed: %s", exc)
        return {}
