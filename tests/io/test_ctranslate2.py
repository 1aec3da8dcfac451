"""CTranslate2 model.bin reader/writer: round trips, CTranslate2's own serializer as oracle, the shipped files,
and malformed input."""

import struct

import numpy as np
import pytest
import torch

from dreidel.io import read_ctranslate2, shipped_whisper_files, write_ctranslate2


def _variables(generator):
    return {
        "enc/linear/weight": torch.randn(6, 4, generator=generator),
        "enc/half": torch.randn(3, 5, generator=generator).half(),
        "enc/brain": torch.randn(7, generator=generator).bfloat16(),
        "enc/ids": torch.arange(-3, 9, dtype=torch.int32).reshape(3, 4),
        "enc/heads": torch.tensor(6, dtype=torch.int16),
        "enc/flag": torch.tensor(1, dtype=torch.int8),
        "enc/scalar": torch.tensor(0.25),
        "enc/cube": torch.randn(2, 3, 4, generator=generator),
    }


def test_round_trip_all_dtypes_and_aliases(tmp_path):
    generator = torch.Generator().manual_seed(0)
    variables = _variables(generator)
    path = write_ctranslate2(tmp_path / "model.bin", "TinySpec", 7, variables, {"dec/linear/weight": "enc/linear/weight"})
    raw = read_ctranslate2(tmp_path, dtype=None)  # directory form
    assert (raw.spec, raw.revision, raw.binary_version) == ("TinySpec", 7, 6)
    assert raw.aliases == {"dec/linear/weight": "enc/linear/weight"}
    assert set(raw.variables) == set(variables)
    for name, tensor in variables.items():
        assert raw.variables[name].dtype == tensor.dtype, name
        assert raw.variables[name].shape == tensor.shape, name
        assert torch.equal(raw.variables[name], tensor), name
    assert torch.equal(raw.tensor("dec/linear/weight"), variables["enc/linear/weight"])
    as_float = read_ctranslate2(path)
    assert as_float.variables["enc/half"].dtype == torch.float32
    assert torch.equal(as_float.variables["enc/half"], variables["enc/half"].float())
    assert as_float.variables["enc/ids"].dtype == torch.int32  # integers without a scale stay integers
    assert read_ctranslate2(path, dtype=torch.float16).variables["enc/linear/weight"].dtype == torch.float16


@pytest.mark.parametrize("bits", [8, 16])
def test_quantised_weights_are_dequantised(tmp_path, bits):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    if bits == 8:  # one scale per output row, q = round(w * scale)
        scale = 127.0 / weight.abs().amax(dim=1)
        quantised = torch.round(weight * scale[:, None]).to(torch.int8)
    else:  # a scalar scale
        scale = 2.0**10 / weight.abs().max()
        quantised = torch.round(weight * scale).to(torch.int16)
    write_ctranslate2(tmp_path / "model.bin", "Q", 1,
                      {"l/weight": quantised, "l/weight_scale": scale.float(), "l/bias": torch.zeros(5)})
    model = read_ctranslate2(tmp_path / "model.bin")
    assert set(model.variables) == {"l/weight", "l/bias"}  # the consumed scale is gone
    assert model.raw_dtypes["l/weight"] == f"int{bits}"
    step = (1.0 / scale).max().item()
    assert torch.allclose(model.variables["l/weight"].double(), weight, atol=0.51 * step, rtol=0)


@pytest.mark.parametrize("weight_shape, scale_shape", [((3,), (1, 1)), ((), (1,)), ((2, 3), (1,))])
def test_a_single_scale_keeps_the_weights_shape(tmp_path, weight_shape, scale_shape):
    """A one-element scale of another rank broadcast the weight to its own rank: (3,) came back (1, 3) (a user
    audit)."""
    weight = torch.arange(1, 1 + int(np.prod(weight_shape)), dtype=torch.int8).reshape(weight_shape)
    path = write_ctranslate2(tmp_path / "q.bin", "S", 1, {"w": weight, "w_scale": torch.full(scale_shape, 2.0)})
    restored = read_ctranslate2(path).variables["w"]
    assert restored.shape == weight_shape and torch.equal(restored, weight.float() / 2)


def test_big_endian_negated_and_meta_variables(tmp_path):
    """A big-endian array failed inside torch without the variable's name, a lazily negated tensor inside
    .numpy(), a meta tensor with NotImplementedError (a user audit)."""
    values = np.arange(6, dtype=">f4").reshape(2, 3)
    negated = torch._neg_view(-torch.arange(4.0))  # holds arange(4) with its negation bit set
    path = write_ctranslate2(tmp_path / "m.bin", "S", 1, {"big": values, "neg": negated})
    variables = read_ctranslate2(path).variables
    assert torch.equal(variables["big"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(variables["neg"], torch.arange(4.0))
    with pytest.raises(ValueError, match="variable 'm' must be a dense tensor with data, got a meta tensor"):
        write_ctranslate2(tmp_path / "x.bin", "S", 1, {"m": torch.zeros(2, device="meta")})
    assert not (tmp_path / "x.bin").exists()


@pytest.mark.parametrize("scale", [torch.ones(7), torch.ones(3, 3)])
def test_a_scale_that_fits_no_row_is_a_value_error(tmp_path, scale):
    write_ctranslate2(tmp_path / "model.bin", "Q", 1,
                      {"l/weight": torch.ones(5, 8, dtype=torch.int8), "l/weight_scale": scale})
    with pytest.raises(ValueError, match=r"'l/weight_scale' has shape .*one scale, or one per row"):
        read_ctranslate2(tmp_path / "model.bin")
    assert read_ctranslate2(tmp_path / "model.bin", dtype=None).variables["l/weight_scale"].shape == scale.shape


def test_an_integer_scale_is_a_value_error(tmp_path):
    write_ctranslate2(tmp_path / "model.bin", "Q", 1, {"l/weight": torch.ones(5, 8, dtype=torch.int8),
                                                      "l/weight_scale": torch.ones(5, dtype=torch.int32)})
    with pytest.raises(ValueError, match="'l/weight_scale' is int32; the scale of the quantised 'l/weight' must be "
                                         "floating-point"):
        read_ctranslate2(tmp_path / "model.bin")


@pytest.mark.parametrize("quantization, stored", [("int8", "int8"), ("int8_float16", "int8"), ("int16", "int16"),
                                                  ("float16", "float16"), ("bfloat16", "bfloat16")])
def test_against_ctranslate2_serializer(tmp_path, quantization, stored):
    """CTranslate2's own writer (quantising and aliasing duplicates) read back by our reader."""
    model_spec = pytest.importorskip("ctranslate2.specs.model_spec")
    common_spec = pytest.importorskip("ctranslate2.specs.common_spec")

    class TinySpec(model_spec.ModelSpec):
        def __init__(self):
            super().__init__()
            self.first = common_spec.LinearSpec()
            self.second = common_spec.LinearSpec()
            self.norm = common_spec.LayerNormSpec()
            self.heads = np.dtype("int16").type(4)

        @property
        def name(self):
            return "TinySpec"

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((6, 4)).astype(np.float32)
    spec = TinySpec()
    spec.first.weight, spec.first.bias = weight.copy(), rng.standard_normal(6).astype(np.float32)
    spec.second.weight = weight.copy()  # duplicate -> aliased
    gamma = rng.standard_normal(4).astype(np.float32)
    spec.norm.gamma = gamma.copy()
    spec.norm.beta = rng.standard_normal(4).astype(np.float32)
    spec.validate()
    spec.optimize(quantization=quantization)
    spec._serialize(str(tmp_path / "model.bin"))

    model = read_ctranslate2(tmp_path / "model.bin")
    assert model.spec == "TinySpec" and model.aliases == {"second/weight": "first/weight"}
    assert model.raw_dtypes["first/weight"] == stored
    assert "first/weight_scale" not in model.variables
    step = {"int8": np.abs(weight).max() / 127.0, "int16": np.abs(weight).max() / 2**10,
            "float16": np.abs(weight).max() * 2.0**-10, "bfloat16": np.abs(weight).max() * 2.0**-7}[stored]
    assert np.allclose(model.tensor("second/weight").numpy(), weight, atol=0.51 * step, rtol=0)
    assert np.allclose(model.variables["norm/gamma"].numpy(), gamma, atol=np.abs(gamma).max() * 2.0**-8, rtol=0)
    assert int(model.variables["heads"]) == 4


@pytest.fixture(scope="module")
def tiny_en():
    try:
        files = shipped_whisper_files("tiny.en")
    except ValueError as error:
        pytest.skip(str(error))
    return read_ctranslate2(files.model_parts)


def test_shipped_tiny_en(tiny_en):
    assert tiny_en.spec == "WhisperSpec"
    shapes = {name: tuple(tensor.shape) for name, tensor in tiny_en.variables.items()}
    assert shapes["encoder/conv1/weight"] == (384, 80, 3)
    assert shapes["encoder/conv2/weight"] == (384, 384, 3)
    assert shapes["encoder/position_encodings/encodings"] == (1500, 384)
    assert shapes["decoder/embeddings/weight"] == (51864, 384)
    assert shapes["decoder/position_encodings/encodings"] == (448, 384)
    for stack in ("encoder", "decoder"):
        layers = {name.split("/")[1] for name in shapes if name.startswith(f"{stack}/layer_") and "layer_norm" not in name.split("/")[1]}
        assert layers == {f"layer_{i}" for i in range(4)}
        assert shapes[f"{stack}/layer_3/self_attention/linear_0/weight"] == (1152, 384)  # fused q, k, v
    assert shapes["decoder/layer_0/attention/linear_1/weight"] == (768, 384)  # fused cross-attention k, v
    assert tiny_en.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tiny_en.variables.values() if t.is_floating_point())
    assert int(tiny_en.variables["decoder/num_heads"]) == 6


def test_shipped_tiny_en_matches_raw_bytes(tiny_en):
    """Independent check of one tensor: locate its name in the file and decode the bytes after the header."""
    path = shipped_whisper_files("tiny.en").model_parts[0]
    data = path.read_bytes()
    name = b"encoder/conv1/weight\0"
    start = data.index(struct.pack("<H", len(name)) + name) + 2 + len(name)
    rank = data[start]
    dims = struct.unpack_from(f"<{rank}I", data, start + 1)
    dtype_id, n_bytes = struct.unpack_from("<BI", data, start + 1 + 4 * rank)
    assert (dims, dtype_id) == ((384, 80, 3), 4)
    payload = np.frombuffer(data, dtype="<f2", count=n_bytes // 2, offset=start + 6 + 4 * rank).reshape(dims)
    assert np.array_equal(tiny_en.variables["encoder/conv1/weight"].numpy(), payload.astype(np.float32))


def test_rewriting_the_shipped_file_reproduces_it_byte_for_byte(tmp_path):
    """Reader and writer agree with the CTranslate2 converter that made tiny.en: raw read + write = same bytes."""
    try:
        original = shipped_whisper_files("tiny.en").model_parts[0]
    except ValueError as error:
        pytest.skip(str(error))
    raw = read_ctranslate2(original, dtype=None)
    copy = write_ctranslate2(tmp_path / "model.bin", raw.spec, raw.revision, raw.variables, raw.aliases)
    assert copy.stat().st_size == original.stat().st_size
    assert copy.read_bytes() == original.read_bytes()


@pytest.mark.slow
def test_shipped_base_from_two_parts():
    try:
        files = shipped_whisper_files("base")
    except ValueError as error:
        pytest.skip(str(error))
    model = read_ctranslate2(files.model_parts, dtype=torch.float16)
    assert model.spec == "WhisperSpec"
    assert model.variables["decoder/embeddings/weight"].shape == (51865, 512)
    assert model.variables["encoder/layer_5/self_attention/linear_0/weight"].dtype == torch.float16


# ---- malformed input -------------------------------------------------------------------------------------------

@pytest.fixture
def small_file(tmp_path):
    variables = {"a/weight": torch.ones(3, 2), "a/weight_scale": torch.ones(3), "b": torch.tensor(3, dtype=torch.int8)}
    return write_ctranslate2(tmp_path / "model.bin", "S", 1, variables, {"c": "b"})


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        read_ctranslate2(tmp_path / "absent.bin")
    with pytest.raises(ValueError, match="no model.bin"):
        read_ctranslate2(tmp_path)


@pytest.mark.parametrize("change", [-8, 8])
def test_a_file_that_changes_size_while_read_is_a_value_error(small_file, monkeypatch, change):
    import os
    from pathlib import Path

    real_stat = Path.stat

    def stat_as_before_the_change(self, *args, **kwargs):  # the size seen before another process changed it
        result = real_stat(self, *args, **kwargs)
        if self == small_file:
            fields = list(result)
            fields[6] += change  # st_size
            return os.stat_result(fields)
        return result

    monkeypatch.setattr(Path, "stat", stat_as_before_the_change)
    with pytest.raises(ValueError, match="changed size while it was being read"):
        read_ctranslate2(small_file)


def test_every_truncation_is_a_value_error(small_file):
    data = small_file.read_bytes()
    for cut in range(len(data)):
        small_file.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=str(small_file)):
            read_ctranslate2(small_file)


@pytest.mark.parametrize("version", [0, 7, 0x46554747, 0xFFFFFFFF])
def test_wrong_magic_or_version(small_file, version):
    data = small_file.read_bytes()
    small_file.write_bytes(struct.pack("<I", version) + data[4:])
    with pytest.raises(ValueError, match="binary version"):
        read_ctranslate2(small_file)


def test_not_a_model(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b'{"json": "is not a model"}')
    with pytest.raises(ValueError, match="binary version"):
        read_ctranslate2(path)


def _header_offset(data, name):
    encoded = name.encode() + b"\0"
    return data.index(struct.pack("<H", len(encoded)) + encoded) + 2 + len(encoded)


@pytest.mark.parametrize("field, value, message", [
    ("dtype", 9, "unknown dtype id 9"),
    ("n_bytes", 0xFFFFFFFF, "declares"),
    ("dim0", 0xFFFFFFFF, "declares"),
    ("rank", 200, "rank 200"),
])
def test_corrupt_header(small_file, field, value, message):
    data = bytearray(small_file.read_bytes())
    start = _header_offset(data, "a/weight")  # rank 2, dims (3, 2), dtype, n_bytes
    position = {"rank": (start, "<B"), "dim0": (start + 1, "<I"), "dtype": (start + 9, "<B"),
                "n_bytes": (start + 10, "<I")}[field]
    struct.pack_into(position[1], data, position[0], value)
    small_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=message):
        read_ctranslate2(small_file)


def test_trailing_bytes_and_bad_alias(small_file, tmp_path):
    small_file.write_bytes(small_file.read_bytes() + b"\0\0")
    with pytest.raises(ValueError, match="trailing"):
        read_ctranslate2(small_file)
    with pytest.raises(ValueError, match="not among the variables"):
        write_ctranslate2(tmp_path / "x.bin", "S", 1, {"a": torch.ones(1)}, {"b": "missing"})


def test_bad_arguments(small_file):
    with pytest.raises(TypeError, match="dtype"):
        read_ctranslate2(small_file, dtype=torch.int8)
    with pytest.raises(TypeError, match="path"):
        read_ctranslate2(42)
    with pytest.raises(ValueError, match="dtype"):
        write_ctranslate2(small_file, "S", 1, {"a": torch.ones(2, dtype=torch.float64)})


@pytest.mark.parametrize("kwargs, error, message", [
    ({"revision": True}, ValueError, r"revision must be an int in \[0, 2\*\*32\), got True"),  # was written as 1
    ({"revision": 2.0}, ValueError, r"revision must be an int in \[0, 2\*\*32\), got 2.0"),
    ({"spec": None}, TypeError, "spec must be the specification name, a str such as 'WhisperSpec', got NoneType"),
    ({"aliases": {1: "a"}}, TypeError, "alias names must be non-empty strings"),
])
def test_write_refuses_bad_header_arguments_naming_them(tmp_path, kwargs, error, message):
    """spec=None and an int alias name were AttributeErrors from deep in the packing."""
    arguments = {"spec": "S", "revision": 1, "aliases": None, **kwargs}
    with pytest.raises(error, match=message):
        write_ctranslate2(tmp_path / "model.bin", arguments["spec"], arguments["revision"], {"a": torch.ones(2)},
                          arguments["aliases"])
    assert list(tmp_path.iterdir()) == []


def test_write_takes_a_numpy_revision(tmp_path):
    path = write_ctranslate2(tmp_path / "model.bin", "S", np.int64(3), {"a": torch.ones(2)})
    assert read_ctranslate2(path).revision == 3


@pytest.mark.slow
def test_assembled_base_directory_loads_in_ctranslate2(tmp_path):
    """The concatenated base model is a valid CTranslate2 model for CTranslate2 itself."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    from dreidel.io import shipped_whisper_directory

    try:
        directory = shipped_whisper_directory("base", tmp_path)
    except ValueError as error:
        pytest.skip(str(error))
    assert shipped_whisper_directory("base", tmp_path) == directory  # reused, not rebuilt
    whisper = ctranslate2.models.Whisper(str(directory), device="cpu", compute_type="int8", intra_threads=1)
    assert whisper.is_multilingual
    ours = read_ctranslate2(directory)
    assert ours.variables["encoder/conv1/weight"].shape == (512, 80, 3)


def test_directory_of_numbered_parts(small_file, tmp_path):
    data = small_file.read_bytes()
    parts_dir = tmp_path / "parts"
    parts_dir.mkdir()
    cut = len(data) // 10
    chunks = [data[i * cut:(i + 1) * cut] for i in range(9)] + [data[9 * cut:]]
    for number in (2, 10, 1, 3, 4, 5, 6, 7, 8, 9):  # 10 sorts after 2 and 9
        (parts_dir / f"model.bin.part{number}").write_bytes(chunks[number - 1])
    model = read_ctranslate2(parts_dir, dtype=None)
    assert torch.equal(model.variables["a/weight"], torch.ones(3, 2))
    assert model.aliases == {"c": "b"}


@pytest.mark.parametrize("numbers, missing", [((1, 3), 2), ((2,), 1), ((1, 2, 4, 5), 3)])
def test_a_directory_missing_a_numbered_part_names_it(small_file, tmp_path, numbers, missing):
    """The parts present were concatenated anyway and failed as a corrupt file."""
    parts_dir = tmp_path / "parts"
    parts_dir.mkdir()
    for number in numbers:
        (parts_dir / f"model.bin.part{number}").write_bytes(small_file.read_bytes())
    with pytest.raises(ValueError, match=rf"holds model.bin parts \[{', '.join(map(str, numbers))}\] but no "
                                         rf"model\.bin\.part{missing}: the parts must be numbered 1 to n"):
        read_ctranslate2(parts_dir)


def _old_format_file(version):
    """A file in an older layout, built by hand from the format description (item size + element count)."""
    def string(text):
        encoded = text.encode() + b"\0"
        return struct.pack("<H", len(encoded)) + encoded

    values = np.arange(6, dtype="<f4").reshape(2, 3)
    header = struct.pack("<I", version) + (string("OldSpec") + struct.pack("<I", 2) if version >= 2 else b"")
    body = struct.pack("<I", 1) + string("w") + struct.pack("<B2I", 2, 2, 3) + struct.pack("<BI", 4, 6) + values.tobytes()
    aliases = struct.pack("<I", 1) + string("v") + string("w") if version >= 3 else b""
    return header + body + aliases, values


@pytest.mark.parametrize("version", [1, 2, 3])
def test_older_binary_versions(tmp_path, version):
    data, values = _old_format_file(version)
    path = tmp_path / "model.bin"
    path.write_bytes(data)
    model = read_ctranslate2(path)
    assert model.binary_version == version
    assert model.spec == ("OldSpec" if version >= 2 else "") and model.revision == (2 if version >= 2 else 1)
    assert np.array_equal(model.variables["w"].numpy(), values)
    assert model.aliases == ({"v": "w"} if version >= 3 else {})


@pytest.mark.parametrize("shape", [(2**32,), (2**30 + 1,)], ids=["dimension", "bytes"])
def test_a_variable_beyond_the_format_s_32_bit_fields_is_refused(tmp_path, shape):
    """A dimension or a byte count of 2**32 or more used to end in struct.error (an expanded view: no memory)."""
    huge = torch.zeros(1).expand(shape)
    with pytest.raises(ValueError, match="'w' of shape .* does not fit the CTranslate2 format"):
        write_ctranslate2(tmp_path, "TestSpec", 1, {"w": huge})
    assert not (tmp_path / "model.bin").exists()
