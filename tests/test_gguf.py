"""GGUF: files made by llama.cpp's own converter (the oracle, tests/gguf_oracle.py) inspected and verified
against their Hugging Face source; one layer's Q/K rotary permutation wrong must fail, naming the layer;
quantized files are judged at their type's tolerance; `convert --to gguf` output verifies, loads in
gguf's reader and holds the tensors llama.cpp's converter writes."""

from __future__ import annotations

import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from gguf_oracle import (BY_ID, FAMILIES, MORE, SMALL, TOKENIZERS, build_hf, converter_dir, converter_input,  # noqa: E402
                         llamacpp_convert)

from qkvconv.cli import app  # noqa: E402
from qkvconv.formats.weights import open_weights  # noqa: E402
from qkvconv.model.rotary import RopeOrder, head_permutation  # noqa: E402
from qkvconv.ops.verify import verify  # noqa: E402

runner = CliRunner()
IDS = [f.id for f in FAMILIES + MORE]
PAIRS_ARCHS = {"llama", "smollm3", "granite", "olmo", "chatglm", "command-r"}  # llama.cpp's NORM rope here
UNROTATED_ARCHS = {"gpt2", "starcoder", "bloom", "mpt", "jais"}  # positions without RoPE: GGUF the only target
BEYOND_LITGPT = {*UNROTATED_ARCHS, "command-r", "dbrx"}  # learned positions, ALiBi, LayerNorms without bias, a logit scale
FUSED_ARCHS = {"phi3", "falcon", "gptneox", "dbrx", *UNROTATED_ARCHS}  # one attn_qkv


@pytest.fixture(scope="module")
def converter() -> Path:
    return converter_dir()


LOSSY = [("llama-gqa", "q8_0"), ("phi3-fused", "q8_0"), ("llama-gqa", "f16"), ("gemma3", "q8_0"), ("dbrx", "q8_0"),
         ("cohere", "q8_0")]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory, converter) -> dict[tuple[str, str], tuple[Path, Path]]:
    """(family, outtype) -> its HF directory and the GGUF llama.cpp's converter made of it: every family in
    F32, and LOSSY. Models are built two at a time; the converter runs once for all of them."""
    root = tmp_path_factory.mktemp("gguf")
    with ThreadPoolExecutor(max_workers=2) as pool:
        hf = dict(zip(IDS, pool.map(lambda i: build_hf(BY_ID[i], root / i, converter), IDS)))
    jobs = [(i, "f32") for i in IDS] + LOSSY
    inputs = {i: converter_input(BY_ID[i], hf[i]) for i in IDS}
    llamacpp_convert([(inputs[i], root / f"{i}.{t}.gguf", t) for i, t in jobs], converter)
    out = {}
    for i, t in jobs:
        made = root / f"{i}.{t}.gguf"
        if BY_ID[i].tokenizer == "gpt2":
            # GPT-2's 50257 tokens and merges take gguf's reader 2 s to parse on every open: the tests read a
            # copy without those arrays (tensors and model keys as llama.cpp wrote them;
            # test_llamacpp_gguf_with_its_full_vocabulary reads an original)
            made = rewrite(made, root / f"{i}.{t}.novocab.gguf", drop=VOCAB_ARRAYS)
        out[i, t] = hf[i], made
    return out


@pytest.fixture(scope="module")
def made(oracle) -> dict[str, tuple[Path, Path]]:
    """Every family: its HF directory and its F32 GGUF made by llama.cpp's converter."""
    return {i: oracle[i, "f32"] for i in IDS}


def run(*args: str) -> tuple[int, dict]:
    result = runner.invoke(app, [*args, "--json"])
    return result.exit_code, json.loads(result.stdout)


def corrupt_rotary(src: Path, dst: Path, layer: int) -> Path:
    """A copy of `src` whose layer `layer` has Q and K rows in the other rotary order than llama.cpp runs
    the architecture with: llama's permutation undone (llama.cpp #2376's bug, for one layer), or applied to
    a NEOX architecture that must not have it (transformers #31844's Phi-3). Written through gguf."""
    shutil.copyfile(src, dst)
    reader = gguf.GGUFReader(dst, "r+")
    arch = reader.fields["general.architecture"].contents()

    def key(name: str, default=None):
        field = reader.fields.get(f"{arch}.{name}")
        return default if field is None else field.contents()

    n_embd, n_head = key("embedding_length"), key("attention.head_count")
    n_kv = key("attention.head_count_kv", n_head)
    hs = key("attention.key_length", n_embd // n_head)
    n_rot = key("rope.dimension_count", hs)
    order = (RopeOrder.PAIRS, RopeOrder.HALF) if arch in PAIRS_ARCHS else (RopeOrder.HALF, RopeOrder.PAIRS)
    per_head = head_permutation(hs, n_rot, *order).numpy()
    if arch in UNROTATED_ARCHS:  # no rotary order to get wrong: the fused rows left as the source held them
        return _corrupt_fused(reader, layer, n_head, n_kv, hs, dst)

    def rows(heads: int) -> np.ndarray:
        return (np.arange(heads)[:, None] * hs + per_head[None, :]).reshape(-1)

    changed = 0
    for t in reader.tensors:
        prefix = f"blk.{layer}."
        if not t.name.startswith(prefix):
            continue
        module = t.name[len(prefix):].rsplit(".", 1)[0]
        if module in ("attn_q", "attn_k"):
            index = rows(n_head if module == "attn_q" else n_kv)
        elif module == "attn_qkv":
            q, k = rows(n_head), rows(n_kv) + n_head * hs
            index = np.concatenate([q, k, np.arange((n_head + n_kv) * hs, (n_head + 2 * n_kv) * hs)])
        else:
            continue
        t.data[...] = np.array(t.data)[index]
        changed += 1
    assert changed >= 1
    del reader
    return dst


def _corrupt_fused(reader, layer: int, n_head: int, n_kv: int, hs: int, dst: Path) -> Path:
    """Layer `layer`'s attn_qkv (weight and bias) as a converter that skipped the re-ordering writes it: an MHA
    model's per-head rows (q_h, k_h, v_h: Bloom's, GPT-NeoX's) where llama.cpp reads sequential ones; a multi-query
    model's single K and V heads swapped."""
    if n_kv == n_head:
        index = np.arange(3 * n_head * hs).reshape(3, n_head, hs).transpose(1, 0, 2).reshape(-1)
    else:
        q, kv = n_head * hs, n_kv * hs
        index = np.concatenate([np.arange(q), np.arange(q + kv, q + 2 * kv), np.arange(q, q + kv)])
    changed = 0
    for t in reader.tensors:
        if t.name.startswith(f"blk.{layer}.attn_qkv."):
            t.data[...] = np.array(t.data)[index]
            changed += 1
    assert changed >= 1  # the weight (and its bias, where the model has one)
    del reader
    return dst


@pytest.mark.parametrize("family_id", IDS)
def test_llamacpp_gguf_verifies_against_its_source(made, family_id):
    hf, gguf_file = made[family_id]
    code, report = run("verify", str(hf), str(gguf_file))
    assert code == 0, report
    assert report["passed"] and report["top1_agreement"] == 1.0
    worst = max(s["max_abs_diff"] / s["scale"] for s in report["stages"])
    assert worst < 2e-6, report["stages"]  # float32 file: only the rotary order's rounding (llama: pairs)
    # another GELU than llama.cpp's tanh one in HF (exact; Bloom's own constant); Gemma, GPT-BigCode and GPT-2
    # (gelu_new: the tanh formula written out) compute the tanh approximation on both sides
    gelu = BY_ID[family_id].hf["model_type"] in ("falcon", "gpt_neox", "bloom", "mpt")
    assert any("gelu_approximate" in n for n in report["notes"]) == gelu


def test_llamacpp_gguf_with_its_full_vocabulary(made, tmp_path):
    """The file exactly as llama.cpp's converter wrote it (GPT-2's vocabulary included) verifies the same."""
    hf, _ = made["gpt-neox"]
    original = hf.parent / "gpt-neox.f32.gguf"
    assert "tokenizer.ggml.tokens" in gguf.GGUFReader(original).fields
    code, report = run("verify", str(hf), str(original))
    assert code == 0 and report["passed"]


@pytest.mark.parametrize("family_id", IDS)
def test_wrong_rotary_permutation_in_one_layer_fails_naming_it(made, family_id, tmp_path):
    hf, gguf_file = made[family_id]
    bad = corrupt_rotary(gguf_file, tmp_path / "bad.gguf", layer=1)
    code, report = run("verify", str(hf), str(bad))
    assert code == 1
    # a mixture of experts shows it first in layer 1's router, which reads the attention's output
    assert report["first_difference"] in ("layer 1", "layer 1 router")
    first = next(i for i, s in enumerate(report["stages"]) if s["name"].startswith("layer 1"))
    assert all(s["within"] for s in report["stages"][:first])  # embed, layer 0 (and its router and experts)


@pytest.mark.parametrize("family_id", IDS)
def test_inspect_gguf(made, family_id):
    hf, gguf_file = made[family_id]
    code, report = run("inspect", str(gguf_file))
    assert code == 0
    config = json.loads((hf / "config.json").read_text())
    family = BY_ID[family_id]
    assert report["format"] == "gguf" and report["family"] == family.arch
    n_head = config.get("num_attention_heads", config.get("n_head", config.get("n_heads")))  # GPT-2's, Bloom's, MPT's
    assert report["n_head"] == n_head
    kv = 1 if config.get("multi_query") and not config.get("new_decoder_architecture") else \
        config.get("num_key_value_heads", config.get("num_kv_heads", n_head))
    assert report["n_query_groups"] == kv
    fraction = config.get("rotary_pct") or config.get("rope_parameters", {}).get("partial_rotary_factor") or 1.0
    if family.arch in UNROTATED_ARCHS:
        assert report["rope"] is None and "no RoPE" in report["evidence"][0]
    else:
        assert report["rope"]["order"] == ("pairs" if family.arch in PAIRS_ARCHS else "half")
        assert report["rope"]["fraction"] == pytest.approx(fraction)
    assert report["tensor_types"] == {"F32": {"parameters": report["parameters"], "bytes": 4 * report["parameters"]}}
    assert report["qkv_order"] == ("sequential" if family.arch in FUSED_ARCHS else "split")


def test_rope_field_of_every_format(made, legacy, tmp_path):
    """inspect --json says the rotary order and share for every format: litgpt (rope_interleave), HF (half),
    Meta (pairs), PEFT (its base's), GGUF (as llama.cpp runs the architecture)."""
    assert run("inspect", str(legacy("gqa_llama")))[1]["rope"]["order"] == "half"
    hf, _ = made["gpt-neox"]
    rope = run("inspect", str(hf))[1]["rope"]
    assert (rope["order"], rope["fraction"]) == ("half", 0.25)
    llama, _ = made["llama-gqa"]
    assert run("convert", str(llama), "--to", "meta", "--out", str(tmp_path / "meta"))[0] == 0
    assert run("inspect", str(tmp_path / "meta"))[1]["rope"]["order"] == "pairs"
    assert run("convert", str(llama), "--to", "litgpt", "--rope", "pairs", "--out", str(tmp_path / "lit"))[0] == 0
    rope = run("inspect", str(tmp_path / "lit"))[1]["rope"]
    assert (rope["order"], rope["fraction"]) == ("pairs", 1.0) and "rope_interleave" in rope["evidence"]


@pytest.mark.parametrize("family_id,outtype", LOSSY)
def test_lossy_gguf_is_compared_with_its_reference_quantized_alike(oracle, family_id, outtype, tmp_path):
    """Q8_0 (blocks inside each row) and F16 round each row alike wherever llama.cpp moved it, so verify
    quantizes the reference with gguf's own quantizer and compares at float32's tolerance: a correct file
    computes the same numbers, and a wrong permutation cannot hide in the rounding (a partial-rotary
    Phi-3's is 5% of the stage's scale, below any tolerance wide enough for Q8_0's rounding)."""
    hf, lossy = oracle[family_id, outtype]
    code, report = run("verify", str(hf), str(lossy))
    assert code == 0, report["stages"]
    assert outtype.upper() in report["tolerance_reason"] and report["rtol"] == 1e-5
    assert run("verify", str(lossy), str(hf))[0] == 0  # either side may be the GGUF
    bad = corrupt_rotary(lossy, tmp_path / "bad.gguf", layer=1)
    code, report = run("verify", str(hf), str(bad))
    assert code == 1 and report["first_difference"] in ("layer 1", "layer 1 router"), report["stages"]  # router: MoE


def test_weights_match_llamacpp_tensor_for_tensor(made):
    """What qkvconv reads out of llama.cpp's file is the source's tensors, re-ordered exactly (llama: Q/K in
    pairs order, which the config's rope_interleave says)."""
    hf, gguf_file = made["falcon-40b"]
    a, b = open_weights(hf), open_weights(gguf_file)
    for name in a.recipes:
        assert (a(name) == b(name)).all(), name
    report = verify(a, b)
    assert all(s.max_abs_diff == 0 for s in report.stages)


@pytest.mark.parametrize("family_id", IDS)
def test_convert_to_gguf_writes_what_llamacpp_writes(made, family_id, tmp_path):
    """`convert --to gguf` (checked by the forward pass before it is published) loads in gguf's reader and
    holds llama.cpp's converter's tensors bit for bit, under its names; litgpt -> GGUF gives the same."""
    hf, oracle = made[family_id]
    out = tmp_path / "out.gguf"
    code, report = run("convert", str(hf), "--to", "gguf", "--out", str(out))
    assert code == 0, report
    assert report["checks"][0].startswith("checked in")  # not skipped
    if BY_ID[family_id].arch in ("command-r", "gemma"):  # what the file holds, not the litgpt pivot's copy
        assert f"tied head: token_embd only (llama.cpp's {BY_ID[family_id].arch} takes the head from it)" in \
            report["actions"] and not any("litgpt" in a for a in report["actions"]), report["actions"]
    mine, theirs = gguf.GGUFReader(out), gguf.GGUFReader(oracle)
    assert mine.fields["general.architecture"].contents() == BY_ID[family_id].arch
    ours = {t.name: np.array(t.data) for t in mine.tensors}
    assert sorted(ours) == sorted(t.name for t in theirs.tensors)
    for t in theirs.tensors:
        assert t.tensor_type == mine.tensors[[x.name for x in mine.tensors].index(t.name)].tensor_type, t.name
        assert np.array_equal(ours[t.name], np.array(t.data)), t.name
    code, report = run("verify", str(hf), str(out))
    assert code == 0
    if BY_ID[family_id].arch in BEYOND_LITGPT:  # GGUF holds them, no other target does
        _same_model_keys(mine, theirs, BY_ID[family_id].arch)
        for to in ("hf", "litgpt", "peft"):
            code, report = run("convert", str(hf), "--to", to, "--out", str(tmp_path / to))
            assert code == 2 and "litgpt" in report["error"] and not (tmp_path / to).exists(), (to, report)
        code, report = run("convert", str(oracle), "--to", "hf", "--out", str(tmp_path / "hf"))
        assert code == 2 and "verify reads it" in report["error"] and not (tmp_path / "hf").exists()
    if family_id in ("llama-gqa", "gpt-neox"):  # from litgpt (half rotary, sequential qkv) as well
        code, _ = run("convert", str(hf), "--to", "litgpt", "--out", str(tmp_path / "lit"))
        assert code == 0
        code, report = run("convert", str(tmp_path / "lit"), "--to", "gguf", "--out", str(tmp_path / "lit-out"))
        assert code == 0, report
        again = gguf.GGUFReader(tmp_path / "lit-out" / "model.gguf")
        assert all(np.array_equal(ours[t.name], np.array(t.data)) for t in again.tensors)


def _same_model_keys(mine: gguf.GGUFReader, theirs: gguf.GGUFReader, arch: str) -> None:
    """The `{arch}.*` keys llama.cpp's converter writes, no more, with its values (float32 as written), but Bloom's
    context_length without seq_length in config.json: the converter writes hidden_size there, qkvconv the default
    of transformers' reading of seq_length (2048; ALiBi has no limit, llama.cpp takes it as its default context)."""
    def keys(r: gguf.GGUFReader) -> dict[str, object]:
        return {k: f.contents() for k, f in r.fields.items() if k.startswith(f"{arch}.")}

    ours, theirs_keys = keys(mine), keys(theirs)
    assert sorted(ours) == sorted(theirs_keys)
    if arch == "bloom":
        assert ours.pop("bloom.context_length") == 2048 and theirs_keys.pop("bloom.context_length") == 48
    assert ours == theirs_keys


def test_convert_to_gguf_refuses_what_llamacpp_would_compute_otherwise(built_window, tmp_path):
    code, report = run("convert", str(built_window), "--to", "gguf", "--out", str(tmp_path / "x.gguf"))
    assert code == 2 and "sliding window" in report["error"]
    assert not (tmp_path / "x.gguf").exists()


def test_smollm3_layers_llamacpp_runs_without_rope_are_refused(converter, tmp_path):
    """llama.cpp's smollm3 leaves RoPE out of every 4th layer whatever the file says: a 4-layer SmolLM3 that
    rotates in every layer is neither written as smollm3 nor read from llama.cpp's own file of it (exit 2)."""
    from gguf_oracle import Family

    family = Family("smollm3-4", {**BY_ID["smollm3"].hf, "num_hidden_layers": 4}, "spm",
                    config_json={"no_rope_layers": [1, 1, 1, 1]})
    hf = build_hf(family, tmp_path / "smollm3-4", converter)
    code, report = run("convert", str(hf), "--to", "gguf", "--out", str(tmp_path / "x.gguf"))
    assert code == 2 and "RoPE in every layer" in report["error"]
    assert not (tmp_path / "x.gguf").exists()
    llamacpp_convert([(hf, tmp_path / "theirs.gguf", "f32")], converter)
    code, report = run("verify", str(hf), str(tmp_path / "theirs.gguf"))
    assert code == 2 and "without RoPE" in report["error"]


def test_multi_head_gpt_bigcode_is_not_written_as_starcoder(tmp_path):
    """llama.cpp's converter writes GPT-BigCode with head_count_kv 1 whatever multi_query says, and its starcoder
    graph splits attn_qkv so: a multi-head model (per-head rows, 3 * n_embd) is refused (exit 2), not written."""
    from hf_models import POSITIONS, VOCAB, saved_random_model

    saved_random_model({"model_type": "gpt_bigcode", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": VOCAB,
                        "n_positions": POSITIONS, "multi_query": False}, tmp_path / "mha")
    code, report = run("convert", str(tmp_path / "mha"), "--to", "gguf", "--out", str(tmp_path / "x.gguf"))
    assert code == 2 and "multi-query only" in report["error"], report
    assert not (tmp_path / "x.gguf").exists()


@pytest.fixture
def built_window(tmp_path, converter):
    from gguf_oracle import Family

    family = Family("mistral-window", {**BY_ID["mistral"].hf, "sliding_window": 4}, "spm")
    return build_hf(family, tmp_path / "mistral-window", converter)


VOCAB_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


def rewrite(src: Path, dst: Path, keys: dict | None = None, tensors: dict | None = None, drop: tuple = (),
            arch: str | None = None, quantize_to=None) -> Path:
    """A copy of `src` written through gguf's GGUFWriter with more float32 keys and tensors, `drop` keys left
    out, and its architecture renamed to `arch` (its keys with it)."""
    reader = gguf.GGUFReader(src)
    old = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch or old)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        if arch and key.startswith(old + "."):
            key = arch + key[len(old):]
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, field.contents())
        else:
            writer.add_key_value(key, field.contents(), field.types[0])
    for key, value in (keys or {}).items():
        writer.add_float32(key, value)
    for t in reader.tensors:
        data = np.array(t.data)
        if quantize_to is not None and data.ndim == 2 and data.shape[1] % 32 == 0 and t.name != "token_embd.weight":
            writer.add_tensor(t.name, gguf.quants.quantize(data, quantize_to), raw_dtype=quantize_to)
        else:
            writer.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    for name, value in (tensors or {}).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.mark.parametrize("keys,tensors,why", [
    ({"llama.attn_logit_softcapping": 30.0}, None, "llama.attn_logit_softcapping"),
    (None, {"rope_freqs.weight": np.array([1, 2, 3, 5], dtype=np.float32)}, "rope_freqs"),
])
def test_gguf_settings_the_reader_does_not_map_are_refused(made, tmp_path, keys, tensors, why):
    """A key or tensor that may change what llama.cpp computes, and that qkvconv does not map, is refused
    (exit 2) rather than verified as a model the file may not be."""
    hf, gguf_file = made["llama-gqa"]
    same = rewrite(gguf_file, tmp_path / "same.gguf")
    assert run("verify", str(hf), str(same))[0] == 0  # the rewriting itself changes nothing
    code, report = run("verify", str(hf), str(rewrite(gguf_file, tmp_path / "odd.gguf", keys, tensors)))
    assert code == 2 and why in report["error"]


@pytest.mark.parametrize("key,value", [("granite.residual_scale", 0.5), ("granite.logit_scale", 2.0),
                                       ("granite.embedding_scale", 3.0), ("granite.attention.scale", 0.3)])
def test_granite_scales_litgpt_does_not_compute_are_refused(made, tmp_path, key, value):
    """Granite's multipliers other than neutral (an attention scale not 1/sqrt of an integer) are refused
    (exit 2), not read as the neutral model."""
    hf, gguf_file = made["granite"]
    assert run("verify", str(hf), str(rewrite(gguf_file, tmp_path / "same.gguf")))[0] == 0
    odd = rewrite(gguf_file, tmp_path / "odd.gguf", {key: value}, drop=(key,))
    code, report = run("verify", str(hf), str(odd))
    assert code == 2, report


@pytest.mark.parametrize("family_id", ["llama-gqa", "gemma", "phi3-fused", "gemma3", "olmo"])
def test_convert_from_gguf(made, family_id, tmp_path):
    """A float GGUF converts back to Hugging Face (llama: Q/K from pairs to half again) and litgpt, each
    checked by the forward pass, and computes its source's function."""
    hf, gguf_file = made[family_id]
    for to in ("hf", "litgpt"):
        code, report = run("convert", str(gguf_file), "--to", to, "--out", str(tmp_path / to))
        assert code == 0, report
        assert run("verify", str(hf), str(tmp_path / to))[0] == 0


def test_inspect_of_an_architecture_qkvconv_does_not_map(made, tmp_path):
    """inspect still tells heads, QKV tensors and llama.cpp's rotary order (its llama_model_rope_type table);
    verify refuses (exit 2)."""
    hf, gguf_file = made["llama-gqa"]
    other = rewrite(gguf_file, tmp_path / "granite.gguf", arch="granite")
    code, report = run("inspect", str(other))
    assert code == 0 and report["family"] == "granite" and report["n_query_groups"] == 2
    assert report["rope"]["order"] == "pairs" and "not supported" in report["notes"][0]
    assert run("verify", str(hf), str(other))[0] == 2


def test_gemma2_query_scalar_llamacpp_does_not_keep(converter, tmp_path):
    """llama.cpp's gemma2 scales Q by 1/sqrt(head_dim) (1/sqrt(n_embd / n_head) for the 46-layer 27B), not by
    query_pre_attn_scalar, which the file cannot hold: a Gemma 2 whose scalar differs computes something
    else in llama.cpp. verify says so (exit 1) and convert --to gguf refuses it (exit 2)."""
    from gguf_oracle import Family

    family = Family("gemma2-scalar", {**BY_ID["gemma2"].hf, "query_pre_attn_scalar": 20}, "spm")
    hf = build_hf(family, tmp_path / "hf", converter)
    llamacpp_convert([(hf, tmp_path / "llamacpp.gguf", "f32")], converter)
    code, report = run("verify", str(hf), str(tmp_path / "llamacpp.gguf"))
    assert code == 1 and "attention_scale" in report["error"]
    code, report = run("convert", str(hf), "--to", "gguf", "--out", str(tmp_path / "x.gguf"))
    assert code == 2 and "query_pre_attn_scalar" in report["error"]


def test_a_type_without_a_calibrated_comparison_needs_a_tolerance(made, tmp_path):
    """Q4_0 (here quantized by gguf; llama-quantize may round with an importance matrix): no quantize-alike
    comparison and no calibrated tolerance, so verify asks for one (exit 2) and runs with it."""
    hf, gguf_file = made["llama-gqa"]
    q4 = rewrite(gguf_file, tmp_path / "q4.gguf", quantize_to=gguf.GGMLQuantizationType.Q4_0)
    code, report = run("verify", str(hf), str(q4))
    assert code == 2 and "Q4_0" in report["error"] and "--atol" in report["error"]
    code, report = run("verify", str(hf), str(q4), "--atol", "1", "--rtol", "1")
    assert code == 0 and report["stages"][-1]["max_abs_diff"] > 0


@pytest.mark.parametrize("family_id", ["gemma3", "olmo", "starcoder2"])
def test_litgpt_without_config_json_writes_the_architecture_of_its_shape(made, family_id, tmp_path):
    """A litgpt checkpoint without config.json (no HF class to go by) is written as the llama.cpp architecture
    that computes its shape, as llama.cpp's converter writes its HF source: Gemma 3's q/k norms and local RoPE,
    OLMo's weightless LayerNorms, StarCoder2's sequential residual (not GPT-NeoX's parallel one)."""
    hf, oracle = made[family_id]
    assert run("convert", str(hf), "--to", "litgpt", "--out", str(tmp_path / "lit"))[0] == 0
    (tmp_path / "lit" / "config.json").unlink()
    code, report = run("convert", str(tmp_path / "lit"), "--to", "gguf", "--out", str(tmp_path / "out"))
    assert code == 0, report
    mine, theirs = gguf.GGUFReader(tmp_path / "out" / "model.gguf"), gguf.GGUFReader(oracle)
    assert mine.fields["general.architecture"].contents() == BY_ID[family_id].arch
    ours = {t.name: np.array(t.data) for t in mine.tensors}
    assert all(np.array_equal(ours.pop(t.name), np.array(t.data)) for t in theirs.tensors)
    # litgpt stores the tied head as a tensor of its own, written as `output` (llama.cpp loads either)
    assert list(ours) in ([], ["output.weight"])
    embedding = next(np.array(t.data) for t in theirs.tensors if t.name == "token_embd.weight")
    assert all(np.array_equal(v, embedding) for v in ours.values())
    assert run("verify", str(hf), str(tmp_path / "out"))[0] == 0


def test_gemma3_that_llamacpp_computes_otherwise(converter, tmp_path):
    """llama.cpp's gemma3 slides its window on layers il % 6 < 5 (its converter writes no pattern) and never
    soft-caps scores: a Gemma 3 whose layer_types differ computes otherwise from llama.cpp's own file (verify
    exit 1, naming the windows), and neither it nor one with attn_logit_softcapping is written (exit 2)."""
    from gguf_oracle import Family

    types = build_hf(Family("gemma3-types", {**BY_ID["gemma3"].hf, "num_hidden_layers": 2,
                                             "layer_types": ["sliding_attention", "full_attention"]}, "spm"),
                     tmp_path / "types", converter)
    capped = build_hf(Family("gemma3-capped", {**BY_ID["gemma3"].hf, "attn_logit_softcapping": 5.0}, "spm"),
                      tmp_path / "capped", converter)
    llamacpp_convert([(types, tmp_path / "types.gguf", "f32")], converter)
    code, report = run("verify", str(types), str(tmp_path / "types.gguf"))
    assert code == 1 and "sliding_window_layers" in report["error"]
    for hf, why in ((types, "sliding window on other layers"), (capped, "attention soft-capping")):
        code, report = run("convert", str(hf), "--to", "gguf", "--out", str(tmp_path / "x.gguf"))
        assert code == 2 and why in report["error"], report
        assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("key", ["gemma3.attention.sliding_window", "gemma3.rope.freq_base_swa"])
def test_gemma3_window_keys_are_read_as_llamacpp_reads_them(made, tmp_path, key):
    """Without attention.sliding_window llama.cpp's gemma3 runs every layer global; without rope.freq_base_swa
    its sliding layers rotate with base 10000: either file computes otherwise than the source (exit 1)."""
    hf, gguf_file = made["gemma3"]
    code, report = run("verify", str(hf), str(rewrite(gguf_file, tmp_path / "x.gguf", drop=(key,))))
    assert code == 1, report


@pytest.mark.parametrize("tensors,keys,why", [
    ({"blk.0.attn_norm.weight": np.ones(32, dtype=np.float32)}, None, "blk.0.attn_norm.weight"),
    (None, {"olmo.attention.clamp_kqv": 8.0}, "olmo.attention.clamp_kqv"),
])
def test_olmo_norm_weights_or_clamping_are_refused(made, tmp_path, tensors, keys, why):
    """llama.cpp's olmo has no norm tensors (its LayerNorms have no weights) and clamps q/k/v by clamp_kqv,
    which litgpt does not: a file with either is refused (exit 2), not read as OLMo."""
    hf, gguf_file = made["olmo"]
    code, report = run("verify", str(hf), str(rewrite(gguf_file, tmp_path / "x.gguf", keys, tensors)))
    assert code == 2 and why in report["error"], report


def test_tied_head_is_written_where_llamacpp_requires_output(converter, tmp_path):
    """llama.cpp's gptneox loads no file without `output` (src/models/gptneox.cpp creates it as required): a
    tied GPT-NeoX is written with its head as `output`, the embedding's values, where llama.cpp's converter
    would write none."""
    from gguf_oracle import Family

    family = Family("gpt-neox-tied", {**BY_ID["gpt-neox"].hf, "tie_word_embeddings": True}, "gpt2",
                    config_json={"rotary_pct": 0.25})
    hf = build_hf(family, tmp_path / "hf", converter)
    from safetensors import safe_open

    with safe_open(hf / "model.safetensors", "pt") as f:
        assert "embed_out.weight" not in f.keys()  # tied: the source has no head of its own
    code, report = run("convert", str(hf), "--to", "gguf", "--out", str(tmp_path / "x.gguf"))
    assert code == 0, report
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "x.gguf").tensors}
    assert np.array_equal(tensors["output.weight"], tensors["token_embd.weight"])
    assert run("verify", str(hf), str(tmp_path / "x.gguf"))[0] == 0


def test_widths_llamacpp_would_not_load_are_refused(made, tmp_path):
    """llama.cpp sizes its tensors from feed_forward_length and refuses a file whose tensors differ
    (check_tensor_dims): verify refuses it too (exit 2), instead of verifying a file that runs nowhere."""
    hf, gguf_file = made["llama-gqa"]
    bad = rewrite(gguf_file, tmp_path / "wide.gguf", keys={"llama.feed_forward_length": 100.0},
                  drop=("llama.feed_forward_length",))
    code, report = run("verify", str(hf), str(bad))
    assert code == 2 and "llama.cpp refuses to load" in report["error"] and "feed_forward_length 100" in report["error"]


def test_glm_settings_llamacpp_does_not_carry(converter, tmp_path):
    """llama.cpp's converter writes a GlmForCausalLM's RMSNorm eps from ChatGLM's `layernorm_epsilon` (default 1e-5)
    and its rope.freq_base as 10000 * rope_ratio, not from rms_norm_eps or rope_theta: a GLM-4 with its own eps
    (GlmConfig's default 1.5625e-07) and base computes otherwise in llama.cpp's file (verify exit 1, naming them);
    `convert --to gguf` writes them and verifies."""
    from gguf_oracle import Family

    family = replace(BY_ID["glm"], id="glm-eps", hf={**BY_ID["glm"].hf, "rms_norm_eps": 1.5625e-07,
                                                     "rope_parameters": {"rope_theta": 500.0, "rope_type": "default",
                                                                         "partial_rotary_factor": 0.5}})
    hf = build_hf(family, tmp_path / "hf", converter)
    llamacpp_convert([(hf, tmp_path / "theirs.gguf", "f32")], converter)
    code, report = run("verify", str(hf), str(tmp_path / "theirs.gguf"))
    assert code == 1 and "norm_eps" in report["error"] and "rope_base" in report["error"], report
    code, report = run("convert", str(hf), "--to", "gguf", "--out", str(tmp_path / "ours.gguf"))
    assert code == 0, report
    assert run("verify", str(hf), str(tmp_path / "ours.gguf"))[0] == 0


def test_chatglm_remote_original_and_its_fused_attn_qkv(made, converter, tmp_path):
    """ChatGLM2/3 / GLM-4 as released (ChatGLMModel, remote code; built here from the GLM model's tensors): llama.cpp's
    converter keeps query_key_value as a sequential attn_qkv. That file verifies against the remote original and
    against its transformers twin; inspect says fused; one layer's rows in half rotary order fail naming it; and
    `convert --to gguf` of the original writes llama.cpp's attn_qkv bit for bit."""
    from safetensors.torch import load_file
    from test_remote_twins_glm import chatglm_from_glm

    glm, _ = made["glm"]
    original = tmp_path / "chatglm"
    vocab = BY_ID["glm"].hf_vocab
    chatglm_from_glm(load_file(glm / "model.safetensors"), original, padded_vocab_size=vocab, vocab_size=vocab,
                     rope_ratio=1)  # the converter reads vocab_size too, as released configs have it
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(glm / name, original / name)
    theirs = tmp_path / "theirs.gguf"
    llamacpp_convert([(original, theirs, "f32")], converter)
    assert "blk.0.attn_qkv.weight" in {t.name for t in gguf.GGUFReader(theirs).tensors}
    for source in (original, glm):
        code, report = run("verify", str(source), str(theirs))
        assert code == 0, report
    code, report = run("inspect", str(theirs))
    assert code == 0 and report["family"] == "chatglm" and report["qkv_order"] == "sequential"
    assert report["rope"]["order"] == "pairs" and report["rope"]["fraction"] == 0.5
    code, report = run("verify", str(original), str(corrupt_rotary(theirs, tmp_path / "bad.gguf", layer=1)))
    assert code == 1 and report["first_difference"] == "layer 1"
    code, report = run("convert", str(original), "--to", "gguf", "--out", str(tmp_path / "ours.gguf"))
    assert code == 0, report
    ours = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "ours.gguf").tensors}
    oracle = {t.name: np.array(t.data) for t in gguf.GGUFReader(theirs).tensors}
    assert sorted(ours) == sorted(oracle) and all(np.array_equal(ours[k], v) for k, v in oracle.items())


def _baichuan(tensors: dict, directory: Path, n_layer: int) -> Path:
    """Baichuan-7B's files (W_pack: Q, K, V thirds; Llama's other names; the remote config's keys) of the first
    `n_layer` layers of an MHA Llama's tensors."""
    import torch
    from safetensors.torch import save_file

    kept = {k: v for k, v in tensors.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < n_layer}
    out = {k: v for k, v in kept.items() if not any(f".self_attn.{x}_proj." in k for x in "qkv")}
    for i in range(n_layer):
        p = f"model.layers.{i}.self_attn"
        out[f"{p}.W_pack.weight"] = torch.cat([kept[f"{p}.{x}_proj.weight"] for x in "qkv"])
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in out.items()}, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["BaichuanForCausalLM"], "model_type": "baichuan",
        "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                     "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
        "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_hidden_layers": n_layer,
        "vocab_size": 96, "model_max_length": 64, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "torch_dtype": "float32"}))
    return directory


def test_internlm2_and_baichuan_remote_originals(made, converter, tmp_path):
    """InternLM2 and Baichuan-7B as released (remote code; built from transformers twins' tensors), whose fused
    wqkv / W_pack llama.cpp cuts into attn_q/k/v, Q and K permuted into pairs order. llama.cpp's InternLM2 file
    verifies against the remote original, inspect names it, one layer's Q/K left in half order fails naming the
    layer, and `convert --to gguf` of the original writes its tensors bit for bit. llama.cpp 0.3.36's
    BaichuanModel.modify_tensors recurses forever on every tensor but W_pack (it calls itself, not super()), so it
    makes no Baichuan file: its W_pack code (the permutation of llama's LlamaModel.permute) and the 32-layer twin
    Llama's file from llama.cpp's converter are the oracle of qkvconv's Baichuan file instead. llama.cpp's
    baichuan rotates only a 32-layer model (LLM_TYPE_7B): a Baichuan of 2 layers is not written."""
    from safetensors.torch import load_file
    from test_remote_twins import internlm2_from_llama

    from gguf_oracle import SMALL, Family

    internlm2 = tmp_path / "internlm2"
    internlm2_from_llama(load_file(made["llama-gqa"][0] / "model.safetensors"), internlm2)
    python = converter / "venv" / "bin" / "python"  # its own tokenizer loop wants a vocabulary of exactly vocab_size
    subprocess.run([str(python), str(TOKENIZERS), "spm", str(internlm2), "--vocab", "96"], check=True,
                   capture_output=True, timeout=300)
    llama = build_hf(Family("llama-mha-32", {"model_type": "llama", **SMALL, "num_hidden_layers": 32,
                                             "num_key_value_heads": 4, "rms_norm_eps": 1e-6}, "spm"),
                     tmp_path / "llama-32", converter)
    tensors = load_file(llama / "model.safetensors")
    baichuan = _baichuan(tensors, tmp_path / "baichuan", 32)
    llamacpp_convert([(internlm2, tmp_path / "internlm2.gguf", "f32"), (llama, tmp_path / "llama-32.gguf", "f32")],
                     converter)
    cases = {"internlm2": (internlm2, tmp_path / "internlm2.gguf", ()),
             "baichuan": (baichuan, tmp_path / "baichuan-ours" / "model.gguf", ("--variant", "baichuan-7b"))}
    oracles = {"internlm2": tmp_path / "internlm2.gguf", "baichuan": tmp_path / "llama-32.gguf"}
    for arch, (hf, file, variant) in cases.items():
        code, report = run("convert", str(hf), "--to", "gguf", "--out", str(tmp_path / f"{arch}-ours"), *variant)
        assert code == 0, report
        ours = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / f"{arch}-ours" / "model.gguf").tensors}
        oracle = {t.name: np.array(t.data) for t in gguf.GGUFReader(oracles[arch]).tensors}
        assert sorted(ours) == sorted(oracle) and all(np.array_equal(ours[k], v) for k, v in oracle.items())
        code, report = run("verify", str(hf), str(file), *variant)
        assert code == 0, report
        code, report = run("inspect", str(file))
        assert code == 0 and report["family"] == arch and report["rope"]["order"] == "pairs"
        code, report = run("verify", str(hf), str(corrupt_rotary(file, tmp_path / f"{arch}-bad.gguf", 1)), *variant)
        assert code == 1 and report["first_difference"] == "layer 1", report
    _w_pack_as_llamacpp_cuts_it(converter, load_file(baichuan / "model.safetensors"), oracles["baichuan"])
    short = _baichuan(tensors, tmp_path / "baichuan-2", 2)
    code, report = run("convert", str(short), "--to", "gguf", "--out", str(tmp_path / "x"), "--variant", "baichuan-7b")
    assert code == 2 and "rotates only models of 32 layers" in report["error"] and not (tmp_path / "x").exists()


def test_internlm2_with_biases_is_not_written(made, tmp_path):
    """InternLM2 with `bias` true (wqkv and wo biases): llama.cpp's internlm2 loads no attn_output bias (and its
    converter cannot cut a wqkv bias), so `convert --to gguf` refuses it (exit 2) and writes nothing."""
    import json

    import torch
    from safetensors.torch import load_file, save_file
    from test_remote_twins import internlm2_from_llama

    directory = tmp_path / "internlm2-bias"
    tensors = internlm2_from_llama(load_file(made["llama-gqa"][0] / "model.safetensors"), directory)
    for i in range(2):
        tensors[f"model.layers.{i}.attention.wqkv.bias"] = torch.randn(64)
        tensors[f"model.layers.{i}.attention.wo.bias"] = torch.randn(32)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "bias": True}))
    code, report = run("convert", str(directory), "--to", "gguf", "--out", str(tmp_path / "x.gguf"))
    assert code == 2 and "a bias on the attention output" in report["error"], report
    assert not (tmp_path / "x.gguf").exists()


def baichuan_13b(directory: Path, n_layer: int = 40) -> Path:
    """A tiny Baichuan-13B (ALiBi, no RoPE: llama.cpp's baichuan gives ALiBi to models of 40 layers only): the
    original layout of a random MHA Llama's tensors, read with --variant baichuan-13b."""
    from hf_models import saved_random_model
    from safetensors.torch import load_file

    saved_random_model({"model_type": "llama", **{k: v for k, v in SMALL.items() if k != "num_key_value_heads"},
                        "num_hidden_layers": n_layer}, directory / "llama")
    return _baichuan(load_file(directory / "llama" / "model.safetensors"), directory / "hf", n_layer)


def test_baichuan_13b_is_written_with_alibi_at_40_layers(tmp_path):
    """Baichuan-13B: ALiBi (Bloom's slopes, which ggml's for max_bias 8 are) and no RoPE. llama.cpp's baichuan gives
    ALiBi to a model of 40 layers, RoPE to one of 32 and no positions to any other, from block_count alone: the
    40-layer file is written without RoPE keys and verifies against its source; read as the 7B (rotary) it
    computes another function (exit 1); a 13B of other depth is refused (exit 2). llama.cpp's converter cannot
    make a Baichuan file (test_internlm2_and_baichuan_remote_originals); its runtime ran qkvconv's
    (benchmarks/results/llamacpp_logits_h200_host.txt)."""
    hf = baichuan_13b(tmp_path)
    code, report = run("convert", str(hf), "--to", "gguf", "--out", str(tmp_path / "x.gguf"))  # 7B or 13B? not guessed
    assert code == 2 and "--variant" in report["error"] and not (tmp_path / "x.gguf").exists(), report
    variant = ("--variant", "baichuan-13b")
    code, report = run("convert", str(hf), "--to", "gguf", "--out", str(tmp_path / "out.gguf"), *variant)
    assert code == 0, report
    keys = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "out.gguf").fields.items() if k.startswith("baichuan.")}
    assert keys["baichuan.block_count"] == 40 and not any("rope" in k for k in keys), keys
    assert run("verify", str(hf), str(tmp_path / "out.gguf"), *variant)[0] == 0
    code, report = run("verify", str(hf), str(tmp_path / "out.gguf"), "--variant", "baichuan-7b")
    assert code == 1 and "alibi" in report["error"], report
    short = _baichuan(load_file_of(hf), tmp_path / "short", 2)
    code, report = run("convert", str(short), "--to", "gguf", "--out", str(tmp_path / "x.gguf"), *variant)
    assert code == 2 and "ALiBi" in report["error"] and not (tmp_path / "x.gguf").exists(), report


def load_file_of(hf: Path) -> dict:
    """The Llama tensors a Baichuan directory was made of (its twin beside it)."""
    from safetensors.torch import load_file

    return load_file(hf.parent / "llama" / "model.safetensors")


def _w_pack_as_llamacpp_cuts_it(converter: Path, tensors: dict, llama_file: Path) -> None:
    """llama.cpp's BaichuanModel.modify_tensors, run on layer 1's W_pack, gives the twin Llama file's attn_q/k/v."""
    import sys

    tree = converter / "llama.cpp"
    sys.path[:0] = [str(tree), str(tree / "gguf-py")]
    try:
        from conversion.baichuan import BaichuanModel
    finally:
        del sys.path[:2]
    model = object.__new__(BaichuanModel)
    model.hparams = {"num_attention_heads": 4}
    model.format_tensor_name = lambda kind, bid: f"blk.{bid}.{kind.name.lower()}.weight"
    name = "model.layers.1.self_attn.W_pack.weight"
    cut = {k: v.numpy() for k, v in model.modify_tensors(tensors[name], name, 1)}
    theirs = {t.name: np.array(t.data) for t in gguf.GGUFReader(llama_file).tensors}
    assert len(cut) == 3 and all(np.array_equal(v, theirs[k]) for k, v in cut.items())


@pytest.mark.parametrize("keys,drop,code,why", [
    ({"mpt.attention.max_alibi_bias": 0.0}, ("mpt.attention.max_alibi_bias",), 1, "alibi"),
    (None, ("mpt.attention.clamp_kqv",), 1, "clip_qkv"),
    ({"mpt.attention.max_alibi_bias": 4.0}, ("mpt.attention.max_alibi_bias",), 2, "max_alibi_bias 4"),
])
def test_mpt_alibi_and_clamping_are_read_from_the_file(made, tmp_path, keys, drop, code, why):
    """llama.cpp's mpt takes ALiBi and QKV clamping from attention.max_alibi_bias and attention.clamp_kqv (its
    converter writes max_alibi_bias 0 unless attn_config.alibi, while transformers' MPT always adds ALiBi): a file
    without them computes otherwise (exit 1, naming the field); slopes other than max_bias 8's are refused (exit 2)."""
    hf, gguf_file = made["mpt"]
    got, report = run("verify", str(hf), str(rewrite(gguf_file, tmp_path / "x.gguf", keys, drop=drop)))
    assert got == code and why in report["error"], report


@pytest.mark.parametrize("keys,drop,tensors,code,why", [
    ({"command-r.logit_scale": 1.0}, ("command-r.logit_scale",), {}, 1, "logit_scale: 0.37 vs 1.0"),
    ({}, ("command-r.logit_scale",), {}, 1, "logit_scale: 0.37 vs 1.0"),  # absent: f_logit_scale 0, not applied
    ({}, (), {"output.weight": np.ones((50304, 32), dtype=np.float32)}, 2, "does not load"),
    # CohereForCausalLM's attention_bias gives o_proj a bias, which llama.cpp's converter writes and its graph lacks
    ({}, (), {"blk.1.attn_output.bias": np.ones(32, dtype=np.float32)}, 2, "blk.1.attn_output.bias"),
    # q/k norms in a model of fewer than 64 layers: llama.cpp's command-r does not load them (it refuses the file)
    ({}, (), {"blk.1.attn_q_norm.weight": np.ones((4, 8), dtype=np.float32)}, 2, "blk.1.attn_q_norm.weight"),
])
def test_command_r_logit_scale_and_head_as_llamacpp_reads_them(made, tmp_path, keys, drop, tensors, code, why):
    """llama.cpp's command-r multiplies the logits by command-r.logit_scale where nonzero (absent: 0, unscaled)
    and always takes token_embd as the head: a file without the source's scale computes another function (exit 1,
    naming the field); one with a tensor llama.cpp would not load (`output`, an attn_output bias) is refused (exit 2)."""
    hf, gguf_file = made["cohere"]
    got, report = run("verify", str(hf), str(rewrite(gguf_file, tmp_path / "x.gguf", keys, tensors, drop=drop)))
    assert got == code and why in report["error"], report


@pytest.mark.parametrize("settings,why", [
    ({"attention_bias": True}, "biases (q/k/v: True, other linears: True)"),  # o_proj's bias: command-r has none
    ({"logit_scale": 0.0}, "reads a scale of 0 as none"),  # transformers multiplies by 0, llama.cpp leaves it out
    ({"use_qk_norm": True}, "command-r loads none in a model of 2 layers"),  # norms from 64 layers only
    ({"num_hidden_layers": 64}, "no query/key norms (command-r loads norms of type per_head"),  # and requires them
])
def test_cohere_that_llamacpp_computes_otherwise_is_not_written(tmp_path, settings, why):
    """Cohere models llama.cpp's command-r would load and compute otherwise are refused (exit 2), nothing written."""
    from gguf_oracle import SMALL
    from hf_models import saved_random_model

    saved_random_model({"model_type": "cohere", **SMALL, **settings}, tmp_path / "hf")
    code, report = run("convert", str(tmp_path / "hf"), "--to", "gguf", "--out", str(tmp_path / "x.gguf"))
    assert code == 2 and why in report["error"], report
    assert not (tmp_path / "x.gguf").exists()


def test_multi_head_gpt_bigcode_file_llamacpp_cannot_load_is_refused(converter, tmp_path):
    """llama.cpp's converter writes every GPT-BigCode with head_count_kv 1: a multi-head one's c_attn (3 * n_embd
    per-head rows) then does not fit the heads, and llama.cpp refuses to load the file; verify refuses it (exit 2)
    rather than read its rows in some order."""
    family = replace(BY_ID["gpt-bigcode-mqa"], id="gpt-bigcode-mha", hf={**BY_ID["gpt-bigcode-mqa"].hf,
                                                                         "multi_query": False})
    hf = build_hf(family, tmp_path / "hf", converter)
    llamacpp_convert([(hf, tmp_path / "theirs.gguf", "f32")], converter)
    code, report = run("verify", str(hf), str(tmp_path / "theirs.gguf"))
    assert code == 2 and "check_tensor_dims" in report["error"], report


def test_qwen1_gguf(converter, tmp_path, monkeypatch):
    """Qwen-1 (QWenLMHeadModel, remote code) as llama.cpp's `qwen`. Its converter reads the vocabulary through
    Qwen's own tokenizer code, which is never run here: the oracle run takes GPT-2's BPE vocabulary instead
    (fixtures/gguf_convert_many.py QKVCONV_GPT2_VOCAB); its tensors and model keys are the converter's own.
    That converter writes the norm eps as attention.layer_norm_epsilon, which llama.cpp's qwen does not read (it
    requires layer_norm_rms_epsilon): its file is refused, as llama.cpp refuses to load it. qkvconv's own file
    holds the same tensors bit for bit, verifies against the original and its Qwen2 twin, and one layer's wrong
    rotary order fails naming it."""
    from gguf_oracle import GPT2_VOCAB, _gpt2_tokenizer
    from test_remote_twins import build_twin
    from test_remote_twins_mlp import SIZES, qwen1_from_qwen2

    twin_dir, twin, _ = build_twin(tmp_path / "twin", model_type="qwen2", **{**SIZES, "num_key_value_heads": 4,
                                   "vocab_size": GPT2_VOCAB}, rms_norm_eps=1e-6)
    source = tmp_path / "qwen1"
    qwen1_from_qwen2(twin, source, vocab_size=GPT2_VOCAB)
    python = converter / "venv" / "bin" / "python"
    _gpt2_tokenizer(converter, converter / "gpt2-tokenizer", python)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(converter / "gpt2-tokenizer" / name, source / name)
    monkeypatch.setenv("QKVCONV_GPT2_VOCAB", "conversion.qwen:QwenModel")
    theirs = tmp_path / "llamacpp.gguf"
    llamacpp_convert([(source, theirs, "f32")], converter)
    code, report = run("verify", str(source), str(theirs))
    assert code == 2 and "layer_norm_rms_epsilon" in report["error"] and "refuses to load" in report["error"]

    ours = tmp_path / "qkvconv.gguf"
    assert run("convert", str(source), "--to", "gguf", "--out", str(ours))[0] == 0
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    mine, made = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert sorted(mine) == sorted(made) and "blk.1.attn_qkv.bias" in mine and "blk.1.ffn_gate.weight" in mine
    assert all(np.array_equal(np.array(mine[n].data), np.array(made[n].data)) for n in mine)
    assert a.fields["qwen.feed_forward_length"].contents() == b.fields["qwen.feed_forward_length"].contents() == 96
    for reference in (source, twin_dir):
        assert run("verify", str(reference), str(ours))[0] == 0
    code, report = run("inspect", str(ours))
    assert (report["qkv_order"], report["rope"]["order"]) == ("sequential", "half")
    wrong = corrupt_rotary(ours, tmp_path / "wrong.gguf", layer=1)
    code, report = run("verify", str(source), str(wrong))
    assert code == 1 and report["first_difference"] == "layer 1"
