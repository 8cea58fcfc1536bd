"""Whether an MLflow store can be used, checked up front: a dead server then fails in seconds with
the command that starts one, instead of after MLflow's minutes of retries, and a registry look-up in a
local store that does not exist says so instead of creating an empty one. Pretraining (tracking), the
backbone download (export) and the registry commands all check through here."""
from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the URI and how to fix it."""

    exit_status = 2  # found before anything started


def sqlite_file(uri: str) -> Path | None:
    """The absolute database file of a ``sqlite:///`` URI; None for other stores and in-memory sqlite."""
    path = uri.removeprefix("sqlite:///")
    if path == uri or path in ("", ":memory:"):
        return None
    return Path(path).absolute()


def check_store_exists(uri: str) -> None:
    """``check_reachable``, and for a local sqlite store that its file exists (MLflow would create an
    empty store, in which no model or run could be found)."""
    check_reachable(uri)
    db = sqlite_file(uri)
    if db is not None and not db.is_file():
        raise TrackingError(
            f"no MLflow store at {db}: run from the directory the runs were started in (their default "
            f"store is runs/mlflow.db there), or name the store with MLFLOW_TRACKING_URI, "
            f"mlflow.tracking_uri or --tracking-uri.")


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with the fix in the message, if an http(s) tracking server does not answer.

    GETs ``<uri>/health`` (every ``mlflow server`` has it). A server that answers 401/403 is up
    but behind authentication, which MLflow's client handles with its configured credentials.
    Non-HTTP URIs (sqlite, databases) are not checked here.
    """
    if not uri.startswith(("http://", "https://")):
        return
    health_url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health_url, timeout=timeout_s):
            return
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            return
        reason = f"GET {health_url} answered HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:  # refused, unknown host, timeout
        reason = str(getattr(err, "reason", err))
    raise TrackingError(
        f"MLflow tracking server {uri} is unreachable ({reason}). Start one with `mlflow server "
        f"--backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000`, or leave "
        f"mlflow.tracking_uri and MLFLOW_TRACKING_URI unset to use the local store runs/mlflow.db.")
