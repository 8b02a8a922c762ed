"""The cached reward stage of the loop (`pipeline.reward=true`): train the tiny reward model, measure its agreement.

Runs after the warm-up, on the warmed-up policy's backbone and the run's `data` pairs (synthetic arithmetic:
chosen a correct worked answer, rejected a wrong one); cached under `<pipeline.cache_dir>/reward/<key>` like
the warm-up. Its directory (`model/`, `from_pretrained`-loadable with its tokenizer) is then the reward model of
every labeller and judge whose `name_or_path` is null (`with_reward_model`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path

from prefopt.data.batching import tokenize_pairs
from prefopt.io import atomic_write_text, locked, replace_dir
from prefopt.mathloop.fingerprints import data_fingerprint, optimizer_fingerprint, spec_fingerprint
from prefopt.mathloop.reward import checker_agreement, reward_model_from, train_reward_model
from prefopt.mathloop.reward_model import RewardScorer
from prefopt.models import load_tokenizer

log = logging.getLogger("prefopt")


def reward_key(loop, spec, data) -> str:
    return loop._key("reward", {"policy": spec_fingerprint(spec), "data": data_fingerprint(data),
                                "tokenize": loop.tokenize, "reward": {**vars(loop.reward), "progress": None},
                                "optimizer": optimizer_fingerprint(loop.optimizer_factory),
                                "max_grad_norm": loop.max_grad_norm})


def measure_agreement(loop, model_dir: Path, eval_rows, golds: dict, hardware) -> dict:
    """The trained model's agreement with the answer checker on the held-out pairs' answers."""
    scorer = RewardScorer.load(str(model_dir), hardware.torch_device, batch_size=64, max_length=loop.tokenize["max_length"])
    prompts = [r.prompt for r in eval_rows]
    chosen = scorer.score(prompts, [r.chosen for r in eval_rows])
    rejected = scorer.score(prompts, [r.rejected for r in eval_rows])
    checker, answers = loop.checker(), [golds[r.prompt] for r in eval_rows]
    ok_c = [v.correct for v in checker.check_many([r.chosen for r in eval_rows], answers)]
    ok_r = [v.correct for v in checker.check_many([r.rejected for r in eval_rows], answers)]
    return checker_agreement(chosen, rejected, ok_c, ok_r)


def run_reward(loop, spec, data, hardware, out: Path) -> dict:
    """Train the reward model into out/model and measure it; returns the record written to out/reward.json."""
    tokenizer = load_tokenizer(spec)
    train_rows, eval_rows, _ = data.load()
    # completions end as the reward model's chat template renders an assistant turn, so that training and
    # scoring (prefopt.mathloop.reward_model.RewardScorer) read the same last token
    ending = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                                           tokenize=False).rsplit("y", 1)[1]
    args = dict(loop.tokenize, completion_eos=ending)
    train_pairs, _ = tokenize_pairs(train_rows, tokenizer, **args)
    eval_pairs, _ = tokenize_pairs(eval_rows, tokenizer, **args)
    model = reward_model_from(Path(spec.name_or_path), tokenizer.pad_token_id).to(hardware.torch_device)
    t0 = time.perf_counter()
    result = train_reward_model(model, train_pairs, eval_pairs, tokenizer.pad_token_id, loop.reward,
                                loop.optimizer_factory, hardware, out, max_grad_norm=loop.max_grad_norm)
    result.pop("trainer").export(out / "model")
    tokenizer.save_pretrained(out / "model")
    golds = {row["problem"]: str(row["answer"]) for row in loop.problem_source(data).problem_rows("eval")}
    agreement = measure_agreement(loop, out / "model", eval_rows, golds, hardware)
    log.info("reward model: agreement with the answer checker %.3f on %d held-out pairs (%d steps, %.0f s)",
             agreement["agreement"], agreement["pairs"], loop.reward.steps, time.perf_counter() - t0)
    return {"seconds": time.perf_counter() - t0, "metrics": result["metrics"], "agreement": agreement,
            "reward": vars(loop.reward)}


def cached_reward(loop, spec, data, hardware, run_dir: Path) -> tuple[Path, dict]:
    """(the reward model's directory, info): from the cache, or trained now (run_dir/reward without a cache)."""
    key = reward_key(loop, spec, data)
    final = loop._cache("reward") / key if loop.pipeline.cache else run_dir / "reward"
    if not (loop.pipeline.cache and (final / "reward.json").is_file()):
        with locked(final) if loop.pipeline.cache else contextlib.nullcontext():
            if not (loop.pipeline.cache and (final / "reward.json").is_file()):
                build = final.with_name(f".{key}.build") if loop.pipeline.cache else final
                record = run_reward(loop, spec, data, hardware, build)
                shutil.rmtree(build / "checkpoints", ignore_errors=True)
                atomic_write_text(build / "reward.json", json.dumps({"key": key, **record}, indent=2, default=str))
                if loop.pipeline.cache:
                    replace_dir(build, final)
    else:
        log.info("reward model: reusing the cached %s", final)
    record = json.loads((final / "reward.json").read_text())
    return final / "model", {"key": key, "path": str(final), "agreement": record["agreement"]}
