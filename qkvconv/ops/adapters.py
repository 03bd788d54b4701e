"""Adapter conversions: litgpt LoRA run <-> PEFT adapter, and PEFT -> PEFT for the architecture with the
other QKV fusion (--qkv: Phi-3 qkv_proj <-> Llama q/k/v_proj). Adapters are small: they convert in
memory, each direction exact and checked (formats/peft). NaN/inf in an adapter is refused unless
`allow_nonfinite`."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from qkvconv import formats
from qkvconv.errors import QkvconvError
from qkvconv.formats.hf.config import detect_family, litgpt_config_from_hf
from qkvconv.formats.hf.rules import hf_config_for, kept_config, qkv_note
from qkvconv.formats.litgpt import HYPERPARAMETERS, WEIGHTS, LitgptCheckpoint, migrate_config, open_litgpt
from qkvconv.formats.peft.format import peft_base_config


def check_qkv_target(qkv: str | None, to: str) -> None:
    """Refuse --qkv with a target format that cannot hold that fusion, saying where it can go."""
    target = formats.get(to).load()
    if qkv is not None and target.qkv is not None and target.qkv != qkv:
        raise QkvconvError(f"--qkv {qkv} with --to {to}: {target.qkv_refusal}")


def convert_adapter(directory: Path, src_format: str, to: str, out: Path, base: Path | None, qkv: str | None,
                    *, allow_nonfinite: bool = False) -> list[str]:
    """Write the adapter at `directory` as format `to` into `out`; returns the notes of what was done."""
    from qkvconv.formats import peft as peft_format

    check_qkv_target(qkv, "litgpt-lora" if to == "litgpt" else to)
    if src_format == "litgpt-lora" and to == "peft":
        ckpt = open_litgpt(directory)
        base_dir = ckpt.find_base(base)
        hf_config = _hf_config_of_litgpt_base(ckpt, base_dir, qkv)
        result = peft_format.litgpt_lora_to_peft(directory, out, hf_config=hf_config,
                                                 base_model_name_or_path=str(base_dir) if base_dir else None,
                                                 allow_nonfinite=allow_nonfinite)
    elif src_format == "peft" and to in ("litgpt-lora", "litgpt"):
        hf_config, base_name = peft_base_config(directory, base)
        result = peft_format.peft_to_litgpt_lora(directory, out, hf_config=hf_config, checkpoint_dir=base_name,
                                                 allow_nonfinite=allow_nonfinite)
        if base_name is not None and not (Path(base_name) / WEIGHTS).is_file():
            result.notes.append(
                f"{HYPERPARAMETERS} checkpoint_dir is the Hugging Face base {base_name}: `qkvconv verify` reads it, "
                f"but litgpt loads a litgpt base only: run `qkvconv convert {base_name} --to litgpt --out BASE` and "
                "set checkpoint_dir to BASE")
    elif src_format == "peft" and to == "peft" and qkv is not None:
        result = _peft_to_peft(directory, out, base, qkv, allow_nonfinite=allow_nonfinite)
    else:
        raise QkvconvError(
            f"cannot convert {src_format} to {to}: adapters convert between litgpt-lora and peft, and peft to peft "
            "with --qkv (merge a litgpt LoRA run into its base with `--to litgpt --merge`)"
        )
    return result.notes


def _peft_to_peft(directory: Path, out: Path, base: Path | None, qkv: str, *, allow_nonfinite: bool = False) -> Any:
    """A PEFT adapter for the architecture with the other QKV fusion (Phi-3 qkv_proj <-> Llama q/k/v_proj).

    Goes through a litgpt LoRA run in a temporary directory: litgpt's fused adapter holds a block per
    q, k and v, so both steps are the exact, checked conversions above, and the export merges the
    blocks back to one shared lora_A where they are equal (a fused adapter split into q/k/v keeps its
    rank r; q/k/v adapters sharing one lora_A fuse at rank r, otherwise at the sum of their ranks).
    """
    from qkvconv.formats import peft as peft_format

    source_json, base_name = peft_base_config(directory, base)
    target_json = hf_config_for(litgpt_config_from_hf(source_json), source_json, qkv)
    with tempfile.TemporaryDirectory(prefix="qkvconv-") as tmp:
        run = Path(tmp) / "run"
        imported = peft_format.peft_to_litgpt_lora(directory, run, hf_config=source_json, checkpoint_dir=base_name,
                                                   allow_nonfinite=allow_nonfinite)
        result = peft_format.litgpt_lora_to_peft(run, out, hf_config=target_json, allow_nonfinite=allow_nonfinite)
    result.notes[:0] = [qkv_note(target_json, source_json, qkv), *imported.rounding,
                        f"base_model_name_or_path is left empty: load the adapter on the base converted alike "
                        f"(qkvconv convert {base_name or 'BASE'} --to hf --qkv {qkv} --out DIR)"]
    return result


def _hf_config_of_litgpt_base(ckpt: LitgptCheckpoint, base_dir: Path | None, qkv: str | None = None) -> dict[str, Any]:
    cfg = migrate_config(ckpt.config)[0]
    kept = kept_config(base_dir, cfg) if base_dir is not None else None
    family = detect_family(kept) if kept else None
    if family is not None and qkv in (None, family.fusion):
        return kept  # type: ignore[return-value]
    return hf_config_for(cfg, kept, qkv)
