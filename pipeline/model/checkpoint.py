"""Training state on disk without pickles: written atomically, verified before it is read, refused when damaged.

A state folder holds the trainer's float32 weights (`model.safetensors`), the optimizer and scheduler state dicts
(`*.pt`, read with `torch.load(weights_only=True)`: tensors and plain containers only, so a planted pickle cannot
run code), the step and the history so far (`progress.json`), and `digests.json`, the sha256 of every other file,
written last; `load_state` re-hashes every file against it before reading anything. A round's `state/` is this
format inside a verified stage output; SFT's resumable checkpoints are `step-N` folders of it under the stage's
work folder, where a damaged one is discarded (the next older one, or a fresh start, takes its place).

RNG: a work checkpoint (`save_checkpoint`) also holds every process's torch generator states (`rng-<rank>.pt`:
dropout draws from them, so a resumed fit continues them exactly). A round's state/ holds none: a round reseeds
every generator from (train seed, round) before its steps, and a published output must not carry process-global
state that other threads of the process (Prefect's) draw from. Python's and numpy's generators are never saved:
training draws from neither after its seeding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.model.trainer import Trainer, full_weights

__all__ = ["StateError", "save_state", "load_state", "save_checkpoint", "resume_latest", "checkpoints"]

log = logging.getLogger(__name__)

DIGESTS = "digests.json"


class StateError(RuntimeError):
    """A state folder that is incomplete or whose files do not match their recorded digests."""


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _rng_state() -> dict:
    """This process's torch generator states (CPU, and every CUDA device's), as tensors."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(trainer: Trainer, folder: Path, history: list[dict[str, float]] | None = None, *,
               rng: bool = False) -> Path:
    """Write the trainer's state into `folder` (which must not exist yet): with `rng`, each process its torch
    generator states; the main process the weights, optimizer, scheduler, progress and, last, the digests."""
    acc = trainer.accelerator
    if acc.is_main_process:
        folder.mkdir(parents=True)
    acc.wait_for_everyone()
    if rng:
        torch.save(_rng_state(), folder / f"rng-{acc.process_index}.pt")
        acc.wait_for_everyone()
    weights, optimizer = _full_state(trainer) if trainer.sharded or acc.is_main_process else (None, None)
    if acc.is_main_process:
        weights = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
        save_file(_untied(weights), str(folder / "model.safetensors"))
        torch.save(optimizer, folder / "optimizer.pt")
        torch.save(trainer.scheduler.state_dict(), folder / "scheduler.pt")
        progress = {"step": trainer.progress.step, "processes": acc.num_processes, "history": history or []}
        (folder / "progress.json").write_text(json.dumps(progress))
        files = sorted(p.name for p in folder.iterdir())
        (folder / DIGESTS).write_text(json.dumps({name: _sha(folder / name) for name in files}, indent=1))
    acc.wait_for_everyone()
    return folder


def _full_state(trainer: Trainer) -> tuple[dict | None, dict | None]:
    """(weights, optimizer state) whole: the live ones, or under FSDP2 gathered from the shards (a collective;
    the main process gets them, keyed by parameter name)."""
    if not trainer.sharded:
        return full_weights(trainer), trainer.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optimizer = get_optimizer_state_dict(trainer.scorer, trainer.optimizer, options=options)
    weights = full_weights(trainer)  # None off the main process
    return (weights, optimizer) if trainer.accelerator.is_main_process else (None, None)


def _load_full_state(trainer: Trainer, weights: dict, optimizer: dict) -> None:
    """Weights and optimizer state saved whole, into the live (or sharded) trainer."""
    if not trainer.sharded:
        trainer.model.load_state_dict(weights, strict=False)
        trainer.optimizer.load_state_dict(optimizer)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, set_model_state_dict, set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(trainer.scorer, {f"lm.{k}": v for k, v in weights.items()}, options=options)
    set_optimizer_state_dict(trainer.scorer, trainer.optimizer, optimizer, options=options)


def _untied(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): give each name its own copy."""
    seen: set[int] = set()
    out = {}
    for name, tensor in weights.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


def verify_state(folder: Path) -> None:
    """Raise StateError unless every file of the folder is listed in its digests and matches them."""
    if not (folder / DIGESTS).is_file():
        raise StateError(f"{folder}: no {DIGESTS} (an incomplete or foreign state folder)")
    recorded = json.loads((folder / DIGESTS).read_text())
    present = {p.name for p in folder.iterdir() if p.name != DIGESTS}
    if present != set(recorded):
        raise StateError(f"{folder}: files {sorted(present ^ set(recorded))} differ from {DIGESTS}")
    for name, digest in recorded.items():
        if (folder / name).is_symlink() or _sha(folder / name) != digest:
            raise StateError(f"{folder / name}: content does not match its recorded sha256")


def load_state(trainer: Trainer, folder: Path) -> list[dict[str, float]]:
    """Verify, then restore weights, optimizer, scheduler, progress and this process's torch generators (when the
    folder holds them); returns the history the state was saved with."""
    verify_state(folder)
    acc = trainer.accelerator
    progress = json.loads((folder / "progress.json").read_text())
    if progress["processes"] != acc.num_processes:
        raise StateError(f"{folder}: saved by {progress['processes']} processes, resumed by {acc.num_processes}")
    weights = load_file(str(folder / "model.safetensors"))  # everything is read before anything is applied
    optimizer, scheduler = (torch.load(folder / name, weights_only=True) for name in ("optimizer.pt", "scheduler.pt"))
    rng_file = folder / f"rng-{acc.process_index}.pt"
    rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
    _load_full_state(trainer, weights, optimizer)
    trainer.scheduler.load_state_dict(scheduler)
    if rng is not None:
        _set_rng_state(rng)
    trainer.progress.step = int(progress["step"])
    return list(progress["history"])


def checkpoints(root: Path) -> list[Path]:
    """The complete `step-N` checkpoints under root, oldest first."""
    return sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1])) if root.exists() else []


def save_checkpoint(trainer: Trainer, root: Path, history: list[dict[str, float]], *, keep: int) -> Path:
    """A `step-N` checkpoint written into a temp folder and renamed into place (a crash never leaves a half-written
    one that resume would pick up); only the newest `keep` are kept."""
    acc = trainer.accelerator
    final = root / f"step-{trainer.progress.step:08d}"
    tmp = root / f".tmp-{final.name}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    save_state(trainer, tmp, history, rng=True)
    if acc.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    acc.wait_for_everyone()
    return final


def resume_latest(trainer: Trainer, root: Path) -> tuple[Path | None, list[dict[str, float]]]:
    """Load the newest checkpoint under root that verifies, and its history; a damaged one is discarded (logged)
    and the next older one tried. (None, []) when none is left: training starts fresh."""
    acc = trainer.accelerator
    for folder in reversed(checkpoints(root)):
        try:
            return folder, load_state(trainer, folder)
        except (StateError, OSError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
            log.warning("discarding checkpoint %s: %s", folder, exc)
            acc.wait_for_everyone()
            if acc.is_main_process:
                shutil.rmtree(folder, ignore_errors=True)
            acc.wait_for_everyone()
    return None, []
