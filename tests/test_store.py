"""serve.store against SQLite and a real PostgreSQL server the tests start (Debian's postgresql package)."""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from serve.access import Caller
from serve.store import BadCursor, Store, StoreError
from serve.store.tables import Base
from tests.conftest import NEEDS_POSTGRES, ROOT, free_port

ANN, BOB, ADMIN = Caller("ann"), Caller("bob"), Caller("root", admin=True)
ASKED = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
WRITERS, EACH = 8, 12


def _as_postgres(command: list[str]) -> list[str]:
    """The command as the `postgres` user when run as root (initdb and the server refuse to run as root)."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="module")
def postgres() -> str:
    """A PostgreSQL server of its own in a temporary folder (its socket there too, on a free port): the URL of
    its `postgres` database; stopped and removed after the module."""
    initdb = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not initdb:
        pytest.skip(NEEDS_POSTGRES)
    bin_dir = Path(initdb[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="store-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    port, data = free_port(), root / "data"
    run = lambda *cmd: subprocess.run(_as_postgres([str(c) for c in cmd]), check=True, capture_output=True,  # noqa: E731
                                      text=True, timeout=120)
    run(bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
    run(bin_dir / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "-t", "60", "-o",
        f"-p {port} -k {root} -c listen_addresses='' -c fsync=off -c max_connections=100", "start")
    try:
        yield f"postgresql+psycopg://postgres@/postgres?host={root}&port={port}"
    finally:
        subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


_databases = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    """A fresh, empty database: a SQLite file, or a new database on the test PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    server = request.getfixturevalue("postgres")
    name = f"store_{os.getpid()}_{next(_databases)}"
    engine = create_engine(server, isolation_level="AUTOCOMMIT")  # CREATE DATABASE runs outside a transaction
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return server.replace("/postgres?", f"/{name}?")


@pytest.fixture
def store(url):
    opened = Store(url)
    yield opened
    opened.close()


def add(store: Store, who: Caller = ANN, **fields):
    """A stored completion of `who` with small made-up contents."""
    values = {"model": "base", "messages": ASKED, "reply": {"role": "assistant", "content": "Blue."}} | fields
    return store.add_completion(who, **values)


# -- schema ------------------------------------------------------------------------------------------------
def test_a_fresh_database_is_made_by_alembic_and_matches_the_tables(url):
    store = Store(url)
    try:
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [store.head()]
            assert set(inspect(conn).get_table_names()) >= {"completions", "completion_metadata", "feedback",
                                                            "preferences", "alembic_version"}
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], f"serve/store/tables.py changed without a migration: {diff}"
        Store(url).close()  # opening again at head changes nothing
        assert store.revision() == store.head()
    finally:
        store.close()


def test_processes_that_start_together_migrate_once(url):
    """Three processes open the same empty database at once: one creates the schema, the others wait for
    it (the database's lock) and find it at head."""
    upgrade = [sys.executable, "-m", "serve.store", "upgrade", "--database-url", url]
    started = [subprocess.Popen(upgrade, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(3)]
    results = [(p.wait(timeout=180), *p.communicate()) for p in started]
    assert all(code == 0 for code, _, _ in results), [err[-1500:] for _, _, err in results]
    store = Store(url, migrate=False)
    assert store.revision() == store.head()
    store.close()


def test_sqlite_writes_ahead_and_waits_for_locks(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'deep' / 'store.db'}")  # its folder is made
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    store.close()


def test_a_database_from_a_newer_app_is_refused_with_the_fix(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    Store(url).close()
    newer = create_engine(url)
    with newer.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff_from_the_future'"))
    newer.dispose()
    with pytest.raises(StoreError, match="newer version of the app"):
        Store(url)


def test_an_unusable_url_says_so_without_its_password():
    with pytest.raises(StoreError, match="not supported"):
        Store("mysql://u@localhost/db")
    with pytest.raises(StoreError, match="SQLite file"):
        Store("sqlite://")
    with pytest.raises(StoreError, match="cannot open or upgrade") as failed:
        Store(f"postgresql://ann:s3cret@127.0.0.1:{free_port()}/db?connect_timeout=3")
    assert "s3cret" not in str(failed.value) and "ann:***@" in str(failed.value)


# -- completions ---------------------------------------------------------------------------------------
def test_a_completion_comes_back_as_stored(store):
    stored = add(store, settings={"temperature": 0.0, "stop": ["\n\n"]}, usage={"prompt_tokens": 9,
                 "completion_tokens": 2, "total_tokens": 11}, metadata={"topic": "colours", "ünï": "ß"},
                 adapter_version="0123456789ab", finish_reason="length", source="app")
    got = store.get(ANN, stored.id)
    assert got == stored and got.id.startswith("chatcmpl-")
    assert got.messages == ASKED and got.reply == {"role": "assistant", "content": "Blue."}
    assert got.settings == {"temperature": 0.0, "stop": ["\n\n"]} and got.usage["total_tokens"] == 11
    assert got.metadata == {"topic": "colours", "ünï": "ß"} and got.finish_reason == "length"
    assert (got.owner, got.adapter_version, got.source) == ("ann", "0123456789ab", "app")
    assert abs(got.created - time.time()) < 60


def test_metadata_follows_openais_limits(store):
    for bad in ({str(i): "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}, {"k": 1}, {"": "v"}):
        with pytest.raises(ValueError, match="metadata"):
            add(store, metadata=bad)
    assert add(store, metadata={str(i): "v" * 512 for i in range(16)}).metadata["15"] == "v" * 512
    with pytest.raises(ValueError, match="source"):
        add(store, source="cli")


def test_one_owner_never_sees_anothers_completions_and_an_admin_sees_all(store):
    ann, bob = add(store, ANN), add(store, BOB)
    assert store.get(BOB, ann.id) is None and store.get(ADMIN, ann.id) == ann
    assert [c.id for c in store.list_completions(BOB).items] == [bob.id]
    assert [c.id for c in store.list_completions(ADMIN).items] == [ann.id, bob.id]
    assert store.messages(BOB, ann.id) is None
    assert store.update_metadata(BOB, ann.id, {"x": "y"}) is None and store.get(ANN, ann.id).metadata == {}
    assert store.add_feedback(BOB, ann.id, rating="bad") is None
    assert store.delete(BOB, ann.id) is False and store.get(ANN, ann.id) is not None
    with pytest.raises(BadCursor):
        store.list_completions(BOB, after=ann.id)
    assert store.delete(ADMIN, ann.id) is True and store.get(ANN, ann.id) is None


def test_lists_filter_order_and_page(store):
    made = [add(store, model="pirate" if n % 2 else "base", metadata={"n": str(n), "run": "a" if n < 4 else "b"})
            for n in range(6)]
    ids = [c.id for c in made]
    first = store.list_completions(ANN, limit=4)
    assert [c.id for c in first.items] == ids[:4] and first.has_more
    assert (first.first_id, first.last_id) == (ids[0], ids[3])
    rest = store.list_completions(ANN, limit=4, after=first.last_id)
    assert [c.id for c in rest.items] == ids[4:] and not rest.has_more
    newest = store.list_completions(ANN, order="desc", limit=2, after=ids[3])
    assert [c.id for c in newest.items] == [ids[2], ids[1]] and newest.has_more
    assert [c.id for c in store.list_completions(ANN, model="pirate").items] == ids[1::2]
    assert [c.id for c in store.list_completions(ANN, metadata={"run": "a", "n": "2"}).items] == [ids[2]]
    assert [c.id for c in store.list_completions(ANN, metadata={"run": "b"}, model="base").items] == [ids[4]]
    assert store.list_completions(ANN, metadata={"run": "c"}).items == []
    with pytest.raises(BadCursor):
        store.list_completions(ANN, after="chatcmpl-nope")
    with pytest.raises(ValueError, match="order"):
        store.list_completions(ANN, order="up")


def test_messages_are_what_the_model_saw_with_ids_and_pages(store):
    stored = add(store, messages=[*ASKED, {"role": "assistant", "content": "Red."},
                                  {"role": "user", "content": "Another?"}])
    page = store.messages(ANN, stored.id, limit=3)
    assert [m["id"] for m in page.items] == [f"{stored.id}-{n}" for n in range(3)] and page.has_more
    assert page.items[0] | {"id": None} == {"id": None, "role": "system", "content": "Be brief.", "name": None,
                                            "content_parts": None}
    rest = store.messages(ANN, stored.id, after=page.last_id)
    assert [m["content"] for m in rest.items] == ["Another?"] and not rest.has_more
    assert [m["role"] for m in store.messages(ANN, stored.id, order="desc").items] == [
        "user", "assistant", "user", "system"]


def test_metadata_is_replaced_and_cleared(store):
    stored = add(store, metadata={"a": "1", "b": "2"})
    assert store.update_metadata(ANN, stored.id, {"b": "3", "c": "4"}).metadata == {"b": "3", "c": "4"}
    assert store.list_completions(ANN, metadata={"a": "1"}).items == []
    assert store.update_metadata(ANN, stored.id, None).metadata == {}


# -- feedback and preferences --------------------------------------------------------------------------
def test_feedback_is_one_record_per_person_and_completion(store):
    stored = add(store)
    with pytest.raises(ValueError, match="at least one"):
        store.add_feedback(ANN, stored.id)
    with pytest.raises(ValueError, match="rating"):
        store.add_feedback(ANN, stored.id, rating="meh")
    rated = store.add_feedback(ANN, stored.id, rating="bad")
    store.set_feedback_status(ADMIN, rated.id, "approved")
    corrected = store.add_feedback(ANN, stored.id, correction="Blue, like the sky.")
    assert corrected.id == rated.id and corrected.rating == "bad" and corrected.correction == "Blue, like the sky."
    assert corrected.status == "new", "changed feedback is reviewed again"
    assert corrected.completion == stored
    other = store.add_feedback(ADMIN, stored.id, comment="fine by me")
    assert other.id != rated.id and other.owner == "root"
    assert store.get_feedback(BOB, rated.id) is None and store.list_feedback(BOB).items == []
    assert [f.id for f in store.list_feedback(ANN).items] == [rated.id]


def test_feedback_lists_filter_by_what_a_reviewer_asks(store):
    now = int(time.time())
    base, pirate = add(store, ANN), add(store, BOB, model="pirate", adapter_version="v1")
    old = add(store, ANN)
    good = store.add_feedback(ANN, base.id, rating="good")
    fixed = store.add_feedback(BOB, pirate.id, rating="bad", correction="Arr, blue.")
    noted = store.add_feedback(ANN, old.id, comment="too short")

    def ids(**filters) -> list[str]:
        return [f.id for f in store.list_feedback(ADMIN, **filters).items]

    assert ids() == [noted.id, fixed.id, good.id]
    assert ids(order="asc", limit=2) == [good.id, fixed.id]
    assert ids(after=noted.id, limit=1) == [fixed.id]
    assert ids(rating="good") == [good.id] and ids(rating=None) == [noted.id]
    assert ids(corrected=True) == [fixed.id] and ids(corrected=False) == [noted.id, good.id]
    assert ids(model="pirate") == [fixed.id] and ids(adapter_version="v1") == [fixed.id]
    assert ids(user="ann") == [noted.id, good.id]
    assert ids(since=now - 5, until=now + 60) == [noted.id, fixed.id, good.id] and ids(until=now - 5) == []
    store.set_feedback_status(ADMIN, fixed.id, "approved")
    store.set_feedback_status(ADMIN, good.id, "rejected")
    assert ids(status="approved") == [fixed.id] and ids(status="new") == [noted.id]
    edited = store.edit_feedback(ADMIN, fixed.id, edited_correction="Arr, 'tis blue.", comment=None)
    assert edited.edited_correction == "Arr, 'tis blue." and edited.correction == "Arr, blue."
    assert store.edit_feedback(ANN, fixed.id, rating="good") is None, "bob's feedback is not ann's to edit"
    assert store.delete_feedback(ANN, fixed.id) is False and store.delete_feedback(BOB, fixed.id) is True
    assert ids() == [noted.id, good.id]


def test_a_preference_names_the_better_of_two_completions(store):
    left, right, bobs = add(store), add(store, model="pirate"), add(store, BOB)
    with pytest.raises(ValueError, match="better"):
        store.add_preference(ANN, left.id, right.id, "both")
    assert store.add_preference(ANN, left.id, bobs.id, "left") is None
    chosen = store.add_preference(ANN, left.id, right.id, "right", comment="more colourful")
    assert (chosen.left, chosen.right, chosen.better, chosen.status) == (left, right, "right", "new")
    assert [p.id for p in store.list_preferences(ANN).items] == [chosen.id] and store.list_preferences(BOB).items == []
    assert store.set_preference_status(ADMIN, chosen.id, "approved").status == "approved"
    assert store.delete(ANN, right.id) and store.list_preferences(ADMIN).items == [], "it goes with its completion"


# -- retention -----------------------------------------------------------------------------------------
def test_old_records_and_a_users_records_can_be_deleted(store):
    old = add(store, created=int(time.time()) - 40 * 86400)
    new, bobs = add(store), add(store, BOB)
    store.add_feedback(ANN, old.id, rating="bad")
    store.add_feedback(ADMIN, old.id, rating="good")
    store.add_preference(ANN, old.id, new.id, "right")
    assert store.delete_older_than(30) == {"completions": 1, "feedback": 2, "preferences": 1}
    assert store.get(ANN, old.id) is None and store.get(ANN, new.id) is not None
    store.add_feedback(ADMIN, new.id, rating="good")
    store.add_feedback(BOB, bobs.id, comment="mine")
    assert store.delete_user("ann") == {"completions": 1, "feedback": 1, "preferences": 0}
    assert store.count() == {"completions": 1, "feedback": 1, "preferences": 0}


# -- concurrency ---------------------------------------------------------------------------------------
def test_eight_writers_at_once_lose_nothing(store):
    """8 threads store completions and rate them at once; every write lands (SQLite: one writer at a time,
    queued on its lock; PostgreSQL: concurrent)."""
    errors: list[BaseException] = []
    made: list[str] = []
    start = threading.Barrier(WRITERS)

    def write(n: int) -> None:
        who = Caller(f"user{n}")
        try:
            start.wait()
            for i in range(EACH):
                done = add(store, who, metadata={"writer": str(n), "i": str(i)})
                store.add_feedback(who, done.id, rating="good" if i % 2 else "bad")
                made.append(done.id)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors[:3]
    assert store.count() == {"completions": WRITERS * EACH, "feedback": WRITERS * EACH, "preferences": 0}
    listed = store.list_completions(ADMIN, limit=1000).items
    assert sorted(c.id for c in listed) == sorted(made)
    assert len(store.list_completions(Caller("user3"), metadata={"writer": "3"}, limit=100).items) == EACH
