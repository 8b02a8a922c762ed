"""prefopt vs TRL's `DPOTrainer` on one DPO workload: steps/s, tokens/s, peak RSS, model-FLOPs utilisation.

    python scripts/speed_vs_trl.py [--steps 12] [--large-steps 5] [--json rows.json] [--vocab small,qwen]
    python scripts/speed_vs_trl.py --doc docs/results/speed_vs_trl.md   # also write the documentation's results page
                                      [--reference live,cached] [--precision bf16|fp32]

The workload (docs/performance.md): a tiny Qwen2 (hidden 256, 4 layers, 4 heads, 2 KV heads, intermediate 1024, tied
embeddings) with a 128-token ("small") or Qwen's 151,936-token ("qwen") vocabulary; prefopt's character-level
arithmetic pairs without a chat template; 32 pairs per optimizer step; DPO sigmoid, β = 0.1; AdamW, lr 5e-4,
gradient clipping at 1.0; no evaluation during training. Both tools start from the same weights and the same
pairs, each in its own process (`--child`), in two reference modes: `live` (a frozen reference model runs
every step) and `cached` (reference log-probs computed before training: prefopt's `reference_cache`, TRL's
`precompute_ref_log_probs=True`).

- prefopt runs its real entry point (`prefopt.run.train` on the composed Hydra config: Trainer, pair_logps,
  get_loss), with its defaults (packing, tiled LM head) plus `optimizer.factory.fused=true`, the AdamW
  implementation TRL uses by default (`adamw_torch_fused`), and `--prefopt-args` (default
  `train.compile=true`: the decoder through torch.compile; it costs ~1 minute in the first step, which the
  "first step s" column shows; `--prefopt-args train.compile=false` measures without it). TRL's own
  `torch_compile` is off by default and stays off unless `--trl-args '{"torch_compile": true}'`.
- TRL runs `DPOTrainer` with `DPOConfig` defaults; only what the workload fixes is set (batch, lr, steps, β,
  no saving/eval/reporting, logging at the end only) plus `use_cpu=True`, without which TRL refuses to start
  on a machine without a GPU. On CPU its defaults then are bf16 autocast and gradient checkpointing.
  `--trl-args '{"gradient_checkpointing": false}'` passes more `DPOConfig` fields.
- `--threads` (default: all cores) sets the torch threads of both tools: the same CPU for each.
- `--precision` sets the arithmetic of both tools: `bf16` (the default, TRL's own default here: bf16 autocast
  over float32 weights; prefopt's `hardware.mixed_precision=bf16`) or `fp32` (TRL `bf16=False`, prefopt plain).

The real workload (`--model smollm2`; docs/results/speed_vs_trl_real.md): SmolLM2-135M-Instruct's real weights,
the smollm2_135m preset's GGUF file converted once into a Hugging Face directory that both tools load in float32
(the precision is `--precision`'s for both: bf16 autocast by default); chat pairs written here (everyday word
problems: a correct worked answer against one written another way with an arithmetic slip) rendered with the
model's chat template and its default system message, prompts 116-133 tokens, completions 72-129; 8 pairs per
step; DPO β = 0.1, lr 5e-6 (full) or 5e-5 (LoRA); full fine-tuning and LoRA (`--tuning`: r = α = 16, dropout 0,
on the seven projections, as the preset; TRL gets the same `peft.LoraConfig`); live and cached reference; four
tools (`--tools`): `prefopt` with its defaults (no compile; the preset recomputes the decoder layers' activations in
the backward pass, on shared-prefix rows, as TRL does by default on CPU), `prefopt-compiled` (`train.compile=true`),
`prefopt-unchecked` (`model.gradient_checkpointing=false`: every activation kept) and `trl`.
Each tool's child reports the tokens per step it trains on (they must be equal). Model FLOPs per token for MFU:
6·params for full fine-tuning, 4·params for LoRA (no weight gradients of the frozen base), + 2·params for a live
reference. The 1-minute load average at the start of each run is in the table ("load 1m").
    python scripts/speed_vs_trl.py --model smollm2 --doc docs/results/speed_vs_trl_real.md [--tuning full,lora]

Timing: "first step s" is the wall-clock time from a tool's start (model, data, reference precompute,
compilation) to the end of its first step. Throughput: the wall-clock time of each optimizer step after the first
`--warmup` steps, between hooks at the
end of consecutive steps (the same for both tools); steps/s is 1 / the median step (robust to bursts of other
work on a shared machine; `steps_per_s_mean` in the JSON is the plain mean). "CPU s/step" is the median CPU
time (all threads) of a step, and "CPU ×TRL" TRL's over prefopt's: the work done, which other load on the
machine hardly changes. tokens/s counts the prompt+completion tokens of the chosen and
rejected sequences of a step (no padding), the same number for both tools. Peak RSS is the child process's
maximum resident set size as the kernel reports it (`wait4`). MFU = model FLOPs / s over the matmul peak
measured here at start in the tool's precision (bf16 or float32), with model FLOPs = 6·params·tokens for the
policy (+ 2·params·tokens for a live reference) counted on the unpacked sequences: the workload's FLOPs, the
same for both tools, whatever work a tool saves (prefopt's shared-prefix packing computes a prompt once). On a machine
shared with other work, timings are perturbed: run it when the machine is quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = dict(
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    max_position_embeddings=512,
)
VOCABS = {"small": 128, "qwen": 151936}
PAIRS_PER_STEP, BETA, LR, N_EVAL = 32, 0.1, 5e-4, 32
DATA = dict(max_operand=20, ops="+-", seed=1234)  # pinned, so the workload does not move with the data defaults


def n_train(steps: int) -> int:
    return min(PAIRS_PER_STEP * steps, 800)  # distinct pairs for every step (the problem space has ~880)


def dataset(pairs: int):
    """The pairs both tools train on, and prefopt's tokenization of them (what tokens/s counts)."""
    from prefopt.data.arith import ArithmeticData
    from prefopt.data.batching import tokenize_pairs
    from prefopt.tokenizer import char_tokenizer

    train, _, _ = ArithmeticData(n_train=pairs, n_eval=N_EVAL, **DATA).load()
    tok = char_tokenizer("qwen")
    tokenized, _ = tokenize_pairs(train, tok, max_length=128, max_prompt_length=64, chat_template=False)
    return train, tokenized, tok


def tokens_per_step(tokenized, pairs_per_step: int = PAIRS_PER_STEP) -> float:
    per_pair = [2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in tokenized]
    return pairs_per_step * sum(per_pair) / len(per_pair)


# -- the real workload: SmolLM2-135M-Instruct on everyday word problems rendered with its chat template --------
REAL_EOS, REAL_VOCAB = "<|im_end|>", 49152  # the smollm2_135m preset's completion_eos
REAL = dict(pairs_per_step=8, beta=0.1, lr={"full": 5e-6, "lora": 5e-5}, n_eval=8, seed=2024)
LORA = dict(
    r=16,
    alpha=16,
    dropout=0.0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)
NAMES = ("Maria", "Tom", "Aisha", "Kenji", "Lena", "Diego", "Priya", "Sam", "Olga", "Noah", "Fatima", "Lucas")
ASK = "Please explain your reasoning step by step and put the final answer in \\boxed{}."


def _bake_sale(name: str, rng) -> tuple[str, str, str]:
    a, b, c, d = int(rng.integers(3, 9)), int(rng.integers(4, 13)), int(rng.integers(5, 20)), int(rng.integers(2, 9))
    packs, wrong = a * b, a * b + b  # the slip: one pack too many
    prompt = (
        f"{name} is getting ready for the school bake sale on Saturday. {name} buys {a} packs of muffins with {b} "
        f"muffins in each pack, and a neighbour brings over {c} more muffins baked at home. On the morning of the "
        f"sale, {d} muffins turn out to be too burnt to sell and are set aside. How many muffins can {name} put on "
        f"the table for the sale? {ASK}"
    )
    chosen = (
        "Let's work through it step by step.\n\n"
        f"1. Muffins from the packs: {a} packs × {b} muffins = {packs} muffins.\n"
        f"2. Adding the neighbour's muffins: {packs} + {c} = {packs + c} muffins.\n"
        f"3. Setting aside the burnt ones: {packs + c} − {d} = {packs + c - d} muffins.\n\n"
        f"So {name} can put {packs + c - d} muffins on the table for the sale.\n\n\\boxed{{{packs + c - d}}}"
    )
    rejected = (
        f"{name} starts with the packs: {a} × {b} = {wrong} muffins. Together with the {c} muffins from the "
        f"neighbour that makes {wrong + c} muffins. The {d} burnt muffins cannot be sold, so {name} has "
        f"{wrong + c} − {d} = {wrong + c - d} muffins left for the table.\n\n\\boxed{{{wrong + c - d}}}"
    )
    return prompt, chosen, rejected


def _train(name: str, rng) -> tuple[str, str, str]:
    a, b, c = int(rng.integers(40, 90)), int(rng.integers(5, 20)), int(rng.integers(3, 15))
    after, wrong = a - b + c, a + b + c  # the slip: the people who got off are added
    prompt = (
        f"A morning train leaves the city station with {a} passengers on board. At the first stop, {b} people get "
        f"off and {c} people get on. At the second stop, a school group joins the trip and the number of passengers "
        f"on the train doubles. {name} wants to know how many passengers are on the train after the second stop. "
        f"{ASK}"
    )
    chosen = (
        "Let's follow the passengers stop by stop.\n\n"
        f"- At the start there are {a} passengers.\n"
        f"- At the first stop, {b} get off and {c} get on: {a} − {b} + {c} = {after} passengers.\n"
        f"- At the second stop the number doubles: {after} × 2 = {2 * after} passengers.\n\n"
        f"There are {2 * after} passengers on the train after the second stop.\n\n\\boxed{{{2 * after}}}"
    )
    rejected = (
        f"The train starts with {a} passengers, and at the first stop {b} people and then {c} people are added, "
        f"which gives {a} + {b} + {c} = {wrong}. When the school group joins, the number doubles, so there are "
        f"{wrong} × 2 = {2 * wrong} passengers after the second stop.\n\n\\boxed{{{2 * wrong}}}"
    )
    return prompt, chosen, rejected


def _garden(name: str, rng) -> tuple[str, str, str]:
    a, b, c, d = int(rng.integers(3, 8)), int(rng.integers(4, 10)), int(rng.integers(6, 15)), int(rng.integers(10, 40))
    plants, total = a * b, a * b * c
    wrong = (a + b) * c  # the slip: rows and plants per row added, not multiplied
    prompt = (
        f"{name} is planting a vegetable garden this spring with {a} rows of tomato plants and {b} plants in each "
        f"row. Each plant produces about {c} tomatoes over the summer. {name} plans to give {d} tomatoes to friends "
        f"and family and keep the rest for cooking. How many tomatoes will be left for cooking at the end of the "
        f"summer? {ASK}"
    )
    chosen = (
        "Let's break the problem into steps.\n\n"
        f"1. Number of plants: {a} rows × {b} plants = {plants} plants.\n"
        f"2. Tomatoes over the summer: {plants} plants × {c} tomatoes = {total} tomatoes.\n"
        f"3. After giving {d} away: {total} − {d} = {total - d} tomatoes.\n\n"
        f"{name} will have {total - d} tomatoes left for cooking.\n\n\\boxed{{{total - d}}}"
    )
    rejected = (
        f"The garden has {a} + {b} = {a + b} tomato plants. Each of them gives about {c} tomatoes, so the harvest is "
        f"{a + b} × {c} = {wrong} tomatoes. After {name} gives {d} tomatoes to friends and family, "
        f"{wrong} − {d} = {wrong - d} tomatoes are left for cooking.\n\n\\boxed{{{wrong - d}}}"
    )
    return prompt, chosen, rejected


def _savings(name: str, rng) -> tuple[str, str, str]:
    b, s = int(rng.integers(10, 30)), int(rng.integers(15, 40))
    a, d, weeks = b + s, int(rng.integers(20, 80)), int(rng.integers(4, 12))
    c = d + s * weeks - int(rng.integers(0, s))  # needs exactly `weeks` full weeks
    need, wrong = c - d, -(-(c - d) // (b + s))  # the slip: divides by the whole pay, not what is saved
    prompt = (
        f"{name} earns {a} dollars a week from a part-time job at the public library and spends {b} dollars of it "
        f"each week on lunches and bus fares. {name} wants to buy a bicycle that costs {c} dollars and already has "
        f"{d} dollars saved. After how many full weeks of work will {name} have enough money for the bicycle? {ASK}"
    )
    chosen = (
        "Let's work it out step by step.\n\n"
        f"1. Money saved each week: {a} − {b} = {s} dollars.\n"
        f"2. Money still needed: {c} − {d} = {need} dollars.\n"
        f"3. Weeks needed: {need} ÷ {s} ≈ {need / s:.2f}, so {name} needs {weeks} full weeks "
        f"({weeks} × {s} = {weeks * s} dollars ≥ {need}).\n\n"
        f"After {weeks} full weeks {name} can buy the bicycle.\n\n\\boxed{{{weeks}}}"
    )
    rejected = (
        f"{name} needs {c} − {d} = {need} more dollars and earns {a} dollars a week, so it takes {need} ÷ {a} ≈ "
        f"{need / a:.2f} weeks, which rounds up to {wrong} full weeks. After {wrong} weeks {name} can buy the "
        f"bicycle.\n\n\\boxed{{{wrong}}}"
    )
    return prompt, chosen, rejected


PROBLEMS = (_bake_sale, _train, _garden, _savings)


def real_pairs(n: int, seed: int = REAL["seed"]):
    """`n` chat pairs: an everyday word problem, a correct worked answer (chosen) and a worked answer written
    another way with one arithmetic slip (rejected), so that the two answers share no long common start."""
    import numpy as np

    from prefopt.data.sources import PreferencePair

    rng = np.random.default_rng(seed)
    return [
        PreferencePair(*PROBLEMS[i % len(PROBLEMS)](NAMES[int(rng.integers(len(NAMES)))], rng), f"real{i}")
        for i in range(n)
    ]


def real_model_dir() -> str:
    """The converted Hugging Face directory of the smollm2_135m preset's GGUF file (converted once, then cached)."""
    from omegaconf import OmegaConf

    from prefopt.config import conf_dir
    from prefopt.models import ModelSpec

    preset = OmegaConf.load(conf_dir() / "model" / "smollm2_135m.yaml")
    gguf_cache = REPO / preset.gguf_cache
    return str(ModelSpec(gguf_file=preset.gguf_file, gguf_cache=str(gguf_cache)).converted().name_or_path)


def real_dataset(pairs: int, tok):
    """The real pairs, prefopt's tokenization of them (chat template, default system message, completion + EOS)
    and the rows TRL reads: the prompt as rendered by the template, each completion followed by its EOS."""
    from prefopt.data.batching import render_prompt, tokenize_pairs

    train = real_pairs(pairs)
    tokenized, _ = tokenize_pairs(train, tok, max_length=1024, max_prompt_length=512, completion_eos=REAL_EOS)
    rows = [
        {
            "prompt": render_prompt(tok, p.prompt, True, None),
            "chosen": p.chosen + REAL_EOS,
            "rejected": p.rejected + REAL_EOS,
        }
        for p in train
    ]
    return train, tokenized, tok, rows


# -- children ------------------------------------------------------------------------------------------------
def real_overrides(args, work: Path) -> list[str]:
    """prefopt's run of the real workload: the smollm2_135m preset on the converted directory, in float32
    weights (the precision is `--precision`'s, as TRL's), full fine-tuning or its LoRA, on the real pairs."""
    data = work / "pairs.jsonl"
    rows = real_pairs(args.pairs + REAL["n_eval"])  # the first args.pairs are TRL's pairs; the last held out
    data.write_text(
        "".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n" for p in rows)
    )
    return [
        "model=smollm2_135m",
        "model.gguf_file=null",
        f"++model.name_or_path={args.model_dir}",
        "model.dtype=float32",
        f"model.lora.r={LORA['r'] if args.tuning == 'lora' else 0}",
        "data=jsonl",
        f"data.source.path={data}",
        f"data.source.eval_size={REAL['n_eval']}",
        "loss=dpo",
        f"beta={REAL['beta']}",
        f"lr={REAL['lr'][args.tuning]}",
        f"batch_size={REAL['pairs_per_step']}",
        f"micro_batch_size={REAL['pairs_per_step']}",
    ]


def tiny_overrides(args) -> list[str]:
    return [
        "model=tiny_qwen",
        *[f"model.config.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in MODEL.items()],
        f"model.config.vocab_size={VOCABS[args.vocab]}",
        "data=arith",
        "data.chat_template=false",
        f"data.source.n_train={args.pairs}",
        f"data.source.n_eval={N_EVAL}",
        *[f"data.source.{k}={v}" for k, v in DATA.items()],
        "loss=dpo",
        f"beta={BETA}",
        f"lr={LR}",
        f"batch_size={PAIRS_PER_STEP}",
        f"micro_batch_size={PAIRS_PER_STEP}",
    ]


def run_prefopt(args, out: dict) -> None:
    from hydra import compose, initialize_config_dir

    import prefopt.engine
    from prefopt.config import conf_dir
    from prefopt.run import train

    work = Path(tempfile.mkdtemp(prefix="bench-prefopt-"))
    overrides = [
        *(real_overrides(args, work) if args.model == "smollm2" else tiny_overrides(args)),
        f"steps={args.steps}",
        "eval_every=0",
        "resume=null",
        "logger=none",
        "train.progress=false",
        "++optimizer.factory.fused=true",
        *args.prefopt_args.split(),
        f"reference_cache={'null' if args.reference == 'live' else work / 'cache'}",
    ]
    overrides.append(f"++hardware.mixed_precision={'bf16' if args.precision == 'bf16' else 'null'}")
    overrides.append(f"hardware.threads={args.threads}")
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
        if "mathloop" in cfg:  # the verified-math stages around a run are not part of this workload
            cfg = compose(
                config_name="config",
                overrides=overrides
                + [f"mathloop.{k}=false" for k in ("warmup", "pairs", "evaluate") if k in cfg.mathloop],
            )
    ends: list[float] = []
    cpu: list[float] = []
    step = prefopt.engine.Trainer.train_step

    seen: list[float] = []

    def timed_step(self):
        if not seen:  # the tokens prefopt trains on, counted as tokens/s counts them
            seen.append(tokens_per_step(self.parts.train_pairs, self.cfg.batch_size))
        metrics = step(self)
        ends.append(time.perf_counter())
        cpu.append(time.process_time())
        return metrics

    prefopt.engine.Trainer.train_step = timed_step
    start = time.perf_counter()
    summary = train(cfg, run_dir=work / "run")
    out.update(
        ends=ends,
        cpu_ends=cpu,
        first_step_s=ends[0] - start,
        total_s=time.perf_counter() - start,
        final_loss=summary["metrics"].get("train/loss"),
        tokens_per_step_seen=seen[0],
        overrides=overrides,
    )


def trl_tiny(args) -> dict:
    """TRL's inputs for the tiny workload: the same random weights as prefopt's policy, the arithmetic pairs."""
    import copy

    from datasets import Dataset

    from prefopt.models import ModelSpec, load_model

    train, _, tok = dataset(args.pairs)
    spec = ModelSpec(arch="qwen2", config={**MODEL, "vocab_size": VOCABS[args.vocab]}, tokenizer="char")
    model = load_model(spec)  # the same weights as prefopt's policy (same config, same init seed)
    ref = copy.deepcopy(model).eval() if args.reference == "live" else None
    ds = Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in train])
    return dict(model=model, ref_model=ref, train_dataset=ds, processing_class=tok), (PAIRS_PER_STEP, LR, BETA)


def trl_real(args) -> dict:
    """TRL's inputs for the real workload: the converted directory loaded as a TRL user loads a model (float32
    weights, sdpa), the rendered chat pairs, and for LoRA peft's adapters of the smollm2_135m preset (TRL then
    takes the reference from the base with the adapters off, as prefopt does)."""
    import copy

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, tok, rows = real_dataset(args.pairs, AutoTokenizer.from_pretrained(args.model_dir))
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    lora = args.tuning == "lora"
    ref = copy.deepcopy(model).eval() if args.reference == "live" and not lora else None
    peft_config = (
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=LORA["target_modules"],
            task_type="CAUSAL_LM",
        )
        if lora
        else None
    )
    inputs = dict(model=model, ref_model=ref, train_dataset=Dataset.from_list(rows), processing_class=tok)
    return {**inputs, "peft_config": peft_config}, (REAL["pairs_per_step"], REAL["lr"][args.tuning], REAL["beta"])


def run_trl(args, out: dict) -> None:
    import torch
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    start = time.perf_counter()  # the tool's start: model and data, as prefopt's
    inputs, (pairs_per_step, lr, beta) = (trl_real if args.model == "smollm2" else trl_tiny)(args)
    ends: list[float] = []
    cpu: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())
            cpu.append(time.process_time())

    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"),
        use_cpu=True,
        per_device_train_batch_size=pairs_per_step,
        learning_rate=lr,
        max_steps=args.steps,
        beta=beta,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_steps=args.steps,
        disable_tqdm=True,
        seed=0,
        precompute_ref_log_probs=args.reference == "cached",
        **{"bf16": args.precision == "bf16", **json.loads(args.trl_args)},
    )
    trainer = DPOTrainer(args=config, callbacks=[Clock()], **inputs)
    setup = time.perf_counter() - start
    # TRL tokenizes by itself: check that it sees the same tokens as prefopt (tokens/s counts the same work)
    seen = trainer.train_dataset
    trl_tokens = (
        pairs_per_step
        * sum(
            2 * len(a) + len(b) + len(c)
            for a, b, c in zip(seen["prompt_ids"], seen["chosen_ids"], seen["rejected_ids"])
        )
        / len(seen)
    )
    result = trainer.train()
    out.update(
        ends=ends,
        cpu_ends=cpu,
        setup_s=setup,
        first_step_s=ends[0] - start,
        total_s=time.perf_counter() - start,
        final_loss=result.training_loss,
        tokens_per_step_seen=trl_tokens,
        bf16=config.bf16,
        gradient_checkpointing=config.gradient_checkpointing,
        optim=str(config.optim),
    )


def child(args) -> None:
    out: dict = {"tool": args.child, "vocab": VOCABS[args.vocab], "reference": args.reference}
    if args.model == "smollm2":
        out.update(vocab=REAL_VOCAB, tuning=args.tuning)
    (run_prefopt if args.child == "prefopt" else run_trl)(args, out)
    Path(args.out).write_text(json.dumps(out))


# -- parent --------------------------------------------------------------------------------------------------
def matmul_peak_gflops(dtype: str = "fp32", n: int = 2048, repeats: int = 5) -> float:
    """This machine's matmul throughput in `dtype` (best of `repeats`), the MFU denominator.

    Measured in the precision the tools compute in: a CPU with AVX512-BF16 does bf16 matmuls ~2.2x faster
    than float32 ones, so an MFU over the float32 peak reads above 100% for bf16 work."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    a @ b
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def param_count(vocab: int) -> int:
    import torch

    from prefopt.models import ModelSpec, load_model

    with torch.device("meta"):
        model = load_model(ModelSpec(arch="qwen2", config={**MODEL, "vocab_size": vocab}, tokenizer="char"))
    return sum(p.numel() for p in model.parameters())


def spawn(tool: str, vocab: str, reference: str, args, steps: int, extra: tuple[str, ...] = ()) -> dict:
    """Run one tool in its own process (`--child`); `extra` adds child arguments (the real workload's)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        tool,
        "--vocab",
        vocab,
        "--reference",
        reference,
        "--steps",
        str(steps),
        "--pairs",
        str(REAL["pairs_per_step"] * args.steps if args.model == "smollm2" else n_train(args.steps)),
        "--model",
        args.model,
        "--threads",
        str(args.threads),
        "--out",
        out,
        "--trl-args",
        args.trl_args,
        "--precision",
        args.precision,
        "--prefopt-args",
        args.prefopt_args,
        *extra,
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",
        "PYTHONWARNINGS": "ignore",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    }
    log = Path(out).with_suffix(".log")
    load = os.getloadavg()[0]  # other work on the machine when the run starts
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(
            f"{tool} {vocab} {reference} failed (exit {proc.returncode}); log: {log}\n" + log.read_text()[-3000:]
        )
    row = json.loads(Path(out).read_text())
    row["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
    row["load_1m"] = load
    return row


def add_timing(row: dict, warmup: int, tps: float) -> None:
    """Steps/s (of the median step), CPU s/step and tokens/s from the step ends the child recorded."""
    ends = row.pop("ends")
    row["step_s"] = [b - a for a, b in zip(ends[warmup - 1 :], ends[warmup:])]
    # the median step: robust to bursts of other work on a shared machine (the mean is kept too)
    row["steps_per_s"] = 1 / statistics.median(row["step_s"])
    row["steps_per_s_mean"] = len(row["step_s"]) / sum(row["step_s"])
    cpu = row.pop("cpu_ends")
    # CPU seconds (all threads) per step: the work, nearly independent of other load on the machine
    row["cpu_s_per_step"] = statistics.median(b - a for a, b in zip(cpu[warmup - 1 :], cpu[warmup:]))
    row["tokens_per_s"] = row["steps_per_s"] * tps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model",
        default="tiny",
        choices=["tiny", "smollm2"],
        help="tiny: the random tiny Qwen2 rows; smollm2: the real SmolLM2-135M-Instruct rows (--tuning)",
    )
    ap.add_argument("--tuning", default="full,lora", help="smollm2: full, lora (r = alpha = 16) or both")
    ap.add_argument("--steps", type=int, help="optimizer steps per run (default 12; smollm2: 6)")
    ap.add_argument(
        "--large-steps",
        type=int,
        default=5,
        help="steps per run at the 151,936 vocabulary (default 5; at most --steps): TRL takes ~1 min a step",
    )
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the timing (default 2, at least 1)")
    ap.add_argument("--vocab", default="small,qwen", help="small, qwen or both (comma-separated)")
    ap.add_argument("--reference", default="live,cached", help="live, cached or both")
    ap.add_argument(
        "--tools",
        help="default prefopt,trl; smollm2: prefopt,prefopt-compiled,trl (prefopt there: its defaults, no compile;"
        " also prefopt-unchecked)",
    )
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="both tools' arithmetic")
    ap.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help="torch threads of both tools (default: all cores, TRL's default; prefopt's hardware=cpu uses 1)",
    )
    ap.add_argument("--trl-args", default="{}", help="extra DPOConfig fields as JSON")
    ap.add_argument(
        "--prefopt-args",
        help="extra prefopt overrides, space-separated (default: train.compile=true; smollm2: none)",
    )
    ap.add_argument("--json", help="write the rows to this file as a JSON list")
    ap.add_argument("--doc", help="also write the table as a results page of the documentation (docs/results/...)")
    ap.add_argument("--child", choices=["prefopt", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--pairs", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    real = args.model == "smollm2"
    if args.steps is None:
        args.steps = 6 if real else 12
    if args.prefopt_args is None:
        args.prefopt_args = "" if real else "train.compile=true"
    if args.tools is None:
        args.tools = "prefopt,prefopt-compiled,trl" if real else "prefopt,trl"
    if args.child:
        args.vocab = args.vocab if args.vocab in VOCABS else "small"
        return child(args)
    if real:
        return main_real(args)
    if not 1 <= args.warmup < min(args.steps, args.large_steps):
        raise SystemExit(f"need 1 <= --warmup ({args.warmup}) < --steps ({args.steps}) and --large-steps")

    import torch

    torch.set_num_threads(args.threads)
    peaks = {dt: matmul_peak_gflops(dt) for dt in ("fp32", "bf16")}
    _, tokenized, _ = dataset(n_train(args.steps))
    tps = tokens_per_step(tokenized)  # the same pairs at both vocabularies: the large one runs fewer steps of them
    setup = (
        f"{args.threads} threads per tool; matmul peak {peaks['fp32']:.0f} GFLOP/s float32, {peaks['bf16']:.0f} "
        f"bf16; {len(tokenized)} pairs, {tps / PAIRS_PER_STEP / 2:.1f} tokens per sequence, "
        f"{tps:.0f} tokens per step of {PAIRS_PER_STEP} pairs; {args.steps} steps "
        f"({min(args.steps, args.large_steps)} at 151,936 tokens), {args.warmup} of them warm-up"
    )
    print(f"# {setup}", flush=True)
    rows = []
    for vocab in args.vocab.split(","):
        params = param_count(VOCABS[vocab])
        steps = args.steps if vocab == "small" else min(args.steps, args.large_steps)
        for reference in args.reference.split(","):
            for tool in args.tools.split(","):
                row = spawn(tool, vocab, reference, args, steps)
                add_timing(row, args.warmup, tps)
                precision = args.precision if tool != "trl" else ("bf16" if row.get("bf16") else "fp32")
                flops = (6 + (2 if reference == "live" else 0)) * params * tps
                row["mfu"] = flops * row["steps_per_s"] / (peaks[precision] * 1e9)
                row.update(
                    params=params,
                    tokens_per_step=tps,
                    steps=steps,
                    warmup=args.warmup,
                    matmul_peak_gflops=peaks[precision],
                    precision=precision,
                )
                rows.append(row)
                print(
                    f"  {tool:8s} vocab {VOCABS[vocab]:>6} {reference:6s} {row['steps_per_s']:.3f} steps/s "
                    f"{row['tokens_per_s']:.0f} tok/s {row['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.doc:
        from prefopt.reporting.doc_page import write_doc_page

        body = (
            f"{setup}. [Performance](../performance.md#speed-against-trl) describes the workload and what the "
            f"figures mean.\n\n{table_text(rows)}"
        )
        print(f"wrote {write_doc_page(args.doc, 'Speed against TRL 1.16', body)}")


def real_param_count(model_dir: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


# the real workload's tools: prefopt's extra overrides (trl: none). The preset recomputes the decoder layers'
# activations in the backward pass (on shared-prefix rows); prefopt-unchecked keeps them all
REAL_TOOLS = {
    "prefopt": "",
    "prefopt-compiled": "train.compile=true",
    "prefopt-unchecked": "model.gradient_checkpointing=false",
    "trl": "",
}


def real_row(tool: str, tuning: str, reference: str, args, tps: float, params: int, peaks: dict) -> dict:
    """One real run of one of REAL_TOOLS: `prefopt` (its defaults: no compile), `prefopt-compiled`,
    `prefopt-unchecked` or `trl`."""
    import copy

    if tool not in REAL_TOOLS:
        raise SystemExit(f"--tools: {tool!r} is not one of {', '.join(REAL_TOOLS)}")
    run_args = copy.copy(args)
    run_args.prefopt_args = f"{args.prefopt_args} {REAL_TOOLS[tool]}".strip()
    child_tool = "trl" if tool == "trl" else "prefopt"
    row = spawn(
        child_tool, "small", reference, run_args, args.steps, ("--tuning", tuning, "--model-dir", args.model_dir)
    )
    add_timing(row, args.warmup, tps)
    precision = args.precision if tool != "trl" else ("bf16" if row.get("bf16") else "fp32")
    # model FLOPs per token: forward 2N + backward 4N (full) or 2N (LoRA: no weight gradients of the frozen base),
    # + 2N for a live reference's forward
    flops = ((6 if tuning == "full" else 4) + (2 if reference == "live" else 0)) * params * tps
    row.update(
        tool=tool,
        mfu=flops * row["steps_per_s"] / (peaks[precision] * 1e9),
        params=params,
        tokens_per_step=tps,
        steps=args.steps,
        warmup=args.warmup,
        matmul_peak_gflops=peaks[precision],
        precision=precision,
    )
    print(
        f"  {tool:16s} {tuning:4s} {reference:6s} {row['steps_per_s']:.3f} steps/s {row['tokens_per_s']:.0f} tok/s "
        f"{row['peak_rss_mb']:.0f} MB (tokens per step seen {row['tokens_per_step_seen']:.0f} of {tps:.0f}; "
        f"load {row['load_1m']:.2f})",
        flush=True,
    )
    return row


def main_real(args) -> None:
    """The real rows: SmolLM2-135M-Instruct (the smollm2_135m preset's weights), full fine-tuning and LoRA,
    live and cached reference, prefopt with its defaults and compiled, and TRL."""
    if not 1 <= args.warmup < args.steps:
        raise SystemExit(f"need 1 <= --warmup ({args.warmup}) < --steps ({args.steps})")
    import torch

    torch.set_num_threads(args.threads)
    peaks = {dt: matmul_peak_gflops(dt) for dt in ("fp32", "bf16")}
    args.model_dir = real_model_dir()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    _, tokenized, _, _ = real_dataset(REAL["pairs_per_step"] * args.steps, tok)
    tps = tokens_per_step(tokenized, REAL["pairs_per_step"])
    params = real_param_count(args.model_dir)
    lengths = {f: [len(getattr(p, f"{f}_ids")) for p in tokenized] for f in ("prompt", "chosen", "rejected")}
    load = os.getloadavg()
    setup = (
        f"SmolLM2-135M-Instruct ({params / 1e6:.1f} M parameters, vocabulary {REAL_VOCAB:,}), float32 weights; "
        f"{args.threads} threads per tool; matmul peak {peaks['fp32']:.0f} GFLOP/s float32, {peaks['bf16']:.0f} "
        f"bf16; {len(tokenized)} chat pairs (prompt {min(lengths['prompt'])}-{max(lengths['prompt'])} tokens with "
        f"the template's system message, chosen {min(lengths['chosen'])}-{max(lengths['chosen'])}, rejected "
        f"{min(lengths['rejected'])}-{max(lengths['rejected'])}), {tps:.0f} tokens per step of "
        f"{REAL['pairs_per_step']} pairs; {args.steps} steps, {args.warmup} of them warm-up; 1-minute load "
        f"average {load[0]:.2f} at the start"
    )
    print(f"# {setup}", flush=True)
    rows = []
    for tuning in args.tuning.split(","):
        for reference in args.reference.split(","):
            for tool in args.tools.split(","):
                rows.append(real_row(tool, tuning, reference, args, tps, params, peaks))
                if args.json:  # after every run: a failure later keeps the rows measured so far
                    Path(args.json).write_text(json.dumps(rows, indent=1))
    setup += f", {os.getloadavg()[0]:.2f} at the end"
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.doc:
        from prefopt.reporting.doc_page import write_doc_page

        body = (
            f"{setup}. [Performance](../performance.md#on-a-real-model-smollm2-135m-instruct) describes the "
            f"workload and what the figures mean.\n\n{table_text(rows)}"
        )
        print(f"wrote {write_doc_page(args.doc, 'Speed against TRL 1.16 on SmolLM2-135M-Instruct', body)}")


def print_table(rows: list[dict]) -> None:
    print(table_text(rows))


def table_text(rows: list[dict]) -> str:
    """The rows as a Markdown table, with the prefopt/TRL ratios."""
    real = any("tuning" in r for r in rows)  # the real rows: one vocabulary, full fine-tuning or LoRA
    head = (
        "fine-tuning" if real else "vocab",
        "reference",
        "tool",
        "precision",
        "steps/s",
        "tokens/s",
        "peak RSS MB",
        "MFU",
        "CPU s/step",
        "first step s",
        "tok/s ×TRL",
        "RSS ×TRL",
        "CPU ×TRL",
        *(("load 1m",) if real else ()),
    )
    lines = []
    for r in rows:
        key = (r["vocab"], r["reference"], r.get("tuning"))
        trl = next(
            (t for t in rows if t["tool"] == "trl" and (t["vocab"], t["reference"], t.get("tuning")) == key), None
        )
        ours = trl is not None and r["tool"] != "trl"
        ratio = f"{r['tokens_per_s'] / trl['tokens_per_s']:.2f}" if ours else ""
        rss = f"{r['peak_rss_mb'] / trl['peak_rss_mb']:.2f}" if ours else ""
        cpu = f"{trl['cpu_s_per_step'] / r['cpu_s_per_step']:.2f}" if ours and "cpu_s_per_step" in r else ""
        lines.append(
            (
                r["tuning"] if real else f"{r['vocab']:,}",
                r["reference"],
                r["tool"],
                r["precision"],
                f"{r['steps_per_s']:.3f}",
                f"{r['tokens_per_s']:,.0f}",
                f"{r['peak_rss_mb']:,.0f}",
                f"{100 * r['mfu']:.1f}%",
                f"{r['cpu_s_per_step']:.2f}" if "cpu_s_per_step" in r else "",
                f"{r['first_step_s']:.0f}" if "first_step_s" in r else "",
                ratio,
                rss,
                cpu,
                *((f"{r['load_1m']:.2f}" if "load_1m" in r else "",) if real else ()),
            )
        )
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    fmt = "| " + " | ".join(f"{{:{'>' if i > 3 else '<'}{w}}}" for i, w in enumerate(widths)) + " |"
    return "\n".join(
        [fmt.format(*head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(fmt.format(*x) for x in lines)]
    )


if __name__ == "__main__":
    main()
