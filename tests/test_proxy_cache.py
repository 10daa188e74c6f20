"""The dense copy of a GGUF proxy kept in the cache folder (gradfilter.io.models)."""

import json
import logging
import os

import pytest
import torch

from gradfilter.io import models
from gradfilter.io.models import (
    _read_dense,
    dense_cache_root,
    tiny_llama,
    tiny_tokenizer,
    write_dense,
)

KEY = {"source_sha256": "ab" * 32, "dtype": "float32", "transformers": "x", "torch": "y"}


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cache_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADFILTER_CACHE", str(tmp_path))
    assert dense_cache_root() == str(tmp_path)
    for off in ("0", "off", "none", ""):
        monkeypatch.setenv("GRADFILTER_CACHE", off)
        assert dense_cache_root() is None
    monkeypatch.delenv("GRADFILTER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dense_cache_root() == str(tmp_path / "xdg" / "gradfilter")


def test_dense_copy_round_trip(tmp_path):
    model, tok = tiny_llama(seed=3), tiny_tokenizer()
    folder = str(tmp_path / "proxies" / "tiny")
    assert write_dense(folder, model, tok, KEY)
    got = _read_dense(folder, KEY, torch.float32)
    assert got is not None
    m2, t2 = got
    assert _same_weights(model, m2)
    assert t2("hi there")["input_ids"] == tok("hi there")["input_ids"]
    ids = torch.tensor([tok("abc def")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, m2(ids).logits)
    # no temporary folder is left beside the copy
    assert os.listdir(tmp_path / "proxies") == ["tiny"]


def test_dense_copy_of_another_key_or_incomplete_is_not_used(tmp_path):
    folder = str(tmp_path / "tiny")
    assert write_dense(folder, tiny_llama(), tiny_tokenizer(), KEY)
    assert _read_dense(folder, {**KEY, "dtype": "bfloat16"}, torch.float32) is None
    os.remove(os.path.join(folder, models._CACHE_MARK))
    assert _read_dense(folder, KEY, torch.float32) is None


def test_damaged_dense_copy_is_ignored_with_a_warning(tmp_path, caplog):
    folder = str(tmp_path / "tiny")
    assert write_dense(folder, tiny_llama(), tiny_tokenizer(), KEY)
    with open(os.path.join(folder, "model.safetensors"), "r+b") as f:
        f.truncate(100)
    with caplog.at_level(logging.WARNING, logger="gradfilter"):
        assert _read_dense(folder, KEY, torch.float32) is None
    assert "damaged dense proxy copy" in caplog.text


def test_unwritable_cache_is_reported_not_fatal(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="gradfilter"):
        assert not write_dense(str(blocker / "tiny"), tiny_llama(), tiny_tokenizer(), KEY)
    assert "could not keep a dense copy" in caplog.text and "GRADFILTER_CACHE" in caplog.text


def test_existing_complete_copy_is_kept(tmp_path):
    folder = str(tmp_path / "tiny")
    first = tiny_llama(seed=1)
    assert write_dense(folder, first, tiny_tokenizer(), KEY)
    # a second writer (another process that de-quantised at the same time) keeps it
    assert write_dense(folder, tiny_llama(seed=2), tiny_tokenizer(), KEY)
    assert _same_weights(first, _read_dense(folder, KEY, torch.float32)[0])
    assert len(os.listdir(tmp_path)) == 1


@pytest.mark.slow
def test_real_gguf_proxy_second_load_reads_the_dense_copy(monkeypatch, tmp_path):
    try:
        path = models.smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    from gradfilter.run.state import model_fingerprint

    monkeypatch.setenv("GRADFILTER_CACHE", str(tmp_path))
    m1, t1 = models.load_proxy(None, torch.bfloat16)
    (folder,) = (tmp_path / "proxies").iterdir()
    with open(folder / models._CACHE_MARK, encoding="utf-8") as f:
        key = json.load(f)
    assert key["dtype"] == "bfloat16" and key == models._dense_key(path, torch.bfloat16)

    real = models._from_pretrained
    calls = []

    def spy(location, dtype, gguf_file=None):
        calls.append(gguf_file)
        return real(location, dtype, gguf_file=gguf_file)

    monkeypatch.setattr(models, "_from_pretrained", spy)
    m2, t2 = models.load_proxy(None, torch.bfloat16)
    assert calls == [None]  # the dense folder, not the GGUF file
    assert model_fingerprint(m1, t1) == model_fingerprint(m2, t2)
    text = "Give three tips for staying healthy. ünïcode 12 + 30"
    assert t1(text)["input_ids"] == t2(text)["input_ids"]
    ids = torch.tensor([t1(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(m1(ids).logits, m2(ids).logits)
