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


def tokens_per_step(tokenized) -> float:
    per_pair = [2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in tokenized]
    return PAIRS_PER_STEP * sum(per_pair) / len(per_pair)


# -- children ------------------------------------------------------------------------------------------------
def run_prefopt(args, out: dict) -> None:
    from hydra import compose, initialize_config_dir

    import prefopt.engine
    from prefopt.config import conf_dir
    from prefopt.run import train

    work = Path(tempfile.mkdtemp(prefix="bench-prefopt-"))
    overrides = [
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

    def timed_step(self):
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
        overrides=overrides,
    )


def run_trl(args, out: dict) -> None:
    import copy

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from prefopt.models import ModelSpec, load_model

    torch.set_num_threads(args.threads)
    train, tokenized, tok = dataset(args.pairs)
    spec = ModelSpec(arch="qwen2", config={**MODEL, "vocab_size": VOCABS[args.vocab]}, tokenizer="char")
    model = load_model(spec)  # the same weights as prefopt's policy (same config, same init seed)
    ref = copy.deepcopy(model).eval() if args.reference == "live" else None
    ds = Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in train])
    ends: list[float] = []
    cpu: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())
            cpu.append(time.process_time())

    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"),
        use_cpu=True,
        per_device_train_batch_size=PAIRS_PER_STEP,
        learning_rate=LR,
        max_steps=args.steps,
        beta=BETA,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_steps=args.steps,
        disable_tqdm=True,
        seed=0,
        precompute_ref_log_probs=args.reference == "cached",
        **{"bf16": args.precision == "bf16", **json.loads(args.trl_args)},
    )
    start = time.perf_counter()
    trainer = DPOTrainer(
        model=model, ref_model=ref, args=config, train_dataset=ds, processing_class=tok, callbacks=[Clock()]
    )
    setup = time.perf_counter() - start
    # TRL tokenizes by itself: check that it sees the same tokens as prefopt (tokens/s counts the same work)
    seen = trainer.train_dataset
    trl_tokens = (
        PAIRS_PER_STEP
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


def spawn(tool: str, vocab: str, reference: str, args, steps: int) -> dict:
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
        str(n_train(args.steps)),
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
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run (default 12)")
    ap.add_argument(
        "--large-steps",
        type=int,
        default=5,
        help="steps per run at the 151,936 vocabulary (default 5; at most --steps): TRL takes ~1 min a step",
    )
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the timing (default 2, at least 1)")
    ap.add_argument("--vocab", default="small,qwen", help="small, qwen or both (comma-separated)")
    ap.add_argument("--reference", default="live,cached", help="live, cached or both")
    ap.add_argument("--tools", default="prefopt,trl")
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
        default="train.compile=true",
        help="extra prefopt overrides, space-separated (default: train.compile=true)",
    )
    ap.add_argument("--json", help="write the rows to this file as a JSON list")
    ap.add_argument("--doc", help="also write the table as a results page of the documentation (docs/results/...)")
    ap.add_argument("--child", choices=["prefopt", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--pairs", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.vocab = args.vocab if args.vocab in VOCABS else "small"
        return child(args)
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
                ends = row.pop("ends")
                row["step_s"] = [b - a for a, b in zip(ends[args.warmup - 1 :], ends[args.warmup :])]
                # the median step: robust to bursts of other work on a shared machine (the mean is kept too)
                row["steps_per_s"] = 1 / statistics.median(row["step_s"])
                row["steps_per_s_mean"] = len(row["step_s"]) / sum(row["step_s"])
                cpu = row.pop("cpu_ends")
                # CPU seconds (all threads) per step: the work, nearly independent of other load on the machine
                row["cpu_s_per_step"] = statistics.median(
                    b - a for a, b in zip(cpu[args.warmup - 1 :], cpu[args.warmup :])
                )
                row["tokens_per_s"] = row["steps_per_s"] * tps
                precision = args.precision if tool == "prefopt" else ("bf16" if row.get("bf16") else "fp32")
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


def print_table(rows: list[dict]) -> None:
    print(table_text(rows))


def table_text(rows: list[dict]) -> str:
    """The rows as a Markdown table, with the prefopt/TRL ratios."""
    head = (
        "vocab",
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
    )
    lines = []
    for r in rows:
        trl = next(
            (t for t in rows if t["tool"] == "trl" and t["vocab"] == r["vocab"] and t["reference"] == r["reference"]),
            None,
        )
        ratio = f"{r['tokens_per_s'] / trl['tokens_per_s']:.2f}" if trl and r["tool"] == "prefopt" else ""
        rss = f"{r['peak_rss_mb'] / trl['peak_rss_mb']:.2f}" if trl and r["tool"] == "prefopt" else ""
        cpu = (
            f"{trl['cpu_s_per_step'] / r['cpu_s_per_step']:.2f}"
            if trl and r["tool"] == "prefopt" and "cpu_s_per_step" in r
            else ""
        )
        lines.append(
            (
                f"{r['vocab']:,}",
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
            )
        )
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    fmt = "| " + " | ".join(f"{{:{'>' if i > 3 else '<'}{w}}}" for i, w in enumerate(widths)) + " |"
    return "\n".join(
        [fmt.format(*head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(fmt.format(*x) for x in lines)]
    )


if __name__ == "__main__":
    main()
