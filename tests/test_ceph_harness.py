"""The Ceph RGW harness (tests/cluster/ceph.py) against a real S3 gateway.

Skipped, with the reason, when Ceph cannot be installed (no root, no apt-get,
no network) or botocore is missing; WSFILES_REQUIRE_CEPH=1 makes those failures.
"""

import hashlib
import io
import os
import xml.etree.ElementTree as ET

import pytest
from cluster.ceph import CephRGW

MiB = 1024 * 1024
S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"

# Install (about 25 s, once per machine) and start (about 2 s) count toward the
# timeout of the first test that asks for the session's gateway.
pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def rgw(ceph_rgw):
    """The session's gateway (conftest.py wires ``ceph_rgw_session`` as ``ceph_rgw``)."""
    return ceph_rgw


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _xml_text(body: bytes, tag: str) -> str:
    element = ET.fromstring(body).find(S3_NS + tag)
    assert element is not None, body
    return element.text or ""


def _list_keys(rgw: CephRGW, bucket: str, prefix: str) -> list[str]:
    response = rgw.request("GET", bucket, query={"list-type": "2", "prefix": prefix})
    assert response.status == 200, response.body
    root = ET.fromstring(response.body)
    assert root.findtext(S3_NS + "Prefix") == prefix
    return [key.text or "" for key in root.iter(S3_NS + "Key")]


def test_bucket_object_multipart_list_delete(rgw: CephRGW):
    bucket = "harness-bucket"
    rgw.create_bucket(bucket)

    # A plain PUT and GET.
    body = b"hello from wsfiles\n"
    put = rgw.request("PUT", bucket, "docs/hello.txt", body=body)
    assert put.status == 200, put.body
    assert put.headers["ETag"] == f'"{_md5(body)}"'
    got = rgw.request("GET", bucket, "docs/hello.txt")
    assert (got.status, got.body) == (200, body)

    # Multipart: 5 MiB (the least a part other than the last may be) + 1 byte.
    # Part 1 streams from a file object with x-amz-content-sha256: UNSIGNED-PAYLOAD;
    # part 2 is signed with its SHA-256 as usual.
    part1 = os.urandom(5 * MiB)
    part2 = b"!"
    key = "docs/big.bin"
    init = rgw.request("POST", bucket, key, query={"uploads": ""})
    assert init.status == 200, init.body
    upload_id = _xml_text(init.body, "UploadId")
    etags = []
    for number, data in ((1, part1), (2, part2)):
        query = {"partNumber": str(number), "uploadId": upload_id}
        if number == 1:
            response = rgw.request(
                "PUT",
                bucket,
                key,
                query=query,
                body=io.BytesIO(data),
                headers={"Content-Length": str(len(data))},
                unsigned_payload=True,
            )
        else:
            response = rgw.request("PUT", bucket, key, query=query, body=data)
        assert response.status == 200, response.body
        assert response.headers["ETag"] == f'"{_md5(data)}"'
        etags.append(response.headers["ETag"])
    parts = "".join(
        f"<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>"
        for n, etag in enumerate(etags, 1)
    )
    complete = rgw.request(
        "POST",
        bucket,
        key,
        query={"uploadId": upload_id},
        body=f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode(),
    )
    assert complete.status == 200, complete.body
    # The multipart ETag: MD5 of the parts' binary MD5s, then "-<number of parts>".
    # RGW 16.2 leaves <ETag> empty in the CompleteMultipartUpload answer; HEAD
    # and listings have it.
    joined = hashlib.md5(part1).digest() + hashlib.md5(part2).digest()
    multipart_etag = f'"{_md5(joined)}-2"'
    assert _xml_text(complete.body, "ETag") in ("", multipart_etag)
    head = rgw.request("HEAD", bucket, key)
    assert head.status == 200
    assert head.headers["ETag"] == multipart_etag
    assert head.headers["Content-Length"] == str(5 * MiB + 1)

    whole = rgw.request("GET", bucket, key)
    assert whole.status == 200
    assert len(whole.body) == 5 * MiB + 1 and whole.body == part1 + part2
    across = rgw.request("GET", bucket, key, headers={"Range": f"bytes={5 * MiB - 1}-"})
    assert across.status == 206
    assert across.headers["Content-Range"] == f"bytes {5 * MiB - 1}-{5 * MiB}/{5 * MiB + 1}"
    assert across.body == part1[-1:] + part2

    # List by prefix.
    assert rgw.request("PUT", bucket, "other/x", body=b"x").status == 200
    assert _list_keys(rgw, bucket, "docs/") == ["docs/big.bin", "docs/hello.txt"]
    assert _list_keys(rgw, bucket, "other/") == ["other/x"]

    # Delete the objects, then the bucket.
    for name in ("docs/hello.txt", "docs/big.bin", "other/x"):
        assert rgw.request("DELETE", bucket, name).status == 204
    assert rgw.request("GET", bucket, "docs/hello.txt").status == 404
    assert _list_keys(rgw, bucket, "") == []
    assert rgw.request("DELETE", bucket).status == 204
    assert rgw.request("HEAD", bucket).status == 404


def test_rgw_s3_quirks(rgw: CephRGW):
    """What RGW 16.2 does where S3 implementations differ (see the module docstring
    of tests/cluster/ceph.py)."""
    # SigV4: RGW checks the signature with whatever region the client signed for.
    for region in ("us-east-1", "default", "eu-west-3"):
        assert rgw.request("GET", region=region).status == 200, region
    # A wrong secret is refused.
    good, rgw.secret_key = rgw.secret_key, "wrong"
    try:
        assert rgw.request("GET").status == 403
    finally:
        rgw.secret_key = good

    # LocationConstraint: the zonegroup's name ("default"), or none; not "us-east-1".
    def create(name: str, constraint: str) -> int:
        body = (
            "<CreateBucketConfiguration><LocationConstraint>"
            f"{constraint}</LocationConstraint></CreateBucketConfiguration>"
        ).encode()
        return rgw.request("PUT", name, body=body).status

    assert create("quirk-default", "default") == 200
    assert create("quirk-us-east-1", "us-east-1") == 400
    location = rgw.request("GET", "quirk-default", query={"location": ""})
    assert location.status == 200 and b">default</LocationConstraint>" in location.body
    # Bucket names need 3 to 63 characters.
    assert rgw.request("PUT", "ab").status == 400

    # Ranged GET: 206 for a range and a suffix range, 416 past the end.
    assert rgw.request("PUT", "quirk-default", "k", body=b"0123456789").status == 200
    ranged = rgw.request("GET", "quirk-default", "k", headers={"Range": "bytes=2-4"})
    assert (ranged.status, ranged.body) == (206, b"234")
    assert ranged.headers["Content-Range"] == "bytes 2-4/10"
    suffix = rgw.request("GET", "quirk-default", "k", headers={"Range": "bytes=-3"})
    assert (suffix.status, suffix.body) == (206, b"789")
    past = rgw.request("GET", "quirk-default", "k", headers={"Range": "bytes=50-60"})
    assert past.status == 416

    # Multipart: small parts are accepted one by one; completing refuses a part
    # other than the last under 5 MiB (EntityTooSmall).  Abort answers 204.
    init = rgw.request("POST", "quirk-default", "mp", query={"uploads": ""})
    upload_id = _xml_text(init.body, "UploadId")
    etags = []
    for number in (1, 2):
        query = {"partNumber": str(number), "uploadId": upload_id}
        part = rgw.request("PUT", "quirk-default", "mp", query=query, body=b"ab")
        assert part.status == 200
        etags.append(part.headers["ETag"])
    parts = "".join(
        f"<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>"
        for n, etag in enumerate(etags, 1)
    )
    complete = rgw.request(
        "POST",
        "quirk-default",
        "mp",
        query={"uploadId": upload_id},
        body=f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode(),
    )
    assert complete.status == 400 and b"EntityTooSmall" in complete.body
    abort = rgw.request("DELETE", "quirk-default", "mp", query={"uploadId": upload_id})
    assert abort.status == 204

    assert rgw.request("DELETE", "quirk-default", "k").status == 204
    assert rgw.request("DELETE", "quirk-default").status == 204
