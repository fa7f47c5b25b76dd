"""Several processes on torch.distributed: each calibrates on its share of the samples, statistics are reduced.

Launched with `torchrun --nproc-per-node N slimquant quantize ...` (or any launcher that sets WORLD_SIZE, RANK,
MASTER_ADDR and MASTER_PORT). Each process takes samples rank, rank + N, ...; after every observation pass the
layer's `slimquant.stats.Statistic` objects are combined as their classes declare (sums add, ranges take min/max).
Each Linear is then quantized once: whole clusters of Linears (those reading one input) on one process each,
assigned by estimated cost and broadcast (`assign_owners`, `broadcast_qweight`), when there are at least two clusters
per process; otherwise a weight algorithm that declares `row_parallel` quantizes only this process's block of each
Linear's rows (`ctx.row_block`) and the blocks are gathered. Every process ends with the same quantized model. Only
rank 0 saves and reports.

Before any work the processes `agree` on what they run (recipe, versions, model, calibration samples) or all stop
naming the difference. Every collective waits at most the process group's timeout (`runtime.collective_timeout`)
and then fails in one line naming what it waited for; a process stopped by SIGTERM or Ctrl-C while it waits in a
collective exits at once (`UNWIND_SECONDS`), since Python's handlers cannot run until the collective returns.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from slimquant.errors import ProcessGroupError, RecipeError
from slimquant.quant.qweight import QuantizedWeight
from slimquant.stats import Reduce, Statistic

log = logging.getLogger(__name__)

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
_OPS = {Reduce.SUM: dist.ReduceOp.SUM, Reduce.MIN: dist.ReduceOp.MIN, Reduce.MAX: dist.ReduceOp.MAX}


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    size: int = 1

    @property
    def several(self) -> bool:
        return self.size > 1

    def row_block(self, rows: int) -> slice:
        """This process's contiguous block of `rows` (the first ones get one more when they do not divide)."""
        base, extra = divmod(rows, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def block_sizes(self, rows: int) -> list[int]:
        base, extra = divmod(rows, self.size)
        return [base + (r < extra) for r in range(self.size)]


def current() -> Ranks:
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def launched_with_several() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: torch.device, timeout_minutes: float = 10.0) -> Ranks:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA, hccl on NPU); each
    collective then waits at most `timeout_minutes` for the other processes."""
    if not launched_with_several() or (dist.is_available() and dist.is_initialized()):
        return current()
    if not dist.is_available():
        raise RecipeError("this torch build has no torch.distributed: run a single process")
    backend = BACKENDS.get(device.type)
    if backend is None:
        raise RecipeError(f"no torch.distributed backend for device {device.type!r}")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _waiting.timeout_minutes = timeout_minutes
    _watch_signals(int(os.environ.get("RANK", "0")))
    try:
        with _collective("the start (every process joining)"):
            dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    except BaseException:
        _stop_watching_signals()
        raise
    ranks = current()
    log.info("process %d of %d (%s)", ranks.rank, ranks.size, backend)
    return ranks


def leave(ranks: Ranks, finished: bool) -> None:
    """Leave the process group `join` made: a process that exits with it still up may abort in the backend's
    teardown ("terminate called without an active exception") after its work is done. When every process `finished`
    its job, they wait for each other first, so that none tears its connections down while another still runs."""
    if ranks.several and dist.is_available() and dist.is_initialized():
        try:
            if finished:
                with _collective("the final wait for every process to finish"):
                    dist.barrier()
        finally:
            dist.destroy_process_group()
            _stop_watching_signals()


# -- waiting in collectives ----------------------------------------------------------------------------------------

UNWIND_SECONDS = 3.0  # after SIGTERM / Ctrl-C, how long a process blocked in a collective gets to return from it


class _Waiting:
    """What the main thread is waiting for in a collective (None outside one), for the signal watcher."""
    what: str | None = None
    entered = 0  # collectives entered so far: tells the watcher whether the one it saw has returned
    timeout_minutes: float | None = None  # the process group's timeout, when `join` made it
    rank = 0


_waiting = _Waiting()
_watcher: dict[str, int] = {}  # the signal wake-up pipe's ends while `_watch_signals` runs


@contextmanager
def _collective(what: str) -> Iterator[None]:
    """Run collectives that wait for `what`; a backend failure (timeout, a process gone) becomes one line."""
    _waiting.what, _waiting.entered = what, _waiting.entered + 1
    try:
        yield
    except RuntimeError as exc:  # gloo raises RuntimeError, nccl DistBackendError (a RuntimeError)
        raise ProcessGroupError(_collective_failure(what, str(exc))) from None
    finally:
        _waiting.what = None


def _collective_failure(what: str, error: str) -> str:
    rank = dist.get_rank() if dist.is_initialized() else _waiting.rank
    if "timed out" in error.lower() or "timeout" in error.lower():
        return (f"process {rank}: no answer from the other processes within {_timeout_words(error)} in {what}; "
                "another process stopped or is stuck")
    if "closed by peer" in error or "reset by peer" in error or "Broken pipe" in error:
        return f"process {rank}: another process stopped during {what} (see its own error)"
    return f"process {rank}: {what} failed between the processes: {error.splitlines()[0] if error else 'no reason'}"


def _timeout_words(error: str) -> str:
    if _waiting.timeout_minutes is not None:
        return f"{_waiting.timeout_minutes:g} minutes (runtime.collective_timeout)"
    found = re.search(r"(\d+)\s*ms", error)  # a process group the caller made: the backend says how long it waited
    return f"{int(found.group(1)) / 60000:g} minutes" if found else "the process group's timeout"


def _watch_signals(rank: int) -> None:
    """Make SIGTERM and Ctrl-C stop this process while it is blocked in a collective: Python runs signal handlers
    only between bytecodes, so a process waiting in gloo for one that never comes would ignore them. The signal
    also wakes a watcher thread (signal.set_wakeup_fd); if the main thread is still in the same collective
    `UNWIND_SECONDS` later, the watcher says so and exits with 130, as an interrupted run does."""
    _waiting.rank = rank
    if _watcher or threading.current_thread() is not threading.main_thread():
        return
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    if previous != -1:  # someone else (an event loop) listens: leave it theirs
        signal.set_wakeup_fd(previous)
        os.close(read_end)
        os.close(write_end)
        return
    _watcher.update(read=read_end, write=write_end)
    threading.Thread(target=_watch, args=(read_end,), name="slimquant-collective-signals", daemon=True).start()


def _stop_watching_signals() -> None:
    if not _watcher or threading.current_thread() is not threading.main_thread():
        return
    signal.set_wakeup_fd(-1)
    os.close(_watcher.pop("write"))  # the watcher reads end-of-file and closes its end
    _watcher.pop("read")


def _watch(read_end: int) -> None:
    try:
        while data := os.read(read_end, 1):
            if data[0] in (signal.SIGTERM, signal.SIGINT) and _waiting.what is not None:
                _exit_if_still_waiting(_waiting.what, _waiting.entered)
    finally:
        os.close(read_end)


def _exit_if_still_waiting(what: str, entered: int) -> None:
    deadline = time.monotonic() + UNWIND_SECONDS
    while time.monotonic() < deadline:
        if _waiting.what is None or _waiting.entered != entered:
            return  # the collective returned: Python's own handler takes over
        time.sleep(0.05)
    sys.stderr.write(f"interrupted: process {_waiting.rank} stopped while waiting for the other processes in "
                     f"{what}\n")
    sys.stderr.flush()
    os._exit(130)


# -- agreeing before any work -----------------------------------------------------------------------------------


def agree(parts: dict[str, object], what: str, device: torch.device) -> None:
    """Every process holds the same `parts` (JSON values by name), or every process raises the same RecipeError
    naming the parts that differ and the processes they differ on. Sent as JSON bytes: no pickle."""
    ranks = current()
    if not ranks.several:
        return
    every = _all_gather_json(parts, f"the comparison of {what}", device, ranks)
    groups: dict[str, list[int]] = {}  # the description of a difference -> the processes that have it
    for rank in range(1, ranks.size):
        described = _describe_parts(every[rank], every[0])
        if described:
            groups.setdefault(described, []).append(rank)
    if groups:
        raise RecipeError("; ".join(f"{_process_words(ranks_)} from process 0 in: {described}"
                                    for described, ranks_ in groups.items())
                          + ". Start every process with the same model, recipe, data and versions")


def _all_gather_json(value: dict, what: str, device: torch.device, ranks: Ranks) -> list[dict]:
    mine = json.dumps(value, sort_keys=True).encode()
    with _collective(what):
        length = torch.tensor([len(mine)], dtype=torch.int64, device=device)
        lengths = [torch.zeros_like(length) for _ in range(ranks.size)]
        dist.all_gather(lengths, length)
        sizes = [int(n.item()) for n in lengths]
        padded = torch.zeros(max(sizes), dtype=torch.uint8)
        padded[: len(mine)] = torch.frombuffer(bytearray(mine), dtype=torch.uint8)
        padded = padded.to(device)
        pieces = [torch.empty_like(padded) for _ in range(ranks.size)]
        dist.all_gather(pieces, padded)
    return [json.loads(piece[:size].cpu().numpy().tobytes()) for piece, size in zip(pieces, sizes, strict=True)]


def _process_words(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"process {ranks[0]} differs"
    return f"processes {', '.join(map(str, ranks))} differ"


_SHOWN_FIELDS = 4  # differing fields named per part
_ABSENT = object()


def _describe_parts(theirs: dict, first: dict) -> str:
    described = []
    for part in [*first, *(p for p in theirs if p not in first)]:
        changes = list(_changed_fields(theirs.get(part, _ABSENT), first.get(part, _ABSENT), ""))
        if not changes:
            continue
        shown = [_change_words(path, a, b) for path, a, b in changes[:_SHOWN_FIELDS]]
        if len(changes) > _SHOWN_FIELDS:
            shown.append(f"and {len(changes) - _SHOWN_FIELDS} more")
        shown = [s for s in shown if s]
        described.append(f"{part} ({'; '.join(shown)})" if shown else part)
    return ", ".join(described)


def _changed_fields(a, b, path: str) -> Iterator[tuple[str, object, object]]:
    """The paths (`weights.group_size`, `algorithms[0].name`) at which two JSON values differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*b, *(k for k in a if k not in b)]:
            yield from _changed_fields(a.get(key, _ABSENT), b.get(key, _ABSENT), f"{path}.{key}" if path else key)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _changed_fields(x, y, f"{path}[{i}]")
    elif a != b:
        yield path, a, b


def _change_words(path: str, theirs, first) -> str:
    """`group_size: 128 vs 64 on process 0`; only the path for a hash, whose digits would say nothing."""
    if _is_digest(theirs) and _is_digest(first):
        return path
    return f"{path + ': ' if path else ''}{_value_words(theirs)} vs {_value_words(first)} on process 0"


def _is_digest(value) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def _value_words(value) -> str:
    if value is _ABSENT:
        return "absent"
    words = json.dumps(value, sort_keys=True)
    return words if len(words) <= 60 else words[:57] + "..."


def reduce_statistic(stat: Statistic, device: torch.device, owner: str) -> None:
    """Combine this process's copy of `stat` with every other process's, in place."""
    for attr, op in stat.reductions.items():
        if op not in _OPS:
            raise RecipeError(f"plugin {owner!r} keeps a {type(stat).__name__} whose {attr!r} combines by "
                              f"{op.value}: not supported on several processes yet; run a single process")
        value = getattr(stat, attr)
        if value is None:
            raise RecipeError(f"plugin {owner!r}: {type(stat).__name__}.{attr} is empty on process "
                              f"{dist.get_rank()} (did its calibration share reach this Linear?); run a single "
                              "process or give more samples")
        with _collective(f"the exchange of plugin {owner!r}'s statistics"):
            if torch.is_tensor(value):
                reduced = value.contiguous()
                dist.all_reduce(reduced, _OPS[op])
                setattr(stat, attr, reduced)
            else:
                number = torch.tensor([value], dtype=torch.float64, device=device)
                dist.all_reduce(number, _OPS[op])
                setattr(stat, attr, type(value)(number.item()))


def gather_rows(block: QuantizedWeight, rows: int, ranks: Ranks, owner: str, name: str) -> QuantizedWeight:
    """Every process's row block of one Linear's quantized weight, stacked in rank order."""
    if (block.outliers is not None or block.scale_quant is not None or block.two_level is not None
            or block.extras):
        raise RecipeError(f"{name}: plugin {owner!r} is row_parallel but returned outliers, quantized scales, "
                          "two-level scales or extras, which cannot be gathered by rows yet")
    sizes = ranks.block_sizes(rows)
    parts = {"codes": block.codes, "scale": block.scale, "zero": block.zero}
    full = {}
    for key, tensor in parts.items():
        if tensor is None:
            full[key] = None
            continue
        padded = torch.zeros((max(sizes), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[: tensor.shape[0]] = tensor
        pieces = [torch.empty_like(padded) for _ in sizes]
        with _collective(f"the gathering of {name}'s rows"):
            dist.all_gather(pieces, padded)
        full[key] = torch.cat([p[:n] for p, n in zip(pieces, sizes, strict=True)])
    return QuantizedWeight(codes=full["codes"], scale=full["scale"], zero=full["zero"], bits=block.bits,
                           group_size=block.group_size, g_idx=block.g_idx, codebook=block.codebook,
                           sparsity=block.sparsity, codebook_name=block.codebook_name)


def assign_owners(clusters: list[list[str]], costs: list[float], ranks: Ranks) -> dict[str, int]:
    """Each cluster of Linears to one process: costliest first, each to the process with the least work so far."""
    load = [0.0] * ranks.size
    owners: dict[str, int] = {}
    for i in sorted(range(len(clusters)), key=lambda i: -costs[i]):
        rank = min(range(ranks.size), key=lambda r: load[r])
        load[rank] += costs[i]
        owners.update((name, rank) for name in clusters[i])
    return owners


_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def broadcast_qweight(qweight: QuantizedWeight | None, src: int, ranks: Ranks, device: torch.device, owner: str,
                      name: str) -> QuantizedWeight:
    """Linear `name`'s quantized weight, made by process `src` (which passes it; the others pass None), on every
    process. Codes, scales, zero points and g_idx travel; weights with more than that are refused on every process."""
    header = torch.zeros(9, dtype=torch.int64, device=device)
    if ranks.rank == src:
        plain = (qweight.outliers is None and qweight.scale_quant is None and qweight.two_level is None
                 and not qweight.extras and qweight.codebook is None and qweight.sparsity is None)
        rows, cols = qweight.codes.shape
        zero_dtype = -1 if qweight.zero is None else _DTYPES.index(qweight.zero.dtype)
        header = torch.tensor([int(plain), rows, cols, qweight.scale.shape[1], _DTYPES.index(qweight.scale.dtype),
                               zero_dtype, qweight.g_idx is not None, qweight.bits, qweight.group_size or 0],
                              dtype=torch.int64, device=device)
    with _collective(f"the sending of {name}'s quantized weight from process {src}"):
        dist.broadcast(header, src)
    plain, rows, cols, groups, scale_dtype, zero_dtype, has_g_idx, bits, group_size = header.tolist()
    if not plain:
        raise RecipeError(f"{name}: plugin {owner!r} returned outliers, quantized scales, two-level scales, a "
                          "codebook, sparsity or extras, which cannot be sent between processes yet; run a single "
                          "process")
    if ranks.rank == src:
        codes, scale, zero, g_idx = (None if t is None else t.to(device).contiguous()
                                     for t in (qweight.codes, qweight.scale, qweight.zero, qweight.g_idx))
    else:
        codes = torch.empty(rows, cols, dtype=torch.int8, device=device)
        scale = torch.empty(rows, groups, dtype=_DTYPES[scale_dtype], device=device)
        zero = None if zero_dtype < 0 else torch.empty(rows, groups, dtype=_DTYPES[zero_dtype], device=device)
        g_idx = torch.empty(cols, dtype=torch.int32, device=device) if has_g_idx else None
    with _collective(f"the sending of {name}'s quantized weight from process {src}"):
        for tensor in (codes, scale, zero, g_idx):
            if tensor is not None:
                dist.broadcast(tensor, src)
    if ranks.rank == src:
        return qweight
    return QuantizedWeight(codes=codes, scale=scale, zero=zero, bits=bits, group_size=group_size or None,
                           g_idx=g_idx)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    with _collective("the sum of a layer's output errors"):
        dist.all_reduce(t)
    return t.tolist()
