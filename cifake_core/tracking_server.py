"""A shared MLflow tracking server and model registry for a team: `mlflow server` on a database store.

Runs, metrics and registered versions go to the backend store (PostgreSQL for a team; SQLite works for
one person), artifacts to `artifacts_destination` (a folder, or an object store such as s3://bucket/path),
served through the server itself so that clients need no storage credentials. The store is checked before
the server starts, so a wrong URI or a database that is down is one clear line instead of a stack trace
in a worker.

Usage:
    arguments = server_arguments("postgresql://mlflow:secret@db:5432/mlflow", "s3://bucket/mlflow", "0.0.0.0", 5000, 4)
    os.execv(sys.executable, [sys.executable, "-m", "mlflow", *arguments])
"""

from __future__ import annotations

import sqlalchemy

from cifake_core.errors import ConfigError

DATABASE_SCHEMES = ("postgresql", "mysql", "mssql", "sqlite")
CONNECT_TIMEOUT_SECONDS = 5


def database_scheme(uri: str) -> str | None:
    """The database `uri` names (`postgresql` for postgresql+psycopg://...), or None for a server or a folder."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0]
    return scheme if scheme in DATABASE_SCHEMES else None


def check_backend_store(uri: str) -> None:
    """Raise ConfigError, naming the problem and the fix, unless `uri` is a database that answers."""
    scheme = database_scheme(uri)
    if scheme is None:
        raise ConfigError(
            f"backend_store_uri {uri!r} is not a database URI: use postgresql://USER:PASSWORD@HOST:PORT/DB "
            "(or sqlite:///PATH for a single user)"
        )
    connect_args = {"connect_timeout": CONNECT_TIMEOUT_SECONDS} if scheme == "postgresql" else {}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=connect_args)
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT 1"))
        engine.dispose()
    except ModuleNotFoundError as error:
        raise ConfigError(
            f"no database driver for {scheme}: {error}. Install it (psycopg[binary] for PostgreSQL)"
        ) from error
    except sqlalchemy.exc.SQLAlchemyError as error:
        first_line = (str(error.orig if hasattr(error, "orig") else error).strip().splitlines() or [""])[0]
        raise ConfigError(
            f"cannot reach the backend store {_without_password(uri)}: {first_line}. Start the database or fix "
            "backend_store_uri"
        ) from error


def _without_password(uri: str) -> str:
    return sqlalchemy.engine.make_url(uri).render_as_string(hide_password=True)


def server_arguments(
    backend_store_uri: str, artifacts_destination: str, host: str, port: int, workers: int
) -> list[str]:
    """The `mlflow server` command line: the database store, artifacts served by the server."""
    return [
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        artifacts_destination,
        "--serve-artifacts",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
