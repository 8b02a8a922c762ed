# python scripts/speed_token_metrics.py  (from the repository root, PYTHONPATH=.)
"""Forward+backward of pair_logps on a tiny Qwen2 (hidden 64) with Qwen's 151,936-token vocabulary,
token_metrics (diagnostics) on vs off, 8 pairs, packed; min and median of alternating repeats, CPU time of one thread
(the machine is shared)."""

import time

import torch

torch.set_num_threads(1)
from prefopt.data.arith import ArithmeticData
from prefopt.data.batching import collate, tokenize_pairs
from prefopt.logprobs import pair_logps
from prefopt.models import ModelSpec, load_model, load_tokenizer

cfg = dict(
    vocab_size=151936,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)
spec = ModelSpec(arch="qwen2", config=cfg, tokenizer="char")
tok = load_tokenizer(spec)
model = load_model(spec, vocab_size=151936)
train, _, _ = ArithmeticData(n_train=8, n_eval=2).load()
pairs, _ = tokenize_pairs(train, tok, max_length=128, max_prompt_length=64)
batch = collate(pairs[:8], tok.pad_token_id, packing=True)
res = {False: [], True: []}
for _ in range(6):
    for diag in (False, True):
        model.zero_grad()
        t0 = time.process_time()
        lp = pair_logps(model, batch, diagnostics=diag)
        (lp.chosen.sum() - lp.rejected.sum()).backward()
        res[diag].append(time.process_time() - t0)
n = int(batch.packed.counts.sum())
for k, v in res.items():
    v = sorted(v)
    print(f"token_metrics={k}: min {v[0]:.3f} s, median {v[len(v) // 2]:.3f} s ({n} scored tokens)")
