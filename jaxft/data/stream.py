"""Data larger than memory (`data.streaming: true`, SFT): rows read lazily, tokenized and packed on a
background thread, with a position a checkpoint can hold.

    stream = Stream(run.data, tokenizer, rows=4, say=print)   # this process's 4 rows of every batch
    stream.restore(state)                                     # a checkpoint's position (or never: the start)
    block, state = stream.next()      # tokens, positions, segment_ids, targets, loss_mask: each [4, S];
                                      # `state`: the position after this block (JSON), what a checkpoint saves

Reading. JSON Lines (`.jsonl` / `.ndjson`, UTF-8) line by line from a byte offset, Parquet row group by row
group (pyarrow's `ParquetFile.iter_batches`), and `save_to_disk` folders memory-mapped (`datasets`, without
loading them). Rows are decoded, checked and parsed exactly as `jaxft.data.rows.read_rows` does (shared
functions), so bad rows are counted under the same reasons with the same file:line. A `.json` array or a
`.csv` file is refused (convert it with `jaxft prepare`, which writes JSON Lines).

Order. The rows are cut into windows of `data.stream_window` rows; each window is tokenized, packed best-fit
(`encode.pack`, seeded with data.seed) and its rows shuffled with (data.seed, epoch, window), as
`encode.Batches` does over the whole data. A file that fits in one window therefore gives exactly the
in-memory path's batches (tested); a larger one is shuffled within windows only. Batches run on across
windows; an epoch's last batch is topped up with empty rows, as in memory.

Position. A window is a pure function of where it starts in the file, so the state after a block is
(epoch, window, where the window starts, the report up to it, rows of it already handed out): resuming
re-reads that one window and skips what was used. The state of the *consumed* blocks is what the caller
saves; the thread reads ahead of it (`depth` blocks).

Several processes. Process p of P reads (decodes, parses, tokenizes) only rows i ≡ p (mod P) and packs them
into its own rows of every batch; each process has its own position and its own epoch ends (no agreement is
needed: a process whose epoch ends tops up its own rows).

Why not `datasets.IterableDataset` (`load_dataset("json", streaming=True)`, `state_dict()`) or grain: the
JSON reader of `datasets` fails a whole chunk on one invalid line and gives no line numbers, so bad rows could
not be counted as they are in memory; and the position to save is a window's start, which a byte offset or a
row index gives exactly. grain is not installed.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq

from jaxft.config import DataConfig
from jaxft.data.encode import DataReport, Encoder, encode_records, layout, pack, why_none
from jaxft.data.rows import Record, check_value, decode_line, line_text, one_line, open_saved, rows_format, \
    text_encoding
from jaxft.errors import JaxftError

CHUNK = 1024  # Parquet / save_to_disk rows converted to Python at once
START = {"row": 0, "byte": 0, "line": 0}  # a file's start: rows (of all processes) and, for JSON Lines, bytes and lines


def records(path: str, start: dict = START, process: int = 0, processes: int = 1, split: str | None = None
            ) -> Iterator[tuple[Record, dict]]:
    """(record, the position after it) of each row i ≡ process (mod processes) from `start` on, lazily."""
    p = Path(path).expanduser()
    if not p.exists():
        raise JaxftError(f"{path}: no such file or directory")
    suffix = p.suffix.lower()
    if p.is_dir():
        return _saved(p, path, split, start, process, processes)
    if suffix in (".jsonl", ".ndjson"):
        return _jsonl(p, path, start, process, processes)
    if suffix == ".parquet":
        return _parquet(p, path, start, process, processes)
    raise JaxftError(f"{path}: data.streaming reads .jsonl, .ndjson, .parquet or a save_to_disk folder, not "
                     f"{suffix or 'a file without an extension'}; convert it with `jaxft prepare` (JSON Lines) "
                     "or set data.streaming=false")


def _jsonl(p: Path, name: str, start: dict, process: int, processes: int):
    if text_encoding(p, name) not in ("utf-8", "utf-8-sig"):
        raise JaxftError(f"{name}: data.streaming reads UTF-8 JSON Lines; save it as UTF-8 or set data.streaming=false")
    row, byte, lineno = start["row"], start["byte"], start["line"]
    with open(p, "rb") as f:
        f.seek(byte)
        for raw in f:
            byte, lineno = byte + len(raw), lineno + 1
            line = line_text(raw)
            if line is None:
                continue
            row += 1
            if (row - 1) % processes == process:
                value = line if isinstance(line, Exception) else check_value(decode_line(line))
                yield Record(f"{name}:{lineno}", value), {"row": row, "byte": byte, "line": lineno}


def _table_rows(n: int, start: dict, process: int, processes: int, fetch):
    """Rows of a table of n rows in chunks: fetch(indices) → their rows as dicts."""
    for lo in range(start["row"], n, CHUNK):
        own = [i for i in range(lo, min(n, lo + CHUNK)) if i % processes == process]
        for i, row in zip(own, fetch(own) if own else []):
            yield i, row


def _parquet(p: Path, name: str, start: dict, process: int, processes: int):
    try:
        pf = pq.ParquetFile(p)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types; report one line
        raise JaxftError(f"{name}: cannot read as parquet ({one_line(e)})") from None
    group, first = 0, 0  # the row group holding the start row, and its first row
    while group < pf.num_row_groups and first + pf.metadata.row_group(group).num_rows <= start["row"]:
        first += pf.metadata.row_group(group).num_rows
        group += 1
    for g in range(group, pf.num_row_groups):
        table = pf.read_row_group(g)
        rows = _table_rows(first + table.num_rows, {"row": max(start["row"], first)}, process, processes,
                           lambda idx, t=table, f=first: t.take([i - f for i in idx]).to_pylist())
        for i, row in rows:
            yield Record(f"{name} row {i}", check_value(row)), {"row": i + 1, "byte": 0, "line": 0}
        first += table.num_rows


def _saved(p: Path, name: str, split: str | None, start: dict, process: int, processes: int):
    ds = open_saved(p, name, split, keep_in_memory=False)  # memory-mapped: nothing read until asked
    for i, row in _table_rows(len(ds), start, process, processes, lambda idx: ds.select(idx).to_list()):
        yield Record(f"{name} row {i}", check_value(row)), {"row": i + 1, "byte": 0, "line": 0}


@dataclasses.dataclass(frozen=True)
class Position:
    """Where the next unconsumed row of a stream is: window `window` of epoch `epoch` starts at `read` in the
    file (with `fmt` the file's format found before it and `report` the epoch's counts before it); its first
    `skip` packed rows were handed out."""

    epoch: int = 0
    window: int = 0
    read: dict = dataclasses.field(default_factory=lambda: dict(START))
    fmt: str | None = None
    report: dict = dataclasses.field(default_factory=lambda: dataclasses.asdict(DataReport()))
    skip: int = 0


class Stream:
    """This process's rows of every batch, produced ahead on a thread (see the module docstring)."""

    def __init__(self, cfg: DataConfig, tokenizer, rows: int, process: int = 0, processes: int = 1,
                 say=lambda *a: None, depth: int = 4):
        if rows < 1:
            raise ValueError(f"Stream: rows={rows} must be >= 1")
        self.cfg, self.rows, self.process, self.processes = cfg, rows, process, processes
        self.say, self.depth = say, depth
        self.encoder = Encoder(tokenizer, cfg.train_on_prompt, cfg.system_prompt)
        self.start = Position()
        self.q: queue.Queue | None = None
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def state(self, pos: Position) -> dict:
        """A position as JSON, naming what it is valid for."""
        return dict(file=self.cfg.train, window_rows=self.cfg.stream_window, process=self.process,
                    processes=self.processes, **dataclasses.asdict(pos))

    def restore(self, state: dict) -> None:
        """Start at a saved state (before the first `next`); a state of another file, window size or process
        layout is a JaxftError, since its position would mean other rows."""
        if self.q is not None:
            raise RuntimeError("Stream.restore after the stream started")
        mine = self.state(Position())
        for key in ("file", "window_rows", "process", "processes"):
            if not isinstance(state, dict) or state.get(key) != mine[key]:
                got = state.get(key) if isinstance(state, dict) else type(state).__name__
                raise JaxftError(f"the checkpoint's data position was saved with {key}={got!r}, this run has "
                                 f"{mine[key]!r}: resume with the same data.train, data.stream_window and processes, "
                                 "or --restart")
        fields = {f.name for f in dataclasses.fields(Position)}
        self.start = Position(**{k: v for k, v in state.items() if k in fields})

    def next(self) -> tuple[dict[str, np.ndarray], dict]:
        """The next block of `rows` rows and the state after it (as JSON)."""
        if self.q is None:
            self.q = queue.Queue(maxsize=self.depth)
            threading.Thread(target=self._work, daemon=True).start()
        item = self.error or self.q.get()
        if isinstance(item, BaseException):
            self.error = item  # a stream that failed stays failed: a later call raises it again
            raise item
        return item

    def close(self) -> None:
        self.stop.set()
        try:
            while self.q is not None:
                self.q.get_nowait()
        except queue.Empty:
            pass

    def _work(self):
        q = self.q
        try:
            for item in self._blocks(self.start):
                while not self.stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if self.stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 — handed to the consumer instead of leaving it waiting forever
            q.put(e)

    def _blocks(self, pos: Position):
        """(block, state after it) forever, from `pos`: the one code path of a fresh and a resumed stream."""
        cfg, n, seq = self.cfg, self.rows, self.cfg.max_length
        epoch, window, read, fmt, report, skip = (pos.epoch, pos.window, dict(pos.read), pos.fmt,
                                                  DataReport(**pos.report), pos.skip)
        seed = cfg.seed % 2**32  # as encode.Batches
        pending: list = []
        while not self.stop.is_set():
            it = records(cfg.train, read, self.process, self.processes, "train")
            while True:
                items = list(islice(it, cfg.stream_window))
                if not items:
                    break
                at = Position(epoch, window, read, fmt, dataclasses.asdict(report))
                fmt = fmt or rows_format([r for r, _ in items], cfg.format)
                report.rows += len(items)
                examples = encode_records([r for r, _ in items], cfg, self.encoder, report, fmt)
                read = items[-1][1]
                rows = pack([len(e) for e in examples], seq, seed) if cfg.packing else \
                    [[i] for i in range(len(examples))]
                order = np.random.default_rng([seed, epoch + 1, *([window] if window else [])]).permutation(
                    len(rows))
                for k in range(skip, len(rows)):
                    pending.append([examples[d] for d in rows[order[k]]])
                    if len(pending) == n:
                        yield layout(pending, n, seq), self.state(dataclasses.replace(at, skip=k + 1))
                        pending = []
                window, skip = window + 1, 0
            if report.examples == 0:
                raise JaxftError(f"{cfg.train}: no usable rows ({why_none(report, cfg)})")
            self.say(f"train data, epoch {epoch + 1} (streamed): {report.summary()}")
            epoch, window, read, fmt, report = epoch + 1, 0, dict(START), None, DataReport()
            if pending:  # the epoch's last block, topped up with empty rows
                yield layout(pending, n, seq), self.state(Position(epoch))
                pending = []


class StreamBatches:
    """`encode.Batches`' interface over a Stream, for `sharding.ShardedBatches`: global micro-batch i, of which
    this process holds rows [lo, lo + stream.rows). Micro-batches are read from the stream in order; the last
    `keep` stay at hand (a step's micro-batches are asked for once per device slice of its rows).
    `state(consumed)` is the stream's position after `consumed` micro-batches (JSON), kept until asked for."""

    row_subsets = True

    def __init__(self, batch_size: int, seq_len: int):
        self.batch_size, self.seq_len = batch_size, seq_len
        self.stream: Stream | None = None
        self.lo, self.keep, self.index = 0, 1, -1
        self.blocks: dict[int, dict] = {}
        self.states: dict[int, dict] = {}
        self.lock = threading.Lock()  # batch() runs on the prefetch thread, state() on the loop's

    def open(self, stream: Stream, lo: int = 0, keep: int = 1) -> None:
        self.stream, self.lo, self.keep, self.states = stream, lo, keep, {0: stream.state(stream.start)}

    def __len__(self) -> int:
        return 0  # a stream does not know its length; checkpoints record 0 micro-batches per epoch

    def batch(self, i: int, rows: slice = slice(None)) -> dict[str, np.ndarray]:
        while self.index < i:
            block, state = self.stream.next()
            self.index += 1
            self.blocks[self.index] = block
            self.blocks.pop(self.index - self.keep, None)
            with self.lock:
                self.states[self.index + 1] = state
        if i not in self.blocks:
            raise ValueError(f"StreamBatches: batch {i} asked for after batch {self.index}; a stream is read in "
                             f"order, keeping the last {self.keep}")
        lo = (rows.start or 0) - self.lo
        hi = (self.batch_size if rows.stop is None else rows.stop) - self.lo
        if lo < 0 or hi > self.stream.rows:
            raise ValueError(f"StreamBatches: rows {rows} are not this process's rows [{self.lo}, "
                             f"{self.lo + self.stream.rows})")
        return {k: v[lo:hi] for k, v in self.blocks[i].items()}

    def state(self, consumed: int) -> dict:
        with self.lock:
            for k in [k for k in self.states if k < consumed]:
                del self.states[k]
            return self.states[consumed]

    def restore(self, state: dict, consumed: int) -> None:
        self.stream.restore(state)
        self.index, self.blocks, self.states = consumed - 1, {}, {consumed: state}
