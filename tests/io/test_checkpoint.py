"""Checkpoint directories: round trip, atomic replacement, and clear errors for every kind of damage."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch
from torch import nn

from dreidel.io import checkpoint as checkpoint_module
from dreidel.io.checkpoint import (
    CONFIG_FILE,
    TENSORS_FILE,
    load_state_strict,
    TensorHeader,
    read_checkpoint,
    read_tensor_header,
    require_config_keys,
    write_checkpoint,
)


@pytest.fixture
def tensors():
    generator = torch.Generator().manual_seed(0)
    return {"layer.weight": torch.randn(3, 4, generator=generator), "layer.bias": torch.randn(3, generator=generator),
            "order": torch.randperm(7, generator=generator), "half": torch.randn(2, 2, generator=generator).half()}


def test_round_trip_keeps_values_and_dtypes(tmp_path, tensors):
    config = {"layers": [{"type": "Linear", "args": {"in_features": 4}}], "note": "ü"}
    write_checkpoint(tmp_path / "model", config, tensors)
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [CONFIG_FILE, TENSORS_FILE]
    loaded_config, loaded = read_checkpoint(tmp_path / "model")
    assert loaded_config == config
    assert loaded.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoint_gets_the_modes_mkdir_and_open_would_give(tmp_path, tensors, umask):
    """Written through mkdtemp (owner-only 0700) and renamed: the directory must not keep that mode."""
    import os

    old = os.umask(umask)
    try:
        target = write_checkpoint(tmp_path / "model", {"layers": []}, tensors)
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask
    for name in (CONFIG_FILE, TENSORS_FILE):
        assert (target / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_tensor_header_gives_shapes_and_dtypes_without_the_data(tmp_path, tensors):
    write_checkpoint(tmp_path / "m", {}, {**tensors, "bf16": torch.zeros(5, dtype=torch.bfloat16)})
    header = read_tensor_header(tmp_path / "m")
    assert header["layer.weight"] == TensorHeader((3, 4), "F32") and header["layer.weight"].is_floating_point
    assert header["order"] == TensorHeader((7,), "I64") and not header["order"].is_floating_point
    assert header["half"].dtype == "F16" and header["bf16"].is_floating_point
    path = tmp_path / "m" / TENSORS_FILE
    for damaged in (path.read_bytes()[: len(path.read_bytes()) // 2], b"\x10\x00"):
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match="corrupted or truncated"):
            read_tensor_header(tmp_path / "m")


def test_shared_and_strided_tensors_are_saved(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    write_checkpoint(tmp_path / "m", {}, {"a": base, "a_t": base.t(), "a_row": base[1]})
    _, loaded = read_checkpoint(tmp_path / "m")
    assert torch.equal(loaded["a_t"], base.t()) and torch.equal(loaded["a_row"], base[1])


def test_existing_checkpoint_is_replaced_without_leftovers(tmp_path, tensors):
    write_checkpoint(tmp_path / "m", {"format": "dreidel.test", "version": 1}, tensors)
    write_checkpoint(tmp_path / "m", {"format": "dreidel.test", "version": 2}, {"only": torch.ones(2)})
    config, loaded = read_checkpoint(tmp_path / "m")
    assert config == {"format": "dreidel.test", "version": 2} and list(loaded) == ["only"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no staging or retired directories remain


@pytest.mark.parametrize("exchange", [True, False])
def test_existing_checkpoint_is_replaced_in_either_way(tmp_path, tensors, monkeypatch, exchange):
    if not exchange:  # as where renameat2 is missing: aside, then into place
        monkeypatch.setattr(checkpoint_module, "_exchange", lambda a, b: False)
    for version in (1, 2, 3):
        write_checkpoint(tmp_path / "m", {"format": "dreidel.test", "version": version}, {"v": torch.full((2,), float(version))})
    config, loaded = read_checkpoint(tmp_path / "m")
    assert config == {"format": "dreidel.test", "version": 3} and torch.equal(loaded["v"], torch.full((2,), 3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


@pytest.mark.parametrize("exchange", [True, False])
def test_a_read_only_checkpoint_is_replaced_without_leftovers(tmp_path, tensors, monkeypatch, exchange):
    """A checkpoint directory made read-only kept its files, so rmtree (errors ignored) left the old checkpoint
    behind under a hidden temporary name, silently (a review, without root's override of permissions)."""
    if not exchange:
        monkeypatch.setattr(checkpoint_module, "_exchange", lambda a, b: False)
    write_checkpoint(tmp_path / "m", {"format": "dreidel.test", "version": 1}, tensors)
    os.chmod(tmp_path / "m", 0o555)
    removed = []
    real_rmtree = shutil.rmtree

    def rmtree_without_override(path, ignore_errors=False):  # what rmtree does without root's override
        if not os.stat(path).st_mode & stat.S_IWUSR:
            return
        removed.append(path)
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", rmtree_without_override)
    write_checkpoint(tmp_path / "m", {"format": "dreidel.test", "version": 2}, {"only": torch.ones(2)})
    assert [p.name for p in tmp_path.iterdir()] == ["m"] and removed
    assert read_checkpoint(tmp_path / "m")[0]["version"] == 2


def test_an_old_checkpoint_that_cannot_be_removed_is_named_in_a_warning(tmp_path, tensors, monkeypatch):
    write_checkpoint(tmp_path / "m", {"format": "dreidel.test", "version": 1}, tensors)
    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", lambda path, ignore_errors=False: None)
    with pytest.warns(RuntimeWarning, match=r"could not remove the one it replaced: it is left at .*\.m\."):
        write_checkpoint(tmp_path / "m", {"format": "dreidel.test", "version": 2}, tensors)
    assert read_checkpoint(tmp_path / "m")[0]["version"] == 2


_WRITER = """
import sys, torch
from dreidel.io.checkpoint import write_checkpoint
path, saves = sys.argv[1], int(sys.argv[2])
write_checkpoint(path, {"format": "dreidel.test", "version": 2}, {"v": torch.full((64,), 2.0)})
print("started", flush=True)
for save in range(saves):
    version = 1 + save % 2
    write_checkpoint(path, {"format": "dreidel.test", "version": version}, {"v": torch.full((64,), float(version))})
"""


@pytest.mark.skipif(checkpoint_module._LIBC is None or not hasattr(checkpoint_module._LIBC, "renameat2"),
                    reason="needs Linux renameat2")
def test_a_reader_never_mixes_two_checkpoints_while_another_process_saves(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "m"
    write_checkpoint(path, {"format": "dreidel.test", "version": 1}, {"v": torch.full((64,), 1.0)})
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), "400"], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "started"  # the reading overlaps the saves from here
        changes, last = 0, None
        while writer.poll() is None:
            config, loaded = read_checkpoint(path)  # raises if a file is missing
            assert torch.equal(loaded["v"], torch.full((64,), float(config["version"])))  # one checkpoint's pair
            changes += config["version"] != last
            last = config["version"]
    finally:
        writer.wait(timeout=60)
    assert writer.returncode == 0
    assert changes >= 10, f"the reader saw the checkpoint change only {changes} times: the test did not overlap"


def test_failed_write_keeps_the_old_checkpoint(tmp_path, tensors, monkeypatch):
    write_checkpoint(tmp_path / "m", {"format": "dreidel.test", "version": 1}, tensors)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(tmp_path / "m", {"format": "dreidel.test", "version": 2}, tensors)
    assert read_checkpoint(tmp_path / "m")[0] == {"format": "dreidel.test", "version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


@pytest.mark.parametrize("link_to", ["nowhere", "loop"])
def test_refuses_a_dangling_or_looping_link(tmp_path, tensors, link_to):
    (tmp_path / "m").symlink_to(tmp_path / ("m" if link_to == "loop" else "nowhere"))
    with pytest.raises(ValueError, match="symbolic link to nothing"):
        write_checkpoint(tmp_path / "m", {"format": "dreidel.test", "version": 1}, tensors)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_refuses_to_replace_unrelated_data(tmp_path, tensors):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ValueError, match="not a dreidel checkpoint"):
        write_checkpoint(tmp_path / "photos", {}, tensors)
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a dreidel checkpoint"):
        write_checkpoint(tmp_path / "notes.txt", {}, tensors)
    assert (tmp_path / "photos" / "cat.jpg").exists() and (tmp_path / "notes.txt").read_text() == "keep me"


def test_non_json_config_is_rejected_before_writing(tmp_path, tensors):
    with pytest.raises(TypeError):
        write_checkpoint(tmp_path / "m", {"bad": object()}, tensors)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("cut", [0.5, 0.02])
def test_truncated_tensor_file_is_a_value_error(tmp_path, tensors, cut):
    write_checkpoint(tmp_path / "m", {}, tensors)
    path = tmp_path / "m" / TENSORS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        read_checkpoint(tmp_path / "m")


def test_pickle_in_place_of_safetensors_is_not_unpickled(tmp_path, tensors):
    write_checkpoint(tmp_path / "m", {}, tensors)
    torch.save(tensors, tmp_path / "m" / TENSORS_FILE)  # a pickle archive under the safetensors name
    with pytest.raises(ValueError, match="corrupted or truncated"):
        read_checkpoint(tmp_path / "m")


@pytest.mark.parametrize("text, message", [("{not json", "not valid JSON"), ("[1, 2]", "JSON object"),
                                           ("[" * 100_000 + "]" * 100_000, "not valid JSON: RecursionError"),
                                           ('{"a": ' + "9" * 5000 + "}", "not valid JSON: ValueError")])
def test_bad_config_is_a_value_error(tmp_path, tensors, text, message):
    write_checkpoint(tmp_path / "m", {}, tensors)
    (tmp_path / "m" / CONFIG_FILE).write_text(text)
    with pytest.raises(ValueError, match=message):
        read_checkpoint(tmp_path / "m")


@pytest.mark.parametrize("missing", [CONFIG_FILE, TENSORS_FILE])
def test_missing_file_names_it(tmp_path, tensors, missing):
    write_checkpoint(tmp_path / "m", {}, tensors)
    (tmp_path / "m" / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        read_checkpoint(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        read_checkpoint(tmp_path / "absent")


def _open_descriptors() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
@pytest.mark.parametrize("name", [CONFIG_FILE, TENSORS_FILE])
@pytest.mark.parametrize("damage, error, message", [
    ("directory", FileNotFoundError, "not a regular file"),
    ("fifo", FileNotFoundError, "not a regular file"),  # would block an open without O_NONBLOCK
    ("link-loop", FileNotFoundError, "a loop of symbolic links"),  # was the OS's OSError (a user audit)
])
def test_damaged_files_are_refused_without_leaking_descriptors(tmp_path, tensors, name, damage, error, message):
    import os

    write_checkpoint(tmp_path / "m", {}, tensors)
    target = tmp_path / "m" / name
    target.unlink()
    if damage == "directory":
        target.mkdir()
    elif damage == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to(target.name)
    before = _open_descriptors()
    for _ in range(20):
        with pytest.raises(error, match=message):
            read_checkpoint(tmp_path / "m")
    assert _open_descriptors() == before


def test_open_checkpoint_files_read_again_and_refuse_after_the_block(tmp_path, tensors):
    from dreidel.io import open_checkpoint

    write_checkpoint(tmp_path / "m", {"format": "dreidel.test", "version": 7}, tensors)
    with open_checkpoint(tmp_path / "m") as files:
        assert files.config() == files.config() == {"format": "dreidel.test", "version": 7}
        assert set(files.tensor_header()) == set(files.tensors()) == set(tensors)
    with pytest.raises(ValueError, match="closed"):
        files.config()


def test_require_config_keys_names_the_key():
    require_config_keys({"a": 1, "b": 2}, ("a", "b"), "config.json")
    with pytest.raises(ValueError, match="'layers'"):
        require_config_keys({"a": 1}, ("a", "layers"), "config.json")


def _model() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    return model


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda t: t.pop("0.weight"), "lacks tensor '0.weight'"),
        (lambda t: t.__setitem__("2.weight", torch.ones(1)), "has tensor '2.weight' that the model does not have"),
        (lambda t: t.__setitem__("0.bias", torch.ones(4)), r"'0.bias' has shape \(4,\), the model expects \(3,\)"),
        (lambda t: t.pop("1.running_mean"), "lacks tensor '1.running_mean'"),
    ],
    ids=["missing", "unexpected", "mis-shaped", "missing-buffer"],
)
def test_load_state_strict_checks_both_directions(damage, message):
    source = _model()
    tensors = dict(source.state_dict())
    damage(tensors)
    with pytest.raises(ValueError, match=message):
        load_state_strict(_model(), tensors)


def test_load_state_strict_copies_everything():
    source, target = _model(), _model()
    with torch.no_grad():
        for tensor in source.state_dict().values():
            tensor.copy_(torch.rand_like(tensor.float()).to(tensor.dtype) + 1)
    load_state_strict(target, {k: v.double() if v.is_floating_point() else v for k, v in source.state_dict().items()})
    for key, value in source.state_dict().items():
        assert target.state_dict()[key].dtype == value.dtype
        assert torch.equal(target.state_dict()[key], value)


def test_config_file_is_plain_json(tmp_path, tensors):
    write_checkpoint(tmp_path / "m", {"layers": [1, 2]}, tensors)
    assert json.loads((tmp_path / "m" / CONFIG_FILE).read_text()) == {"layers": [1, 2]}


def test_load_state_strict_can_keep_the_tensors_dtypes():
    source, target = _model(), _model()
    tensors = {k: v.double() if v.is_floating_point() else v.int() for k, v in source.state_dict().items()}
    tensors["1.weight"] = tensors["1.weight"].bfloat16()
    load_state_strict(target, tensors, keep_dtypes=True)
    state = target.state_dict()
    assert state["0.weight"].dtype == torch.float64 and state["1.weight"].dtype == torch.bfloat16
    assert state["1.num_batches_tracked"].dtype == torch.int64  # integer tensors keep the module's dtype
    assert isinstance(target[0].weight, nn.Parameter) and target[0].weight.requires_grad
    for key, value in tensors.items():
        assert torch.equal(state[key], value.to(state[key].dtype)), key


@pytest.mark.parametrize("files", [
    {CONFIG_FILE: '{"api_key_path": "/home/me/.key"}'},  # another tool's settings
    {CONFIG_FILE: '{"format": "keras"}', TENSORS_FILE: ""},
    {CONFIG_FILE: "not json"},
    {TENSORS_FILE: ""},
])
def test_a_directory_is_replaced_only_when_its_config_is_dreidels(tmp_path, tensors, files):
    for name, text in files.items():
        (tmp_path / "m").mkdir(exist_ok=True)
        (tmp_path / "m" / name).write_text(text)
    with pytest.raises(ValueError, match="not a dreidel checkpoint"):
        write_checkpoint(tmp_path / "m", {"format": "dreidel.test"}, tensors)
    assert {p.name: p.read_text() for p in (tmp_path / "m").iterdir()} == files


def test_an_empty_directory_is_replaced(tmp_path, tensors):
    (tmp_path / "m").mkdir()
    write_checkpoint(tmp_path / "m", {"format": "dreidel.test"}, tensors)
    assert read_checkpoint(tmp_path / "m")[0] == {"format": "dreidel.test"}


def test_a_checkpoint_with_the_longest_legal_name_is_written_and_replaced(tmp_path, tensors):
    path = tmp_path / ("run-" + "x" * 251)  # 255 bytes: the staging names must be cut to fit beside it
    for version in (1, 2):
        write_checkpoint(path, {"format": "dreidel.test", "version": version}, tensors)
    assert read_checkpoint(path)[0]["version"] == 2
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("name", [".", "", "..", "sub/.."])
def test_a_target_ending_in_a_dot_is_refused(tmp_path, monkeypatch, tensors, name):
    """save('.') in an empty working directory used to pass as an empty directory to replace, and failed late
    with 'cannot exchange ..tmp-... and .: Device or resource busy'."""
    (tmp_path / "cwd" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd" / "sub")
    with pytest.raises(ValueError, match=r"ends in '\.' or '\.\.'; give the checkpoint directory's own name"):
        write_checkpoint(name, {}, tensors)
    assert not any((tmp_path / "cwd" / "sub").iterdir())


def test_reading_a_checkpoint_bounds_its_config_like_read_json_object(tmp_path, tensors, monkeypatch):
    write_checkpoint(tmp_path / "model", {"note": "x"}, tensors)
    size = (tmp_path / "model" / CONFIG_FILE).stat().st_size
    monkeypatch.setattr(checkpoint_module, "MAX_JSON_BYTES", size - 1)  # a sparse 30 GiB config filled memory
    with pytest.raises(ValueError, match=f"config.json: larger than the {size - 1} bytes a JSON config may take"):
        read_checkpoint(tmp_path / "model")
    monkeypatch.setattr(checkpoint_module, "MAX_JSON_BYTES", size)
    assert read_checkpoint(tmp_path / "model")[0] == {"note": "x"}


def test_read_json_object_refuses_special_files_and_passes_os_errors_through(tmp_path, monkeypatch):
    from dreidel.io import read_json_object

    os.mkfifo(tmp_path / "fifo.json")  # reading it blocked for ever
    (tmp_path / "zero.json").symlink_to("/dev/zero")  # reading it filled memory
    for name in ("fifo.json", "zero.json"):
        with pytest.raises(ValueError, match="expected a regular file holding a JSON object"):
            read_json_object(tmp_path / name)
    with pytest.raises(FileNotFoundError):  # as before the check: OSError passes through
        read_json_object(tmp_path / "missing.json")
    with pytest.raises(IsADirectoryError):
        read_json_object(tmp_path)
    monkeypatch.setattr(checkpoint_module, "MAX_JSON_BYTES", 16)
    (tmp_path / "at_limit.json").write_text('{"a": 1234567890}')  # 17 bytes
    with pytest.raises(ValueError, match="larger than the 16 bytes"):
        read_json_object(tmp_path / "at_limit.json")
    (tmp_path / "at_limit.json").write_text('{"a": 123456789}')  # 16 bytes
    assert read_json_object(tmp_path / "at_limit.json") == {"a": 123456789}


def test_a_config_the_reader_would_refuse_is_refused_before_writing(tmp_path, tensors, monkeypatch):
    """A config over MAX_JSON_BYTES was written, then refused by read_config (audit)."""
    write_checkpoint(tmp_path / "model", {"format": "dreidel.x"}, tensors)
    size = (tmp_path / "model" / CONFIG_FILE).stat().st_size
    monkeypatch.setattr(checkpoint_module, "MAX_JSON_BYTES", size - 1)
    with pytest.raises(ValueError, match=f"config takes {size} bytes as JSON, more than the {size - 1}"):
        write_checkpoint(tmp_path / "big", {"format": "dreidel.x"}, tensors)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]
    monkeypatch.setattr(checkpoint_module, "MAX_JSON_BYTES", size)
    write_checkpoint(tmp_path / "big", {"format": "dreidel.x"}, tensors)
    assert read_checkpoint(tmp_path / "big")[0] == {"format": "dreidel.x"}


@pytest.mark.parametrize("entry, error, message", [
    (1, TypeError, r"tensors\['bad'\] must be a torch.Tensor, got int"),  # was AttributeError: no 'detach'
    (torch.zeros(2, device="meta"), ValueError, r"tensors\['bad'\] is on the meta device"),
    (torch.eye(2).to_sparse(), ValueError, r"tensors\['bad'\] has layout torch.sparse_coo"),
    # safetensors raised KeyError: torch.complex128, and torch's "Internal error" for a nested tensor (a user audit)
    (torch.zeros(2, dtype=torch.complex128), ValueError, r"tensors\['bad'\] is torch.complex128, which safetensors"),
    (torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)]), ValueError, r"tensors\['bad'\] is a nested"),
])
def test_an_entry_that_is_not_a_dense_tensor_is_named_before_writing(tmp_path, tensors, entry, error, message):
    with pytest.raises(error, match=message):
        write_checkpoint(tmp_path / "m", {"format": "dreidel.x"}, {**tensors, "bad": entry})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("config, tensors_given, message", [
    ([1], {}, "config must be a dict, got list"), ({}, [torch.zeros(1)], "tensors must be a dict, got list"),
    ({}, {1: torch.zeros(1)}, "tensors: names must be strings, got int 1")])
def test_a_config_or_tensors_that_are_not_dicts_are_type_errors(tmp_path, config, tensors_given, message):
    with pytest.raises(TypeError, match=message):
        write_checkpoint(tmp_path / "m", config, tensors_given)
    assert not any(tmp_path.iterdir())


def test_read_json_object_takes_a_str_path_and_refuses_other_types(tmp_path):
    from dreidel.io import read_json_object

    (tmp_path / "a.json").write_text('{"a": 1}')
    assert read_json_object(str(tmp_path / "a.json")) == {"a": 1}  # was AttributeError: 'str' has no 'exists'
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
        read_json_object(3)


def test_a_checkpoint_directory_in_a_loop_of_links_is_not_found(tmp_path):
    (tmp_path / "m").symlink_to("m")
    with pytest.raises(FileNotFoundError, match="no checkpoint directory at .* \\(a loop of symbolic links\\)"):
        read_checkpoint(tmp_path / "m")


def test_load_state_strict_refuses_a_non_bool_keep_dtypes():
    """keep_dtypes='no' kept the float64 tensors: the model turned float64."""
    model = _model()
    tensors = {key: value.double() for key, value in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"keep_dtypes: expected a bool .* got str 'no'"):
        load_state_strict(model, tensors, keep_dtypes="no")
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_nan_is_neither_written_nor_read_as_json_but_infinities_are(tmp_path, tensors):
    """json.dumps writes NaN, which is not JSON: a config's NaN eps loaded and made every output NaN. Infinities
    are settings (an infinity-norm Embedding's norm_type) and round-trip as Python writes them."""
    from dreidel.io import read_json_object

    with pytest.raises(ValueError, match=r"config\['layers'\]\[0\]\['eps'\] is NaN, which JSON cannot hold"):
        write_checkpoint(tmp_path / "m", {"format": "dreidel.test", "layers": [{"eps": float("nan")}]}, tensors)
    assert not (tmp_path / "m").exists()
    (tmp_path / "c.json").write_text('{"eps": NaN}')
    with pytest.raises(ValueError, match=r"c.json: not valid JSON: ValueError: NaN is not a JSON value"):
        read_json_object(tmp_path / "c.json")
    write_checkpoint(tmp_path / "m", {"format": "dreidel.test", "norm": [float("inf"), -float("inf")]}, tensors)
    assert read_checkpoint(tmp_path / "m")[0]["norm"] == [float("inf"), -float("inf")]
