"""Memory plan: bytes per GPU for DPO on Qwen2.5-Math-7B, Llama-3.1-8B and Qwen2.5-Math-1.5B, from their configs.

    python scripts/memory_plan.py [--pairs 2 --seq-len 2048 --prompt-len 512] [--config PATH ...] [--json PATH]

Two set-ups per model:
- `fsdp`: full fine-tuning, FSDP2 full shard over `--gpus` GPUs (prefopt's `hardware=fsdp`: one unit per decoder
  layer plus the root; bf16 compute over fp32 master parameters, fp32 gradient reduction). Per GPU: sharded
  fp32 parameters, fp32 gradients and AdamW's two fp32 states (all / N), plus the bf16 all-gathered units in flight.
- `lora`: one GPU, a frozen bf16 base and rank-`r` adapters on q,k,v,o,gate,up,down (peft keeps adapters of a
  bf16 base in fp32: `autocast_adapter_dtype=True`), their fp32 gradients and AdamW state.

Everything is computed from the config (`transformers` config classes filled with the published values, or a
local config.json); the formulas are in the functions below and printed with `--explain`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

GIB = 2**30

# Published config.json values (only the fields that decide memory):
# - Qwen2.5-Math-7B: config.json of Qwen/Qwen2.5-Math-7B as mirrored at
#   https://huggingface.co/unsloth/Qwen2.5-Math-7B/blob/main/config.json ("_name_or_path": "Qwen/Qwen2.5-Math-7B");
#   the 4,096-token context is also what QwenLM/Qwen2.5-Math issue #59 and hkust-nlp/simpleRL-reason issue #70
#   report. Its vocabulary is 152,064 (padded), not the tokenizer's 151,936 that the 1.5B model uses.
# - Llama-3.1-8B-Instruct: config.json of a meta-llama/Llama-3.1-8B-Instruct snapshot quoted at
#   https://huggingface.co/stan-hua/Llama-3.1-8B-Instruct-LC-SmoothQuant-RTN-W4A16/blob/cde6551fc76abb1491ca3dfa19c56d60f53b6ab8/config.json;
#   the base Llama-3.1-8B has the same shapes (https://huggingface.co/NbAiLab/nb-llama-3.1-8B/blob/main/config.json,
#   "_name_or_path": "meta-llama/Llama-3.1-8B"; oumi configs/recipes/llama3_1/README.md lists the same numbers).
# - Qwen2.5-Math-1.5B: https://huggingface.co/unsloth/Qwen2.5-Math-1.5B/blob/main/config.json
#   ("_name_or_path": "Qwen/Qwen2.5-Math-1.5B"; same values in mlx-community/Qwen2.5-Math-1.5B-bf16).
PUBLISHED = {
    "Qwen2.5-Math-7B": (
        "qwen2",
        dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
    ),
    "Llama-3.1-8B(-Instruct)": (
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            tie_word_embeddings=False,
        ),
    ),
    "Qwen2.5-Math-1.5B": (
        "qwen2",
        dict(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
        ),
    ),
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_config(model_type: str, values: dict):
    """A `transformers` config object (Qwen2Config / LlamaConfig) from config.json values."""
    from transformers import AutoConfig, LlamaConfig, Qwen2Config

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}.get(model_type)
    if cls is None:
        return AutoConfig.for_model(model_type, **values)
    return cls(**values)


def load_config(path: str | Path):
    """A local config.json (or a directory holding one) as a `transformers` config; returns (name, config)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    values = json.loads(path.read_text())
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise SystemExit(f"{path}: no model_type in the config")
    name = values.get("_name_or_path") or path.parent.name
    return name, make_config(model_type, values)


# -- shapes and parameter counts ------------------------------------------------------------------------------
def head_dim(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def layer_linears(c) -> list[tuple[str, int, int, bool]]:
    """(name, in_features, out_features, has_bias) of one decoder layer's linear maps, as transformers builds them."""
    h, i, hd = c.hidden_size, c.intermediate_size, head_dim(c)
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    qwen = c.model_type == "qwen2"  # Qwen2Attention: bias on q/k/v, none on o (hard-coded, not in the config)
    attn_bias = bool(getattr(c, "attention_bias", False))
    qkv_bias, o_bias = (True, False) if qwen else (attn_bias, attn_bias)
    mlp_bias = bool(getattr(c, "mlp_bias", False))
    return [
        ("q_proj", h, q, qkv_bias),
        ("k_proj", h, kv, qkv_bias),
        ("v_proj", h, kv, qkv_bias),
        ("o_proj", q, h, o_bias),
        ("gate_proj", h, i, mlp_bias),
        ("up_proj", h, i, mlp_bias),
        ("down_proj", i, h, mlp_bias),
    ]


def param_counts(c) -> dict[str, int]:
    """Exact parameter count: embeddings, per layer (q/k/v/o with biases, gate/up/down, 2 RMSNorms), final norm,
    LM head unless tied."""
    h, v = c.hidden_size, c.vocab_size
    layer = sum(n_in * n_out + (n_out if bias else 0) for _, n_in, n_out, bias in layer_linears(c)) + 2 * h
    embed, head = v * h, (0 if c.tie_word_embeddings else v * h)
    total = embed + c.num_hidden_layers * layer + h + head
    return {
        "embed": embed,
        "layer": layer,
        "final_norm": h,
        "lm_head": head,
        "total": total,
        "root": embed + h + head,
    }  # what FSDP's root unit holds (all but the decoder layers)


def lora_param_count(c, r: int, targets=LORA_TARGETS) -> int:
    """Rank-r adapters A (r × in) and B (out × r) on each targeted linear of every layer."""
    per_layer = sum(r * (n_in + n_out) for name, n_in, n_out, _ in layer_linears(c) if name in targets)
    return c.num_hidden_layers * per_layer


# -- activations ----------------------------------------------------------------------------------------------
def layer_activation_bytes(c, lora_r: int = 0, lora_dropout: float = 0.0, targets=LORA_TARGETS) -> int:
    """Bytes one decoder layer keeps for backward, per token, bf16 compute with sdpa/flash attention.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", sec. 4.1) count
    34·h + 5·a·s bytes per token for a GPT layer with 16-bit activations. Here the 5·a·s attention-matrix term is
    gone (flash/sdpa attention keeps only q, k, v, its output and a log-sum-exp), there is no dropout, and a
    Llama/Qwen layer differs from GPT's: GQA (k, v have n_kv·d columns), a SwiGLU MLP over `intermediate_size`,
    and transformers' RMSNorm, which upcasts its input to fp32. Counting what the autograd graph of transformers'
    decoder layer saves (checked against autograd's saved tensors in tests/unit/test_memory_plan.py):
      2 RMSNorms   2 × (4h fp32 upcast + 4 rsqrt + 2h bf16 normalized input of the weight's product)
      matmul inputs 2h (q/k/v) + 2h (gate/up); o_proj's is the attention output, down_proj's the SwiGLU product
      attention    2·q + 2·2·kv (q after RoPE, k, v) + 2·q (output) + 4·n_heads (fp32 log-sum-exp)
      SwiGLU MLP   4 × 2·i (gate out = SiLU input, SiLU out, up out, their product = down_proj input)
    → 16h + 8 + 4q + 4kv + 4·n_heads + 8i bytes per token, q = n_heads·d, kv = n_kv·d (no K/V repetition:
    flash-attention, or sdpa with native GQA).
    LoRA (frozen base): a frozen weight needs no saved input, so the norms keep 4h + 4 each, no bf16 matmul inputs
    and no SwiGLU product are kept (6i); instead each adapted linear keeps the fp32 copy of its input that peft makes
    for fp32 adapters (4·in) and the adapter's r-wide intermediate (4·r), plus a 1-byte dropout mask per input
    element when lora_dropout > 0.
    """
    h, i, nh = c.hidden_size, c.intermediate_size, c.num_attention_heads
    q, kv = nh * head_dim(c), c.num_key_value_heads * head_dim(c)
    attention = 2 * q + 2 * 2 * kv + 2 * q + 4 * nh
    if not lora_r:
        return 2 * (4 * h + 4 + 2 * h) + 2 * h + 2 * h + attention + 4 * 2 * i
    adapters = sum(
        4 * n_in + 4 * lora_r + (n_in if lora_dropout > 0 else 0)
        for name, n_in, _, _ in layer_linears(c)
        if name in targets
    )
    return 2 * (4 * h + 4) + attention + 3 * 2 * i + adapters


def model_activation_bytes(c, lora: bool = False) -> int:
    """Per token, once per model: RoPE's cos and sin (bf16, head_dim each) and the final RMSNorm (whose bf16
    normalized input is kept only when its weight trains)."""
    return 2 * 2 * head_dim(c) + 4 * c.hidden_size + 4 + (0 if lora else 2 * c.hidden_size)


# -- the plan -------------------------------------------------------------------------------------------------
@dataclass
class Workload:
    """One micro-batch and the machine it runs on."""

    pairs: int = 2  # preference pairs per micro-batch (per GPU)
    seq_len: int = 2048  # tokens per row (prompt + completion, padded)
    prompt_len: int = 512  # of which prompt: the rest are completion tokens (the only ones the losses score)
    gpus: int = 8  # FSDP shards
    gpu_gib: float = 80.0
    reserve_gib: float = 4.0  # CUDA context, NCCL buffers, allocator fragmentation: kept free in the fit check
    chunk_elements: int = 1 << 25  # prefopt's train.chunk_elements: logits computed per chunk
    lora_r: int = 16
    lora_dropout: float = 0.0  # conf/model/lora/default.yaml
    prefetch_layers: int = 1  # FSDP2 all-gathers the next layer while the current one computes
    master_dtype_bytes: int = 4  # fp32 master parameters (4) or pure bf16 (2)

    @property
    def rows(self) -> int:
        return 2 * self.pairs  # chosen and rejected rows run through the model together

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_len

    @property
    def completion_tokens(self) -> int:
        return self.rows * max(self.seq_len - self.prompt_len, 0)


COMPONENTS = [
    # key, label in the table
    ("weights", "weights (FSDP: master-parameter shard; LoRA: frozen bf16 base)"),
    ("gathered", "all-gathered bf16 units in flight (root + 2 layers, 1 layer's fp32 grad)"),
    ("adapters", "LoRA adapter weights (fp32)"),
    ("grads", "gradients (FSDP: shard; LoRA: adapters, fp32)"),
    ("adamw", "AdamW state (2 per trained parameter)"),
    ("act_full", "activations, no checkpointing"),
    ("act_ckpt", "activations, checkpointing"),
    ("logits_plain", "logits: plain [rows, seq, vocab] fp32 + log-softmax"),
    ("logits_chunked", "logits: prefopt chunked completion-only log-probs"),
    ("ref_live", "reference live (bf16 weights + no_grad forward)"),
    ("ref_live_plain", "reference live, plain path (+ its full-vocab logits)"),
    ("ref_cached", "reference cached"),
]
TOTALS = [
    (
        "total_prefopt",
        "total: prefopt (checkpointing, chunked, reference live)",
        ("weights", "gathered", "adapters", "grads", "adamw", "act_ckpt", "logits_chunked", "ref_live"),
    ),
    (
        "total_cached",
        "total: prefopt with cached reference",
        ("weights", "gathered", "adapters", "grads", "adamw", "act_ckpt", "logits_chunked", "ref_cached"),
    ),
    (
        "total_plain",
        "total: plain (no checkpointing, full logits, reference live)",
        ("weights", "gathered", "adapters", "grads", "adamw", "act_full", "logits_plain", "ref_live_plain"),
    ),
]


def logits_bytes(c, w: Workload, head_trains: bool = True) -> dict[str, int]:
    """Plain: `model(...).logits.float()` and `log_softmax` kept for backward, 4 + 4 bytes per [rows, seq, vocab]
    element (backward then adds a gradient of the same size, not counted), and the LM head's bf16 input (2h per
    token) when the head trains. prefopt (`prefopt.logprobs`): the LM head runs only at completion positions,
    `chunk_elements` logits at a time, each chunk checkpointed; what stays is the gathered hidden states (2h) and
    the fp32 log-prob (4) per completion token, plus one chunk's working set at its peak in backward: bf16 + fp32
    logits, logsumexp's exp, and the fp32 + bf16 gradient (2 + 4 + 4 + 4 + 2 = 16 bytes per element). Under
    no_grad (the reference) the plain path still builds all of it (8 bytes per element); a chunk takes 10."""
    v = c.vocab_size
    full = w.rows * w.seq_len * v * (4 + 4)
    plain = full + (2 * c.hidden_size * w.tokens if head_trains else 0)
    chunk_rows = min(max(1, w.chunk_elements // v), w.completion_tokens)
    chunked = chunk_rows * v * 16 + w.completion_tokens * (2 * c.hidden_size + 4)
    return {
        "plain": plain,
        "chunked": chunked,
        "chunk_forward_nograd": chunk_rows * v * 10,
        "plain_forward_nograd": full,
    }


def activation_bytes(c, w: Workload, lora: bool = False) -> dict[str, int]:
    """Without checkpointing every layer keeps its activations; with it (one checkpoint per decoder layer) each layer
    keeps only its bf16 input (2h per token) and backward recomputes one layer at a time. Both add what the model
    keeps once (`model_activation_bytes`)."""
    per_layer = layer_activation_bytes(c, w.lora_r if lora else 0, w.lora_dropout)
    once = model_activation_bytes(c, lora) * w.tokens
    full = c.num_hidden_layers * per_layer * w.tokens + once
    ckpt = c.num_hidden_layers * 2 * c.hidden_size * w.tokens + per_layer * w.tokens + once
    return {"per_layer_per_token": per_layer, "full": full, "ckpt": ckpt, "one_layer": per_layer * w.tokens}


def fsdp_plan(c, w: Workload) -> dict[str, int]:
    """Full fine-tuning, FSDP2 full shard over w.gpus: bytes per GPU per component.

    Sharded (÷ N): master parameters, gradients and AdamW's two states, each in the master dtype (fp32: 4 + 4 + 8
    bytes per parameter). Gathered in flight (not sharded): the root unit (embeddings, final norm, LM head: prefopt
    shards each decoder layer, then the rest as the root, which FSDP2 keeps unsharded from forward to backward) and
    the current + prefetched decoder layer in bf16, and in backward one layer's unsharded gradient, cast to fp32 for
    the reduce-scatter. Activations and logits are per GPU (each runs its own micro-batch).
    Reference live: a frozen bf16 copy sharded the same way (2 bytes per parameter ÷ N), its own gathered units
    while it runs, and its forward under no_grad, which keeps nothing: at most one layer's working set (bounded by
    what one layer saves) or the logits it builds. Cached: 0 (log-probs read from the reference cache).
    """
    p, n = param_counts(c), w.gpus
    act, lg = activation_bytes(c, w), logits_bytes(c, w)
    gathered = 2 * (p["root"] + (1 + w.prefetch_layers) * p["layer"]) + 4 * p["layer"]
    ref_weights = 2 * p["total"] // n + 2 * (p["root"] + (1 + w.prefetch_layers) * p["layer"])
    return {
        "weights": w.master_dtype_bytes * p["total"] // n,
        "gathered": gathered,
        "adapters": 0,
        "grads": w.master_dtype_bytes * p["total"] // n,
        "adamw": 2 * w.master_dtype_bytes * p["total"] // n,
        "act_full": act["full"],
        "act_ckpt": act["ckpt"],
        "logits_plain": lg["plain"],
        "logits_chunked": lg["chunked"],
        "ref_live": ref_weights + max(act["one_layer"], lg["chunk_forward_nograd"]),
        "ref_live_plain": ref_weights + max(act["one_layer"], lg["plain_forward_nograd"]),
        "ref_cached": 0,
    }


def lora_plan(c, w: Workload) -> dict[str, int]:
    """LoRA on one GPU: frozen bf16 base, fp32 adapters with fp32 gradients and AdamW state. The reference is the
    same base with the adapters disabled: no second copy, only its no_grad forward."""
    p, a = param_counts(c), lora_param_count(c, w.lora_r)
    act, lg = activation_bytes(c, w, lora=True), logits_bytes(c, w, head_trains=False)
    base_one_layer = activation_bytes(c, w)["one_layer"]
    return {
        "weights": 2 * p["total"],
        "gathered": 0,
        "adapters": 4 * a,
        "grads": 4 * a,
        "adamw": 8 * a,
        "act_full": act["full"],
        "act_ckpt": act["ckpt"],
        "logits_plain": lg["plain"],
        "logits_chunked": lg["chunked"],
        "ref_live": max(base_one_layer, lg["chunk_forward_nograd"]),
        "ref_live_plain": max(base_one_layer, lg["plain_forward_nograd"]),
        "ref_cached": 0,
    }


def with_totals(parts: dict[str, int]) -> dict[str, int]:
    out = dict(parts)
    for key, _, keys in TOTALS:
        out[key] = sum(parts[k] for k in keys)
    return out


def fits(total_bytes: int, w: Workload) -> bool:
    return total_bytes + w.reserve_gib * GIB <= w.gpu_gib * GIB


def plan(models: dict[str, object], w: Workload) -> dict:
    """{name: {"params", "lora_params", "vocab_size", "scenarios": {"fsdp": {...}, "lora": {...}}}} in bytes."""
    out = {}
    for name, c in models.items():
        if w.seq_len > c.max_position_embeddings:
            print(
                f"warning: {name}: seq_len {w.seq_len} > max_position_embeddings {c.max_position_embeddings}",
                file=sys.stderr,
            )
        out[name] = {
            "params": param_counts(c)["total"],
            "lora_params": lora_param_count(c, w.lora_r),
            "vocab_size": c.vocab_size,
            "max_position_embeddings": c.max_position_embeddings,
            "activation_bytes_per_token_per_layer": layer_activation_bytes(c),
            "scenarios": {"fsdp": with_totals(fsdp_plan(c, w)), "lora": with_totals(lora_plan(c, w))},
        }
    return out


def _gib(b: int) -> str:
    return "–" if b == 0 else f"{b / GIB:.2f}"


def markdown(result: dict, w: Workload) -> str:
    """One column per (model, set-up), one row per component; totals say whether they fit."""
    cols = [(name, s) for name in result for s in ("fsdp", "lora")]
    title = {"fsdp": f"FSDP ×{w.gpus}", "lora": "LoRA ×1"}
    head = "| GiB per GPU | " + " | ".join(f"{n} {title[s]}" for n, s in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]

    def params(n: str, s: str) -> str:
        lora = f" (+{result[n]['lora_params'] / 1e6:.1f} M LoRA)" if s == "lora" else ""
        return f"{result[n]['params'] / 1e9:.2f} B{lora}"

    lines.append("| parameters | " + " | ".join(params(n, s) for n, s in cols) + " |")
    lines.append("| vocabulary | " + " | ".join(f"{result[n]['vocab_size']:,}" for n, s in cols) + " |")
    for key, label in COMPONENTS:
        lines.append(f"| {label} | " + " | ".join(_gib(result[n]["scenarios"][s][key]) for n, s in cols) + " |")
    for key, label, _ in TOTALS:
        cells = []
        for n, s in cols:
            b = result[n]["scenarios"][s][key]
            cells.append(f"**{b / GIB:.1f}** " + ("fits" if fits(b, w) else "does not fit"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(w: Workload) -> str:
    return (
        f"Micro-batch per GPU: {w.pairs} pairs × 2 sequences × {w.seq_len} tokens ({w.tokens:,} tokens, "
        f"{w.completion_tokens:,} of them completion tokens after {w.prompt_len}-token prompts); "
        f"logits chunk {w.chunk_elements:,} elements; FSDP master parameters, gradients and AdamW state in "
        f"{'fp32' if w.master_dtype_bytes == 4 else 'bf16'}; LoRA r={w.lora_r} on {', '.join(LORA_TARGETS)}. "
        f"Fits = total + {w.reserve_gib:g} GiB reserve (CUDA context, NCCL, fragmentation) ≤ {w.gpu_gib:g} GiB."
    )


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = Workload()
    ap.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="PATH",
        help="a local config.json (or its directory); repeatable; replaces the published models",
    )
    ap.add_argument("--pairs", type=int, default=d.pairs, help="preference pairs per micro-batch per GPU")
    ap.add_argument("--seq-len", type=int, default=d.seq_len)
    ap.add_argument("--prompt-len", type=int, default=d.prompt_len)
    ap.add_argument("--gpus", type=int, default=d.gpus, help="FSDP shards")
    ap.add_argument("--gpu-gib", type=float, default=d.gpu_gib)
    ap.add_argument("--reserve-gib", type=float, default=d.reserve_gib)
    ap.add_argument("--chunk-elements", type=int, default=d.chunk_elements)
    ap.add_argument("--lora-r", type=int, default=d.lora_r)
    ap.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    ap.add_argument(
        "--master",
        choices=("fp32", "bf16"),
        default="fp32",
        help="FSDP's sharded parameters (and so gradients and AdamW state): fp32 master or pure bf16",
    )
    ap.add_argument("--json", metavar="PATH", help="also write the numbers (bytes) and assumptions as JSON")
    ap.add_argument("--explain", action="store_true", help="print the formulas after the table")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    w = Workload(
        pairs=args.pairs,
        seq_len=args.seq_len,
        prompt_len=args.prompt_len,
        gpus=args.gpus,
        gpu_gib=args.gpu_gib,
        reserve_gib=args.reserve_gib,
        chunk_elements=args.chunk_elements,
        lora_r=args.lora_r,
        lora_dropout=args.lora_dropout,
        master_dtype_bytes=4 if args.master == "fp32" else 2,
    )
    if args.config:
        models = dict(load_config(p) for p in args.config)
    else:
        models = {name: make_config(mt, values) for name, (mt, values) in PUBLISHED.items()}
    result = plan(models, w)
    print(markdown(result, w))
    print()
    print(describe(w))
    if args.explain:
        for fn in (layer_activation_bytes, activation_bytes, logits_bytes, fsdp_plan, lora_plan):
            print(f"\n{fn.__name__}: {fn.__doc__}")
    if args.json:
        Path(args.json).write_text(json.dumps({"workload": asdict(w), "models": result}, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
