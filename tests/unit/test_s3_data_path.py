"""An s3:// catalog data path: settings from the AWS env vars, and clear errors (naming the data
path, never the secret) before any round's work when the store cannot be used. The catalog's data
on a real S3 server: tests/server/test_object_store.py."""

from __future__ import annotations

import pytest

from stillhouse.storage.catalog import Catalog, CatalogError
from stillhouse.storage.object_store import ObjectStoreError, S3Settings, check_data_path
from stillhouse.tasks.config import ConfigError, parse_config
from tests.server.harness import free_port
from tests.unit.test_config import MINIMAL

pytestmark = pytest.mark.unit

SECRET = "unit-secret-9a8b7c6d5e4f"
CREDS = {"AWS_ACCESS_KEY_ID": "AKIAUNITTEST", "AWS_SECRET_ACCESS_KEY": SECRET}


def test_settings_from_the_aws_environment():
    aws = S3Settings.from_env("s3://b/p/", {**CREDS, "AWS_DEFAULT_REGION": "eu-west-1"})
    assert (aws.region, aws.endpoint, aws.use_ssl, aws.session_token) == ("eu-west-1", None, True, None)
    assert aws.where() == "AWS eu-west-1"

    local = S3Settings.from_env("s3://b/p/", {
        **CREDS, "AWS_REGION": "r1", "AWS_DEFAULT_REGION": "r2", "AWS_SESSION_TOKEN": "tok",
        "AWS_ENDPOINT_URL": "https://generic:1", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000/",
    })
    # The S3-specific endpoint wins over the generic one, AWS_REGION over AWS_DEFAULT_REGION.
    assert (local.region, local.endpoint, local.use_ssl, local.session_token) == ("r1", "127.0.0.1:9000", False, "tok")
    assert S3Settings.from_env("s3://b/", {**CREDS, "AWS_ENDPOINT_URL": "https://s3.example"}).use_ssl


@pytest.mark.parametrize("env, names", [
    ({}, ["AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"]),
    ({"AWS_ACCESS_KEY_ID": "AKIA"}, ["AWS_SECRET_ACCESS_KEY"]),
    ({**CREDS, "AWS_ENDPOINT_URL_S3": "127.0.0.1:9000"}, ["AWS_ENDPOINT_URL_S3", "not an endpoint URL"]),
])
def test_missing_or_bad_settings_name_the_data_path_and_the_variable(env, names):
    with pytest.raises(ObjectStoreError) as err:
        S3Settings.from_env("s3://b/run/", env)
    assert "catalog data_path s3://b/run/" in str(err.value)
    assert all(n in str(err.value) for n in names), str(err.value)


def test_catalog_without_credentials_fails_at_open(tmp_path, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(CatalogError, match=r"catalog data_path s3://bucket/run/: no S3 credentials"):
        Catalog(tmp_path / "run", data_path="s3://bucket/run/")


def test_catalog_on_an_unreachable_endpoint_fails_at_open(tmp_path, monkeypatch):
    port = free_port()  # nothing listens there
    for k, v in {**CREDS, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(CatalogError) as err:
        Catalog(tmp_path / "run", data_path="s3://bucket/run")
    message = str(err.value)
    assert message.startswith(f"catalog data_path s3://bucket/run/: the object store at http://127.0.0.1:{port}")
    assert "Could not connect" in message and SECRET not in message


@pytest.mark.parametrize("value, expected", [
    ("/mnt/shared/lake/", "/mnt/shared/lake/"),
    ("s3://bucket", "s3://bucket/"),
    ("s3://bucket/runs/a", "s3://bucket/runs/a/"),
])
def test_supported_data_paths(value, expected):
    assert check_data_path(value) == expected


@pytest.mark.parametrize("patch, path, reason", [
    ({"catalog": {"data_path": "gs://bucket/run/"}}, "catalog.data_path", "s3:// URL"),
    ({"catalog": {"data_path": "s3:///run/"}}, "catalog.data_path", "s3://bucket/prefix/"),
    ({"workdir": "s3://bucket/run"}, "workdir", "shared file system"),
    ({"cache_dir": "s3://bucket/cache"}, "cache_dir", "catalog.data_path"),
])
def test_config_refuses_urls_it_cannot_use(patch, path, reason):
    with pytest.raises(ConfigError) as err:
        parse_config({**MINIMAL, **patch})
    assert f"  {path}: " in str(err.value) and reason in str(err.value)
    assert parse_config({**MINIMAL, "catalog": {"data_path": "s3://b/r"}}).catalog.data_path == "s3://b/r/"
