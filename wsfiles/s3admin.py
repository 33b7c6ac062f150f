"""``wsfiles s3 mkbucket``: create the bucket that ``twistd wsfiles --storage s3`` uses.

The server never creates its bucket (a typo in ``--s3-bucket`` would quietly
make a new, empty one); an operator does it once with this command, which
takes the same ``--s3-*`` options as the server.  It is idempotent: a bucket
that already exists and is ours is success.

Only the standard library is imported at module level (``wsfiles.cli`` loads
this module to build its parser); botocore, for SigV4, only when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from typing import Any
from xml.etree import ElementTree

#: How long the store may take to answer, in seconds.
TIMEOUT = 30.0
#: The region whose buckets take no LocationConstraint (and the one Ceph RGW
#: accepts without one: it refuses ``us-east-1`` as a constraint).
DEFAULT_REGION = "us-east-1"


class S3AdminError(Exception):
    """The command failed; the message is the one line the user sees."""


def add_s3_commands(commands: Any) -> None:
    """Add ``s3 mkbucket`` to the ``wsfiles`` command's subparsers."""
    s3 = commands.add_parser("s3", help="object store tools (for --storage s3)")
    s3_commands = s3.add_subparsers(dest="s3_command", required=True)
    mkbucket = s3_commands.add_parser(
        "mkbucket",
        help="create the bucket (success if it exists already and is yours)",
        description="Create the bucket twistd wsfiles --storage s3 uses. Takes the same "
        "--s3-* options as the server; keys from --s3-credentials or "
        "$AWS_ACCESS_KEY_ID/$AWS_SECRET_ACCESS_KEY.",
    )
    mkbucket.add_argument(
        "--s3-endpoint", required=True, metavar="URL", help="e.g. http://127.0.0.1:7480"
    )
    mkbucket.add_argument("--s3-bucket", required=True, metavar="NAME")
    mkbucket.add_argument("--s3-region", default=DEFAULT_REGION, metavar="REGION")
    mkbucket.add_argument(
        "--s3-credentials", metavar="FILE", help="file with 'ACCESS_KEY SECRET_KEY'"
    )
    mkbucket.set_defaults(run=_mkbucket)


def _keys(path: str | None) -> tuple[str, str]:
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                fields = f.read().split()
        except OSError as e:
            raise S3AdminError(f"--s3-credentials: {e.strerror}: {path}") from None
        if len(fields) != 2:
            raise S3AdminError("--s3-credentials: expected 'ACCESS_KEY SECRET_KEY'")
        return fields[0], fields[1]
    access, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not access or not secret:
        raise S3AdminError("needs --s3-credentials, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    return access, secret


def _error_code(body: bytes) -> str:
    try:
        return ElementTree.fromstring(body).findtext("Code") or ""
    except ElementTree.ParseError:
        return ""


def _send(method: str, url: str, body: bytes, region: str, access: str, secret: str) -> Any:
    """One SigV4-signed request (path style); the response, or HTTPError/URLError."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    request = AWSRequest(method=method, url=url, data=body)
    S3SigV4Auth(Credentials(access, secret), "s3", region).add_auth(request)
    headers = dict(request.headers.items())
    sent = urllib.request.Request(url, data=body or None, method=method, headers=headers)
    return urllib.request.urlopen(sent, timeout=TIMEOUT)


def make_bucket(endpoint: str, bucket: str, region: str, access: str, secret: str) -> str:
    """Create the bucket unless it is there; what happened, or S3AdminError.

    HEAD first: some stores (Ceph RGW) answer 200 to creating a bucket one
    already owns, so only HEAD can say it existed.
    """
    try:
        import botocore  # noqa: F401
    except ImportError:
        raise S3AdminError("needs botocore: pip install 'wsfiles[s3]'") from None
    if not endpoint.startswith(("http://", "https://")):
        raise S3AdminError(f"--s3-endpoint must start with http:// or https://, not {endpoint!r}")
    url = f"{endpoint.rstrip('/')}/{bucket}"
    body = b""
    if region != DEFAULT_REGION:
        body = (
            "<CreateBucketConfiguration><LocationConstraint>"
            f"{region}</LocationConstraint></CreateBucketConfiguration>"
        ).encode()
    try:
        try:
            with _send("HEAD", url, b"", region, access, secret):
                return f"bucket {bucket} already exists at {endpoint}"
        except urllib.error.HTTPError as e:
            e.close()
            if e.code != 404:
                raise S3AdminError(
                    f"the store refused to show bucket {bucket}: {e.code} {e.reason}"
                    " (wrong keys, or a bucket of someone else)"
                ) from None
        with _send("PUT", url, body, region, access, secret):
            return f"created bucket {bucket} at {endpoint}"
    except urllib.error.HTTPError as e:
        with e:
            code = _error_code(e.read())
        if code == "BucketAlreadyOwnedByYou":  # created meanwhile
            return f"bucket {bucket} already exists at {endpoint}"
        if code == "BucketAlreadyExists":
            raise S3AdminError(f"bucket {bucket} exists and belongs to someone else") from None
        raise S3AdminError(
            f"the store refused to create bucket {bucket}: {e.code} {code or e.reason}"
        ) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise S3AdminError(f"cannot reach the store at {endpoint}: {reason}") from None


def _mkbucket(args: argparse.Namespace) -> int:
    try:
        access, secret = _keys(args.s3_credentials)
        said = make_bucket(args.s3_endpoint, args.s3_bucket, args.s3_region, access, secret)
    except S3AdminError as e:
        sys.stderr.write(f"wsfiles: {e}\n")
        return 1
    sys.stdout.write(said + "\n")
    return 0
