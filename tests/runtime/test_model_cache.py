"""The on-disk cache of processed weights and tokenizers gives back exactly what a fresh
conversion gives, and never serves an entry whose inputs changed or that is damaged."""

from pathlib import Path

import pytest
import torch

from sweeps.runtime import model_cache as disk_cache
from sweeps.runtime import loading, models
from tasks import TaskSpec, build_task


def _assert_same_weights(a, b) -> None:
    assert a.cfg == b.cfg
    for name, value in a.__dict__.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, getattr(b, name)), name
        else:
            assert value == getattr(b, name), name


def _refuse():
    pytest.fail("the cache was missed: the entry was rebuilt")


def test_weights_round_trip_and_misses_when_the_source_changes(tmp_path, monkeypatch, tiny_llama):
    monkeypatch.setenv("SWEEPS_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "model.gguf"
    source.write_bytes(b"weights v1")
    built = []

    def build():
        built.append(1)
        return tiny_llama.weights

    first = disk_cache.cached_weights(source, build)
    assert first is tiny_llama.weights and len(built) == 1
    _assert_same_weights(disk_cache.cached_weights(source, _refuse), tiny_llama.weights)

    source.write_bytes(b"weights v2, a different size")  # a new file under the same name
    disk_cache.cached_weights(source, build)
    assert len(built) == 2
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # one entry per version
    assert not list((tmp_path / "cache").glob("tmp-*"))  # no staging file left


def test_a_damaged_weights_entry_is_rebuilt(tmp_path, monkeypatch, tiny_llama):
    monkeypatch.setenv("SWEEPS_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "model.gguf"
    source.write_bytes(b"weights")
    disk_cache.cached_weights(source, lambda: tiny_llama.weights)
    [entry] = (tmp_path / "cache").glob("*.pt")
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # truncated
    built = []
    disk_cache.cached_weights(source, lambda: built.append(1) or tiny_llama.weights)
    assert built == [1]
    _assert_same_weights(disk_cache.cached_weights(source, _refuse), tiny_llama.weights)


def test_cache_off_writes_nothing(tmp_path, monkeypatch, tiny_llama):
    monkeypatch.setenv("SWEEPS_CACHE_DIR", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    source = tmp_path / "model.gguf"
    source.write_bytes(b"weights")
    built = []
    for _ in range(2):
        disk_cache.cached_weights(source, lambda: built.append(1) or tiny_llama.weights)
    assert built == [1, 1]
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "home").exists()


def test_load_model_reads_the_embedded_weights_from_the_cache(tmp_path, monkeypatch, smollm):
    """The entry load_model reads is keyed on the GGUF file; filled with the bridge's own
    conversion (the fixture's), a load reads it back bit for bit without booting a bridge."""
    monkeypatch.setenv("SWEEPS_CACHE_DIR", str(tmp_path / "cache"))
    disk_cache.cached_weights(Path(smollm.info.source), lambda: smollm.weights)
    monkeypatch.setattr(loading, "load_bridge", lambda *a, **k: _refuse())
    loaded = loading.load_model(smollm.info)
    _assert_same_weights(loaded.weights, smollm.weights)
    assert loaded.weight_hash == loading.weight_hash(smollm.weights)


@pytest.mark.slow
def test_cached_tokenizer_builds_the_same_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEPS_CACHE_DIR", str(tmp_path / "cache"))
    info = models.describe_model("tiny-gpt2")
    parsed = loading.load_tokenizer(info)  # a miss: parsed out of the GGUF file, then stored
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained

    def no_gguf(*args, **kwargs):
        assert "gguf_file" not in kwargs, "the GGUF file was parsed again"
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", no_gguf)
    cached = loading.load_tokenizer(info)
    assert type(cached) is type(parsed) and cached is not parsed
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "padding_side"):
        assert getattr(cached, attr) == getattr(parsed, attr), attr
    for spec, kwargs in [(TaskSpec("ioi"), {}), (TaskSpec("text"), {"seq_len": 48})]:
        a, b = build_task(spec, parsed, n_prompts=16, **kwargs), build_task(spec, cached, n_prompts=16, **kwargs)
        assert torch.equal(a.clean, b.clean) and torch.equal(a.corrupt, b.corrupt) and a.prompts == b.prompts
    text = "héllo wörld 😀\n\tdef f(x): return x**2 <|im_start|>"
    assert cached(text)["input_ids"] == parsed(text)["input_ids"]


def _model_directory(kind: str, root: Path, tiny_gpt2) -> Path:
    from tests import known_circuit

    if kind == "checkpoint":  # an InterpBench-style TransformerLens checkpoint
        return known_circuit.write_checkpoint(root / "checkpoint", tiny_gpt2.tokenizer)
    hf_model, tokenizer, _ = loading.load_hf_model(tiny_gpt2.info)
    hf_model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    return root / "hf"


@pytest.mark.parametrize("kind", [pytest.param("local", marks=pytest.mark.slow), "checkpoint"])
def test_a_model_directory_is_cached_on_its_files(tmp_path, monkeypatch, tiny_gpt2, kind):
    """A model from a directory loads from the cache without processing it again (no bridge
    booted, no layer read), bit for bit; a changed file in the directory is a miss."""
    monkeypatch.setenv("SWEEPS_CACHE_DIR", str(tmp_path / "cache"))
    directory = _model_directory(kind, tmp_path, tiny_gpt2)
    info = models.describe_model(str(directory))
    assert info.kind == kind
    fresh = loading.load_model(info)  # a miss: converted, then stored
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1

    real_load_bridge, real_layerwise = loading.load_bridge, loading.layerwise.load_weights
    monkeypatch.setattr(loading, "load_bridge", lambda *a, **k: _refuse())
    monkeypatch.setattr(loading.layerwise, "load_weights", lambda *a, **k: _refuse())
    cached = loading.load_model(info)
    _assert_same_weights(cached.weights, fresh.weights)
    assert cached.weight_hash == fresh.weight_hash

    weights_file = next(p for p in directory.iterdir() if p.suffix in (".safetensors", ".pth"))
    stat = weights_file.stat()
    import os

    os.utime(weights_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the weights were rewritten
    booted = []  # a safetensors directory is processed a layer at a time, a checkpoint whole
    monkeypatch.setattr(loading, "load_bridge", lambda i, **kw: booted.append(1) or real_load_bridge(i, **kw))
    monkeypatch.setattr(loading.layerwise, "load_weights", lambda *a: booted.append(1) or real_layerwise(*a))
    loading.load_model(info)
    assert booted == [1]


def test_a_hub_model_is_keyed_on_its_downloaded_snapshot(tmp_path, monkeypatch, tiny_llama):
    """A hub model's entry is keyed on the snapshot Hugging Face downloaded, as it is after
    the load (which may download the weights into it), so the next load finds it."""
    monkeypatch.setenv("SWEEPS_CACHE_DIR", str(tmp_path / "cache"))
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")  # what describing the model downloaded
    assert loading.hub_snapshot("org/name", cache_dir=str(tmp_path / "hub")) == snapshot
    assert loading.hub_snapshot("org/missing", cache_dir=str(tmp_path / "hub")) is None

    def download_and_convert():
        (snapshot / "model.safetensors").write_bytes(b"weights")
        return tiny_llama.weights

    disk_cache.cached_weights(snapshot, download_and_convert, label="org/name")
    [entry] = (tmp_path / "cache").glob("*.pt")
    assert entry.name.startswith("org-name.weights.")
    _assert_same_weights(disk_cache.cached_weights(snapshot, _refuse, label="org/name"), tiny_llama.weights)


def test_the_least_recently_used_entries_go_when_the_cache_is_full(tmp_path, monkeypatch, tiny_llama):
    """Entries past ``SWEEPS_CACHE_MAX_GB`` are removed oldest use first; a hit counts as a
    use; the entry just written stays; a dead writer's old staging file goes too; files
    that are not the cache's stay."""
    import os
    import time

    root = tmp_path / "cache"
    monkeypatch.setenv("SWEEPS_CACHE_DIR", str(root))
    sources = []
    for i in range(3):
        sources.append(tmp_path / f"model{i}.gguf")
        sources[-1].write_bytes(b"weights %d" % i)
        disk_cache.cached_weights(sources[-1], lambda: tiny_llama.weights)
    entries = {p.name.split(".")[0]: p for p in root.glob("*.pt")}
    assert sorted(entries) == ["model0", "model1", "model2"]
    size = entries["model0"].stat().st_size
    now = time.time()
    for age, name in [(300, "model0"), (200, "model1"), (100, "model2")]:  # written in that order
        os.utime(entries[name], (now - age, now - age))
    disk_cache.cached_weights(sources[0], _refuse)  # a hit: model0 is now the most recently used
    staging = root / f"{disk_cache.STAGING_PREFIX}dead.partial"
    staging.write_bytes(b"half")
    live_staging = root / f"{disk_cache.STAGING_PREFIX}live.partial"  # another writer's, still being written
    live_staging.write_bytes(b"half")
    unrelated = root / "notes.txt"  # not the cache's: never removed, whatever its age or size
    unrelated.write_bytes(b"x" * size)
    old_style = root / f"model.v0.weights.{'0' * 20}.pt"  # an earlier version's name (a dot in the label)
    old_style.write_bytes(b"x" * size)
    os.utime(old_style, (now - 1000, now - 1000))  # the least recently used of all
    for path in (staging, unrelated):
        os.utime(path, (now - 2 * disk_cache.STALE_STAGING_S,) * 2)

    monkeypatch.setenv("SWEEPS_CACHE_MAX_GB", str(2.5 * size / 1e9))  # room for two entries
    source = tmp_path / "model3.gguf"
    source.write_bytes(b"weights 3")
    disk_cache.cached_weights(source, lambda: tiny_llama.weights)
    left = sorted(p.name.split(".")[0] for p in root.glob("*.pt"))
    assert left == ["model0", "model3"]  # model1 and model2 were the least recently used
    assert not staging.exists() and live_staging.exists() and unrelated.exists() and not old_style.exists()

    monkeypatch.setenv("SWEEPS_CACHE_MAX_GB", "0")  # smaller than any entry: the new one still stays
    source.write_bytes(b"weights 3, rewritten")
    disk_cache.cached_weights(source, lambda: tiny_llama.weights)
    [kept] = root.glob("*.pt")
    _assert_same_weights(disk_cache.cached_weights(source, _refuse), tiny_llama.weights)
    assert kept.exists()

    monkeypatch.setenv("SWEEPS_CACHE_MAX_GB", "lots")
    with pytest.warns(UserWarning, match="SWEEPS_CACHE_MAX_GB"):
        assert disk_cache.max_bytes() == int(disk_cache.DEFAULT_MAX_GB * 1e9)
