"""Training at scale: Adam streamed from the memory-mapped patch store (same model as from
memory, bounded resident memory), the store written piece by piece, the precision options
and large dictionaries."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

import sae_core.patches as P
from sae_core import SparseAutoencoder
from sae_core import device as D
from sae_core.config import SAEConfig
from sae_core.data import load_natural_images
from sae_core.patch_store import PatchRows, read_patch_store, write_patch_store
from sae_core.rows import RowSource
from sae_core.train import Trainer

SHA = hashlib.sha256(b"images").hexdigest()


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.uniform(0.05, 0.95, size=(3000, 64)).astype(np.float32)
    path = tmp_path / "patches.arrow"
    write_patch_store(path, train, train[:100], {"patch_size": 8}, SHA)
    return read_patch_store(path)


@pytest.mark.parametrize("settings", [
    {"penalty": "kl"},
    {"penalty": "l1"},
    {"penalty": "topk", "k": 4, "aux_k": 8, "dead_window": 500},
], ids=["kl", "l1", "topk-auxk"])
def test_streamed_and_in_memory_training_give_the_same_model(store, settings):
    fits = {}
    for loader in ("stream", "memory"):
        sae = SparseAutoencoder(16, solver="adam", batch_size=128, max_iter=3, device="cpu",
                                loader=loader, random_state=3, **settings)
        fits[loader] = sae.fit(store.rows("train"))
    a, b = fits["stream"], fits["memory"]
    assert np.array_equal(a.components_, b.components_)
    assert np.array_equal(a.decoder_, b.decoder_)
    # L1/TopK start with b2 at the data mean, read block by block from the stream
    assert np.array_equal(a.intercept_visible_, b.intercept_visible_)
    assert a.history_ == b.history_
    # and the batches really differ from another seed's: the order is what is shared
    other = SparseAutoencoder(16, solver="adam", batch_size=128, max_iter=3, device="cpu",
                              loader="stream", random_state=4, **settings)
    assert not np.array_equal(other.fit(store.rows("train")).components_, a.components_)


def test_auto_streams_only_above_the_memory_budget(store):
    rows = store.rows("train")  # 3000 x 64 float32: 768,000 bytes
    small = Trainer(SAEConfig(solver="adam", memory_budget="500kB", device="cpu"), 64)
    large = Trainer(SAEConfig(solver="adam", memory_budget="1MiB", device="cpu"), 64)
    assert small.data_for(rows) is rows
    assert isinstance(large.data_for(rows), torch.Tensor)
    # forced either way
    forced = Trainer(SAEConfig(solver="adam", loader="memory", memory_budget=0, device="cpu"), 64)
    assert isinstance(forced.data_for(rows), torch.Tensor)
    plain = np.asarray(store.train)
    assert isinstance(Trainer(SAEConfig(solver="adam", loader="stream"), 64).data_for(plain),
                      RowSource)
    # L-BFGS needs the whole batch: it loads, and says why when over budget
    lbfgs = Trainer(SAEConfig(memory_budget="500kB", device="cpu"), 64)
    with pytest.warns(UserWarning, match="L-BFGS needs every example in memory"):
        assert isinstance(lbfgs.data_for(rows), torch.Tensor)


@pytest.mark.parametrize("bad, match", [
    ({"loader": "stream"}, "loader must be 'auto' or 'memory' unless solver='adam'"),
    ({"loader": "disk", "solver": "adam"}, "loader must be one of"),
    ({"memory_budget": "4 parsecs"}, "memory_budget must be bytes"),
    ({"memory_budget": -1}, "memory_budget must be bytes"),
    ({"precision": "fp8"}, "precision must be one of"),
    ({"precision": "bf16"}, "unless solver='adam'"),
    ({"precision": "tf32", "dtype": "float64"}, "unless dtype='float32'"),
])
def test_bad_settings_are_one_line_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        SAEConfig(**bad)


def test_memory_budget_units():
    assert SAEConfig(memory_budget="4GiB").memory_budget_bytes == 4 * 2**30
    assert SAEConfig(memory_budget="500 MB").memory_budget_bytes == 500 * 10**6
    assert SAEConfig(memory_budget=1234).memory_budget_bytes == 1234


def test_streamed_rows_are_checked_like_arrays(tmp_path):
    bad = np.full((50, 16), 0.5, dtype=np.float32)
    bad[7, 3] = 1.5  # outside [0, 1]: sigmoid outputs cannot reach it
    write_patch_store(tmp_path / "p.arrow", bad, bad[:0], {"patch_size": 4}, SHA)
    rows = read_patch_store(tmp_path / "p.arrow").rows("train")
    with pytest.raises(ValueError, match=r"p.arrow \(train\) must lie in \[0, 1\]"):
        SparseAutoencoder(4, solver="adam", loader="stream").fit(rows)


def test_a_failing_loader_stops_the_fit_with_its_error(store):
    rows = store.rows("train")

    class Broken(RowSource):
        def copy_rows(self, start, stop, out):  # the reader thread's read
            raise OSError("disk went away")

    broken = Broken(rows.array, name="broken")
    cfg = SAEConfig(n_components=4, solver="adam", batch_size=64, max_iter=1, device="cpu")
    with pytest.raises(OSError, match="disk went away"):
        Trainer(cfg, 64).fit_adam(broken)


RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import sae_core.batches as B
    import sae_core.rows as R
    from sae_core import SparseAutoencoder
    from sae_core.patch_store import read_patch_store
    # windows of 8 MB in 64 kB blocks: the windowed order on a file of 160 MB; the
    # checks before the fit release every 8 MB too
    B.WINDOW_BYTES, B.BLOCK_BYTES, R.RELEASE_BYTES = 8 << 20, 64 << 10, 8 << 20
    rows = read_patch_store(sys.argv[1]).rows("train")
    sae = SparseAutoencoder(8, solver="adam", batch_size=1000, max_iter=1, device="cpu",
                            loader=sys.argv[2])
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
    # first a fit on a few rows: what the first Adam fit imports (torch.optim's own
    # imports, some 60 MB) is not the data's
    SparseAutoencoder(8, solver="adam", max_iter=1).fit(rows.array[:100])
    before = rss()
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
    sae.fit(rows)
    # VmHWM, not ru_maxrss: getrusage also reports the peak recorded when a thread exits,
    # which clear_refs does not reset
    status = open("/proc/self/status").read()
    peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
    print(json.dumps({"growth_bytes": peak - before, "loss": sae.history_[-1]["loss"]}))
""")


def test_streaming_keeps_resident_memory_bounded(tmp_path):
    """A 160 MB store trained for an epoch in 8 MB windows: from memory, every page read
    stays resident; streamed, two windows do. The model is the same."""
    path = tmp_path / "big.arrow"
    n, d = 625_000, 64

    def pieces():
        for a in range(0, n, 1 << 16):
            k = min(1 << 16, n - a)
            yield np.random.default_rng(a).uniform(0.1, 0.9, (k, d)).astype(np.float32)

    write_patch_store(path, PatchRows(n, d, pieces), np.zeros((0, d), np.float32),
                      {"patch_size": 8}, SHA)
    runs = {}
    # a fixed malloc mmap threshold: freed windows go back to the kernel at once (glibc
    # would otherwise raise it to 32 MB and keep the test's small windows in its heap)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    for loader in ("stream", "memory"):
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path), loader],
                             capture_output=True, text=True, check=True, env=env)
        runs[loader] = json.loads(out.stdout)
    assert runs["memory"]["growth_bytes"] > 150e6, runs  # the whole file became resident
    assert runs["stream"]["growth_bytes"] < 50e6, runs  # two windows, the order, buffers
    assert runs["stream"]["loss"] == runs["memory"]["loss"]


def test_the_windowed_order_is_a_seeded_permutation_of_whole_blocks(monkeypatch):
    import sae_core.batches as B

    state = torch.Generator().manual_seed(0).get_state()
    # data within one window: torch.randperm, as before windows existed
    small, _ = B.epoch_order(state, 1000, 64)
    assert torch.equal(small.order, torch.randperm(1000, generator=torch.Generator()
                                                   .manual_seed(0)))
    monkeypatch.setattr(B, "WINDOW_BYTES", 64 * 256 * 4)  # 4 blocks of 64 rows
    monkeypatch.setattr(B, "BLOCK_BYTES", 64 * 256)
    epoch, after = B.epoch_order(state, 1000, 64)
    order = epoch.order.numpy()
    assert epoch.block_rows == 64 and len(epoch.windows) == 4  # 16 blocks, the last short
    assert np.array_equal(np.sort(order), np.arange(1000))
    for w, blocks in enumerate(epoch.windows):
        rows = order[epoch.bounds[w] : epoch.bounds[w + 1]]
        assert set(rows // 64) == set(blocks.tolist())  # a window is whole blocks
        assert not np.array_equal(rows, np.sort(rows))  # shuffled within
    again, _ = B.epoch_order(state, 1000, 64)
    assert torch.equal(again.order, epoch.order)
    assert not torch.equal(B.epoch_order(after, 1000, 64)[0].order, epoch.order)


def test_patches_written_in_chunks_equal_the_in_memory_ones(tmp_path, monkeypatch):
    """write_patches (chunked, raw files, streamed store) gives the bytes of make_patches +
    write_patch_store, over several chunks, with a held-out split and ZCA."""
    monkeypatch.setattr(P, "CHUNK_PATCHES", 1000)
    images = load_natural_images()[:3]
    cfg = P.PatchConfig(n_patches=3500, heldout_fraction=0.2, zca=True)
    train, heldout, transform = P.make_patches(images, cfg)
    write_patch_store(tmp_path / "a.arrow", train, heldout, cfg.to_dict(), SHA)
    n_train, n_heldout, streamed = P.write_patches(images, cfg, tmp_path / "b.arrow", SHA)
    assert (n_train, n_heldout) == (train.shape[0], heldout.shape[0]) == (2800, 700)
    assert (tmp_path / "a.arrow").read_bytes() == (tmp_path / "b.arrow").read_bytes()
    assert streamed.clip == transform.clip
    assert np.array_equal(streamed.zca.matrix, transform.zca.matrix)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.arrow", "b.arrow"]  # no temps
    # chunks after the first come from their own streams, not repeats of the first
    assert not np.array_equal(train[:800], train[800:1600])


def test_one_chunk_is_the_single_draw(monkeypatch):
    """Up to CHUNK_PATCHES patches, the chunked recipe is the one draw it always was."""
    images = load_natural_images()[:2]
    cfg = P.PatchConfig(n_patches=900, heldout_fraction=0.0)
    imgs = P.whiten_images(images, "1f")
    (train, heldout), = P.raw_patch_chunks(imgs, cfg)
    assert np.array_equal(train, P.sample_random_patches(imgs, 900, 8, 0))
    assert heldout.shape == (0, 64)


def test_a_source_that_changes_between_passes_writes_nothing(tmp_path):
    calls = []

    def pieces():
        calls.append(1)
        yield np.full((10, 4), float(len(calls)), dtype=np.float32)

    path = tmp_path / "p.arrow"
    with pytest.raises(ValueError, match="changed between the two passes"):
        write_patch_store(path, PatchRows(10, 4, pieces), np.zeros((0, 4), np.float32),
                          {"patch_size": 2}, SHA)
    assert list(tmp_path.iterdir()) == []


def test_a_source_with_the_wrong_row_count_writes_nothing(tmp_path):
    rows = PatchRows(11, 4, lambda: iter([np.zeros((10, 4), np.float32)]))
    with pytest.raises(ValueError, match="train: 10 rows; 11 announced"):
        write_patch_store(tmp_path / "p.arrow", rows, np.zeros((0, 4), np.float32),
                          {"patch_size": 2}, SHA)
    assert list(tmp_path.iterdir()) == []


WRITE_RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from sae_core.patch_store import PatchRows, write_patch_store
    n, d = 1_000_000, 100
    def pieces():
        for a in range(0, n, 1 << 15):
            yield np.full((min(1 << 15, n - a), d), a / n, dtype=np.float32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    write_patch_store(sys.argv[1], PatchRows(n, d, pieces), np.zeros((0, d), np.float32),
                      {"patch_size": 10}, "0" * 64)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_bytes": (after - before) * 1024}))
""")


def test_writing_a_store_piece_by_piece_keeps_memory_bounded(tmp_path):
    """400 MB of patches written with less than a tenth of that resident."""
    path = tmp_path / "p.arrow"
    out = subprocess.run([sys.executable, "-c", WRITE_RSS_SCRIPT, str(path)],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["growth_bytes"] < 40e6
    s = read_patch_store(path, verify=True)
    assert s.train.shape == (1_000_000, 100)
    assert s.train[-1, 0] == np.float32((1_000_000 - 1_000_000 % (1 << 15)) / 1_000_000)


# ------------------------------------------------------------------ precision
def test_tf32_is_refused_without_a_gpu_that_has_it():
    with pytest.raises(ValueError, match="precision='tf32' needs a CUDA GPU"):
        SparseAutoencoder(4, precision="tf32", device="cpu").fit(np.full((8, 4), 0.5))


def test_bf16_warns_on_a_cpu_without_native_bfloat16(monkeypatch):
    X = np.random.default_rng(0).uniform(0.1, 0.9, size=(64, 8))
    for native, expect in ((False, True), (True, False)):
        monkeypatch.setattr(D, "cpu_has_native_bf16", lambda native=native: native)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            SparseAutoencoder(4, solver="adam", precision="bf16", device="cpu",
                              max_iter=1).fit(X)
        said = any("emulated" in str(w.message) for w in caught)
        assert said is expect


def test_bf16_training_stays_within_its_stated_tolerance_of_float32(monkeypatch):
    """bf16 autocast against float32 (device.py: losses within ~1e-2 relative; a fit within
    ~3%): the same Adam fit, final loss terms compared."""
    monkeypatch.setattr(D, "cpu_has_native_bf16", lambda: True)
    X = np.random.default_rng(1).uniform(0.1, 0.9, size=(4000, 64)).astype(np.float32)
    fits = {p: SparseAutoencoder(25, solver="adam", batch_size=200, max_iter=5, device="cpu",
                                 precision=p).fit(X) for p in ("full", "bf16")}
    full, bf16 = (fits[p].history_[-1] for p in ("full", "bf16"))
    for key in ("loss", "reconstruction", "sparsity"):
        assert bf16[key] == pytest.approx(full[key], rel=3e-2), key
    assert bf16["loss"] != full["loss"]  # it did run in bfloat16


# ------------------------------------------------------------------ large models
def test_topk_on_16384_latents_keeps_exactly_k_active():
    X = np.random.default_rng(2).normal(size=(2048, 64)).astype(np.float32)
    sae = SparseAutoencoder(16_384, penalty="topk", k=32, aux_k=256, solver="adam",
                            batch_size=1024, max_iter=2, device="cpu").fit(X)
    A = sae.transform(X)
    assert A.shape == (2048, 16_384)
    assert np.all((A > 0).sum(axis=1) == 32)


def test_large_batches_and_dictionaries_train():
    X = np.random.default_rng(3).uniform(0.1, 0.9, size=(8192, 192)).astype(np.float32)
    sae = SparseAutoencoder(4096, solver="adam", batch_size=4096, max_iter=1,
                            device="cpu").fit(X)
    assert sae.components_.shape == (4096, 192)
    assert np.isfinite(sae.history_[-1]["loss"])
