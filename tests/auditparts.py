"""Audit parts written as the archiver writes them (temporary file, index, rename), for tests
that need an archive without running the archiver."""

from __future__ import annotations

from pathlib import Path

from mixer.auditfiles import (
    ChainIndex,
    PartEntry,
    hour_dir,
    part_name,
    promote,
    save_index,
    write_tmp,
)
from mixer.auditrow import GENESIS, Batch


def write_chain(root: Path, stream: str, rack: str, parts: list[list[bytes]],
                ts_ns: int) -> ChainIndex:
    """``rack``'s ``stream`` under ``root`` (the hub's ``audit/``): one part per list of
    encoded events, sequences from 1, in the hour of ``ts_ns``; the chain index returned."""
    index = ChainIndex(stream=stream, rack=rack)
    head, seq = GENESIS, 0
    for events in parts:
        batch = Batch(rack, stream, head)
        for data in events:
            seq += 1
            batch.add(seq, seq, data)
        rel = str(hour_dir(Path(), stream, rack, ts_ns) / part_name(batch.seqs[0], seq))
        entry = PartEntry(path=rel, first=batch.seqs[0], last=seq, count=len(events),
                          prev=batch.prev.hex(), head=batch.head.hex(), hub_last=seq)
        write_tmp(root, rel, batch.table(), {"stream": stream, "rack": rack,
                                             "first": entry.first, "last": entry.last,
                                             "count": entry.count, "prev": entry.prev,
                                             "head": entry.head})
        index.start_seq = 1
        index.parts.append(entry)
        index.pending = [rel]
        index.last, index.head, index.hub_last = seq, entry.head, seq
        save_index(root, index)
        promote(root / rel)
        head = batch.head
    return index
