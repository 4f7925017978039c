"""The sync server and client over real HTTP (uvicorn on 127.0.0.1), a real Postgres, real SQLite.

Covers: token isolation on every endpoint; a full sync then deltas giving a shard equal
to the server's partition (vectors bit for bit) and the same ranked results; a row moved
between partitions; live long-polls woken by the worker's NOTIFY; the resync after
compaction swapping the file atomically while the old shard stays searchable; bad
parameters; cut connections, an interrupted download and a crash between pages.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import jwt
import psycopg
import pytest
from slipstream.index import HashingEmbedder, SearchIndex
from slipstream.shardsync import shard as shard_mod
from slipstream.shardsync.changelog import ChangeLog
from slipstream.shardsync.client import SyncClient, SyncRefusedError, SyncRetryPolicy
from slipstream.shardsync.compact import compact
from slipstream.shardsync.errors import ShardFormatError
from slipstream.shardsync.server import CURSOR_HEADER, ServerSettings
from slipstream.shardsync.shard import open_shard, shard_cursor
from slipstream.shardsync.tokens import TokenVerifier, issue_token
from slipstream.shardsync.wire import decode_page

from .proxy import Proxy
from .shardsync_helpers import DIM, VOCAB, LogWriter, doc
from .sync_server_helpers import RunningServer, server_state, shard_state

SECRET = "test-secret-" + "x" * 32
AUDIENCE = "notes-app"
SPACES = ("local", "server")
QUERIES = ["apple banana", "quarterly report", "travel paris flight", "grocery list", "refund"]


def token(*partitions: str, ttl: float = 600, **kw) -> str:
    return issue_token(kw.pop("key", SECRET), partitions, ttl=ttl, audience=kw.pop("aud", AUDIENCE),
                       **kw)


@pytest.fixture
def server(pg_dsn, writer):
    s = RunningServer(ServerSettings(dsn=pg_dsn, verifier=TokenVerifier(SECRET, audience=AUDIENCE),
                                     pool_max=4, max_wait=30))
    yield s
    s.stop()


def text(i: int) -> str:
    return " ".join(VOCAB[(i * 7 + j * 3) % len(VOCAB)] for j in range(4))


def client(server, tok: str, path: Path, **kw) -> SyncClient:
    kw.setdefault("retry", SyncRetryPolicy(initial_delay=0.05, max_delay=0.2, max_attempts=20))
    return SyncClient(server.url, tok, path, **kw)


def assert_same_as_server(dsn: str, path: Path, partitions=("A",), spaces=SPACES) -> None:
    expected = server_state(dsn, partitions, spaces)
    got = shard_state(str(path))
    assert set(got) == set(expected)
    for key, row in expected.items():
        assert got[key] == row, key


def assert_same_ranking(writer: LogWriter, path: Path, partition: str = "A") -> None:
    shard = open_shard(path)
    try:
        device = SearchIndex(shard, {s: HashingEmbedder(d) for s, d in shard.spaces.items()},
                             default_space="local")
        for q in QUERIES:
            for mode in ("balanced", "precision"):
                server_hits = writer.index.search(q, partition=partition, space="local", mode=mode)
                device_hits = device.search(q, partition=partition, space="local", mode=mode)
                assert [(h.object_id, h.score, h.match_type) for h in device_hits] == \
                    [(h.object_id, h.score, h.match_type) for h in server_hits], (q, mode)
                assert server_hits or q == "refund"
    finally:
        shard.close()


# -- isolation -------------------------------------------------------------------------------

def _bad_tokens() -> dict[str, str | None]:
    now = int(time.time())
    good = {"partitions": ["A"], "exp": now + 600, "aud": AUDIENCE}
    head, _, sig = jwt.encode(good, SECRET, "HS256").split(".")
    forged_payload = jwt.encode({**good, "partitions": ["A", "B"]}, SECRET, "HS256").split(".")[1]
    return {
        "missing": None,
        "expired": jwt.encode({**good, "exp": now - 61}, SECRET, "HS256"),
        "tampered": f"{head}.{forged_payload}.{sig[:-2]}{'AA' if sig[-2:] != 'AA' else 'BB'}",
        "alg_none": jwt.encode(good, None, algorithm="none"),
        "wrong_key": jwt.encode(good, "another-secret-" + "y" * 32, "HS256"),
        "wrong_audience": jwt.encode({**good, "aud": "other-app"}, SECRET, "HS256"),
        "no_audience": jwt.encode({k: v for k, v in good.items() if k != "aud"}, SECRET, "HS256"),
    }


ENDPOINTS = ["/v1/snapshot", "/v1/changes?cursor=0", "/v1/changes?cursor=0&live=true&wait=5"]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_bad_tokens_get_401_and_other_partitions_403_with_bodies_that_reveal_nothing(
        server, writer, endpoint):
    writer.apply([doc("1", "A", text(1)), doc("2", "B", text(2))])
    sep = "&" if "?" in endpoint else "?"
    seen_401, seen_403 = set(), set()
    for name, tok in _bad_tokens().items():
        headers = {} if tok is None else {"authorization": f"Bearer {tok}"}
        r = httpx.get(f"{server.url}{endpoint}{sep}partition=A", headers=headers, timeout=10)
        assert r.status_code == 401, name
        assert r.headers["www-authenticate"].startswith("Bearer")
        seen_401.add(r.content)
    b_token = {"authorization": f"Bearer {token('B')}"}
    for asked in ("A", "does-not-exist", "A&partition=B"):
        r = httpx.get(f"{server.url}{endpoint}{sep}partition={asked}", headers=b_token, timeout=10)
        assert r.status_code == 403, asked
        seen_403.add(r.content)
    # one body for every refusal of a kind: nothing tells a partition that exists from one
    # that does not, nor why a token was refused
    assert len(seen_401) == 1 and len(seen_403) == 1
    body = next(iter(seen_403))
    assert b"does-not-exist" not in body and b'"A"' not in body


def test_a_token_reads_only_its_own_partitions(server, writer, tmp_path):
    writer.apply([doc(str(i), "AB"[i % 2], text(i)) for i in range(10)])
    r = httpx.get(f"{server.url}/v1/changes", params={"cursor": 0},
                  headers={"authorization": f"Bearer {token('B')}"}, timeout=10)
    assert r.status_code == 200
    page = decode_page(r.content)
    assert {e.partition for e in page.entries} == {"B"} and len(page.entries) == 5
    with client(server, token("B"), tmp_path / "b.db") as c:
        c.sync()
    assert {v[0] for v in shard_state(str(tmp_path / "b.db")).values()} == {"B"}


# -- full sync, deltas, parity -----------------------------------------------------------------

def test_snapshot_then_deltas_equal_the_server_and_rank_identically(server, writer, tmp_path):
    writer.apply([doc(str(i), "AB"[i % 3 == 0], text(i), keywords=["kw" + str(i % 4)],
                      payload={"n": i}, attrs={"even": i % 2 == 0}) for i in range(60)])
    path = tmp_path / "a.db"
    with client(server, token("A"), path, limit=3) as c:
        report = c.sync()
        assert report.snapshot and path.exists()
        assert_same_as_server(writer.dsn, path)
        # deltas: updates, deletes, a move away from A, a move into A, new rows
        writer.apply([doc("1", "A", "quarterly report updated"), doc("61", "A", text(61))])
        writer.apply([], deletes=[("note", "2", "leaf"), ("note", "4", "leaf")])
        writer.apply([doc("5", "B", text(5)), doc("3", "A", text(3))])  # 5 leaves A; 3 joins A
        writer.apply([doc("62", "A", "travel paris flight")])
        report = c.sync()
        assert not report.snapshot and report.entries >= 6 and report.pages >= 2
    with psycopg.connect(writer.dsn) as conn:
        assert report.cursor == ChangeLog().max_seq(conn)
    assert_same_as_server(writer.dsn, path)
    state = shard_state(str(path))
    assert ("note", "5", "leaf") not in state and ("note", "3", "leaf") in state
    assert ("note", "2", "leaf") not in state
    assert_same_ranking(writer, path)


def test_a_move_whose_d_entry_is_on_a_later_page_still_leaves_the_old_partition(
        server, writer, tmp_path):
    writer.apply([doc(str(i), "A", text(i)) for i in range(5)])
    pa, pb = tmp_path / "a.db", tmp_path / "b.db"
    with client(server, token("A"), pa, limit=1) as ca, client(server, token("B"), pb) as cb:
        ca.sync()
        cb.sync()
        # one transaction: u for "0" in B, then the d in A, after other A entries
        writer.apply([doc("1", "A", "touched"), doc("0", "B", text(0))])
        writer.apply([doc("2", "A", "touched again")])
        ca.sync()
        cb.sync()
    assert ("note", "0", "leaf") not in shard_state(str(pa))
    assert ("note", "0", "leaf") in shard_state(str(pb))
    assert_same_as_server(writer.dsn, pa)
    assert_same_as_server(writer.dsn, pb, ("B",))


def test_spaces_a_device_asks_for_are_the_only_ones_it_gets(server, writer, tmp_path):
    writer.apply([doc(str(i), "A", text(i)) for i in range(5)])
    path = tmp_path / "local.db"
    with client(server, token("A"), path, spaces=["local"]) as c:
        c.sync()
        writer.apply([doc("9", "A", text(9))])
        c.sync()
    state = shard_state(str(path))
    assert state and all(set(v[9]) == {"local"} for v in state.values())
    assert all(len(v[9]["local"]) == DIM * 4 for v in state.values())
    assert_same_as_server(writer.dsn, path, spaces=("local",))


# -- live ------------------------------------------------------------------------------------

def test_a_long_poll_is_woken_by_the_commit_not_by_its_timeout(server, writer):
    seq = writer.apply([doc("1", "A", text(1))])
    headers = {"authorization": f"Bearer {token('A')}"}
    result: dict[str, object] = {}

    def poll() -> None:
        started = time.monotonic()
        r = httpx.get(f"{server.url}/v1/changes", headers=headers, timeout=60,
                      params={"cursor": seq, "live": "true", "wait": 30})
        result["elapsed"], result["response"] = time.monotonic() - started, r

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.5)
    assert t.is_alive(), "the long-poll answered before anything changed"
    writer.apply([doc("2", "B", text(2))])  # another partition: no answer yet
    time.sleep(0.5)
    assert t.is_alive(), "a change in another partition answered the long-poll"
    writer.apply([doc("3", "A", text(3))])
    t.join(timeout=30)
    r = result["response"]
    assert r.status_code == 200
    page = decode_page(r.content)
    assert [e.key[1] for e in page.entries] == ["3"]
    assert result["elapsed"] < 30  # woken by NOTIFY, well before the 30 s wait ran out
    assert int(r.headers[CURSOR_HEADER]) == page.next_cursor


def test_a_long_poll_with_nothing_new_returns_an_empty_page_at_its_deadline(server, writer):
    seq = writer.apply([doc("1", "A", text(1))])
    r = httpx.get(f"{server.url}/v1/changes", headers={"authorization": f"Bearer {token('A')}"},
                  params={"cursor": seq, "live": "true", "wait": 1}, timeout=30)
    page = decode_page(r.content)
    assert r.status_code == 200 and page.entries == () and page.next_cursor == seq


def test_live_follow_survives_a_cut_connection(server, writer, tmp_path):
    writer.apply([doc("1", "A", text(1))])
    path = tmp_path / "live.db"
    with Proxy("127.0.0.1", server.port) as proxy:
        c = SyncClient(f"http://127.0.0.1:{proxy.port}", token("A"), path,
                       retry=SyncRetryPolicy(initial_delay=0.05, max_delay=0.2, max_attempts=None))
        applied: list[int] = []
        t = threading.Thread(target=c.sync, kwargs={"live": True, "wait": 20,
                                                    "on_page": lambda n, cur: applied.append(cur)})
        t.start()
        try:
            _wait_for(lambda: path.exists() and proxy.connections > 0)
            time.sleep(0.3)  # in a long-poll now
            proxy.cut()
            seq = writer.apply([doc("2", "A", "arrives after the cut")])
            _wait_for(lambda: applied and applied[-1] >= seq)
            writer.apply([doc("3", "A", "and another")])
            _wait_for(lambda: ("note", "3", "leaf") in shard_state(str(path)))
        finally:
            c.stop()
            proxy.cut()
            t.join(timeout=30)
            c.close()
    assert not t.is_alive()
    assert_same_as_server(writer.dsn, path)


def _wait_for(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise TimeoutError("condition not reached")


# -- resync ----------------------------------------------------------------------------------

def test_a_cursor_below_the_horizon_resyncs_into_a_new_file_swapped_atomically(
        server, writer, tmp_path):
    writer.apply([doc(str(i), "A", text(i)) for i in range(20)])
    path = tmp_path / "a.db"
    with client(server, token("A"), path) as c:
        c.sync()
        old_cursor = shard_cursor(open_shard(path))
        writer.apply([doc("5", "A", "quarterly report")], deletes=[("note", "6", "leaf")])
        last = writer.apply([doc("21", "A", text(21))])
        with psycopg.connect(writer.dsn, autocommit=True) as conn:
            horizon = compact(conn, retention=0).horizon  # purges the tombstone of "6"
        assert old_cursor < horizon <= last
        r = httpx.get(f"{server.url}/v1/changes", params={"cursor": old_cursor},
                      headers={"authorization": f"Bearer {token('A')}"}, timeout=10)
        assert r.status_code == 410 and r.json()["error"] == "resync_required"
        assert r.json()["horizon"] == horizon

        held = open_shard(path)  # an app searching the old shard during the resync
        old_inode = os.stat(path).st_ino
        during: list[list[str]] = []

        def on_swap(swapped: Path) -> None:  # the new file is complete, not yet in place
            assert os.stat(swapped).st_ino == old_inode
            hits = SearchIndex(held).search("title", partition="A", k=50)
            during.append(sorted(h.object_id for h in hits))
            held.close()

        c.on_swap = on_swap
        report = c.sync()
    assert report.resynced and report.cursor >= last
    assert during and "6" in during[0] and "21" not in during[0]  # the old shard, whole
    assert os.stat(path).st_ino != old_inode
    assert_same_as_server(writer.dsn, path)
    assert not list(tmp_path.glob("*.download-*"))


def test_a_cursor_beyond_the_end_of_the_log_asks_for_a_resync(server, writer):
    seq = writer.apply([doc("1", "A", text(1))])
    r = httpx.get(f"{server.url}/v1/changes", params={"cursor": seq + 100},
                  headers={"authorization": f"Bearer {token('A')}"}, timeout=10)
    assert r.status_code == 409 and r.json()["error"] == "resync_required"


# -- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("params,word", [
    ({}, "cursor is required"),
    ({"cursor": "-1"}, "not an integer"),
    ({"cursor": "abc"}, "not an integer"),
    ({"cursor": "0", "limit": "0"}, "out of range"),
    ({"cursor": "0", "limit": "x"}, "not an integer"),
    ({"cursor": "0", "spaces": "bad-name"}, "not a space name"),
    ({"cursor": "0", "spaces": "nosuchspace"}, "nosuchspace"),
    ({"cursor": "0", "live": "perhaps"}, "not a boolean"),
    ({"cursor": "0", "live": "true", "wait": "999"}, "out of range"),
    ({"cursor": "0", "partition": ""}, "not a partition name"),
])
def test_bad_parameters_get_400_naming_the_problem(server, writer, params, word):
    r = httpx.get(f"{server.url}/v1/changes", params=params,
                  headers={"authorization": f"Bearer {token('A')}"}, timeout=10)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "bad_request" and word in r.json()["message"]


def test_refusals_reach_the_client_as_typed_errors(server, writer, tmp_path):
    with client(server, token("B"), tmp_path / "x.db", partitions=["A"]) as c, \
            pytest.raises(SyncRefusedError) as info:
        c.sync()
    assert info.value.status == 403 and not (tmp_path / "x.db").exists()
    with client(server, token("A", key="wrong-secret-" + "z" * 32), tmp_path / "y.db") as c, \
            pytest.raises(SyncRefusedError, match="401"):
        c.sync()


def test_a_shard_of_an_unknown_format_version_is_refused_clearly(server, writer, tmp_path):
    writer.apply([doc("1", "A", text(1))])
    path = tmp_path / "a.db"
    with client(server, token("A"), path) as c:
        c.sync()
    import sqlite3

    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'format_version'")
    with client(server, token("A"), path) as c, pytest.raises(ShardFormatError, match="99"):
        c.sync()


# -- interruptions ---------------------------------------------------------------------------

class CutOnce(httpx.HTTPTransport):
    """Cuts the first response to `path` after `after` bytes, as a dropped link would."""

    def __init__(self, path: str, after: int = 4096) -> None:
        super().__init__()
        self.path, self.after, self.cut = path, after, 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.url.path != self.path or self.cut:
            return response
        self.cut += 1
        inner, limit = response.stream, self.after

        class Cut(httpx.SyncByteStream):
            def __iter__(self):
                sent = 0
                for chunk in inner:
                    if sent + len(chunk) >= limit:
                        yield chunk[: max(0, limit - sent)]
                        raise httpx.ReadError("connection cut by the test")
                    sent += len(chunk)
                    yield chunk

            def close(self):
                inner.close()

        return httpx.Response(response.status_code, headers=response.headers, stream=Cut(),
                              request=request, extensions=response.extensions)


def test_a_snapshot_travels_gzip_or_as_is_as_the_client_asks(server, writer, tmp_path):
    writer.apply([doc(str(i), "A", text(i)) for i in range(40)])
    auth = {"authorization": f"Bearer {token('A')}"}
    with httpx.Client(headers=auth, timeout=30) as http:
        plain = http.get(f"{server.url}/v1/snapshot", headers={"accept-encoding": "identity"})
        packed = http.get(f"{server.url}/v1/snapshot", headers={"accept-encoding": "gzip"})
    assert plain.status_code == packed.status_code == 200
    assert "content-encoding" not in plain.headers
    assert int(plain.headers["content-length"]) == int(plain.headers["slipstream-shard-bytes"])
    assert len(plain.content) == int(plain.headers["slipstream-shard-bytes"])
    assert packed.headers["content-encoding"] == "gzip" and packed.num_bytes_downloaded < len(
        packed.content)
    for name, response in (("plain.db", plain), ("packed.db", packed)):
        (tmp_path / name).write_bytes(response.content)
        assert_same_as_server(writer.dsn, tmp_path / name)
    path = tmp_path / "a.db"
    with client(server, token("A"), path, compress_snapshot=False) as c:
        assert c.sync().snapshot
    assert_same_as_server(writer.dsn, path)


def test_a_snapshot_cut_mid_download_is_retried_and_leaves_no_partial_file(
        server, writer, tmp_path):
    writer.apply([doc(str(i), "A", text(i) * 20) for i in range(200)])
    path = tmp_path / "a.db"
    transport = CutOnce("/v1/snapshot")
    with client(server, token("A"), path, transport=transport) as c:
        report = c.sync()
    assert transport.cut == 1 and report.retries >= 1 and report.snapshot
    assert_same_as_server(writer.dsn, path)
    assert not list(tmp_path.glob("*.download-*"))


def test_a_run_killed_mid_snapshot_or_between_pages_resumes_and_converges(
        server, writer, tmp_path, monkeypatch):
    writer.apply([doc(str(i), "A", text(i)) for i in range(30)])
    path = tmp_path / "a.db"
    (tmp_path / "a.db.download-deadbeef").write_bytes(b"SQLite format 3\x00 half a file")
    with client(server, token("A"), path) as c:
        c.sync()  # the leftover of a killed download is discarded; a fresh snapshot lands
    assert not list(tmp_path.glob("*.download-*"))
    for i in range(30, 60):
        writer.apply([doc(str(i), "A", text(i))], deletes=[("note", str(i - 30), "leaf")])
    real_apply, calls = shard_mod.apply_page, []

    def crash_on_third(shard, page):
        calls.append(page.next_cursor)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed between pages")
        return real_apply(shard, page)

    monkeypatch.setattr("slipstream.shardsync.client.apply_page", crash_on_third)
    with client(server, token("A"), path, limit=5) as c, pytest.raises(KeyboardInterrupt):
        c.sync()
    shard = open_shard(path)
    cursor = shard_cursor(shard)
    assert SearchIndex(shard).search("title", partition="A", k=5)  # still searchable
    shard.close()
    monkeypatch.setattr("slipstream.shardsync.client.apply_page", real_apply)
    with client(server, token("A"), path, limit=5) as c:
        report = c.sync()
    assert report.cursor > cursor
    assert_same_as_server(writer.dsn, path)


def test_the_notifier_wakes_only_waiters_whose_partitions_changed():
    from slipstream.shardsync.server import ChangeNotifier

    n = ChangeNotifier("", ChangeLog(), None)  # type: ignore[arg-type]
    n.announce(10, None)  # e.g. at (re)connect: unknown partitions
    assert n.concerns(5, ["A"]) and not n.concerns(10, ["A"])
    n.announce(12, frozenset({"B"}))
    assert not n.concerns(10, ["A"]) and n.concerns(10, ["C", "B"]) and n.concerns(11, ["B"])
    assert n.concerns(9, ["A"])  # (9, 10] may have touched anything
    for seq in range(13, 13 + ChangeNotifier.HISTORY):
        n.announce(seq, frozenset({"B"}))
    assert n.concerns(11, ["A"])  # (11, 12] is no longer remembered: assume it changed
    assert not n.concerns(12, ["A"])
    assert not n.concerns(n.latest - 5, ["A"])


def test_a_listen_connection_gone_silent_is_noticed_and_replaced(pg_dsn, writer):
    """Regression: the LISTEN connection only receives, so one a NAT or load balancer
    dropped without a word (no FIN, no RST) waited for notifications forever; the server
    still took itself for connected, and live devices heard of changes only when their
    long polls timed out. It now sends a heartbeat after a quiet spell and reconnects
    when no answer comes, polling meanwhile."""
    import asyncio

    from psycopg_pool import AsyncConnectionPool
    from slipstream.shardsync.server import ChangeNotifier

    async def until(condition, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def scenario() -> None:
        pool = AsyncConnectionPool(pg_dsn, min_size=1, max_size=2, open=False)
        await pool.open()
        with Proxy.for_dsn(pg_dsn) as proxy:
            notifier = ChangeNotifier(proxy.dsn(pg_dsn), ChangeLog(), pool, heartbeat=0.5)
            await notifier.start()
            try:
                assert notifier.connected
                proxy.pause()  # silent: the socket stays open, nothing passes
                assert await until(lambda: not notifier.connected, 5), "the silence went unnoticed"
                proxy.resume()
                assert await until(lambda: notifier.connected, 15), "no new LISTEN connection"
                before = notifier.latest
                writer.apply([doc("n900", "A", text(900))])  # the NOTIFY of its commit reaches it
                assert await until(lambda: notifier.latest > before, 5)
            finally:
                await notifier.stop()
                await pool.close()

    asyncio.run(scenario())


def test_free_text_partition_names_travel_as_query_parameters(server, writer, tmp_path):
    odd = "user {42}/../ä&partition=B?#%20"
    writer.apply([doc("1", odd, text(1)), doc("2", "B", text(2))])
    path = tmp_path / "odd.db"
    with client(server, token(odd), path, partitions=[odd]) as c:
        c.sync()
    assert {v[0] for v in shard_state(str(path)).values()} == {odd}
    assert_same_as_server(writer.dsn, path, (odd,))
    r = httpx.get(f"{server.url}/v1/changes", params={"cursor": 0, "partition": odd},
                  headers={"authorization": f"Bearer {token('B')}"}, timeout=10)
    assert r.status_code == 403
