"""Environment-variable names the orthancteam way: ``ORTHANC__SECTION__OPTION``.

CamelCase is written CAMEL_CASE (``AwsS3Storage`` -> ``AWS_S3_STORAGE``); back from a name, each
``_``-separated word keeps its first letter and lower-cases the rest, with the images' own
exceptions (``POSTGRESQL``, ``MYSQL``). Pure.
"""

from __future__ import annotations

import re

ENV_PREFIX = "ORTHANC__"
SECRET_SUFFIX = "_SECRET"
WHOLE_ROOT_ENV = "ORTHANC_JSON"
_WORD_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
# Names the orthancteam images do not derive by their rule (their non-standard table).
ENV_EXCEPTIONS = {"PostgreSQL": "POSTGRESQL", "MySQL": "MYSQL"}
_JSON_EXCEPTIONS = {v: k for k, v in ENV_EXCEPTIONS.items()}


def env_word(name: str) -> str:
    """CamelCase -> CAMEL_CASE as the orthancteam images do (``AwsS3Storage`` ->
    ``AWS_S3_STORAGE``, ``SseKmsKeyId`` -> ``SSE_KMS_KEY_ID``)."""
    return ENV_EXCEPTIONS.get(name) or _WORD_BOUNDARY.sub("_", name).upper()


def json_word(word: str) -> str:
    """The orthancteam rule back: each ``_``-separated word keeps its first character and
    lower-cases the rest (``AWS_S3_STORAGE`` -> ``AwsS3Storage``)."""
    return _JSON_EXCEPTIONS.get(word) or "".join(w[:1] + w[1:].lower() for w in word.split("_"))


def env_name(*path: str) -> str:
    """The environment variable that sets the option at JSON `path`."""
    return ENV_PREFIX + "__".join(env_word(p) for p in path)


def env_path(name: str) -> tuple[str, ...]:
    """The JSON path an ``ORTHANC__...`` variable (or secret file) name sets."""
    return tuple(json_word(w) for w in name[len(ENV_PREFIX):].split("__"))
