"""Atomic checkpoints: written under a temporary name, completed with a marker, then renamed into place.

A kill at any moment leaves either the previous checkpoint or the new one, never a half-written
`step_*` directory; a checkpoint without its marker (or one that fails to load) is passed over. A failed
write (disk full, permission, read-only) removes the partial one and stops with one line naming the path,
the errno text and the last complete checkpoint (`prefopt.io`); what a killed save left is removed at the
next start (`remove_partial`).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file

from prefopt.io import atomic_dir, remove_leftovers

log = logging.getLogger(__name__)

MARKER = "COMPLETE"


def last_complete(ckpt_dir: Path) -> str:
    """Where a run can go on from, for error messages: the newest complete checkpoint, or that there is none."""
    found = list_checkpoints(ckpt_dir)
    if found:
        return f"the last complete checkpoint is {found[-1]}; rerun the same command to resume from it"
    return f"no complete checkpoint in {ckpt_dir} yet"


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    model: torch.nn.Module,
    trainer_state: dict,
    keep: int = 2,
    state_dict: dict | None = None,
) -> Path:
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step_{step:08d}"
    with atomic_dir(final, what="checkpoint", note=lambda: last_complete(ckpt_dir)) as tmp:
        cast(Any, model).save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        # Through a Python file, so that a failed write (ENOSPC) reaches us as the OSError behind torch's
        # `[enforce fail at inline_container.cc]`, not as that message alone.
        with open(tmp / "trainer.pt", "wb") as fh:
            torch.save(trainer_state, fh)
        (tmp / MARKER).write_text(str(step))
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial(ckpt_dir: Path) -> list[Path]:
    """Remove what a killed save left (`.tmp-step_*`): on a full disk it holds the space the next save needs."""
    return remove_leftovers(ckpt_dir)


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob("step_*") if p.is_dir() and (p / MARKER).exists()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    if hasattr(model, "peft_config"):  # a LoRA policy: its checkpoints hold the adapters only
        from peft import set_peft_model_state_dict

        result: Any = set_peft_model_state_dict(model, load_file(Path(path) / "adapter_model.safetensors"))
        if result.unexpected_keys:
            raise RuntimeError(f"{path}: adapter weights do not match the model ({result.unexpected_keys[:5]})")
        return
    state = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(shard))
    if not state:
        raise FileNotFoundError(f"{path}: no *.safetensors weights")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if getattr(model.config, "tie_word_embeddings", False) and k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"{path}: weights do not match the model (missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})"
        )
    if tied:
        cast(Any, model).tie_weights()


def load_latest(ckpt_dir: Path, model: torch.nn.Module) -> tuple[Path, dict] | None:
    """Load the newest checkpoint that loads; a corrupt newest one is reported and the previous one used."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
            load_model_weights(model, path)
            return path, state
        except Exception as exc:  # noqa: BLE001 - any damage means "use an older one"
            log.warning("checkpoint %s is unreadable (%s: %s); trying the previous one", path, type(exc).__name__, exc)
    return None
