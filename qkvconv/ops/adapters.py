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
from qkvconv.formats.hf.config import HF_CONFIG, detect_family, litgpt_config_from_hf, require_family
from qkvconv.formats.hf.rules import hf_config_for, kept_config, qkv_note
from qkvconv.formats.litgpt import CONFIG, HYPERPARAMETERS, WEIGHTS, LitgptCheckpoint, migrate_config, open_litgpt
from qkvconv.formats.peft.format import peft_base_config


def check_qkv_target(qkv: str | None, to: str) -> None:
    """Refuse --qkv with a target format that cannot hold that fusion, saying where it can go."""
    target = formats.get(to).load()
    if qkv is not None and target.qkv is not None and target.qkv != qkv:
        raise QkvconvError(f"--qkv {qkv} with --to {to}: {target.qkv_refusal}")


def convert_adapter(directory: Path, src_format: str, to: str, out: Path, base: Path | None, qkv: str | None,
                    *, allow_nonfinite: bool = False, target_base: Path | None = None) -> list[str]:
    """Write the adapter at `directory` as format `to` into `out`; returns the notes of what was done.
    `target_base`: a PEFT adapter re-targeted onto that base (the same model in other modules)."""
    from qkvconv.formats import peft as peft_format

    check_qkv_target(qkv, "litgpt-lora" if to == "litgpt" else to)
    if target_base is not None:
        if src_format != "peft" or to != "peft":
            raise QkvconvError(f"--target-base puts a PEFT adapter onto another base of the same model (--to peft); "
                               f"not {src_format} to {to}")
        result = _peft_onto(directory, out, base, target_base, qkv, allow_nonfinite=allow_nonfinite)
    elif src_format == "litgpt-lora" and to == "peft":
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


def _peft_onto(directory: Path, out: Path, base: Path | None, target_base: Path, qkv: str | None, *,
               allow_nonfinite: bool = False) -> Any:
    """A PEFT adapter on its base (--base, else base_model_name_or_path) written for `target_base`, which must
    compute the same model in its own modules: a twin's adapter back onto the remote-code original's fused
    modules (formats/peft/retarget.py), or the other way."""
    from qkvconv.formats.peft.modules import base_config_json
    from qkvconv.formats.peft.retarget import retarget_peft

    source_json, base_name = peft_base_config(directory, base)
    target = target_base.resolve()
    target_json = base_config_json(target)
    if target_json is None:
        raise QkvconvError(f"--target-base {target_base} has no {HF_CONFIG} or {CONFIG}")
    family = require_family(target_json)
    if qkv is not None and family.fusion != qkv:
        raise QkvconvError(f"--qkv {qkv} with --target-base {target_base}: {family.architecture} holds q, k and v "
                           f"{'fused' if family.fusion == 'fused' else 'split'}; leave --qkv out")
    return retarget_peft(directory, out, source_json=source_json, target_json=target_json,
                         source_name=base_name or "the adapter's base", target_name=str(target),
                         allow_nonfinite=allow_nonfinite)


def _hf_config_of_litgpt_base(ckpt: LitgptCheckpoint, base_dir: Path | None, qkv: str | None = None) -> dict[str, Any]:
    cfg = migrate_config(ckpt.config)[0]
    kept = kept_config(base_dir, cfg) if base_dir is not None else None
    family = detect_family(kept) if kept else None
    if family is not None and qkv in (None, family.fusion):
        return kept  # type: ignore[return-value]
    return hf_config_for(cfg, kept, qkv)
