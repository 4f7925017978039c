"""The fill pass: embed rows left lexical-only (pending) and send them to devices.

`fill_pending(applier, limit)` takes at most `limit` pending rows (least recently tried
first, so rows the service keeps refusing do not hold back the others),
embeds them per space through the index (content-hash cache first, then the space's
embedder, in its bounded batches), and in one transaction on the apply writer sets
the vectors, records the last error on rows still pending, and appends a change-log
entry per filled row so devices fetch the vector. A row is filled only while its
stored text is the text that was embedded (a newer write wins). Afterwards the
per-space pending counts go to the index's observer (the worker's metrics).

It must run on the apply writer between commits (the scheduler's job), since it
takes change-log sequence numbers from the writer's checkpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slipstream.index import IndexDoc
from slipstream.index.embedding import text_hash

from .state import ChangeEntry, Checkpoint

if TYPE_CHECKING:
    from .apply import Applier


def fill_pending(applier: Applier, limit: int = 256) -> int:
    """Fill up to `limit` pending rows; returns how many got at least one vector."""
    index, backend, state = applier.index, applier.backend, applier.state
    rows = backend.pending_rows(limit, conn=applier.read_conn)
    applier.read_conn.commit()
    filled: dict[str, list[tuple]] = {}  # space -> [(key, vector, hash)]
    failed: dict[str, list[tuple]] = {}  # error -> keys
    docs = [IndexDoc(t, i, n, title=title, body=body, partition=p) for t, i, n, p, title, body, _ in rows]
    for space in backend.spaces:
        todo = [k for k, row in enumerate(rows) if space in row[6]]
        if not todo:
            continue
        if space not in index.embedders:
            continue
        texts = [docs[k].embed_text() for k in todo]
        got, error = index.embed_texts(space, texts)
        for j, k in enumerate(todo):
            if j in got:
                filled.setdefault(space, []).append((docs[k].key, got[j], text_hash(texts[j])))
            else:
                failed.setdefault(f"{space}: {error}", []).append(docs[k].key)
    done = {key for per in filled.values() for key, _, _ in per}
    by_key = {d.key: d for d in docs}
    if filled or failed:
        cp = applier.checkpoint
        entries = [ChangeEntry(by_key[k].partition, *k, "u", cp.lsn) for k in sorted(done)]
        new_cp = Checkpoint(cp.lsn, cp.partial_lsn, cp.partial_offset, cp.last_seq + len(entries))
        with applier.conn.transaction():
            for space, per in filled.items():
                backend.set_vectors(space, [(k, v) for k, v, _ in per], conn=applier.conn,
                                    hashes=[h for _, _, h in per])
            for error, keys in failed.items():
                backend.set_pending_error(keys, error, conn=applier.conn)
            state.changelog.append(applier.conn, entries, first_seq=cp.last_seq + 1)
            state.save_checkpoint(applier.conn, applier.slot, new_cp)
        applier.checkpoint = new_cp
    report_pending(applier)
    return len(done)


def report_pending(applier: Applier) -> dict[str, int]:
    """Rows waiting for a vector, per space, told to the index's observer."""
    counts = {space: 0 for space in applier.backend.spaces}
    rows = applier.read_conn.execute(applier.state.q(
        "SELECT s, count(*) FROM {s}.docs, unnest(pending_spaces) AS s "
        "WHERE pending_spaces <> '{{}}' AND NOT deleted GROUP BY s")).fetchall()
    applier.read_conn.commit()
    counts.update({s: int(n) for s, n in rows})
    observer = applier.index.observer
    if observer is not None:
        for space, n in counts.items():
            observer("pending", space, n)
    return counts
