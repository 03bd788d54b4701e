"""PEFT LoRA adapters in the registry (adapter_config.json + adapter_model.safetensors): inspected,
verified on their base, converted to and from litgpt LoRA runs (ops/adapters.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qkvconv.errors import QkvconvError
from qkvconv.formats.base import Format
from qkvconv.formats.hf.config import HF_CONFIG
from qkvconv.formats.litgpt.checkpoint import (
    CONFIG,
    HYPERPARAMETERS,
    LORA_WEIGHTS,
    LoraHyperparameters,
    ModelShape,
    load_state_dict_file,
)
from qkvconv.formats.weights import AdaptedWeights, ModelWeights, PlannedWeights, open_weights
from qkvconv.io.config_files import read_json, read_yaml
from qkvconv.formats.peft.modules import PEFT_CONFIG, base_config_json


class Peft(Format):
    name = "peft"
    adapter = True
    configs = (PEFT_CONFIG,)

    def inspect(self, directory: Path, base: Path | None = None) -> dict[str, Any]:
        from qkvconv.formats.peft.inspect import inspect_peft

        return inspect_peft(directory)

    def weights(self, source: Path, base: Path | None = None, base_option: str = "--base") -> Any:
        return _weights_on_base(source, base=base, base_option=base_option)


def peft_base_config(
    directory: Path, base: Path | None, *, option: str = "--base"
) -> tuple[dict[str, Any], str | None]:
    """The base model's config.json and its directory as an absolute path (a LoRA run written from it
    must find it from anywhere): `base` (given as `option`), or the adapter's base_model_name_or_path
    (a local directory or a Hub repo id from the cache)."""
    from qkvconv.io import sources

    given = base is not None
    if base is None:
        name = read_json(directory / PEFT_CONFIG).get("base_model_name_or_path")
        if not name:
            raise QkvconvError(f"{directory / PEFT_CONFIG} names no base model; pass the base HF directory with {option}")
        base = sources.resolve(name)
    base = base.resolve()
    config_json = base_config_json(base)
    if config_json is not None:
        return config_json, str(base)
    where = f"{option} {base}" if given else f"the base {base}"
    raise QkvconvError(f"{where} has no {HF_CONFIG} or {CONFIG}")


def _weights_on_base(directory: Path, *, base: Path | None = None, base_option: str = "--base") -> AdaptedWeights:
    """A PEFT adapter on its base (--base, else the adapter's base_model_name_or_path): HF or litgpt."""
    import tempfile

    from qkvconv.formats.peft import peft_to_litgpt_lora

    config_json, base_name = peft_base_config(directory, base, option=base_option)
    assert base_name is not None
    inner = open_weights(Path(base_name))
    if not isinstance(inner, (ModelWeights, PlannedWeights)) or getattr(inner, "adapter", None) is not None:
        raise QkvconvError(f"the base of {directory} must be a full model, not an adapter: {base_name}")
    with tempfile.TemporaryDirectory(prefix="qkvconv-") as tmp:
        run = Path(tmp) / "run"
        # verify reports NaN/inf; the base may be a class only the reference pass computes (GPT-2, ...)
        imported = peft_to_litgpt_lora(directory, run, hf_config=config_json, allow_nonfinite=True, reference=True)
        adapter = load_state_dict_file(run / LORA_WEIGHTS)
        tensors = {k: v.clone() for k, v in adapter.tensors.items()}  # off the temporary file
        lora = LoraHyperparameters.from_yaml(read_yaml(run / HYPERPARAMETERS), run / HYPERPARAMETERS)
        shape = ModelShape.from_config(read_yaml(run / CONFIG), run / CONFIG)
    readings = [f"PEFT adapter {directory}: {note}" for note in imported.storage]
    return AdaptedWeights(f"{directory} (PEFT on {base_name})", inner, tensors, lora, shape.heads,
                          [*getattr(inner, "readings", []), *readings])


FORMAT = Peft()
