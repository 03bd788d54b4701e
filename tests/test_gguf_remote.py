"""Remote-code originals to GGUF: Phi-2's (`mixer.Wqkv`, model_type phi-msft) and OLMo's (hf_olmo: `att_proj`,
`ff_proj` = [up; gate]) are written as the GGUF of their transformers twin, tensor for tensor and key for key
(the twin's own file is tested against llama.cpp's converter in test_gguf.py), and verify against it. llama.cpp's
converter reads neither original (its tensor map has no `att_proj`; its Phi2Model reads `partial_rotary_factor`,
which the original config has not), so a user who holds one has no other way to a GGUF."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from test_remote_twins import PHI_SIZES, build_twin, cli, phi_msft_from_phi  # noqa: E402
from test_remote_twins_mlp import SIZES, olmo_from_twin  # noqa: E402

ORIGINALS: dict[str, tuple[str, dict[str, Any], Callable[[dict, Path], Any], str]] = {
    "phi-msft": ("phi", PHI_SIZES, phi_msft_from_phi, "phi2"),
    "hf_olmo": ("olmo", {**SIZES, "num_key_value_heads": 2}, lambda t, d: olmo_from_twin(t, d, n_kv_heads=2), "olmo"),
}


def _contents(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    reader = gguf.GGUFReader(path)
    keys = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.") and k != "general.name"}
    return {t.name: np.array(t.data) for t in reader.tensors}, keys


@pytest.mark.parametrize("original", list(ORIGINALS))
def test_remote_original_is_written_as_its_twin(original: str, tmp_path: Path) -> None:
    model_type, sizes, make, arch = ORIGINALS[original]
    _, twin, _ = build_twin(tmp_path / "twin", model_type=model_type, **sizes)
    make(twin, tmp_path / "original")
    for source in ("twin", "original"):
        result = cli("convert", tmp_path / source, "--to", "gguf", "--out", tmp_path / f"{source}.gguf", "--json")
        assert result.exit_code == 0, result.output
    (ours, our_keys), (theirs, their_keys) = (_contents(tmp_path / f"{s}.gguf") for s in ("original", "twin"))
    assert our_keys["general.architecture"] == arch and our_keys == their_keys
    assert sorted(ours) == sorted(theirs) and all(np.array_equal(ours[k], v) for k, v in theirs.items())
    # OLMo's file rotates in pairs order (llama.cpp's NORM rope), its source in half order: the same function,
    # its rotation summed in another order (verify's float tolerance)
    result = cli("verify", tmp_path / "original", tmp_path / "twin.gguf", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["passed"], result.output
