"""URI -> bytes/files/filesystem, against local disk, a local HTTP server and a real S3
endpoint (moto server mode)."""
from __future__ import annotations

import os

import numpy as np
import paddle
import pyarrow.fs as pafs
import pytest

from stfpm import storage
from stfpm.storage import StorageError, StorageNotFound, fetch_to_cache, filesystem_for, read_bytes, write_bytes
from stfpm.model.weights import load_teacher_state, read_pdparams


def test_local_write_is_atomic_and_creates_directories(tmp_path):
    target = tmp_path / "a" / "b" / "x.bin"
    write_bytes(str(target), b"one")
    write_bytes(f"file://{target}", b"two")
    assert read_bytes(str(target)) == b"two" and read_bytes(f"file://{target}") == b"two"
    assert os.listdir(target.parent) == ["x.bin"]  # no temp file left behind
    assert fetch_to_cache(str(target), tmp_path / "cache") == target  # local paths are not copied


def test_missing_and_unsupported_uris_are_named(tmp_path):
    with pytest.raises(StorageNotFound, match="nothing.bin"):
        read_bytes(str(tmp_path / "nothing.bin"))
    with pytest.raises(FileNotFoundError):  # StorageNotFound is one too
        fetch_to_cache(str(tmp_path / "nothing.bin"), tmp_path)
    with pytest.raises(ValueError, match="gs://b/k"):
        filesystem_for("gs://b/k")


def test_http_read_and_fetch(file_server, tmp_path):
    (file_server.root / "w.bin").write_bytes(b"payload")
    assert read_bytes(f"{file_server.url}/w.bin") == b"payload"
    cached = fetch_to_cache(f"{file_server.url}/w.bin", tmp_path / "cache")
    assert cached.parent == tmp_path / "cache" and cached.name.endswith("-w.bin") and cached.read_bytes() == b"payload"
    with pytest.raises(StorageError, match="missing.bin"):
        read_bytes(f"{file_server.url}/missing.bin")


def test_s3_round_trip_and_listing(s3_env):
    bucket = s3_env
    write_bytes(f"s3://{bucket}/maps/a.png", b"a")
    write_bytes(f"s3://{bucket}/maps/sub/b.png", b"bb")
    assert read_bytes(f"s3://{bucket}/maps/sub/b.png") == b"bb"
    fs, path = filesystem_for(f"s3://{bucket}/maps")
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{bucket}/maps"
    listed = {i.path: i.size for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.is_file}
    assert listed == {f"{bucket}/maps/a.png": 1, f"{bucket}/maps/sub/b.png": 2}
    with pytest.raises(StorageNotFound, match=f"s3://{bucket}/maps/none.png"):
        read_bytes(f"s3://{bucket}/maps/none.png")


def test_s3_specific_endpoint_variable_wins(s3_env, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    write_bytes(f"s3://{s3_env}/k", b"v")
    assert read_bytes(f"s3://{s3_env}/k") == b"v"


def test_fetch_to_cache_reuses_fresh_copies_and_fetches_changed_objects(s3_env, tmp_path, monkeypatch):
    uri = f"s3://{s3_env}/models/bottle/teacher.safetensors"
    write_bytes(uri, b"v1")
    first = fetch_to_cache(uri, tmp_path)
    assert first.read_bytes() == b"v1" and first.name.endswith("-teacher.safetensors")

    downloads = []
    real_download = storage.download_file
    monkeypatch.setattr(storage, "download_file", lambda u, d, **kw: downloads.append(u) or real_download(u, d, **kw))
    assert fetch_to_cache(uri, tmp_path) == first and downloads == []
    write_bytes(uri, b"version 2")
    assert fetch_to_cache(uri, tmp_path).read_bytes() == b"version 2" and downloads == [uri]


def test_fetch_to_cache_copies_an_s3_directory(s3_env, tmp_path):
    write_bytes(f"s3://{s3_env}/models/bottle/model.json", b"{}")
    write_bytes(f"s3://{s3_env}/models/bottle/weights/student.safetensors", b"s")
    local = fetch_to_cache(f"s3://{s3_env}/models/bottle/", tmp_path)
    assert local.is_dir() and local.name.endswith("-bottle")
    assert (local / "model.json").read_bytes() == b"{}"
    assert (local / "weights" / "student.safetensors").read_bytes() == b"s"


def test_teacher_weights_from_s3(s3_env, resnet18_pdparams, tmp_path):
    # layer1-3 only (a quarter of the file), to keep the transfer through moto short
    expected = {k: v for k, v in read_pdparams(resnet18_pdparams).items() if not k.startswith(("layer4.", "fc."))}
    paddle.save({k: paddle.to_tensor(v) for k, v in expected.items()}, str(tmp_path / "r18.pdparams"))
    write_bytes(f"s3://{s3_env}/r18.pdparams", (tmp_path / "r18.pdparams").read_bytes())
    state = load_teacher_state("resnet18", source=f"s3://{s3_env}/r18.pdparams", cache_dir=tmp_path / "cache")
    assert state.keys() == expected.keys() and all(np.array_equal(v, expected[k]) for k, v in state.items())
