"""What every arq pool and worker agrees on: JSON job serialization and the Redis connection.

arq's default serializer is pickle: whoever can write to Redis could make a worker run code of
their choosing. Every pool (the gateway's enqueue, the trainer's and monitor's workers, tests)
uses :func:`arq_options` instead: jobs, arguments and results travel as JSON; a result that is not
JSON (an exception, say) is stored as its ``repr``. A job that is not valid JSON fails to
deserialize and is never run.

Redis URLs: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS) and
``unix:///path/to/socket?db=N`` all work, with percent-encoded user names and passwords decoded
(``redis://:p%40ss@host/0`` authenticates with ``p@ss``), as ``redis.asyncio.Redis.from_url``
(quotas, the sampling stream) reads them too.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlparse

if TYPE_CHECKING:
    from arq.connections import RedisSettings


def job_serializer(obj: Any) -> bytes:
    return json.dumps(obj, default=repr, separators=(",", ":")).encode()


def job_deserializer(raw: bytes) -> Any:
    return json.loads(raw)


def redis_settings(url: str) -> RedisSettings:
    """arq's connection settings for ``url`` (credentials decoded; see the module docstring)."""
    from arq.connections import RedisSettings

    conf = urlparse(url)
    if conf.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("a Redis URL starts with redis://, rediss:// or unix://")
    query_db = parse_qs(conf.query).get("db")
    if query_db:
        database = int(query_db[0])
    elif conf.scheme != "unix" and conf.path.strip("/"):
        database = int(conf.path.strip("/"))
    else:
        database = 0
    return RedisSettings(
        host=conf.hostname or "localhost", port=conf.port or 6379,
        ssl=conf.scheme == "rediss",
        username=unquote(conf.username) if conf.username else None,
        password=unquote(conf.password) if conf.password else None,
        database=database,
        unix_socket_path=conf.path if conf.scheme == "unix" else None)


def arq_options() -> dict[str, Any]:
    """Keyword arguments for ``arq.create_pool`` and ``arq.Worker``."""
    return {"job_serializer": job_serializer, "job_deserializer": job_deserializer}
