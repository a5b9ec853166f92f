"""The coordinator's schema migrations (Alembic), configured in code: no alembic.ini.

`upgrade(engine)` brings any database to the head revision: an empty one, one written by
the release before Alembic (revision 0001 adopts it in place), or one at an older
revision. A Store calls it when it opens its database, so upgrading the coordinator
upgrades its schema; on PostgreSQL an advisory lock serialises coordinators that start
together (env.py).

New revision (after changing coordinator/store.py's tables):
    python -c "from coordinator.migrations import new_revision; new_revision('what changed')"
then write its upgrade() by hand (SQLite needs `op.batch_alter_table` to alter columns).
"""

from __future__ import annotations

import threading
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine

__all__ = ["current_revision", "head_revision", "new_revision", "upgrade"]

_HERE = Path(__file__).resolve().parent
# Alembic's `op` and `context` are module-level proxies installed per run: two upgrades in
# one process at once would clobber each other (other processes are the advisory lock's)
_ONE_AT_A_TIME = threading.Lock()


def _config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_HERE))
    cfg.attributes["connection"] = connection  # env.py migrates on this connection
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate `engine`'s database to `revision`, in one transaction where the database
    has transactional DDL (PostgreSQL: a failed upgrade leaves the old schema whole)."""
    with _ONE_AT_A_TIME, engine.begin() as conn:
        command.upgrade(_config(conn), revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None, "no migration revisions"
    return head


def new_revision(message: str) -> None:
    """A new, empty revision file under versions/ (for developers)."""
    command.revision(_config(), message=message)
