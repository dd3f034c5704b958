"""Fossil deltas (gateway.fossil), without sockets: round trips, the reference library's
deltas, and every way a delta can be wrong."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.fossil import DeltaError, apply, checksum, create

FIXTURES = Path(__file__).parent / "fixtures" / "fossil-delta.json"


@given(st.binary(max_size=600), st.binary(max_size=600))
def test_any_target_comes_back_from_any_source(source: bytes, target: bytes) -> None:
    assert apply(source, create(source, target)) == target


@given(st.binary(min_size=64, max_size=2000), st.data())
def test_a_few_changes_make_a_small_delta(source: bytes, data: st.DataObject) -> None:
    target = bytearray(source)
    for _ in range(data.draw(st.integers(0, 3))):
        at = data.draw(st.integers(0, len(target) - 1))
        target[at : at + 4] = data.draw(st.binary(min_size=1, max_size=8))
    delta = create(source, bytes(target))
    assert apply(source, delta) == target
    # Copies, not the whole target: at most 3 changes cost a few blocks each.
    assert len(delta) < 3 * 48 + 8 * 3 + 40 or len(target) < 200


def test_the_reference_librarys_deltas_apply() -> None:
    """Deltas made by fossil-delta (npm), the library the reference server's JavaScript SDK
    uses; it also applied ours for these pairs when the fixture was made."""
    vectors = json.loads(FIXTURES.read_text())["vectors"]
    assert len(vectors) == 6
    for vector in vectors:
        source, target = vector["source"].encode(), vector["target"].encode()
        assert apply(source, vector["delta"].encode()) == target
        assert apply(source, create(source, target)) == target


def test_checksum_is_the_sum_of_big_endian_words() -> None:
    assert checksum(b"") == 0
    assert checksum(b"\x00\x00\x00\x01\x00\x00\x00\x02") == 3
    assert checksum(b"\x01") == 1 << 24  # the last word padded with zeros
    assert checksum(b"\xff\xff\xff\xff\x00\x00\x00\x02") == 1  # modulo 2^32


def test_a_4_kib_document_with_a_few_changed_fields_is_a_small_delta() -> None:
    document = {"rows": [{"id": n, "name": f"row {n}", "value": n * 1.5} for n in range(90)]}
    before = json.dumps(document).encode()
    document["rows"][7]["value"] = 99.25
    document["rows"][51]["name"] = "renamed"
    after = json.dumps(document).encode()
    delta = create(before, after)
    assert len(after) > 4000 and len(delta) < 120, len(delta)
    assert apply(before, delta) == after


@pytest.mark.parametrize(
    ("delta", "error"),
    [
        (b"", "a number expected"),
        (b"5", "must end with a newline"),
        (b"5\n", "no checksum"),
        (b"5\n5:ab", "past the end of the delta"),
        (b"3\n3@9,0;", "past the end of the source"),
        (b"3\n3@0;", "must end with a comma"),
        (b"3\n3?abc", "unknown command"),
        (b"2\n3:abc0;", "more bytes than it says"),
        (b"3\n2:ab0;", "made 2 bytes"),
        (b"3\n3:abc0;", "checksum mismatch"),
        (b"3\n:abc", "a number expected"),
    ],
)
def test_a_corrupt_delta_is_refused(delta: bytes, error: str) -> None:
    with pytest.raises(DeltaError, match=error):
        apply(b"source text", delta)


def test_a_delta_applied_to_another_source_is_refused() -> None:
    delta = create(b"the first document, long enough", b"the first document, long enough!")
    with pytest.raises(DeltaError, match="checksum"):
        apply(b"the other document, long enough", delta)


def test_the_demo_pages_applier_agrees_with_the_reference_and_with_ours() -> None:
    """gateway/demo/demo.js applies deltas itself (a browser has no Fossil library): run its
    function in Node on the reference library's deltas and on deltas made here."""
    node = shutil.which("node")
    assert node is not None, "needs Node.js: ./dev test installs it with apt-get"
    source = (Path(__file__).parent.parent / "gateway" / "demo" / "demo.js").read_text()
    start, end = source.index("const bases"), source.index("// A delta subscription")
    vectors = json.loads(FIXTURES.read_text())["vectors"]
    before = json.dumps({"rows": [{"id": n, "name": f"é {n}"} for n in range(90)]})
    after = before.replace('"é 7"', '"renamed ✓"').replace('"é 61"', '"x"')
    ours = create(before.encode(), after.encode()).decode()
    vectors.append({"source": before, "target": after, "delta": ours})
    script = (
        source[start:end]
        + """
const enc = new TextEncoder(), dec = new TextDecoder();
const vectors = JSON.parse(require("fs").readFileSync(0, "utf8"));
const apply = (v) => dec.decode(fossilApply(enc.encode(v.source), enc.encode(v.delta)));
const results = vectors.map(apply);
let broken = false;
try { fossilApply(enc.encode("abc"), enc.encode("3\\n3:abd0;")); } catch { broken = true; }
console.log(JSON.stringify({results, broken}));
"""
    )
    done = subprocess.run(
        [node, "-e", script], input=json.dumps(vectors), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    output = json.loads(done.stdout)
    assert output["results"] == [v["target"] for v in vectors]
    assert output["broken"] is True  # a wrong checksum is refused
