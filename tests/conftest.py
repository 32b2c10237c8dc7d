"""Fixtures and hooks only. The tests' helpers are plain modules, imported normally: ``tests/helpers.py`` (tiny
models from configs, batches, arguments; no hub, no network), ``tests/references.py`` (the independent float64 and
eager references) and ``tests/own_attention.py``."""

from __future__ import annotations

import collections
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.helpers import FAMILIES

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (not skip) the ``gpu``-marked tests on a machine without CUDA: they cannot run there."""
    if torch.cuda.is_available():
        return
    kept = [item for item in items if item.get_closest_marker("gpu") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("gpu") is not None])
        items[:] = kept


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def single_thread():
    """Run the test on one intra-op thread (restored afterwards).

    Tiny models gain nothing from a second thread, and on a busy 2-core machine a spinning second
    thread made these CPU training steps up to 10x slower. Opt in with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def linear_calls(monkeypatch: pytest.MonkeyPatch) -> collections.Counter:
    """Calls of ``nn.Linear.forward`` per module, counted by a class-level patch (no hook on any module)."""
    calls: collections.Counter = collections.Counter()
    forward = torch.nn.Linear.forward

    def counting(self: torch.nn.Linear, input: torch.Tensor) -> torch.Tensor:
        calls[self] += 1
        return forward(self, input)

    monkeypatch.setattr(torch.nn.Linear, "forward", counting)
    return calls


@pytest.fixture
def read_wandb_records() -> Callable[[Path], list]:
    """``read_wandb_records(path)``: every ``wandb_internal_pb2.Record`` of a ``.wandb`` transaction log, checksums
    verified. wandb 0.31 ships no Python reader for that file: a LevelDB-style log of 32 KiB blocks, each record
    behind a 7-byte header (crc32 uint32, length uint16, type uint8: full, first, middle, last). wandb is
    imported here, not when conftest is (``benchmarks/gpu_check.sh`` checks that nothing imports it)."""
    from wandb.proto import wandb_internal_pb2

    block, header = 32 * 1024, 7
    full, first, middle, last = 1, 2, 3, 4

    def read(path: Path) -> list:
        raw = path.read_bytes()
        ident, magic, version = struct.unpack("<4sHB", raw[:header])
        assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), "not a W&B transaction log"
        records, pending, position = [], b"", header
        while position + header <= len(raw):
            if block - position % block < header:  # block trailer: zero padding
                position += block - position % block
                continue
            checksum, length, kind = struct.unpack("<IHB", raw[position : position + header])
            data = raw[position + header : position + header + length]
            position += header + length
            if kind == 0 and length == 0:
                continue
            assert zlib.crc32(data, zlib.crc32(bytes([kind]))) == checksum, "corrupt record"
            assert kind in (full, first, middle, last), kind
            pending = data if kind in (full, first) else pending + data
            if kind in (full, last):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                records.append(record)
        return records

    return read

