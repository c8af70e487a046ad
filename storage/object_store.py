"""The catalog's data on an S3-compatible object store (`catalog.data_path: s3://bucket/prefix/`).

DuckLake writes and reads its Parquet files through DuckDB's httpfs extension, which needs an S3
secret in the connection. The secret is built from the standard AWS environment variables, the
ones every AWS SDK and CLI reads, so a run configures nothing new:

  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY   required (AWS_SESSION_TOKEN for temporary keys)
  AWS_REGION or AWS_DEFAULT_REGION           default us-east-1
  AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL    a non-AWS server (MinIO, Ceph RGW, ...), e.g.
                                             http://127.0.0.1:9000: path-style URLs, and no TLS
                                             for an http:// endpoint

The SDKs' other credential sources (~/.aws/credentials, instance roles) are not read: DuckDB
reaches them only through its `aws` extension, which has no offline package. The secret lives in
the connection's memory only (a temporary DuckDB secret) and is never logged or put in an error.

A run's cache and workdir stay on a file system (see tasks/config.py RunConfig): only the
catalog's data files go to the object store.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import duckdb

log = logging.getLogger(__name__)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class ObjectStoreError(RuntimeError):
    """The object store of a data path cannot be used: no credentials, unreachable, no bucket."""


def is_url(path: str) -> bool:
    """`scheme://...` as opposed to a local (or mounted shared) file-system path."""
    return _URL.match(path) is not None


def check_data_path(data_path: str) -> str:
    """A data path the catalog can use: a file-system path, or s3://bucket[/prefix]/ (with the
    trailing slash added: DuckLake appends its file names to the prefix). ValueError otherwise."""
    if not is_url(data_path):
        return data_path
    parts = urlsplit(data_path)
    if parts.scheme != "s3":
        raise ValueError(
            f"data_path {data_path!r}: only a file-system path or an s3:// URL (any S3-compatible "
            "server, through AWS_ENDPOINT_URL_S3) is supported"
        )
    if not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"data_path {data_path!r}: expected s3://bucket/prefix/")
    return data_path if data_path.endswith("/") else data_path + "/"


@dataclass(frozen=True)
class S3Settings:
    """What the DuckDB S3 secret is made of (from the AWS environment variables)."""

    key_id: str
    secret: str
    session_token: str | None
    region: str
    endpoint: str | None  # host[:port], None = AWS
    use_ssl: bool

    @classmethod
    def from_env(cls, data_path: str, env: Mapping[str, str] | None = None) -> S3Settings:
        env = os.environ if env is None else env
        missing = [k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not env.get(k)]
        if missing:
            raise ObjectStoreError(
                f"catalog data_path {data_path}: no S3 credentials: set {' and '.join(missing)} "
                "(and AWS_ENDPOINT_URL_S3 for a server other than AWS) in the environment of every "
                "process of the run"
            )
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
        endpoint_var = next((k for k in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL") if env.get(k)), None)
        endpoint, use_ssl = None, True
        if endpoint_var is not None:
            url = urlsplit(env[endpoint_var])
            if url.scheme not in ("http", "https") or not url.netloc or url.path.strip("/"):
                raise ObjectStoreError(
                    f"catalog data_path {data_path}: {endpoint_var}={env[endpoint_var]!r} is not an "
                    "endpoint URL like http://host:9000 or https://host"
                )
            endpoint, use_ssl = url.netloc, url.scheme == "https"
        return cls(
            key_id=env["AWS_ACCESS_KEY_ID"],
            secret=env["AWS_SECRET_ACCESS_KEY"],
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            region=region,
            endpoint=endpoint,
            use_ssl=use_ssl,
        )

    def where(self) -> str:
        """The server, for messages (no credentials)."""
        return f"{'https' if self.use_ssl else 'http'}://{self.endpoint}" if self.endpoint else f"AWS {self.region}"

    def redact(self, text: str) -> str:
        # The project's one secret masker (every shape a secret takes in a message).
        from stillhouse.tasks.redact import Redactor

        return Redactor([self.secret, self.session_token])(text)


def prepare_data_path(con: duckdb.DuckDBPyConnection, data_path: str, env: Mapping[str, str] | None = None) -> None:
    """Make `data_path` usable from `con` before the catalog is attached: nothing for a file-system
    path; for s3:// load httpfs, add the S3 secret from the environment, and check with one
    listing request that the bucket answers (so a wrong endpoint, a missing bucket or refused
    credentials fail here, naming the data path, not halfway through a round's first write)."""
    if not is_url(data_path):
        return
    # Imported here: the config validates data paths with this module and needs no duckdb.
    import duckdb

    from stillhouse.storage.ducklake_ext import load_extension, sql_str

    data_path = check_data_path(data_path)
    bucket = urlsplit(data_path).netloc
    s3 = S3Settings.from_env(data_path, env)
    try:
        load_extension(con, "httpfs")
    except RuntimeError as e:
        raise ObjectStoreError(f"catalog data_path {data_path}: {e}") from None
    opts = [
        "TYPE s3",
        f"KEY_ID '{sql_str(s3.key_id)}'",
        f"SECRET '{sql_str(s3.secret)}'",
        f"REGION '{sql_str(s3.region)}'",
        f"SCOPE 's3://{sql_str(bucket)}/'",
    ]
    if s3.session_token:
        opts.append(f"SESSION_TOKEN '{sql_str(s3.session_token)}'")
    if s3.endpoint:
        # Self-hosted servers address buckets in the path (no per-bucket DNS names).
        opts += [f"ENDPOINT '{sql_str(s3.endpoint)}'", "URL_STYLE 'path'", f"USE_SSL {str(s3.use_ssl).lower()}"]
    try:
        con.execute(f"CREATE OR REPLACE SECRET stillhouse_data_path ({', '.join(opts)})")
    except duckdb.Error as e:
        # Never the statement itself: it holds the secret.
        raise ObjectStoreError(
            f"catalog data_path {data_path}: cannot set up the S3 secret: {s3.redact(str(e))}"
        ) from None
    # A prefix no object has: one cheap ListObjectsV2 request however large the run's data is.
    probe = f"{data_path}stillhouse-probe-{uuid.uuid4().hex}*"
    try:
        con.execute("SELECT count(*) FROM glob(?)", [probe]).fetchone()
    except duckdb.Error as e:
        # DuckDB's message, without the "LINE 1: <query>" pointer it appends.
        lines = s3.redact(str(e)).split("\nLINE ")[0].split()
        raise ObjectStoreError(
            f"catalog data_path {data_path}: the object store at {s3.where()} did not answer a "
            f"listing of bucket {bucket!r} (is the endpoint right, the bucket created, the key "
            f"allowed to list and write it?): {' '.join(lines)}"
        ) from None
    log.debug("catalog data on %s (%s)", data_path, s3.where())
