"""Orthanc Python plugin: serve ``/move-storage`` on Orthanc's own REST API by forwarding it
to the objfs sidecar, so scripts written for the official object-storage plugins
(``curl -X POST http://orthanc:8042/move-storage ...``) work unchanged with objfs.

Orthanc configuration (Debian: ``apt install orthanc-python``)::

    "Plugins": ["/usr/share/orthanc/plugins/libOrthancPython.so"],
    "PythonScript": "/path/to/objfs_move_storage.py",
    "ObjfsSidecar": {"Url": "http://127.0.0.1:8044", "Username": "...", "Password": "...",
                     "Timeout": 3600}

Every key of ``ObjfsSidecar`` is optional (defaults: the sidecar's default address, no
authentication, one hour for a synchronous move). The sidecar's answer and status code are
passed through; an unreachable sidecar answers 502.
"""

import base64
import json
import urllib.error
import urllib.request

import orthanc

_settings = json.loads(orthanc.GetConfiguration()).get("ObjfsSidecar", {})
URL = _settings.get("Url", "http://127.0.0.1:8044").rstrip("/")
TIMEOUT = float(_settings.get("Timeout", 3600))
AUTH = None
if _settings.get("Username") is not None:
    pair = f"{_settings['Username']}:{_settings.get('Password', '')}".encode()
    AUTH = "Basic " + base64.b64encode(pair).decode()


def _send(output, status, body):
    if status == 200:
        output.AnswerBuffer(body, "application/json")
        return
    try:
        output.SendHttpStatus(status, body)
    except TypeError:  # orthanc-python before 4.1 takes the status code only
        output.SendHttpStatusCode(status)


def forward_move_storage(output, uri, **request):
    if request["method"] != "POST":
        output.SendMethodNotAllowed("POST")
        return
    forwarded = urllib.request.Request(URL + "/move-storage", data=request.get("body") or b"",
                                       method="POST",
                                       headers={"Content-Type": "application/json"})
    if AUTH is not None:
        forwarded.add_header("Authorization", AUTH)
    try:
        with urllib.request.urlopen(forwarded, timeout=TIMEOUT) as answer:
            _send(output, answer.status, answer.read())
    except urllib.error.HTTPError as exc:
        _send(output, exc.code, exc.read())
    except (urllib.error.URLError, OSError) as exc:
        orthanc.LogError(f"objfs move-storage: the sidecar at {URL} is unreachable: {exc}")
        message = {"HttpStatus": 502, "Message": f"objfs sidecar at {URL} is unreachable"}
        _send(output, 502, json.dumps(message).encode())


orthanc.RegisterRestCallback("/move-storage", forward_move_storage)
orthanc.LogWarning(f"objfs: /move-storage is forwarded to the objfs sidecar at {URL}")
