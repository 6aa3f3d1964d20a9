"""Fingerprints of the files a run reads: whole-file hashes, sampled hashes of large files."""

from __future__ import annotations

from monkeytune.data import index
from monkeytune.train import fingerprint as fp


def test_small_files_are_hashed_whole(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [f'{{"id": {i}}}\n' for i in range(100)]
    path.write_text("".join(lines))
    first = fp.file_fingerprint(path)
    assert first["size"] == path.stat().st_size and "sampled" not in first
    path.write_text("".join(reversed(lines)))
    assert fp.file_fingerprint(path)["hash"] != first["hash"]
    assert fp.fingerprint_differences({"data": {"d": first}}, {"data": {"d": fp.file_fingerprint(path)}}) == [
        f"data file d changed ({first['size']} bytes, hash {first['hash'][:12]} -> {first['size']} bytes, "
        f"hash {fp.file_fingerprint(path)['hash'][:12]})"]


def test_large_files_are_hashed_from_spread_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(index, "FULL_HASH_BYTES", 4096)
    monkeypatch.setattr(index, "BLOCK_BYTES", 64)
    path = tmp_path / "big.jsonl"
    lines = [f'{{"id": {i:06d}, "text": "sample {i}"}}\n' for i in range(2000)]
    path.write_text("".join(lines))
    first = fp.file_fingerprint(path)
    assert first["sampled"] is True and first["size"] == path.stat().st_size
    assert fp.file_fingerprint(path) == first  # stable
    path.write_text("".join(reversed(lines)))  # same size, another order
    assert fp.file_fingerprint(path)["hash"] != first["hash"]
