"""The Hugging Face format in the registry: a directory with config.json and safetensors (or .bin)
weights, read and written through the family table (families.py); rotary in half order only.

`inspect` of a safetensors directory imports no torch (importing it costs seconds, more than the rest
of the command): the tensors' names, shapes and dtypes come from the safetensors headers
(io/safetensors_header.py), and config.json is checked against them by planning the conversion on
shapes alone. The modules that touch tensors (readers, transforms, writers) are imported by the
methods that need them.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qkvconv.errors import QkvconvError, UnsupportedFamily
from qkvconv.formats.base import Format, Source, Transformations, file_list, tensor_summary
from qkvconv.formats.hf.config import (
    HF_CONFIG, _heads, _int, _read, detect_family, litgpt_config_from_hf, require_family)
from qkvconv.formats.hf.describe import describe_layout
from qkvconv.formats.hf.families import FAMILIES, SUPPORTED_ARCHITECTURES
from qkvconv.formats.hf.reference import base_model_prefix
from qkvconv.formats.hf.rules import hf_config_for, qkv_note, require_same_model, tied
from qkvconv.formats.hf.table import Fused, Split
from qkvconv.formats.hf.variants import read_config_json
from qkvconv.model.rotary import RopeOrder

if TYPE_CHECKING:
    from qkvconv.io.readers import TensorMeta, TensorReader
    from qkvconv.plans.plan import Plan
    from qkvconv.plans.transforms import ModelPlan


class HuggingFace(Format):
    name = "hf"
    rope = RopeOrder.HALF
    rope_refusal = ("transformers' models of the families qkvconv maps apply rotary in half order only (rotate_half), "
                    "Glm's excepted, so --to hf writes half but for a Glm model; for pairs write --to litgpt "
                    "(rope_interleave: true) or --to meta")
    configs = (HF_CONFIG,)

    def rope_for(self, source_json: dict[str, Any] | None, written_as: dict[str, Any] | None = None
                 ) -> RopeOrder | None:
        """Half, but pairs where the class written from this source rotates in pairs (Glm, ChatGLM's twin);
        `written_as`: the config.json written (--target-base), whose family's own order it is."""
        if written_as is not None:
            family = detect_family(written_as)
            return RopeOrder.PAIRS if family is not None and family.rotary_order == "pairs" else self.rope
        family = detect_family(source_json) if source_json else None
        written = FAMILIES.get(family.twin or family.architecture) if family is not None else None
        return RopeOrder.PAIRS if written is not None and written.rotary_order == "pairs" else self.rope

    def inspect(self, directory: Path, base: Path | None = None) -> dict[str, Any]:
        """The family table says where q/k/v live and in which order; an architecture outside the table
        still gets what config.json and the files tell. Safetensors weights are read from their headers
        without torch; pickled ones (pytorch_model.bin) need torch.load."""
        from qkvconv.io.sharded import open_headers

        config_json = read_config_json(directory / HF_CONFIG)
        reader = open_headers(directory)
        if reader is None:  # pickles, or no weights at all (open_reader says which it expected)
            from qkvconv.io.readers import open_reader

            reader = open_reader(directory)
        return self.report(directory, config_json, reader)

    def report(self, directory: Path, config_json: dict[str, Any], reader: Any) -> dict[str, Any]:
        """The inspect report from config.json and tensor metadata (`reader`: names, meta with shape,
        dtype, numel): the same whether a torch reader or the safetensors headers serve them."""
        dtype, parameters = tensor_summary(reader)
        architecture = (config_json.get("architectures") or [config_json.get("model_type")])[0]
        layout = describe_layout(config_json)
        family = detect_family(config_json) if layout is not None else None
        prefix = base_model_prefix(family, reader.names()) if family is not None else None
        if prefix is not None:  # saved from the base model (GPT-2's Hub naming): transformers adds the prefix
            from qkvconv.io.sharded import PrefixedReader

            reader = PrefixedReader(reader, prefix)
        notes: list[str] = []
        refusal = litgpt_refusal(config_json) if layout is not None else None
        if refusal is not None:  # the layout still holds: its q/k/v shapes are checked, and the refusal told
            check_qkv_shapes(config_json, reader, directory)
            notes.append(f"not convertible to litgpt: {refusal}")
        elif layout is not None:
            check_shapes(config_json, reader, directory)
        else:
            n_head = config_json.get("num_attention_heads")
            layout = {"family": None, "qkv": None, "qkv_order": None, "n_head": n_head,
                      "n_query_groups": config_json.get("num_key_value_heads", n_head),
                      "head_size": config_json.get("head_dim"), "attention": None,
                      "evidence": "architecture not in qkvconv's family table: the QKV order cannot be interpreted"}
            notes.append(f"{architecture} is not supported for conversion; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        return {
            "rope": hf_rope(config_json) if layout["family"] is not None else None,
            "source": str(directory), "format": self.name, "family": layout["family"],
            "model": config_json.get("_name_or_path") or None, "architecture": architecture,
            "legacy": False, "naming": layout["qkv"], "qkv_order": layout["qkv_order"],
            "evidence": [layout["evidence"], *layout.get("details", [])],
            "n_layer": layout.get("n_layer", config_json.get("num_hidden_layers", config_json.get("n_layer"))),
            "n_head": layout["n_head"], "n_query_groups": layout["n_query_groups"], "head_size": layout["head_size"],
            "n_embd": layout.get("n_embd", config_json.get("hidden_size", config_json.get("n_embd"))), "attention": layout["attention"],
            "lora": None, "dtype": dtype, "parameters": parameters, "files": file_list(directory), "notes": notes,
        }

    def weights(self, source: Path, base: Path | None = None, base_option: str = "--base") -> Any:
        from qkvconv.formats.weights import hf_weights

        return hf_weights(source)

    def source(self, directory: Path) -> Source:
        from qkvconv.formats.hf.plans import plan_hf_to_litgpt
        from qkvconv.io.readers import open_reader
        from qkvconv.plans.plan import Plan
        from qkvconv.plans.transforms import ModelPlan

        config_json = read_config_json(directory / HF_CONFIG)
        reader = open_reader(directory)
        plan = plan_hf_to_litgpt(config_json, reader.names())
        model = ModelPlan(Plan(plan.recipes, notes=plan.notes), litgpt_config_from_hf(config_json))
        return Source(model, reader, config_json, tied(config_json))

    def reference_source(self, directory: Path) -> Source:
        """For the classes litgpt cannot express (Family.verifiable: GPT-2, Bloom, MPT, ...) verify's reading of
        them (formats/weights.py hf_weights); every other class as `source` reads it."""
        from qkvconv.formats.hf.plans import plan_hf_for_reference
        from qkvconv.formats.hf.reference import reference_config_from_hf
        from qkvconv.io.readers import open_reader
        from qkvconv.io.sharded import PrefixedReader
        from qkvconv.plans.plan import Plan
        from qkvconv.plans.transforms import ModelPlan

        config_json = read_config_json(directory / HF_CONFIG)
        family = detect_family(config_json)
        if family is None or not family.verifiable:
            return self.source(directory)
        reader: Any = open_reader(directory)
        prefix = base_model_prefix(family, reader.names())
        if prefix is not None:  # saved from the base model, as transformers loads it
            reader = PrefixedReader(reader, prefix)
        plan = plan_hf_for_reference(config_json, reader.names())
        model = ModelPlan(Plan(plan.recipes, notes=plan.notes), reference_config_from_hf(config_json))
        return Source(model, reader, config_json, tied(config_json))

    def direct_plan(self, directory: Path, to: str, bytes_only: bool = False) -> tuple[Plan, TensorReader] | None:
        if to not in ("litgpt", "litgpt-legacy", "hf"):
            return None
        from qkvconv.formats.hf.plans import plan_hf_to_litgpt
        from qkvconv.plans.plan import Plan, copy

        config_json = read_config_json(directory / HF_CONFIG)
        if bytes_only:
            from qkvconv.io.bytepath import open_bytes

            reader = open_bytes(directory)
            if reader is None:
                return None
        else:
            from qkvconv.io.readers import open_reader

            reader = open_reader(directory)
        if to == "hf":  # re-shard (and check) as it is; config.json travels with the other files
            plan_hf_to_litgpt(config_json, reader.names())  # refuses what the family table can't account for
            if require_family(config_json).twin is not None:  # a remote-code original becomes its twin
                return None
            return Plan([copy(n) for n in reader.names()]), reader
        return plan_hf_to_litgpt(config_json, reader.names(), legacy=to == "litgpt-legacy"), reader

    def target_plan(self, model: ModelPlan, source_json: dict[str, Any] | None, changes: Transformations,
                    source_format: str) -> Plan:
        from qkvconv.formats.hf.plans import plan_litgpt_to_hf
        from qkvconv.plans.transforms import compose

        if changes.target_base is not None:  # that base's architecture and its own config.json, as it is
            config_json, text = target_config(changes.target_base)
            require_same_model(model.config, litgpt_config_from_hf(config_json), "the source",
                               str(changes.target_base / HF_CONFIG))
            plan = compose(plan_litgpt_to_hf(model.config, model.outputs(), config_json), model.plan)
            plan.texts[HF_CONFIG] = text
            family = require_family(config_json)
            model.notes.append(f"written as {family.architecture} with {changes.target_base / HF_CONFIG} as it is")
            if _read(config_json, family.normalized_head):
                model.notes.append(f"{family.lm_head}.weight holds the source's rows, normalised already: the model "
                                   "normalises them again at run time (the same up to rounding)")
            return plan
        kept = source_json if changes.any() or source_format == "hf" else None
        config_json = hf_config_for(model.config, kept, changes.qkv)
        plan = compose(plan_litgpt_to_hf(model.config, model.outputs(), config_json), model.plan)
        if changes.qkv is not None:
            model.notes.append(qkv_note(config_json, source_json, changes.qkv))
        return plan

    def expressible(self, cfg: dict[str, Any], source_json: dict[str, Any] | None) -> None:
        hf_config_for(cfg, source_json)  # raises why not

    def files(self, layout: dict[str, TensorMeta], max_shard_size: int | None) -> dict[str, list[str]]:
        from qkvconv.io.writers import plan_shards

        return plan_shards(layout, max_shard_size)

    def writer(self, directory: Path, layout: dict[str, TensorMeta], max_shard_size: int | None
               ) -> AbstractContextManager[Any]:
        from qkvconv.io.writers import SafetensorsWriter

        return SafetensorsWriter(directory, layout, max_shard_size=max_shard_size)


def target_config(directory: Path) -> tuple[dict[str, Any], str]:
    """The config.json of --target-base (as --variant reads it) and its text, written unchanged."""
    path = directory / HF_CONFIG
    if not path.is_file():
        raise QkvconvError(f"--target-base {directory} has no {HF_CONFIG}")
    return read_config_json(path), path.read_text(encoding="utf-8")


def hf_rope(config_json: dict[str, Any]) -> dict[str, Any] | None:
    """inspect's rope field: transformers' classes in the family table rotate half (rotate_half), on the share
    of each head's dims that config.json gives (partial_rotary_factor, GPT-NeoX's rotary_pct)."""
    from qkvconv.errors import UnsupportedFamily
    from qkvconv.formats.base import rope_report

    try:
        cfg = litgpt_config_from_hf(config_json)
    except UnsupportedFamily:
        return None
    return rope_report(cfg, f"{(config_json.get('architectures') or ['?'])[0]} applies rotate_half (half order) in "
                            "transformers; the rotating share from config.json (partial_rotary_factor / rotary_pct)")


def check_shapes(config_json: dict[str, Any], reader: Any, directory: Path) -> None:
    """config.json's head counts must fit the tensors: plan the litgpt view and run the steps' shape
    rules on the tensors' shapes alone (dtypes do not decide whether a model fits its config, and the
    headers give dtype names, not torch dtypes), so the planner's own checks judge, with no torch imported."""
    from qkvconv.formats.hf.plans import plan_hf_to_litgpt
    from qkvconv.plans.plan import output_metas

    names = reader.names()
    try:
        output_metas(plan_hf_to_litgpt(config_json, names), set(names), lambda name: (reader.meta(name).shape, None))
    except QkvconvError as e:
        raise QkvconvError(f"{directory}: config.json does not match the tensors ({e})") from None


def litgpt_refusal(config_json: dict[str, Any]) -> str | None:
    """Why litgpt has no equivalent of the model config.json describes (the refusal's reason). None where it
    has one, and where config.json is at fault otherwise (check_shapes, planning the conversion, says how)."""
    try:
        litgpt_config_from_hf(config_json)
    except UnsupportedFamily as e:
        return e.reason
    except QkvconvError:
        return None
    return None


def check_qkv_shapes(config_json: dict[str, Any], reader: Any, directory: Path) -> None:
    """config.json's head counts and layer count must fit the q/k/v tensors (split q/k/v or the fused matrix,
    rows and columns), where no conversion plan can be made to check the whole model (a family litgpt has no
    equivalent of)."""
    family = require_family(config_json)
    n_embd, heads = _heads(family, config_json)
    n_layer = _int(config_json, family.config.n_layer, "num_hidden_layers")
    q, kv = heads.n_head * heads.head_size, heads.n_query_groups * heads.head_size
    qkv = family.qkv
    if isinstance(qkv, Split):
        per_layer = {qkv.q: q, qkv.k: kv, qkv.v: kv}
    else:
        assert isinstance(qkv, Fused)
        per_layer = {qkv.name: q + 2 * kv}
    transposed = isinstance(qkv, Fused) and qkv.transposed  # Conv1D: [in, out]
    shapes = {f"{family.layer_prefix.format(i=i)}.{module}.weight": (n_embd, rows) if transposed else (rows, n_embd)
              for i in range(n_layer) for module, rows in per_layer.items()}
    beyond = f"{family.layer_prefix.format(i=n_layer)}."
    names = set(reader.names())
    for name, shape in shapes.items():
        if name not in names:
            raise QkvconvError(f"{directory}: config.json does not match the tensors (no tensor {name!r})")
        if tuple(reader.meta(name).shape) != shape:
            raise QkvconvError(f"{directory}: config.json does not match the tensors ({name} has shape "
                               f"{tuple(reader.meta(name).shape)}, config.json implies {shape})")
    extra = next((n for n in sorted(names) if n.startswith(beyond)), None)
    if extra is not None:
        raise QkvconvError(f"{directory}: config.json does not match the tensors ({extra} is beyond its layers)")


FORMAT = HuggingFace()
