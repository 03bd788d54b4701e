"""Reading and writing litgpt checkpoint directories, without litgpt installed.

A litgpt directory holds `model_config.yaml` and `lit_model.pth` (a full model, possibly wrapped as
{"model": ...}), or, for a LoRA run, `lit_model.pth.lora` with `hyperparameters.yaml` that names the
base checkpoint. Pickles are opened with weights_only=True (no code from a checkpoint ever runs)
and mmap=True (tensors are paged in as they are used, not read up front).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qkvconv.errors import QkvconvError
from qkvconv.model import names
from qkvconv.model.names import CURRENT_NAMING, LEGACY_NAMING, QKV_KEY, qkv_naming
from qkvconv.model.layout import HeadLayout, LayoutError, QKVOrder
from qkvconv.io.pages import MappedFile
from qkvconv.io.config_files import read_yaml
from qkvconv.io.sources import check_inside

if TYPE_CHECKING:  # tensors are touched by the callers that read them: opening a directory needs no torch
    import torch

    from qkvconv.model.lora import LoraSettings

WEIGHTS = "lit_model.pth"
LORA_WEIGHTS = "lit_model.pth.lora"
CONFIG = "model_config.yaml"
HYPERPARAMETERS = "hyperparameters.yaml"

NAMING_ORDER = {"attn": QKVOrder.GROUPED, "qkv": QKVOrder.SEQUENTIAL}

# Config fields that litgpt >= 0.5.5 no longer accepts, and how each translates.
LEGACY_CONFIG_FIELDS = ("sliding_window_layer_placing",)


@dataclass
class StateDictFile:
    """The tensors of one .pth file and how they were wrapped, so they can be written back as found."""

    path: Path
    tensors: dict[str, torch.Tensor]
    wrapped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # other top-level keys of a wrapped file
    mapped: MappedFile | None = None

    def release(self) -> None:
        """Give the file's resident pages back (after a layer has been used); tensors stay valid."""
        if self.mapped is not None:
            self.mapped.release()

    def payload(self, tensors: dict[str, torch.Tensor] | None = None) -> Any:
        tensors = self.tensors if tensors is None else tensors
        return {"model": tensors, **self.extra} if self.wrapped else tensors


def load_state_dict_file(path: Path) -> StateDictFile:
    """Open a litgpt .pth file safely (weights_only) and lazily (mmap); any failure is one QkvconvError."""
    from qkvconv.io.readers import safe_torch_load, split_state_dict

    if not path.is_file():
        raise QkvconvError(f"{path} does not exist")
    tensors, wrapped, extra = split_state_dict(safe_torch_load(path, mmap=True), path)
    return StateDictFile(path, tensors, wrapped, extra, MappedFile(path, (t.data_ptr() for t in tensors.values())))


@dataclass(frozen=True)
class ModelShape:
    """The attention-relevant numbers of a litgpt config, with litgpt's own defaults applied."""

    n_layer: int
    n_embd: int
    heads: HeadLayout
    name: str | None

    @classmethod
    def from_config(cls, cfg: dict[str, Any], where: Path) -> "ModelShape":
        try:
            n_layer, n_embd, n_head = int(cfg["n_layer"]), int(cfg["n_embd"]), int(cfg["n_head"])
            n_query_groups = int(cfg.get("n_query_groups") or n_head)
            head_size = int(cfg.get("head_size") or n_embd // n_head)
            heads = HeadLayout(n_head, n_query_groups, head_size)
        except KeyError as e:
            raise QkvconvError(f"{where} has no {e.args[0]!r}; it is not a litgpt model config") from None
        except (TypeError, ValueError, ZeroDivisionError, LayoutError) as e:
            raise QkvconvError(f"{where}: invalid head configuration: {e}") from None
        return cls(n_layer, n_embd, heads, cfg.get("name"))


def migrate_config(cfg: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Translate fields that current litgpt's Config rejects. Returns the new config and what changed."""
    if not any(k in cfg for k in LEGACY_CONFIG_FIELDS):
        return cfg, []
    new = {k: v for k, v in cfg.items() if k not in LEGACY_CONFIG_FIELDS}
    placing = cfg.get("sliding_window_layer_placing")
    changes = ["dropped `sliding_window_layer_placing` (renamed in litgpt 0.5.5)"]
    if cfg.get("sliding_window_size") is not None and placing is not None:
        # litgpt <= 0.5.4 applied the window where block_idx % placing == 0 ("all" = 1, "interleaved" = 2)
        step = {"all": 1, "interleaved": 2}.get(placing, placing)
        new["sliding_window_indices"] = [1 if i % int(step) == 0 else 0 for i in range(int(cfg["n_layer"]))]
        changes[0] = "translated `sliding_window_layer_placing` into `sliding_window_indices`"
    return new, changes


@dataclass
class LoraHyperparameters:
    """LoRA settings of a litgpt LoRA run, from hyperparameters.yaml."""

    settings: LoraSettings
    projection: bool
    mlp: bool
    head: bool
    checkpoint_dir: str | None
    raw: dict[str, Any]

    @classmethod
    def from_yaml(cls, raw: dict[str, Any], where: Path) -> "LoraHyperparameters":
        from qkvconv.model.lora import LoraSettings

        try:
            r, alpha = int(raw["lora_r"]), raw["lora_alpha"]
            enable = tuple(bool(raw.get(f"lora_{p}", False)) for p in ("query", "key", "value"))
        except (KeyError, TypeError, ValueError) as e:
            raise QkvconvError(f"{where} has no valid lora_r / lora_alpha ({e}); is this a LoRA run?") from None
        if r < 1:
            raise QkvconvError(f"{where}: lora_r must be positive, got {r}")
        return cls(
            LoraSettings(r, alpha, enable),  # type: ignore[arg-type]
            bool(raw.get("lora_projection", False)),
            bool(raw.get("lora_mlp", False)),
            bool(raw.get("lora_head", False)),
            raw.get("checkpoint_dir"),
            raw,
        )


@dataclass
class LitgptCheckpoint:
    """A litgpt checkpoint directory: full model, LoRA run, or both."""

    directory: Path
    config: dict[str, Any]
    shape: ModelShape
    weights: Path | None
    lora_weights: Path | None
    hyperparameters: LoraHyperparameters | None

    @property
    def format(self) -> str:
        return "litgpt-lora" if self.lora_weights else "litgpt"

    def weight_files(self) -> list[Path]:
        return [p for p in (self.weights, self.lora_weights) if p is not None]

    def find_base(self, base: Path | None = None, *, option: str = "--base", hf: bool = False) -> Path | None:
        """The base checkpoint directory of a LoRA run: `base` if given, else `checkpoint_dir`
        from hyperparameters.yaml, tried as given, then relative to this directory and its parents.

        A base is a litgpt directory; with `hf`, a Hugging Face directory (config.json) counts too (the
        reference pass reads either, litgpt itself only the first). `option` names the command-line
        option a wrong `base` came from, so the error points at what the user typed.
        """
        def usable(c: Path) -> bool:
            return (c / WEIGHTS).is_file() or (hf and (c / "config.json").is_file())

        if base is not None:
            if not usable(base):
                wanted = f"{WEIGHTS} or config.json" if hf else WEIGHTS
                raise QkvconvError(f"{option} {base} has no {wanted}")
            return base.resolve()
        name = self.hyperparameters.checkpoint_dir if self.hyperparameters else None
        if not name:
            return None
        candidates = [Path(name)] + [d / name for d in (self.directory, *self.directory.parents[:3])]
        for c in candidates:
            if usable(c):
                return c.resolve()
        return None


def open_litgpt(path: Path) -> LitgptCheckpoint:
    """Open a litgpt checkpoint directory (or the directory of a given lit_model.pth)."""
    directory = path.parent if path.is_file() else path
    if not directory.is_dir():
        raise QkvconvError(f"{path} does not exist")
    weights = directory / WEIGHTS
    lora = directory / LORA_WEIGHTS
    for name in (WEIGHTS, LORA_WEIGHTS, CONFIG, HYPERPARAMETERS):
        check_inside(directory / name, directory)
    has_weights, has_lora = weights.is_file(), lora.is_file()
    if not (has_weights or has_lora):
        raise QkvconvError(
            f"no litgpt checkpoint in {directory}: expected {WEIGHTS} or {LORA_WEIGHTS} beside {CONFIG}"
        )
    config_path = directory / CONFIG
    if not config_path.is_file():
        raise QkvconvError(f"{directory} has no {CONFIG}; litgpt writes it beside {WEIGHTS}")
    config = read_yaml(config_path)
    hyper = None
    if has_lora:
        hp_path = directory / HYPERPARAMETERS
        if not hp_path.is_file():
            raise QkvconvError(f"{directory} has {LORA_WEIGHTS} but no {HYPERPARAMETERS} (LoRA rank and targets)")
        hyper = LoraHyperparameters.from_yaml(read_yaml(hp_path), hp_path)
    return LitgptCheckpoint(
        directory, config, ModelShape.from_config(config, config_path),
        weights if has_weights else None, lora if has_lora else None, hyper,
    )


def check_full_shapes(sd: StateDictFile, shape: ModelShape) -> None:
    """Fail clearly when the config's head counts do not match the QKV tensors."""
    heads, seen = shape.heads, set()
    for name, t in sd.tensors.items():
        m = QKV_KEY.match(name)
        if not m or m.group(3).startswith("lora"):
            continue
        seen.add(int(m.group(1)))
        expected = (heads.rows, shape.n_embd) if m.group(3).endswith("weight") else (heads.rows,)
        if tuple(t.shape) != expected:
            raise QkvconvError(
                f"{sd.path}: {name} has shape {tuple(t.shape)}, but the config (n_head={heads.n_head}, "
                f"n_query_groups={heads.n_query_groups}, head_size={heads.head_size}, n_embd={shape.n_embd}) "
                f"needs {expected}; the config does not belong to these weights"
            )
    if seen and seen != set(range(shape.n_layer)):
        raise QkvconvError(
            f"{sd.path}: QKV tensors for layers {sorted(seen)}, but the config says n_layer={shape.n_layer}"
        )


def check_lora_shapes(sd: StateDictFile, shape: ModelShape, hyper: LoraHyperparameters) -> None:
    """Fail clearly when hyperparameters.yaml does not match the adapter's tensors."""
    from qkvconv.model.lora import block_sizes

    s, heads = hyper.settings, shape.heads
    expected_a = (s.r * s.n_enabled, shape.n_embd)
    expected_b = (sum(block_sizes(s.enable, heads)), s.r)
    qkv = {name: t for name, t in sd.tensors.items() if (m := QKV_KEY.match(name)) and m.group(3).startswith("lora")}
    if qkv and not any(s.enable):
        raise QkvconvError(f"{sd.path} has QKV LoRA tensors but hyperparameters.yaml enables none of q, k, v")
    for name, t in qkv.items():
        expected = expected_a if name.endswith("lora_A") else expected_b
        if tuple(t.shape) != expected:
            flags = "".join(p for p, on in zip("qkv", s.enable) if on)
            raise QkvconvError(
                f"{sd.path}: {name} has shape {tuple(t.shape)}, but hyperparameters.yaml (lora_r={s.r}, "
                f"enabled={flags}) with the model config needs {expected}"
            )
    for name, t in sd.tensors.items():
        if name.endswith("lora_A") and name not in qkv and t.shape[0] != s.r:
            raise QkvconvError(f"{sd.path}: {name} has rank {t.shape[0]}, but hyperparameters.yaml says lora_r={s.r}")


def current_name(name: str, *, drop_linear: bool = False) -> str:
    """The name litgpt >= 0.5.5 gives a tensor: `...attn.attn.X` -> `...attn.qkv.X`, any other name
    unchanged. `drop_linear`: a LoRA model's `....linear.weight` becomes the plain model's `....weight`."""
    m = QKV_KEY.match(name)
    if m and m.group(2) == "attn":
        name = f"{names.layer(m.group(1), names.QKV)}.{m.group(3)}"
    return name.replace(".linear.", ".") if drop_linear else name


__all__ = [
    "CONFIG", "CURRENT_NAMING", "HYPERPARAMETERS", "LEGACY_CONFIG_FIELDS", "LEGACY_NAMING", "LORA_WEIGHTS",
    "NAMING_ORDER", "QKV_KEY", "WEIGHTS", "LitgptCheckpoint", "LoraHyperparameters", "ModelShape", "StateDictFile",
    "check_full_shapes", "check_lora_shapes", "current_name", "load_state_dict_file", "migrate_config", "open_litgpt", "qkv_naming",
]
