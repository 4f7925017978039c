"""The apply step: one batch of source changes becomes one transaction on the search database.

For each change, in source commit order, the applier works out the row's full values
(merging unchanged TOAST values from `source_rows`), maps it to IndexDocs, and
records the effects: search rows to upsert, search rows to tombstone (deleted rows,
rows a move or a filter dropped, truncated tables), change-log entries (a tombstone
in the old partition when a row moves), and the row's new source state. A mapper
that raises, or a row that cannot be decoded, goes to the dead-letter table and the
batch goes on. Embedding happens before the transaction opens. Then one transaction
writes search rows, change log, source state, dead letters and the checkpoint; only
after it commits may the caller report the new flush LSN (guarantee 1).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
from psycopg.adapt import Transformer
from psycopg.types.json import set_json_dumps
from slipstream.index import IndexDoc, SearchIndex
from slipstream.index.analysis import check_term_bytes
from slipstream.index.backend import StoredRow
from slipstream.index.doc import DocKey
from slipstream.index.errors import DocumentTooLargeError
from slipstream.index.postgres_backend import COPY_THRESHOLD
from slipstream.shardsync.changelog import COPY_MIN_ROWS, ChangeEntry
from slipstream.shardsync.compact import CompactionReport, compact

from .errors import on_search_database
from .fill import fill_pending
from .incoming import Batch, SourceChange, decode_row
from .pgoutput import UNCHANGED
from .state import COPY_MIN_ROWS as SOURCE_COPY_MIN_ROWS
from .state import Checkpoint, DeadLetter, DocRef, SourceState, WorkerState

MapperLookup = Callable[[str], Callable[[Mapping[str, object], str], list[IndexDoc]] | None]


@dataclass(slots=True)
class ApplyResult:
    checkpoint: Checkpoint
    transactions: int
    changes: int
    upserts: int
    tombstones: int
    dead_letters: int
    seconds: float
    dead_by_table: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class Planned:
    """A batch worked out and embedded, ready for `Applier.commit`."""

    batch: Batch
    fx: _Effects
    states: dict[tuple[str, str], SourceState]
    prepared: list
    number: int
    seconds: float


@dataclass(slots=True)
class _Effects:
    """What one batch does to the search side, coalesced per search row."""

    final: dict[DocKey, IndexDoc | None] = field(default_factory=dict)
    partitions: dict[DocKey, str] = field(default_factory=dict)
    log: dict[tuple[DocKey, str], tuple[str, int]] = field(default_factory=dict)
    # The letters to write, one per row (relation, row_key): its last failing change here.
    dead: dict[tuple[str, str], DeadLetter] = field(default_factory=dict)
    truncated: list[tuple[str, int]] = field(default_factory=list)
    # Rows whose last change here applied (or deleted them), in relations with open dead
    # letters: their letters are settled.
    settled: dict[tuple[str, str], None] = field(default_factory=dict)

    def _log(self, key: DocKey, partition: str, op: str, lsn: int) -> None:
        self.log.pop((key, partition), None)  # re-append: entries keep commit order
        self.log[(key, partition)] = (op, lsn)

    def upsert(self, doc: IndexDoc, lsn: int) -> None:
        self.final[doc.key] = doc
        self.partitions[doc.key] = doc.partition
        self._log(doc.key, doc.partition, "u", lsn)

    def tombstone(self, key: DocKey, partition: str, lsn: int) -> None:
        self.final[key] = None
        self.partitions[key] = partition
        self._log(key, partition, "d", lsn)


class Applier:
    """Applies batches for one slot through a dedicated search-database connection."""

    def __init__(self, conn: psycopg.Connection, index: SearchIndex, state: WorkerState,
                 mappers: MapperLookup, slot: str, read_conn: psycopg.Connection | None = None,
                 mapping_of: Callable[[str], str | None] | None = None) -> None:
        self.conn = conn
        set_json_dumps(json_dumps, conn)  # JSONB parameters: several per row written
        self.read_conn = read_conn or conn  # planning reads; its own connection when pipelined
        self.index = index
        self.backend = index.backend
        self.state = state
        self.mappers = mappers
        # What decides a table's documents (`Registry.fingerprint`), recorded with its copy.
        self.mapping_of = mapping_of or (lambda relation: None)
        self.slot = slot
        self.checkpoint = state.checkpoint(conn, slot)
        # Relations with open dead letters: a later change of a row settles its letters.
        self.lettered = state.lettered_relations(conn)
        conn.commit()
        # Source states of batches planned but not yet committed, so the next batch can be
        # planned while the previous one commits: key -> (state, batch number).
        self._pending: dict[tuple[str, str], tuple[SourceState, int]] = {}
        self._pending_lock = threading.Lock()
        self._batch_no = 0
        # Search rows of batches planned but not committed, as the table will hold them,
        # so the next plan compares against them: key -> (StoredRow, batch number).
        self._inflight: dict[DocKey, tuple[StoredRow, int]] = {}

    def close(self) -> None:
        if self.read_conn is not self.conn:
            self.read_conn.close()
        self.conn.close()

    # -- planning (no writes) -------------------------------------------------------------

    @on_search_database("read source-row state")
    def plan(self, batch: Batch) -> Planned:
        """Work out a batch's effects and embed its rows. Reads only; safe to run while the
        previous batch commits (states it has not committed yet come from `_pending`)."""
        started = time.perf_counter()
        wanted = []
        for c in batch.changes:
            if c.key is not None:
                wanted.append((c.relation, c.key))
            if c.old_key is not None:
                wanted.append((c.relation, c.old_key))
        # The overlays of batches planned but not committed are taken before the tables
        # are read: a batch that commits in between is then seen in one or the other.
        with self._pending_lock:
            pending = {k: v[0] for k, v in self._pending.items()}
            inflight = {k: v[0] for k, v in self._inflight.items()}
        # Rows whose values are complete are mapped first, so the stored state of the
        # search rows they make is read in the same round trip as the source states.
        mapped = self._premap(batch.changes)
        doc_keys = list(dict.fromkeys(d.key for docs in mapped.values() if isinstance(docs, list)
                                      for d in docs))
        overlay, stored = self._read_states([k for k in wanted if k not in pending], doc_keys)
        overlay.update({k: pending[k] for k in wanted if k in pending})
        touched: set[tuple[str, str]] = set()
        fx = _Effects()
        for i, change in enumerate(batch.changes):
            if change.kind == "truncate":
                self._truncate(change, overlay, pending, touched, fx)
            elif change.kind in ("delete", "vanished"):
                self._delete(change, overlay, touched, fx)
            else:
                self._upsert(change, overlay, touched, fx, mapped.get(i))
        self.read_conn.commit()  # end the read snapshot before embedding
        states = {k: overlay[k] for k in touched}
        upserts = [d for d in fx.final.values() if d is not None]
        known = {k: inflight[k] for k in fx.final if k in inflight}
        # Embeddings before the transaction opens; unchanged text and no-op rows send nothing.
        prepared = self.index.prepare(upserts, known=known, stored=stored)
        with self._pending_lock:
            self._batch_no += 1
            number = self._batch_no
            self._pending.update({k: (st, number) for k, st in states.items()})
            self._inflight.update({p.doc.key: (p.stored(), number) for p in prepared if not p.unchanged})
            self._inflight.update({k: (StoredRow.tombstone(), number)
                                   for k, d in fx.final.items() if d is None})
        return Planned(batch, fx, states, prepared, number, time.perf_counter() - started)

    def _premap(self, changes: Sequence[SourceChange]) -> dict[int, list[IndexDoc] | Exception]:
        """The docs (or the mapper's error) of each insert or update that carries every
        column, by position in `changes`. A mapper is a function of the row alone, so
        calling it before the source states are read gives what `_upsert` would get."""
        out: dict[int, list[IndexDoc] | Exception] = {}
        for i, change in enumerate(changes):
            if change.kind in ("truncate", "delete", "vanished") or change.values is None:
                continue
            if any(v is UNCHANGED for v in change.values.values()):
                continue  # completed from the stored state first
            mapper = self.mappers(change.relation)
            if mapper is not None:
                out[i] = _map(mapper, change.values, change)
        return out

    def _read_states(self, source_keys: list[tuple[str, str]], doc_keys: list[DocKey]
                     ) -> tuple[dict[tuple[str, str], SourceState], dict[DocKey, StoredRow | None]]:
        """The stored source states of `source_keys` and the stored search-row state of
        `doc_keys` (None: no row), in one round trip."""
        source_keys = list(dict.fromkeys(source_keys))
        state_of = getattr(self.backend, "stored_state_query", None)
        if state_of is None or not doc_keys:
            return self.state.load_source_rows(self.read_conn, source_keys), {}
        statements = [state_of(doc_keys)]
        if source_keys:
            statements.append(self.state.source_rows_query(source_keys))
        results = read_as_one_query(self.read_conn, statements)
        found = self.backend.stored_state_rows(results[0])
        overlay = self.state.source_rows_parse(results[1]) if source_keys else {}
        return overlay, {k: found.get(k) for k in doc_keys}

    def _drop_docs(self, docs: tuple[DocRef, ...], keep: set[DocKey], lsn: int, fx: _Effects) -> None:
        for ref in docs:
            if ref.key not in keep:
                fx.tombstone(ref.key, ref.partition, lsn)

    def _succeeded(self, k: tuple[str, str], fx: _Effects) -> None:
        """Row `k`'s latest change applied: its open letters and any this batch made are settled."""
        if k[0] in self.lettered:
            fx.settled[k] = None
        fx.dead.pop(k, None)

    def _delete(self, change: SourceChange, overlay, touched, fx: _Effects) -> None:
        k = (change.relation, change.key)
        prev = overlay.get(k)
        if change.kind == "vanished" and (prev is None or prev.lsn >= change.commit_lsn):
            return  # the stream has applied this row since the copy missed it
        self._succeeded(k, fx)
        if prev is None:
            return
        if not prev.deleted:
            self._drop_docs(prev.docs, set(), change.commit_lsn, fx)
        overlay[k] = SourceState.gone(change.commit_lsn)
        touched.add(k)

    def _truncate(self, change: SourceChange, overlay, pending, touched, fx: _Effects) -> None:
        for relation in change.truncated:
            for k in [k for k in fx.dead if k[0] == relation]:  # the rows are gone
                del fx.dead[k]
            live = {(relation, rk): docs for rk, docs in self.state.source_rows_of(self.read_conn, relation)}
            for k, st in {**pending, **overlay}.items():
                if k[0] == relation:
                    live.pop(k, None)
                    if not st.deleted:
                        live[k] = st.docs
            for k, docs in live.items():
                self._drop_docs(docs, set(), change.commit_lsn, fx)
                if k in overlay or k in pending:
                    overlay[k] = SourceState.gone(change.commit_lsn)
                    touched.add(k)
            fx.truncated.append((relation, change.commit_lsn))

    def _upsert(self, change: SourceChange, overlay, touched, fx: _Effects,
                mapped: list[IndexDoc] | Exception | None = None) -> None:
        k = (change.relation, change.key)
        prev = overlay.get(k)
        lsn = change.commit_lsn
        if change.kind == "snapshot" and prev is not None and prev.lsn >= lsn:
            return  # the stream already applied this row as of a later point
        base = prev
        if change.old_key is not None and change.old_key != change.key:
            old_k = (change.relation, change.old_key)
            old = overlay.get(old_k)
            self._succeeded(old_k, fx)  # the row under its old key is gone
            if old is not None:
                base = old
                if not old.deleted:
                    self._drop_docs(old.docs, set(), lsn, fx)
                overlay[old_k] = SourceState.gone(lsn)
                touched.add(old_k)
        values = dict(change.values or {})
        missing = [c for c, v in values.items() if v is UNCHANGED]
        if missing:
            stored = base.values if base is not None and not base.deleted else None
            if stored is None or any(c not in stored for c in missing):
                fx.dead[k] = DeadLetter(lsn, change.relation, change.key, change.kind,
                                        {c: v for c, v in values.items() if v is not UNCHANGED},
                                        f"unchanged TOAST column(s) {missing} but no stored value "
                                        "for this row; re-run the snapshot for this table")
                return
            for c in missing:
                values[c] = stored[c]
        old_docs = prev.docs if prev is not None and not prev.deleted else ()
        mapper = self.mappers(change.relation)
        touched.add(k)
        if mapper is None:
            self._succeeded(k, fx)
            overlay[k] = SourceState(values, old_docs, lsn, False)
            return
        docs = mapped if mapped is not None else _map(mapper, values, change)
        if isinstance(docs, Exception):  # a bad row must not stop the stream
            fx.dead[k] = DeadLetter(lsn, change.relation, change.key, change.kind, values,
                                    _describe(docs))
            overlay[k] = SourceState(values, old_docs, lsn, False)
            return
        self._succeeded(k, fx)
        self._drop_docs(old_docs, {d.key for d in docs}, lsn, fx)
        by_key = {r.key: r.partition for r in old_docs}
        for doc in docs:
            old_partition = by_key.get(doc.key)
            if old_partition is not None and old_partition != doc.partition:
                fx._log(doc.key, old_partition, "d", lsn)  # the old partition's devices drop it
            fx.upsert(doc, lsn)
        overlay[k] = SourceState(values, tuple(DocRef(*d.key, d.partition) for d in docs), lsn, False)

    # -- the transaction ------------------------------------------------------------------

    def apply(self, batch: Batch, also: Callable[[psycopg.Connection], None] | None = None
              ) -> ApplyResult:
        """Plan and commit `batch`; `also` runs inside its transaction (e.g. copy progress)."""
        return self.commit(self.plan(batch), also)

    @on_search_database("commit an apply transaction")
    def commit(self, planned: Planned, also: Callable[[psycopg.Connection], None] | None = None
               ) -> ApplyResult:
        """Write a planned batch in one transaction, with the checkpoint it makes durable."""
        started = time.perf_counter()
        batch, fx = planned.batch, planned.fx
        tombstones = [k for k, d in fx.final.items() if d is None]
        letters = list(fx.dead.values())
        # A row's earlier letters are settled by its change here, applied or failing again.
        settled = list(dict.fromkeys([*fx.settled, *((d.relation, d.row_key) for d in letters)]))
        settled_relations = [r for r, _ in fx.truncated if r in self.lettered]
        cp = self.checkpoint
        noop = {p.doc.key for p in planned.prepared if p.unchanged}  # devices would see nothing new
        entries = [ChangeEntry(partition, key[0], key[1], key[2], op, lsn)
                   for (key, partition), (op, lsn) in fx.log.items()
                   if not (op == "u" and key in noop)]
        if batch.snapshot:  # copied rows: the stream position does not move
            new_cp = Checkpoint(cp.lsn, cp.partial_lsn, cp.partial_offset, cp.last_seq + len(entries))
        else:
            new_cp = Checkpoint(
                lsn=batch.completed[-1].end_lsn if batch.completed else cp.lsn,
                partial_lsn=batch.partial[0] if batch.partial else None,
                partial_offset=batch.partial[1] if batch.partial else 0,
                last_seq=cp.last_seq + len(entries),
            )
        if (also is None and len(planned.prepared) <= ONE_QUERY_MAX_ROWS
                and len(entries) <= ONE_QUERY_MAX_ROWS and len(planned.states) <= ONE_QUERY_MAX_ROWS):
            # A small batch (the steady-stream case) goes out as one query: one round trip
            # and one implicit transaction, parameters bound here.
            run_as_one_query(self.conn, [
                *self.backend.write_statements(planned.prepared),
                *self.backend.tombstone_statements(tombstones),
                *self.state.changelog.append_statements(entries, cp.last_seq + 1),
                *self.state.write_statements(fx.truncated, [
                    (rel, key, st) for (rel, key), st in planned.states.items()], letters,
                    settled, settled_relations),
                self.state.checkpoint_statement(self.slot, new_cp)])
        else:
            small = (len(planned.prepared) < COPY_THRESHOLD and len(entries) < COPY_MIN_ROWS
                     and len(planned.states) < SOURCE_COPY_MIN_ROWS)  # no COPY in a pipeline
            # A smaller batch goes out in one pipeline, BEGIN and COMMIT included.
            with (self.conn.pipeline() if small else nullcontext()), self.conn.transaction():
                self.backend.write(planned.prepared, conn=self.conn)
                self.backend.tombstone_many(tombstones, conn=self.conn)
                self.state.changelog.append(self.conn, entries, first_seq=cp.last_seq + 1)
                for relation, lsn in fx.truncated:
                    self.state.mark_relation_deleted(self.conn, relation, lsn)
                self.state.save_source_rows(self.conn, [
                    (rel, key, st) for (rel, key), st in planned.states.items()])
                settle = self.state.settle_statement(settled, settled_relations)
                if settle is not None:
                    self.conn.execute(*settle)
                self.state.add_dead_letters(self.conn, letters)
                self.state.save_checkpoint(self.conn, self.slot, new_cp)
                if also is not None:
                    also(self.conn)
        self.checkpoint = new_cp
        self.lettered.update(d.relation for d in letters)
        with self._pending_lock:
            for k in planned.states:
                if self._pending.get(k, (None, 0))[1] == planned.number:
                    del self._pending[k]
            for k in fx.final:
                if self._inflight.get(k, (None, 0))[1] == planned.number:
                    del self._inflight[k]
        dead_by_table: dict[str, int] = {}
        for letter in letters:
            dead_by_table[letter.relation] = dead_by_table.get(letter.relation, 0) + 1
        return ApplyResult(new_cp, len(batch.completed), len(batch.changes),
                           len(planned.prepared) - len(noop),
                           len(tombstones), len(letters),
                           planned.seconds + time.perf_counter() - started, dead_by_table)

    @on_search_database("compact the change log")
    def compact(self, retention: float) -> CompactionReport:
        """Compact the change log on the writer's connection, between two batches."""
        return compact(self.conn, self.state.schema, retention)

    @on_search_database("fill pending embeddings")
    def fill_pending(self, limit: int = 256) -> int:
        """Embed up to `limit` rows left lexical-only, and log them for devices (see `fill`).

        Returns how many rows got their vectors; rows still failing keep the last error
        and stay pending for the next pass.
        """
        return fill_pending(self, limit)


def json_dumps(value: Any) -> bytes | str:
    """JSON for a JSONB parameter: orjson (several times faster than `json` on a row's
    term counts), falling back to `json` for what orjson refuses (integers beyond 64
    bits, keys it cannot turn into text). The server parses either into the same JSONB."""
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:  # orjson.JSONEncodeError included
        return json.dumps(value)


ONE_QUERY_MAX_ROWS = 16  # rows per table up to which a batch is written as one query


def run_as_one_query(conn: psycopg.Connection, statements: list[tuple[bytes, Sequence[Any]]]) -> None:
    """Run `statements` as a single simple-protocol query: one round trip, and (the
    connection in autocommit for it) one implicit transaction, all or nothing.

    A pipeline sends the same in one round trip too, but costs far more CPU per
    statement than the server spends on a small batch. Parameters are bound here as
    literals by psycopg's own adapters (the connection's quoting and escaping).
    """
    query = _bind(conn, statements)
    conn.autocommit = True  # the connection is idle between batches
    try:
        conn.execute(query)
    finally:
        try:
            conn.autocommit = False
        except psycopg.Error:
            pass  # a broken connection: the error above is the one to report


_split_queries: dict[bytes, list[bytes]] = {}


def _placeholders(query: bytes) -> list[bytes]:
    """`query` split at its %s placeholders (it may hold no other %)."""
    parts = _split_queries.get(query)
    if parts is None:
        parts = query.split(b"%s")
        if any(b"%" in part for part in parts):
            raise ValueError(f"only %s placeholders can be bound here: {query[:200]!r}")
        if len(_split_queries) > 1000:
            _split_queries.clear()
        _split_queries[query] = parts
    return parts


def _map(mapper: Callable[[Mapping[str, object], str], list[IndexDoc]],
         values: Mapping[str, Any], change: SourceChange) -> list[IndexDoc] | Exception:
    """A change's docs as its mapper makes them, or the error that makes it a dead letter."""
    try:
        docs = mapper(decode_row(values, change.columns), change.kind)
        if not isinstance(docs, list) or not all(isinstance(d, IndexDoc) for d in docs):
            raise TypeError(f"mapper returned {type(docs).__name__}, not a list of IndexDoc")
        if len({d.key for d in docs}) != len(docs):
            raise ValueError("mapper returned two docs with the same key")
        for doc in docs:
            try:
                check_term_bytes(doc)  # one the server cannot store is this row's dead letter
            except DocumentTooLargeError as exc:
                raise DocumentTooLargeError(
                    f"{exc}. For a TOML table: [tables.\"{change.relation}\"] max_body_chars cuts "
                    "the object's own document, and its chunks section keeps all of the text "
                    "searchable") from None
    except Exception as exc:  # noqa: BLE001 - the caller dead-letters the row
        return exc
    return docs


def read_as_one_query(conn: psycopg.Connection, statements: list[tuple[bytes, Sequence[Any]]]
                      ) -> list[list[tuple]]:
    """The rows of each of `statements` (reads), sent as one simple-protocol query: one
    round trip. Parameters are bound as in `run_as_one_query`."""
    cur = conn.execute(_bind(conn, statements))
    out = [cur.fetchall()]
    while cur.nextset():
        out.append(cur.fetchall())
    if len(out) != len(statements):
        raise RuntimeError(f"{len(statements)} statements answered {len(out)} results")
    return out


def _bind(conn: psycopg.Connection, statements: list[tuple[bytes, Sequence[Any]]]) -> bytes:
    """`statements` as one query text, parameters bound by psycopg's own adapters."""
    literal = Transformer(conn).as_literal
    out: list[bytes] = []
    for query, params in statements:
        parts = _placeholders(query)
        if len(parts) != len(params) + 1:
            raise ValueError(f"{len(params)} parameters for {len(parts) - 1} placeholders")
        out.append(parts[0])
        for value, part in zip(params, parts[1:]):
            out.append(literal(value))
            out.append(part)
        out.append(b";\n")
    return b"".join(out)


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if exc.__cause__ is not None:
        text += f" (caused by {type(exc.__cause__).__name__}: {exc.__cause__})"
    return text[:4000]
